"""Nets of Caffe forks: their prototxts and caffemodels read and written back unchanged, their layers fixed
points of the channel graph, their depthwise types pruned, Slice both ways; checked in Caffe and OpenCV.

Every net here is small and written in this file.  Exactness as in tests/test_surgery.py: the pruned net
computes what the original computes with its consumers' weights for the removed channels zeroed -- in
OpenCV's DNN module where it runs the fork's layers, and in Caffe on the part of the net Caffe can run
(base.netcheck.runnable_view).
"""
import copy
import json
import os
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pytest
from google.protobuf.internal.encoder import _VarintBytes as _varint
import caffe
from caffe import layers as L, params as P
from google.protobuf import descriptor, text_format

from conftest import ROOT
from base import caffe_io, forks, netcheck
from base.caffe_io import CaffeFileError
from base.proto import caffe_pb2, stock, superset
from prune import groups
from prune.graph import build_graph
from prune.stats import net_stats
from prune.surgery import prune_net, save_pruned
from test_surgery import check_exact, random_keep, zero_removed_inputs
import nets

INPUT = 'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: %d dim: %d } } }\n'


def write_text(tmp_path, text, name="net.prototxt"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def random_weights(net, graph, seed=0):
    """He-scaled random weights for every layer whose parameter shapes the graph infers, and SSD's Normalize
    scale; built without Caffe, which cannot build these nets."""
    rng = np.random.default_rng(seed)
    weights = OrderedDict()
    for layer in net.layer:
        shapes = graph.param_shapes.get(layer.name)
        if layer.type == "Normalize":
            shapes = [(graph.shapes[layer.bottom[0]][1],)]
        if not shapes:
            continue
        arrays = []
        for i, shape in enumerate(shapes):
            if layer.type == "BatchNorm":
                a = [rng.normal(0, 0.1, shape), rng.uniform(0.5, 2, shape), np.ones(shape)][i]
            elif layer.type in ("PReLU", "Normalize"):
                a = rng.uniform(0.05, 0.4, shape) * (50 if layer.type == "Normalize" else 1)
            elif i == 0 and len(shape) >= 2:
                a = rng.normal(0, np.sqrt(2.0 / np.prod(shape[1:])), shape)
            else:
                a = rng.normal(1 if layer.type == "Scale" and i == 0 else 0, 0.1, shape)
            arrays.append(np.asarray(a, dtype=np.float32))
        weights[layer.name] = arrays
    return weights


def opencv_outputs(proto, model, x, names):
    import cv2
    net = cv2.dnn.readNetFromCaffe(proto, model)
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    net.enableFusion(False)
    net.setInput(x.astype(np.float32))
    return dict(zip(names, net.forward(names)))


def prune_fork_net(tmp_path, proto, seed=0):
    """Random pruning of every prunable group, saved (checked in Caffe on the part it runs) and the reference
    weights (original, removed inputs zeroed) written beside it."""
    net = caffe_io.read_net(proto)
    graph = build_graph(net, proto)
    weights = random_weights(net, graph, seed)
    model = caffe_io.write_weights(net, weights, str(tmp_path / "net.caffemodel"))
    keep = random_keep(graph, np.random.default_rng(seed))
    net2, weights2 = prune_net(net, weights, keep, graph=graph)
    p2, m2 = save_pruned(net2, weights2, str(tmp_path / "pruned.prototxt"), str(tmp_path / "pruned.caffemodel"),
                         inputs=(proto, model))
    ref = caffe_io.write_weights(net, zero_removed_inputs(graph, weights, keep), str(tmp_path / "ref.caffemodel"))
    return graph, keep, (model, ref), (p2, m2)


def assert_close(pruned, reference, original=None):
    assert set(pruned) == set(reference)
    for name in reference:
        assert nets.rel_err(pruned[name], reference[name]) < 1e-4, name
    if original is not None:
        assert any(nets.rel_err(pruned[n], original[n]) > 1e-2 for n in reference), "pruning changed nothing?"


def caffe_view_outputs(tmp_path, proto, model, x, name):
    """Outputs of the part of the net Caffe can run, and the layers left out."""
    view, left = netcheck.runnable_view(caffe_io.read_net(proto))
    path = caffe_io.write_net(view, str(tmp_path / ("view-" + name)))
    return nets.caffe_forward(path, model, x), left


# ------------------------------------------------------------------ the superset schema

def test_the_superset_is_bvlc_plus_the_listed_fork_fields():
    bvlc = stock().DESCRIPTOR
    added = set()
    for name, message in caffe_pb2.DESCRIPTOR.message_types_by_name.items():
        if name not in bvlc.message_types_by_name:
            continue
        theirs = bvlc.message_types_by_name[name].fields_by_name
        for field in message.fields:
            if field.name in theirs:   # every BVLC field: same number, type and label
                mine, other = field, theirs[field.name]
                assert (mine.number, mine.type, mine.label) == (other.number, other.type, other.label), field.name
            else:
                added.add((name, field.name))
        assert set(theirs) <= set(message.fields_by_name), name
    assert set(bvlc.message_types_by_name) <= set(caffe_pb2.DESCRIPTOR.message_types_by_name)
    assert added == set(forks.FIELDS)
    for (message, field), (number, bvlc_field) in forks.RENUMBERED.items():
        assert bvlc.message_types_by_name[message].fields_by_name[bvlc_field].number == number
        assert caffe_pb2.DESCRIPTOR.message_types_by_name[message].fields_by_name[field].number != number
    assert caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_name["permute_param"].number == 202  # SSD's own number
    assert isinstance(caffe_pb2.LayerParameter.DESCRIPTOR, descriptor.Descriptor)


FORK_TEXT = '''name: "forks"
layer {
  name: "data"
  type: "Input"
  top: "data"
  input_param {
    shape {
      dim: 1
      dim: 3
      dim: 32
      dim: 32
    }
  }
}
layer {
  name: "pool"
  type: "Pooling"
  bottom: "data"
  top: "pool"
  pooling_param {
    pool: MAX
    kernel_size: 3
    stride: 2
    ceil_mode: false
  }
}
layer {
  name: "norm"
  type: "Normalize"
  bottom: "pool"
  top: "norm"
  norm_param {
    across_spatial: false
    scale_filler {
      type: "constant"
      value: 20.0
    }
    channel_shared: false
  }
}
layer {
  name: "perm"
  type: "Permute"
  bottom: "norm"
  top: "perm"
  permute_param {
    order: 0
    order: 2
    order: 3
    order: 1
  }
}
layer {
  name: "prior"
  type: "PriorBox"
  bottom: "norm"
  bottom: "data"
  top: "prior"
  prior_box_param {
    min_size: 30.0
    max_size: 60.0
    aspect_ratio: 2.0
    flip: true
    clip: false
    variance: 0.1
    variance: 0.1
    variance: 0.2
    variance: 0.2
    step: 8.0
    offset: 0.5
  }
}
layer {
  name: "shuffle"
  type: "ShuffleChannel"
  bottom: "pool"
  top: "shuffle"
  shuffle_channel_param {
    group: 3
  }
}
layer {
  name: "interp"
  type: "Interp"
  bottom: "shuffle"
  top: "interp"
  interp_param {
    zoom_factor: 2
  }
}
layer {
  name: "fc6"
  type: "MarginInnerProduct"
  bottom: "perm"
  bottom: "label"
  top: "fc6"
  margin_inner_product_param {
    num_output: 10
    type: QUADRUPLE
    weight_filler {
      type: "xavier"
    }
    base: 1000.0
    gamma: 0.12
    power: 1.0
    lambda_min: 5.0
  }
}
layer {
  name: "det"
  type: "DetectionOutput"
  bottom: "perm"
  bottom: "fc6"
  bottom: "prior"
  top: "det"
  detection_output_param {
    num_classes: 2
    share_location: true
    background_label_id: 0
    nms_param {
      nms_threshold: 0.45
      top_k: 100
    }
    code_type: CENTER_SIZE
    keep_top_k: 50
    confidence_threshold: 0.01
  }
}
'''


def test_a_fork_prototxt_round_trips_byte_for_byte(tmp_path):
    path = write_text(tmp_path, FORK_TEXT)
    with pytest.raises(text_format.ParseError, match="ceil_mode"):   # not a stock Caffe prototxt
        text_format.Parse(FORK_TEXT, stock().NetParameter())
    net = caffe_io.read_net(path)
    assert net.layer[1].pooling_param.ceil_mode is False
    assert net.layer[7].margin_inner_product_param.type == caffe_pb2.MarginInnerProductParameter.QUADRUPLE
    assert list(net.layer[3].permute_param.order) == [0, 2, 3, 1]
    out = caffe_io.write_net(net, str(tmp_path / "out.prototxt"))
    with open(path, "rb") as a, open(out, "rb") as b:
        assert a.read() == b.read()
    # the same net spelt as C++ Caffe writes it (floats without '.0') or by hand on one line: field for field
    compact = " ".join(line.strip() for line in FORK_TEXT.splitlines()).replace(".0\n", "\n").replace("20.0", "20")
    again = caffe_io.read_net(write_text(tmp_path, compact, "compact.prototxt"))
    assert again.SerializeToString() == net.SerializeToString()


def _field(number, payload):
    """Length-delimited field bytes, by protobuf's own encoder (not the toolkit's writer under test)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def fork_caffemodel():
    """The bytes of a caffemodel as the forks' Caffe writes them: SphereFace's fc6 with its
    margin_inner_product_param at the fork's number 147, SSD's Normalize with norm_param at 206, a pooling
    ceil_mode at 13 (BVLC's round_mode there) and a field of a fork the superset does not know (4242)."""
    margin = caffe_pb2.MarginInnerProductParameter(num_output=4, type=3, base=1000, gamma=0.12, lambda_min=5)
    margin.weight_filler.type = "xavier"
    fc6 = caffe_pb2.LayerParameter(name="fc6", type="MarginInnerProduct", bottom=["fc5", "label"], top=["fc6"])
    blob = fc6.blobs.add()
    blob.shape.dim.extend([4, 3])
    blob.data.extend(np.arange(12, dtype=np.float32) / 7)
    norm = caffe_pb2.LayerParameter(name="norm", type="Normalize", bottom=["conv"], top=["norm"])
    norm.norm_param.across_spatial = False
    norm.norm_param.channel_shared = False
    blob = norm.blobs.add()
    blob.shape.dim.append(3)
    blob.data.extend([20.0, 21.0, 22.0])
    pool = caffe_pb2.LayerParameter(name="pool", type="Pooling", bottom=["data"], top=["pool"])
    pooling = caffe_pb2.PoolingParameter(kernel_size=2).SerializeToString() + _varint(13 << 3) + _varint(1)
    layers = [fc6.SerializeToString() + _field(147, margin.SerializeToString()),
              norm.SerializeToString(),
              pool.SerializeToString() + _field(121, pooling) + _field(4242, b"other fork")]
    return caffe_pb2.NetParameter(name="forks").SerializeToString() + b"".join(_field(100, l) for l in layers)


def test_a_fork_caffemodel_round_trips_byte_for_byte(tmp_path):
    data = fork_caffemodel()
    path = tmp_path / "fork.caffemodel"
    path.write_bytes(data)
    model = caffe_io.read_model(str(path))
    assert model.layer[1].norm_param.channel_shared is False          # decoded at SSD's own number
    assert model.layer[0].HasField("swish_param")                    # 147: BVLC's number, the fork's bytes kept
    out = caffe_io.write_model(model, str(tmp_path / "out.caffemodel"))
    assert open(out, "rb").read() == data
    weights = caffe_io.read_weights(str(path))
    assert list(weights) == ["fc6", "norm"]
    assert np.array_equal(weights["fc6"][0], np.arange(12, dtype=np.float32).reshape(4, 3) / 7)
    assert weights["norm"][0].tolist() == [20, 21, 22]


def test_unknown_and_repeated_fields_are_named_with_layer_and_fork(tmp_path):
    text = FORK_TEXT.replace("    group: 3\n", "    group: 3\n  }\n  upsample_param {\n    scale: 2\n")
    with pytest.raises(CaffeFileError, match=r"net.prototxt:\d+:\d+: layer 'shuffle' \(ShuffleChannel\): "
                                             r"LayerParameter has no field 'upsample_param'.*SegNet's Caffe"):
        caffe_io.read_net(write_text(tmp_path, text))
    with pytest.raises(CaffeFileError, match=r"layer 'pool' \(Pooling\): PoolingParameter has no field 'ceilmode'"
                                             r".*a misspelling"):
        caffe_io.read_net(write_text(tmp_path, FORK_TEXT.replace("ceil_mode", "ceilmode")))
    twice = (INPUT % (8, 8)).replace("input_param {", 'input_param { shape { dim: 2 } } input_param {')
    path = write_text(tmp_path, 'name: "twice"\n' + twice, "twice.prototxt")
    with pytest.raises(CaffeFileError, match=r"twice.prototxt:2:\d+: layer 'data' \(Input\): input_param is given "
                                             r"twice in one LayerParameter"):
        caffe_io.read_net(path)
    run = subprocess.run([sys.executable, "-c", "import caffe, sys; caffe.Net(sys.argv[1], caffe.TEST)", path],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "Failed to parse NetParameter" in run.stderr   # as Caffe itself


def test_caffe_checks_name_fork_layers_and_fields(tmp_path):
    net = caffe_io.read_net(write_text(tmp_path, FORK_TEXT))
    with pytest.raises(CaffeFileError, match=r"layer 'pool' \(Pooling\) sets pooling_param.ceil_mode, a field of "
                                             r"the Caffe forks with pooling ceil_mode \(BVLC pull request #3057.*round_mode"):
        netcheck.check_net(net, "net.prototxt")
    net.layer[1].pooling_param.ClearField("ceil_mode")
    with pytest.raises(CaffeFileError, match=r"layer 'norm' \(Normalize\) sets norm_param, a field of SSD's Caffe"):
        netcheck.check_net(net, "net.prototxt")
    for layer in net.layer:
        for field in ("norm_param", "permute_param", "prior_box_param", "shuffle_channel_param", "interp_param",
                      "margin_inner_product_param", "detection_output_param"):
            layer.ClearField(field)
    with pytest.raises(CaffeFileError, match=r"layer 'norm' has type 'Normalize', which this Caffe build does not "
                                             r"have \(a layer of SSD's Caffe"):
        netcheck.check_net(net, "net.prototxt")
    view, left = netcheck.runnable_view(caffe_io.read_net(write_text(tmp_path, FORK_TEXT)))
    assert [layer.name for layer in view.layer] == ["data", "pool"]
    assert view.layer[1].pooling_param.round_mode == caffe_pb2.PoolingParameter.FLOOR  # ceil_mode false
    assert dict(left)["norm"].startswith("type Normalize (a layer of SSD's Caffe")
    assert [name for name, _ in left] == ["norm", "perm", "prior", "shuffle", "interp", "fc6", "det"]


# ------------------------------------------------------------------ fork layers as fixed points

SE_NET = 'name: "se"\n' + INPUT % (16, 16) + '''
layer { name: "c1" type: "Convolution" bottom: "data" top: "c1" convolution_param { num_output: 8 kernel_size: 3 pad: 1 } }
layer { name: "r1" type: "ReLU" bottom: "c1" top: "c1" }
layer { name: "c2" type: "Convolution" bottom: "c1" top: "c2" convolution_param { num_output: 8 kernel_size: 3 pad: 1 } }
layer { name: "pool" type: "Pooling" bottom: "c2" top: "pool" pooling_param { pool: AVE global_pooling: true } }
layer { name: "fc1" type: "Convolution" bottom: "pool" top: "fc1" convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "r2" type: "ReLU" bottom: "fc1" top: "fc1" }
layer { name: "fc2" type: "Convolution" bottom: "fc1" top: "fc2" convolution_param { num_output: 8 kernel_size: 1 } }
layer { name: "gate" type: "Sigmoid" bottom: "fc2" top: "fc2" }
layer { name: "axpy" type: "Axpy" bottom: "fc2" bottom: "c2" bottom: "c1" top: "axpy" }
layer { name: "c3" type: "Convolution" bottom: "axpy" top: "c3" convolution_param { num_output: 6 kernel_size: 3 pad: 1 } }
layer { name: "r3" type: "PReLU" bottom: "c3" top: "c3" }
layer { name: "c4" type: "Convolution" bottom: "c3" top: "c4" convolution_param { num_output: 5 kernel_size: 3 stride: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "c4" top: "fc" inner_product_param { num_output: 4 } }
'''


def test_an_se_block_axpy_is_a_fixed_point_and_the_rest_prunes_exactly(tmp_path):
    """SENet's Axpy (out = a * x + y), a type Caffe lacks: the groups reaching it stay, the SE squeeze and the
    convs after it prune exactly -- the whole net in OpenCV, the part before the Axpy in Caffe."""
    proto = write_text(tmp_path, SE_NET)
    graph, keep, (model, ref), (p2, m2) = prune_fork_net(tmp_path, proto)
    assert sorted(keep) == ["c3", "c4", "fc1"]
    for gid in ("c1", "c2", "fc2"):
        assert any("Axpy 'axpy' (a layer of SENet's Caffe" in r and "fixed point" in r for r in graph[gid].reasons)
    assert graph.param_shapes["c4"] == [(5, 6, 3, 3), (5,)] and graph.shapes["fc"] == (1, 4)   # shapes go past it
    x = np.random.default_rng(3).standard_normal((2, 3, 16, 16)).astype(np.float32)
    names, one = ["fc", "fc2"], x[:1]   # OpenCV 4.14's Axpy runs a batch of one only
    assert_close(opencv_outputs(p2, m2, one, names), opencv_outputs(proto, ref, one, names),
                 opencv_outputs(proto, model, one, names))
    pruned, left = caffe_view_outputs(tmp_path, p2, m2, x, "pruned")
    reference, _ = caffe_view_outputs(tmp_path, proto, ref, x, "ref")
    assert list(pruned) == ["fc2"] and [name for name, _ in left] == ["axpy", "c3", "r3", "c4", "fc"]
    assert_close(pruned, reference, caffe_view_outputs(tmp_path, proto, model, x, "orig")[0])


SSD_NET = 'name: "ssd"\n' + INPUT % (32, 32) + '''
layer { name: "conv0" type: "Convolution" bottom: "data" top: "conv0" convolution_param { num_output: 8 kernel_size: 3 pad: 1 bias_term: false } }
layer { name: "conv0/bn" type: "BatchNorm" bottom: "conv0" top: "conv0" }
layer { name: "conv0/scale" type: "Scale" bottom: "conv0" top: "conv0" scale_param { bias_term: true } }
layer { name: "conv0/relu" type: "ReLU" bottom: "conv0" top: "conv0" }
layer { name: "pool0" type: "Pooling" bottom: "conv0" top: "pool0" pooling_param { pool: MAX kernel_size: 3 stride: 2 ceil_mode: false } }
layer { name: "conv1/dw" type: "ConvolutionDepthwise" bottom: "pool0" top: "conv1/dw" convolution_param { num_output: 8 kernel_size: 3 pad: 1 } }
layer { name: "conv1/dw/relu" type: "ReLU" bottom: "conv1/dw" top: "conv1/dw" }
layer { name: "conv1" type: "Convolution" bottom: "conv1/dw" top: "conv1" convolution_param { num_output: 12 kernel_size: 1 } }
layer { name: "conv1/relu" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv1_norm" type: "Normalize" bottom: "conv1" top: "conv1_norm" norm_param { across_spatial: false channel_shared: false scale_filler { type: "constant" value: 20 } } }
layer { name: "conv1_loc" type: "Convolution" bottom: "conv1_norm" top: "conv1_loc" convolution_param { num_output: 12 kernel_size: 3 pad: 1 } }
layer { name: "conv1_loc_perm" type: "Permute" bottom: "conv1_loc" top: "conv1_loc_perm" permute_param { order: 0 order: 2 order: 3 order: 1 } }
layer { name: "conv1_loc_flat" type: "Flatten" bottom: "conv1_loc_perm" top: "conv1_loc_flat" }
layer { name: "conv1_conf" type: "Convolution" bottom: "conv1_norm" top: "conv1_conf" convolution_param { num_output: 9 kernel_size: 3 pad: 1 } }
layer { name: "conv1_conf_perm" type: "Permute" bottom: "conv1_conf" top: "conv1_conf_perm" permute_param { order: 0 order: 2 order: 3 order: 1 } }
layer { name: "conv1_conf_flat" type: "Flatten" bottom: "conv1_conf_perm" top: "conv1_conf_flat" }
layer { name: "conv1_prior" type: "PriorBox" bottom: "conv1_norm" bottom: "data" top: "conv1_prior" prior_box_param { min_size: 8 aspect_ratio: 2 flip: true clip: false variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2 } }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2" convolution_param { num_output: 10 kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "conv2/relu" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "conv3" type: "Convolution" bottom: "conv2" top: "conv3" convolution_param { num_output: 8 kernel_size: 1 } }
layer { name: "conv3/relu" type: "ReLU" bottom: "conv3" top: "conv3" }
layer { name: "conv3_loc" type: "Convolution" bottom: "conv3" top: "conv3_loc" convolution_param { num_output: 12 kernel_size: 3 pad: 1 } }
layer { name: "conv3_loc_perm" type: "Permute" bottom: "conv3_loc" top: "conv3_loc_perm" permute_param { order: 0 order: 2 order: 3 order: 1 } }
layer { name: "conv3_loc_flat" type: "Flatten" bottom: "conv3_loc_perm" top: "conv3_loc_flat" }
layer { name: "conv3_conf" type: "Convolution" bottom: "conv3" top: "conv3_conf" convolution_param { num_output: 9 kernel_size: 3 pad: 1 } }
layer { name: "conv3_conf_perm" type: "Permute" bottom: "conv3_conf" top: "conv3_conf_perm" permute_param { order: 0 order: 2 order: 3 order: 1 } }
layer { name: "conv3_conf_flat" type: "Flatten" bottom: "conv3_conf_perm" top: "conv3_conf_flat" }
layer { name: "conv3_prior" type: "PriorBox" bottom: "conv3" bottom: "data" top: "conv3_prior" prior_box_param { min_size: 16 aspect_ratio: 2 flip: true clip: false variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2 } }
layer { name: "mbox_loc" type: "Concat" bottom: "conv1_loc_flat" bottom: "conv3_loc_flat" top: "mbox_loc" concat_param { axis: 1 } }
layer { name: "mbox_conf" type: "Concat" bottom: "conv1_conf_flat" bottom: "conv3_conf_flat" top: "mbox_conf" concat_param { axis: 1 } }
layer { name: "mbox_prior" type: "Concat" bottom: "conv1_prior" bottom: "conv3_prior" top: "mbox_prior" concat_param { axis: 2 } }
layer { name: "mbox_conf_reshape" type: "Reshape" bottom: "mbox_conf" top: "mbox_conf_reshape" reshape_param { shape { dim: 0 dim: -1 dim: 3 } } }
layer { name: "mbox_conf_softmax" type: "Softmax" bottom: "mbox_conf_reshape" top: "mbox_conf_softmax" softmax_param { axis: 2 } }
layer { name: "mbox_conf_flatten" type: "Flatten" bottom: "mbox_conf_softmax" top: "mbox_conf_flatten" }
layer { name: "detection_out" type: "DetectionOutput" bottom: "mbox_loc" bottom: "mbox_conf_flatten" bottom: "mbox_prior" top: "detection_out" detection_output_param { num_classes: 3 share_location: true background_label_id: 0 nms_param { nms_threshold: 0.45 top_k: 100 } code_type: CENTER_SIZE keep_top_k: 100 confidence_threshold: 0.25 } }
'''


def test_an_ssd_net_prunes_its_backbone_exactly(tmp_path, capsys):
    """A MobileNet-SSD-like detector (the forks' depthwise type, pooling ceil_mode, Normalize, Permute,
    PriorBox, DetectionOutput): the groups of the backbone prune, those reaching the SSD layers stay, and
    the pruned net's box and class outputs equal the reference in OpenCV (which runs every layer here)."""
    proto = write_text(tmp_path, SSD_NET)
    assert groups.main([proto]) == 0
    listing = capsys.readouterr().out
    assert "9 channel groups, 3 prunable" in listing.splitlines()[0]
    assert "\n  SSD's Caffe (weiliu89/caffe, branch ssd; MobileNet-SSD and most Caffe detectors build on it): " \
           "conv1_norm (Normalize), conv1_loc_perm (Permute), " in listing
    assert "\n  the depthwise-convolution Caffe forks (yonghenglh6/DepthwiseConvolution; MobileNet ports): conv1/dw " \
           "(ConvolutionDepthwise)\n" in listing
    assert "\n  the Caffe forks with pooling ceil_mode (BVLC pull request #3057; OpenCV reads it too): pool0 (Pooling: " \
           "pooling_param.ceil_mode)\n" in listing
    assert "\nconv1  (12 channels, fixed: reaches Normalize 'conv1_norm' (a layer of SSD's Caffe), which L2-normalises " \
           "every position over its channels, so exact pruning through it is impossible: a fixed point" in listing
    assert "\nconv3_loc  (12 channels, fixed: reaches Permute 'conv3_loc_perm' (a layer of SSD's Caffe), which moves " \
           "the channel axis" in listing
    assert "\nconv3  (8 channels, prunable)" in listing   # PriorBox reads its size only
    graph, keep, (model, ref), (p2, m2) = prune_fork_net(tmp_path, proto)
    assert sorted(keep) == ["conv0", "conv2", "conv3"] and graph.shapes["pool0"] == (1, 8, 15, 15)
    assert [s.layer for s in graph["conv0"].passengers if s.blob == 0] == ["conv0/bn", "conv0/scale", "conv1/dw"]
    pruned = caffe_io.read_net(p2)
    dw = next(layer for layer in pruned.layer if layer.name == "conv1/dw")
    assert dw.convolution_param.num_output == len(keep["conv0"]) and not dw.convolution_param.HasField("group")
    assert pruned.layer[5].pooling_param.ceil_mode is False   # the fork's field written back
    x = np.random.default_rng(4).standard_normal((1, 3, 32, 32)).astype(np.float32)
    names = ["mbox_loc", "mbox_conf_flatten"]
    assert_close(opencv_outputs(p2, m2, x, names), opencv_outputs(proto, ref, x, names),
                 opencv_outputs(proto, model, x, names))


def fork_net_files(tmp_path, text, name, size, seed=0):
    """The prototxt, random weights (written without Caffe) and a folder of 8 images of the net's size."""
    import cv2
    proto = write_text(tmp_path, text, name + ".prototxt")
    net = caffe_io.read_net(proto)
    model = caffe_io.write_weights(net, random_weights(net, build_graph(net, proto), seed),
                                   str(tmp_path / (name + ".caffemodel")))
    rng = np.random.default_rng(seed)
    for i in range(8):
        folder = tmp_path / ("img%d" % size) / "ab"[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / ("%d.png" % i)), rng.integers(0, 255, (size, size, 3)).astype(np.uint8))
    return proto, model, str(tmp_path / ("img%d" % size))


def test_python_m_prune_prunes_an_se_net_where_its_axpy_allows(tmp_path, capsys):
    """python -m prune on a net with SENet's Axpy, a type this Caffe lacks: a criterion that samples images
    is refused, before anything is written, for the groups only the Axpy's output reaches (naming them, the
    layer and the ways out); with --layers it prunes the group before the Axpy; a criterion that reads only
    weights prunes every prunable group with no images at all, exactly (OpenCV runs the whole net)."""
    from prune.__main__ import main as prune_main
    proto, model, images = fork_net_files(tmp_path, SE_NET, "se", 16)
    out = tmp_path / "refused"
    assert prune_main(["--model", proto, "--weights", model, "--data", images, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert not out.exists() and len(err.strip().splitlines()) == 1
    assert "groups c3, c4 are read by layers this Caffe build cannot run (axpy (type Axpy (a layer of SENet's" in err
    assert "leave them out (--layers fc1) or choose a criterion that reads only weights" in err
    assert prune_main(["--model", proto, "--weights", model, "--out", str(out), "--quiet"]) == 2
    assert "--data is required: --criterion thinet with --reconstruct full" in capsys.readouterr().err

    assert prune_main(["--model", proto, "--weights", model, "--data", images, "--layers", "fc1",
                       "--out", str(tmp_path / "fc1"), "--quiet"]) == 0
    said = capsys.readouterr().out
    assert "fc1             4 -> 2     rel. error fc2" in said
    assert "not run there, their blobs checked against the inferred shapes only: axpy (types this Caffe build " \
           "lacks) and the 4 layer(s) reading what they make" in said

    assert prune_main(["--model", proto, "--weights", model, "--criterion", "l1", "--reconstruct", "none",
                       "--out", str(tmp_path / "l1"), "--quiet"]) == 0
    log = json.loads((tmp_path / "l1" / "log.json").read_text())
    assert [(s["group"], s["kept"]) for s in log["steps"]] == [("fc1", 2), ("c3", 3), ("c4", 2)]
    why = dict(netcheck.runnable_view(caffe_io.read_net(proto))[1])["axpy"]
    assert log["not_run_in_caffe"][0] == dict(layer="axpy", why=why)
    graph = build_graph(caffe_io.read_net(proto), proto)
    keep = {s["group"]: np.setdiff1d(np.arange(s["channels"]), s["removed_channels"]) for s in log["steps"]}
    zeroed = zero_removed_inputs(graph, caffe_io.read_weights(model), keep)
    ref = caffe_io.write_weights(caffe_io.read_net(proto), zeroed, str(tmp_path / "ref.caffemodel"))
    one = np.random.default_rng(5).standard_normal((1, 3, 16, 16)).astype(np.float32)
    names = ["fc", "fc2"]
    assert_close(opencv_outputs(log["prototxt"], log["caffemodel"], one, names), opencv_outputs(proto, ref, one, names),
                 opencv_outputs(proto, model, one, names))


def test_python_m_prune_samples_an_ssd_backbone_in_caffe(tmp_path, capsys):
    """A MobileNet-SSD-like net: its forks' depthwise type runs in Caffe as a Convolution with group =
    channels, so the whole backbone is sampled and reconstructed by least squares; the SSD layers are set
    aside and named; the result loads in OpenCV, which runs all of it, and stays close to the original."""
    from prune.__main__ import main as prune_main
    proto, model, images = fork_net_files(tmp_path, SSD_NET, "ssd", 32)
    view, left = netcheck.runnable_view(caffe_io.read_net(proto))
    assert [layer.type for layer in view.layer if layer.name == "conv1/dw"] == ["Convolution"]
    assert "conv1/dw" not in dict(left) and dict(left)["conv1_norm"].startswith("type Normalize")
    for criterion in ("thinet", "taylor"):
        run = tmp_path / criterion
        assert prune_main(["--model", proto, "--weights", model, "--data", images, "--criterion", criterion,
                           "--keep", "0.75", "--out", str(run), "--quiet"]) == 0
        log = json.loads((run / "log.json").read_text())
        assert [(s["group"], s["kept"]) for s in log["steps"]] == [("conv0", 6), ("conv2", 8), ("conv3", 6)]
        assert all(s["error"] and s["images"] == 8 for s in log["steps"])
        x = np.random.default_rng(6).standard_normal((1, 3, 32, 32)).astype(np.float32)
        names = ["mbox_loc", "mbox_conf_flatten"]
        pruned = opencv_outputs(log["prototxt"], log["caffemodel"], x, names)
        original = opencv_outputs(proto, model, x, names)
        for name in names:
            assert pruned[name].shape == original[name].shape and nets.rel_err(pruned[name], original[name]) < 0.5
    capsys.readouterr()


def test_lrn_across_channels_is_a_fixed_point_with_its_reason(tmp_path):
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 8, 8]))
    n.conv1 = L.Convolution(n.data, num_output=6, kernel_size=3)
    n.lrn = L.LRN(n.conv1, local_size=3)
    n.conv2 = L.Convolution(n.lrn, num_output=4, kernel_size=1)
    n.lrn2 = L.LRN(n.conv2, local_size=3, norm_region=P.LRN.WITHIN_CHANNEL)
    n.conv3 = L.Convolution(n.lrn2, num_output=2, kernel_size=1)
    graph = build_graph(n.to_proto())
    (reason,) = graph["conv1"].reasons
    assert "LRN 'lrn'" in reason and "normalises across channels" in reason and "impossible" in reason
    assert graph["conv2"].prunable and graph.shapes["lrn"] == (1, 6, 6, 6)


# ------------------------------------------------------------------ the forks' depthwise types

DW_NET = 'name: "dw"\n' + INPUT % (12, 12) + '''
layer { name: "c1" type: "Convolution" bottom: "data" top: "c1" convolution_param { num_output: 6 kernel_size: 3 pad: 1 } }
layer { name: "r1" type: "PReLU" bottom: "c1" top: "c1" }
layer { name: "dw1" type: "DepthwiseConvolution" bottom: "c1" top: "dw1" convolution_param { num_output: 6 group: 6 kernel_size: 3 pad: 1 } }
layer { name: "c2" type: "Convolution" bottom: "dw1" top: "c2" convolution_param { num_output: 8 kernel_size: 1 } }
layer { name: "dw2" type: "ConvolutionDepthwise" bottom: "c2" top: "dw2" convolution_param { num_output: 8 kernel_size: 3 stride: 2 bias_term: false } }
layer { name: "bn2" type: "BatchNorm" bottom: "dw2" top: "dw2" }
layer { name: "c3" type: "Convolution" bottom: "dw2" top: "c3" convolution_param { num_output: 5 kernel_size: 1 } }
layer { name: "fc" type: "InnerProduct" bottom: "c3" top: "fc" inner_product_param { num_output: 3 } }
'''


def as_stock_depthwise(path, out):
    """The same net with the forks' depthwise types spelt as BVLC Caffe's Convolution with group = channels."""
    net = caffe_io.read_net(path)
    for layer in net.layer:
        if layer.type in forks.DEPTHWISE_TYPES:
            layer.type = "Convolution"
            layer.convolution_param.group = layer.convolution_param.num_output
    return caffe_io.write_net(net, out)


def test_fork_depthwise_types_are_per_channel_passengers_and_prune_exactly(tmp_path):
    """DepthwiseConvolution (group given) and ConvolutionDepthwise (group left out) ride with the channels
    they filter.  Neither Caffe nor OpenCV runs DepthwiseConvolution: the pruned net is checked exact in
    Caffe with the two types spelt as BVLC's Convolution, group = channels, which is what they compute."""
    proto = write_text(tmp_path, DW_NET)
    graph, keep, (model, ref), (p2, m2) = prune_fork_net(tmp_path, proto)
    assert sorted(keep) == ["c1", "c2", "c3"]
    assert [(s.layer, s.blob) for s in graph["c1"].passengers] == [("r1", 0), ("dw1", 0), ("dw1", 1)]
    assert [(s.layer, s.blob) for s in graph["c2"].passengers] == [("dw2", 0), ("bn2", 0), ("bn2", 1)]
    assert graph.param_shapes["dw2"] == [(8, 1, 3, 3)]
    layers = {layer.name: layer for layer in caffe_io.read_net(p2).layer}
    assert layers["dw1"].convolution_param.group == layers["dw1"].convolution_param.num_output == len(keep["c1"])
    assert layers["dw2"].convolution_param.num_output == len(keep["c2"])
    assert not layers["dw2"].convolution_param.HasField("group")
    x = np.random.default_rng(5).standard_normal((2, 3, 12, 12)).astype(np.float32)
    pruned = nets.caffe_forward(as_stock_depthwise(p2, str(tmp_path / "p2-stock.prototxt")), m2, x)
    stock_proto = as_stock_depthwise(proto, str(tmp_path / "stock.prototxt"))
    assert_close(pruned, nets.caffe_forward(stock_proto, ref, x), nets.caffe_forward(stock_proto, model, x))


def test_a_depthwise_type_with_a_channel_multiplier_is_refused_with_its_reason(tmp_path):
    text = DW_NET.replace('num_output: 8 kernel_size: 3 stride: 2', 'num_output: 16 kernel_size: 3 stride: 2')
    graph = build_graph(write_text(tmp_path, text))
    assert any("grouped convolution 'dw2' (ConvolutionDepthwise, group 8 of 8 channels, 16 outputs)" in r
               for r in graph["c2"].reasons)


# ------------------------------------------------------------------ Slice

def slice_net():
    """A conv's channels cut three ways (one part joined to another conv's by a Concat), a max-feature-map
    (LightCNN's Slice in halves + Eltwise MAX) and a spatial Slice whose halves meet again."""
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 12, 10]))
    n.c1 = L.Convolution(n.data, num_output=10, kernel_size=3, pad=1)
    n.r1 = L.PReLU(n.c1, in_place=True)
    n.s1, n.s2, n.s3 = L.Slice(n.c1, slice_param=dict(axis=1, slice_point=[3, 7]), ntop=3)
    n.a = L.Convolution(n.s1, num_output=4, kernel_size=1)
    n.b = L.Convolution(n.s2, num_output=4, kernel_size=3, pad=1)
    n.cat = L.Concat(n.s3, n.a)
    n.d = L.Convolution(n.cat, num_output=5, kernel_size=1)
    n.m = L.Convolution(n.d, num_output=8, kernel_size=3, pad=1)
    n.m1, n.m2 = L.Slice(n.m, slice_param=dict(axis=1), ntop=2)
    n.mfm = L.Eltwise(n.m1, n.m2, eltwise_param=dict(operation=P.Eltwise.MAX))
    n.h1, n.h2 = L.Slice(n.mfm, slice_param=dict(axis=2, slice_point=[5]), ntop=2)
    n.e1 = L.Convolution(n.h1, num_output=3, kernel_size=1)
    n.e2 = L.Convolution(n.h2, num_output=3, kernel_size=1)
    n.rows = L.Concat(n.e1, n.e2, concat_param=dict(axis=2))
    n.f = L.InnerProduct(n.b, num_output=6)
    n.g = L.InnerProduct(n.rows, num_output=6)
    n.out = L.Eltwise(n.f, n.g)
    return n.to_proto()


def test_channel_and_spatial_slices_prune_exactly(tmp_path):
    proto = caffe_io.write_net(slice_net(), str(tmp_path / "net.prototxt"))
    x = np.random.default_rng(1).standard_normal((2, 3, 12, 10)).astype(np.float32)
    graph, keep, net2 = check_exact(tmp_path, proto, nets.random_weights(proto), x)   # Caffe and OpenCV
    # the cuts at 3 and 7 split conv c1's channels into three groups, each with its own consumers
    assert [(g, graph[g].channels, [c.layer for c in graph[g].consumers]) for g in ("c1", "c1@3", "c1@7")] == [
        ("c1", 3, ["a"]), ("c1@3", 4, ["b"]), ("c1@7", 3, ["d"])]
    assert [(s.layer, s.start) for s in graph["c1@3"].producers] == [("c1", 3), ("c1", 3)]   # weight, bias rows
    # the max-feature-map ties channel c of one half to channel c of the other: one group of 4
    assert graph["m"].channels == 4 and [s.start for s in graph["m"].producers if s.blob == 0] == [0, 4]
    assert graph["e1"].layers("producers") == ["e1", "e2"] and graph.shapes["h2"] == (1, 4, 7, 10)
    points = {layer.name: list(layer.slice_param.slice_point) for layer in net2.layer if layer.type == "Slice"}
    assert points == {"s1": [len(keep["c1"]), len(keep["c1"]) + len(keep["c1@3"])], "m1": [len(keep["m"])],
                      "h1": [5]}


def test_an_input_slice_keeps_the_shapes_its_inner_products_need(tmp_path):
    """A face-landmark net's input: five patches stacked on the channel axis, cut by a five-way Slice, one
    branch each, joined by InnerProducts (which need each channel's H x W)."""
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 15, 8, 8]))
    parts = L.Slice(n.data, slice_param=dict(axis=1), ntop=5)
    fcs = []
    for i, part in enumerate(parts):
        setattr(n, "patch%d" % i, part)
        conv = L.Convolution(part, num_output=4, kernel_size=3)
        setattr(n, "conv%d" % i, conv)
        setattr(n, "relu%d" % i, L.PReLU(conv, in_place=True))
        fcs.append(L.InnerProduct(conv, num_output=3))
        setattr(n, "fc%d" % i, fcs[-1])
    n.sum = L.Eltwise(*fcs)
    n.out = L.InnerProduct(n.sum, num_output=2)
    proto = caffe_io.write_net(n.to_proto(), str(tmp_path / "net.prototxt"))
    x = np.random.default_rng(6).standard_normal((2, 15, 8, 8)).astype(np.float32)
    graph, keep, _ = check_exact(tmp_path, proto, nets.random_weights(proto), x)
    assert sorted(keep) == ["conv%d" % i for i in range(5)] + ["fc0"]
    assert [c.block for c in graph["conv0"].consumers] == [36] and graph.shapes["patch4"] == (1, 3, 8, 8)
    assert graph["data@12"].reasons == ["net input 'data'"]


def test_a_slice_inside_a_flattened_channel_is_refused(tmp_path):
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 4, 4]))
    n.c1 = L.Convolution(n.data, num_output=4, kernel_size=3)   # 4 x 2 x 2
    n.flat = L.Flatten(n.c1)
    n.p1, n.p2 = L.Slice(n.flat, slice_param=dict(axis=1, slice_point=[6]), ntop=2)
    n.f1 = L.InnerProduct(n.p1, num_output=2)
    n.f2 = L.InnerProduct(n.p2, num_output=2)
    graph = build_graph(n.to_proto())
    assert any("cuts inside one channel's 4 entries" in r for r in graph["c1"].reasons)


# ------------------------------------------------------------------ the small ones

def test_stats_counts_every_input_of_a_net_with_several(tmp_path):
    layered = 'name: "two"\n' + INPUT.replace('"data"', '"a"') % (8, 8) + INPUT.replace('"data"', '"b"') % (8, 8)
    legacy = 'name: "two"\ninput: "a"\ninput_shape { dim: 1 dim: 3 dim: 8 dim: 8 }\ninput: "b"\n' \
             'input_shape { dim: 1 dim: 3 dim: 8 dim: 8 }\n'
    body = '''layer { name: "ca" type: "Convolution" bottom: "a" top: "ca" convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "cb" type: "Convolution" bottom: "b" top: "cb" convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "sum" type: "Eltwise" bottom: "ca" bottom: "cb" top: "sum" }
'''
    for name, head in (("layered", layered), ("legacy", legacy)):   # two Input layers; one with two tops
        stats = net_stats(write_text(tmp_path, head + body, name + ".prototxt"))
        assert list(stats.inputs) == ["a", "b"] and stats.excluded == [], name
        assert (stats.params, stats.macs) == (2 * (4 * 27 + 4), 2 * 4 * 27 * 36), name


def test_groups_piped_into_head_ends_quietly():
    big = os.path.join(ROOT, "prototxt", "sphereface64_deploy.prototxt")
    for _ in range(3):
        run = subprocess.run("%s -m prune.groups %s | head -1" % (sys.executable, big), shell=True, cwd=ROOT,
                             capture_output=True, text=True, timeout=300, executable="/bin/bash")
        assert run.stdout.startswith(big) and run.stdout.count("\n") == 1
        assert run.stderr == "", run.stderr


def test_an_error_while_checking_staged_files_names_the_users_file(tmp_path):
    proto = caffe_io.write_net(slice_net(), str(tmp_path / "net.prototxt"))
    net, weights = caffe_io.read_net(proto), nets.random_weights(proto)
    net2, weights2 = prune_net(net, weights, {})
    weights2["d"][0] = weights2["d"][0][:, :3]   # a blob that does not fit its layer
    target = str(tmp_path / "out" / "pruned.caffemodel")
    with pytest.raises(CaffeFileError) as e:
        save_pruned(net2, weights2, str(tmp_path / "out" / "pruned.prototxt"), target)
    assert target in str(e.value) and ".tmp" not in str(e.value) and "layer 'd'" in str(e.value)
    assert os.listdir(tmp_path / "out") == []


def test_stock_messages_are_read_as_the_superset():
    net = nets.concat_net()                       # pycaffe's NetSpec: stock caffe_pb2
    assert superset(net).SerializeToString() == net.SerializeToString()
    assert superset(superset(net)) is not net and build_graph(net).prunable()
    assert copy.deepcopy(superset(net)) == superset(net)


def test_the_sensitivity_analysis_measures_the_part_of_a_fork_net_caffe_runs(tmp_path, capsys):
    """prune.sensitivity on SENet's Axpy net: the groups whose layers all run in this Caffe are measured (fc1,
    the squeeze), those read past the Axpy are named as not measured; an embedding blob made past the Axpy
    is refused in one line before anything is written."""
    from prune.sensitivity.__main__ import main as sensitivity_main
    proto, model, images = fork_net_files(tmp_path, SE_NET, "se", 16)
    args = ["--model", proto, "--weights", model, "--data", images, "--crop", "none", "--images", "6",
            "--judge-images", "2", "--ratios", "0.5", "--quiet"]
    out = tmp_path / "sens"
    assert sensitivity_main(args + ["--blob", "fc2", "--out", str(out)]) == 0
    record = json.loads((out / "sensitivity.json").read_text())
    assert list(record["curves"]) == ["fc1"] and record["curves"]["fc1"]["damage"]["0.5"] >= 0
    why = record["not_measured"]
    assert sorted(why) == ["c1", "c2", "c3", "c4"]
    assert why["c1"].startswith("fixed in the whole net: ") and "Axpy 'axpy'" in why["c1"]
    assert why["c3"].startswith("read by layers this Caffe build cannot run (") and "c3" in why["c3"]
    capsys.readouterr()
    bad = tmp_path / "bad"
    assert sensitivity_main(args + ["--blob", "fc", "--out", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "blob 'fc' is made by layers this Caffe build cannot run" in err and len(err.strip().splitlines()) == 1
    assert not (bad / "sensitivity.json").exists()
