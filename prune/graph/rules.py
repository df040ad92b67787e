"""One rule per layer type: how a layer's tops' channel spaces follow from its bottoms'.

A rule is ``rule(walk, layer, bottoms) -> [Blob for each top]``: ``layer``
is the LayerParameter, ``bottoms`` the ``Blob``s (channel segments + shape)
it reads.  Through ``walk`` (a ``prune.graph.walk.Walk``) it says what the
layer does to the channels:

* ``walk.new_space(layer, n)``: fresh channels (a producer: conv, fc);
* ``walk.record(role, blob, make)``: parameter slices per segment, role
  ``producers`` / ``passengers`` / ``consumers`` (``passenger(walk, layer,
  blob, blob_indices)`` does the per-channel-parameter case);
* ``walk.tie(layer, blobs)``: channel spaces that must keep the same
  channels (Eltwise);
* ``walk.refuse(blobs, reason)``: channels that cannot be pruned, and why;
* ``walk.param_shapes[layer.name]``: the shapes of its parameter blobs,
  ``walk.counts[layer.name] = (kind, blob)``: a count the surgery rewrites.

A new layer type (a fork's own layer, a Python layer) gets a rule with
``register_rule``:

    from prune.graph import passenger, register_rule

    def rule_channel_scale(walk, layer, bottoms):          # y[c] = a[c] * x[c]: one factor per channel
        return passenger(walk, layer, bottoms[0], [0])      # blob 0 follows the channels of the bottom

    register_rule("ChannelScale", rule_channel_scale)       # types=..., sources=True for a bottomless layer

A type without a rule (a Caffe fork's layer, most often) is a fixed point:
the channels that reach it stay, with a reason naming the layer (and the
fork, when base.forks knows it), and the rest of the net stays prunable.
Fork layers whose shapes are known (``FORK_FIXED``) keep the shapes flowing
past them, so the layers after them still know their input sizes.
"""
import numpy as np

from base.forks import DEPTHWISE_TYPES, describe_type
from base.proto import caffe_pb2

from .records import Blob, Consumer, Slice
from .shapes import conv_geometry, conv_shape, data_shapes, pool_shape, reshape_shape

DATA_TYPES = {"Input", "Data", "ImageData", "HDF5Data", "MemoryData", "DummyData", "WindowData"}
# Elementwise and channel-preserving: every top is the bottom's channel space.
ELEMENTWISE = {"ReLU", "Sigmoid", "TanH", "Dropout", "AbsVal", "Power", "ELU", "BNLL", "Exp", "Log",
               "Threshold", "Clip", "Swish", "Split", "ReLU6"}
ONE_BOTTOM = {"PReLU", "BatchNorm", "Pooling", "Flatten", "Reshape", "InnerProduct", "Slice"}
# Types that end prunable flow: what reaches them keeps all its channels.
STOPPERS = {"SoftmaxWithLoss", "Softmax", "EuclideanLoss", "HingeLoss", "InfogainLoss", "ContrastiveLoss",
            "MultinomialLogisticLoss", "SigmoidCrossEntropyLoss", "Accuracy", "ArgMax", "Python", "Tile",
            "Reduction", "Silence", "Embed", "HDF5Output", "SPP", "Im2col", "BatchReindex", "Filter", "LSTM", "RNN", "LSTMUnit", "Parameter"}


def entries_per_channel(shape):
    """Entries per channel after flattening axis 1 onward."""
    return int(np.prod(shape[2:])) if shape is not None else None


def passenger(w, layer, bot, blobs):
    """Per-channel parameter blobs of a layer on axis 1 (slice axis 0 of each)."""
    for i in blobs:
        w.record("passengers", bot, lambda start, block, i=i: Slice(layer.name, layer.type, i, 0, start, block))
    return [bot] * len(layer.top)


def rule_elementwise(w, layer, bots):
    return [bots[0]] * len(layer.top)


def rule_prelu(w, layer, bots):
    (bot,) = bots
    channel_shared = layer.prelu_param.channel_shared
    if bot.shape is not None:
        w.param_shapes[layer.name] = [(1,) if channel_shared else (bot.shape[1],)]
    return rule_elementwise(w, layer, bots) if channel_shared else passenger(w, layer, bot, [0])


def rule_batchnorm(w, layer, bots):
    (bot,) = bots
    if bot.shape is not None:
        w.param_shapes[layer.name] = [(bot.shape[1],), (bot.shape[1],), (1,)]
    # blob 2 is the moving-average scale factor: one number, kept as is
    return passenger(w, layer, bot, [0, 1])


def rule_scale_bias(w, layer, bots):
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
    return passenger(w, layer, bot, range(n_blobs))


def rule_pooling(w, layer, bots):
    return [Blob(bots[0].segs, pool_shape(layer, bots[0].shape))] * len(layer.top)


def rule_conv(w, layer, bots):
    p, deconv = layer.convolution_param, layer.type == "Deconvolution"
    if p.axis != 1:
        w.refuse(bots, "%s %r convolves over axis %d" % (layer.type, layer.name, p.axis))
        return [Blob(None, None)] * len(layer.top)
    if not p.num_output:
        raise w.error(layer, "has no num_output (Caffe refuses it too)")
    if not (len(p.kernel_size) or p.kernel_h or p.kernel_w):
        raise w.error(layer, "has no kernel_size (or kernel_h and kernel_w; Caffe refuses it too)")
    shape, segs = bots[0].shape, bots[0].segs
    c_in = shape[1] if shape is not None else (
        sum(s.n for s in segs) if segs and all(s.n is not None for s in segs) else None)
    groups, out = max(p.group, 1), p.num_output
    if layer.type in DEPTHWISE_TYPES and not p.HasField("group"):  # a fork's depthwise type: group = channels
        groups = c_in if c_in is not None else 0
    if c_in is not None and shape is not None and groups:
        kernel = conv_geometry(p, len(shape) - 2)[0]
        weight = (c_in, out // groups) if deconv else (out, c_in // groups)
        w.param_shapes[layer.name] = [weight + tuple(kernel)] + ([(out,)] if p.bias_term else [])
    tops = [Blob(None, conv_shape(layer, b.shape, deconv)) for b in bots]
    if len(bots) > 1:  # several bottom/top pairs share one set of weights
        w.tie(layer, bots)
    in_axis, out_axis = (0, 1) if deconv else (1, 0)
    bias = [1] if p.bias_term else []
    if groups == c_in == out and (groups > 1 or layer.type in DEPTHWISE_TYPES):  # depthwise: channel c -> c
        w.counts[layer.name] = ("depthwise", bots[0])
        passenger(w, layer, bots[0], [0] + bias)
        return [Blob(bots[0].segs, t.shape) for t in tops]
    if groups != 1 or layer.type in DEPTHWISE_TYPES:
        reason = "grouped convolution %r (%s, group %s of %s channels, %d outputs) ties channels in blocks" % (
            layer.name, layer.type, groups or "?", c_in if c_in is not None else "?", out)
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


def rule_inner_product(w, layer, bots):
    p = layer.inner_product_param
    (bot,) = bots
    axis = p.axis if p.axis >= 0 or bot.shape is None else len(bot.shape) + p.axis
    if axis != 1:
        w.refuse(bots, "InnerProduct %r over axis %d" % (layer.name, axis))
        return [Blob(None, None)]
    shape = bot.shape
    inner = entries_per_channel(shape)
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


def flattened(w, layer, bot, new_shape):
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


def rule_flatten(w, layer, bots):
    (bot,) = bots
    p = layer.flatten_param
    shape = bot.shape
    new = None
    if shape is not None:
        a = p.axis if p.axis >= 0 else len(shape) + p.axis
        e = p.end_axis if p.end_axis >= 0 else len(shape) + p.end_axis
        new = tuple(shape[:a]) + (int(np.prod(shape[a:e + 1])),) + tuple(shape[e + 1:])
    return [flattened(w, layer, bot, new)]


def rule_reshape(w, layer, bots):
    (bot,) = bots
    shape = reshape_shape(layer, bot.shape)
    if shape is not None and int(np.prod(shape)) != int(np.prod(bot.shape)):
        raise w.error(layer, "shape %s cannot hold the %d values of its bottom %s (Caffe refuses it too)"
                      % (list(shape), int(np.prod(bot.shape)), list(bot.shape)))
    top = flattened(w, layer, bot, shape)
    p = layer.reshape_param
    if top.segs is not None and (p.axis, p.num_axes) != (0, -1):
        w.refuse([top], "Reshape %r with axis/num_axes" % layer.name)
    elif top.segs is not None and len(p.shape.dim) > 1 and p.shape.dim[1] > 0:
        w.counts[layer.name] = ("reshape", top)  # the written channel count must follow the pruning
    return [top]


def rule_concat(w, layer, bots):
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


def rule_eltwise(w, layer, bots):
    w.tie(layer, bots)
    return [bots[0]]


def fixed_point(w, layer, bots, why, shapes=None):
    """A layer no channel can be pruned through: what reaches it keeps all its channels, and why."""
    fork = describe_type(layer.type, detail=False)
    what = "%s %r%s" % (layer.type, layer.name, " (%s)" % fork if fork else "")
    w.refuse(bots, "reaches %s, which %s: a fixed point, its channels stay" % (what, why))
    return [Blob(None, s) for s in (shapes or [None] * len(layer.top))]


ACROSS = "mixes the channels at every position, so exact pruning through it is impossible"


def rule_lrn(w, layer, bots):
    p = layer.lrn_param
    if p.norm_region == caffe_pb2.LRNParameter.ACROSS_CHANNELS:
        why = "normalises across channels (local_size %d): every output channel depends on its neighbours, so " \
              "exact pruning through it is impossible" % p.local_size
        return fixed_point(w, layer, bots, why, [bots[0].shape] * len(layer.top))
    return rule_elementwise(w, layer, bots)


def rule_mvn(w, layer, bots):
    if layer.mvn_param.across_channels:
        return fixed_point(w, layer, bots, "normalises across channels; " + ACROSS, [bots[0].shape] * len(layer.top))
    return rule_elementwise(w, layer, bots)


def rule_stop(w, layer, bots):
    w.refuse(bots, "reaches %s layer %r" % (layer.type, layer.name))
    same = layer.type in ("Softmax", "LRN", "MVN")
    return [Blob(None, bots[0].shape if same and bots else None)] * len(layer.top)


def permuted(layer, shape):
    """Top shape of SSD's Permute: axes in permute_param.order, the unnamed ones after in their order."""
    if shape is None:
        return None
    order = list(layer.permute_param.order)
    order += [a for a in range(len(shape)) if a not in order]
    return tuple(shape[a] for a in order) if sorted(order) == list(range(len(shape))) else None


# Layers of Caffe forks whose shapes the graph follows but whose channels it cannot prune through:
# type -> (why, top shape from the bottoms' shapes).
FORK_FIXED = {
    "ShuffleChannel": ("interleaves its channel groups (a channel's place depends on the group size)",
                       lambda layer, shapes: shapes[0]),
    "Normalize": ("L2-normalises every position over its channels, so exact pruning through it is impossible",
                  lambda layer, shapes: shapes[0]),
    "Axpy": ("scales one input by per-channel factors and adds another (an SE block's excitation)",
             lambda layer, shapes: shapes[1] if len(shapes) > 1 else None),
    "Permute": ("moves the channel axis", lambda layer, shapes: permuted(layer, shapes[0])),
    "DetectionOutput": ("decodes the detector's boxes", lambda layer, shapes: None),
    "MultiBoxLoss": ("is the detector's loss", lambda layer, shapes: None),
    "MarginInnerProduct": ("is SphereFace's A-Softmax classifier, which reads the labels",
                           lambda layer, shapes: None),
}


def rule_crop(w, layer, bots):
    """Crop (RetinaFace's and FCNs' upsampling paths): bottom 0 cut to bottom 1's size along ``axis`` onward.
    From axis 2 on only positions go, so bottom 0's channels pass through and bottom 1 gives only its size;
    from axis 0 or 1 the channel count is bottom 1's, a fixed point for both."""
    axis = layer.crop_param.axis
    shapes = [b.shape for b in bots]
    if len(bots) == 2 and shapes[0] is not None and axis < 0:
        axis += len(shapes[0])
    top = (tuple(shapes[0][:axis]) + tuple(shapes[1][axis:])
           if len(bots) == 2 and None not in shapes and len(shapes[0]) == len(shapes[1]) else None)
    if len(bots) != 2 or axis < 2:
        return fixed_point(w, layer, bots, "crops along axis %d, the channels included" % axis, [top])
    return [Blob(bots[0].segs, top)]


def rule_shape_only(w, layer, bots):
    """SSD's PriorBox: its output depends on its bottoms' sizes only, never on their values -- a reader that
    fixes no channel."""
    return [Blob(None, None)] * len(layer.top)


def rule_fork_fixed(w, layer, bots):
    why, shape = FORK_FIXED[layer.type]
    top = shape(layer, [b.shape for b in bots]) if bots else None
    return fixed_point(w, layer, bots, why, [top] * len(layer.top))


def rule_unknown(w, layer, bots):
    """A type without a rule (a fork's layer, most often): a fixed point of unknown output."""
    fork = describe_type(layer.type)
    why = "the channel graph has no rule for (%s)" % (
        "prune.graph.register_rule adds one" if fork else "a layer of a Caffe fork? prune.graph.register_rule adds one")
    return fixed_point(w, layer, bots, why)


def rule_slice(w, layer, bots):
    """Slice: the reverse of Concat.  Along the channels it cuts the bottom's channel space at the slice points
    (a cut inside one producer's channels splits them into two groups); along any other axis every top keeps
    the bottom's channels.  The surgery rewrites the slice points."""
    (bot,) = bots
    p, shape = layer.slice_param, bot.shape
    axis = p.axis if p.HasField("axis") or not p.HasField("slice_dim") else p.slice_dim
    if axis < 0:
        axis = len(shape) + axis if shape is not None else None
    size = shape[axis] if shape is not None and axis is not None else (
        sum(s.n * s.block for s in bot.segs) if axis == 1 and bot.segs and all(s.n for s in bot.segs) else None)
    n = len(layer.top)
    bounds = [0] + list(p.slice_point) + [size] if len(p.slice_point) else (
        [i * size // n for i in range(n + 1)] if size is not None and size % n == 0 else None)
    if bounds is None or axis is None or len(bounds) != n + 1:
        w.refuse(bots, "Slice %r: where it cuts is unknown" % layer.name)
        return [Blob(None, None)] * n
    shapes = [None if shape is None else tuple(shape[:axis]) + (hi - lo,) + tuple(shape[axis + 1:])
              for lo, hi in zip(bounds, bounds[1:])]
    if axis != 1 or bot.segs is None:
        return [Blob(bot.segs, s) for s in shapes]
    parts = w.cut(layer, bot, bounds)
    if parts is None:
        return [Blob(None, s) for s in shapes]
    w.counts[layer.name] = ("slice", [Blob([s for part in parts[:i + 1] for s in part], None) for i in range(n - 1)])
    return [Blob(part, s) for part, s in zip(parts, shapes)]


def rule_data(w, layer, bots):
    tops = []
    for i, (name, shape) in enumerate(zip(layer.top, data_shapes(layer))):
        blob = Blob(w.new_space(layer, shape[1] if shape is not None and len(shape) > 1 else None, i), shape)
        w.refuse([blob], "net input %r" % name)
        tops.append(blob)
    return tops


def rule_python(w, layer, bots):
    return rule_stop(w, layer, bots) if bots else rule_data(w, layer, bots)


RULES = {}          # layer type -> rule
SOURCES = set()     # types whose rule also takes a layer without bottoms (data layers, stoppers)


def register_rule(types, rule, sources=False):
    """Use ``rule`` for layer type(s) ``types`` (a name or several); ``sources``: it handles bottomless layers."""
    for t in ([types] if isinstance(types, str) else types):
        RULES[t] = rule
        if sources:
            SOURCES.add(t)
        else:
            SOURCES.discard(t)


for _types, _rule in [(("Convolution", "Deconvolution"), rule_conv), ("InnerProduct", rule_inner_product),
                      ("PReLU", rule_prelu), ("BatchNorm", rule_batchnorm), (("Scale", "Bias"), rule_scale_bias),
                      ("Pooling", rule_pooling), ("Flatten", rule_flatten), ("Reshape", rule_reshape),
                      ("Concat", rule_concat), ("Eltwise", rule_eltwise), ("LRN", rule_lrn), ("MVN", rule_mvn),
                      ("Slice", rule_slice), (DEPTHWISE_TYPES, rule_conv), (tuple(FORK_FIXED), rule_fork_fixed),
                      ("PriorBox", rule_shape_only), ("Crop", rule_crop),
                      (ELEMENTWISE, rule_elementwise)]:
    register_rule(_types, _rule)
register_rule(STOPPERS, rule_stop, sources=True)
register_rule(DATA_TYPES, rule_data, sources=True)
register_rule("Python", rule_python, sources=True)  # without bottoms it is a data layer
