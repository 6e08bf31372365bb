#!/usr/bin/env bash
# `make demo [DATA=folder]`: see scripts/demo.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
exec "${VENV:-$ROOT/.venv}/bin/python" "$ROOT/scripts/demo.py" ${1:+"$1"}
