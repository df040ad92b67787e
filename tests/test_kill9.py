"""kill -9 at every write point of finetune, prune (with per-layer fine-tuning) and the pipeline, snapshots
included: the same command run again finishes with exactly what an uninterrupted run produces.

A run is first made uninterrupted with SPHEREFACE_FAULT_LOG, which lists every write point it passes
(base.faults: a file complete under its staging name, renamed into place, a Caffe snapshot); then, for
each point, a run is killed there (SPHEREFACE_FAULT) and resumed.  The fast suite kills at a sample of the
points; ``make test-all`` at every one."""
import json
import os
import re
import signal

import pytest

from kit import litter, make_kit, run_module, same_weights


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    return make_kit(tmp_path_factory.mktemp("kit"))


def write_points(log, out):
    """[(event, text identifying the path)] of every distinct write point a logged run passed, in order; the
    numbers in a name (iterations) are kept only for snapshots, whose every occurrence is its own point."""
    points = []
    for line in open(log):
        event, path = line.rstrip("\n").split(" ", 1)
        if not path.startswith(out + os.sep):
            continue                    # the feature cache and other shared places
        rel = path[len(out) + 1:]
        if (event, rel) not in points:
            points.append((event, rel))
    return points


def reference(module, args, out, tmp_path):
    log = str(tmp_path / "points.log")
    done = run_module(module, args(out), env=dict(SPHEREFACE_FAULT_LOG=log))
    assert done.returncode == 0, done.stderr[-3000:]
    return write_points(log, out)


def kill_and_resume(module, args, out, event, rel, extra_resume=()):
    spec = "%s@%s" % (event, os.path.join(out, rel))
    killed = run_module(module, args(out), env=dict(SPHEREFACE_FAULT=spec))
    assert killed.returncode == -signal.SIGKILL, "not killed at %s: %s" % (spec, killed.stderr[-2000:])
    resumed = run_module(module, args(out) + list(extra_resume))
    assert resumed.returncode == 0, "resume after a kill at %s: %s" % (spec, resumed.stderr[-3000:])
    assert litter(out) == [], "staging files left after a kill at %s" % spec


def sample(points, every):
    """Every write point, or two of them (the middle of the run and the last write; the callers add a torn
    snapshot), to keep make test short."""
    return points if every else [points[i] for i in sorted({len(points) // 2, len(points) - 1})]


# ------------------------------------------------------------------ finetune

def finetune_args(kit):
    return lambda out: ["--model", kit["net"], "--weights", kit["weights"], "--train-list", kit["list"],
                        "--train-root", kit["lfw"], "--loss", "distill", "--precompute-teacher", "--epochs", "2",
                        "--batch", "4", "--snapshot-every", "3", "--out", out, "--quiet"]


@pytest.fixture(scope="module")
def finetune_reference(kit, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finetune")
    out = str(tmp / "reference")
    return out, reference("finetune", finetune_args(kit), out, tmp)


def finetune_cases(every):
    def cases(points):
        snaps = [p for p in points if p[0] == "snapshot"]
        chosen = sample(points, every) + [("torn-snapshot", snaps[-1][1])]
        return chosen + ([("torn-snapshot", s[1]) for s in snaps[:-1]] if every else [])
    return cases


@pytest.mark.parametrize("every", [pytest.param(True, marks=pytest.mark.slow), False], ids=["every", "sample"])
def test_finetune_killed_at_a_write_point_resumes_to_the_same_weights(kit, finetune_reference, tmp_path, every):
    ref, points = finetune_reference
    assert any(e == "snapshot" for e, _ in points) and ("renamed", "done.json") in points
    for i, (event, rel) in enumerate(finetune_cases(every)(points)):
        out = str(tmp_path / ("run%d" % i))
        kill_and_resume("finetune", finetune_args(kit), out, event, rel, ["--resume"])
        assert same_weights(os.path.join(ref, "final.caffemodel"), os.path.join(out, "final.caffemodel")), rel
        assert open(os.path.join(ref, "loss.csv")).read() == open(os.path.join(out, "loss.csv")).read(), rel


# ------------------------------------------------------------------ prune with per-layer fine-tuning

def prune_args(kit):
    return lambda out: ["--model", kit["net"], "--weights", kit["weights"], "--data", kit["lfw"], "--images", "8",
                        "--samples-per-image", "4", "--keep", "0.5", "--train-list", kit["list"], "--train-root",
                        kit["lfw"], "--finetune-epochs-per-layer", "1", "--finetune-epochs-final", "1",
                        "--finetune-batch", "4", "--precompute-teacher", "--out", out, "--quiet"]


def prune_result(out):
    log = json.load(open(os.path.join(out, "log.json")))
    steps = [{k: v for k, v in s.items() if k != "seconds"} for s in log["steps"]]
    return json.loads(json.dumps(steps).replace(out, "OUT"))


@pytest.fixture(scope="module")
def prune_reference(kit, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prune")
    out = str(tmp / "reference")
    return out, reference("prune", prune_args(kit), out, tmp)


@pytest.mark.parametrize("every", [pytest.param(True, marks=pytest.mark.slow), False], ids=["every", "sample"])
def test_prune_killed_at_a_write_point_resumes_to_the_same_net(kit, prune_reference, tmp_path, every):
    ref, points = prune_reference
    assert any(e == "snapshot" for e, _ in points) and ("renamed", "log.json") in points
    chosen = sample(points, every) + [("torn-snapshot", next(r for e, r in points if e == "snapshot"))]
    for i, (event, rel) in enumerate(chosen):
        out = str(tmp_path / ("run%d" % i))
        kill_and_resume("prune", prune_args(kit), out, event, rel)
        assert same_weights(os.path.join(ref, "pruned.caffemodel"), os.path.join(out, "pruned.caffemodel")), rel
        assert prune_result(out) == prune_result(ref), rel


# ------------------------------------------------------------------ the pipeline

def pipeline_args(kit):
    return lambda out: ["--model", kit["net"], "--weights", kit["weights"], "--train-list", kit["list"],
                        "--train-root", kit["lfw"], "--lfw-dir", kit["lfw"], "--pairs", kit["pairs"],
                        "--eval-folds", "1-10", "--keep", "0.5", "--images", "8", "--batch", "4",
                        "--finetune-epochs-per-layer", "1", "--finetune-epochs-final", "1", "--timing-rounds", "1",
                        "--out", out, "--quiet"]


def report(out):
    rep = json.load(open(os.path.join(out, "report.json")))
    rep = {k: v for k, v in rep.items() if k not in ("timing", "wall_seconds")}
    return json.loads(re.sub(r'"seconds": [0-9.]+', '"seconds": 0', json.dumps(rep).replace(out, "OUT")))


@pytest.mark.parametrize("every", [pytest.param(True, marks=pytest.mark.slow), False], ids=["every", "sample"])
def test_pipeline_killed_at_a_write_point_resumes_to_the_same_report(kit, tmp_path, every):
    ref = str(tmp_path / "reference")
    points = reference("apps.pipeline", pipeline_args(kit), ref, tmp_path)
    assert ("renamed", "report.json") in points and ("renamed", "model.caffemodel") in points
    chosen = sample([p for p in points if "/snapshots/" not in p[1] or p[0] == "snapshot"], every)
    chosen += [("torn-snapshot", next(r for e, r in points if e == "snapshot"))]
    for i, (event, rel) in enumerate(chosen):
        out = str(tmp_path / ("run%d" % i))
        kill_and_resume("apps.pipeline", pipeline_args(kit), out, event, rel)
        assert same_weights(os.path.join(ref, "model.caffemodel"), os.path.join(out, "model.caffemodel")), rel
        assert report(out) == report(ref), rel
