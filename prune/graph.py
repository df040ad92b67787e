"""Channel-dependency groups of a Caffe net, from its NetParameter alone.

A *group* is a set of channels that must disappear together: removing
channel c of a group removes row c of every producer (conv/fc outputs), entry
c of every per-channel passenger (PReLU, BatchNorm, Scale, depthwise conv ...)
and input channel c (or its H*W block of columns) of every consumer (the
first channel-mixing layers downstream, the ones a ThiNet-style selector
reconstructs).

How it is found (in the spirit of Torch-Pruning's dependency graph): the
layers of the TEST-phase view are walked in order; the channel axis (axis 1)
of every blob is described as a list of segments, each a run of channels of
one *atom* (the channels one producer made). Each layer type has a rule
(``RULES``) saying how its tops' segments follow from its bottoms' and which
parameter slices it owns; a union-find over atoms joins what an Eltwise or a
depthwise conv ties together. Layers that end prunable flow (losses, Softmax,
Python layers, the net's outputs and inputs) mark what reaches them
unprunable, with a reason. No rule is specific to one network.

Blob shapes are inferred here too (Caffe's own formulas), because an
InnerProduct consumer needs H*W per channel and the surgery checks weights
against the shapes the pruned net will ask for; tests compare them with
real Caffe.
"""
import os
from collections import OrderedDict, namedtuple
from dataclasses import dataclass, field
import math

import numpy as np

from caffe.proto import caffe_pb2


class GraphError(ValueError):
    """A net the channel graph cannot analyse (named layer, type and file)."""


# ------------------------------------------------------------------ public records

def _block_indices(start, block, channels):
    """Channel c owns start + c*block .. start + (c+1)*block - 1."""
    channels = np.asarray(channels, dtype=np.int64).reshape(-1, 1)
    return (start + channels * block + np.arange(block)).ravel()


@dataclass(frozen=True)
class Slice:
    """Where a group's channels live along one axis of one parameter blob.

    Group channel c owns indices ``start + c*block .. start + (c+1)*block - 1``
    along ``axis`` of blob ``blob`` of layer ``layer``.
    """
    layer: str
    type: str
    blob: int
    axis: int
    start: int
    block: int = 1

    def indices(self, channels):
        """Indices along ``axis`` owned by the given group channels (in that order)."""
        return _block_indices(self.start, self.block, channels)


@dataclass(frozen=True)
class Consumer(Slice):
    """A channel-mixing layer reading the group: its weight (blob 0) input axis.

    ``bottom`` is the blob the consumer reads (what a sampler records). For a
    Convolution, group channel c is input channel ``start + c`` (block 1);
    for an InnerProduct it owns the ``block`` (= H*W) consecutive input
    columns from ``start + c*block``.
    """
    bottom: str = ""


@dataclass(frozen=True)
class BlobSlice:
    """Where a group's channels live along axis 1 of an activation blob."""
    blob: str
    start: int
    block: int = 1

    def indices(self, channels):
        return _block_indices(self.start, self.block, channels)


@dataclass
class Group:
    id: str
    channels: int
    producers: list = field(default_factory=list)    # [Slice] output rows (weights and biases)
    passengers: list = field(default_factory=list)   # [Slice] per-channel parameters carried along
    consumers: list = field(default_factory=list)    # [Consumer]
    blobs: list = field(default_factory=list)        # [BlobSlice]
    reasons: list = field(default_factory=list)      # why not prunable (empty: prunable)

    @property
    def prunable(self):
        return not self.reasons

    def layers(self, role):
        """Layer names of producers/passengers/consumers, in net order, once each."""
        return list(OrderedDict.fromkeys(s.layer for s in getattr(self, role)))

    def to_dict(self):
        def rows(items):
            return [dict(vars(s)) for s in items]
        return dict(id=self.id, channels=self.channels, prunable=self.prunable, reasons=list(self.reasons),
                    producers=rows(self.producers), passengers=rows(self.passengers),
                    consumers=rows(self.consumers), blobs=rows(self.blobs))


# A blob as the walk sees it: segments of its channel axis (None: no channel
# space worth tracking) and its shape (None: unknown).
Blob = namedtuple("Blob", "segs shape")
Seg = namedtuple("Seg", "atom n block")


def layout(segs):
    """[(seg, start)] with start the index along axis 1 of the seg's first entry."""
    out, start = [], 0
    for s in segs:
        out.append((s, start))
        start = None if start is None or s.n is None else start + s.n * s.block
    return out


# ------------------------------------------------------------------ phase view

def _meets(rule, state):
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    if any(s not in state.stage for s in rule.stage):
        return False
    return not any(s in state.stage for s in rule.not_stage)


def phase_view(net, phase=caffe_pb2.TEST):
    """(layers Caffe instantiates in ``phase``, layers it leaves out), as Caffe's FilterNet."""
    state = caffe_pb2.NetState(phase=phase, level=net.state.level, stage=list(net.state.stage))
    kept, dropped = [], []
    for layer in net.layer:
        if len(layer.include):
            on = any(_meets(r, state) for r in layer.include)
        else:
            on = not any(_meets(r, state) for r in layer.exclude)
        (kept if on else dropped).append(layer)
    return kept, dropped


# ------------------------------------------------------------------ shapes

def _pair(repeated, h, w, default, spatial):
    """Caffe's kernel/stride/pad fields -> one value per spatial axis."""
    if h or w:
        return [h, w]
    values = list(repeated) or [default]
    return values * spatial if len(values) == 1 else values


def _conv_geometry(p, spatial):
    return (_pair(p.kernel_size, p.kernel_h, p.kernel_w, None, spatial),
            _pair(p.stride, p.stride_h, p.stride_w, 1, spatial),
            _pair(p.pad, p.pad_h, p.pad_w, 0, spatial),
            (list(p.dilation) or [1]) * (spatial if len(p.dilation) <= 1 else 1))


def _conv_shape(layer, shape, deconv):
    p = layer.convolution_param
    if shape is None:
        return None
    kernel, stride, pad, dil = _conv_geometry(p, len(shape) - 2)
    out = []
    for i, size in enumerate(shape[2:]):
        extent = dil[i] * (kernel[i] - 1) + 1
        out.append(stride[i] * (size - 1) + extent - 2 * pad[i] if deconv
                   else (size + 2 * pad[i] - extent) // stride[i] + 1)
    return (shape[0], p.num_output) + tuple(out)


def _pool_shape(layer, shape):
    p = layer.pooling_param
    if shape is None:
        return None
    if p.global_pooling:
        return tuple(shape[:2]) + (1, 1)
    kernel = [p.kernel_h, p.kernel_w] if p.kernel_h else [p.kernel_size] * 2
    stride = [p.stride_h, p.stride_w] if p.stride_h else [p.stride] * 2
    pad = [p.pad_h, p.pad_w] if (p.pad_h or p.pad_w) else [p.pad] * 2
    rnd = math.floor if p.round_mode == caffe_pb2.PoolingParameter.FLOOR else math.ceil
    out = []
    for size, k, s, q in zip(shape[2:], kernel, stride, pad):
        n = int(rnd((size + 2 * q - k) / s)) + 1
        if q and (n - 1) * s >= size + q:
            n -= 1
        out.append(n)
    return tuple(shape[:2]) + tuple(out)


def _data_shapes(layer):
    """Top shapes of a data layer, where the prototxt fixes them (else None)."""
    if layer.type == "Input":
        shapes = [tuple(s.dim) for s in layer.input_param.shape]
        return [shapes[min(i, len(shapes) - 1)] if shapes else None for i in range(len(layer.top))]
    if layer.type == "DummyData":
        p = layer.dummy_data_param
        shapes = [tuple(s.dim) for s in p.shape] or [
            (n, c, h, w) for n, c, h, w in zip(p.num, p.channels, p.height, p.width)]
        return [shapes[min(i, len(shapes) - 1)] if shapes else None for i in range(len(layer.top))]
    if layer.type == "MemoryData":
        p = layer.memory_data_param
        return [(p.batch_size, p.channels, p.height, p.width), (p.batch_size,)][:len(layer.top)]
    if layer.type == "ImageData":
        p, t = layer.image_data_param, layer.transform_param
        h, w = (t.crop_size, t.crop_size) if t.crop_size else (p.new_height, p.new_width)
        image = (p.batch_size, 3 if p.is_color else 1, h, w) if h and w else None
        return [image, (p.batch_size,)][:len(layer.top)]
    return [None] * len(layer.top)


def _reshape_shape(layer, shape):
    p = layer.reshape_param
    if shape is None:
        return None
    dims = list(p.shape.dim)
    axis = p.axis if p.axis >= 0 else len(shape) + 1 + p.axis
    end = len(shape) if p.num_axes == -1 else axis + p.num_axes
    out = [shape[axis + i] if d == 0 else d for i, d in enumerate(dims)]
    new = list(shape[:axis]) + out + list(shape[end:])
    if -1 in new:
        known = int(np.prod([d for d in new if d != -1]))
        new[new.index(-1)] = int(np.prod(shape)) // known
    return tuple(new)


# ------------------------------------------------------------------ the walk

DATA_TYPES = {"Input", "Data", "ImageData", "HDF5Data", "MemoryData", "DummyData", "WindowData"}
# Elementwise and channel-preserving: every top is the bottom's channel space.
ELEMENTWISE = {"ReLU", "Sigmoid", "TanH", "Dropout", "AbsVal", "Power", "ELU", "BNLL", "Exp", "Log",
               "Threshold", "Clip", "Swish", "Split"}
ONE_BOTTOM = {"PReLU", "BatchNorm", "Pooling", "Flatten", "Reshape", "InnerProduct"}
# Types that end prunable flow: what reaches them keeps all its channels.
STOPPERS = {"SoftmaxWithLoss", "Softmax", "EuclideanLoss", "HingeLoss", "InfogainLoss", "ContrastiveLoss",
            "MultinomialLogisticLoss", "SigmoidCrossEntropyLoss", "Accuracy", "ArgMax", "Python", "Normalize",
            "Slice", "Crop", "Tile", "Reduction", "Silence", "Embed", "HDF5Output", "SPP", "Im2col",
            "BatchReindex", "Filter", "LSTM", "RNN", "LSTMUnit", "Parameter"}


class _Walk:
    """One pass over the TEST-phase layers; holds the union-find over atoms."""

    def __init__(self, source):
        self.source = source
        self.parent, self.n, self.origin, self.reasons = [], [], [], []
        self.records = []            # (atom, role, Slice/Consumer/BlobSlice)
        self.shapes = OrderedDict()  # blob -> last shape seen
        self.param_shapes = OrderedDict()
        self.counts = OrderedDict()  # layer -> (field, top segs) that surgery resizes
        self.pending = []            # unknown layers: (layer, bottom atoms)

    # union-find
    def atom(self, n, origin):
        self.parent.append(len(self.parent))
        self.n.append(n)
        self.origin.append(origin)
        self.reasons.append([])
        return len(self.parent) - 1

    def find(self, a):
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a, b):
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        if a > b:
            a, b = b, a
        self.parent[b] = a
        self.n[a] = self.n[a] if self.n[a] is not None else self.n[b]
        self.reasons[a] += [r for r in self.reasons[b] if r not in self.reasons[a]]

    def refuse(self, blobs, reason):
        for blob in blobs:
            for s in blob.segs or ():
                root = self.find(s.atom)
                if reason not in self.reasons[root]:
                    self.reasons[root].append(reason)

    def tie(self, layer, blobs):
        """Join the channel spaces of blobs that must keep the same channels."""
        spaces = [b for b in blobs if b.segs is not None]
        if len(spaces) < len(blobs):
            self.refuse(spaces, "%s %r mixes it with a blob of unknown channels" % (layer.type, layer.name))
            return
        first = [(s.n, s.block) for s in spaces[0].segs]
        if any([(s.n, s.block) for s in b.segs] != first for b in spaces[1:]):
            self.refuse(spaces, "%s %r joins differently composed channel spaces" % (layer.type, layer.name))
            return
        for b in spaces[1:]:
            for s, t in zip(spaces[0].segs, b.segs):
                self.union(s.atom, t.atom)

    def record(self, role, blob, make):
        """One record per segment of ``blob``: make(start, block) -> Slice."""
        for s, start in layout(blob.segs or ()):
            self.records.append((s.atom, role, make(start, s.block)))

    def new_space(self, layer, n, top=0):
        name = layer.name if len(layer.top) == 1 else "%s/%s" % (layer.name, layer.top[top])
        return [Seg(self.atom(n, name), n, 1)]

    def error(self, layer, message):
        return GraphError("%s: layer %r (%s): %s" % (self.source, layer.name, layer.type, message))


def _inner(shape):
    """Entries per channel after flattening axis 1 onward."""
    return int(np.prod(shape[2:])) if shape is not None else None


def _passenger(w, layer, bot, blobs):
    """Per-channel parameter blobs of a layer on axis 1 (slice axis 0 of each)."""
    for i in blobs:
        w.record("passengers", bot, lambda start, block, i=i: Slice(layer.name, layer.type, i, 0, start, block))
    return [bot] * len(layer.top)


def _rule_elementwise(w, layer, bots):
    return [bots[0]] * len(layer.top)


def _rule_prelu(w, layer, bots):
    (bot,) = bots
    channel_shared = layer.prelu_param.channel_shared
    if bot.shape is not None:
        w.param_shapes[layer.name] = [(1,) if channel_shared else (bot.shape[1],)]
    return _rule_elementwise(w, layer, bots) if channel_shared else _passenger(w, layer, bot, [0])


def _rule_batchnorm(w, layer, bots):
    (bot,) = bots
    if bot.shape is not None:
        w.param_shapes[layer.name] = [(bot.shape[1],), (bot.shape[1],), (1,)]
    # blob 2 is the moving-average scale factor: one number, kept as is
    return _passenger(w, layer, bot, [0, 1])


def _rule_scale_bias(w, layer, bots):
    p = layer.scale_param if layer.type == "Scale" else layer.bias_param
    if len(bots) != 1:
        w.refuse(bots, "%s %r takes its factors from a second bottom" % (layer.type, layer.name))
        return [Blob(None, bots[0].shape)] * len(layer.top)
    (bot,) = bots
    n_blobs = 2 if layer.type == "Scale" and p.bias_term else 1
    axis = p.axis if p.axis >= 0 or bot.shape is None else len(bot.shape) + p.axis
    if bot.shape is not None:
        end = len(bot.shape) if p.num_axes == -1 else axis + p.num_axes
        param = tuple(bot.shape[axis:end])
        w.param_shapes[layer.name] = [param] * n_blobs
    if p.num_axes == 0:  # one scalar for the whole blob
        return [bot] * len(layer.top)
    if axis != 1:
        w.refuse(bots, "%s %r scales along axis %d, not the channels" % (layer.type, layer.name, axis))
        return [Blob(None, bot.shape)] * len(layer.top)
    return _passenger(w, layer, bot, range(n_blobs))


def _rule_pooling(w, layer, bots):
    return [Blob(bots[0].segs, _pool_shape(layer, bots[0].shape))] * len(layer.top)


def _rule_conv(w, layer, bots):
    p, deconv = layer.convolution_param, layer.type == "Deconvolution"
    if p.axis != 1:
        w.refuse(bots, "%s %r convolves over axis %d" % (layer.type, layer.name, p.axis))
        return [Blob(None, None)] * len(layer.top)
    shape, segs = bots[0].shape, bots[0].segs
    c_in = shape[1] if shape is not None else (
        sum(s.n for s in segs) if segs and all(s.n is not None for s in segs) else None)
    groups, out = max(p.group, 1), p.num_output
    if c_in is not None and shape is not None:
        kernel = _conv_geometry(p, len(shape) - 2)[0]
        weight = (c_in, out // groups) if deconv else (out, c_in // groups)
        w.param_shapes[layer.name] = [weight + tuple(kernel)] + ([(out,)] if p.bias_term else [])
    tops = [Blob(None, _conv_shape(layer, b.shape, deconv)) for b in bots]
    if len(bots) > 1:  # several bottom/top pairs share one set of weights
        w.tie(layer, bots)
    in_axis, out_axis = (0, 1) if deconv else (1, 0)
    bias = [1] if p.bias_term else []
    if groups > 1 and groups == c_in == out:  # depthwise: channel c in -> channel c out
        w.counts[layer.name] = ("depthwise", bots[0])
        _passenger(w, layer, bots[0], [0] + bias)
        return [Blob(bots[0].segs, t.shape) for t in tops]
    if groups > 1:
        reason = "grouped convolution %r (group %d of %s channels) ties channels in blocks" % (
            layer.name, groups, c_in)
        w.refuse(bots, reason)
        segs = w.new_space(layer, out)
        w.refuse([Blob(segs, None)], reason)
        return [Blob(segs, t.shape) for t in tops]
    for b, name in zip(bots, layer.bottom):
        w.record("consumers", b, lambda start, block, name=name: Consumer(
            layer.name, layer.type, 0, in_axis, start, block, bottom=name))
    segs = w.new_space(layer, out)
    for i, axis in [(0, out_axis)] + [(1, 0)] * len(bias):
        w.record("producers", Blob(segs, None), lambda start, block, i=i, axis=axis: Slice(
            layer.name, layer.type, i, axis, start, block))
    w.counts[layer.name] = ("num_output", Blob(segs, None))
    return [Blob(segs, t.shape) for t in tops]


def _rule_inner_product(w, layer, bots):
    p = layer.inner_product_param
    (bot,) = bots
    axis = p.axis if p.axis >= 0 or bot.shape is None else len(bot.shape) + p.axis
    if axis != 1:
        w.refuse(bots, "InnerProduct %r over axis %d" % (layer.name, axis))
        return [Blob(None, None)]
    shape = bot.shape
    inner = _inner(shape)
    if shape is not None:
        k = int(np.prod(shape[1:]))
        w.param_shapes[layer.name] = [(k, p.num_output) if p.transpose else (p.num_output, k)] + (
            [(p.num_output,)] if p.bias_term else [])
    if bot.segs is not None:
        if inner is None:
            w.refuse(bots, "the spatial size of the blob InnerProduct %r reads is unknown" % layer.name)
        else:
            flat = Blob([s._replace(block=s.block * inner) for s in bot.segs], None)
            w.record("consumers", flat, lambda start, block: Consumer(
                layer.name, layer.type, 0, 0 if p.transpose else 1, start, block, bottom=layer.bottom[0]))
    segs = w.new_space(layer, p.num_output)
    w.record("producers", Blob(segs, None), lambda start, block: Slice(
        layer.name, layer.type, 0, 1 if p.transpose else 0, start, block))
    if p.bias_term:
        w.record("producers", Blob(segs, None), lambda start, block: Slice(layer.name, layer.type, 1, 0, start, block))
    w.counts[layer.name] = ("num_output", Blob(segs, None))
    top_shape = None if shape is None else (shape[0], p.num_output)
    return [Blob(segs, top_shape)]


def _flattened(w, layer, bot, new_shape):
    """Top space of a Flatten/Reshape: channels kept on axis 1, or refused."""
    old = bot.shape
    if bot.segs is None or old is None or new_shape is None:
        w.refuse([bot], "%s %r: shape unknown" % (layer.type, layer.name))
        return Blob(None, new_shape)
    if len(new_shape) >= 2 and new_shape[0] == old[0]:
        # axis 1 of the top must hold whole channels: C times a product of leading spatial sizes
        for k in range(2, len(old) + 1):
            if new_shape[1] == int(np.prod(old[1:k])) and tuple(new_shape[2:]) in (tuple(old[k:]), ()) and (
                    int(np.prod(new_shape[2:])) == int(np.prod(old[k:]))):
                factor = int(np.prod(old[2:k]))
                return Blob([s._replace(block=s.block * factor) for s in bot.segs], new_shape)
        if new_shape[1] == old[1]:
            return Blob(bot.segs, new_shape)
    w.refuse([bot], "%s %r moves the channel axis" % (layer.type, layer.name))
    return Blob(None, new_shape)


def _rule_flatten(w, layer, bots):
    (bot,) = bots
    p = layer.flatten_param
    shape = bot.shape
    new = None
    if shape is not None:
        a = p.axis if p.axis >= 0 else len(shape) + p.axis
        e = p.end_axis if p.end_axis >= 0 else len(shape) + p.end_axis
        new = tuple(shape[:a]) + (int(np.prod(shape[a:e + 1])),) + tuple(shape[e + 1:])
    return [_flattened(w, layer, bot, new)]


def _rule_reshape(w, layer, bots):
    (bot,) = bots
    top = _flattened(w, layer, bot, _reshape_shape(layer, bot.shape))
    p = layer.reshape_param
    if top.segs is not None and (p.axis, p.num_axes) != (0, -1):
        w.refuse([top], "Reshape %r with axis/num_axes" % layer.name)
    elif top.segs is not None and len(p.shape.dim) > 1 and p.shape.dim[1] > 0:
        w.counts[layer.name] = ("reshape", top)  # the written channel count must follow the pruning
    return [top]


def _rule_concat(w, layer, bots):
    p = layer.concat_param
    axis = p.axis if p.HasField("axis") or not p.HasField("concat_dim") else p.concat_dim
    ndim = len(bots[0].shape) if bots[0].shape is not None else 4
    axis = axis if axis >= 0 else ndim + axis
    shape = None
    if all(b.shape is not None for b in bots):
        shape = list(bots[0].shape)
        shape[axis] = sum(b.shape[axis] for b in bots)
        shape = tuple(shape)
    if axis != 1:
        w.tie(layer, bots)
        return [Blob(bots[0].segs, shape)]
    if any(b.segs is None for b in bots):
        w.refuse(bots, "Concat %r joins a blob of unknown channels" % layer.name)
        return [Blob(None, shape)]
    return [Blob([s for b in bots for s in b.segs], shape)]


def _rule_eltwise(w, layer, bots):
    w.tie(layer, bots)
    return [bots[0]]


def _rule_lrn(w, layer, bots):
    if layer.lrn_param.norm_region == caffe_pb2.LRNParameter.ACROSS_CHANNELS:
        return _rule_stop(w, layer, bots)
    return _rule_elementwise(w, layer, bots)


def _rule_mvn(w, layer, bots):
    return _rule_stop(w, layer, bots) if layer.mvn_param.across_channels else _rule_elementwise(w, layer, bots)


def _rule_stop(w, layer, bots):
    w.refuse(bots, "reaches %s layer %r" % (layer.type, layer.name))
    same = layer.type in ("Softmax", "Normalize", "LRN", "MVN")
    return [Blob(None, bots[0].shape if same and bots else None)] * len(layer.top)


def _rule_data(w, layer, bots):
    tops = []
    for i, (name, shape) in enumerate(zip(layer.top, _data_shapes(layer))):
        blob = Blob(w.new_space(layer, shape[1] if shape is not None and len(shape) > 1 else None, i), shape)
        w.refuse([blob], "net input %r" % name)
        tops.append(blob)
    return tops


def _rule_python(w, layer, bots):
    return _rule_stop(w, layer, bots) if bots else _rule_data(w, layer, bots)


RULES = {"Convolution": _rule_conv, "Deconvolution": _rule_conv, "InnerProduct": _rule_inner_product,
         "PReLU": _rule_prelu, "BatchNorm": _rule_batchnorm, "Scale": _rule_scale_bias, "Bias": _rule_scale_bias,
         "Pooling": _rule_pooling, "Flatten": _rule_flatten, "Reshape": _rule_reshape, "Concat": _rule_concat,
         "Eltwise": _rule_eltwise, "LRN": _rule_lrn, "MVN": _rule_mvn}
RULES.update({t: _rule_elementwise for t in ELEMENTWISE})
RULES.update({t: _rule_stop for t in STOPPERS})
RULES.update({t: _rule_data for t in DATA_TYPES})
RULES["Python"] = _rule_python  # without bottoms it is a data layer


# ------------------------------------------------------------------ the graph

class Graph:
    """The groups of one net (TEST phase): ``graph.groups[id]``, ``graph.prunable()``.

    Also kept for the surgery: ``shapes`` (blob -> inferred shape),
    ``param_shapes`` (layer -> shapes of its parameter blobs) and ``counts``
    (layer -> how its num_output/group/reshape dim follows from its groups).
    """

    def __init__(self, groups, shapes, param_shapes, counts, outputs, source):
        self.groups, self.shapes, self.param_shapes = groups, shapes, param_shapes
        self.counts, self.outputs, self.source = counts, outputs, source

    def prunable(self):
        return [g for g in self.groups.values() if g.prunable]

    def __getitem__(self, gid):
        return self.groups[gid]

    def size(self, segs, kept):
        """Entries along axis 1 of a blob after pruning; kept: {group id: channel count}."""
        return sum(kept.get(gid, n) * block for gid, n, block in segs)

    def consumers_of(self, layer):
        """(group, consumer) pairs for one consumer layer, in input-channel order."""
        found = [(g, c) for g in self.groups.values() for c in g.consumers if c.layer == layer]
        return sorted(found, key=lambda gc: gc[1].start)


def build_graph(net, source=None):
    """Channel-dependency groups of a NetParameter (or a prototxt path)."""
    if isinstance(net, (str, os.PathLike)):
        from prune import caffe_io
        source = source or os.fspath(net)
        net = caffe_io.read_net(net)
    source = source or "net %r" % net.name
    if len(net.layers):
        raise GraphError("%s: legacy V1 'layers'; read it with prune.caffe_io.read_net, which upgrades it" % source)
    layers, dropped = phase_view(net)
    w = _Walk(source)
    current, order = {}, []  # blob name -> Blob; blobs not yet consumed (net outputs at the end)
    names = set()
    for layer in layers:
        if layer.name in names:
            raise w.error(layer, "a second layer of that name (weights are matched by layer name)")
        names.add(layer.name)
        bots = []
        for name in layer.bottom:
            if name not in current:
                raise w.error(layer, "reads blob %r, which no earlier layer produces" % name)
            bots.append(current[name])
            if name in order:
                order.remove(name)
        rule = RULES.get(layer.type)
        if layer.type in ONE_BOTTOM and len(bots) != 1:
            raise w.error(layer, "takes one bottom blob, not %d" % len(bots))
        if rule is None:
            w.pending.append((layer, [s.atom for b in bots for s in b.segs or ()]))
            tops = [Blob(None, None)] * len(layer.top)
        else:
            if not bots and rule not in (_rule_data, _rule_stop, _rule_python):
                raise w.error(layer, "has no bottom blob")
            tops = rule(w, layer, bots)
        for name, top in zip(layer.top, tops):
            current[name] = top
            w.shapes[name] = top.shape
            if top.segs is not None:
                w.record("blobs", top, lambda start, block, name=name: BlobSlice(name, start, block))
            if name not in order:
                order.append(name)
    for name in order:
        w.refuse([current[name]], "reaches the net output %r" % name)
    for layer in dropped:
        w.refuse([current[b] for b in layer.bottom if b in current],
                 "read by layer %r outside the TEST phase" % layer.name)
    _refuse_shared_params(w, layers)
    return _collect(w, net, layers, order)


def _refuse_shared_params(w, layers):
    owners = {}
    for layer in layers:
        for p in layer.param:
            if p.name:
                owners.setdefault(p.name, set()).add(layer.name)
    shared = {name for names in owners.values() if len(names) > 1 for name in names}
    for atom, role, rec in w.records:
        if role != "blobs" and rec.layer in shared:
            w.refuse([Blob([Seg(atom, None, 1)], None)], "layer %r shares its parameters with another layer"
                     % rec.layer)


def _collect(w, net, layers, outputs):
    groups, by_root = OrderedDict(), {}
    for atom in range(len(w.parent)):
        root = w.find(atom)
        if root not in by_root:
            gid = w.origin[atom]
            by_root[root] = groups[gid] = Group(gid, w.n[root], reasons=list(w.reasons[root]))
    seen = set()
    for atom, role, rec in w.records:
        group = by_root[w.find(atom)]
        key = (group.id, role, rec)
        if key not in seen:  # a blob name rewritten in place is recorded once
            seen.add(key)
            getattr(group, role).append(rec)
    for layer, atoms in w.pending:
        live = [by_root[w.find(a)] for a in atoms if not by_root[w.find(a)].reasons]
        if live:
            raise w.error(layer, "unknown layer type, and prunable channels (group %r) reach it; "
                                 "the channel graph only knows: %s" % (live[0].id, ", ".join(sorted(RULES))))
    counts = OrderedDict((name, (kind, [(by_root[w.find(s.atom)].id, s.n, s.block) for s in blob.segs]))
                         for name, (kind, blob) in w.counts.items())
    return Graph(groups, w.shapes, w.param_shapes, counts, outputs, w.source)
