"""Distillation of the similarity structure between faces, as a Caffe Python loss layer.

    layer { name: "similarity_loss" type: "Python" bottom: "student_l2" bottom: "teacher_l2"
            top: "similarity_loss" loss_weight: 1
            python_param { module: "finetune.similarity" layer: "SimilarityLoss"
                           param_str: '{"hard": 4.0}' } }

The embedding loss pulls each student embedding towards its teacher's on its
own; a face system decides on the cosine between two faces, and at a strict
false-accept rate on the few impostor pairs the teacher already finds most
alike.  This loss compares, for every pair (i, j) of the batch, the student's
cosine s_ij with the teacher's t_ij:

    L = sum_{i<j} w_ij (s_ij - t_ij)^2 / sum_{i<j} w_ij,   w_ij = exp(hard * t_ij)

(the bottoms are L2-normalised embeddings, so s = X X^T).  ``hard`` = 0 weighs
every pair alike; larger values put the weight on the pairs the teacher finds
similar: the impostor pairs that decide the TAR at a low FAR (the emphasis of
evaluation-oriented distillation for face recognition).  The teacher bottom
gets no gradient.
"""
import numpy as np

import caffe

from base.errors import ToolkitError

from .layerparams import json_params

DEFAULTS = {"hard": 0.0}


class SimilarityError(ToolkitError):
    pass


def weights(teacher_sims, hard):
    """w_ij of every pair i < j (zero on and below the diagonal), normalised to sum 1."""
    n = len(teacher_sims)
    upper = np.triu(np.ones((n, n), dtype=bool), 1)
    w = np.where(upper, np.exp(hard * (teacher_sims - 1.0)), 0.0)   # shifted by 1: no overflow, same ratios
    return w / w.sum()


def loss_and_gradient(student, teacher, hard=0.0):
    """(L, dL/dstudent) of N x D student and teacher rows (see the module doc)."""
    x, t = np.asarray(student, np.float64), np.asarray(teacher, np.float64)
    s, ts = x @ x.T, t @ t.T
    w = weights(ts, hard)
    d = w * (s - ts)
    loss = float((d * (s - ts)).sum())
    # dL/dS_ij = 2 w_ij (s_ij - t_ij) for i < j; S = X X^T spreads it to both rows of the pair
    grad = 2.0 * (d + d.T) @ x
    return loss, grad


class SimilarityLoss(caffe.Layer):
    def setup(self, bottom, top):
        self.p = json_params(self.param_str, DEFAULTS, "SimilarityLoss", SimilarityError)
        if len(bottom) != 2 or len(top) != 1:
            raise SimilarityError("SimilarityLoss takes (student, teacher) bottoms and one top")

    def reshape(self, bottom, top):
        s, t = bottom[0].data, bottom[1].data
        if s.shape != t.shape or s.ndim != 2 or s.shape[0] < 2:
            raise SimilarityError("SimilarityLoss: student %s and teacher %s must be equal N x D with N >= 2"
                                  % (s.shape, t.shape))
        top[0].reshape(1)

    def forward(self, bottom, top):
        self.loss, self.grad = loss_and_gradient(bottom[0].data, bottom[1].data, self.p["hard"])
        top[0].data[0] = self.loss

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = top[0].diff[0] * self.grad
        if propagate_down[1]:
            bottom[1].diff[...] = 0.0
