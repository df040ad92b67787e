# The README's two commands: `make demo` (main job) and `make test`.
# Both run the idempotent set-up first, so a fresh clone needs nothing else.
PY := .venv/bin/python
PYTEST_ARGS ?=
# Test files run on both cores of the 2-core CI machine (pytest-xdist; a file's tests share one worker and
# its module fixtures). TEST_WORKERS=0 runs them in this process (pdb, -s).
TEST_WORKERS ?= 2
XDIST = -n $(TEST_WORKERS) --dist loadfile

.PHONY: setup demo test test-all clean

setup:
	bash scripts/setup.sh

demo: setup
	bash scripts/demo.sh

test: setup
	$(PY) -m pytest -q $(XDIST) $(PYTEST_ARGS)

# Includes the slow tests (full LFW protocol on the real MobileFaceNet, ...).
test-all: setup
	$(PY) -m pytest -q $(XDIST) -m "slow or not slow" $(PYTEST_ARGS)

clean:
	rm -rf .caffe/build-* runs
