"""Training and fine-tuning with Caffe's own solver: A-Softmax layer, image lists."""
import os

# Caffe's glog INFO lines drown the toolkit's own output; users can override.
os.environ.setdefault("GLOG_minloglevel", "2")
