"""BatchNorm + Scale folded into the convolution before them, for training, and unfolded for the deploy net.

A net fine-tuned with frozen BatchNorm statistics (``use_global_stats:
true``, as the MobileFaceNet's are) computes, after each convolution,
gamma * (x - mean) / sqrt(var + eps) + beta: an affine map per channel that
the convolution can hold itself (W' = W * gamma / sigma, b' = (b - mean) *
gamma / sigma + beta).  Caffe's CPU BatchNorm and Scale layers are
single-threaded elementwise loops over every activation, forward and
backward (about 16 % of a MobileFaceNet iteration, benchmarks/
bench_finetune_profile.py), so the train net without them is faster; the
function is the same.  After training the weights go back into the deploy
net's own layers (``unfold``): the convolution keeps W', BatchNorm becomes
the identity (mean 0, variance 1 - eps, scale factor 1) and Scale holds
gamma 1 and beta b', so the deploy prototxt a user ships is unchanged.

A chain is folded only where that is exact: a Convolution whose output is
read first by a BatchNorm with ``use_global_stats: true``, whose output is
read first by a Scale with a bias over the channel axis, and no other layer
reads the intermediate blobs.
"""
import copy
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Chain:
    conv: str
    bn: str
    scale: str
    eps: float


def chains(net):
    """The foldable (conv, BatchNorm, Scale) chains of a NetParameter, in layer order."""
    layers = list(net.layer)
    readers = {}
    for k, layer in enumerate(layers):
        for b in layer.bottom:
            readers.setdefault(b, []).append(k)
    found = []
    for ci, conv in enumerate(layers):
        if conv.type != "Convolution" or len(conv.top) != 1 or len(conv.bottom) != 1:
            continue
        bi = _only_reader(layers, readers, conv.top[0], ci)
        if bi is None or not _frozen_bn(layers[bi], conv.top[0]):
            continue
        si = _only_reader(layers, readers, layers[bi].top[0], bi)
        if si is None or not _channel_affine(layers[si], layers[bi].top[0]):
            continue
        found.append(Chain(conv.name, layers[bi].name, layers[si].name, layers[bi].batch_norm_param.eps))
    return found


def _only_reader(layers, readers, blob, after):
    """The first layer after ``after`` that reads ``blob``, if no other layer reads what it read: it works in
    place (later readers read its output), or it is the blob's only reader."""
    later = [k for k in readers.get(blob, []) if k > after]
    if not later:
        return None
    first = later[0]
    return first if blob in layers[first].top or len(later) == 1 else None


def _frozen_bn(layer, blob):
    return (layer.type == "BatchNorm" and list(layer.bottom) == [blob] and len(layer.top) == 1
            and layer.batch_norm_param.HasField("use_global_stats") and layer.batch_norm_param.use_global_stats)


def _channel_affine(layer, blob):
    p = layer.scale_param
    return (layer.type == "Scale" and list(layer.bottom) == [blob] and len(layer.top) == 1 and p.bias_term
            and p.axis == 1 and p.num_axes == 1)


def fold(net, weights):
    """(net without the chains' BatchNorm and Scale layers, its weights, the chains).  ``weights`` is
    {layer: [arrays]} of ``net``; the net is not changed."""
    found = chains(net)
    by_conv = {c.conv: c for c in found}
    dropped = {c.bn for c in found} | {c.scale for c in found}
    layers = {l.name: l for l in net.layer}
    out = copy.deepcopy(net)
    del out.layer[:]
    new = {name: arrays for name, arrays in weights.items() if name not in dropped}
    for layer in net.layer:
        if layer.name in dropped:
            continue
        layer = copy.deepcopy(layer)
        c = by_conv.get(layer.name)
        if c is not None:
            layer.top[0] = layers[c.scale].top[0]    # the conv now writes what Scale wrote
            if not layer.convolution_param.bias_term:
                layer.convolution_param.bias_term = True
                if len(layer.param) == 1:
                    layer.param.add(lr_mult=layer.param[0].lr_mult, decay_mult=0)
            new[layer.name] = _folded(weights[c.conv], weights[c.bn], weights[c.scale], c.eps)
        out.layer.add().CopyFrom(layer)
    return out, new, found


def _folded(conv, bn, scale, eps):
    w = np.asarray(conv[0], np.float64)
    b = np.asarray(conv[1], np.float64).reshape(-1) if len(conv) > 1 else np.zeros(w.shape[0])
    factor = float(bn[2].reshape(-1)[0]) if len(bn) > 2 else 1.0
    factor = 0.0 if factor == 0 else 1.0 / factor   # Caffe's BatchNorm reads its sums this way
    mean, var = bn[0].reshape(-1) * factor, bn[1].reshape(-1) * factor
    gain = scale[0].reshape(-1) / np.sqrt(var + eps)
    shift = scale[1].reshape(-1) + (b - mean) * gain
    return [(w * gain.reshape((-1,) + (1,) * (w.ndim - 1))).astype(np.float32), shift.astype(np.float32)]


def unfold(folded, found, deploy):
    """Weights of ``deploy`` (the unfolded net) from the trained weights of the folded net."""
    out = {name: arrays for name, arrays in folded.items()}
    layers = {l.name: l for l in deploy.layer}
    for c in found:
        w, shift = folded[c.conv]
        conv = [w] + ([np.zeros_like(shift)] if layers[c.conv].convolution_param.bias_term else [])
        out[c.conv] = conv
        n = shift.size
        out[c.bn] = [np.zeros(n, np.float32), np.full(n, 1.0 - c.eps, np.float32), np.ones(1, np.float32)]
        out[c.scale] = [np.ones(n, np.float32), shift.astype(np.float32)]
    return out


def describe(found):
    """One line for a log: how many chains were folded."""
    return "%d Convolution + BatchNorm + Scale chains folded for training" % len(found) if found else \
        "no Convolution + BatchNorm (use_global_stats) + Scale chain to fold"

