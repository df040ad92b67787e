"""Issue 27, the second reliability pass, class by class: training lists read as Caffe's ImageData reads
them, numbers checked before Caffe sees them, the sensitivity record's config and lock, runtimes failing
per row, a fork's fixed point before a depthwise conv, flags named in their own refusals.  Each entry point
runs as a user runs it (a real process): exit 2 with one line, or success; never 134, never a traceback."""
import json
import os
import shutil

import pytest

from kit import make_kit, run_module


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    return make_kit(tmp_path_factory.mktemp("kit"))


def refused(done, *words):
    """Exit 2, one line on stderr naming ``words``; nothing of Caffe's (an abort) and no traceback."""
    err = done.stderr
    assert done.returncode == 2, (done.returncode, err[-3000:])
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and "Check failed" not in err, err[-3000:]
    for w in words:
        assert w in err, err
    return err


def finetune_args(kit, out, listing=None, *extra):
    return ["--model", kit["net"], "--weights", kit["weights"], "--train-list", listing or kit["list"],
            "--train-root", kit["lfw"], "--epochs", "1", "--batch", "4", "--out", str(out), "--quiet",
            "--loss", "asoftmax", "--margin", "2", "--finetune-lr", "0.01"] + list(extra)


def list_lines(kit):
    return open(kit["list"]).read().splitlines()


# ------------------------------------------------------------------ 1. lists read the way Caffe reads them

def test_a_truncated_jpeg_is_refused_naming_its_line_before_any_folder(kit, tmp_path):
    lines = list_lines(kit)
    rel = lines[3].rpartition(" ")[0]
    images = tmp_path / "lfw"
    shutil.copytree(kit["lfw"], images)
    cut = images / rel
    cut.write_bytes(cut.read_bytes()[:200])          # a download that stopped: the JPEG signature, no image
    out = tmp_path / "run"
    args = finetune_args(kit, out)
    args[args.index("--train-root") + 1] = str(images)
    refused(run_module("finetune", args), "train.txt:4:", rel, "cannot be decoded", repr(lines[3]))
    assert not out.exists()


@pytest.mark.parametrize("change, words", [
    (lambda line: line + " ", ["ends with a space"]),
    (lambda line: " " + line, ["does not exist", "keeps the spaces"]),
    (lambda line: "", ["the line is empty"]),
])
def test_a_line_caffe_reads_otherwise_is_refused_quoting_it(kit, tmp_path, change, words):
    """What the line seems to say is not what ImageData reads (the path after a leading space, no label
    after a trailing one, an image with no path): refused, the line named, no folder left."""
    lines = list_lines(kit)
    lines[2] = change(lines[2])
    listing = tmp_path / "train.txt"
    listing.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    refused(run_module("finetune", finetune_args(kit, out, listing)), "train.txt:3:", *words)
    assert not out.exists()


def test_absolute_paths_after_a_root_are_joined_as_caffe_joins_them(kit, tmp_path):
    """ImageData opens root_folder + path as one string: an absolute path after --train-root is not the file
    os.path.join would find."""
    lines = ["%s/%s" % (kit["lfw"], line) for line in list_lines(kit)]
    listing = tmp_path / "train.txt"
    listing.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    refused(run_module("finetune", finetune_args(kit, out, listing)), "train.txt:1:", "does not exist",
            "root folder before an absolute path")
    assert not out.exists()


def test_a_run_that_ends_before_its_first_snapshot_does_not_block_the_corrected_command(kit, tmp_path):
    """Killed right after config.json (what a Caffe abort at start-up leaves: config, prototxts, no snapshot):
    a command with other settings is accepted and finishes."""
    out = tmp_path / "run"
    killed = run_module("finetune", finetune_args(kit, out), env=dict(SPHEREFACE_FAULT="renamed@config.json"))
    assert killed.returncode == -9 and (out / "config.json").exists(), killed.stderr[-2000:]
    done = run_module("finetune", finetune_args(kit, out, None, "--seed", "7"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.load(open(out / "config.json"))["seed"] == 7


def test_decoding_is_remembered_by_size_and_mtime(kit, tmp_path, monkeypatch):
    """A second check of the same list decodes nothing; an image rewritten since is decoded again."""
    import cv2
    from base import lists
    monkeypatch.setattr(lists, "CACHE", str(tmp_path / "cache"))
    images = tmp_path / "lfw"
    shutil.copytree(kit["lfw"], images)
    items = lists.read_list(kit["list"], str(images), decode=True)
    calls = []
    real = cv2.imread
    monkeypatch.setattr(cv2, "imread", lambda *a: calls.append(a[0]) or real(*a))
    assert lists.read_list(kit["list"], str(images), decode=True) == items and calls == []
    first = items[0][0]
    os.utime(first, ns=(1, 1))
    lists.read_list(kit["list"], str(images), decode=True)
    assert calls == [first]


# ------------------------------------------------------------------ 5. a fork's fixed point before a depthwise conv

SHUFFLE_NET = 'name: "shuffle"\n' + '''
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 16 dim: 16 } } }
layer { name: "c1" type: "Convolution" bottom: "data" top: "c1" convolution_param { num_output: 8 kernel_size: 3 pad: 1 } }
layer { name: "r1" type: "ReLU" bottom: "c1" top: "c1" }
layer { name: "shuffle" type: "ShuffleChannel" bottom: "c1" top: "shuffle" shuffle_channel_param { group: 2 } }
layer { name: "dw" type: "Convolution" bottom: "shuffle" top: "dw" convolution_param { num_output: 8 group: 8 kernel_size: 3 pad: 1 } }
layer { name: "c3" type: "Convolution" bottom: "dw" top: "c3" convolution_param { num_output: 6 kernel_size: 1 } }
layer { name: "r3" type: "ReLU" bottom: "c3" top: "c3" }
layer { name: "fc" type: "InnerProduct" bottom: "c3" top: "fc" inner_product_param { num_output: 4 } }
'''


def test_a_depthwise_conv_after_a_shuffle_keeps_its_channels_and_the_rest_prunes(tmp_path):
    """ShuffleChannel is a fixed point: the depthwise conv after it has channels of no group (its count stays
    as written), c3 after it prunes."""
    from test_forks import fork_net_files
    proto, model, _ = fork_net_files(tmp_path, SHUFFLE_NET, "shuffle", 16)
    done = run_module("prune.groups", [proto])
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    out = tmp_path / "pruned"
    done = run_module("prune", ["--model", proto, "--weights", model, "--criterion", "l1", "--reconstruct", "none",
                                "--out", str(out), "--quiet"])
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    log = json.loads((out / "log.json").read_text())
    assert [s["group"] for s in log["steps"]] == ["c3"]
    from base import caffe_io
    pruned = {layer.name: layer for layer in caffe_io.read_net(log["prototxt"]).layer}
    assert pruned["dw"].convolution_param.num_output == 8 and pruned["c3"].convolution_param.num_output < 6


# ------------------------------------------------------------------ 4. runtimes fail per row

@pytest.mark.parametrize("extra", ['layer { name: "clip" type: "Clip" bottom: "fc5" top: "fc5" '
                                   'clip_param { min: -0.5 max: 0.5 } }',
                                   'layer { name: "thr" type: "Threshold" bottom: "fc5" top: "thr" }'])
def test_a_layer_a_runtime_cannot_run_is_that_runtimes_failed_row(kit, tmp_path, extra):
    """OpenCV creates no Clip or Threshold layer (its error comes at the first forward): its rows are FAILED
    with OpenCV's reason, Caffe and MNN are still measured, --json is written, exit 1."""
    proto = tmp_path / "net.prototxt"
    proto.write_text(open(kit["net"]).read() + extra + "\n")
    record = tmp_path / "verify.json"
    done = run_module("prune.verify", [proto, kit["weights"], "--runtimes", "caffe,opencv-nofusion,opencv,mnn",
                                       "--rounds", "1", "--min-seconds", "0.001", "--inputs", "1",
                                       "--json", record])
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    rows = json.loads(record.read_text())["runtimes"]
    assert "error" in rows["opencv-nofusion"] and "error" in rows["opencv"], rows
    assert "OpenCV DNN (fusion off)  FAILED: OpenCV DNN cannot run %s: Can't create layer" % proto in done.stdout, \
        done.stdout
    assert "error" not in rows["caffe"] and rows["caffe"]["max_rel_deviation"] == 0
    assert "latency_ms" in rows["mnn"] or "error" in rows["mnn"]
    assert len(done.stderr.strip().splitlines()) == 1 and "FAILED: OpenCV DNN (fusion off)" in done.stderr


# ------------------------------------------------------------------ 3. the sensitivity record's config and lock

def sensitivity_args(kit, out, weights):
    return ["--model", kit["net"], "--weights", weights, "--blob", "fc5", "--data", kit["lfw"], "--images", "8",
            "--judge-images", "4", "--ratios", "0.5", "--batch", "4", "--out", str(out), "--quiet"]


def test_a_sensitivity_folder_gives_no_result_of_other_weights(kit, tmp_path):
    """A finished analysis, then the same prototxt with other weights into the same folder: refused naming the
    weights, the curves untouched; the plan flags change no curve (a re-run with --macs-target reads them
    back); a sensitivity.json with no config.json (whose settings nobody knows) is refused too."""
    from base import caffe_io
    from nets import random_weights
    out = tmp_path / "sens"
    first = run_module("prune.sensitivity", sensitivity_args(kit, out, kit["weights"]))
    assert first.returncode == 0, first.stderr[-3000:]
    curves = (out / "sensitivity.json").read_text()
    other = caffe_io.write_weights(caffe_io.read_net(kit["net"]), random_weights(kit["net"], seed=2),
                                   str(tmp_path / "other.caffemodel"))
    refused(run_module("prune.sensitivity", sensitivity_args(kit, out, other)), "other settings", "--weights")
    assert (out / "sensitivity.json").read_text() == curves and not (out / "plan.json").exists()
    again = run_module("prune.sensitivity", sensitivity_args(kit, out, kit["weights"]) + ["--macs-target", "0.8"])
    assert again.returncode == 0 and (out / "plan.json").exists(), again.stderr[-3000:]
    assert (out / "sensitivity.json").read_text() == curves
    (out / "config.json").unlink()
    refused(run_module("prune.sensitivity", sensitivity_args(kit, out, kit["weights"])), "without the config.json")


def test_a_second_sensitivity_run_on_one_folder_is_refused_by_the_lock(kit, tmp_path):
    from base.runfolder import RunFolder
    out = tmp_path / "sens"
    with RunFolder(out):
        refused(run_module("prune.sensitivity", sensitivity_args(kit, out, kit["weights"])), "in use by another run")


# ------------------------------------------------------------------ 2. numbers checked before Caffe sees them

def test_a_zero_input_dimension_is_refused_before_caffe(kit, tmp_path):
    """Caffe builds a net with a 0 in its input shape and aborts at the blob's first use (finetune: in
    ImageData's set-up; prune.stats: at the first forward)."""
    from kit import tiny_net
    zero = tiny_net(tmp_path / "zero.prototxt", size=(0, 96))
    words = ("Input layer 'data' has shape 1 x 3 x 0 x 96", "1 or more")
    refused(run_module("prune.stats", [zero]), *words)
    out = tmp_path / "run"
    args = finetune_args(kit, out)
    args[args.index("--model") + 1] = zero
    refused(run_module("finetune", args), *words)
    assert not out.exists()


def test_a_batch_that_would_exhaust_memory_is_refused_with_the_estimate(kit, tmp_path):
    """A 1120x960 input at a batch (and a list as long) whose input blob alone, with its gradient, needs twice
    the memory free here: refused with the estimate before Caffe allocates it."""
    from base import netcheck
    from kit import tiny_net
    free = netcheck.available_memory()
    if free is None:
        pytest.skip("no /proc/meminfo here")
    big = tiny_net(tmp_path / "big.prototxt", size=(1120, 960))
    batch = int(2 * free / (4 * 2 * 3 * 1120 * 960)) + 1
    lines = list_lines(kit)
    listing = tmp_path / "train.txt"
    listing.write_text("\n".join(lines[i % len(lines)] for i in range(batch)) + "\n")
    out = tmp_path / "run"
    args = finetune_args(kit, out, listing, "--batch", str(batch))
    args[args.index("--model") + 1] = big
    args[args.index("--weights"):args.index("--weights") + 2] = []
    refused(run_module("finetune", args), "--batch %d" % batch, "GB at a batch of %d, more than the" % batch)
    assert not out.exists()


def prune_args(kit, out, *extra):
    return ["--model", kit["net"], "--weights", kit["weights"], "--data", kit["lfw"], "--images", "8", "--keep",
            "0.5", "--out", str(out), "--quiet"] + list(extra)


def test_a_label_that_makes_a_classifier_beyond_memory_is_refused_with_the_estimate(kit, tmp_path):
    """One label of 2e9 among 0..7: A-Softmax would hold 2e9 x 8 weights (and their gradient and momentum)."""
    lines = list_lines(kit)
    lines[5] = lines[5].rpartition(" ")[0] + " 2000000000"
    listing = tmp_path / "train.txt"
    listing.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    refused(run_module("finetune", finetune_args(kit, out, listing)), "2000000001 classes", "GB of classifier weights")
    assert not out.exists()


@pytest.mark.parametrize("flag", ["--samples-per-image", "--positions-per-image"])
def test_sampling_that_would_exhaust_memory_is_refused_with_the_estimate(kit, tmp_path, flag):
    out = tmp_path / "run"
    refused(run_module("prune", prune_args(kit, out, flag, "100000000")), flag + " 100000000",
            "GB per batch, more than the")
    assert not out.exists()


# ------------------------------------------------------------------ 6. a refusal names the flag, before any work

@pytest.mark.parametrize("extra, flag", [
    (["--seed", "99999999999999999999"], "argument --seed: expected a whole number >= 0 and <= 2147483647"),
    (["--seed", "-1"], "argument --seed"),                    # Caffe's 'no seed': a run that would not repeat
    (["--lr-policy", "step", "--stepsize", "99999999999"], "argument --stepsize"),
    (["--lr-policy", "multistep", "--stepvalues", "4,99999999999"], "argument --stepvalues"),
    (["--native-asoftmax"], "--native-asoftmax: this Caffe build has no MarginInnerProduct layer"),
])
def test_a_finetune_value_caffe_cannot_take_is_refused_naming_its_flag(kit, tmp_path, extra, flag):
    out = tmp_path / "run"
    refused(run_module("finetune", finetune_args(kit, out, None, *extra)), flag)
    assert not out.exists()


def test_a_fine_tune_setting_of_python_m_prune_is_refused_before_the_pruning(kit, tmp_path):
    """--finetune-batch larger than the list: python -m finetune's check, run before the first group is cut
    and naming python -m prune's flags."""
    out = tmp_path / "run"
    refused(run_module("prune", prune_args(kit, out, "--finetune-epochs-final", "1", "--train-list", kit["list"],
                                           "--train-root", kit["lfw"], "--finetune-batch", "100")),
            "--finetune-batch 100", "larger than the image list")
    assert not out.exists()
