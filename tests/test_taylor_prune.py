"""Iterative Taylor pruning end to end on real Caffe: a tiny residual net, a generated LFW-like set.

The step-1 removal is checked against prune.gradient run independently on a
train net built here; resuming (after a crash inside a step, or after a
finished step is deleted) must end with the same log, since Caffe's CPU
training is deterministic with the solver's seed.
"""
import json
import os
import shutil

import numpy as np
import pytest
import caffe
from caffe import layers as L

from base import caffe_io
from base.cli import UsageError
from apps import taylor as tp
from prune.graph import build_graph
from prune.policy import global_ranking
from prune.gradient import taylor_scores
from apps.synthetic import make_dataset
from finetune import driver, lists

SIZE = 32


def residual_net(path):
    """conv1 -> PReLU -> [conv2 -> PReLU -> conv3] + conv1 -> PReLU -> conv4 (stride 2) -> PReLU -> fc5."""
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, SIZE, SIZE]))
    xavier = dict(type="xavier")
    n.conv1 = L.Convolution(n.data, num_output=8, kernel_size=3, stride=2, pad=1, weight_filler=xavier)
    n.relu1 = L.PReLU(n.conv1, in_place=True)
    n.conv2 = L.Convolution(n.conv1, num_output=6, kernel_size=3, pad=1, weight_filler=xavier)
    n.relu2 = L.PReLU(n.conv2, in_place=True)
    n.conv3 = L.Convolution(n.conv2, num_output=8, kernel_size=3, pad=1, weight_filler=xavier)
    n.res = L.Eltwise(n.conv1, n.conv3)
    n.relu3 = L.PReLU(n.res, in_place=True)
    n.conv4 = L.Convolution(n.res, num_output=12, kernel_size=3, stride=2, pad=1, weight_filler=xavier)
    n.relu4 = L.PReLU(n.conv4, in_place=True)
    n.fc5 = L.InnerProduct(n.conv4, num_output=6, weight_filler=xavier)
    caffe_io.write_net(n.to_proto(), str(path))
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("taylor_prune")
    model = residual_net(tmp / "net.prototxt")
    caffe.set_random_seed(3)
    weights = str(tmp / "net.caffemodel")
    caffe.Net(model, caffe.TEST).save(weights)
    lfw, pairs = make_dataset(str(tmp / "data"), identities_per_fold=3, images_per_identity=4, pairs_per_fold=10,
                              size=SIZE)
    s = lists.build(lfw, str(tmp / "list"), folds=[1, 2, 3, 4, 5], pairs=pairs, progress=False)
    args = ["--model", model, "--weights", weights, "--train-list", str(tmp / "list" / "train.txt"),
            "--train-root", s["root"], "--remove-per-step", "4", "--target-share", "0.3", "--finetune-iters", "6",
            "--score-batches", "3", "--batch", "8", "--finetune-lr", "0.01", "--lfw-dir", lfw, "--pairs", pairs,
            "--seed", "1", "--quiet"]
    out = str(tmp / "run")
    log = tp.run(tp.settings(args + ["--out", out]))
    return dict(tmp=tmp, args=args, out=out, log=log, model=model, weights=weights, root=s["root"],
                listing=str(tmp / "list" / "train.txt"))


def without_seconds(log):
    log = json.loads(json.dumps(log))
    for s in log["steps"]:
        s.pop("seconds")
    return log


def test_schedule_end_to_end(setup):
    log, out = setup["log"], setup["out"]
    steps = log["steps"]
    # groups: the residual stream conv1+conv3 (8), conv2 (6), conv4 (12) -> 26 filters, 30 % = 8 (ceil 7.8)
    groups = {r["group"]: r for r in log["summary"]["groups"]}
    assert {g: r["width"] for g, r in groups.items()} == {"conv1": 8, "conv2": 6, "conv4": 12}
    assert groups["conv1"]["producers"] == ["conv1", "conv3"]
    assert [sum(s["removed"].values()) for s in steps] == [0, 4, 4]
    assert steps[-1]["filters"] == 26 - 8 and steps[-1]["removed_share"] >= 0.3
    assert all(a["params"] > b["params"] and a["macs"] > b["macs"] for a, b in zip(steps, steps[1:]))
    for s in steps:
        assert 0 <= s["lfw"]["accuracy"] <= 1 and s["lfw"]["folds"] == [6, 7, 8, 9, 10]
    # the removed original channels, step by step, are what is no longer alive
    for gid, r in groups.items():
        gone = [c for s in steps for c in s["removed_channels"].get(gid, [])]
        assert sorted(gone + steps[-1]["alive"][gid]) == list(range(r["width"]))
        assert r["lost"] == len(gone)
    # the final net is plain Caffe files whose widths are the alive counts
    net = caffe_io.open_net(os.path.join(out, "deploy.prototxt"), os.path.join(out, "model.caffemodel"))
    widths = {g.id: g.channels for g in build_graph(caffe_io.read_net(os.path.join(out, "deploy.prototxt")))
              .prunable()}
    assert widths == {gid: len(v) for gid, v in steps[-1]["alive"].items()}
    assert net.forward()["fc5"].shape == (1, 6)
    assert json.load(open(os.path.join(out, "log.json"))) == log
    for plot in ("accuracy.png", "removed_per_layer.png"):
        assert os.path.getsize(os.path.join(out, "plots", plot)) > 1000


def test_step_one_removes_the_lowest_of_an_independent_ranking(setup):
    """A train net built here with the fine-tune driver, scored by prune.gradient directly."""
    job = driver.FineTuneJob(deploy=setup["model"], weights=setup["weights"], train_list=setup["listing"],
                             root_folder=setup["root"], out=str(setup["tmp"] / "independent"), teacher=setup["model"],
                             teacher_weights=setup["weights"], precompute_teacher=True, mirror=True, batch_size=8,
                             seed=1)
    paths, _, init = driver.build(job, progress=False)
    caffe.set_random_seed(1)
    net = caffe.Net(paths["train"], caffe.TRAIN)
    caffe_io.load_into(net, init)
    scores = taylor_scores(net, build_graph(caffe_io.read_net(setup["model"])).prunable(), 3)
    lowest = global_ranking(scores)[:4]
    removed = setup["log"]["steps"][1]["removed_channels"]
    assert sorted((g, c) for g, cs in removed.items() for c in cs) == sorted(lowest)
    recorded = json.load(open(os.path.join(setup["out"], "steps", "01", "scores.json")))["scores"]
    for gid, s in scores.items():
        np.testing.assert_allclose(recorded[gid], s, rtol=1e-5)


def test_plan_never_takes_the_last_channel_of_a_group():
    scores = {"a": np.array([0.0, 0.1]), "b": np.array([0.5, 0.6, 0.7])}
    assert tp.plan_removal(scores, 3) == [("a", 0), ("b", 0), ("b", 1)]
    with pytest.raises(tp.TaylorPruneError, match="only 3 filters can still be removed"):
        tp.plan_removal(scores, 4)


def test_resume_after_a_crash_or_a_deleted_step_gives_the_same_log(setup, monkeypatch):
    out = str(setup["tmp"] / "resumed")
    args = tp.settings(setup["args"] + ["--out", out])
    real = driver.finetune

    def crash_in_step_two(job, **kw):
        if os.sep + "02" + os.sep in job.out:
            raise KeyboardInterrupt("killed")
        return real(job, **kw)
    monkeypatch.setattr(driver, "finetune", crash_in_step_two)
    with pytest.raises(KeyboardInterrupt):
        tp.run(args)
    assert os.path.exists(os.path.join(out, "steps", "02", "scores.json"))
    assert not os.path.exists(os.path.join(out, "steps", "02", "step.json"))
    monkeypatch.setattr(driver, "finetune", real)
    assert without_seconds(tp.run(args)) == without_seconds(setup["log"])
    shutil.rmtree(os.path.join(out, "steps", "02"))
    assert without_seconds(tp.run(args)) == without_seconds(setup["log"])
    # the same folder with other settings is refused
    other = tp.settings(setup["args"][:-3] + ["--seed", "2", "--quiet", "--out", out])
    with pytest.raises(tp.TaylorPruneError, match="other settings .*seed"):
        tp.run(other)


@pytest.mark.parametrize("change, message", [
    (["--target-share", "0.95"], "at most 23 can go"),
    (["--remove-per-step", "24"], "24 filters per step is more than the 23"),
    (["--target-share", None, "--target-macs", "0.01"], "--target-macs 0.01 is unreachable"),
    (["--remove-per-step", None, "--remove-share", "0.01"], "less than one filter per step"),
    (["--target-share", "1.5"], "--target-share: expected a number > 0 and < 1"),
    (["--batch", "500"], "larger than the training list"),
])
def test_bad_input_is_named(setup, tmp_path, change, message):
    args = list(setup["args"])
    for flag, value in zip(change[::2], change[1::2]):
        i = args.index(flag) if flag in args else None
        if value is None:
            del args[i:i + 2]
        elif i is None:
            args += [flag, value]
        else:
            args[i + 1] = value
    with pytest.raises((tp.TaylorPruneError, UsageError), match=message):   # the flag's own check, or the run's
        tp.run(tp.settings(args + ["--out", str(tmp_path / "bad")]))


def test_cli_help_and_error(capsys, tmp_path):
    with pytest.raises(SystemExit):
        tp.main(["--help"])
    assert "--remove-per-step" in capsys.readouterr().out
    assert tp.main(["--model", str(tmp_path / "none.prototxt"), "--weights", "w", "--train-list", "l",
                    "--remove-per-step", "1", "--target-share", "0.5", "--out", str(tmp_path / "o")]) == 2
    assert "--model" in capsys.readouterr().err
