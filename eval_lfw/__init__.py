"""LFW verification of Caffe face models: the standard 10-fold protocol.

    from eval_lfw import evaluate
    r = evaluate("deploy.prototxt", "fc5", "lfw-112x112", "pairs.txt", weights="w.caffemodel")
    r["accuracy_mean"], r["fold_accuracy"], r["tar_at_far_1e-3"]

The protocol (``eval_lfw.protocol``) is numpy on features. Caffe is imported
only with ``evaluate`` and friends, so the image-decoding worker processes,
which import this package, start without it.
"""
from .errors import EvalError
from .pairs import Pairs, lfw_people, parse_folds, read_pairs
from .protocol import best_threshold, cross_validate

_LAZY = ("evaluate", "evaluate_net", "EvalSpec", "summary", "to_json", "write_report")

__all__ = list(_LAZY) + ["read_pairs", "parse_folds", "lfw_people", "Pairs", "cross_validate", "best_threshold",
                         "EvalError"]


def __getattr__(name):
    if name in _LAZY:
        from . import evaluator
        return getattr(evaluator, name)
    raise AttributeError("module 'eval_lfw' has no attribute %r" % name)
