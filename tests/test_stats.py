"""prune.stats: params and MACs from Caffe's own blob shapes."""
import json
import subprocess
import sys

import numpy as np
import pytest
import caffe
from caffe import layers as L

from conftest import ROOT, shared_path
from base import caffe_io
from base.caffe_io import CaffeFileError
from prune.stats import fmt_macs, fmt_params, net_stats
from prototxt.sphereface import committed_path, sphereface

PUBLISHED = {4: ("12.56M", "0.164G"), 10: ("15.22M", "0.759G"), 20: ("22.67M", "1.750G")}


@pytest.mark.parametrize("depth", sorted(PUBLISHED))
@pytest.mark.parametrize("variant", ["deploy", "train"])
def test_published_sphereface_sizes(depth, variant):
    stats = net_stats(committed_path(depth, variant))
    assert (fmt_params(stats.params), fmt_macs(stats.macs)) == PUBLISHED[depth]
    if variant == "train":  # the A-Softmax head reads the label: left out on its own
        assert stats.excluded == [("fc6", "reads the label"), ("softmax_loss", "loss layer")]
        assert stats.inputs == {"data": (3, 112, 96), "label": ()}
    else:
        assert stats.excluded == [] and stats.inputs == {"data": (3, 112, 96)}


def test_counts_by_hand_group_deconv_innerproduct(tmp_path):
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[5, 4, 10, 8]))  # batch 5: numbers are still per image
    n.conv = L.Convolution(n.data, num_output=6, kernel_size=3, stride=2, pad=1, group=2)
    n.dw = L.Convolution(n.conv, num_output=6, kernel_size=3, pad=1, group=6, bias_term=False)
    n.bn = L.BatchNorm(n.dw, in_place=True)
    n.sc = L.Scale(n.dw, bias_term=True, in_place=True)
    n.up = L.Deconvolution(n.dw, convolution_param=dict(num_output=2, kernel_size=2, stride=2))
    n.sum = L.Eltwise(n.up, n.up)
    n.ip = L.InnerProduct(n.sum, num_output=3)
    n.seq = L.InnerProduct(n.up, num_output=7, axis=2)  # 2 rows of 10x8 per image
    stats = net_stats(caffe_io.write_net(n.to_proto(), str(tmp_path / "t.prototxt")))
    got = {r.name: (r.shape, r.params, r.macs) for r in stats.layers}
    assert got == {
        "data": ((4, 10, 8), 0, 0),
        "conv": ((6, 5, 4), 6 * 2 * 9 + 6, 6 * 2 * 9 * 5 * 4),
        "dw": ((6, 5, 4), 6 * 9, 6 * 9 * 5 * 4),
        "bn": ((6, 5, 4), 6 + 6 + 1, 0),
        "sc": ((6, 5, 4), 6 + 6, 0),
        "up": ((2, 10, 8), 6 * 2 * 4 + 2, 6 * 2 * 4 * 5 * 4),
        "sum": ((2, 10, 8), 0, 0),
        "ip": ((3,), 160 * 3 + 3, 160 * 3),
        "seq": ((2, 7), 80 * 7 + 7, 80 * 7 * 2),
    }
    assert stats.params == sum(v[1] for v in got.values()) and stats.macs == sum(v[2] for v in got.values())


def test_exclude_and_what_depends_on_it(tmp_path):
    full = net_stats(committed_path(10, "deploy"))
    no_fc5 = net_stats(committed_path(10, "deploy"), exclude=["fc5"])
    fc5 = next(r for r in full.layers if r.name == "fc5")
    assert (full.params - no_fc5.params, full.macs - no_fc5.macs) == (fc5.params, fc5.macs) == \
        (512 * 512 * 42 + 512, 512 * 512 * 42)
    # Leaving out a stream conv takes everything downstream with it; an in-place PReLU takes nothing else.
    cut = net_stats(committed_path(10, "deploy"), exclude=["conv4_1", "relu1_1"])
    assert [r.name for r in cut.layers][-2:] == ["relu3_5", "res3_5"]
    assert [e for e in cut.excluded if e[1] == "--exclude"] == [("relu1_1", "--exclude"), ("conv4_1", "--exclude")]
    assert ("fc5", "depends on an excluded layer") in cut.excluded
    with pytest.raises(CaffeFileError, match="no layer named fc7"):
        net_stats(committed_path(10, "deploy"), exclude=["fc7"])


def test_weights_are_checked(tmp_path):
    small = dict(widths=(8, 128, 16, 16), embedding=32)  # small files, fast to write and read
    proto = caffe_io.write_net(sphereface(4, **small), str(tmp_path / "sf4.prototxt"))
    net = caffe.Net(proto, caffe.TEST)
    good = str(tmp_path / "sf4.caffemodel")
    net.save(good)
    assert net_stats(proto, weights=good).weights == dict(file=good, layers=9, unused=[])

    weights = caffe_io.read_weights(good)
    weights["conv2_1"][0] = np.zeros((100, 8, 3, 3), np.float32)
    wrong = caffe_io.write_weights(caffe_io.read_net(proto), weights, str(tmp_path / "wrong.caffemodel"))
    with pytest.raises(CaffeFileError, match=r"'conv2_1' blob 0 has shape \(100, 8, 3, 3\), the net expects "
                                             r"\(128, 8, 3, 3\)"):
        net_stats(proto, weights=wrong)
    del weights["fc5"]
    weights["conv2_1"][0] = np.zeros((128, 8, 3, 3), np.float32)
    missing = caffe_io.write_weights(caffe_io.read_net(proto), weights, str(tmp_path / "missing.caffemodel"))
    with pytest.raises(CaffeFileError, match="no weights for layer fc5"):
        net_stats(proto, weights=missing)
    # A train caffemodel (with fc6) fits the deploy net; fc6 is reported unused.
    weights["fc5"] = [np.zeros((32, 16 * 42), np.float32), np.zeros(32, np.float32)]
    weights["fc6"] = [np.zeros((10, 32), np.float32)]
    trained = caffe_io.write_weights(sphereface(4, "train", num_classes=10, **small), weights,
                                     str(tmp_path / "t.caffemodel"))
    assert net_stats(proto, weights=trained).weights["unused"] == ["fc6"]


def test_nets_caffe_cannot_build_are_refused_by_name(tmp_path):
    net = sphereface(4)
    net.layer.add(name="head", type="Mystery", bottom=["fc5"], top=["head"])
    with pytest.raises(CaffeFileError, match="layer 'head' has type 'Mystery'"):
        net_stats(net)
    assert net_stats(net, exclude=["head"]).params == net_stats(sphereface(4)).params

    # the SphereFace fork's train net (MarginInnerProduct, margin_inner_product_param): read through the
    # superset schema; its fc6 reads the label and is left out like the Python A-Softmax
    native = caffe_io.write_net(sphereface(4, "train", asoftmax="native"), str(tmp_path / "native.prototxt"))
    stats = net_stats(native)
    assert ("fc6", "reads the label") in stats.excluded
    assert stats.params == net_stats(sphereface(4, "train")).params == net_stats(sphereface(4)).params

    unsized = sphereface(4, "train")
    unsized.layer[0].image_data_param.ClearField("new_height")
    with pytest.raises(CaffeFileError, match="layer 'data' \\(ImageData\\) has no fixed output size"):
        net_stats(unsized)
    lmdb = sphereface(4, "train")
    lmdb.layer[0].type = "Data"
    with pytest.raises(CaffeFileError, match="layer 'data' \\(Data\\) is a data layer whose output shape comes from its data"):
        net_stats(lmdb)


def test_real_mobilefacenet():
    proto = shared_path("models", "mobilefacenet", "mobilefacenet-v0.prototxt")
    weights = shared_path("models", "mobilefacenet", "mobilefacenet-v0.caffemodel")
    stats = net_stats(proto, weights=weights)
    assert stats.inputs == {"data": (3, 112, 112)}
    assert (stats.params, stats.macs) == (999_859, 220_940_288)  # published: 0.99M params, 221M MAdds
    bn = sum(r.params for r in stats.layers if r.type == "BatchNorm")
    assert stats.params - bn == 979_200  # without BatchNorm statistics
    dw = next(r for r in stats.layers if r.name == "conv_2_dw_conv2d")
    assert (dw.params, dw.macs) == (64 * 9, 64 * 9 * 56 * 56)
    assert stats.weights["unused"] == [] and stats.weights["layers"] > 100


def test_command_line(tmp_path):
    run = subprocess.run([sys.executable, "-m", "prune.stats", committed_path(20, "train"), "--json"],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["total"] == dict(params=22_670_656, macs=1_749_737_472)
    assert "not 2xMACs" in out["convention"]
    assert [e["layer"] for e in out["excluded"]] == ["fc6", "softmax_loss"]
    assert out["layers"][1] == dict(name="conv1_1", type="Convolution", shape=[64, 56, 48], params=1792,
                                    macs=64 * 27 * 56 * 48)

    text = subprocess.run([sys.executable, "-m", "prune.stats", committed_path(4, "deploy")], cwd=ROOT,
                          capture_output=True, text=True).stdout
    assert "total: 12.56M params (12,562,496), 0.164G MACs (164,290,560) per image" in text

    bad = tmp_path / "bad.prototxt"
    bad.write_text('name: "x"\nlayer {\n  name: "a"\n  tpye: "Input"\n}\n')
    run = subprocess.run([sys.executable, "-m", "prune.stats", str(bad)], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2 and "bad.prototxt:4:" in run.stderr and "Traceback" not in run.stderr
