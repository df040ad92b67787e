"""Refit every linear layer of a pruned net towards the unpruned net, in closed form.

The per-group step reconstructs only the consumers of the group it cuts; the
layers between (depthwise convs, the producers of later groups) keep weights
made for inputs that no longer arrive.  One sweep runs the pruned and the
unpruned net side by side over the images and, for every Convolution (grouped
and depthwise ones per group) and InnerProduct, accumulates the normal
equations of its current input against the unpruned net's output of the same
layer at the same positions (prune.reconstruct); all layers are then solved at
once, ridge-regularised towards their current weights.  Each layer is fitted
to inputs that its predecessors' refit changes, so a sweep is a Jacobi step
and sweeps can be repeated; every sweep costs one forward pass of both nets.
"""
import numpy as np

from base import caffe_io
from prune import reconstruct as ls
from prune.reconstruct import fold_into_batchnorm, intercept_home


def _groups(layer):
    return layer.convolution_param.group if layer.type == "Convolution" else 1


def _design(layer, A, positions):
    """S x G x D: each sampled position's input window, per convolution group."""
    X = ls.design(layer, A, positions)
    G = _groups(layer)
    return X.reshape(X.shape[0], G, -1)


def _output(layer, X, weights):
    """S x F: the layer's output on grouped design rows X (S x G x D)."""
    W = np.asarray(weights[0], dtype=np.float64)
    G = X.shape[1]
    W = W.reshape(G, W.shape[0] // G, -1)
    Y = np.einsum("sgd,gfd->sgf", X, W).reshape(X.shape[0], -1)
    if len(weights) > 1:
        Y += np.asarray(weights[1], dtype=np.float64).ravel()
    return Y


class _Fitter:
    def __init__(self, layer, weights, out_rows, positions):
        self.layer, self.out_rows, self.positions = layer, out_rows, positions
        W = np.asarray(weights[0])
        G = _groups(layer)
        self.normal = ls.Normal(int(np.prod(W.shape[1:])), W.shape[0], G)

    def add(self, net, original, original_weights, rng, first_image):
        bottom = self.layer.bottom[0]
        A = net.blobs[bottom].data
        positions = ls.sample_positions(self.layer, A.shape, self.positions, A.shape[0], rng)
        X = _design(self.layer, A, positions)
        Y = _output(self.layer, _design(self.layer, original.blobs[bottom].data, positions),
                    original_weights[self.layer.name])
        if self.out_rows is not None:
            Y = Y[:, self.out_rows]
        self.normal.add(X, Y, first_image + positions[0])


def fittable(net, weights, max_dim=ls.MAX_DIM):
    """The Convolution and InnerProduct layers a sweep refits (one bottom, weights at hand, small enough)."""
    out = []
    for layer in net.layer:
        if layer.type not in ("Convolution", "InnerProduct") or len(layer.bottom) != 1 or layer.name not in weights:
            continue
        if int(np.prod(np.asarray(weights[layer.name][0]).shape[1:])) <= max_dim:
            out.append(layer)
    return out


def sweep(net, weights, original, original_weights, out_map, images, ridge="auto", positions=10, seed=0,
          progress=None):
    """One Jacobi sweep: new weights for every fittable layer. ``out_map``: {layer: original output
    channel of each current one} for layers whose outputs were pruned. Returns (weights, record)."""
    layers = fittable(net, weights)
    fitters = [_Fitter(l, weights[l.name], out_map.get(l.name), positions) for l in layers]
    cnet = caffe_io.net_from_param(net)
    caffe_io.load_into(cnet, weights)
    data, odata = cnet.inputs[0], original.inputs[0]
    rng = np.random.default_rng(seed)
    n = 0
    at = [(list(cnet._layer_names).index(f.layer.name), list(original._layer_names).index(f.layer.name))
          for f in fitters]
    for x in images:
        for c, d in ((cnet, data), (original, odata)):
            c.blobs[d].reshape(*x.shape)
            c.blobs[d].data[...] = x
        done = (0, 0)
        for f, (i, j) in zip(fitters, at):
            # step both nets up to this layer and read its input before a later in-place layer can change it
            cnet._forward(done[0], i)
            original._forward(done[1], j)
            done = (i + 1, j + 1)
            f.add(cnet, original, original_weights, rng, n)
        n += x.shape[0]
        if progress is not None:
            progress.update(x.shape[0])
    new = {k: [np.array(a, dtype=np.float32) for a in v] for k, v in weights.items()}
    record = {}
    for f in fitters:
        name = f.layer.name
        W = np.asarray(weights[name][0], dtype=np.float64)
        flat = W.reshape(W.shape[0], -1)
        has_bias = len(weights[name]) > 1
        home = None if has_bias else intercept_home(net, name)
        b0 = np.asarray(weights[name][1], dtype=np.float64).ravel() if has_bias else None
        cols = np.arange(f.normal.dim)
        before = ls.relative_error(f.normal, cols, flat, b0 if has_bias else (np.zeros(W.shape[0]) if home else None))
        Wn, b, r = ls.solve(f.normal, cols, flat, b0, intercept=has_bias or home is not None, ridge=ridge)
        after = ls.relative_error(f.normal, cols, Wn, b)
        record[name] = dict(before=before, after=after, ridge=r)
        new[name][0] = Wn.reshape(W.shape).astype(np.float32)
        if has_bias:
            new[name][1] = b.astype(np.float32).reshape(new[name][1].shape)
        elif home is not None:
            new[home] = fold_into_batchnorm(new[home], b)
    return new, record
