"""Least-squares reconstruction of the layers that read a pruned channel group.

For every consumer of a group (a Convolution with group 1, or an
InnerProduct), the sampler records at random output positions of the current
net the consumer's whole input window x (all its input channels x kh x kw)
and a target y for every output channel.  The target is, by default, the
*unpruned* net's output of that layer at the same position (He et al. 2017's
error compensation): each step then corrects what earlier cuts broke instead
of compounding it.  Only the normal equations are kept,

    A = [X 1]'[X 1]   (D+1 x D+1),    B = [X 1]'Y   (D+1 x F),    sum of Y^2,

so memory is D^2 whatever the number of samples.  Once the group's kept
channels are chosen, all kept weights of the consumer and its intercept are
solved for jointly, ridge-regularised *towards the current weights*:

    [W b] = argmin ||Y - X_K W' - 1 b'||^2 + lam ||W - W_0||^2,
    lam = ridge * (mean diagonal of [X_K 1]'[X_K 1])

with the ridge chosen on held-out images by default, which keeps a layer sane where the samples do not determine it (few images,
wide layers).  ThiNet's one scale per input channel stays available
(``prune.driver.rescaled_consumers``).

Where the intercept goes: the layer's bias when it has one; otherwise, when
the layer's output is read by a BatchNorm alone, into that BatchNorm's mean
(so the pruned net keeps the original's layers and blobs); otherwise the fit
has no intercept.
"""
from dataclasses import dataclass

import numpy as np

from prune import contrib, gram
from prune.surgery import prune_net

# Above this input dimension (channels x kh x kw, or InnerProduct columns) the
# D x D normal equations are not accumulated (a 512 x 7 x 6 fc5 would need
# 3.7 GB); such a consumer falls back to ThiNet's per-channel scale.
MAX_DIM = 8192


class Normal:
    """Running normal equations of one layer, per convolution group (one for a plain layer), kept in
    two halves (alternate images) so that the ridge can be chosen on held-out samples:
    A = [X 1]'[X 1] (G x D+1 x D+1), B = [X 1]'Y (G x D+1 x F/G), y2 = sum Y^2."""

    def __init__(self, dim, outputs, groups=1):
        self.parts = [(np.zeros((groups, dim + 1, dim + 1)), np.zeros((groups, dim + 1, outputs // groups)),
                       np.zeros(1)) for _ in range(2)]
        self.samples = 0

    def add(self, X, Y, image):
        """Rows X (S x D, or S x G x D) with targets Y (S x F, or S x G x F/G); ``image``: the image
        number of every row."""
        G = self.parts[0][0].shape[0]
        X = np.asarray(X, dtype=np.float64).reshape(X.shape[0], G, -1)
        Y = np.asarray(Y, dtype=np.float64).reshape(Y.shape[0], G, -1)
        Xa = np.concatenate([X, np.ones(X.shape[:2] + (1,))], axis=2)
        for half, (A, B, y2) in enumerate(self.parts):
            rows = (np.asarray(image) % 2) == half
            A += np.einsum("sgd,sge->gde", Xa[rows], Xa[rows])
            B += np.einsum("sgd,sgf->gdf", Xa[rows], Y[rows])
            y2 += np.square(Y[rows]).sum()
        self.samples += X.shape[0]

    def half(self, i):
        A, B, y2 = self.parts[i]
        return _Equations(A, B, float(y2[0]))

    @property
    def dim(self):
        return self.parts[0][0].shape[1] - 1

    @property
    def total(self):
        (A0, B0, y0), (A1, B1, y1) = self.parts
        return _Equations(A0 + A1, B0 + B1, float(y0[0] + y1[0]))


@dataclass
class _Equations:
    A: np.ndarray
    B: np.ndarray
    y2: float

    def rows(self, cols, intercept):
        idx = np.concatenate([cols, [self.A.shape[1] - 1]]) if intercept else np.asarray(cols)
        return self.A[:, idx[:, None], idx[None, :]], self.B[:, idx]

    def error(self, cols, theta, intercept):
        """||Y - [X_K 1] theta||^2 / ||Y||^2 (theta: G x K(+1) x F/G)."""
        A, B = self.rows(cols, intercept)
        err = self.y2 - 2.0 * np.sum(theta * B) + np.sum(theta * (A @ theta))
        return float(max(err, 0.0) / max(self.y2, 1e-30))


def input_columns(layer_type, consumer, channels, kernel_size):
    """Columns of the consumer's design matrix (flattened weight input) owned by these group channels."""
    if layer_type == "InnerProduct":
        return consumer.indices(channels)
    ch = consumer.indices(channels)
    return (ch[:, None] * kernel_size + np.arange(kernel_size)[None, :]).ravel()


def design(layer, A, positions):
    """Sampled rows of the consumer's design matrix: the input window of each
    sampled output position, flattened as the weight's input axes (S x D)."""
    if layer.type == "InnerProduct":
        return A.reshape(A.shape[0], -1)[positions[0]].astype(np.float64)
    geometry = contrib.conv_geometry(layer.convolution_param)
    win = contrib.conv_windows(A, geometry, *positions)
    return win.reshape(win.shape[0], -1).astype(np.float64)


def layer_output(X, weights):
    """The layer's own output on design rows: X W' + b."""
    W = np.asarray(weights[0], dtype=np.float64)
    Y = X @ W.reshape(W.shape[0], -1).T
    if len(weights) > 1:
        Y += np.asarray(weights[1], dtype=np.float64).ravel()
    return Y


RIDGES = (1e-5, 1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)


class _Ridge:
    """theta(lam) = (A + lam I)^-1 (B + lam theta0) for many lam from one eigendecomposition per group,
    lam relative to the mean diagonal of A."""

    def __init__(self, A, B, theta0):
        self.scale = np.trace(A, axis1=1, axis2=2)[:, None, None] / A.shape[1] + 1e-30
        self.vals, self.vecs = np.linalg.eigh(A)
        self.B, self.theta0 = B, theta0

    def __call__(self, ridge):
        lam = ridge * self.scale
        rhs = np.swapaxes(self.vecs, 1, 2) @ (self.B + lam * self.theta0)
        return self.vecs @ (rhs / np.maximum(self.vals[:, :, None] + lam, 1e-30))


def solve(normal, keep_cols, W0, b0=None, intercept=True, ridge="auto"):
    """(W, b, ridge) for the kept columns: argmin ||Y - X_K W' - 1 b'||^2 + lam ||[W b] - [W0 b0]||^2.

    W0: F x |K| current weights of the kept columns (rows in group order),
    b0 the current intercept (zeros when None). ridge: lam / (mean diagonal of
    [X_K 1]'[X_K 1]), or "auto": the value of RIDGES with the lowest error on
    held-out images (fit on one half of the images, judged on the other, both
    ways). Returns W (F x |K|), b (F,) or None without intercept, and the ridge."""
    keep_cols = np.asarray(keep_cols)
    G = normal.parts[0][0].shape[0]
    W0 = np.asarray(W0, dtype=np.float64)
    theta0 = np.swapaxes(W0.reshape(G, W0.shape[0] // G, -1), 1, 2)         # G x K x F/G
    if intercept:
        b0 = np.zeros(W0.shape[0]) if b0 is None else np.asarray(b0, dtype=np.float64).ravel()
        theta0 = np.concatenate([theta0, b0.reshape(G, 1, -1)], axis=1)
    if ridge == "auto":
        halves = [normal.half(i) for i in range(2)]
        fits = [_Ridge(*h.rows(keep_cols, intercept), theta0) for h in halves]
        if all(h.y2 > 0 for h in halves):
            cost = [sum(halves[1 - i].error(keep_cols, fits[i](r), intercept) for i in range(2)) for r in RIDGES]
            ridge = RIDGES[int(np.argmin(cost))]
        else:
            ridge = 1e-3
    theta = _Ridge(*normal.total.rows(keep_cols, intercept), theta0)(ridge)
    k = len(keep_cols)
    W = np.swapaxes(theta[:, :k], 1, 2).reshape(W0.shape[0], k)
    return W, (theta[:, k].ravel() if intercept else None), ridge


def relative_error(normal, cols, W, b=None):
    """||Y - X_K W' - 1 b'||^2 / ||Y||^2 on all samples, from the normal equations alone."""
    G = normal.parts[0][0].shape[0]
    W = np.asarray(W, dtype=np.float64)
    theta = np.swapaxes(W.reshape(G, W.shape[0] // G, -1), 1, 2)
    if b is not None:
        theta = np.concatenate([theta, np.asarray(b, dtype=np.float64).reshape(G, 1, -1)], axis=1)
    return normal.total.error(np.asarray(cols), theta, b is not None)


def channel_scales(normal, W, b, channel_cols, ridge=1e-8):
    """ThiNet's last step from the normal equations: one scale per kept input channel,
    w = argmin sum over samples and filters of (y - b - sum_c w_c x_c)^2, where x_c is channel c's
    contribution W[:, cols_c] . x[cols_c] (every filter, so the targets may come from the unpruned net).

    W: F x D weights, b: F bias or None, channel_cols: [column indices of each kept channel]."""
    eq = normal.total
    D = normal.dim
    A, B = eq.A[0], eq.B[0]
    Axx, ax1 = A[:D, :D], A[:D, D]
    W = np.asarray(W, dtype=np.float64)
    P = W.T @ W
    b = np.zeros(W.shape[0]) if b is None else np.asarray(b, dtype=np.float64).ravel()
    K = len(channel_cols)
    M = np.empty((K, K))
    for i, ci in enumerate(channel_cols):
        for j, cj in enumerate(channel_cols[i:], i):
            M[i, j] = M[j, i] = np.sum(Axx[np.ix_(ci, cj)] * P[np.ix_(ci, cj)])
    resid = B[:D] - np.outer(ax1, b)                    # X'(Y - 1 b')
    r = np.array([np.sum(W[:, ci].T * resid[ci]) for ci in channel_cols])
    return np.linalg.solve(M + ridge * (np.trace(M) / max(K, 1) + 1e-30) * np.eye(K), r)


# ------------------------------------------------------------------ applied to a group

def cut(net, weights, graph, group, ev, kept, reconstruct="full", ridge="auto", reference=None):
    """(net, weights, errors) with the group cut to ``kept`` and its consumers reconstructed.

    reference: (weights, out_map) of the net the targets came from when it is not the current one
    (the unpruned net): an intercept folded into a BatchNorm replaces that net's mean."""
    new, folds, errors = consumer_weights(net, group, weights, ev, kept, reconstruct, ridge)
    net2, weights2 = prune_net(net, weights, {group.id: kept}, {k: v[0] for k, v in new.items()}, graph=graph)
    for layer, (_, bias) in new.items():
        if bias is not None:
            weights2[layer][1] = bias.astype(np.float32)
    for (layer, bn), bias in folds.items():
        weights2[bn] = fold_into_batchnorm(weights2[bn], bias, reference_stats(reference, layer, bn))
    return net2, weights2, errors


def reference_stats(reference, layer, bn):
    """(mean, variance) of BatchNorm ``bn`` in the reference net, on the current output channels of the
    ``layer`` before it, or None without a reference."""
    if reference is None:
        return None
    ref_weights, out_map = reference
    mean, var, factor = [np.asarray(b, dtype=np.float64).ravel() for b in ref_weights[bn]]
    scale = 1.0 / factor[0] if factor[0] != 0 else 0.0
    rows = out_map.get(layer)
    rows = np.arange(mean.size) if rows is None else np.asarray(rows)
    return mean[rows] * scale, var[rows] * scale


def intercept_home(net, layer_name):
    """The BatchNorm that alone reads this layer's output (its mean can absorb an intercept), or None."""
    layers = list(net.layer)
    i = next(j for j, l in enumerate(layers) if l.name == layer_name)
    top = layers[i].top[0]
    readers = []
    for l in layers[i + 1:]:
        if top in l.bottom:
            readers.append(l)
        if top in l.top:
            break
    if len(readers) == 1 and readers[0].type == "BatchNorm":
        return readers[0].name
    return None


def fold_into_batchnorm(blobs, bias, base=None):
    """BatchNorm blobs whose mean absorbs the intercept ``bias`` of the layer before it:
    (x + b - m) = (x - (m - b)).  ``base``: the (mean, variance) the intercept was fitted against (the
    reference net's, when the fit's targets came from it); default the blobs' own, which must then not
    hold an earlier intercept."""
    mean, var, factor = [np.array(b, dtype=np.float64) for b in blobs]
    if base is None:
        f = float(factor.ravel()[0])
        scale = 1.0 / f if f != 0 else 0.0
        base = (mean * scale, var * scale)
    mean, var = np.asarray(base[0]).reshape(mean.shape) - bias, np.asarray(base[1]).reshape(var.shape)
    return [mean.astype(np.float32), var.astype(np.float32), np.ones_like(factor, dtype=np.float32)]


def consumer_weights(net, group, weights, ev, kept, reconstruct="full", ridge="auto"):
    """New weights of the group's consumers after removing all but ``kept``:
    ({layer: (weight with removed inputs dropped, new bias or None)}, {(layer, BatchNorm): intercept to fold},
    {layer: relative reconstruction error record})."""
    removed = np.setdiff1d(np.arange(group.channels), kept)
    layers = {l.name: l for l in net.layer}
    new, folds, errors = {}, {}, {}
    scaled = {}
    for c in group.consumers:
        normal = ev.normals.get(c.layer)
        W = np.asarray(weights[c.layer][0], dtype=np.float32)
        if c.layer in ev.grams:     # no Gram when the criterion and the reconstruction needed no images
            errors[c.layer] = _scale_error(ev.grams[c.layer], kept)
        if reconstruct == "none":
            continue
        if normal is None:      # too wide for the normal equations: ThiNet's scale on the sampled Gram
            scaled = scaled or rescaled_consumers(group, weights, ev.grams, kept)
            new[c.layer] = (scaled[c.layer], None)
            continue
        k2 = int(np.prod(W.shape[2:])) if layers[c.layer].type != "InnerProduct" else 1
        gone = input_columns(layers[c.layer].type, c, removed, k2)
        dim = normal.dim
        cols = np.setdiff1d(np.arange(dim), gone)
        if reconstruct == "scale":
            new[c.layer] = (_scaled_from_normal(normal, W, weights[c.layer], layers[c.layer], c, cols), None)
            continue
        flat = W.reshape(W.shape[0], -1).astype(np.float64)
        has_bias = len(weights[c.layer]) > 1
        home = None if has_bias else intercept_home(net, c.layer)
        b0 = np.asarray(weights[c.layer][1], dtype=np.float64).ravel() if has_bias else None
        Wn, b, ridge = solve(normal, cols, flat[:, cols], b0, intercept=has_bias or home is not None,
                                ridge=ridge)
        errors[c.layer].update(target_before=relative_error(normal, np.arange(dim), flat, b0 if has_bias else
                                                               (np.zeros(W.shape[0]) if home else None)),
                               target_after=relative_error(normal, cols, Wn, b), ridge=ridge)
        shape = list(W.shape)
        shape[1] = -1
        new[c.layer] = (Wn.reshape(shape).astype(np.float32) if layers[c.layer].type != "InnerProduct"
                        else Wn.astype(np.float32).reshape(W.shape[0], -1), b if has_bias else None)
        if home is not None:
            folds[(c.layer, home)] = b
    return new, folds, errors


def _scaled_from_normal(normal, W, blobs, layer, consumer, cols):
    """ThiNet's per-channel scale against the sampled targets: every kept input channel of the layer
    (of this group or not) times its least-squares scale; removed columns dropped."""
    flat = W.reshape(W.shape[0], -1)
    block = consumer.block if layer.type == "InnerProduct" else int(np.prod(W.shape[2:]))
    channel_cols = [np.arange(s, s + block) for s in range(0, flat.shape[1], block)]
    kept_cols = set(cols.tolist())
    channel_cols = [cc for cc in channel_cols if cc[0] in kept_cols]
    w = channel_scales(normal, flat, blobs[1] if len(blobs) > 1 else None, channel_cols)
    out = flat.copy()
    for scale, cc in zip(w, channel_cols):
        out[:, cc] *= scale
    shape = list(W.shape)
    shape[1] = -1
    return out[:, np.sort(cols)].reshape(shape if layer.type != "InnerProduct" else (W.shape[0], -1))


def _scale_error(G, kept):
    e = max(gram.energy(G), 1e-30)
    w = gram.least_squares_scale(G, kept)
    return dict(removed=gram.residual(G, kept) / e, rescaled=gram.residual(G, kept, w) / e)


def rescaled_consumers(group, weights, grams, kept):
    """ThiNet's last step: each consumer's kept input channels times w = argmin ||y - X_S w||."""
    removed = np.setdiff1d(np.arange(group.channels), kept)
    new = {}
    for c in group.consumers:
        W = np.asarray(weights[c.layer][0], dtype=np.float32)
        w = gram.least_squares_scale(grams[c.layer], kept)
        scale = np.ones(W.shape[c.axis], dtype=np.float32)
        scale[c.indices(kept)] = np.repeat(w, c.block)
        shape = [1] * W.ndim
        shape[c.axis] = -1
        new[c.layer] = np.delete(W * scale.reshape(shape), c.indices(removed), axis=c.axis)
    return new
