"""The per-depth pipeline, reduced (generated data, few iterations): end to end, outputs, resume after a kill."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from base import caffe_io
from apps.pipeline import main as pipeline_main
from conftest import ROOT

ARGS = ["--depth", "4", "--synthetic", "--baseline-epochs", "1", "--baseline-lr", "0.01",
        "--finetune-epochs-per-layer", "0.2", "--finetune-epochs-final", "0.5", "--images", "16", "--batch", "16",
        "--timing-rounds", "1", "--quiet"]


def comparable(report, out):
    """The report without what differs between two runs of one command: times, and the run folder's name."""
    r = {k: v for k, v in report.items() if k not in ("timing", "wall_seconds")}
    return json.loads(json.dumps(r).replace(out, "OUT"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("pipeline") / "run")
    assert pipeline_main(ARGS + ["--out", out]) == 0
    return out


def test_pipeline_end_to_end(finished):
    rep = json.load(open(os.path.join(finished, "report.json")))
    stages = [s["stage"] for s in rep["stages"]]
    assert stages == ["baseline"] + ["%s pruned + fine-tuned" % g for g in ("conv1_1", "conv2_1", "conv3_1",
                                                                             "conv4_1")] + ["final fine-tune"]
    assert [s["kept"] for s in rep["schedule"]] == [32, 64, 128, 256]      # the SphereFace-4 preset: keep 0.5
    assert rep["verdict"]["macs_ratio"] == pytest.approx(rep["stages"][0]["macs"] / rep["stages"][-1]["macs"])
    assert all(0.5 <= s["accuracy"] <= 1 for s in rep["stages"])
    # every stage also at strict operating points: all pairs of the test folds' people (eval_lfw.allpairs)
    # (the baseline, the last pruned step and the final net; the steps between: the 10-fold protocol only)
    assert ["all_pairs" in s for s in rep["stages"]] == [True, False, False, False, True, True]
    for s in rep["stages"]:
        a = s.get("all_pairs", dict(n_genuine=1, n_impostor=1, tar_at_far={"1e-3": 0, "1e-4": 0, "1e-5": 0}))
        assert a["n_genuine"] > 0 and a["n_impostor"] > 0 and set(a["tar_at_far"]) == {"1e-3", "1e-4", "1e-5"}
    cpu = rep["timing"]["cpu_minutes"]
    assert cpu["total"] > 0 and 0 < cpu["finetune"] <= cpu["prune"] <= cpu["total"]
    for batch in ("1", "32"):
        assert rep["timing"]["forward_ms"]["pruned"][batch] > 0
    for plot in ("accuracy_vs_macs", "channels", "params_macs", "loss"):
        assert os.path.getsize(os.path.join(finished, rep["plots"][plot])) > 1000
    md = open(os.path.join(finished, "report.md")).read()
    assert "within" in md
    # verified and timed in every runtime installed here (prune.verify), named in the report with its latency
    import runtimes
    out = rep["outputs"]
    assert out["failures"] == [] and "caffe" in out["verified_in"]
    for kind in runtimes.KINDS:
        if runtimes.missing(kind) is None:
            assert kind in out["runtimes"] and rep["timing"]["runtimes"][kind]["pruned_ms"] > 0
            if kind in runtimes.EXACT:
                assert kind in out["verified_in"] and out["runtimes"][kind]["max_rel_deviation"] < 1e-4
        else:
            assert runtimes.LABELS[kind] in out["skipped"]
    assert "verified in: Caffe (" in md and "## Runtimes: verified and timed" in md
    # the deliverable: plain Caffe files, loadable by Caffe and by OpenCV's DNN module with the same output
    import cv2
    proto, model = os.path.join(finished, "deploy.prototxt"), os.path.join(finished, "model.caffemodel")
    net = caffe_io.open_net(proto, model)
    x = np.random.default_rng(0).uniform(-1, 1, (1, 3, 112, 96)).astype(np.float32)
    ref = net.forward(data=x)["fc5"].copy()
    cv = cv2.dnn.readNetFromCaffe(proto, model)
    cv.enableFusion(False)
    cv.setInput(x)
    np.testing.assert_allclose(cv.forward().reshape(ref.shape), ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max())
    assert net.blobs["conv4_1"].data.shape[1] == 256
    # and the same net in ONNX (prune.export), for the runtimes that no longer read Caffe
    import onnxruntime
    e = out["onnx"]
    assert e["onnx"] == os.path.join(finished, "model.onnx") and e["opset"] == 13 and "ONNX: `" in md
    y = onnxruntime.InferenceSession(e["onnx"], providers=["CPUExecutionProvider"]).run(None, {"data": x})[0]
    np.testing.assert_allclose(y, ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max())


def test_killed_pipeline_resumes_to_the_same_report(tmp_path, finished):
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "apps.pipeline"] + ARGS + ["--out", out]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = os.path.join(out, "stages", "eval_step_02.json")
    deadline = time.time() + 300
    while not os.path.exists(marker) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the pipeline ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(out, "report.json"))
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    first = json.load(open(os.path.join(finished, "report.json")))
    again = json.load(open(os.path.join(out, "report.json")))
    assert comparable(again, out) == comparable(first, finished)


def test_a_run_folder_refuses_other_settings(finished, capsys):
    assert pipeline_main(ARGS + ["--out", finished, "--keep", "0.75"]) == 2
    err = capsys.readouterr().err
    assert finished in err and "--keep" in err


def test_pipeline_allocates_by_sensitivity_for_a_macs_target(tmp_path):
    """--macs-target with the sensitivity allocation: a plan stage (curves, plan.json) before the prune stage,
    the pruned net at no more than the target, and the report saying how the channels were chosen."""
    from nets import random_weights
    from prototxt.sphereface import sphereface
    proto = caffe_io.write_net(sphereface(4, widths=(8, 16, 32, 64), embedding=64), str(tmp_path / "sf4.prototxt"))
    weights = caffe_io.write_weights(caffe_io.read_net(proto), random_weights(proto, seed=3),
                                     str(tmp_path / "sf4.caffemodel"))
    out = str(tmp_path / "run")
    assert pipeline_main(["--model", proto, "--weights", weights, "--synthetic", "--macs-target", "0.5",
                          "--judge-images", "8", "--images", "16", "--finetune-epochs-per-layer", "0",
                          "--finetune-epochs-final", "0", "--timing-rounds", "1", "--eval-steps", "last", "--quiet",
                          "--out", out]) == 0
    plan = json.load(open(os.path.join(out, "plan", "plan.json")))
    assert plan["made_by"]["macs_share"] <= 0.5 and plan["made_by"]["policy"] == "sensitivity"
    rep = json.load(open(os.path.join(out, "report.json")))
    assert rep["plan"]["allocation"] == "sensitivity"
    last = rep["schedule"][-1]["group"]     # --eval-steps last: the baseline and the last pruned step only
    assert [st["stage"] for st in rep["stages"]] == ["baseline", "%s pruned" % last]
    assert rep["stages"][-1]["macs"] / rep["stages"][0]["macs"] == pytest.approx(plan["made_by"]["macs_share"],
                                                                              abs=1e-6)
    assert {s["group"]: s["kept"] for s in rep["schedule"]} == plan["keep"]
    assert "allocated per group from the sensitivity analysis" in open(os.path.join(out, "report.md")).read()
