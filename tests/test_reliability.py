"""Issue 17 item by item, on a tiny net and generated data: torn snapshots, outputs over inputs, the run
folder's config, divergence, Ctrl-C, concurrent runs, the distillation crop, litter and the feature cache."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from base import caffe_io
from base.caffe_io import atomic_write, sweep_litter
from base.images import Preprocess
from base.runfolder import RunFolder
from conftest import ROOT
from finetune import driver, snapshots
from kit import in_tmpfs, litter, make_kit, namespaces_work, run_module, same_weights


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    return make_kit(tmp_path_factory.mktemp("kit"))


def finetune_args(kit, out, *extra, long=False):
    """A-Softmax for 2 epochs (12 iterations); ``long``: many epochs of a distillation that cannot diverge."""
    loss = ["--loss", "distill", "--finetune-lr", "0.001"] if long else ["--loss", "asoftmax", "--margin", "2",
                                                                         "--finetune-lr", "0.01"]
    return ["--model", kit["net"], "--weights", kit["weights"], "--train-list", kit["list"], "--train-root",
            kit["lfw"], "--epochs", "2", "--batch", "4", "--snapshot-every", "2", "--out", str(out),
            "--quiet"] + loss + list(extra)


@pytest.fixture(scope="module")
def uninterrupted(kit, tmp_path_factory):
    """The reference: the fine-tune run start to end without a kill."""
    out = tmp_path_factory.mktemp("reference") / "run"
    done = run_module("finetune", finetune_args(kit, out))
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def assert_same_run(a, b):
    assert same_weights(str(a / "final.caffemodel"), str(b / "final.caffemodel")), "weights differ"
    assert open(a / "loss.csv").read() == open(b / "loss.csv").read()


# ------------------------------------------------------------------ 1. torn snapshots

def test_a_torn_state_is_never_handed_to_caffe(kit, uninterrupted, tmp_path):
    """Cut a solver state anywhere (at a field boundary too: fewer history blobs) or its caffemodel: the
    snapshot no longer counts and the newest intact one is used."""
    folder = tmp_path / "snapshots"
    import shutil
    shutil.copytree(uninterrupted / "snapshots", folder)
    for name in ("solver.prototxt", "train.prototxt"):
        shutil.copy(uninterrupted / name, tmp_path / name)
    newest, older = [s for _, s in snapshots.scan(str(folder))[0]]
    assert snapshots.latest(str(folder))[1] == newest
    state = snapshots.read_state(newest)
    full = open(newest, "rb").read()
    del state.history[-1]                                     # a clean cut between two history blobs
    for cut in (full[:len(full) // 2], full[:7], b"", state.SerializeToString()):
        with open(newest, "wb") as f:
            f.write(cut)
        assert snapshots.latest(str(folder))[1] == older
        with pytest.raises(snapshots.SnapshotError):
            snapshots.check(newest, *snapshots.expected(str(folder)))
    with open(newest, "wb") as f:
        f.write(full)
    model = snapshots.model_of(newest)
    data = open(model, "rb").read()
    with open(model, "wb") as f:
        f.write(data[:len(data) - 100])
    assert snapshots.latest(str(folder))[1] == older
    assert [p for p, _ in snapshots.drop_torn(str(folder))] == [newest]
    assert not os.path.exists(newest) and not os.path.exists(model) and os.path.exists(older)


@pytest.mark.parametrize("fault", ["torn-snapshot@snap_iter_6", "snapshot@snap_iter_4", "staged@final.caffemodel",
                                   "renamed@loss.csv"])
def test_killed_anywhere_the_finetune_resumes_to_the_uninterrupted_weights(kit, uninterrupted, tmp_path, fault):
    out = tmp_path / "run"
    killed = run_module("finetune", finetune_args(kit, out), env=dict(SPHEREFACE_FAULT=fault))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = run_module("finetune", finetune_args(kit, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    if fault.startswith("torn"):
        assert "cannot be restored" in resumed.stderr and "resumed from iteration 4" in resumed.stderr
    assert_same_run(uninterrupted, out)
    assert litter(str(out)) == []


@pytest.mark.skipif(not namespaces_work(), reason="needs unshare -rm (a private tmpfs mount)")
def test_a_disk_that_fills_during_training_stops_cleanly_and_resumes(kit, tmp_path):
    """A tmpfs of 2 MB with room for the start of the run but not for all its snapshots: one line, exit 2,
    before Caffe writes a snapshot it has no room for (it would abort half-way); with room made, the same
    command resumes to the uninterrupted result."""
    mount = str(tmp_path / "mnt")
    args = " ".join("'%s'" % a for a in finetune_args(kit, mount + "/run", "--epochs", "20", long=True))
    cmd = "%s -m finetune %s" % (sys.executable, args)
    script = ("dd if=/dev/zero of=%s/filler bs=1k count=880 2>/dev/null; %s; echo rc=$?; rm %s/filler; "
              "%s --resume >/dev/null && cp %s/run/final.caffemodel %s/" % (mount, cmd, mount, cmd, mount, tmp_path))
    done = in_tmpfs(mount, script, options="size=2m")
    assert "rc=2" in done.stdout, done.stdout + done.stderr[-3000:]
    first = [line for line in done.stderr.splitlines() if line.startswith("python -m finetune: error: ")]
    assert len(first) == 1 and "no room for a snapshot" in first[0], done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "Check failed" not in done.stderr
    assert done.returncode == 0, done.stderr[-3000:]
    reference = tmp_path / "reference"
    assert run_module("finetune", finetune_args(kit, reference, "--epochs", "20", long=True)).returncode == 0
    assert same_weights(str(reference / "final.caffemodel"), str(tmp_path / "final.caffemodel"))


# ------------------------------------------------------------------ 3. config after validation, divergence

def test_a_diverged_finetune_leaves_its_folder_to_the_corrected_command(kit, tmp_path):
    out = tmp_path / "run"
    args = finetune_args(kit, out)
    i = args.index("--finetune-lr")
    diverged = run_module("finetune", args[:i + 1] + ["1e12"] + args[i + 2:])
    assert diverged.returncode == 2 and "lower the learning rate" in diverged.stderr, diverged.stderr[-2000:]
    assert len(diverged.stderr.splitlines()) == 1 and "cleared" in diverged.stderr
    assert not os.path.exists(out)
    assert run_module("finetune", args).returncode == 0


def test_a_diverged_pipeline_stage_frees_only_its_settings(kit, tmp_path):
    from apps.pipeline import PipelineError, settings
    out = str(tmp_path / "run")
    base = ["--model", kit["net"], "--train-list", kit["list"], "--train-root", kit["lfw"], "--lfw-dir", kit["lfw"],
            "--pairs", kit["pairs"], "--eval-folds", "1-10", "--keep", "0.5", "--baseline-epochs", "1", "--batch", "4",
            "--teacher", kit["net"], "--teacher-weights", kit["weights"], "--teacher-blob", "fc5", "--teacher-rgb",
            "no", "--out", out, "--quiet"]
    done = run_module("apps.pipeline", base + ["--baseline-lr", "1e12"])
    assert done.returncode == 2 and "--baseline-lr" in done.stderr and "lower the learning rate" in done.stderr, \
        done.stderr[-2000:]
    assert not os.path.exists(os.path.join(out, "baseline"))
    assert json.load(open(os.path.join(out, "stages", "data.json")))            # the stage before is kept
    with RunFolder(out, PipelineError) as run:
        run.check(settings(base + ["--baseline-lr", "0.01"]).config, flags=True)    # the corrected command passes
        with pytest.raises(PipelineError, match="--images"):
            run.check(settings(base + ["--baseline-lr", "0.01", "--images", "8"]).config, flags=True)


# ------------------------------------------------------------------ 6. Ctrl-C

def test_ctrl_c_is_one_line_and_the_run_resumes(kit, tmp_path):
    out = tmp_path / "run"
    args = finetune_args(kit, out, "--epochs", "1000", long=True)   # a few thousand iterations: it cannot end first
    # Ctrl-C's default action in the child even where pytest itself runs with SIGINT ignored (a background job of
    # a non-interactive shell inherits SIG_IGN, and Python then never raises KeyboardInterrupt)
    proc = subprocess.Popen([sys.executable, "-m", "finetune"] + args, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not snapshots.latest(str(out / "snapshots"))[1] and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)          # what the terminal does: the whole process group
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err == "python -m finetune: interrupted\n", err[-2000:]
    assert not (out / "done.json").exists()
    resumed = run_module("finetune", args + ["--resume"])
    assert resumed.returncode == 0 and "resumed from iteration" in resumed.stderr, resumed.stderr[-2000:]


# ------------------------------------------------------------------ 7. concurrent runs into one --out

def test_concurrent_runs_into_one_folder_leave_one_consistent_result(kit, tmp_path):
    out = tmp_path / "run"
    commands = [finetune_args(kit, out)] * 3 + [finetune_args(kit, out, "--seed", "7")]
    procs = [subprocess.Popen([sys.executable, "-m", "finetune"] + c, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for c in commands]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    assert all(code in (0, 2) for code, _ in results), results
    assert any(code == 0 for code, _ in results)
    for code, err in results:
        if code == 2:
            assert len(err.splitlines()) == 1 and ("in use by another run" in err or "other settings" in err), err
    config = json.load(open(out / "config.json"))
    done = json.load(open(out / "done.json"))
    assert done["config"] == config
    caffe_io.open_net(str(out / "deploy.prototxt"), str(out / "final.caffemodel"))
    assert litter(str(out)) == []


def test_two_processes_writing_one_file_never_collide(tmp_path):
    target = str(tmp_path / "shared.json")
    code = ("import sys\nfrom base.caffe_io import atomic_write\n"
            "for i in range(300):\n    atomic_write(sys.argv[1], sys.argv[2] * 1000, sync=False)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, target, tag], cwd=ROOT, stderr=subprocess.PIPE, text=True)
             for tag in "ab"]
    assert [p.wait(timeout=120) for p in procs] == [0, 0], [p.stderr.read() for p in procs]
    assert open(target).read() in ("a" * 1000, "b" * 1000) and litter(str(tmp_path)) == []


# ------------------------------------------------------------------ 8. the distillation crop

def test_self_distillation_of_a_112x96_net_crops_the_aligned_faces(kit, tmp_path):
    """No squash: the student and the (same-sized) teacher see columns 8..103 of the 112x112 aligned face, as
    the sampler and the evaluator do."""
    import caffe
    from base.lists import read_list
    first = read_list(kit["list"], kit["lfw"])[0][0]
    listing = tmp_path / "one.txt"
    listing.write_text("%s 0\n" % os.path.relpath(first, kit["lfw"]) * 4)
    job = driver.FineTuneJob(deploy=kit["net"], weights=kit["weights"], train_list=str(listing),
                             root_folder=kit["lfw"], out=str(tmp_path / "run"), head="distill", mirror=False,
                             batch_size=2, epochs=1)
    p, _, _ = driver.build(job, progress=False)
    train = caffe_io.read_net(p["train"])
    data = next(layer for layer in train.layer if layer.type == "ImageData").image_data_param
    assert (data.new_height, data.new_width) == (112, 112)
    crops = [layer for layer in train.layer if layer.type == "Crop"]
    assert len(crops) == 2 and all(list(c.crop_param.offset) == [0, 8] for c in crops)
    net = caffe.Net(p["train"], caffe.TRAIN)
    net.forward()
    want = Preprocess(112, 96, crop="112x96", bgr=True)(first)
    np.testing.assert_allclose(net.blobs["data"].data[0], want, atol=1e-6)
    np.testing.assert_allclose(net.blobs["teacher/data"].data[0], want, atol=1e-6)


# ------------------------------------------------------------------ 9. litter and the feature cache

def test_staging_files_of_killed_writers_are_swept(tmp_path):
    run_dir = tmp_path / "run" / "steps"
    run_dir.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = [run_dir / (".net.caffemodel.%s.k2j4h5g6.tmp" % dead.stdout.strip()), run_dir / ".step.json.ab12cd34.tmp"]
    for path in stale:
        path.write_bytes(b"half a model")
    keep = run_dir / "notes.tmp"
    keep.write_text("a user's file")
    with RunFolder(tmp_path / "run"):
        pass
    assert not any(p.exists() for p in stale) and keep.exists()
    live = tmp_path / (".x.npz.%d.abcdefgh.tmp" % os.getppid())
    live.write_bytes(b"being written")
    gone = tmp_path / (".y.npz.%s.abcdefgh.tmp" % dead.stdout.strip())
    gone.write_bytes(b"left by a kill")
    sweep_litter(str(tmp_path), recursive=False)   # a shared folder (the feature cache): only dead writers' go
    assert live.exists() and not gone.exists()


def test_cache_dir_takes_the_teacher_embeddings(kit, tmp_path):
    cache = tmp_path / "cache"
    done = run_module("finetune", finetune_args(kit, tmp_path / "run", "--loss", "distill", "--precompute-teacher",
                                                "--epochs", "1", "--cache-dir", str(cache)))
    assert done.returncode == 0, done.stderr[-2000:]
    assert [f for f in os.listdir(cache) if f.endswith(".npz")]
    from apps.pipeline import settings
    s = settings(["--synthetic", "--out", str(tmp_path / "p"), "--cache-dir", str(cache)])
    assert s.evaluation.cache_dir == s.finetune.cache_dir == str(cache)
    assert "cache_dir" not in s.config        # where features are cached changes no result


def test_atomic_write_into_a_read_only_place_is_one_named_error(tmp_path):
    with pytest.raises(caffe_io.CaffeFileError, match="cannot write /dev/null/x.json"):
        atomic_write("/dev/null/x.json", "{}")


# ------------------------------------------------------------------ 10. what repeats across machines

def _has_avx2():
    try:
        return " avx2" in open("/proc/cpuinfo").read()
    except OSError:
        return False


@pytest.mark.skipif(not _has_avx2(), reason="OpenBLAS's Haswell kernels need AVX2")
def test_fixed_blas_kernels_repeat_whatever_the_thread_count(kit, tmp_path):
    """The README's recipe for runs that repeat across machines: OPENBLAS_CORETYPE fixed, two or more
    threads (a machine with more cores runs more); the kernels, not the threads, were the difference."""
    outs = []
    for threads in ("2", "3"):
        out = tmp_path / threads
        done = run_module("finetune", finetune_args(kit, out), env=dict(
            OPENBLAS_CORETYPE="Haswell", OPENBLAS_NUM_THREADS=threads, OPENBLAS_VERBOSE="2"))
        if "Core: Haswell" not in done.stderr:
            pytest.skip("this OpenBLAS does not choose kernels at run time (no DYNAMIC_ARCH)")
        assert done.returncode == 0, done.stderr[-2000:]
        outs.append(out)
    assert same_weights(str(outs[0] / "final.caffemodel"), str(outs[1] / "final.caffemodel"))
