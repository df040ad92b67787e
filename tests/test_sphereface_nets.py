"""The SphereFace generator: official names and shapes, the committed files, train variants, real Caffe."""
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import caffe
from caffe import layers as L, params as P
from google.protobuf import text_format

from conftest import ROOT
from base import caffe_io, netcheck
from base.proto import caffe_pb2
from finetune.trainnet import fork_net_class
from prototxt import NetSpecError
from prototxt.sphereface import UNITS, committed_path, sphereface


def convs(net):
    return [layer for layer in net.layer if layer.type == "Convolution"]


def write(net, tmp_path, name="net.prototxt"):
    return caffe_io.write_net(net, str(tmp_path / name))


@pytest.mark.parametrize("depth", sorted(UNITS))
@pytest.mark.parametrize("variant", ["deploy", "train"])
def test_committed_file_is_what_the_generator_writes(depth, variant):
    with open(committed_path(depth, variant)) as f:
        assert f.read() == caffe_io.net_to_text(sphereface(depth, variant)), "run `python -m prototxt`"


@pytest.mark.parametrize("depth", sorted(UNITS))
def test_layout_fillers_and_multipliers(depth):
    net = caffe_io.read_net(committed_path(depth, "deploy"))
    assert len(convs(net)) == depth  # SphereFace-N has N conv layers
    layers = {layer.name: layer for layer in net.layer}
    for conv in convs(net):
        stage, index = map(int, conv.name[4:].split("_"))
        cp = conv.convolution_param
        assert (list(cp.kernel_size), list(cp.pad)) == ([3], [1])
        assert cp.num_output == 64 * 2 ** (stage - 1)
        if index == 1:
            assert (list(cp.stride), cp.weight_filler.type) == ([2], "xavier")
            assert [(p.lr_mult, p.decay_mult) for p in conv.param] == [(1, 1), (2, 0)]
        else:
            assert (list(cp.stride), cp.weight_filler.type, cp.weight_filler.std) == ([1], "gaussian", pytest.approx(0.01))
            assert [(p.lr_mult, p.decay_mult) for p in conv.param] == [(1, 1), (0, 0)]
        relu = layers["relu%d_%d" % (stage, index)]
        assert (relu.type, list(relu.bottom), list(relu.top)) == ("PReLU", [conv.name], [conv.name])
    for stage, n_units in enumerate(UNITS[depth], start=1):
        for k in range(1, n_units + 1):
            res = layers["res%d_%d" % (stage, 2 * k + 1)]
            unit_input = "conv%d_1" % stage if k == 1 else "res%d_%d" % (stage, 2 * k - 1)
            assert list(res.bottom) == [unit_input, "conv%d_%d" % (stage, 2 * k + 1)]
            assert res.eltwise_param.operation == res.eltwise_param.SUM
    assert sum(layer.type == "Eltwise" for layer in net.layer) == sum(UNITS[depth])
    assert not any(layer.type in ("BatchNorm", "Pooling") for layer in net.layer)

    caffe_net = caffe.Net(committed_path(depth, "deploy"), caffe.TEST)
    assert caffe_net.blobs["data"].data.shape == (1, 3, 112, 96)
    assert caffe_net.blobs["res4_%d" % (2 * UNITS[depth][3] + 1) if UNITS[depth][3] else "conv4_1"].data.shape \
        == (1, 512, 7, 6)
    assert caffe_net.blobs["fc5"].data.shape == (1, 512)
    assert list(caffe_net.outputs) == ["fc5"]


def official_sphereface20(num_classes):
    """SphereFace-20 written from BRIEF.md's description of the release, independently of the generator.

    fc6 is a plain InnerProduct stand-in (BVLC Caffe has no MarginInnerProduct):
    an official caffemodel carries fc6 too, and a deploy net must ignore it.
    """
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 3, 112, 96]))
    x = n.data
    for stage, (units, width) in enumerate(zip((1, 2, 4, 1), (64, 128, 256, 512)), start=1):
        def conv_prelu(bottom, index):
            setattr(n, "conv%d_%d" % (stage, index),
                    L.Convolution(bottom, num_output=width, kernel_size=3, pad=1, stride=2 if index == 1 else 1))
            setattr(n, "relu%d_%d" % (stage, index), L.PReLU(getattr(n, "conv%d_%d" % (stage, index)), in_place=True))
            return getattr(n, "relu%d_%d" % (stage, index))
        x = conv_prelu(x, 1)
        for k in range(1, units + 1):
            y = conv_prelu(conv_prelu(x, 2 * k), 2 * k + 1)
            setattr(n, "res%d_%d" % (stage, 2 * k + 1), L.Eltwise(x, y, operation=P.Eltwise.SUM))
            x = getattr(n, "res%d_%d" % (stage, 2 * k + 1))
    n.fc5 = L.InnerProduct(x, num_output=512)
    n.fc6 = L.InnerProduct(n.fc5, num_output=num_classes)
    return n.to_proto()


def randomised(proto, weights, rng):
    """A caffe.Net of ``proto`` with small random weights, saved to ``weights``."""
    net = caffe.Net(proto, caffe.TEST)
    for blobs in net.params.values():
        for b in blobs:
            b.data[...] = rng.standard_normal(b.data.shape).astype(np.float32) * 0.05
    net.save(weights)
    return net, weights


def test_official_sphereface20_weights_load_by_name(tmp_path):
    ref_path = write(official_sphereface20(num_classes=10), tmp_path, "official.prototxt")
    rng = np.random.default_rng(0)
    ref, weights = randomised(ref_path, str(tmp_path / "official.caffemodel"), rng)

    ours = caffe.Net(committed_path(20, "deploy"), weights, caffe.TEST)
    assert set(ours.params) == set(ref.params) - {"fc6"}
    for name, blobs in ours.params.items():
        assert len(blobs) == len(ref.params[name])
        for mine, theirs in zip(blobs, ref.params[name]):
            np.testing.assert_array_equal(mine.data, theirs.data, err_msg=name)

    # Same weights, same topology: the same embedding.
    x = rng.standard_normal((1, 3, 112, 96)).astype(np.float32)
    ours.blobs["data"].data[...] = x
    ref.blobs["data"].reshape(1, 3, 112, 96)
    ref.blobs["data"].data[...] = x
    ref.reshape()
    np.testing.assert_allclose(ours.forward()["fc5"], ref.forward(end="fc5")["fc5"], rtol=1e-5, atol=1e-6)


def image_list(tmp_path, n=2):
    """A list of n flat 112x96 images (value 255) for ImageData; labels 0..n-1."""
    lines = []
    for i in range(n):
        cv2.imwrite(str(tmp_path / ("face%d.png" % i)), np.full((112, 96, 3), 255, np.uint8))
        lines.append("face%d.png %d\n" % (i, i))
    (tmp_path / "list.txt").write_text("".join(lines))
    return str(tmp_path / "list.txt")


def test_train_input_transform_in_caffe(tmp_path):
    net = sphereface(4, "train", source=image_list(tmp_path), root_folder=str(tmp_path), batch_size=2)
    data = net.layer[0]
    assert (data.type, list(data.top)) == ("ImageData", ["data", "label"])
    assert list(data.transform_param.mean_value) == [127.5] * 3 and data.transform_param.mirror
    assert [layer.name for layer in net.layer[-2:]] == ["fc6", "softmax_loss"]
    del net.layer[-2:]  # the A-Softmax head is tested below
    caffe_net = caffe.Net(write(net, tmp_path), caffe.TRAIN)
    caffe_net.forward()
    assert caffe_net.blobs["data"].data.shape == (2, 3, 112, 96)
    np.testing.assert_array_equal(caffe_net.blobs["data"].data, (255 - 127.5) * 0.0078125)
    assert sorted(caffe_net.blobs["label"].data.tolist()) == [0, 1]


def test_train_python_asoftmax(tmp_path):
    net = sphereface(10, "train", num_classes=7, m=2)
    fc6 = caffe_io.read_net(write(net, tmp_path)).layer[-2]
    assert (fc6.name, fc6.type, list(fc6.bottom), list(fc6.top)) == ("fc6", "Python", ["fc5", "label"], ["fc6", "lambda"])
    assert (fc6.python_param.module, fc6.python_param.layer) == ("finetune.asoftmax", "MarginInnerProduct")
    assert json.loads(fc6.python_param.param_str) == dict(num_output=7, m=2, base=1000, gamma=0.12, power=1,
                                                          lambda_min=5, iteration=0, seed=0)
    if not os.path.exists(os.path.join(ROOT, "finetune", "asoftmax.py")):
        pytest.skip("finetune/asoftmax.py (the A-Softmax Python layer) is not there yet")
    net = sphereface(4, "train", source=image_list(tmp_path), root_folder=str(tmp_path), batch_size=2,
                     num_classes=2)
    caffe_net = caffe.Net(write(net, tmp_path, "train.prototxt"), caffe.TRAIN)
    assert [b.data.shape for b in caffe_net.params["fc6"]] == [(2, 512)]
    out = caffe_net.forward()
    assert np.isfinite(out["softmax_loss"]) and out["softmax_loss"] > 0
    assert out["lambda"].shape == (1,) and out["lambda"][0] >= 5  # lambda_min


def test_native_asoftmax_is_the_forks_text(tmp_path):
    net = sphereface(20, "train", asoftmax="native", num_classes=10572)
    path = write(net, tmp_path)
    text = open(path).read()
    # The fork's own text, field for field; BVLC's parser must refuse it (no such field there).
    fc6 = text_format.Parse(text, fork_net_class()()).layer[-2]
    assert (fc6.type, list(fc6.bottom), list(fc6.top)) == ("MarginInnerProduct", ["fc5", "label"], ["fc6", "lambda"])
    assert [(p.lr_mult, p.decay_mult) for p in fc6.param] == [(1, 1)]
    mp = fc6.margin_inner_product_param
    assert text_format.MessageToString(mp, as_one_line=True) == (
        'num_output: 10572 type: QUADRUPLE weight_filler { type: "xavier" } base: 1000.0 gamma: 0.12 power: 1.0 '
        'iteration: 0 lambda_min: 5.0')
    # The toolkit reads it (base/caffe_superset.proto) and writes it back unchanged; Caffe's own checks name
    # the fork's field, which BVLC's parser refuses.
    read = caffe_io.read_net(path)
    assert text_format.MessageToString(read.layer[-2].margin_inner_product_param, as_one_line=True) == \
        text_format.MessageToString(mp, as_one_line=True)
    assert caffe_io.net_to_text(read) == text
    with pytest.raises(caffe_io.CaffeFileError, match=r"layer 'fc6' \(MarginInnerProduct\) sets "
                                                      r"margin_inner_product_param, a field of SphereFace's Caffe"):
        netcheck.check_net(read, path, caffe_pb2.TRAIN)
    # Everything but fc6 is the Python-variant net.
    python = sphereface(20, "train", asoftmax="python")
    assert [layer.SerializeToString() for i, layer in enumerate(net.layer) if layer.name != "fc6"] == \
        [layer.SerializeToString() for layer in python.layer if layer.name != "fc6"]


def test_batchnorm_option(tmp_path):
    net = sphereface(10, "deploy", bn=True)
    names = [layer.name for layer in net.layer]
    for conv in convs(net):
        i = names.index(conv.name)
        suffix = conv.name[4:]
        assert names[i + 1:i + 4] == ["bn" + suffix, "scale" + suffix, "relu" + suffix]
        assert not conv.convolution_param.bias_term and len(conv.param) == 1
    caffe_net = caffe.Net(write(net, tmp_path), caffe.TEST)
    assert [b.data.shape for b in caffe_net.params["bn2_3"]] == [(128,), (128,), (1,)]
    assert [b.data.shape for b in caffe_net.params["scale2_3"]] == [(128,), (128,)]
    assert caffe_net.forward()["fc5"].shape == (1, 512)


def test_widths_inner_widths_and_embedding(tmp_path):
    net = sphereface(20, widths=(16, 32, 48, 64), embedding=128, inner={"conv3_4": 20, "conv1_2": 5})
    caffe_net = caffe.Net(write(net, tmp_path), caffe.TEST)
    shape = {name: blobs[0].data.shape for name, blobs in caffe_net.params.items()}
    assert shape["conv1_2"] == (5, 16, 3, 3) and shape["conv1_3"] == (16, 5, 3, 3)
    assert shape["conv3_4"] == (20, 48, 3, 3) and shape["conv3_5"] == (48, 20, 3, 3)
    assert shape["conv3_6"] == (48, 48, 3, 3)
    assert shape["fc5"] == (128, 64 * 7 * 6)


def test_bad_arguments_are_named():
    with pytest.raises(NetSpecError, match="depth must be one of"):
        sphereface(18)
    with pytest.raises(NetSpecError, match="conv3_1"):
        sphereface(20, inner={"conv3_1": 10})  # a stream conv, not a unit-inner one
    with pytest.raises(NetSpecError, match="conv2_2"):
        sphereface(4, inner={"conv2_2": 10})  # SphereFace-4 has no residual units
    with pytest.raises(NetSpecError, match="four positive stage widths"):
        sphereface(20, widths=(64, 128, 256))
    with pytest.raises(NetSpecError, match="margin"):
        sphereface(20, "train", m=5)


def test_command_line(tmp_path):
    out = tmp_path / "sf10.prototxt"
    run = subprocess.run([sys.executable, "-m", "prototxt.sphereface", "--depth", "10", "--variant", "train",
                          "--asoftmax", "native", "--num-classes", "100", "--batch-size", "64", "-o", str(out)],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    net = text_format.Parse(out.read_text(), fork_net_class()())
    assert len(convs(net)) == 10
    assert net.layer[0].image_data_param.batch_size == 64
    assert net.layer[-2].margin_inner_product_param.num_output == 100

    bad = subprocess.run([sys.executable, "-m", "prototxt.sphereface", "--depth", "18"], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_deploy_net_runs_in_opencv_dnn(tmp_path):
    """A second Caffe runtime reads the generated deploy net and computes Caffe's embedding."""
    proto = committed_path(10, "deploy")
    rng = np.random.default_rng(1)
    net, weights = randomised(proto, str(tmp_path / "sf10.caffemodel"), rng)
    x = rng.standard_normal((1, 3, 112, 96)).astype(np.float32)
    net.blobs["data"].data[...] = x
    expected = net.forward()["fc5"]

    cv_net = cv2.dnn.readNetFromCaffe(proto, weights)
    cv_net.enableFusion(False)
    cv_net.setInput(x)
    np.testing.assert_allclose(cv_net.forward("fc5"), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
