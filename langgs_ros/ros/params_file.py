"""ROS 2 parameter files for ``mapping_node``: read the shipped ones, write a derived one for a launch.

A ROS 2 params file maps a node name (``/**`` = every node in every namespace, which is how this package's
``config/*.yaml`` are keyed) to ``ros__parameters``; nested maps are dotted names (``window: {size: 4}`` is
``window.size``). :func:`write_params_file` layers dotted overrides over a shipped file and writes a ``/**``-keyed
file that ``ros2 launch langgs_ros mapping.launch.py params_file:=...`` (or ``--ros-args --params-file``) applies
under any namespace. Used by the demo and the launch tests; pure YAML, no ROS import.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parents[2] / "config"


def flatten_parameters(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested ``ros__parameters`` maps -> ``{dotted.name: value}`` (lists stay values)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten_parameters(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def nest_parameters(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{dotted.name: value}`` -> nested maps (the inverse of :func:`flatten_parameters`).

    Raises:
        ValueError: a name is both a value and a prefix of another name (``a: 1`` and ``a.b: 2``).
    """
    out: dict[str, Any] = {}
    for name, value in flat.items():
        *parents, leaf = name.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"parameter {name!r} nests under the value of {p!r}")
        if isinstance(node.get(leaf), dict):
            raise ValueError(f"parameter {name!r} is also a prefix of other parameters")
        node[leaf] = value
    return out


def read_params_file(path: str | Path) -> dict[str, Any]:
    """The dotted parameters of a params file's single node entry (``/**``, ``mapping_node``, ...).

    Raises:
        ValueError: the file does not hold exactly one node entry with ``ros__parameters``.
    """
    data = yaml.safe_load(Path(path).read_text()) or {}
    entries = [v for v in data.values() if isinstance(v, Mapping) and "ros__parameters" in v]
    if len(data) != 1 or len(entries) != 1:
        raise ValueError(f"{path}: expected one node entry with ros__parameters, got keys {list(data)}")
    return flatten_parameters(entries[0]["ros__parameters"])


def write_params_file(path: str | Path, overrides: Mapping[str, Any] | None = None,
                      base: str | Path | None = None, node: str = "/**") -> Path:
    """Write ``base``'s parameters (default: none) updated with dotted ``overrides`` to ``path``, keyed ``node``.

    Args:
        path: output YAML file; ``overrides``: ``{"window.size": 4, ...}``; ``base``: a params file, e.g.
            ``CONFIG_DIR / "mapping_labels.yaml"``; ``node``: the node entry (``/**`` applies under any namespace).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    params = read_params_file(base) if base is not None else {}
    params.update(overrides or {})
    out = Path(path)
    out.write_text(yaml.safe_dump({node: {"ros__parameters": nest_parameters(params)}}, sort_keys=False))
    return out
