"""The channel-prioritisation driver (issue 9) end to end on a tiny SphereFace-4 --bn and a generated
LFW-style set, in real Caffe on the CPU: pre-train with penalties -> threshold prune -> multi-width
fine-tune -> export -> LFW protocol; resume and refusal; the penalties really act in training."""
import json
import os

import numpy as np
import pytest

from finetune import lists
from apps.prioritise import __main__ as prioritise
from base import caffe_io
from prune.criteria.bnscale import scale_gammas
from prune.graph import build_graph
from prune.stats import net_stats
from apps.synthetic import make_dataset
from prototxt.sphereface import sphereface


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("prio")
    lfw, pairs = make_dataset(str(base / "data"), identities_per_fold=3, images_per_identity=6, pairs_per_fold=10)
    summary = lists.build(lfw, str(base / "list"), min_images=2, folds=[1, 2, 3, 4, 5], pairs=pairs, progress=False)
    model = caffe_io.write_net(sphereface(4, widths=(4, 8, 8, 8), embedding=8, bn=True), str(base / "sf4bn.prototxt"))
    return dict(base=base, lfw=lfw, pairs=pairs, list=str(base / "list" / "train.txt"), root=summary["root"],
                model=model)


def argv(s, out, *extra):
    return ["--model", s["model"], "--train-list", s["list"], "--train-root", s["root"], "--out", str(out),
            "--batch", "8", "--pretrain-epochs", "0.5", "--finetune-epochs", "0.3", "--finetune-lr", "1e-2",
            "--threshold", "0.3", "--quiet", *extra]


@pytest.fixture(scope="module")
def run(setup):
    out = setup["base"] / "run"
    args = argv(setup, out, "--lfw-dir", setup["lfw"], "--pairs", setup["pairs"])
    assert prioritise.main(args) == 0
    return out, args


def test_end_to_end_levels_load_and_shrink(run):
    out, _ = run
    res = json.load(open(out / "results.json"))
    assert [r["level"] for r in res["levels"]] == [1.0, 0.75, 0.5]
    macs = [r["macs"] for r in res["levels"]]
    params = [r["params"] for r in res["levels"]]
    assert macs[0] > macs[1] > macs[2] and params[0] > params[1] > params[2]
    # the threshold removed the channels whose monotone-initialised gamma is < 0.3 (0.25 and 0.125 of 8)
    slim = res["prune"]
    assert slim["groups"]["conv1_1"] == [4, 3] and slim["groups"]["conv2_1"] == [8, 6]
    assert slim["macs"][1] < slim["macs"][0] == net_stats(caffe_io.read_net(str(out / "pretrain" / "deploy.prototxt"))).macs
    for r in res["levels"]:
        net = caffe_io.open_net(r["prototxt"], r["caffemodel"])     # loads in real Caffe
        assert net.blobs["fc5"].data.shape == (1, 8)
        assert net_stats(r["prototxt"]).macs == r["macs"]
        assert 0 <= r["accuracy"] <= 1 and r["folds"] == [6, 7, 8, 9, 10]
    table = open(out / "results.md").read()
    assert "| 75 % |" in table and "folds 6-10" in table
    # the towers net trained all widths with frozen BN and summed losses
    train = caffe_io.read_net(str(out / "multiwidth" / "train.prototxt"))
    losses = {l.name for l in train.layer if len(l.loss_weight) or l.type.endswith("Loss")}
    assert {"softmax_loss", "softmax_loss@75", "softmax_loss@50", "center_loss@50"} <= losses
    assert all(l.batch_norm_param.use_global_stats for l in train.layer if l.type == "BatchNorm")
    assert len({l.param[0].name for l in train.layer if l.name.startswith("center_loss")}) == 3
    solver_text = open(out / "pretrain" / "solver.prototxt").read()
    assert 'type: "Adam"' in solver_text and "momentum: 0.5" in solver_text


def test_rerun_reuses_stages_and_other_settings_are_refused(run, capsys):
    out, args = run
    files = [out / "width50.caffemodel", out / "multiwidth" / "loss.csv", out / "pretrain" / "final.caffemodel"]
    before = [os.stat(f).st_mtime_ns for f in files]
    assert prioritise.main(args) == 0
    assert [os.stat(f).st_mtime_ns for f in files] == before
    other = list(args)
    other[other.index("--threshold") + 1] = "0.2"
    assert prioritise.main(other) == 2
    assert "--threshold" in capsys.readouterr().err


def pretrained_gammas(setup, name, *extra):
    a = prioritise.settings(argv(setup, setup["base"] / name, "--pretrain-epochs", "0.6", *extra))
    rec = prioritise.pretrain_stage(a, progress=False)
    net = caffe_io.read_net(rec["deploy"])
    graph = build_graph(net)
    weights = caffe_io.read_weights(rec["caffemodel"])
    return rec, {g.id: scale_gammas(g, weights) for g in graph.prunable()}


def test_penalties_act_in_pretraining(setup):
    plain, g0 = pretrained_gammas(setup, "plain", "--lambda-s", "0", "--lambda-m", "0")
    sparse, g1 = pretrained_gammas(setup, "sparse", "--lambda-s", "1", "--lambda-m", "1")
    assert plain["final_penalty"] == 0 and sparse["final_penalty"] > 0
    start = {gid: 1 - np.arange(len(g)) / len(g) for gid, g in g0.items()}
    for gid in g0:
        # the sparsity term pulls every gamma toward zero; without it they wander
        assert g1[gid].sum() < g0[gid].sum() - 0.02 * len(g1[gid]), gid
        assert g1[gid].sum() < start[gid].sum()
        # the monotone order of the initialisation survives the sparse run
        assert (np.diff(g1[gid]) <= 1e-6).all(), gid


def test_bad_input_is_named(setup, tmp_path, capsys):
    plain = caffe_io.write_net(sphereface(4, widths=(4, 8, 8, 8), embedding=8), str(tmp_path / "nobn.prototxt"))
    args = argv(setup, tmp_path / "x")
    args[1] = plain
    assert prioritise.main(args) == 2
    err = capsys.readouterr().err
    assert "nobn.prototxt" in err and "BatchNorm" in err
    assert prioritise.main(argv(setup, tmp_path / "y", "--loss", "distill")) == 2
    assert "--teacher" in capsys.readouterr().err


def test_killed_pretraining_resumes_from_its_snapshot(setup):
    a = prioritise.settings(argv(setup, setup["base"] / "resume", "--snapshot-every", "3"))
    first = prioritise.pretrain_stage(a, progress=False)
    folder = os.path.dirname(first["caffemodel"])
    rows = open(os.path.join(folder, "loss.csv")).read().splitlines()
    assert [int(r.split(",")[0]) for r in rows] == [1, 2, 3, 4, 5, 6]
    # as if killed after the snapshot at iteration 3
    for name in ("snapshots/snap_iter_6.caffemodel", "snapshots/snap_iter_6.solverstate", "final.caffemodel"):
        os.unlink(os.path.join(folder, name))
    again = prioritise.pretrain_stage(a, progress=False)
    rows2 = open(os.path.join(folder, "loss.csv")).read().splitlines()
    assert rows2[:3] == rows[:3] and [int(r.split(",")[0]) for r in rows2] == [1, 2, 3, 4, 5, 6]
    assert again["snapshot"].endswith("snap_iter_6.caffemodel")
    caffe_io.open_net(again["deploy"], again["caffemodel"])


def test_distillation_loss_runs_every_stage(setup, tmp_path):
    import nets
    teacher = caffe_io.write_net(sphereface(4, widths=(4, 4, 4, 4), embedding=6), str(tmp_path / "t.prototxt"))
    tw = caffe_io.write_weights(caffe_io.read_net(teacher), nets.random_weights(teacher, seed=1),
                                str(tmp_path / "t.caffemodel"))
    out = tmp_path / "distill"
    assert prioritise.main(argv(setup, out, "--loss", "distill", "--teacher", teacher, "--teacher-weights", tw,
                                "--teacher-blob", "fc5", "--teacher-rgb", "no")) == 0
    train = caffe_io.read_net(str(out / "multiwidth" / "train.prototxt"))
    names = [l.name for l in train.layer]
    # one teacher table, a projection (8-d student, 6-d teacher) and a loss per tower
    assert names.count("teacher/fc5") == 1
    assert {"distill_loss", "distill_loss@75", "distill_loss@50", "distill_proj@50"} <= set(names)
    res = json.load(open(out / "results.json"))
    assert res["loss"] == "distill" and res["levels"][2]["accuracy"] is None
    for r in res["levels"]:
        caffe_io.open_net(r["prototxt"], r["caffemodel"])
