"""VGG-like, SqueezeNet-, MobileNetV2- and ResNet-50-based face nets: real Caffe forward/backward, sizes, groups, exact pruning."""
import copy

import numpy as np
import pytest
import caffe

from base import caffe_io
from prune.graph import build_graph
from prune.stats import net_stats
from prune.surgery import prune_net, save_pruned
from prune.gradient import taylor_scores
from prototxt.facenets import NETS, VGG, facenet, main
from test_surgery import check_exact, zero_removed_inputs
import nets

# Published sizes of the source's face nets (params).
TARGETS = {"squeezenet": 1.24e6, "mobilenetv2": 3.5e6, "resnet50": 23.5e6}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """{net: (prototxt path, random weights)}, made once."""
    folder = tmp_path_factory.mktemp("facenets")
    out = {}
    for name in NETS:
        proto = str(folder / (name + ".prototxt"))
        main(["--net", name, "-o", proto])
        out[name] = proto, nets.random_weights(proto, seed=len(name))
    return out


def faces(n=2, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, 112, 112)).astype(np.float32)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_sizes(built, name):
    stats = net_stats(built[name][0])
    assert stats.inputs == {"data": (3, 112, 112)}
    assert stats.layers[-1].name == "fc5" and stats.layers[-1].shape == (512,)
    params = stats.params
    if name == "mobilenetv2":  # its 3.5M is the ImageNet net, whose 1280 -> 1000 classifier outweighs fc5
        params = net_stats(facenet(name, embedding=1000)).params
    assert abs(params / TARGETS[name] - 1) < 0.1, params


def with_loss(proto, tmp_path):
    """A train copy: fc5 regressed onto a target by a EuclideanLoss."""
    net = caffe_io.read_net(proto)
    net.layer.add(name="target", type="Input", top=["target"]).input_param.shape.add().dim.extend([1, 512])
    net.layer.add(name="loss", type="EuclideanLoss", bottom=["fc5", "target"], top=["loss"])
    return caffe_io.write_net(net, str(tmp_path / "train.prototxt"))


def test_vgg_size_and_groups(built):
    """Nine 3x3 convs with BatchNorm+Scale each; stages 2-5 cost the same MACs; one group per conv."""
    proto = built["vgg"][0]
    stats = net_stats(proto)
    convs, params, c = [l for l in stats.layers if l.type == "Convolution"], 0, 3
    assert len(convs) == sum(n for _, n in VGG) == 9
    for width, n in VGG:
        params += 9 * c * width + 9 * width * width * (n - 1) + (4 * width + 1) * n  # conv, BN mean+var+factor, Scale
        c = width
    assert stats.params == params + 256 * 512 + 512
    per_stage = {}
    for l in convs:
        per_stage[l.name.split("_")[0]] = per_stage.get(l.name.split("_")[0], 0) + l.macs
    assert len({per_stage['conv%d' % k] for k in (2, 3, 4, 5)}) == 1, per_stage  # VGG's balance
    assert [l for l in stats.layers if l.name == "pool5"][0].shape == (256, 1, 1)  # global average pooling
    graph = build_graph(proto)
    assert [g.id for g in graph.prunable()] == [l.name for l in convs]
    for g in graph.prunable():
        assert g.layers("passengers") == [g.id + "/bn", g.id + "/scale"]


def test_vgg_half_width_export_equals_masked_net(built, tmp_path):
    """The channel-prioritisation exporter on the VGG-like net: level 0.5 written and reloaded == the full net
    with the dropped channels' Scale gamma and beta zeroed."""
    from test_bnscale import check_level
    proto, weights = built["vgg"]
    graph, stats = check_level(tmp_path, proto, copy.deepcopy(weights), faces(seed=3))
    assert stats.macs < net_stats(proto).macs / 3


@pytest.mark.parametrize("name", sorted(NETS))
def test_forward_backward_and_taylor_scores(built, name, tmp_path):
    """Caffe's backward reaches every prunable group; Taylor scores come out finite, one unit vector per group."""
    proto, weights = built[name]
    net = caffe.Net(with_loss(proto, tmp_path), caffe.TRAIN)
    caffe_io.load_into(net, copy.deepcopy(weights))
    groups = build_graph(proto).prunable()
    target = np.random.default_rng(1).standard_normal((2, 512)).astype(np.float32)
    scores = taylor_scores(net, groups, [{"data": faces(), "target": target}])
    assert np.isfinite(float(net.blobs["loss"].data)) and float(net.blobs["loss"].data) > 0
    assert set(scores) == {g.id for g in groups}
    for g in groups:
        assert scores[g.id].shape == (g.channels,) and np.isfinite(scores[g.id]).all()
        assert np.linalg.norm(scores[g.id]) == pytest.approx(1.0)
    net.backward()  # the rest of the way down: the first conv gets a gradient too
    first = net.params[list(net.params)[0]][0].diff
    assert np.isfinite(first).all() and np.abs(first).max() > 0


def test_squeezenet_groups_through_concat(built):
    graph = build_graph(built["squeezenet"][0])
    for fire, expand, reader in [("fire2", 64, "fire3/squeeze1x1"), ("fire4", 128, "fire5/squeeze1x1"),
                                 ("fire8", 256, "fire9/squeeze1x1"), ("fire9", 256, "conv10")]:
        e1, e3 = graph["%s/expand1x1" % fire], graph["%s/expand3x3" % fire]
        assert e1.prunable and e3.prunable and e1.channels == e3.channels == expand
        (c1,), (c3,) = e1.consumers, e3.consumers
        assert c1.layer == c3.layer == reader  # after a max pool for fire4 and fire8
        assert (c1.start, c3.start) == (0, expand)  # the second half of the Concat
    assert graph["conv10"].layers("consumers") == ["fc5"]


def test_mobilenetv2_groups_through_depthwise_and_residuals(built):
    graph = build_graph(built["mobilenetv2"][0])
    expand = graph["block4_2/expand"]
    assert expand.layers("passengers") == ["block4_2/expand/bn", "block4_2/expand/scale", "block4_2/dw",
                                           "block4_2/dw/bn", "block4_2/dw/scale"]
    assert expand.layers("consumers") == ["block4_2/project"]
    stream = graph["block4_1/project"]  # 32 channels, three blocks tied by two Eltwise SUMs
    assert stream.channels == 32 and stream.layers("producers") == [
        "block4_1/project", "block4_2/project", "block4_3/project"]
    assert stream.layers("consumers") == ["block4_2/expand", "block4_3/expand", "block5_1/expand"]
    assert graph["conv1"].layers("consumers") == ["block2_1/project"]  # t = 1: depthwise straight on conv1
    assert "gdconv" in graph["conv_last"].layers("passengers")


def test_resnet50_stages_are_one_group_each(built):
    graph = build_graph(built["resnet50"][0])
    streams = [g for g in graph.groups.values() if any(s.layer.endswith("branch1") for s in g.producers)]
    assert [g.id for g in streams] == ["res2a_branch1", "res3a_branch1", "res4a_branch1", "res5a_branch1"]
    for g, (stage, width, blocks) in zip(streams, [(2, 64, 3), (3, 128, 4), (4, 256, 6), (5, 512, 3)]):
        units = ["res%d%s" % (stage, "abcdef"[k]) for k in range(blocks)]
        assert g.prunable and g.channels == 4 * width
        assert g.layers("producers") == ["res%da_branch1" % stage] + [u + "_branch2c" for u in units]
        last = ["fc5"] if stage == 5 else ["res%da_branch1" % (stage + 1), "res%da_branch2a" % (stage + 1)]
        assert g.layers("consumers") == [u + "_branch2a" for u in units[1:]] + last
    assert len(graph.prunable()) == 4 + 2 * 16 + 1  # streams, two inner groups per bottleneck, conv1


@pytest.mark.parametrize("name,seed", [("vgg", 3), ("squeezenet", 0), ("mobilenetv2", 1)])
def test_exact_pruning_every_group(built, name, seed, tmp_path):
    """Every prunable group loses channels at random: the pruned net equals the zeroed original (Caffe, OpenCV)."""
    proto, weights = built[name]
    graph, keep, net2 = check_exact(tmp_path, proto, weights, faces(), seed=seed)
    assert len(keep) == len(graph.prunable())


def test_exact_pruning_resnet50(built, tmp_path):
    """A residual stream (projection shortcut, identity shortcuts, next stage) and an inner group."""
    proto, weights = built["resnet50"]
    net = caffe_io.read_net(proto)
    graph = build_graph(net, proto)
    rng = np.random.default_rng(2)
    keep = {gid: np.sort(rng.choice(graph[gid].channels, graph[gid].channels // 2, replace=False))
            for gid in ("res3a_branch1", "res4b_branch2a")}
    net2, weights2 = prune_net(net, weights, keep, graph=graph)
    p2, m2 = save_pruned(net2, weights2, str(tmp_path / "p.prototxt"), str(tmp_path / "p.caffemodel"),
                         inputs=(proto,))
    x = faces(1)
    reference = nets.caffe_forward(proto, zero_removed_inputs(graph, weights, keep), x)["fc5"]
    pruned = nets.caffe_forward(p2, m2, x)["fc5"]
    assert nets.rel_err(pruned, reference) < 1e-4
    assert net_stats(p2).params < net_stats(proto).params - 256 * 512  # res3's 512-wide stream lost 256
