"""The multi-width tower train net (issue 9): towers share every parameter
(memory and updates), tower p equals the exported p % sub-network and the
full net with the dropped channels zeroed, and the shared diff is the sum of
the towers' diffs; all in real Caffe, CPU."""

import numpy as np
import pytest

import caffe
from caffe import layers as L
from caffe.proto import caffe_pb2

from apps.prioritise.towers import TowerError, add_heads, main as towers_main, multiwidth_net, multiwidth_train_net, \
    tower_masks
from finetune.trainnet import Distill, ImageList
from base import caffe_io
from prune.graph import build_graph
from apps.prioritise.widths import export_width, masked_weights
from prototxt.sphereface import sphereface
import nets
from test_bnscale import bn_net

X = np.random.default_rng(1).standard_normal((2, 3, 12, 12)).astype(np.float32)


def euclid_heads(net, shape, loss_weights=None, emb="fc"):
    """A shared 'target' Input and one EuclideanLoss per tower against it."""
    n = caffe.NetSpec()
    n.target = L.Input(shape=dict(dim=list(shape)))
    head = list(n.to_proto().layer)
    head.append(caffe_pb2.LayerParameter(name="loss", type="EuclideanLoss", bottom=[emb, "target"], top=["loss"]))
    return add_heads(net, head, emb, loss_weights=loss_weights)


def open_train(tmp_path, net, weights, name="towers"):
    path = caffe_io.write_net(net, str(tmp_path / (name + ".prototxt")))
    cnet = caffe.Net(path, caffe.TRAIN)
    caffe_io.load_into(cnet, {k: list(v) for k, v in weights.items()})
    return cnet, path


@pytest.fixture
def bn(tmp_path):
    deploy = bn_net(shape=(2, 3, 12, 12))
    proto = caffe_io.write_net(deploy, str(tmp_path / "bn.prototxt"))
    weights = nets.random_weights(proto, seed=3)
    model = caffe_io.write_weights(deploy, weights, str(tmp_path / "bn.caffemodel"))
    return deploy, proto, weights, model


def test_towers_share_params_and_equal_exported_levels(tmp_path, bn):
    deploy, proto, weights, model = bn
    graph = build_graph(deploy)
    cnet, _ = open_train(tmp_path, multiwidth_net(deploy, graph=graph), weights)
    assert [n for n in cnet.params if n.startswith("c1")] == ["c1", "c1@75", "c1@50"]
    # one memory: data written through the full tower is what the others read
    for layer in ("c1", "bn2", "sc3", "r1", "fc"):
        for sfx in ("@75", "@50"):
            for a, b in zip(cnet.params[layer], cnet.params[layer + sfx]):
                assert np.shares_memory(a.data, b.data) and np.shares_memory(a.diff, b.diff)
    cnet.params["c2@50"][0].data[0, 0, 0, 0] = 7
    assert cnet.params["c2"][0].data[0, 0, 0, 0] == 7
    cnet.params["c2"][0].data[0, 0, 0, 0] = weights["c2"][0][0, 0, 0, 0]

    cnet.blobs["data"].data[...] = X
    out = {k: v.copy() for k, v in cnet.forward().items()}
    assert set(out) == {"fc", "fc@75", "fc@50"}
    np.testing.assert_allclose(out["fc"], nets.caffe_forward(proto, weights, X)["fc"], rtol=1e-5, atol=1e-6)
    for p, sfx in ((0.75, "@75"), (0.5, "@50")):
        stem = str(tmp_path / ("w%g" % (100 * p)))
        export_width(proto, model, p, stem + ".prototxt", stem + ".caffemodel")
        sub = nets.caffe_forward(stem + ".prototxt", stem + ".caffemodel", X)["fc"]
        masked = nets.caffe_forward(proto, masked_weights(graph, weights, p), X)["fc"]
        assert nets.rel_err(out["fc" + sfx], sub) < 1e-5, p
        assert nets.rel_err(out["fc" + sfx], masked) < 1e-5, p
        assert nets.rel_err(out["fc" + sfx], out["fc"]) > 1e-2, "the level changed nothing?"
    # masks: the consumers' inputs, first ceil(p*C) channels kept, nothing learnable
    masks = tower_masks(graph, 0.75)
    assert sorted(masks) == ["c1", "c2", "pool"]
    np.testing.assert_array_equal(masks["pool"], [1] * 6 + [0] * 2)
    assert "c1@50/mask" in cnet._layer_names and "c1@50/mask" not in cnet.params


@pytest.mark.parametrize("bn_on", [False, True])
def test_sphereface10_towers_equal_exported_levels(tmp_path, bn_on):
    """Residual streams, PReLU without BN (masks after the passengers still exact), BN + Scale."""
    deploy = sphereface(10, widths=(8, 16, 16, 16), embedding=16, bn=bn_on)
    proto = caffe_io.write_net(deploy, str(tmp_path / "sf10.prototxt"))
    weights = nets.random_weights(proto, seed=5)
    model = caffe_io.write_weights(deploy, weights, str(tmp_path / "sf10.caffemodel"))
    x = np.random.default_rng(2).standard_normal((1, 3, 112, 96)).astype(np.float32)
    cnet, _ = open_train(tmp_path, multiwidth_net(deploy, levels=(1.0, 0.5)), weights)
    cnet.blobs["data"].data[...] = x
    out = cnet.forward()
    export_width(proto, model, 0.5, str(tmp_path / "h.prototxt"), str(tmp_path / "h.caffemodel"))
    sub = nets.caffe_forward(str(tmp_path / "h.prototxt"), str(tmp_path / "h.caffemodel"), x)["fc5"]
    assert nets.rel_err(out["fc5@50"], sub) < 1e-5
    assert nets.rel_err(out["fc5"], nets.caffe_forward(proto, weights, x)["fc5"]) < 1e-5


def grads(tmp_path, deploy, weights, loss_weights, target):
    cnet, _ = open_train(tmp_path, euclid_heads(multiwidth_net(deploy), target.shape, loss_weights), weights,
                         name="g%s" % "_".join(map(str, loss_weights)))
    cnet.blobs["data"].data[...] = X
    cnet.blobs["target"].data[...] = target
    cnet.clear_param_diffs()
    cnet.forward()
    cnet.backward()
    return cnet, {k: [b.diff.copy() for b in v] for k, v in cnet.params.items() if "@" not in k}


def test_shared_diff_is_the_sum_of_the_towers_diffs(tmp_path, bn):
    deploy, _, weights, _ = bn
    target = np.random.default_rng(4).standard_normal((2, 5)).astype(np.float32)
    cnet, total = grads(tmp_path, deploy, weights, (1, 1, 1), target)
    assert {k for k, v in cnet.blob_loss_weights.items() if v} == {"loss", "loss@75", "loss@50"}
    alone = [grads(tmp_path, deploy, weights, lw, target)[1] for lw in ((1, 0, 0), (0, 1, 0), (0, 0, 1))]
    for layer in ("c1", "c2", "c3", "r1", "r2", "fc"):
        for i, d in enumerate(total[layer]):
            parts = [a[layer][i] for a in alone]
            assert all(np.abs(p).max() > 0 for p in parts), (layer, i)
            np.testing.assert_allclose(d, sum(parts), rtol=1e-4, atol=1e-6 * np.abs(d).max())
    # tower 50 alone: the dropped half of every group gets no gradient, the kept half does
    half = alone[2]
    assert not half["c1"][0][4:].any() and np.abs(half["c1"][0][:4]).min() > 0
    assert not half["c2"][0][4:].any() and not half["c2"][0][:, 4:].any()
    assert not half["fc"][0].reshape(5, 8, 36)[:, 4:].any()
    # frozen BN and Scale: Caffe computes no update for them
    assert not total["sc1"][0].any() and not total["bn1"][0].any()


def test_one_sgd_step_on_tower_50_moves_the_shared_weights(tmp_path, bn):
    deploy, _, weights, _ = bn
    path = caffe_io.write_net(euclid_heads(multiwidth_net(deploy), (2, 5), (0, 0, 1)), str(tmp_path / "t.prototxt"))
    solver_path = caffe_io.atomic_write(str(tmp_path / "solver.prototxt"),
                                        'net: "%s"\nbase_lr: 0.1\nlr_policy: "fixed"\nmomentum: 0\n'
                                        'weight_decay: 0\nmax_iter: 1\nsnapshot_after_train: false\n' % path)
    solver = caffe.SGDSolver(solver_path)
    caffe_io.load_into(solver.net, {k: list(v) for k, v in weights.items()})
    solver.net.blobs["data"].data[...] = X
    solver.net.blobs["target"].data[...] = 1
    solver.step(1)
    w = solver.net.params["c1"][0].data
    assert np.abs(w[:4] - weights["c1"][0][:4]).max() > 1e-4
    np.testing.assert_array_equal(w[4:], weights["c1"][0][4:])
    np.testing.assert_array_equal(solver.net.params["c1@50"][0].data, w)
    np.testing.assert_array_equal(solver.net.params["sc1"][0].data, weights["sc1"][0])


def test_train_net_with_distill_table_head_per_tower(tmp_path, bn):
    import cv2
    deploy, _, weights, _ = bn
    rng = np.random.default_rng(0)
    for i in range(4):
        cv2.imwrite(str(tmp_path / ("f%d.png" % i)), rng.integers(0, 255, (12, 12, 3), dtype=np.uint8))
    listing = caffe_io.atomic_write(str(tmp_path / "list.txt"), "".join("f%d.png %d\n" % (i, i) for i in range(4)))
    data = ImageList(listing, root_folder=str(tmp_path), batch_size=2, mirror=False, shuffle=False)
    table = str(tmp_path / "table.npy")
    np.save(table, rng.standard_normal((4, 6)).astype(np.float32))
    head = Distill(teacher=None, embedding="fc", teacher_embedding="emb", student_dim=5, teacher_dim=6, table=table)
    net = multiwidth_train_net(deploy, data, head, loss_weights=(1, 0.5, 0.25))
    names = [l.name for l in net.layer]
    assert names.count("teacher/emb") == 1 and names.count("teacher_l2") == 1 and names.count("data") == 1
    cnet, _ = open_train(tmp_path, net, weights)
    assert {k: v for k, v in cnet.blob_loss_weights.items() if v} == {
        "distill_loss": 1, "distill_loss@75": 0.5, "distill_loss@50": 0.25}
    assert np.shares_memory(cnet.params["distill_proj"][0].data, cnet.params["distill_proj@50"][0].data)
    out = cnet.forward()
    losses = [float(out[k]) for k in ("distill_loss", "distill_loss@75", "distill_loss@50")]
    assert all(0 < v < 2 for v in losses) and len(set(losses)) == 3


def test_errors_and_cli(tmp_path, bn, capsys):
    deploy, proto, weights, model = bn
    for levels, words in [((0.75, 0.5), "full tower"), ((1.0, 1.2), r"\(0, 1\]"), ((1.0, 0.5, 0.5), "repeat")]:
        with pytest.raises(TowerError, match=words):
            multiwidth_net(deploy, levels)
    with pytest.raises(TowerError, match="one number >= 0 per level"):
        euclid_heads(multiwidth_net(deploy), (2, 5), (1, 1))
    with pytest.raises(TowerError, match="embedding blob 'fc5' of level 1 is not in the net"):
        euclid_heads(multiwidth_net(deploy), (2, 5), emb="fc5")
    out = str(tmp_path / "towers.prototxt")
    towers_main(["--model", proto, "--levels", "1,0.5", "--out", out])
    assert "2 towers" in capsys.readouterr().out
    outs = nets.caffe_forward(out, model, X)
    assert set(outs) == {"fc", "fc@50"}
    assert towers_main(["--model", proto, "--out", proto]) == 2
    assert "it would be overwritten" in capsys.readouterr().err
