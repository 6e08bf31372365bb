# langgs_ros — two commands for newcomers: `make demo` (the main job) and `make test` (the whole test suite).
# Both set up the environment first (scripts/setup_env.sh: idempotent, a few seconds once done).

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?=
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup test lint demo bench colcon clean

setup:
	@bash scripts/setup_env.sh

lint: setup
	$(VENV)/bin/ruff check .

# Whole suite: lint, then pytest (ROS tests run over loopback-only DDS, see test/conftest.py) with the ROS 2
# command line, tf2_ros and launch_ros of scripts/ros_env.sh (without them those tests skip, except on CI).
test: lint
	@. scripts/ros_env.sh || echo "make test: no ROS 2 command line (see above); tests that need it are skipped"; \
	$(PY) -m pytest $(PYTEST_ARGS)

# Replays an RGB-D folder into the real mapping node over loopback DDS and answers language queries.
# DATA=<folder> (hololens or TUM layout); default ../shared/data/hololens_office when present, else the TUM
# fr1_desk sample is downloaded. DEMO_ARGS: more options of scripts/demo.py (e.g. "--device cpu --part2 no").
demo: setup
	@bash scripts/demo.sh "$(DATA)" $(DEMO_ARGS)

# Benchmarks (bench/run_all.py); bench/requirements.txt adds the benchmark-only peers (open3d, scikit-image).
bench: setup
	$(VENV)/bin/pip install -q -r bench/requirements.txt -c constraints.txt
	$(PY) bench/run_all.py

# colcon build of this package against the pip-installed ROS (build/install/log under build/colcon).
colcon: setup
	@bash scripts/colcon_build.sh

clean:
	rm -rf build install log .pytest_cache
