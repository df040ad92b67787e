"""A Caffe net as an ONNX model that computes what Caffe computes (ONNX Runtime, OpenVINO, OpenCV 5, pnnx/ncnn
and TensorRT read ONNX; several no longer read Caffe).

Written from the toolkit's own parsed net with the ``onnx`` package's helpers, one registered rule per Caffe
layer type (``@rule``), the shapes of every blob taken from Caffe itself.  The converters on the package index
were tried first and left: ``caffe2onnx`` 2.0.1 pins onnx 1.6 (no wheel for this Python), ``caffe-onnx`` 0.1.2
needs protobuf < 4, which the pycaffe built here cannot share a process with, and has no Slice, Flatten or Scale.

The preprocessing a deployment must code (input name, layout, colour order, mean and scale) is recorded in the
model's metadata; ``python -m prune.export`` (``__main__``) writes only a model that ONNX Runtime, where
installed, runs to Caffe's output within --tolerance.
"""
import os

import numpy as np

from base import caffe_io
from base.errors import ToolkitError
from base.netcheck import phase_view

OPSET = 13          # read by ONNX Runtime, OpenVINO, OpenCV 4.x/5 and pnnx alike


class ExportError(ToolkitError):
    """A net, or one layer of it, that has no exact ONNX form here (named layer and type)."""


RULES = {}


def rule(*types):
    """Register ``fn(layer, inputs, graph) -> [output tensor names, one per top]`` for Caffe layer ``types``."""
    def register(fn):
        for t in types:
            RULES[t] = fn
        return fn
    return register


class Graph:
    """The ONNX graph being written: nodes, initializers, unique tensor names, and the Caffe net's facts
    (``shape[blob]`` from Caffe, ``weights[layer]``)."""

    def __init__(self, shapes, weights):
        self.nodes, self.initializers, self.used = [], [], set()
        self.shape, self.weights = shapes, weights

    def name(self, wanted):
        name, i = wanted, 1
        while name in self.used:
            name, i = "%s_%d" % (wanted, i), i + 1
        self.used.add(name)
        return name

    def const(self, name, array, dtype=np.float32):
        from onnx import numpy_helper
        name = self.name(name)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=dtype), name))
        return name

    def node(self, op, inputs, out, **attrs):
        """One node with one output named after ``out`` (made unique); returns that name."""
        from onnx import helper
        name = self.name(out)
        self.nodes.append(helper.make_node(op, list(inputs), [name], name=name, **attrs))
        return name

    def blobs(self, layer, count=None):
        """The layer's arrays from the caffemodel (``count`` of them at least)."""
        arrays = self.weights.get(layer.name, [])
        if count is not None and len(arrays) < count:
            raise ExportError("layer %r (%s) has %d arrays in the caffemodel, %d needed"
                              % (layer.name, layer.type, len(arrays), count))
        return arrays


def _pair(param, field, default, hw=None):
    """(h, w) of a Caffe spatial setting: ``hw``_h / ``hw``_w when given, else the (repeated or single)
    ``field``, one value for both axes or one per axis."""
    if hw and (param.HasField(hw + "_h") or param.HasField(hw + "_w")):
        return getattr(param, hw + "_h"), getattr(param, hw + "_w")
    f = param.DESCRIPTOR.fields_by_name[field]
    if f.label == f.LABEL_REPEATED:
        values = list(getattr(param, field))
    else:
        values = [getattr(param, field)] if param.HasField(field) else []
    return (values[0], values[-1]) if values else (default, default)


def _channel_shape(g, blob, axis, values):
    """``values`` shaped to broadcast along ``axis`` of ``blob`` (ONNX broadcasts from the last axis)."""
    rank = len(g.shape[blob])
    return np.asarray(values, np.float32).reshape((-1,) + (1,) * (rank - axis - 1))


@rule("Convolution")
def convolution(layer, inputs, g):
    p = layer.convolution_param
    if p.axis != 1:
        raise ExportError("layer %r (Convolution): axis %d; only axis 1 has an ONNX form" % (layer.name, p.axis))
    arrays = g.blobs(layer, 2 if p.bias_term else 1)
    kh, kw = _pair(p, "kernel_size", 0, "kernel")
    ph, pw = _pair(p, "pad", 0, "pad")
    sh, sw = _pair(p, "stride", 1, "stride")
    dh, dw = _pair(p, "dilation", 1)
    ins = [inputs[0], g.const(layer.name + "/W", arrays[0])]
    if p.bias_term:
        ins.append(g.const(layer.name + "/b", arrays[1].ravel()))
    return [g.node("Conv", ins, layer.top[0], kernel_shape=[kh, kw], strides=[sh, sw], pads=[ph, pw, ph, pw],
                   dilations=[dh, dw], group=p.group)]


@rule("InnerProduct")
def inner_product(layer, inputs, g):
    p = layer.inner_product_param
    arrays = g.blobs(layer, 2 if p.bias_term else 1)
    w = arrays[0].reshape(arrays[0].shape[-2:]) if arrays[0].ndim > 2 else arrays[0]
    x = inputs[0]
    if len(g.shape[layer.bottom[0]]) != 2 or p.axis != 1:
        x = g.node("Flatten", [x], layer.name + "/flat", axis=p.axis)
    ins = [x, g.const(layer.name + "/W", w)]
    if p.bias_term:
        ins.append(g.const(layer.name + "/b", arrays[1].ravel()))
    out = g.node("Gemm", ins, layer.top[0], transB=0 if p.transpose else 1)
    want = g.shape[layer.top[0]]
    if len(want) != 2:     # axis > 1 keeps the leading axes apart in Caffe
        out = _reshape(g, out, layer.bottom[0], layer.top[0], layer.top[0] + "/shape")
    return [out]


@rule("BatchNorm")
def batch_norm(layer, inputs, g):
    p = layer.batch_norm_param
    if p.HasField("use_global_stats") and not p.use_global_stats:
        raise ExportError("layer %r (BatchNorm): use_global_stats false normalises by the batch's own "
                          "statistics; a deployed net uses the stored ones" % layer.name)
    mean, var, factor = g.blobs(layer, 3)[:3]
    f = float(factor.ravel()[0])
    f = 0.0 if f == 0 else 1.0 / f
    c = mean.size
    ins = [inputs[0], g.const(layer.name + "/gamma", np.ones(c)), g.const(layer.name + "/beta", np.zeros(c)),
           g.const(layer.name + "/mean", mean.ravel() * f), g.const(layer.name + "/var", var.ravel() * f)]
    return [g.node("BatchNormalization", ins, layer.top[0], epsilon=p.eps)]


@rule("Scale")
def scale(layer, inputs, g):
    p = layer.scale_param
    if len(layer.bottom) != 1 or p.num_axes != 1:
        raise ExportError("layer %r (Scale): only a learned per-channel scale (one bottom, num_axes 1) is "
                          "exported" % layer.name)
    arrays = g.blobs(layer, 2 if p.bias_term else 1)
    axis = p.axis % len(g.shape[layer.bottom[0]])
    out = g.node("Mul", [inputs[0], g.const(layer.name + "/gamma", _channel_shape(g, layer.bottom[0], axis,
                                                                                   arrays[0]))],
                 layer.top[0] + ("/mul" if p.bias_term else ""))
    if p.bias_term:
        out = g.node("Add", [out, g.const(layer.name + "/beta", _channel_shape(g, layer.bottom[0], axis,
                                                                                arrays[1]))], layer.top[0])
    return [out]


@rule("PReLU")
def prelu(layer, inputs, g):
    slope = g.blobs(layer, 1)[0].ravel()
    shaped = slope if layer.prelu_param.channel_shared else _channel_shape(g, layer.bottom[0], 1, slope)
    return [g.node("PRelu", [inputs[0], g.const(layer.name + "/slope", shaped)], layer.top[0])]


@rule("ReLU")
def relu(layer, inputs, g):
    slope = layer.relu_param.negative_slope
    if slope:
        return [g.node("LeakyRelu", inputs[:1], layer.top[0], alpha=slope)]
    return [g.node("Relu", inputs[:1], layer.top[0])]


@rule("Sigmoid", "TanH")
def elementwise(layer, inputs, g):
    return [g.node({"Sigmoid": "Sigmoid", "TanH": "Tanh"}[layer.type], inputs[:1], layer.top[0])]


@rule("Eltwise")
def eltwise(layer, inputs, g):
    p = layer.eltwise_param
    op = {0: "Mul", 1: "Sum", 2: "Max"}[p.operation]
    terms = list(inputs)
    if op == "Sum" and len(p.coeff) and any(c != 1 for c in p.coeff):
        terms = [t if c == 1 else g.node("Mul", [t, g.const("%s/coeff%d" % (layer.name, i), np.float32(c))],
                                         "%s/term%d" % (layer.name, i))
                 for i, (t, c) in enumerate(zip(inputs, p.coeff))]
    if op == "Mul":
        out = terms[0]
        for i, t in enumerate(terms[1:]):
            out = g.node("Mul", [out, t], layer.top[0] if i == len(terms) - 2 else "%s/prod%d" % (layer.name, i))
        return [out]
    return [g.node(op, terms, layer.top[0])]


def _caffe_pooled(size, k, s, p):
    """Caffe's pooled size: ceil division, less one when the last window would start in the padding."""
    out = int(np.ceil(float(size + 2 * p - k) / s)) + 1
    if p and (out - 1) * s >= size + p:
        out -= 1
    return out


@rule("Pooling")
def pooling(layer, inputs, g):
    p = layer.pooling_param
    if p.pool not in (0, 1):
        raise ExportError("layer %r (Pooling): only MAX and AVE pooling are exported" % layer.name)
    if p.global_pooling:
        return [g.node("GlobalMaxPool" if p.pool == 0 else "GlobalAveragePool", inputs[:1], layer.top[0])]
    kh, kw = _pair(p, "kernel_size", 0, "kernel")
    ph, pw = _pair(p, "pad", 0, "pad")
    sh, sw = _pair(p, "stride", 1, "stride")
    h, w = g.shape[layer.bottom[0]][2:]
    # Caffe rounds the output size up; ONNX's floor rule with extra end padding makes the same windows
    extra = [(_caffe_pooled(n, k, s, q) - 1) * s + k - (n + 2 * q) for n, k, s, q in
             ((h, kh, sh, ph), (w, kw, sw, pw))]
    extra = [max(e, 0) for e in extra]
    attrs = dict(kernel_shape=[kh, kw], strides=[sh, sw], pads=[ph, pw, ph + extra[0], pw + extra[1]])
    if p.pool == 0:
        return [g.node("MaxPool", inputs[:1], layer.top[0], **attrs)]
    if (ph or pw) and any(extra):
        raise ExportError("layer %r (Pooling AVE): padding %dx%d with windows past the padded edge divide "
                          "by a count ONNX's AveragePool has no setting for" % (layer.name, ph, pw))
    # Caffe divides by the window clipped to the padded input: the padding counts, nothing past it does
    return [g.node("AveragePool", inputs[:1], layer.top[0], count_include_pad=1 if (ph or pw) else 0,
                   **attrs)]


@rule("Concat")
def concat(layer, inputs, g):
    p = layer.concat_param
    axis = p.concat_dim if p.HasField("concat_dim") else p.axis
    return [g.node("Concat", inputs, layer.top[0], axis=axis)]


@rule("Slice")
def slice_(layer, inputs, g):
    from onnx import helper
    axis = layer.slice_param.axis % len(g.shape[layer.bottom[0]])
    sizes = [g.shape[t][axis] for t in layer.top]
    names = [g.name(t) for t in layer.top]
    g.nodes.append(helper.make_node("Split", [inputs[0], g.const(layer.name + "/split", sizes, np.int64)],
                                    names, name=layer.name, axis=axis))
    return names


def _reshape(g, x, bottom, top, name):
    """Reshape ``x`` to Caffe's shape of ``top``, the batch axis copied from the input (0) when kept."""
    want = list(g.shape[top])
    if want[0] == g.shape[bottom][0]:
        want[0] = 0
    return g.node("Reshape", [x, g.const(name + "/shape", want, np.int64)], name)


@rule("Flatten", "Reshape")
def reshape(layer, inputs, g):
    return [_reshape(g, inputs[0], layer.bottom[0], layer.top[0], layer.top[0])]


@rule("Softmax")
def softmax(layer, inputs, g):
    return [g.node("Softmax", inputs[:1], layer.top[0], axis=layer.softmax_param.axis)]


@rule("Power")
def power(layer, inputs, g):
    p, out = layer.power_param, inputs[0]
    if p.scale != 1:
        out = g.node("Mul", [out, g.const(layer.name + "/scale", np.float32(p.scale))], layer.name + "/scaled")
    if p.shift != 0:
        out = g.node("Add", [out, g.const(layer.name + "/shift", np.float32(p.shift))], layer.name + "/shifted")
    if p.power != 1:
        out = g.node("Pow", [out, g.const(layer.name + "/power", np.float32(p.power))], layer.name + "/pow")
    return [g.node("Identity", [out], layer.top[0])]


@rule("Dropout", "Split")
def passthrough(layer, inputs, g):
    """What Caffe computes at test time: the bottom itself (for Split: under every top)."""
    return [inputs[0]] * len(layer.top)


def preprocessing(net_path, rgb=False, crop="none"):
    """The metadata a deployment needs to feed the model as the toolkit feeds Caffe (base.images)."""
    from base.images import MEAN, SCALE
    return {"producer_tool": "sphereface-prune (python -m prune.export)", "caffe_prototxt": os.path.basename(
        net_path), "layout": "NCHW", "colour_order": "RGB" if rgb else "BGR",
        "normalisation": "(pixel - %g) * %g" % (MEAN, SCALE), "crop": crop}


def export(prototxt, caffemodel, metadata=None):
    """The ONNX ModelProto of a deploy net and its weights, checked by onnx.checker."""
    import onnx
    from onnx import helper
    from base.netinput import input_layer
    net = caffe_io.read_net(prototxt)
    data, shape = input_layer(net, prototxt)
    weights = caffe_io.read_weights(caffemodel)
    layers = [l for l in phase_view(net)[0] if l.type != "Input"]
    unknown = sorted({l.type for l in layers} - set(RULES))
    if unknown:
        first = next(l for l in layers if l.type in unknown)
        raise ExportError("%s: layer %r is a %s, which has no ONNX rule here (exported: %s)"
                          % (prototxt, first.name, first.type, ", ".join(sorted(RULES))))
    cnet = caffe_io.open_net(prototxt, caffemodel)
    g = Graph({name: tuple(b.data.shape) for name, b in cnet.blobs.items()}, weights)
    current = {data.top[0]: g.name(data.top[0])}
    for layer in layers:
        ins = [current[b] for b in layer.bottom]
        outs = RULES[layer.type](layer, ins, g)
        current.update(zip(layer.top, outs))
    outputs = list(cnet.outputs)
    final = [_named_output(g, b, current[b]) for b in outputs]
    graph = helper.make_graph(
        g.nodes, net.name or "net",
        [helper.make_tensor_value_info(data.top[0], onnx.TensorProto.FLOAT, ["N"] + list(shape[1:]))],
        [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, ["N"] + list(g.shape[b][1:]))
         for name, b in zip(final, outputs)],
        initializer=g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="sphereface-prune")
    model.ir_version = 8        # the IR of opset 13's time: older runtimes (OpenCV 4.x) read it
    helper.set_model_props(model, dict(metadata or {}, input=data.top[0]))
    onnx.checker.check_model(model, full_check=True)
    return model


def _named_output(g, blob, tensor):
    """The graph output under the Caffe blob's own name, so a deployment asks for "fc1" as it did in Caffe."""
    if tensor == blob:
        return blob
    if blob in g.used:     # an earlier tensor (before an in-place layer) holds the name: it gets another
        other = g.name(blob + "/pre")
        for n in g.nodes:
            n.input[:] = [other if i == blob else i for i in n.input]
            n.output[:] = [other if o == blob else o for o in n.output]
    else:
        g.used.add(blob)
    from onnx import helper
    g.nodes.append(helper.make_node("Identity", [tensor], [blob], name=blob + "/output"))
    return blob
