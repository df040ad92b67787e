"""The applications on top of the libraries: the per-depth pipeline and its report, iterative Taylor pruning,
channel prioritisation."""
import base  # noqa: F401  (quiets glog before caffe is imported)
