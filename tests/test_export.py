"""ONNX export (prune.export): every layer type the toolkit prunes, on small nets, run in ONNX Runtime and OpenVINO
against Caffe; the command's refusals (a layer with no exact ONNX form, an output over an input)."""
import os

import caffe
import numpy as np
import onnx
import pytest
from caffe import layers as L, params as P

from base import caffe_io
from nets import half_pruned, random_weights, rel_err, sphereface_path
import runtimes
from runtimes.onnx_export import export
from prune.export import main as export_main


def every_layer_net():
    """One of each exported layer type, joined into a single output so that every one of them counts."""
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 20, 18]))
    n.c1 = L.Convolution(n.data, num_output=8, kernel_h=3, kernel_w=5, stride=2, pad_h=1, pad_w=2)
    n.bn = L.BatchNorm(n.c1, in_place=True)
    n.sc = L.Scale(n.c1, bias_term=True, in_place=True)
    n.pr = L.PReLU(n.c1, in_place=True)
    n.dw = L.Convolution(n.c1, num_output=8, kernel_size=3, pad=2, dilation=2, group=8)
    n.shared = L.PReLU(n.dw, prelu_param=dict(channel_shared=True))
    n.g2 = L.Convolution(n.shared, num_output=8, kernel_size=1, group=2, bias_term=False)
    n.leaky = L.ReLU(n.g2, negative_slope=0.1)
    n.sum = L.Eltwise(n.c1, n.leaky, coeff=[0.5, -2.0])
    n.prod = L.Eltwise(n.sum, n.shared, operation=P.Eltwise.PROD)
    n.max = L.Eltwise(n.prod, n.c1, operation=P.Eltwise.MAX)
    n.a, n.b = L.Slice(n.max, slice_point=[3], ntop=2)
    n.sig = L.Sigmoid(n.a)
    n.tanh = L.TanH(n.b)
    n.cat = L.Concat(n.tanh, n.sig)
    n.mp = L.Pooling(n.cat, pool=P.Pooling.MAX, kernel_size=3, stride=2)      # Caffe's ceil: 10x9 -> 5x4
    n.ap = L.Pooling(n.mp, pool=P.Pooling.AVE, kernel_size=3, stride=1, pad=1)
    n.relu = L.ReLU(n.ap, in_place=True)
    n.drop = L.Dropout(n.ap, dropout_ratio=0.5, in_place=True)
    n.pw = L.Power(n.ap, power=2, scale=0.5, shift=1)
    n.flat = L.Flatten(n.pw)
    n.fc = L.InnerProduct(n.flat, num_output=10)
    n.r = L.Reshape(n.fc, shape=dict(dim=[0, 2, 5]))
    n.sm = L.Softmax(n.r, axis=2)
    n.smflat = L.Flatten(n.sm)
    n.gap = L.Pooling(n.cat, pool=P.Pooling.AVE, global_pooling=True)
    n.gmax = L.Pooling(n.cat, pool=P.Pooling.MAX, global_pooling=True)
    n.fc2 = L.InnerProduct(n.gap, num_output=10)          # a 4-D bottom, flattened by InnerProduct itself
    n.fc3 = L.InnerProduct(n.gmax, num_output=10, bias_term=False)
    n.emb = L.Eltwise(n.smflat, n.fc2, n.fc3)
    return n.to_proto()


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    proto = caffe_io.write_net(every_layer_net(), str(folder / "net.prototxt"))
    weights = random_weights(proto, seed=5)
    weights["bn"][2][...] = 2.0            # Caffe stores the statistics times a factor the export divides out
    return proto, caffe_io.write_weights(caffe_io.read_net(proto), weights, str(folder / "net.caffemodel"))


def caffe_out(proto, model, x):
    s = runtimes.CaffeSession(proto, model)
    return s.run(x)


@pytest.mark.parametrize("kind", runtimes.ONNX_KINDS)
def test_every_layer_type_runs_as_in_caffe(net, kind, tmp_path):
    if runtimes.missing(kind):
        pytest.skip(runtimes.missing(kind))
    proto, model = net
    m = export(proto, model)
    onnx.checker.check_model(m, full_check=True)
    assert [o.name for o in m.graph.output] == ["emb"] and [i.name for i in m.graph.input] == ["data"]
    assert {n.op_type for n in m.graph.node} >= {
        "Conv", "BatchNormalization", "Mul", "Add", "PRelu", "LeakyRelu", "Relu", "Sum", "Max", "Split",
        "Sigmoid", "Tanh", "Concat", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Pow",
        "Reshape", "Gemm", "Softmax", "Flatten"}
    path = str(tmp_path / "net.onnx")
    open(path, "wb").write(m.SerializeToString())
    session = runtimes.ONNXRuntimeSession(path) if kind == "onnxruntime" else runtimes.OpenVINOSession(path)
    for batch in (1, 3):        # the batch axis is free
        x = np.random.default_rng(batch).uniform(-1, 1, (batch, 3, 20, 18)).astype(np.float32)
        ref = caffe_out(proto, model, x)
        assert rel_err(np.asarray(session.run(x)).reshape(ref.shape), ref) < 1e-4


def test_a_pruned_sphereface20_exports_exactly(tmp_path):
    _, pruned = half_pruned(sphereface_path(20), tmp_path, seed=1)
    out = str(tmp_path / "pruned.onnx")
    assert export_main([*pruned, "-o", out]) == 0
    m = onnx.load(out)
    meta = {p.key: p.value for p in m.metadata_props}
    assert meta["input"] == "data" and meta["colour_order"] == "BGR" and meta["layout"] == "NCHW"
    assert "127.5" in meta["normalisation"]
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 112, 96)).astype(np.float32)
    ref = caffe_out(*pruned, x)
    for kind in runtimes.ONNX_KINDS:
        if runtimes.missing(kind) is None:
            s = runtimes.ONNXRuntimeSession(out) if kind == "onnxruntime" else runtimes.OpenVINOSession(out)
            assert rel_err(np.asarray(s.run(x)).reshape(ref.shape), ref) < 1e-4, kind


def test_a_layer_without_an_exact_onnx_form_is_refused_in_one_line(net, tmp_path, capsys):
    proto, model = net
    text = open(proto).read()
    lrn = text + ('layer { name: "norm" type: "LRN" bottom: "emb" top: "norm" }\n')
    bad = str(tmp_path / "lrn.prototxt")
    open(bad, "w").write(lrn)
    out = str(tmp_path / "out.onnx")
    assert export_main([bad, model, "-o", out]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'norm' is a LRN" in err and bad in err
    assert not os.path.exists(out)
    # average pooling whose windows run past the padded edge: Caffe's divisor has no ONNX setting
    pad = text.replace("kernel_size: 3\n    stride: 1\n    pad: 1", "kernel_size: 3\n    stride: 2\n    pad: 1")
    assert pad != text
    open(bad, "w").write(pad)
    fits = caffe_io.write_weights(caffe_io.read_net(bad), random_weights(bad), str(tmp_path / "pad.caffemodel"))
    assert export_main([bad, fits, "-o", out]) == 2
    err = capsys.readouterr().err
    assert "layer 'ap' (Pooling AVE)" in err and not os.path.exists(out)


def test_export_never_writes_over_its_inputs_or_into_a_missing_folder(net, capsys):
    proto, model = net
    before = open(model, "rb").read()
    assert export_main([proto, model, "-o", model]) == 2
    assert "caffemodel" in capsys.readouterr().err and open(model, "rb").read() == before
    assert export_main([proto, model, "-o", "/nonexistent/folder/net.onnx"]) == 2
    assert "--out" in capsys.readouterr().err
