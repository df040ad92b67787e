"""The base every package of the toolkit stands on: Caffe file I/O, the command-line layer, run folders,
images and image lists, the net's input and crop rule, figures, the shared-data location.
It imports no other package of the toolkit."""
import os

# Caffe's glog INFO lines drown the toolkit's own output; users can override.
os.environ.setdefault("GLOG_minloglevel", "2")
