"""Channel pruning of Caffe nets: file I/O, channel-group graph, surgery, selection."""
import os

# Caffe's glog INFO lines drown the toolkit's own output; users can override.
os.environ.setdefault("GLOG_minloglevel", "2")
