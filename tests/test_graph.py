"""Channel-dependency groups: structure on real nets, shapes against real Caffe, refusals and errors."""
import json
import os

import pytest
import caffe
from caffe import layers as L

from conftest import shared_path
from base import caffe_io
from prune import groups
from prune.graph import GraphError, build_graph
import nets

MFN = ("models", "mobilefacenet", "mobilefacenet-v0.prototxt")


def write(tmp_path, proto, name="net.prototxt"):
    return caffe_io.write_net(proto, str(tmp_path / name))


def assert_shapes_match_caffe(path):
    """The graph's inferred blob and parameter shapes are the ones real Caffe builds."""
    graph = build_graph(path)
    cnet = caffe.Net(path, caffe.TEST)
    for name, blob in cnet.blobs.items():
        if "_split_" not in name:  # Caffe's own Split layers for blobs read twice
            assert graph.shapes[name] == blob.data.shape, name
    assert set(graph.shapes) <= set(cnet.blobs)
    for name, blobs in cnet.params.items():
        assert graph.param_shapes[name] == [b.data.shape for b in blobs], name
    return graph


@pytest.mark.parametrize("depth,units", [(4, (0, 0, 0, 0)), (10, (0, 1, 2, 0)), (20, (1, 2, 4, 1))])
def test_sphereface_groups(depth, units):
    path = nets.sphereface_path(depth)
    if not os.path.exists(path):
        pytest.skip("generated SphereFace prototxt not present")
    graph = assert_shapes_match_caffe(path)
    prunable = {g.id: g for g in graph.prunable()}
    assert len(prunable) == 4 + sum(units)
    for stage, n in enumerate(units, start=1):
        stream = prunable["conv%d_1" % stage]
        assert stream.producers[0].layer == "conv%d_1" % stage
        assert stream.layers("producers") == ["conv%d_%d" % (stage, i) for i in [1] + [2 * k + 1 for k in range(1, n + 1)]]
        assert stream.layers("passengers") == ["relu%d_%d" % (stage, i) for i in [1] + [2 * k + 1 for k in range(1, n + 1)]]
        nxt = "conv%d_1" % (stage + 1) if stage < 4 else "fc5"
        assert stream.layers("consumers") == ["conv%d_%d" % (stage, 2 * k) for k in range(1, n + 1)] + [nxt]
        last = stream.consumers[-1]
        assert last.bottom == ("res%d_%d" % (stage, 2 * n + 1) if n else "conv%d_1" % stage)
        assert (last.axis, last.start, last.block) == (1, 0, 42 if stage == 4 else 1)
        for k in range(1, n + 1):
            inner = prunable["conv%d_%d" % (stage, 2 * k)]
            assert inner.layers("producers") == ["conv%d_%d" % (stage, 2 * k)]
            assert inner.layers("passengers") == ["relu%d_%d" % (stage, 2 * k)]
            assert [(c.layer, c.bottom) for c in inner.consumers] == [
                ("conv%d_%d" % (stage, 2 * k + 1), "conv%d_%d" % (stage, 2 * k))]
    assert "net output 'fc5'" in graph.groups["fc5"].reasons[0]
    assert not graph.groups["data"].prunable


def test_sphereface_train_net_keeps_embedding():
    path = os.path.join(nets.ROOT, "prototxt", "sphereface20_train.prototxt")
    if not os.path.exists(path):
        pytest.skip("generated SphereFace prototxt not present")
    graph = build_graph(path)
    assert graph.shapes["data"] == (256, 3, 112, 96)
    assert any("Python layer 'fc6'" in r for r in graph.groups["fc5"].reasons)
    assert len(graph.prunable()) == 12


def test_mobilefacenet_groups():
    graph = assert_shapes_match_caffe(shared_path(*MFN))
    prunable = graph.prunable()
    assert len(prunable) == 20
    # depthwise convs ride along with the 1x1 conv that feeds them
    first = graph.groups["conv_1_conv2d"]
    assert "conv_2_dw_conv2d" in first.layers("passengers")
    dw = [s for s in first.passengers if s.layer == "conv_2_dw_conv2d"]
    assert [(s.blob, s.axis) for s in dw] == [(0, 0)]
    # the stage-3 residual stream: one projection opens it, four units add to it
    stream = graph.groups["dconv_23_conv_proj_conv2d"]
    assert len(stream.layers("producers")) == 5
    assert stream.layers("consumers")[-1] == "dconv_34_conv_sep_conv2d"
    bn = [s for s in stream.passengers if s.type == "BatchNorm"]
    assert {s.blob for s in bn} == {0, 1}  # mean and variance; blob 2 (scale factor) stays
    assert not graph.groups["pre_fc1"].prunable


def test_concat_offsets_and_shapes(tmp_path):
    graph = assert_shapes_match_caffe(write(tmp_path, nets.concat_net()))
    a, b, up = graph["a"], graph["b"], graph["up"]
    assert a.layers("producers") == ["a", "a2"]  # tied by the Eltwise
    assert [(c.layer, c.axis, c.start) for c in a.consumers] == [("up", 0, 0)]  # Deconvolution: input on axis 0
    assert [(c.layer, c.axis, c.start) for c in b.consumers] == [("up", 0, 6)]
    assert [(s.layer, s.start) for s in b.passengers if s.blob == 0] == [("cat_bn", 6), ("cat_sc", 6), ("dw", 6)]
    assert [(s.layer, s.blob, s.axis) for s in up.producers] == [("up", 0, 1), ("up", 1, 0)]
    assert [(c.layer, c.start) for c in up.consumers] == [("e", 0), ("e", 4)]  # Concat(pool, pool)
    assert graph.consumers_of("up") == [(a, a.consumers[0]), (b, b.consumers[0])]


def test_flatten_blocks(tmp_path):
    graph = assert_shapes_match_caffe(write(tmp_path, nets.flatten_net()))
    c1, c2 = graph["c1"], graph["c2"]
    assert [(c.layer, c.start, c.block) for c in c1.consumers] == [("fc1", 0, 12)]
    assert [(c.layer, c.start, c.block) for c in c2.consumers] == [("fc1", 72, 12), ("fc3", 0, 12)]
    assert c2.consumers[0].indices([0, 2]).tolist() == list(range(72, 84)) + list(range(96, 108))
    assert [(s.layer, s.start, s.block) for s in c2.passengers if s.blob == 0] == [("bn", 72, 12), ("sc", 72, 12)]
    assert graph["fc1"].layers("producers") == ["fc1", "fc3"]  # summed by the Eltwise
    assert graph.counts["r"][0] == "reshape"


def conv_chain(tmp_path, middle):
    """data -> conv1 -> middle(conv1) -> conv2 -> net output, as a prototxt path."""
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 4, 8, 8]))
    n.conv1 = L.Convolution(n.data, num_output=8, kernel_size=3)
    n.mid = middle(n.conv1)
    n.conv2 = L.Convolution(n.mid, num_output=3, kernel_size=1)
    return write(tmp_path, n.to_proto())


def test_unknown_type_in_prunable_path_is_a_named_fixed_point(tmp_path):
    path = conv_chain(tmp_path, lambda x: L.Layer(x, type="FancyNorm"))  # Caffe has no such type
    graph = build_graph(path)
    (reason,) = graph["conv1"].reasons
    assert "FancyNorm 'mid'" in reason and "no rule" in reason and "fixed point" in reason
    assert graph.shapes["mid"] is None and "mid" not in graph.param_shapes


def test_unknown_type_where_nothing_prunable_reaches(tmp_path):
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 4, 8, 8]))
    n.odd = L.Layer(n.data, type="FancyNorm")  # reads only the (fixed) net input
    n.conv1 = L.Convolution(n.data, num_output=8, kernel_size=3)
    n.conv2 = L.Convolution(n.conv1, num_output=3, kernel_size=1)
    graph = build_graph(write(tmp_path, n.to_proto()))
    assert [g.id for g in graph.prunable()] == ["conv1"]


@pytest.mark.parametrize("middle,reason", [
    (lambda x: L.Softmax(x), "Softmax layer 'mid'"),
    (lambda x: L.Convolution(x, num_output=8, kernel_size=1, group=2), "grouped convolution 'mid'"),
    (lambda x: L.Scale(x, axis=0, num_axes=1), "along axis 0"),
])
def test_layers_that_fix_channels(tmp_path, middle, reason):
    graph = build_graph(conv_chain(tmp_path, middle))
    assert any(reason in r for r in graph["conv1"].reasons), graph["conv1"].reasons


def test_prelu_channel_shared_and_phase_rules(tmp_path):
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 4, 8, 8]))
    n.conv1 = L.Convolution(n.data, num_output=8, kernel_size=3)
    n.relu = L.PReLU(n.conv1, in_place=True, prelu_param=dict(channel_shared=True))
    n.train_only = L.Softmax(n.conv1, include=dict(phase=caffe.TRAIN))  # not in the TEST view
    n.conv2 = L.Convolution(n.conv1, num_output=3, kernel_size=1)
    graph = build_graph(write(tmp_path, n.to_proto()))
    g = graph["conv1"]
    assert not g.passengers  # one shared slope: nothing to slice
    assert g.reasons == ["read by layer 'train_only' outside the TEST phase"]


def test_eltwise_of_different_compositions_is_refused(tmp_path):
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 4, 8, 8]))
    n.a = L.Convolution(n.data, num_output=4, kernel_size=1)
    n.b = L.Convolution(n.data, num_output=4, kernel_size=1)
    n.cat = L.Concat(n.a, n.b)
    n.c = L.Convolution(n.data, num_output=8, kernel_size=1)
    n.sum = L.Eltwise(n.cat, n.c)
    n.out = L.Convolution(n.sum, num_output=2, kernel_size=1)
    graph = build_graph(write(tmp_path, n.to_proto()))
    assert {g.id for g in graph.prunable()} == set()
    assert "differently composed" in graph["a"].reasons[0]


def test_syntax_error_names_line(tmp_path, capsys):
    path = tmp_path / "bad.prototxt"
    path.write_text('name: "x"\nlayer {\n  name: "data"\n  type: "Input"\n  top: "data"\n  oops {\n}\n')
    with pytest.raises(caffe_io.CaffeFileError, match=r"bad.prototxt:6:"):
        build_graph(str(path))
    assert groups.main([str(path)]) == 2
    assert "bad.prototxt:6:" in capsys.readouterr().err


def test_cli_listing_and_json(tmp_path, capsys):
    path = write(tmp_path, nets.concat_net())
    assert groups.main([path]) == 0
    text = capsys.readouterr().out
    assert "7 channel groups, 5 prunable" in text
    assert "up [reads dw, input channels 6..10]" in text
    assert groups.main([path, "--json"]) == 0
    listed = {g["id"]: g for g in json.loads(capsys.readouterr().out)}
    assert listed["e"]["consumers"][0] == dict(layer="fc", type="InnerProduct", blob=0, axis=1, start=0,
                                               block=1, bottom="gp")
    assert listed["fc"]["prunable"] is False


def test_wrong_bottom_count_is_named(tmp_path):
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 4, 8, 8]))
    n.conv1 = L.Convolution(n.data, num_output=8, kernel_size=3)
    n.bn = L.BatchNorm(n.conv1, n.data)
    path = write(tmp_path, n.to_proto())
    with pytest.raises(GraphError, match=r"net.prototxt: layer 'bn' \(BatchNorm\): takes one bottom blob, not 2"):
        build_graph(path)


def test_scale_over_channel_and_space(tmp_path):
    graph = assert_shapes_match_caffe(conv_chain(tmp_path, lambda x: L.Scale(x, num_axes=-1, bias_term=True)))
    assert graph.param_shapes["mid"] == [(8, 6, 6), (8, 6, 6)]
    assert [(s.layer, s.blob, s.axis) for s in graph["conv1"].passengers] == [("mid", 0, 0), ("mid", 1, 0)]


def every_type():
    """Every layer type this Caffe build registers and every Caffe fork type the toolkit knows of."""
    from base import forks
    return sorted(set(caffe.layer_type_list()) | set(forks.TYPES))


def test_every_layer_type_gives_groups_or_one_line(tmp_path, capsys):
    """Each type between two convolutions (with one, two and no bottoms), default parameters, through
    python -m prune.groups: a listing (exit 0) or one clear line (exit 2), never an internal error."""
    failures = []
    for i, kind in enumerate(every_type()):
        for bottoms in (1, 2, 0):
            n = caffe.NetSpec()
            n.data = L.Input(shape=dict(dim=[1, 3, 8, 8]))
            n.conv1 = L.Convolution(n.data, num_output=4, kernel_size=3, pad=1)
            n.conv2 = L.Convolution(n.data, num_output=4, kernel_size=3, pad=1)
            n.mid = L.Layer(*[n.conv1, n.conv2][:bottoms], type=kind)
            n.out = L.Convolution(n.mid, num_output=2, kernel_size=1)
            path = write(tmp_path, n.to_proto(), "net%d_%d.prototxt" % (i, bottoms))
            code = groups.main([path])
            err = capsys.readouterr().err.strip()
            if code not in (0, 2) or (code == 2 and len(err.splitlines()) != 1):
                failures.append("%s with %d bottoms: exit %d %s" % (kind, bottoms, code, err[-300:]))
    assert not failures, "\n".join(failures)
