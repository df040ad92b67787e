"""Small nets for the graph and surgery tests, and helpers to run them in real Caffe."""
import os
from collections import OrderedDict

import numpy as np
import caffe
from caffe import layers as L, params as P

from base import caffe_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def concat_net():
    """Eltwise, Concat (with one part twice), BatchNorm+Scale on a concat, depthwise, Deconvolution."""
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 16, 16]))
    n.c1 = L.Convolution(n.data, num_output=8, kernel_size=3, pad=1)
    n.bn1 = L.BatchNorm(n.c1, in_place=True)
    n.sc1 = L.Scale(n.c1, bias_term=True, in_place=True)
    n.r1 = L.PReLU(n.c1, in_place=True)
    n.a = L.Convolution(n.c1, num_output=6, kernel_size=1)
    n.a2 = L.Convolution(n.c1, num_output=6, kernel_size=3, pad=1)
    n.s = L.Eltwise(n.a, n.a2)
    n.b = L.Convolution(n.c1, num_output=5, kernel_size=3, pad=1)
    n.rb = L.ReLU(n.b, in_place=True)
    n.cat = L.Concat(n.s, n.b)
    n.cat_bn = L.BatchNorm(n.cat)
    n.cat_sc = L.Scale(n.cat_bn, bias_term=True, in_place=True)
    n.dw = L.Convolution(n.cat_bn, num_output=11, kernel_size=3, pad=1, group=11)
    n.up = L.Deconvolution(n.dw, convolution_param=dict(num_output=4, kernel_size=2, stride=2))
    n.pool = L.Pooling(n.up, pool=P.Pooling.MAX, kernel_size=3, stride=2)
    n.cat2 = L.Concat(n.pool, n.pool)
    n.e = L.Convolution(n.cat2, num_output=3, kernel_size=3)
    n.gp = L.Pooling(n.e, pool=P.Pooling.AVE, global_pooling=True)
    n.fc = L.InnerProduct(n.gp, num_output=5)
    return n.to_proto()


def flatten_net():
    """Flatten and an explicit Reshape into InnerProducts, a 2-D Concat with BatchNorm, Eltwise of fcs."""
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 8, 6]))
    n.c1 = L.Convolution(n.data, num_output=6, kernel_size=3, pad=1)
    n.r1 = L.PReLU(n.c1, in_place=True)
    n.p1 = L.Pooling(n.c1, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    n.f = L.Flatten(n.p1)
    n.c2 = L.Convolution(n.data, num_output=5, kernel_size=3, stride=2, pad=1)
    n.r = L.Reshape(n.c2, shape=dict(dim=[0, 60]))
    n.cat = L.Concat(n.f, n.r)
    n.bn = L.BatchNorm(n.cat, in_place=True)
    n.sc = L.Scale(n.cat, bias_term=True, in_place=True)
    n.fc1 = L.InnerProduct(n.cat, num_output=10)
    n.fc3 = L.InnerProduct(n.c2, num_output=10)
    n.sum = L.Eltwise(n.fc1, n.fc3)
    n.relu = L.ReLU(n.sum, in_place=True)
    n.drop = L.Dropout(n.sum, in_place=True)
    n.fc2 = L.InnerProduct(n.sum, num_output=4)
    return n.to_proto()


def sphereface_path(depth):
    """The generated SphereFace deploy net (prototxt/sphereface<depth>_deploy.prototxt)."""
    return os.path.join(ROOT, "prototxt", "sphereface%d_deploy.prototxt" % depth)


def random_weights(proto_path, seed=0):
    """He-scaled random weights for every parameter blob Caffe creates for the net."""
    rng = np.random.default_rng(seed)
    cnet = caffe.Net(proto_path, caffe.TEST)
    types = dict(zip(cnet._layer_names, (layer.type for layer in cnet.layers)))
    weights = OrderedDict()
    for name, blobs in cnet.params.items():
        kind, arrays = types[name], []
        for i, b in enumerate(blobs):
            shape = b.data.shape
            if kind == "BatchNorm":
                a = [rng.normal(0, 0.1, shape), rng.uniform(0.5, 2, shape), np.ones(shape)][i]
            elif kind == "PReLU":
                a = rng.uniform(0.05, 0.4, shape)
            elif i == 0 and len(shape) >= 2:
                fan_in = np.prod(shape[1:]) if kind != "Deconvolution" else shape[0] * np.prod(shape[2:])
                a = rng.normal(0, np.sqrt(2.0 / fan_in), shape)
            else:
                a = rng.normal(1 if kind == "Scale" and i == 0 else 0, 0.1, shape)
            arrays.append(np.asarray(a, dtype=np.float32))
        weights[name] = arrays
    return weights


def caffe_forward(proto_path, weights, x):
    """{output blob: array} of the TEST-phase net for input batch x (fed to the first Input)."""
    cnet = caffe.Net(proto_path, caffe.TEST)
    if isinstance(weights, str):
        cnet.copy_from(weights)
    else:
        caffe_io.load_into(cnet, OrderedDict((k, list(v)) for k, v in weights.items()))
    name = cnet.inputs[0]
    cnet.blobs[name].reshape(*x.shape)
    cnet.reshape()
    out = cnet.forward(**{name: x.astype(np.float32)})
    return {k: v.copy() for k, v in out.items()}


def opencv_forward(proto_path, model_path, x, fusion=False):
    """The last layer's output in OpenCV's DNN module, an independent Caffe runtime."""
    import cv2
    net = cv2.dnn.readNetFromCaffe(proto_path, model_path)
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    net.enableFusion(fusion)
    net.setInput(x.astype(np.float32))
    return net.forward()


def rel_err(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def half_pruned(proto, folder, seed=0):
    """((prototxt, caffemodel) with random weights, (pruned prototxt, caffemodel)): every prunable group of
    ``proto`` keeps its first half, written into ``folder`` by prune.surgery."""
    from prune.graph import build_graph
    from prune.surgery import prune_net, save_pruned
    net, weights = caffe_io.read_net(proto), random_weights(proto, seed=seed)
    model = caffe_io.write_weights(net, weights, os.path.join(str(folder), "net.caffemodel"))
    graph = build_graph(net)
    plan = {g.id: np.arange(g.channels // 2) for g in graph.prunable()}
    pruned = save_pruned(*prune_net(net, weights, plan, graph=graph), os.path.join(str(folder), "pruned.prototxt"),
                         os.path.join(str(folder), "pruned.caffemodel"), inputs=(proto, model))
    return (proto, model), pruned
