"""Fetching what the demo and ``langgs-download-weights`` need: files over HTTP(S) with a progress bar, cached, and
failures reported as one short paragraph a person can act on.

- :func:`fetch_url`: one file, streamed to ``<dest>.part`` with a ``tqdm`` progress bar, size stated before the
  transfer starts (``Content-Length``), length checked, then renamed into place (atomic). An existing ``dest`` is
  the cache: it is returned without any network access.
- :func:`fetch_tum_sample`: the TUM RGB-D ``fr1_desk`` sequence (Sturm et al., IROS 2012), downloaded as its
  ``.tgz`` and unpacked (``tarfile`` with the ``data`` filter) into the data cache (:func:`default_data_dir`).
- :class:`DownloadError`: what failed, why, how to get the files by hand, and how to point the program at a local
  copy; ``str()`` is that paragraph.

Where things come from is configurable (mirrors, and the tests, which serve from 127.0.0.1 only):
``$LANGGS_TUM_BASE_URL`` (folder URL of the TUM archives), ``$LANGGS_SAM_BASE_URL`` (see
:mod:`langgs_ros.weights_cli`), and huggingface_hub's own ``$HF_ENDPOINT`` for CLIP and VGGT.
"""

from __future__ import annotations

import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

TUM_BASE_URL_ENV = "LANGGS_TUM_BASE_URL"
"""Environment variable: folder URL holding the TUM RGB-D ``<sequence>.tgz`` archives (a mirror)."""
TUM_DEFAULT_BASE_URL = "https://cvg.cit.tum.de/rgbd/dataset/freiburg1/"
"""The TUM RGB-D benchmark's own download folder for the freiburg1 sequences."""
TUM_SAMPLE = "rgbd_dataset_freiburg1_desk"
"""The demo's sample: fr1_desk (573 colour frames, 23 s, 9.3 m of hand-held camera motion over two desks)."""
DATA_DIR_ENV = "LANGGS_DATA_DIR"
"""Environment variable: folder where downloaded data sets are unpacked (default ``~/.cache/langgs_ros/datasets``)."""
USER_AGENT = "langgs_ros-download"


class DownloadError(RuntimeError):
    """Something needed could not be fetched (or is missing); ``str()`` is one short paragraph for a person.

    Attributes:
        what: what was being fetched ("the TUM RGB-D sample fr1_desk", "SAM vit_b weights", ...).
        reason: why it failed (first line of the underlying error).
        manual: how to get the files by hand (URL, command, where to put them).
        local: how to point the program at a local copy instead.
    """

    def __init__(self, what: str, reason: str, manual: str = "", local: str = "") -> None:
        self.what, self.reason, self.manual, self.local = what, reason, manual, local
        super().__init__(self.paragraph())

    def paragraph(self) -> str:
        """The message: ``<what> failed: <reason>. <manual> <local>`` (sentences, no traceback)."""
        parts = [f"Could not get {self.what}: {self.reason.rstrip('.')}."]
        if self.manual:
            parts.append(self.manual.rstrip(".") + ".")
        if self.local:
            parts.append(self.local.rstrip(".") + ".")
        return " ".join(parts)


def short_reason(exc: BaseException, limit: int = 240) -> str:
    """One line describing ``exc`` (``urllib`` reasons unwrapped, long messages cut to ``limit`` characters)."""
    if isinstance(exc, urllib.error.HTTPError):
        text = f"HTTP {exc.code} {exc.reason}"
    elif isinstance(exc, urllib.error.URLError):
        text = f"no connection ({exc.reason})"
    else:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if type(exc).__name__ in ("ConnectError", "ConnectTimeout", "OfflineModeIsEnabled") or \
                isinstance(exc, ConnectionError):  # httpx (huggingface_hub) and plain socket errors
            text = f"no connection ({text})"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def human_size(num_bytes: int | None) -> str:
    """``1234567`` -> ``"1.2 MB"`` (decimal units); ``None`` -> ``"size unknown"``."""
    if num_bytes is None:
        return "size unknown"
    n = float(num_bytes)
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000.0 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} GB"  # pragma: no cover


def default_data_dir() -> Path:
    """Folder of downloaded data sets: ``$LANGGS_DATA_DIR`` or ``~/.cache/langgs_ros/datasets``."""
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "langgs_ros" / "datasets"


def fetch_url(url: str, dest: str | Path, *, what: str | None = None, timeout: float = 30.0,
              progress: bool = True, chunk_bytes: int = 1 << 20) -> Path:
    """Download ``url`` to ``dest`` (cached: an existing ``dest`` is returned without network access).

    Prints ``downloading <what>: <size> from <url>`` to stderr before the transfer, shows a ``tqdm`` byte progress
    bar (stderr), writes ``<dest>.part`` and renames it into place once complete; a transfer shorter than the
    announced ``Content-Length`` is an error. Partial files are removed on failure.

    Args:
        url: ``http(s)://`` or ``file://`` URL.
        dest: destination file; its folder is created.
        what: name used in messages (default: the file name).
        timeout: seconds without data before giving up (connect and each read).
        progress: show the progress bar.
        chunk_bytes: read size.

    Returns:
        ``dest`` as a :class:`Path`.

    Raises:
        DownloadError: no connection, HTTP error, short read, or the file could not be written; the paragraph
            names the URL and ``dest`` so the file can be fetched by hand.
    """
    from tqdm import tqdm

    dest = Path(dest).expanduser()
    if dest.is_file():
        return dest
    what = what or dest.name
    manual = f"Download {url} by hand (browser, `curl -L -o {dest} {url}`) and put it at {dest}"
    tmp = dest.with_name(dest.name + ".part")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            size = int(length) if length and length.isdigit() else None
            print(f"downloading {what}: {human_size(size)} from {url}", file=sys.stderr, flush=True)
            done = 0
            with open(tmp, "wb") as f, tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1000,
                                            desc=dest.name, disable=not progress, file=sys.stderr) as bar:
                while True:
                    block = resp.read(chunk_bytes)
                    if not block:
                        break
                    f.write(block)
                    done += len(block)
                    bar.update(len(block))
        if size is not None and done != size:
            raise OSError(f"transfer ended after {human_size(done)} of {human_size(size)}")
        os.replace(tmp, dest)
    except (OSError, ValueError) as exc:  # URLError, HTTPError, timeouts, disk errors are all OSError
        tmp.unlink(missing_ok=True)
        raise DownloadError(f"{what} from {url}", short_reason(exc), manual) from exc
    return dest


def tum_sample_url(name: str = TUM_SAMPLE, base_url: str | None = None) -> str:
    """URL of a TUM RGB-D archive: ``<base>/<name>.tgz`` with base ``base_url``, ``$LANGGS_TUM_BASE_URL`` or
    :data:`TUM_DEFAULT_BASE_URL`."""
    base = base_url or os.environ.get(TUM_BASE_URL_ENV) or TUM_DEFAULT_BASE_URL
    return base.rstrip("/") + f"/{name}.tgz"


def fetch_tum_sample(dest_dir: str | Path | None = None, name: str = TUM_SAMPLE, base_url: str | None = None,
                     *, progress: bool = True, timeout: float = 30.0) -> Path:
    """Download and unpack a TUM RGB-D sequence; returns its folder (``<dest_dir>/<name>``, with ``rgb.txt``).

    Cached: when ``<dest_dir>/<name>/rgb.txt`` exists nothing is fetched. The archive is unpacked into a temporary
    folder beside the destination (``tarfile`` ``data`` filter: no absolute paths, links out or devices), checked
    for ``<name>/rgb.txt``, moved into place, and deleted.

    Args:
        dest_dir: data cache folder (default :func:`default_data_dir`).
        name: sequence name, the archive's top folder (default fr1_desk).
        base_url: folder URL of the archives (default ``$LANGGS_TUM_BASE_URL`` or the TUM site).

    Raises:
        DownloadError: the download failed or the archive is not a TUM sequence; the paragraph says how to get
            it by hand and how to run the demo on a local folder instead.
    """
    dest_dir = Path(dest_dir).expanduser() if dest_dir is not None else default_data_dir()
    folder = dest_dir / name
    if (folder / "rgb.txt").is_file():
        return folder
    url = tum_sample_url(name, base_url)
    what = f"the TUM RGB-D sample {name}"
    manual = (f"To get it by hand, download {url} (a few hundred MB) and unpack it (`tar xzf {name}.tgz`) into "
              f"{dest_dir}, where it is found next time")
    local = ("Or run the demo on any local RGB-D folder, TUM or hololens layout: `make demo DATA=/path/to/folder`; "
             f"a mirror of the TUM archives can be set with {TUM_BASE_URL_ENV}=<folder URL>")
    archive = dest_dir / f"{name}.tgz"
    try:
        fetch_url(url, archive, what=what, progress=progress, timeout=timeout)
    except DownloadError as exc:
        raise DownloadError(what, f"{exc.reason} ({url})", manual, local) from exc
    try:
        with tempfile.TemporaryDirectory(dir=dest_dir, prefix=f".{name}.") as tmp:
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, filter="data")
            unpacked = Path(tmp) / name
            if not (unpacked / "rgb.txt").is_file():
                raise ValueError(f"the archive has no {name}/rgb.txt")
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(unpacked, folder)
    except (OSError, ValueError, tarfile.TarError) as exc:
        archive.unlink(missing_ok=True)  # a corrupt archive must not be taken from the cache next time
        raise DownloadError(what, f"unpacking {archive} failed: {short_reason(exc)}", manual, local) from exc
    archive.unlink(missing_ok=True)
    return folder
