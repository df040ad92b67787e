"""Training and fine-tuning with Caffe's own solver: train nets, A-Softmax and centre-loss layers, the solver,
the one training loop, image-list building."""
import base  # noqa: F401  (quiets glog before caffe is imported)
