"""Evidence for choosing a group's channels, from real Caffe forward passes.

``collect(net, weights, group, images, ...)`` runs the current (possibly
already pruned) net over the images once and returns an ``Evidence``:

* ``grams[consumer]``: G = X^T X of the per-input-channel contributions at
  random (output filter, position) samples of every consumer of the group,
  bias excluded (prune.contrib), ``samples_per_image`` per image;
* ``actsum``: the sum over images and positions of each channel of the
  group's first blob (what the original Sphereface-prune scripts rank by);
* ``weights`` and the ``group`` itself, for weight-based criteria;
* ``taylor``: left empty here; the driver adds prune.gradient.gradient_terms
  for criteria that need a loss gradient (a backward pass of its own);
* ``normals[consumer]``: with ``targets``, the normal equations of every
  consumer's least-squares reconstruction (prune.reconstruct): its input
  windows at random output positions and, as targets, the output of that
  layer at the same positions in the unpruned net (``targets.net``) or in
  the current one.

Memory: Caffe holds one batch of activations; the sampler adds
batch x samples_per_image x C x kh x kw floats of windows and one C x C Gram
per consumer, whatever the number of images.
"""
from dataclasses import dataclass, field

import numpy as np

from base import caffe_io
from base.errors import ToolkitError
from prune import contrib, reconstruct
from prune.gram import GramAccumulator


class SampleError(ToolkitError):
    pass


def batch_bytes(graph, batch, samples_per_image, positions_per_image):
    """A bound on what one batch of sampling holds (see the module doc): ``samples_per_image`` windows for
    the criterion and ``positions_per_image`` for the least squares per image, each window as large as the
    largest consumer's input (C x kh x kw, or an InnerProduct's inputs), in float64."""
    window = max((int(np.prod(shape[1:])) for shapes in graph.param_shapes.values() for shape in shapes[:1]
                  if len(shape) >= 2), default=1)
    return 8 * batch * (samples_per_image + positions_per_image) * window


@dataclass
class Evidence:
    group: object
    weights: dict
    grams: dict = field(default_factory=dict)      # consumer layer -> C x C
    actsum: np.ndarray = None
    normals: dict = field(default_factory=dict)   # consumer layer -> prune.reconstruct.Normal
    images: int = 0
    samples: int = 0
    taylor: np.ndarray = None    # first-order loss change per channel (prune.gradient), for needs_gradient criteria


@dataclass
class Targets:
    """What the consumers are reconstructed towards.

    net: the unpruned caffe.Net (its weights loaded), or None to take the
    current net's own outputs as targets; out_map: {layer: original output
    channel of each current output channel} for layers whose outputs were
    pruned earlier; positions: sampled output positions per image."""
    net: object = None
    weights: dict = None
    out_map: dict = field(default_factory=dict)
    positions: int = 10


def collect(net_param, weights, group, images, samples_per_image=10, seed=0, progress=None, targets=None):
    """Evidence for one group. ``images``: an iterable of (N, 3, H, W) float32 batches."""
    return collect_many(net_param, weights, [group], images, samples_per_image, seed, progress,
                        targets)[group.id]


def collect_many(net_param, weights, groups, images, samples_per_image=10, seed=0, progress=None, targets=None):
    """{group id: Evidence} for several groups from one pass over the images."""
    layers = {l.name: l for l in net_param.layer}
    for group in groups:
        for c in group.consumers:
            layer = layers[c.layer]
            if layer.type == "Convolution" and layer.convolution_param.group != 1:
                raise SampleError("consumer %r of group %r is a grouped convolution; sampling needs a plain one"
                                  % (c.layer, group.id))
    net = caffe_io.runnable_net(net_param, weights)
    runs = set(net._layer_names)
    for group in groups:
        for c in group.consumers:
            if c.layer not in runs:
                raise SampleError("consumer %r of group %r is not in the part of the net this Caffe build runs "
                                  "(it reads what a Caffe fork's layer makes); it cannot be sampled"
                                  % (c.layer, group.id))
    rng = np.random.default_rng(seed)
    found = {g.id: Evidence(group=g, weights=weights, actsum=np.zeros(g.channels)) for g in groups}
    grams = {(g.id, c.layer): GramAccumulator(g.channels) for g in groups for c in g.consumers}
    W = {c.layer: np.asarray(weights[c.layer][0], dtype=np.float32).reshape(net.params[c.layer][0].data.shape)
         for g in groups for c in g.consumers}
    data = net.inputs[0]
    last = max((c.layer for g in groups for c in g.consumers), key=list(net._layer_names).index)
    normals = {} if targets is None else _normal_builders(layers, groups, W, weights, targets)
    n_images = 0
    for x in images:
        _forward(net, data, x, last)
        if normals:
            if targets.net is not None:
                _forward(targets.net, targets.net.inputs[0], x, last)
            for name, add in normals.items():
                add(net, rng, n_images)
        for g in groups:
            for c in g.consumers:
                X = _contributions(layers[c.layer], c, W[c.layer], net.blobs[c.bottom].data, g.channels, rng,
                                   samples_per_image)
                grams[(g.id, c.layer)].add(X)
            if g.blobs and g.blobs[0].block == 1:
                A = net.blobs[g.blobs[0].blob].data
                A = A.reshape(A.shape[0], A.shape[1], -1)
                found[g.id].actsum += A[:, g.blobs[0].indices(np.arange(g.channels))].sum(axis=(0, 2))
        n_images += x.shape[0]
        if progress is not None:
            progress.update(x.shape[0])
    if n_images == 0:
        raise SampleError("no images to sample from")
    for g in groups:
        ev = found[g.id]
        ev.grams = {c.layer: grams[(g.id, c.layer)].G for c in g.consumers}
        ev.normals = {c.layer: normals[c.layer].normal for c in g.consumers if c.layer in normals}
        ev.images, ev.samples = n_images, n_images * samples_per_image
    return found


def _forward(net, data, x, last):
    net.blobs[data].reshape(*x.shape)
    net.blobs[data].data[...] = x
    net.forward(end=last)


class _NormalBuilder:
    """Accumulates one consumer's normal equations, batch by batch."""

    def __init__(self, layer, bottom, weights, targets):
        self.layer, self.bottom, self.targets = layer, bottom, targets
        self.weights = weights
        W = np.asarray(weights[0])
        self.normal = reconstruct.Normal(int(np.prod(W.shape[1:])), W.shape[0])

    def __call__(self, net, rng, first_image):
        A = net.blobs[self.bottom].data
        positions = contrib.layer_positions(self.layer, A.shape, self.targets.positions, A.shape[0], rng)
        X = reconstruct.design(self.layer, A, positions)
        if self.targets.net is None:
            Y = reconstruct.layer_output(X, self.weights)
        else:
            orig = reconstruct.design(self.layer, self.targets.net.blobs[self.bottom].data, positions)
            Y = reconstruct.layer_output(orig, self.targets.weights[self.layer.name])
            rows = self.targets.out_map.get(self.layer.name)
            if rows is not None:
                Y = Y[:, rows]
        self.normal.add(X, Y, first_image + positions[0])


def _normal_builders(layers, groups, W, weights, targets):
    """One builder per consumer whose design dimension fits prune.reconstruct.MAX_DIM."""
    out = {}
    for g in groups:
        for c in g.consumers:
            if c.layer not in out and int(np.prod(W[c.layer].shape[1:])) <= reconstruct.MAX_DIM:
                out[c.layer] = _NormalBuilder(layers[c.layer], c.bottom, weights[c.layer], targets)
    return out


def _contributions(layer, consumer, W, A, C, rng, per_image):
    n = A.shape[0]
    if layer.type == "InnerProduct":
        cols = slice(consumer.start, consumer.start + C * consumer.block)
        images, filters, _, _ = contrib.sample_positions(rng, n, per_image, W.shape[0])
        return contrib.ip_contributions(A.reshape(n, -1)[:, cols], W.reshape(W.shape[0], -1)[:, cols],
                                        filters, images, consumer.block)
    if layer.type != "Convolution":
        raise SampleError("consumer %r is a %s; ThiNet sampling handles Convolution and InnerProduct"
                          % (layer.name, layer.type))
    geometry = contrib.conv_geometry(layer.convolution_param)
    out_h, out_w = contrib.output_hw(geometry, *A.shape[2:])
    chans = slice(consumer.start, consumer.start + C)
    images, filters, rows, cols = contrib.sample_positions(rng, n, per_image, W.shape[0], out_h, out_w)
    return contrib.conv_contributions(A[:, chans], W[:, chans], geometry, 1, filters, images, rows, cols)
