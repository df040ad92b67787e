"""Channel prioritisation (issue 9, first part): the center-loss Python layer
checked by finite differences through a real caffe.Net, the BN-scale
penalties (finite differences, and a real pycaffe solver loop that moves the
gammas the expected way), the ``bnscale`` criterion and global threshold, and
the width exporter (exported sub-nets loaded in Caffe equal the masked full
net)."""
import json
import os

import numpy as np
import pytest

import caffe
from caffe import layers as L, params as P
from caffe.proto import caffe_pb2
from google.protobuf import text_format

from apps.prioritise import penalty
from finetune.centerloss import CenterLossError, center_loss, center_update, parse_params
from base import caffe_io
from prune.criteria import CriterionError, make
from prune.criteria.bnscale import global_threshold_keep, scale_gammas
from prune.graph import build_graph
from prune.sample import Evidence
from apps.prioritise.widths import WidthError, export_width, level_keep, main as widths_main, masked_weights
from prototxt.sphereface import sphereface
from conftest import shared_path
import nets
from test_surgery import zero_removed_inputs

N, D, K = 6, 4, 3


# ------------------------------------------------------------------ center loss

def center_net(tmp_path, lambda_c=0.5, alpha=0.5):
    n = caffe.NetSpec()
    n.x = L.Input(shape=dict(dim=[N, D]))
    n.label = L.Input(shape=dict(dim=[N]))
    n.closs = center_loss(n.x, n.label, K, lambda_c=lambda_c, alpha=alpha)
    proto = n.to_proto()
    proto.force_backward = True
    path = caffe_io.write_net(proto, str(tmp_path / "center.prototxt"))
    return caffe.Net(path, caffe.TRAIN), path


def feed(net, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, D)).astype(np.float32)
    labels = np.array([0, 1, 1, 2, 0, 1], dtype=np.float32)
    centers = rng.standard_normal((K, D)).astype(np.float32)
    net.blobs["x"].data[...] = x
    net.blobs["label"].data[...] = labels
    net.params["closs"][0].data[...] = centers
    return x, labels.astype(int), centers


def test_center_loss_params_and_errors(tmp_path):
    assert parse_params('{"num_output": 5}') == {"num_output": 5, "alpha": 0.5}
    for bad, words in [("", "num_output"), ('{"num_output": 0}', "num_output"), ('{"num_output": 3, "alpha": 2}',
                       "alpha"), ('{"num_output": 3, "lr": 1}', "unknown key"), ("{3}", "not JSON")]:
        with pytest.raises(CenterLossError, match=words):
            parse_params(bad)
    net, _ = center_net(tmp_path)
    feed(net)
    net.blobs["label"].data[2] = 7
    with pytest.raises(CenterLossError, match="label 7.0 of sample 2 is not a class in 0..2"):
        net.forward()


def test_center_loss_forward_and_gradient_through_caffe(tmp_path):
    lambda_c = 0.5
    net, _ = center_net(tmp_path, lambda_c=lambda_c)
    x, labels, centers = feed(net)
    assert net.blob_loss_weights["closs"] == lambda_c and net.layers[2].blobs[0].data.shape == (K, D)
    loss = float(net.forward()["closs"])
    expected = 0.5 * np.mean(np.sum((x.astype(np.float64) - centers[labels]) ** 2, axis=1))
    assert loss == pytest.approx(expected, rel=1e-5)

    # Finite differences of the weighted loss, each a real Caffe forward (forward leaves the centres alone).
    eps, numeric = 1e-2, np.zeros((N, D))
    for i in range(N):
        for j in range(D):
            for sign in (1, -1):
                net.blobs["x"].data[...] = x
                net.blobs["x"].data[i, j] += sign * eps
                numeric[i, j] += sign * lambda_c * float(net.forward()["closs"]) / (2 * eps)
    net.blobs["x"].data[...] = x
    net.forward()
    net.backward()
    np.testing.assert_allclose(net.blobs["x"].diff, numeric, rtol=2e-3, atol=1e-5)
    assert np.any(np.abs(numeric) > 1e-2)

    # ... and backward moved the centres by the paper's rule, written out sample by sample.
    want = centers.astype(np.float64).copy()
    for j in range(K):
        members = [x[i] for i in range(N) if labels[i] == j]
        delta = sum(centers[j] - m for m in members) / (1 + len(members))
        want[j] = centers[j] - 0.5 * delta
    np.testing.assert_allclose(net.params["closs"][0].data, want, rtol=1e-5, atol=1e-6)
    assert not np.any(net.params["closs"][0].diff), "the solver must not move the centres"


def test_centres_converge_to_class_means_and_are_saved(tmp_path):
    net, path = center_net(tmp_path, alpha=0.5)
    x, labels, _ = feed(net)
    for _ in range(60):
        net.forward()
        net.backward()
    means = np.stack([x[labels == j].mean(axis=0) for j in range(K)])
    np.testing.assert_allclose(net.params["closs"][0].data, means, atol=1e-4)
    model = str(tmp_path / "center.caffemodel")
    net.save(model)
    np.testing.assert_array_equal(caffe_io.read_weights(model)["closs"][0], net.params["closs"][0].data)
    spec = caffe_io.read_net(path).layer[2]
    assert (spec.param[0].lr_mult, spec.param[0].decay_mult) == (0, 0)
    assert np.allclose(center_update(means, x, labels, 0.5), means, atol=1e-6)


# ------------------------------------------------------------------ penalties

def test_penalty_gradient_by_finite_differences():
    rng = np.random.default_rng(0)
    gamma = rng.permutation(np.linspace(-1, 1, 16)) + rng.uniform(-0.01, 0.01, 16)  # no ties, no zeros
    for ls, lm in ((1e-3, 0.0), (0.0, 4e-5), (0.3, 0.7)):
        g = penalty.penalty_grad(gamma, ls, lm)
        eps = 1e-6
        numeric = [(penalty.penalty(gamma + eps * e, ls, lm) - penalty.penalty(gamma - eps * e, ls, lm)) / (2 * eps)
                   for e in np.eye(gamma.size)]
        np.testing.assert_allclose(g, numeric, atol=1e-7)
    assert penalty.penalty([1.0, 0.5, 0.8], 0.0, 1.0) == pytest.approx(0.3)
    assert penalty.penalty([1.0, -0.5], 2.0, 0.0) == pytest.approx(3.0)


def train_solver(tmp_path, lr=0.1):
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[8, 3, 8, 8]))
    n.label = L.Input(shape=dict(dim=[8]))
    n.conv = L.Convolution(n.data, num_output=4, kernel_size=3, bias_term=False, weight_filler=dict(type="xavier"))
    n.bn = L.BatchNorm(n.conv, in_place=True, param=[dict(lr_mult=0, decay_mult=0)] * 3)
    n.scale = L.Scale(n.conv, bias_term=True, in_place=True)
    n.relu = L.ReLU(n.conv, in_place=True)
    n.gp = L.Pooling(n.conv, pool=P.Pooling.AVE, global_pooling=True)
    n.fc = L.InnerProduct(n.gp, num_output=3, weight_filler=dict(type="xavier"))
    n.loss = L.SoftmaxWithLoss(n.fc, n.label)
    net_path = caffe_io.write_net(n.to_proto(), str(tmp_path / "train.prototxt"))
    sp = caffe_pb2.SolverParameter(net=net_path, base_lr=lr, lr_policy="fixed", momentum=0, weight_decay=0,
                                   type="SGD", max_iter=1000, display=0, snapshot=0, random_seed=1)
    solver_path = caffe_io.atomic_write(str(tmp_path / "solver.prototxt"), text_format.MessageToString(sp))
    solver = caffe.get_solver(solver_path)
    rng = np.random.default_rng(3)
    solver.net.blobs["data"].data[...] = rng.standard_normal((8, 3, 8, 8))
    solver.net.blobs["label"].data[...] = np.arange(8) % 3
    return solver


def run_steps(tmp_path, gamma, lambda_s, lambda_m, steps=20):
    solver = train_solver(tmp_path)
    solver.net.params["scale"][0].data[...] = gamma
    losses = [penalty.step(solver, lambda_s, lambda_m) for _ in range(steps)]
    assert solver.iter == steps
    assert all(np.isfinite(l) and l > 0 for l, _ in losses)
    return solver.net.params["scale"][0].data.copy(), losses


def test_monotone_init_and_solver_loop_moves_gammas_as_expected(tmp_path):
    solver = train_solver(tmp_path)
    assert penalty.monotone_init(solver.net) == ["scale"]
    np.testing.assert_allclose(solver.net.params["scale"][0].data, [1, 0.75, 0.5, 0.25])
    with pytest.raises(penalty.PenaltyError, match="'conv' is a Convolution"):
        penalty.scale_layers(solver.net, ["conv"])

    start = np.array([1.0, 0.5, 0.8, 0.2], dtype=np.float32)   # channels 1, 2 inverted
    plain, _ = run_steps(tmp_path / "plain", start, 0.0, 0.0)
    sparse, losses = run_steps(tmp_path / "sparse", start, 0.05, 0.0)
    # 20 SGD steps at lr 0.1 of lambda_s sign(gamma) take 0.1 off every positive gamma
    np.testing.assert_allclose(plain - sparse, 0.1, atol=0.02)
    assert losses[0][1] == pytest.approx(0.05 * start.sum(), rel=1e-5)

    mono, _ = run_steps(tmp_path / "mono", start, 0.0, 0.5)
    assert plain[2] - plain[1] > 0.15, "without the penalty the pair stays inverted"
    assert mono[2] - mono[1] < 0.06, "the monotonicity penalty repairs the inverted pair"
    # the other pairs were in order: apart from the data gradient, they are left alone
    np.testing.assert_allclose(mono[[0, 3]], plain[[0, 3]], atol=0.06)


# ------------------------------------------------------------------ criterion and widths

def bn_net(shape=(1, 3, 12, 12)):
    """A residual stream (c1, c3 with sc1, sc3) and an inner group (c2, sc2), BN + Scale + PReLU everywhere."""
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=list(shape)))
    bottom = n.data
    for i, src in ((1, None), (2, "c1"), (3, "c2")):
        conv = L.Convolution(bottom if src is None else getattr(n, src), num_output=8, kernel_size=3, pad=1,
                             bias_term=False)
        setattr(n, "c%d" % i, conv)
        setattr(n, "bn%d" % i, L.BatchNorm(conv, in_place=True))
        setattr(n, "sc%d" % i, L.Scale(conv, bias_term=True, in_place=True))
        if i != 3:
            setattr(n, "r%d" % i, L.PReLU(conv, in_place=True))
    n.sum = L.Eltwise(n.c1, n.c3)
    n.pool = L.Pooling(n.sum, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    n.fc = L.InnerProduct(n.pool, num_output=5)
    return n.to_proto()


def small_bn(tmp_path):
    proto = caffe_io.write_net(bn_net(), str(tmp_path / "bn.prototxt"))
    return proto, nets.random_weights(proto, seed=2)


def test_bnscale_criterion_and_global_threshold(tmp_path, capsys):
    proto, weights = small_bn(tmp_path)
    graph = build_graph(caffe_io.read_net(proto), proto)
    assert sorted(g.id for g in graph.prunable()) == ["c1", "c2"]
    weights["sc1"][0][:] = [0.9, -0.02, 0.5, 0.05, 0.0, 0.3, 0.01, 0.2]
    weights["sc3"][0][:] = [0.01, 0.03, -0.6, 0.02, 0.04, 0.0, 0.01, 0.0]   # the stream: max over both
    weights["sc2"][0][:] = [0.05, -0.4, 0.3, 0.02, 0.15, -0.09, 0.5, 0.11]
    np.testing.assert_allclose(scale_gammas(graph["c1"], weights), [0.9, 0.03, 0.6, 0.05, 0.04, 0.3, 0.01, 0.2],
                               rtol=1e-6)
    crit = make("bnscale")
    assert crit.select(Evidence(graph["c1"], weights), 3) == [0, 2, 5]
    assert crit.select(Evidence(graph["c2"], weights), 2) == [1, 6]
    assert global_threshold_keep(graph, weights, 0.1) == {"c1": [0, 2, 5, 7], "c2": [1, 2, 4, 6, 7]}
    assert global_threshold_keep(graph, weights, 10.0) == {"c1": [0], "c2": [6]}

    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 8, 8]))
    n.a = L.Convolution(n.data, num_output=4, kernel_size=3)
    n.r = L.PReLU(n.a, in_place=True)
    n.b = L.Convolution(n.a, num_output=2, kernel_size=3)
    g = build_graph(n.to_proto())
    with pytest.raises(CriterionError, match=r"group 'a' has no Scale layer among its passengers \(r\)"):
        make("bnscale").select(Evidence(g["a"], {}), 2)

    # Through python -m prune --threshold: the global threshold as the driver's per-group table.
    import cv2
    from prune.__main__ import main as prune_main
    model = caffe_io.write_weights(caffe_io.read_net(proto), weights, str(tmp_path / "bn.caffemodel"))
    rng = np.random.default_rng(0)
    for k in range(3):
        os.makedirs(tmp_path / "faces" / ("p%d" % k))
        cv2.imwrite(str(tmp_path / "faces" / ("p%d" % k) / "0.png"), rng.integers(0, 255, (12, 12, 3), np.uint8))
    args = ["--model", proto, "--weights", model, "--data", str(tmp_path / "faces"), "--quiet"]
    assert prune_main(args + ["--threshold", "0.1", "--out", str(tmp_path / "run")]) == 0
    steps = json.load(open(str(tmp_path / "run" / "log.json")))["steps"]
    assert {s["group"]: s["removed_channels"] for s in steps} == {"c1": [1, 3, 4, 6], "c2": [0, 3, 5]}
    assert {s["criterion"] for s in steps} == {"bnscale"}
    assert {s["chosen_by"] for s in steps} == {"plan"}          # the threshold selected once, nothing again
    plan = json.load(open(str(tmp_path / "run" / "plan.json")))
    assert plan["kept_channels"] == {"c1": [0, 2, 5, 7], "c2": [1, 2, 4, 6, 7]} and plan["keep"] == {"c1": 4, "c2": 5}
    assert plan["made_by"]["policy"] == "threshold" and plan["made_by"]["threshold"] == 0.1
    # the plan file edited by hand: c1 now keeps 6 (its chosen set no longer fits: the criterion picks 6, the
    # six largest |gamma|), c2 as the threshold chose it
    plan["keep"]["c1"] = 6
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(plan))
    assert prune_main(args + ["--plan", str(edited), "--criterion", "bnscale", "--out", str(tmp_path / "run3")]) == 0
    steps = json.load(open(str(tmp_path / "run3" / "log.json")))["steps"]
    gamma = scale_gammas(graph["c1"], weights)
    assert [(s["group"], s["kept"], s["chosen_by"]) for s in steps] == [("c1", 6, "criterion"), ("c2", 5, "plan")]
    assert steps[0]["removed_channels"] == sorted(np.argsort(gamma)[:2].tolist())
    assert steps[1]["removed_channels"] == [0, 3, 5]
    # only c2 selected: c1 stays whole
    assert prune_main(args + ["--threshold", "0.1", "--layers", "c2", "--out", str(tmp_path / "run2")]) == 0
    steps = json.load(open(str(tmp_path / "run2" / "log.json")))["steps"]
    assert [(s["group"], s["removed_channels"]) for s in steps] == [("c2", [0, 3, 5])]
    for bad, says in ((["--threshold", "0.1", "--criterion", "l1"], "needs --criterion bnscale"),
                      (["--threshold", "0.1", "--macs-target", "0.5"], "not allowed with"),
                      (["--threshold", "0"], "nothing to prune")):
        assert prune_main(args + bad + ["--out", str(tmp_path / "bad")]) == 2
        assert says in capsys.readouterr().err


def check_level(tmp_path, proto, weights, x, p=0.5):
    graph = build_graph(caffe_io.read_net(proto), proto)
    model = caffe_io.write_weights(caffe_io.read_net(proto), weights, str(tmp_path / "full.caffemodel"))
    out_p, out_m = str(tmp_path / "w.prototxt"), str(tmp_path / "w.caffemodel")
    stats = export_width(proto, model, p, out_p, out_m)
    sub = nets.caffe_forward(out_p, out_m, x)
    masked = nets.caffe_forward(proto, masked_weights(graph, weights, p), x)
    zeroed = nets.caffe_forward(proto, zero_removed_inputs(graph, weights, level_keep(graph, p)), x)
    full = nets.caffe_forward(proto, weights, x)
    for name in full:
        assert nets.rel_err(sub[name], masked[name]) < 1e-4, name
        assert nets.rel_err(sub[name], zeroed[name]) < 1e-4, name
        assert nets.rel_err(sub[name], full[name]) > 1e-2, "the level changed nothing?"
    return graph, stats


def test_exported_half_width_equals_masked_full_net(tmp_path):
    proto, weights = small_bn(tmp_path)
    x = np.random.default_rng(1).standard_normal((2, 3, 12, 12)).astype(np.float32)
    graph, stats = check_level(tmp_path, proto, weights, x)
    layers = {l.name: l for l in caffe_io.read_net(str(tmp_path / "w.prototxt")).layer}
    assert [layers[c].convolution_param.num_output for c in ("c1", "c2", "c3")] == [4, 4, 4]
    assert level_keep(graph, 0.75) == {"c1": list(range(6)), "c2": list(range(6))}
    assert {len(v) for v in level_keep(graph, 0.01).values()} == {1}
    with pytest.raises(WidthError, match="utilisation level"):
        level_keep(graph, 0)


def test_exported_sphereface10_bn_half_width(tmp_path):
    proto = caffe_io.write_net(sphereface(10, bn=True), str(tmp_path / "sf10bn.prototxt"))
    weights = nets.random_weights(proto, seed=4)
    x = np.random.default_rng(2).standard_normal((2, 3, 112, 96)).astype(np.float32)
    graph, stats = check_level(tmp_path, proto, weights, x)
    assert len(graph.prunable()) == 7
    layers = {l.name: l for l in caffe_io.read_net(str(tmp_path / "w.prototxt")).layer}
    assert [layers["conv%d_1" % s].convolution_param.num_output for s in (1, 2, 3, 4)] == [32, 64, 128, 256]


def test_widths_cli_writes_every_level_with_its_size(tmp_path, capsys):
    proto, weights = small_bn(tmp_path)
    model = caffe_io.write_weights(caffe_io.read_net(proto), weights, str(tmp_path / "bn.caffemodel"))
    out = str(tmp_path / "widths")
    assert widths_main(["--model", proto, "--weights", model, "--levels", "1,0.75,0.5", "--out", out]) == 0
    rows = json.load(open(os.path.join(out, "widths.json")))["levels"]
    assert [r["level"] for r in rows] == [1.0, 0.75, 0.5]
    assert rows[0]["macs"] > rows[1]["macs"] > rows[2]["macs"] and rows[0]["params"] > rows[2]["params"]
    for r in rows:
        assert os.path.exists(r["prototxt"]) and os.path.exists(r["caffemodel"])
    x = np.random.default_rng(5).standard_normal((1, 3, 12, 12)).astype(np.float32)
    full = nets.caffe_forward(proto, weights, x)["fc"]
    assert nets.rel_err(nets.caffe_forward(rows[0]["prototxt"], rows[0]["caffemodel"], x)["fc"], full) < 1e-6
    assert json.load(open(os.path.join(out, "widths.json")))["levels"][2]["macs"] == rows[2]["macs"]
    assert "75%" in capsys.readouterr().out
    assert widths_main(["--model", proto, "--weights", model, "--levels", "0.5,1.5", "--out", out]) == 2
    assert "--levels must be shares in (0, 1]" in capsys.readouterr().err


def test_real_mobilefacenet_half_width_equals_masked_net_on_a_real_face(tmp_path):
    """The real MobileFaceNet (BN + Scale, depthwise convs, residual streams): its 50 % level,
    written and reloaded, equals the full net with the dropped channels' gamma and beta zeroed."""
    import cv2
    proto = shared_path("models", "mobilefacenet", "mobilefacenet-v0.prototxt")
    model = shared_path("models", "mobilefacenet", "mobilefacenet-v0.caffemodel")
    face = shared_path("data", "lfw", "images-112x112", "Aaron_Eckhart", "Aaron_Eckhart_0001.jpg")
    x = ((cv2.imread(face)[:, :, ::-1].astype(np.float32) - 127.5) * 0.0078125).transpose(2, 0, 1)[None]
    graph = build_graph(caffe_io.read_net(proto), proto)
    weights = caffe_io.read_weights(model)
    assert len(global_threshold_keep(graph, weights, 0.1)) == len(graph.prunable()) == 20
    out_p, out_m = str(tmp_path / "mfn50.prototxt"), str(tmp_path / "mfn50.caffemodel")
    stats = export_width(proto, model, 0.5, out_p, out_m)
    assert stats.params < sum(a.size for arrays in weights.values() for a in arrays) / 2
    sub = nets.caffe_forward(out_p, out_m, x)["fc1"]
    masked = nets.caffe_forward(proto, masked_weights(graph, weights, 0.5), x)["fc1"]
    assert nets.rel_err(sub, masked) < 1e-4
    assert nets.rel_err(sub, nets.caffe_forward(proto, model, x)["fc1"]) > 1e-2
