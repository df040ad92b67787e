"""Surgery: pruned nets compute exactly what the original computes without the removed channels.

The reference is the ORIGINAL net, in real Caffe, with the weights of every
consumer for the removed input channels set to zero; the pruned net (written
to disk, loaded by real Caffe and by OpenCV's DNN module) must match it.
"""
import copy
import os

import numpy as np
import pytest

from conftest import shared_path
from base import caffe_io
from prune.graph import build_graph
from prune.surgery import PlanError, prune_net, save_pruned
import nets

MFN = ("models", "mobilefacenet", "mobilefacenet-v0")


def random_keep(graph, rng):
    """Every prunable group loses a random, non-empty, non-total subset."""
    keep = {}
    for g in graph.prunable():
        count = int(rng.integers(1, g.channels))
        keep[g.id] = np.sort(rng.choice(g.channels, size=count, replace=False))
    return keep


def zero_removed_inputs(graph, weights, keep):
    ref = copy.deepcopy(weights)
    for gid, kept in keep.items():
        group = graph[gid]
        gone = np.setdiff1d(np.arange(group.channels), kept)
        for c in group.consumers:
            w = ref[c.layer][c.blob]
            index = [slice(None)] * w.ndim
            index[c.axis] = c.indices(gone)
            w[tuple(index)] = 0
    return ref


def check_exact(tmp_path, proto, weights, x, seed=0):
    """Prune every group at random; pruned == zeroed original, in Caffe and in OpenCV."""
    net = caffe_io.read_net(proto)
    graph = build_graph(net, proto)
    keep = random_keep(graph, np.random.default_rng(seed))
    net2, weights2 = prune_net(net, weights, keep, graph=graph)
    p2, m2 = save_pruned(net2, weights2, str(tmp_path / "pruned.prototxt"), str(tmp_path / "pruned.caffemodel"),
                         inputs=(proto,))
    reference = nets.caffe_forward(proto, zero_removed_inputs(graph, weights, keep), x)
    original = nets.caffe_forward(proto, weights, x)
    pruned = nets.caffe_forward(p2, m2, x)
    assert set(pruned) == set(reference)
    for name in reference:
        assert nets.rel_err(pruned[name], reference[name]) < 1e-4, name
        assert nets.rel_err(pruned[name], original[name]) > 1e-2, "pruning changed nothing?"
    (out,) = pruned.values()
    assert nets.rel_err(nets.opencv_forward(p2, m2, x).reshape(out.shape), out) < 1e-4
    size = sum(a.size for arrays in weights2.values() for a in arrays)
    assert size < sum(a.size for arrays in weights.values() for a in arrays)
    return graph, keep, net2


def small(tmp_path, builder):
    proto = caffe_io.write_net(builder(), str(tmp_path / "net.prototxt"))
    shape = tuple(caffe_io.read_net(proto).layer[0].input_param.shape[0].dim)
    x = np.random.default_rng(1).standard_normal((2,) + shape[1:]).astype(np.float32)
    return proto, nets.random_weights(proto), x


def test_exact_concat_net(tmp_path):
    proto, weights, x = small(tmp_path, nets.concat_net)
    graph, keep, net2 = check_exact(tmp_path, proto, weights, x)
    layers = {l.name: l for l in net2.layer}
    n_cat = len(keep["a"]) + len(keep["b"])
    assert layers["dw"].convolution_param.num_output == layers["dw"].convolution_param.group == n_cat
    assert layers["up"].convolution_param.num_output == len(keep["up"])


def test_exact_flatten_net(tmp_path):
    proto, weights, x = small(tmp_path, nets.flatten_net)
    graph, keep, net2 = check_exact(tmp_path, proto, weights, x)
    reshape = next(l for l in net2.layer if l.name == "r")
    assert list(reshape.reshape_param.shape.dim) == [0, 12 * len(keep["c2"])]


@pytest.mark.parametrize("depth", [10, 20])
def test_exact_sphereface(tmp_path, depth):
    proto = nets.sphereface_path(depth)
    if not os.path.exists(proto):
        pytest.skip("generated SphereFace prototxt not present")
    x = np.random.default_rng(2).standard_normal((2, 3, 112, 96)).astype(np.float32)
    graph, keep, net2 = check_exact(tmp_path, proto, nets.random_weights(proto, seed=depth), x, seed=depth)
    assert len(keep) == {10: 7, 20: 12}[depth]


def lfw_faces(count):
    import cv2
    root = shared_path("data", "lfw", "images-112x112")
    people = sorted(os.listdir(root))[:count]
    faces = [cv2.imread(os.path.join(root, p, p + "_0001.jpg"))[:, :, ::-1] for p in people]
    return ((np.stack(faces).transpose(0, 3, 1, 2).astype(np.float32) - 127.5) * 0.0078125)


def test_exact_mobilefacenet(tmp_path):
    proto = shared_path(*MFN[:2], MFN[2] + ".prototxt")
    weights = caffe_io.read_weights(shared_path(*MFN[:2], MFN[2] + ".caffemodel"))
    graph, keep, net2 = check_exact(tmp_path, proto, weights, lfw_faces(2), seed=3)
    assert len(keep) == 20


# ------------------------------------------------------------------ bad plans and files

@pytest.fixture
def concat(tmp_path):
    proto, weights, x = small(tmp_path, nets.concat_net)
    return caffe_io.read_net(proto), weights, proto


@pytest.mark.parametrize("keep,message", [
    ({"up": [0, 4]}, r"group 'up' has channels 0..3; 4 out of range"),
    ({"up": [-1, 2]}, r"-1 out of range"),
    ({"up": []}, r"group 'up' would lose all its 4 channels"),
    ({"up": [1, 1, 2]}, r"channel\(s\) 1 listed twice"),
    ({"up": [0.5]}, r"must be integers"),
    ({"conv9": [0]}, r"no channel group 'conv9' \(prunable groups: c1, a, b, up, e\)"),
    ({"fc": [0, 1]}, r"group 'fc' cannot be pruned: reaches the net output 'fc'"),
])
def test_bad_keep_lists(concat, keep, message):
    net, weights, _ = concat
    with pytest.raises(PlanError, match=message):
        prune_net(net, weights, keep)


def test_keeping_everything_of_a_fixed_group_is_fine(concat):
    net, weights, _ = concat
    net2, weights2 = prune_net(net, weights, {"fc": [4, 3, 2, 1, 0], "data": range(3)})
    assert net2 == net
    assert all(np.array_equal(a, b) for k in weights for a, b in zip(weights[k], weights2[k]))


def test_weights_not_matching_the_net_are_named(concat, tmp_path):
    net, weights, proto = concat
    bad = copy.deepcopy(weights)
    bad["e"][0] = bad["e"][0][:, :5]
    with pytest.raises(caffe_io.CaffeFileError, match=r"layer 'e' blob 0 has shape \(3, 5, 3, 3\), .* expects \(3, 8, 3, 3\)"):
        prune_net(net, bad, {"up": [0, 1]})
    # a caffemodel on disk that belongs to another net, loaded for a check
    model = caffe_io.write_weights(net, bad, str(tmp_path / "other.caffemodel"))
    with pytest.raises(caffe_io.CaffeFileError, match=r"other.caffemodel: layer 'e' blob 0 has shape"):
        caffe_io.open_net(proto, model)


def test_outputs_never_overwrite_inputs(concat, tmp_path):
    net, weights, proto = concat
    model = caffe_io.write_weights(net, weights, str(tmp_path / "net.caffemodel"))
    before = open(proto, "rb").read(), open(model, "rb").read()
    net2, weights2 = prune_net(net, weights, {"up": [0, 1]})
    for p2, m2 in [(proto, str(tmp_path / "p.caffemodel")), (str(tmp_path / "p.prototxt"), model),
                   (str(tmp_path / "same"), str(tmp_path / "same"))]:
        with pytest.raises(caffe_io.CaffeFileError, match="refusing to overwrite|same path"):
            save_pruned(net2, weights2, p2, m2, inputs=(proto, model))
    assert (open(proto, "rb").read(), open(model, "rb").read()) == before
    assert not os.path.exists(tmp_path / "p.caffemodel") and not os.path.exists(tmp_path / "p.prototxt")


def test_new_consumer_weights(concat, tmp_path):
    net, weights, proto = concat
    keep = {"up": [1, 3], "e": [0, 2]}
    _, plain = prune_net(net, weights, keep)
    rows_kept = np.random.default_rng(0).standard_normal((3, 4, 3, 3)).astype(np.float32)  # inputs pruned only
    _, rescaled = prune_net(net, weights, keep, new_consumer_weights={"e": rows_kept})
    np.testing.assert_array_equal(rescaled["e"][0], rows_kept[[0, 2]])
    assert np.array_equal(rescaled["e"][1], plain["e"][1])
    _, same = prune_net(net, weights, keep, new_consumer_weights={"e": rows_kept[[0, 2]]})  # fully pruned shape
    np.testing.assert_array_equal(same["e"][0], rows_kept[[0, 2]])
    with pytest.raises(PlanError, match=r"new weights for 'e' have shape \(3, 8, 3, 3\); expected \(2, 4, 3, 3\)"):
        prune_net(net, weights, keep, new_consumer_weights={"e": weights["e"][0]})
    with pytest.raises(PlanError, match="consumes no channel group"):
        prune_net(net, weights, keep, new_consumer_weights={"bn1": weights["e"][0]})


def test_failed_check_leaves_no_files(tmp_path):
    import caffe
    from caffe import layers as L
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 8, 8]))
    n.conv = L.Convolution(n.data, num_output=4, kernel_size=3)
    n.out = L.Python(n.conv, python_param=dict(module="no_such_module_here", layer="X"))
    net = n.to_proto()
    with pytest.raises(caffe_io.CaffeFileError, match="Python layer 'out' needs module 'no_such_module_here'"):
        save_pruned(net, {}, str(tmp_path / "p.prototxt"), str(tmp_path / "p.caffemodel"))
    assert os.listdir(tmp_path) == []


def crop_net(axis=2):
    """RetinaFace's upsampling path: a deconvolution cropped to a lateral blob's size, added to it."""
    import caffe
    from caffe import layers as L
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 16, 16]))
    n.c1 = L.Convolution(n.data, num_output=8, kernel_size=3, stride=2, pad=1)
    n.c2 = L.Convolution(n.c1, num_output=6, kernel_size=3, stride=2, pad=1)
    n.up = L.Deconvolution(n.c2, convolution_param=dict(num_output=8, kernel_size=4, stride=2))
    n.crop = L.Crop(n.up, n.c1, crop_param=dict(axis=axis, offset=[1] * (4 - axis)))
    n.sum = L.Eltwise(n.crop, n.c1)
    n.head = L.Convolution(n.sum, num_output=4, kernel_size=1)
    return n.to_proto()


def test_crop_of_spatial_axes_passes_the_channels_through(tmp_path):
    proto, weights, x = small(tmp_path, crop_net)
    graph, keep, net2 = check_exact(tmp_path, proto, weights, x)
    up = next(g for g in graph.prunable() if "up" in g.layers("producers"))
    assert "c1" in up.layers("producers"), "the Eltwise after the Crop ties the upsampled and the lateral channels"
    assert any("c2" in g.layers("producers") for g in graph.prunable())
    # cropping the channel axis too: a fixed point for both bottoms, named
    proto1 = caffe_io.write_net(crop_net(axis=1), str(tmp_path / "axis1.prototxt"))
    fixed = [g for g in build_graph(caffe_io.read_net(proto1), proto1).groups.values() if not g.prunable]
    assert any("crops along axis 1" in r for g in fixed for r in g.reasons)
