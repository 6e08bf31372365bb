"""Run every benchmark in ``bench/`` one after the other and print their tables (``make bench``).

Each script measures side by side in one run and prints measured ratios against the project's targets; none of
them is a pass/fail test. Pass script names to run a subset: ``python bench/run_all.py core node``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["core", "semantics", "render", "map_quality", "alignment", "vggt", "node"]


def main(argv: list[str]) -> int:
    names = argv or ORDER
    failed = []
    for name in names:
        script = HERE / f"bench_{name}.py"
        print(f"\n===== bench_{name}.py =====", flush=True)
        t = time.perf_counter()
        code = subprocess.call([sys.executable, str(script)])
        print(f"===== bench_{name}.py: exit {code}, {time.perf_counter() - t:.0f} s =====", flush=True)
        if code:
            failed.append(name)
    if failed:
        print(f"benchmarks that failed to run: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
