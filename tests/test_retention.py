"""The closed-form recovery steps on real Caffe: least-squares reconstruction, targets from the
unpruned net, BatchNorm re-estimation, the MACs model, sensitivity allocation and plan files."""
import json
import os

import caffe
import numpy as np
import pytest
from caffe import layers as L, params as P

from base import caffe_io
from prune import bnstats
from prune.driver import PruneJob, run
from prune.reconstruct import cut
from prune.graph import build_graph
from prune.macs import MacsModel
from prune.sample import Targets, collect
from prune.plans import PlanSpec, make as make_plan
from prune.sensitivity import SensitivityError, allocate
from prune.stats import net_stats
from prune.surgery import prune_net
from nets import caffe_forward, random_weights, rel_err, sphereface_path, concat_net


def _write(proto, path):
    with open(path, "w") as f:
        f.write(str(proto))
    return str(path)


def _images(n, shape, seed=0):
    return np.random.default_rng(seed).normal(0, 1, (n,) + shape).astype(np.float32)


def _batches(x, size):
    return lambda: (x[i:i + size] for i in range(0, len(x), size))


def linear_pair_net():
    """a (3x3, 8 outputs, linear) -> b (3x3, 6 outputs): b's inputs live in a's output space."""
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 10, 10]))
    n.a = L.Convolution(n.data, num_output=8, kernel_size=3, pad=1)
    n.b = L.Convolution(n.a, num_output=6, kernel_size=3, stride=2, pad=1, dilation=1)
    n.out = L.InnerProduct(n.b, num_output=4)
    return n.to_proto()


@pytest.mark.parametrize("consumer", ["b", "out"])
def test_full_least_squares_is_exact_when_removed_channels_are_combinations_of_kept_ones(tmp_path, consumer):
    """Channels 5..7 of the producer are linear combinations of 0..4 (weights and biases), so the
    consumer's output is reachable from 0..4 alone: the least squares finds it (ridge 0)."""
    proto = _write(linear_pair_net(), tmp_path / "net.prototxt")
    net = caffe_io.read_net(proto)
    weights = random_weights(proto, seed=1)
    producer = "a" if consumer == "b" else "b"
    rng = np.random.default_rng(2)
    channels = weights[producer][0].shape[0]
    kept = list(range(channels - 3))
    mix = rng.normal(0, 1, (3, len(kept)))
    for i in range(2):
        w = weights[producer][i].astype(np.float64)
        w[len(kept):] = np.tensordot(mix, w[kept], axes=1)
        weights[producer][i] = w.astype(np.float32)
    graph = build_graph(net)
    group = graph[producer]
    x = _images(120, (3, 10, 10))     # an InnerProduct gives one sample per image: more than its 76 unknowns
    ev = collect(net, weights, group, _batches(x, 40)(), seed=3, targets=Targets(net=None, positions=20))
    net2, weights2, errors = cut(net, weights, graph, group, ev, kept, "full", ridge=0.0)
    assert errors[consumer]["target_after"] < 1e-10
    pruned = _write(net2, tmp_path / "pruned.prototxt")
    held = _images(5, (3, 10, 10), seed=9)
    want = caffe_forward(proto, weights, held)["out"]
    got = caffe_forward(pruned, weights2, held)["out"]
    assert rel_err(got, want) < 1e-6
    # ThiNet's one scale per channel cannot do this
    _, scaled, _ = cut(net, weights, graph, group, ev, kept, "scale")
    assert rel_err(caffe_forward(pruned, scaled, held)["out"], want) > 1e-2


def bn_net():
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 8, 8]))
    n.c1 = L.Convolution(n.data, num_output=5, kernel_size=3, pad=1)
    n.bn1 = L.BatchNorm(n.c1)
    n.sc1 = L.Scale(n.bn1, bias_term=True, in_place=True)
    n.r1 = L.PReLU(n.bn1, in_place=True)
    n.c2 = L.Convolution(n.bn1, num_output=4, kernel_size=3, stride=2)
    n.bn2 = L.BatchNorm(n.c2)
    n.out = L.InnerProduct(n.bn2, num_output=3)
    return n.to_proto()


def _blob_stats(proto, weights, x, blob):
    cnet = caffe.Net(proto, caffe.TEST)
    caffe_io.load_into(cnet, weights)
    cnet.blobs["data"].reshape(*x.shape)
    cnet.forward(data=x)
    a = np.array(cnet.blobs[blob].data, dtype=np.float64)
    return a.mean(axis=(0, 2, 3)), a.var(axis=(0, 2, 3))


def test_batchnorm_reestimation_reproduces_numpy_mean_and_variance(tmp_path):
    proto = _write(bn_net(), tmp_path / "bn.prototxt")
    net = caffe_io.read_net(proto)
    weights = random_weights(proto, seed=4)
    x = _images(12, (3, 8, 8), seed=5) * 2 + 0.5
    # several batches: the first layer's statistics are those of all images together (between-batch
    # spread of the means included)
    new = bnstats.reestimate(net, weights, _batches(x, 5)())
    mean, var = _blob_stats(proto, weights, x, "c1")
    np.testing.assert_allclose(new["bn1"][0], mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(new["bn1"][1], var, rtol=1e-4, atol=1e-6)
    assert new["bn1"][2][0] == 1
    # one batch: every layer's statistics are numpy's of what reaches it in the re-estimated net
    new = bnstats.reestimate(net, weights, [x])
    for bn, bottom in (("bn1", "c1"), ("bn2", "c2")):
        mean, var = _blob_stats(proto, new, x, bottom)
        np.testing.assert_allclose(new[bn][0], mean, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(new[bn][1], var, rtol=1e-4, atol=1e-6)
    assert np.array_equal(new["c2"][0], weights["c2"][0])          # nothing else changes
    with pytest.raises(bnstats.BNStatsError):
        bnstats.reestimate(caffe_io.read_net(_write(linear_pair_net(), tmp_path / "l.prototxt")), {}, [x])


@pytest.mark.parametrize("make", [lambda: caffe_io.read_net(sphereface_path(20)), concat_net])
def test_macs_model_equals_prune_stats_after_surgery(tmp_path, make):
    proto = _write(make(), tmp_path / "net.prototxt")
    net = caffe_io.read_net(proto)
    weights = random_weights(proto)
    model = MacsModel(net)
    rng = np.random.default_rng(6)
    for _ in range(3):
        kept = {g: int(rng.integers(1, c + 1)) for g, c in model.channels().items()}
        net2, _ = prune_net(net, weights, {g: list(range(k)) for g, k in kept.items()})
        assert model.macs(kept) == pytest.approx(net_stats(net2).macs, rel=1e-12)


def _curves(model, seed=0):
    """Made-up damage curves of every group, convex and of different steepness."""
    rng = np.random.default_rng(seed)
    ratios = (0.125, 0.25, 0.5, 0.75)
    curves = {}
    for g, c in model.channels().items():
        k = rng.uniform(0.01, 1.0)
        curves[g] = {"channels": c, "damage": {"%g" % r: k * (1 - r) ** 2 for r in ratios}}
    return {"ratios": list(ratios), "curves": curves}


@pytest.mark.parametrize("target", [0.7, 0.5, 0.35])
def test_allocator_meets_the_macs_target_within_one_percent_and_keeps_every_group(target):
    model = MacsModel(caffe_io.read_net(sphereface_path(20)))
    record = _curves(model)
    kept = allocate(record, model, target)
    share = model.share(kept)
    assert target - 0.01 <= share <= target
    assert all(k >= 1 for k in kept.values())
    # cheap groups are cut harder than expensive ones
    steep = max(record["curves"], key=lambda g: record["curves"][g]["damage"]["0.5"])
    flat = min(record["curves"], key=lambda g: record["curves"][g]["damage"]["0.5"])
    assert kept[steep] / model.channels()[steep] >= kept[flat] / model.channels()[flat]
    with pytest.raises(SensitivityError, match="out of reach"):
        allocate(record, model, 0.001)


def small_residual_net():
    """Two residual stages with BatchNorm, the shape of the face nets at toy size."""
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 16, 16]))
    n.c1 = L.Convolution(n.data, num_output=12, kernel_size=3, stride=2, pad=1)
    n.r1 = L.PReLU(n.c1, in_place=True)
    n.u1 = L.Convolution(n.c1, num_output=16, kernel_size=3, pad=1)
    n.b1 = L.BatchNorm(n.u1, in_place=True)
    n.ru1 = L.PReLU(n.u1, in_place=True)
    n.u2 = L.Convolution(n.u1, num_output=12, kernel_size=3, pad=1)
    n.ru2 = L.PReLU(n.u2, in_place=True)
    n.s1 = L.Eltwise(n.c1, n.u2)
    n.c2 = L.Convolution(n.s1, num_output=16, kernel_size=3, stride=2, pad=1)
    n.r2 = L.PReLU(n.c2, in_place=True)
    n.v1 = L.Convolution(n.c2, num_output=20, kernel_size=1)
    n.rv1 = L.PReLU(n.v1, in_place=True)
    n.v2 = L.Convolution(n.v1, num_output=16, kernel_size=3, pad=1)
    n.s2 = L.Eltwise(n.c2, n.v2)
    n.fc = L.InnerProduct(n.s2, num_output=8)
    return n.to_proto()


def low_dimensional_images(n, seed, factors=3, shape=(3, 16, 16)):
    """Images that vary along a few directions only, as aligned faces do: channels of any layer then carry
    overlapping information, which is what lets a later layer make up for an earlier cut."""
    basis = np.random.default_rng(99).normal(0, 1, (factors,) + shape)
    rng = np.random.default_rng(seed)
    x = np.einsum("nk,k...->n...", rng.normal(0, 1, (n, factors)), basis)
    return (x + 0.05 * rng.normal(0, 1, x.shape)).astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1])
def test_targets_from_the_unpruned_net_beat_targets_from_the_pruned_one(tmp_path, seed):
    """Every group of a small residual net cut to half, consumers refitted by least squares: towards the
    unpruned net's outputs the end-to-end error is far below that of ThiNet's targets (the pruned net's own
    outputs), which lock every earlier error in."""
    proto = _write(small_residual_net(), tmp_path / "res.prototxt")
    weights = random_weights(proto, seed=seed)
    model = caffe_io.write_weights(caffe_io.read_net(proto), weights, str(tmp_path / "res.caffemodel"))
    x, held = low_dimensional_images(256, 1), low_dimensional_images(64, 2)
    want = caffe_forward(proto, weights, held)["fc"]
    errors = {}
    for targets in ("original", "current"):
        job = PruneJob(model=proto, weights=model, out=str(tmp_path / targets), plan=make_plan(PlanSpec(), proto),
                       targets=targets)
        log = run(job, _batches(x, 64), progress=False)
        assert len(log["steps"]) == 4
        got = caffe_forward(log["prototxt"], log["caffemodel"], held)["fc"]
        errors[targets] = float(np.mean((got - want) ** 2) / np.mean(want ** 2))
    assert errors["original"] < 0.6 * errors["current"], errors


def test_sensitivity_cli_writes_curves_and_a_plan_that_prune_runs(tmp_path):
    """python -m prune.sensitivity on a small residual net and generated faces: a curve per group, a plan
    for half the MACs, and python -m prune --plan turns that plan into exactly those channel counts."""
    from apps.synthetic import make_dataset
    from prune.__main__ import main as prune_main
    from prune.sensitivity.__main__ import main as sensitivity_main
    images, _ = make_dataset(str(tmp_path / "data"), identities_per_fold=2, images_per_identity=3, size=16,
                             pairs_per_fold=2)
    proto = _write(small_residual_net(), tmp_path / "res.prototxt")
    model = caffe_io.write_weights(caffe_io.read_net(proto), random_weights(proto, seed=11),
                                   str(tmp_path / "res.caffemodel"))
    out = tmp_path / "sens"
    args = ["--model", proto, "--weights", model, "--blob", "fc", "--data", images, "--crop", "none", "--images",
            "40", "--judge-images", "16", "--ratios", "0.25,0.5,0.75", "--macs-target", "0.5", "--out", str(out),
            "--quiet"]
    assert sensitivity_main(args) == 0
    record = json.loads((out / "sensitivity.json").read_text())
    macs = MacsModel(caffe_io.read_net(proto))
    assert set(record["curves"]) == set(macs.channels())
    for curve in record["curves"].values():
        damage = [curve["damage"][r] for r in ("0.25", "0.5", "0.75")]
        assert all(d >= 0 for d in damage) and damage[0] > damage[2]     # cutting more hurts more
    assert (out / "sensitivity.png").stat().st_size > 0
    content = json.loads((out / "plan.json").read_text())
    assert 0.45 <= content["made_by"]["macs_share"] <= 0.5       # a toy: one channel is over 1% of its MACs
    assert content["made_by"]["policy"] == "sensitivity" and content["made_by"]["net"] == proto
    run_dir = tmp_path / "run"
    assert prune_main(["--model", proto, "--weights", model, "--data", images, "--crop", "none", "--images", "20",
                       "--plan", str(out / "plan.json"), "--out", str(run_dir), "--quiet"]) == 0
    pruned = caffe_io.read_net(str(run_dir / "pruned.prototxt"))
    graph = build_graph(pruned)
    for gid, c in macs.channels().items():
        assert graph[gid].channels == content["keep"].get(gid, c)
        assert content["channels"].get(gid, c) == c
    for gid, k in content["keep"].items():
        assert content["ratios"][gid] == pytest.approx(k / content["channels"][gid], abs=1e-6)
    assert net_stats(pruned).macs / macs.total == pytest.approx(content["made_by"]["macs_share"])
    assert sensitivity_main(args) == 0                                   # a finished analysis is read back
    taylor = tmp_path / "sens_taylor"                  # a criterion that needs Caffe's backward pass works too
    assert sensitivity_main(args[:-3] + ["--criterion", "taylor", "--out", str(taylor), "--quiet"]) == 0
    curves = json.loads((taylor / "sensitivity.json").read_text())["curves"]
    assert set(curves) == set(record["curves"])
    assert all(curve["damage"]["0.25"] > curve["damage"]["0.75"] >= 0 for curve in curves.values())


def test_driver_reestimates_batchnorm_at_the_end_and_after_each_cut(tmp_path):
    proto = _write(bn_net(), tmp_path / "bn.prototxt")
    model = caffe_io.write_weights(caffe_io.read_net(proto), random_weights(proto, seed=13),
                                   str(tmp_path / "bn.caffemodel"))
    x = _images(24, (3, 8, 8), seed=14)
    logs = {}
    for when in ("none", "end", "each"):
        job = PruneJob(model=proto, weights=model, out=str(tmp_path / when), plan=make_plan(PlanSpec(), proto),
                       bn_reestimate=when)
        logs[when] = run(job, _batches(x, 8), progress=False)
    last = logs["end"]["steps"][-1]
    net = caffe_io.read_net(last["prototxt"])
    want = bnstats.reestimate(net, caffe_io.read_weights(last["caffemodel"]), _batches(x, 8)())
    got = caffe_io.read_weights(logs["end"]["caffemodel"])
    for bn in ("bn1", "bn2"):
        for a, b in zip(got[bn], want[bn]):
            np.testing.assert_allclose(a, b, rtol=1e-5)
    plain = caffe_io.read_weights(logs["none"]["caffemodel"])
    assert not np.allclose(plain["bn2"][0], got["bn2"][0])
    # after each cut: the step's own checkpoint already holds measured statistics
    first = logs["each"]["steps"][0]
    w = caffe_io.read_weights(first["caffemodel"])
    mean, var = _blob_stats(first["prototxt"], w, np.concatenate(list(_batches(x, 24)())), "c1")
    np.testing.assert_allclose(w["bn1"][0], mean, rtol=1e-4, atol=1e-6)


def test_sensitivity_shards_merged_give_the_one_run_analysis_and_plan(tmp_path, capsys):
    """--shard I/N measures every N-th group; --merge of the N folders writes the sensitivity.json and plan.json
    one run writes; a merge that misses a shard, or a shard asked for a plan, is one line."""
    from apps.synthetic import make_dataset
    from prune.sensitivity.__main__ import main as sensitivity_main
    images, _ = make_dataset(str(tmp_path / "data"), identities_per_fold=2, images_per_identity=3, size=16,
                             pairs_per_fold=2)
    proto = _write(small_residual_net(), tmp_path / "res.prototxt")
    model = caffe_io.write_weights(caffe_io.read_net(proto), random_weights(proto, seed=11),
                                   str(tmp_path / "res.caffemodel"))
    args = ["--model", proto, "--weights", model, "--blob", "fc", "--data", images, "--crop", "none", "--images",
            "40", "--judge-images", "16", "--ratios", "0.25,0.5", "--quiet"]
    plan = ["--macs-target", "0.5"]
    assert sensitivity_main(args + plan + ["--out", str(tmp_path / "one")]) == 0
    for i in (1, 2):
        assert sensitivity_main(args + ["--shard", "%d/2" % i, "--out", str(tmp_path / ("s%d" % i))]) == 0
    one = json.loads((tmp_path / "one" / "sensitivity.json").read_text())
    parts = [json.loads((tmp_path / s / "sensitivity.json").read_text())["curves"] for s in ("s1", "s2")]
    assert parts[0] and parts[1] and not set(parts[0]) & set(parts[1])
    shards = [str(tmp_path / "s1"), str(tmp_path / "s2")]
    assert sensitivity_main(args + plan + ["--merge", *shards, "--out", str(tmp_path / "merged")]) == 0
    assert json.loads((tmp_path / "merged" / "sensitivity.json").read_text()) == one
    made = [json.loads((tmp_path / d / "plan.json").read_text()) for d in ("one", "merged")]
    assert made[0]["keep"] == made[1]["keep"] and made[0]["made_by"]["macs_share"] == made[1]["made_by"]["macs_share"]
    capsys.readouterr()
    assert sensitivity_main(args + plan + ["--merge", shards[0], "--out", str(tmp_path / "half")]) == 2
    assert "leave out group" in capsys.readouterr().err
    assert sensitivity_main(args + plan + ["--shard", "1/2", "--out", str(tmp_path / "bad")]) == 2
    assert "--shard measures part of the curves" in capsys.readouterr().err
    assert sensitivity_main(args + ["--ratios", "0.5", "--merge", *shards, "--out", str(tmp_path / "other")]) == 2
    assert "other settings (--ratios: [0.25, 0.5] then, [0.5] now)" in capsys.readouterr().err
