"""Re-estimate the statistics of every BatchNorm layer on a set of images.

A pruned net's BatchNorm layers still hold the unpruned net's means and
variances, which no longer describe what reaches them: re-estimating them is
the cheapest recovery there is (one forward pass, no gradient).

The net is run once over the images with every BatchNorm normalising by the
statistics of its batch, as in training (``use_global_stats: false``).  After
each batch the layer's running blobs hold that batch's mean and (unbiased)
variance, which are pooled here into the exact mean and variance over all
images and positions of what reached the layer in that pass (the variance of
the batch means included).  They are written in Caffe's own BatchNorm format
(mean, variance, scale factor 1), so the result is still a plain deploy net.
"""
import copy

import numpy as np

from base import caffe_io
from base.errors import ToolkitError


class BNStatsError(ToolkitError):
    pass


def batchnorm_layers(net):
    return [l.name for l in net.layer if l.type == "BatchNorm"]


def _batch_stat_view(net):
    view = copy.deepcopy(net)
    for l in view.layer:
        if l.type == "BatchNorm":
            l.batch_norm_param.use_global_stats = False
            l.batch_norm_param.moving_average_fraction = 1.0
    return view


class _Pool:
    """Pooled mean and variance from per-batch means and unbiased variances of m values each."""

    def __init__(self, channels):
        self.n = 0
        self.s1 = np.zeros(channels)
        self.s2 = np.zeros(channels)

    def add(self, mean, var_unbiased, m):
        # sum x = m mean; sum x^2 = (m - 1) var + m mean^2
        self.s1 += m * mean
        self.s2 += (m - 1) * var_unbiased + m * mean ** 2
        self.n += m

    def result(self):
        mean = self.s1 / self.n
        return mean, np.maximum(self.s2 / self.n - mean ** 2, 0.0)


def reestimate(net, weights, images, layers=None, progress=None):
    """New weights: ``weights`` with the statistics of the BatchNorm ``layers`` (default all)
    measured on ``images`` (an iterable of float32 batches). Nothing is modified in place."""
    names = batchnorm_layers(net) if layers is None else list(layers)
    if not names:
        raise BNStatsError("the net has no BatchNorm layer to re-estimate")
    cnet = caffe_io.net_from_param(_batch_stat_view(net))
    caffe_io.load_into(cnet, weights)
    data = cnet.inputs[0]
    bottoms = {l.name: l.bottom[0] for l in net.layer if l.name in names}
    pools = {}
    for x in images:
        cnet.blobs[data].reshape(*x.shape)
        cnet.blobs[data].data[...] = x
        for name in names:
            for b in cnet.params[name]:
                b.data[...] = 0
        cnet.forward()
        for name in names:
            mean, var, factor = (np.array(b.data, dtype=np.float64) for b in cnet.params[name])
            shape = cnet.blobs[bottoms[name]].data.shape
            m = shape[0] * int(np.prod(shape[2:]))
            pools.setdefault(name, _Pool(mean.size)).add(mean / factor[0], var / factor[0], m)
        if progress is not None:
            progress.update(x.shape[0])
    if not pools:
        raise BNStatsError("no images to re-estimate the BatchNorm statistics on")
    out = {k: [np.array(a, dtype=np.float32) for a in v] for k, v in weights.items()}
    for name, pool in pools.items():
        mean, var = pool.result()
        out[name] = [mean.astype(np.float32), var.astype(np.float32), np.ones(1, dtype=np.float32)]
    return out
