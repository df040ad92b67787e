"""Center loss (Wen et al., ECCV 2016) as a Caffe Python layer.

    L_C = 1 / (2N) * sum_i ||x_i - c_{y_i}||^2

bottoms: feature (N x D, or N x ... flattened), label (N); top: the scalar
L_C.  The weight lambda_c is Caffe's own ``loss_weight`` on the layer (as in
the authors' Caffe layer), so the net's total loss is softmax + lambda_c L_C:

    layer { name: "center_loss" type: "Python" bottom: "fc5" bottom: "label"
            top: "center_loss" loss_weight: 0.001
            python_param { module: "finetune.centerloss" layer: "CenterLoss"
                           param_str: '{"num_output": 10572, "alpha": 0.5}' }
            param { lr_mult: 0 decay_mult: 0 } }

(``center_loss(...)`` below writes exactly that with net_spec.)

The centres c_j (K x D) are the layer's one parameter blob, zero at setup, so
Caffe saves them in the caffemodel and ``copy_from`` / a solver restore bring
them back.  They are NOT learnt by the solver: backward updates them itself
with the paper's rule (its Algorithm 1),

    delta c_j = sum_{i: y_i = j} (c_j - x_i) / (1 + #{i: y_i = j}),
    c_j <- c_j - alpha * delta c_j,

and leaves the blob's diff at zero.  The blob must therefore have
``lr_mult: 0 decay_mult: 0`` (the helper sets it): weight decay would
otherwise pull the centres to zero.  The gradient to the features,
top_diff * (x_i - c_{y_i}) / N, uses the centres from before the update.
Caffe imports the module by name: the repository root must be on PYTHONPATH.
"""
import json
import math

import numpy as np

import caffe

from base.errors import ToolkitError

from .layerparams import class_labels, json_params

DEFAULTS = {"num_output": None, "alpha": 0.5}


class CenterLossError(ToolkitError):
    """A param_str, bottom or label the center-loss layer cannot use."""


def parse_params(param_str):
    """param_str (JSON) -> dict of checked parameters, defaults filled in."""
    p = json_params(param_str, DEFAULTS, "CenterLoss", CenterLossError)
    k = p["num_output"]
    if k is None:
        raise CenterLossError("CenterLoss param_str needs num_output (the number of classes)")
    if isinstance(k, bool) or not isinstance(k, (int, float)) or k != int(k) or k < 1:
        raise CenterLossError("CenterLoss num_output must be an integer >= 1, got %r" % (k,))
    p["num_output"] = int(k)
    a = p["alpha"]
    if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or not 0 <= a <= 1:
        raise CenterLossError("CenterLoss alpha (centre update rate) must be a number in [0, 1], got %r" % (a,))
    p["alpha"] = float(a)
    return p


def center_update(centers, x, labels, alpha):
    """The paper's centre step for one batch: new K x D centres (a copy)."""
    k = centers.shape[0]
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    sums = np.zeros(centers.shape, dtype=np.float64)
    np.add.at(sums, labels, x)
    delta = (counts[:, None] * centers - sums) / (1.0 + counts[:, None])
    return (centers - alpha * delta).astype(centers.dtype)


class CenterLoss(caffe.Layer):
    """bottom: feature (N x D), label (N); top: scalar loss; blob 0: centres K x D."""

    def setup(self, bottom, top):
        self.p = parse_params(self.param_str)
        if len(bottom) != 2 or len(top) != 1:
            raise CenterLossError("CenterLoss takes bottoms (feature, label) and one top; got %d bottom(s), "
                                  "%d top(s)" % (len(bottom), len(top)))
        if bottom[0].num < 1 or bottom[0].count % bottom[0].num:
            raise CenterLossError("CenterLoss feature blob has shape %s" % (tuple(bottom[0].shape),))
        self.dim = bottom[0].count // bottom[0].num
        # Loaded weights (copy_from, solver restore) overwrite these zeros.
        self.blobs.add_blob(self.p["num_output"], self.dim)
        self.blobs[0].data[...] = 0

    def reshape(self, bottom, top):
        n = bottom[0].num
        if bottom[0].count != n * self.dim:
            raise CenterLossError("CenterLoss feature changed size: %d values per sample, the centres have %d"
                                  % (bottom[0].count // max(n, 1), self.dim))
        if bottom[1].count != n:
            raise CenterLossError("CenterLoss needs one label per sample: %d features, %d labels"
                                  % (n, bottom[1].count))
        top[0].reshape()

    def _labels(self, bottom):
        return class_labels(bottom[1], self.p["num_output"], "CenterLoss", CenterLossError)

    def forward(self, bottom, top):
        x = bottom[0].data.reshape(-1, self.dim)
        self.labels = self._labels(bottom)
        self.residual = x - self.blobs[0].data[self.labels]
        top[0].data[...] = 0.5 * np.einsum("nd,nd->", self.residual, self.residual) / x.shape[0]

    def backward(self, top, propagate_down, bottom):
        x = bottom[0].data.reshape(-1, self.dim)
        if propagate_down[0]:
            grad = top[0].diff.reshape(-1)[0] * self.residual / x.shape[0]
            bottom[0].diff[...] = grad.reshape(bottom[0].diff.shape)
        self.blobs[0].data[...] = center_update(self.blobs[0].data, x, self.labels, self.p["alpha"])


def center_loss(feature, label, num_output, lambda_c=1e-3, alpha=0.5):
    """net_spec layer: ``n.center_loss = center_loss(n.fc5, n.label, 10572, lambda_c=1e-3, alpha=0.5)``.

    lambda_c becomes the layer's loss_weight; the centres get lr_mult 0 and
    decay_mult 0 (the layer updates them itself).
    """
    from caffe import layers as L
    p = dict(num_output=num_output, alpha=alpha)
    parse_params(json.dumps(p))
    if isinstance(lambda_c, bool) or not isinstance(lambda_c, (int, float)) or not lambda_c >= 0:
        raise CenterLossError("center loss weight lambda_c must be a number >= 0, got %r" % (lambda_c,))
    return L.Python(feature, label, python_param=dict(module=__name__, layer="CenterLoss",
                                                      param_str=json.dumps(p, sort_keys=True)),
                    loss_weight=lambda_c, param=[dict(lr_mult=0, decay_mult=0)])
