import os

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on the two cores: one BLAS thread each (and in the commands the tests start),
    # not two threads each spinning for a core the other worker holds
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import base  # noqa: F401  (quiets glog before caffe is imported)
from base.shared import shared_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = shared_dir()


def shared_path(*parts):
    """A path in ../shared, or skip the test when the data is not on this machine."""
    path = os.path.join(SHARED, *parts)
    if not os.path.exists(path):
        pytest.skip("needs %s (the shared data folder)" % path)
    return path


@pytest.fixture(scope="session", autouse=True)
def _caffe_cpu():
    import caffe
    caffe.set_mode_cpu()


# The longest files first: xdist hands the files out in collection order, so the two workers finish together
# instead of one starting the pipeline tests when the other is nearly done.
LONGEST_FIRST = ("test_pipeline.py", "test_prune_driver.py", "test_reliability.py", "test_kill9.py",
                 "test_runtimes.py")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: LONGEST_FIRST.index(item.path.name) if item.path.name in LONGEST_FIRST
               else len(LONGEST_FIRST))
