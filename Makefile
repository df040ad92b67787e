# The README's two commands: `make demo` (main job) and `make test`.
# Both run the idempotent set-up first, so a fresh clone needs nothing else.
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test test-all clean

setup:
	bash scripts/setup.sh

demo: setup
	bash scripts/demo.sh

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Includes the slow tests (full LFW protocol on the real MobileFaceNet, ...).
test-all: setup
	$(PY) -m pytest -q -m "slow or not slow" $(PYTEST_ARGS)

clean:
	rm -rf .caffe/build-* runs
