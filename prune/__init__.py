"""Channel pruning of Caffe nets: channel-group graph, surgery, sampling, selection criteria, size and widths."""
import base  # noqa: F401  (quiets glog before caffe is imported)
