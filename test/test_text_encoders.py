"""Text encoders: MiniLM with the real shipped weights, the open_clip text tower (tiny preset), the LRU cache."""

from __future__ import annotations

import pytest
import torch

from langgs_ros.semantics.text import (
    MINILM_ENCODER_ID,
    MiniLMTextEncoder,
    OpenClipModel,
    OpenClipTextEncoder,
    load_open_clip_model,
    make_text_encoder,
)


@pytest.fixture(scope="module")
def minilm() -> MiniLMTextEncoder:
    return MiniLMTextEncoder(device="cpu")


@pytest.fixture(scope="module")
def tiny_clip() -> OpenClipModel:
    return load_open_clip_model(preset="tiny", device="cpu", seed=0)


def test_minilm_real_weights_semantics(minilm: MiniLMTextEncoder) -> None:
    """Real all-MiniLM-L6-v2 weights: a synonym is closer than an unrelated object."""
    emb = minilm.encode_text(["sofa", "couch", "espresso machine"])
    assert emb.shape == (3, 384) and emb.dtype == torch.float32 and emb.device.type == "cpu"
    assert minilm.encoder_id == MINILM_ENCODER_ID and minilm.dim == 384
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    sim_couch = float(emb[0] @ emb[1])
    sim_espresso = float(emb[0] @ emb[2])
    assert sim_couch > sim_espresso + 0.3, (sim_couch, sim_espresso)
    # Another real-word check: basket phrases closer to each other than to the sofa.
    e2 = minilm.encode_text(["wicker fruit basket", "basket of apples", "sofa"])
    assert float(e2[0] @ e2[1]) > float(e2[0] @ e2[2])


def test_minilm_cache_avoids_model_calls(minilm: MiniLMTextEncoder, monkeypatch: pytest.MonkeyPatch) -> None:
    first = minilm.encode_text(["red backpack", "floor lamp"])
    calls: list[list[str]] = []
    real = minilm._encode_uncached

    def spy(texts: list[str]) -> torch.Tensor:
        calls.append(list(texts))
        return real(texts)

    monkeypatch.setattr(minilm, "_encode_uncached", spy)
    again = minilm.encode_text(["floor lamp", "red backpack", "floor lamp"])
    assert calls == []  # all served from the cache
    torch.testing.assert_close(again, first[[1, 0, 1]], rtol=1e-5, atol=1e-6)
    mixed = minilm.encode_text(["red backpack", "kitchen sink", "kitchen sink"])
    assert calls == [["kitchen sink"]]  # only the miss, once
    torch.testing.assert_close(mixed[0], first[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed[1], mixed[2], rtol=1e-5, atol=1e-6)


def test_minilm_batch_equals_single(minilm: MiniLMTextEncoder) -> None:
    """Caching per text must not change results: batched and single encodings agree."""
    fresh = MiniLMTextEncoder(device="cpu", cache_size=0)
    batch = fresh.encode_text(["potted plant", "white canister", "foosball table"])
    single = torch.cat([fresh.encode_text([t]) for t in ["potted plant", "white canister", "foosball table"]])
    torch.testing.assert_close(batch, single, atol=1e-5, rtol=0)
    assert fresh.cache_len == 0 and fresh.misses == 6


def test_encode_text_input_validation(minilm: MiniLMTextEncoder) -> None:
    assert minilm.encode_text([]).shape == (0, 384)
    with pytest.raises(ValueError, match="single string"):
        minilm.encode_text("sofa")
    with pytest.raises(ValueError, match="strings"):
        minilm.encode_text(["sofa", 3])  # type: ignore[list-item]


def test_open_clip_text_encoder_tiny(tiny_clip: OpenClipModel) -> None:
    enc = OpenClipTextEncoder(tiny_clip)
    assert enc.encoder_id == "open_clip:tiny-random:seed0" and enc.dim == tiny_clip.dim == 64
    emb = enc.encode_text(["sofa", "the red backpack"])
    assert emb.shape == (2, 64)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(emb, tiny_clip.encode_text(["sofa", "the red backpack"]), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(emb[0], emb[1])
    # One shared model per configuration.
    assert load_open_clip_model(preset="tiny", device="cpu", seed=0) is tiny_clip
    assert make_text_encoder("open_clip_tiny").clip is tiny_clip


def test_lru_eviction(tiny_clip: OpenClipModel) -> None:
    enc = OpenClipTextEncoder(tiny_clip, cache_size=2)
    enc.encode_text(["a", "b"])
    enc.encode_text(["a"])  # a is now most recent
    enc.encode_text(["c"])  # evicts b
    assert enc.cache_len == 2 and enc.misses == 3 and enc.hits == 1
    enc.encode_text(["a"])
    assert enc.misses == 3
    enc.encode_text(["b"])
    assert enc.misses == 4


def test_make_text_encoder_unknown() -> None:
    with pytest.raises(ValueError, match="unknown text encoder"):
        make_text_encoder("word2vec")


def test_open_clip_missing_weights_error(tmp_path) -> None:
    missing = tmp_path / "open_clip_model.safetensors"
    with pytest.raises(FileNotFoundError, match="langgs-download-weights") as info:
        OpenClipModel.from_pretrained("ViT-B-16", "laion2b_s34b_b88k", checkpoint=missing)
    assert str(missing) in str(info.value)
    with pytest.raises(ValueError, match="unknown pretrained tag"):
        OpenClipModel.from_pretrained("ViT-B-16", "no_such_tag")
    with pytest.raises(ValueError, match="unknown open_clip model"):
        OpenClipModel.from_pretrained("ViT-Q-99", "laion2b_s34b_b88k")


def test_encoder_from_id(minilm: MiniLMTextEncoder, tiny_clip: OpenClipModel) -> None:
    from langgs_ros.semantics.text import encoder_from_id

    enc = encoder_from_id("sentence_transformers:all-MiniLM-L6-v2")
    assert enc.model is minilm.model  # one loaded model per device
    torch.testing.assert_close(enc.encode_text(["sofa"]), minilm.encode_text(["sofa"]), rtol=0, atol=1e-5)
    tiny = encoder_from_id("open_clip:tiny-random:seed0")
    assert tiny.clip is tiny_clip and tiny.encoder_id == "open_clip:tiny-random:seed0"
    with pytest.raises(ValueError, match="unknown encoder id"):
        encoder_from_id("word2vec:google-news")
    with pytest.raises(ValueError, match="checkpoint"):
        encoder_from_id("open_clip:tiny-random:my_weights")
