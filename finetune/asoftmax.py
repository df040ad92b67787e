"""A-Softmax (SphereFace's ``MarginInnerProduct``) as a Caffe Python layer.

BVLC Caffe has no A-Softmax; SphereFace trained with a C++ layer in its own
Caffe fork (``tools/caffe-sphereface``, margin_inner_product_layer.cpp).  This
layer reproduces that layer's arithmetic in numpy so stock Caffe can train
SphereFace nets:

    layer { name: "fc6" type: "Python" bottom: "fc5" bottom: "label" top: "fc6"
            python_param { module: "finetune.asoftmax" layer: "MarginInnerProduct"
                           param_str: '{"num_output": 10572, "m": 4}' }
            param { lr_mult: 1 decay_mult: 1 } }

(``margin_inner_product(...)`` below writes that layer with net_spec.)  The
top holds the N x K logits for SoftmaxWithLoss; an optional second top
receives the current lambda, as in the fork.  Caffe imports the module by
name, so the repository root must be on PYTHONPATH (pytest and
``python -m`` from the root have it).

Forward, TRAIN phase (the fork's semantics):
  * the class weights W (K x D, no bias) are normalised per class *in place*,
    as the fork does, so a stored model always holds unit rows;
  * cos(theta_j) = x . w_j / |x|; every logit is |x| cos(theta_j) = x . w_j
    except the label's, which becomes
    (lambda |x| cos(theta) + |x| psi(theta)) / (1 + lambda),
    psi = (-1)^k cos(m theta) - 2k, k = floor(m theta / pi), cos(m theta)
    from the Chebyshev polynomial T_m(cos theta);
  * lambda = max(lambda_min, base * (1 + gamma * iteration)^-power), and
    ``iteration`` counts this layer's TRAIN forwards starting from the
    param_str value (the fork increments before computing lambda).  Like the
    fork, the count lives in the layer, not in the caffemodel: to resume a
    run, pass the solver iteration as ``iteration``.

TEST phase: plain |x| cos(theta) = x . w_j for every class (the label bottom
may be absent).  The fork applies the margin in both phases; a margin on the
true class at test time would only bias the measured accuracy downwards.

Backward: ``"gradient": "sphereface"`` (default) is the fork's update rule,
which is deliberately *not* the exact gradient (its README, note 1):
  * bottom: the label logit's derivative coeff_w * w + coeff_x * x has its
    coefficient pair scaled to unit length, sqrt(coeff_w^2 + coeff_x^2) = 1;
  * weight: top_diff^T x, the gradient of a plain inner product with the
    normalised weights, ignoring both the margin and the normalisation
    (the next forward re-normalises the updated rows).
The release's lambda schedule and learning rates were tuned with that rule.
``"gradient": "exact"`` back-propagates the true derivative of the forward,
through the margin and through w / |w|; it is what a finite-difference check
verifies, and the sphereface rule is checked against it (tests).
"""
import json
import math

import numpy as np

import caffe

from base.errors import ToolkitError

from .layerparams import class_labels, json_params

DEFAULTS = {"num_output": None, "m": 4, "base": 1000.0, "gamma": 0.12, "power": 1.0,
            "lambda_min": 5.0, "iteration": 0, "gradient": "sphereface", "seed": 0}
GRADIENTS = ("sphereface", "exact")
_TINY = 1e-12


class AsoftmaxError(ToolkitError):
    """A param_str, bottom or label the A-Softmax layer cannot use."""


def parse_params(param_str):
    """param_str (JSON) -> dict of checked parameters, defaults filled in."""
    p = json_params(param_str, DEFAULTS, "MarginInnerProduct", AsoftmaxError)

    def integer(key, lo, hi=None):
        v = p[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or v < lo or (hi is not None and v > hi):
            span = "%d..%d" % (lo, hi) if hi is not None else ">= %d" % lo
            raise AsoftmaxError("MarginInnerProduct %s must be an integer %s, got %r" % (key, span, v))
        p[key] = int(v)

    if p["num_output"] is None:
        raise AsoftmaxError("MarginInnerProduct param_str needs num_output (the number of classes)")
    integer("num_output", 1)
    integer("m", 1, 4)
    integer("iteration", 0)
    integer("seed", 0)
    for key in ("base", "gamma", "power", "lambda_min"):
        v = p[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise AsoftmaxError("MarginInnerProduct %s must be a number >= 0, got %r" % (key, v))
        p[key] = float(v)
    if p["gradient"] not in GRADIENTS:
        raise AsoftmaxError("MarginInnerProduct gradient must be one of %s, got %r" % (", ".join(GRADIENTS), p["gradient"]))
    return p


def annealed_lambda(p, iteration):
    """The fork's lambda schedule at a given iteration."""
    return max(p["lambda_min"], p["base"] * (1.0 + p["gamma"] * iteration) ** (-p["power"]))


def psi(cos, m):
    """psi(theta) = (-1)^k cos(m theta) - 2k and d psi / d cos(theta).

    cos(m theta) = T_m(c) and d T_m / dc = m U_{m-1}(c) (Chebyshev polynomials
    of the first and second kind, by their recurrences); k counts the
    boundaries j pi / m (j = 1..m-1) that theta has passed, i.e. the
    cos(j pi / m) that c lies below.  psi is continuous, so which side a
    boundary point falls on does not matter.
    """
    c = np.clip(cos, -1.0, 1.0)
    t_prev, t = np.ones_like(c), c                     # T_0, T_1
    u_prev, u = np.zeros_like(c), np.ones_like(c)      # U_{-1}, U_0
    for _ in range(m - 1):
        t_prev, t = t, 2 * c * t - t_prev
        u_prev, u = u, 2 * c * u - u_prev
    k = np.zeros(c.shape, dtype=c.dtype)
    for j in range(1, m):
        k += c < math.cos(j * math.pi / m)
    sign = 1 - 2 * (k % 2)
    return sign * t - 2 * k, sign * m * u


def _xavier(shape, seed):
    """Caffe's default xavier filler: U(-a, a), a = sqrt(3 / fan_in); seeded, so a run repeats exactly."""
    a = math.sqrt(3.0 / shape[1])
    return np.random.default_rng(seed).uniform(-a, a, size=shape).astype(np.float32)


class MarginInnerProduct(caffe.Layer):
    """bottom: feature (N x ...), label (N); top: logits N x K [, lambda]."""

    def setup(self, bottom, top):
        self.p = parse_params(self.param_str)
        self.train = self.phase == caffe.TRAIN
        if len(bottom) not in (1, 2) or (self.train and len(bottom) != 2):
            raise AsoftmaxError("MarginInnerProduct takes bottoms (feature, label); the label may only be left "
                                "out in the TEST phase; got %d bottom(s)" % len(bottom))
        if len(top) not in (1, 2):
            raise AsoftmaxError("MarginInnerProduct has tops (logits) or (logits, lambda); got %d" % len(top))
        if bottom[0].num < 1 or bottom[0].count % bottom[0].num:
            raise AsoftmaxError("MarginInnerProduct feature blob has shape %s" % (tuple(bottom[0].shape),))
        self.dim = bottom[0].count // bottom[0].num
        self.iteration = self.p["iteration"]
        self.lam = annealed_lambda(self.p, self.iteration)
        # Weights loaded later (copy_from, solver restore) overwrite this fill.
        self.blobs.add_blob(self.p["num_output"], self.dim)
        self.blobs[0].data[...] = _xavier((self.p["num_output"], self.dim), self.p["seed"])

    def reshape(self, bottom, top):
        n = bottom[0].num
        if bottom[0].count != n * self.dim:
            raise AsoftmaxError("MarginInnerProduct feature changed size: %d values per sample, the weights have %d"
                                % (bottom[0].count // max(n, 1), self.dim))
        if len(bottom) == 2 and bottom[1].count != n:
            raise AsoftmaxError("MarginInnerProduct needs one label per sample: %d features, %d labels"
                                % (n, bottom[1].count))
        top[0].reshape(n, self.p["num_output"])
        if len(top) == 2:
            top[1].reshape(1)

    def _labels(self, bottom):
        return class_labels(bottom[1], self.p["num_output"], "MarginInnerProduct", AsoftmaxError)

    def forward(self, bottom, top):
        w = self.blobs[0].data
        norms = np.sqrt(np.einsum("kd,kd->k", w, w))
        w /= np.maximum(norms, _TINY)[:, None]
        x = bottom[0].data.reshape(-1, self.dim)
        logits = x @ w.T
        margin = self.train and self.p["m"] > 1
        if self.train:
            self.iteration += 1
            self.lam = annealed_lambda(self.p, self.iteration)
        if margin:
            rows = np.arange(x.shape[0])
            labels = self._labels(bottom)
            x_norm = np.maximum(np.sqrt(np.einsum("nd,nd->n", x, x)), _TINY)
            cos = logits[rows, labels] / x_norm
            value, slope = psi(cos.astype(np.float64), self.p["m"])
            logits[rows, labels] = (self.lam * x_norm * cos + x_norm * value) / (1.0 + self.lam)
            self.cache = (rows, labels, x_norm, cos, value, slope)
        top[0].data[...] = logits
        if len(top) == 2:
            top[1].data[...] = self.lam

    def backward(self, top, propagate_down, bottom):
        g = top[0].diff
        w = self.blobs[0].data            # unit rows: forward normalised them in place
        x = bottom[0].data.reshape(-1, self.dim)
        exact = self.p["gradient"] == "exact"
        # scale[i, j]: d logit_ij / d(x . w_j) where that is all the logit needs;
        # the label logit adds a term along x (coef_x) for the bottom.
        scale = np.ones_like(g)
        coef_x = None
        if self.train and self.p["m"] > 1:
            rows, labels, x_norm, cos, value, slope = self.cache
            along_x = (value - cos * slope) / x_norm
            if exact:
                along_w = slope
            else:
                unit = np.sqrt(slope ** 2 + along_x ** 2)
                along_w, along_x = slope / unit, along_x / unit
            scale[rows, labels] = (self.lam + along_w) / (1.0 + self.lam)
            coef_x = g[rows, labels] * along_x / (1.0 + self.lam)
        if propagate_down[0]:
            dx = (g * scale) @ w
            if coef_x is not None:
                dx += coef_x[:, None] * x
            bottom[0].diff[...] = dx.reshape(bottom[0].diff.shape)
        if exact:
            # d logit / d w_label = (lambda + psi') x / (1 + lambda) for the
            # normalised row; then through w / |w| at |w| = 1: project out w.
            dw = (g * scale).T @ x
            dw -= np.einsum("kd,kd->k", dw, w)[:, None] * w
        else:
            dw = g.T @ x
        self.blobs[0].diff[...] += dw     # Caffe accumulates param diffs (iter_size)


def margin_inner_product(feature, label, num_output, lambda_top=False, lr_mult=1, decay_mult=1, **params):
    """net_spec layer: ``n.fc6 = margin_inner_product(n.fc5, n.label, 10572, m=4)``.

    Keyword ``params`` are the param_str keys (m, base, gamma, power,
    lambda_min, iteration, gradient); they are checked here, before Caffe
    sees them.
    """
    from caffe import layers as L
    p = dict(params, num_output=num_output)
    parse_params(json.dumps(p))
    bottoms = [feature] if label is None else [feature, label]
    return L.Python(*bottoms, python_param=dict(module=__name__, layer="MarginInnerProduct",
                                                param_str=json.dumps(p, sort_keys=True)),
                    param=[dict(lr_mult=lr_mult, decay_mult=decay_mult)], ntop=2 if lambda_top else 1)
