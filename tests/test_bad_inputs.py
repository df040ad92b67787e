"""The catalogue of bad inputs (issue 17): every entry point, every kind of mistake a user makes (broken,
empty, truncated, foreign or missing files; impossible numbers; unknown layers and broken blob graphs; bad
lists and pairs; outputs over inputs; read-only and full output folders; a GPU this Caffe does not have).

Each case runs the real command and asserts: exit status 2, ONE line ``python -m X: error: ...`` naming
the file, layer or flag at fault, no traceback (no Caffe abort), every input byte-identical, and nothing
half-written: the output folder is not created (or, when it existed, holds exactly what it held)."""
import json
import os
import shutil

import pytest

from base import caffe_io
from kit import in_tmpfs, litter, make_kit, namespaces_work, run_module, tiny_net, tree_digest
from nets import random_weights


def _bad_nets(k, folder):
    """Broken prototxts, each with one fault."""
    def edit(name, change):
        net = caffe_io.read_net(k["net"])
        change(net)
        return caffe_io.write_net(net, os.path.join(folder, name + ".prototxt"))

    def layer(net, name):
        return next(x for x in net.layer if x.name == name)
    with open(os.path.join(folder, "syntax.prototxt"), "w") as f:
        f.write('name: "x"\nlayer { name: "data" type: "Input" top: "data" \n')
    open(os.path.join(folder, "empty.prototxt"), "w").close()
    k["syntax"] = os.path.join(folder, "syntax.prototxt")
    k["empty_net"] = os.path.join(folder, "empty.prototxt")
    k["unknown_type"] = edit("unknown_type", lambda n: setattr(layer(n, "relu1"), "type", "ChannelShuffle"))
    k["loop"] = edit("loop", lambda n: layer(n, "conv2").bottom.__setitem__(0, "fc5"))
    k["misspelt"] = edit("misspelt", lambda n: layer(n, "fc5").bottom.__setitem__(0, "conv9"))
    k["in_place"] = edit("in_place", lambda n: layer(n, "conv2").top.__setitem__(0, "conv1"))
    k["big_kernel"] = edit("big_kernel", lambda n: layer(n, "conv1").convolution_param.kernel_size.__setitem__(
        0, 300))

    def python_layer(n):
        x = layer(n, "relu2")
        x.type = "Python"
        x.python_param.module, x.python_param.layer = "no_such_module_anywhere", "Layer"
    k["python"] = edit("python", python_layer)


def _bad_weights(k, folder):
    data = open(k["weights"], "rb").read()
    k["truncated"] = os.path.join(folder, "truncated.caffemodel")
    with open(k["truncated"], "wb") as f:
        f.write(data[:len(data) // 3])
    k["text_weights"] = os.path.join(folder, "text.caffemodel")
    with open(k["text_weights"], "w") as f:
        f.write("these are not weights\n")
    other = tiny_net(os.path.join(folder, "other.prototxt"), width=6)
    k["foreign"] = caffe_io.write_weights(caffe_io.read_net(other), random_weights(other),
                                          os.path.join(folder, "foreign.caffemodel"))
    w = caffe_io.read_weights(k["weights"])
    del w["fc5"]
    k["no_fc5"] = caffe_io.write_weights(caffe_io.read_net(k["net"]), w, os.path.join(folder, "no_fc5.caffemodel"))


def _bad_lists(k, folder):
    lines = open(k["list"]).read().splitlines()
    not_image = os.path.join(k["lfw"], lines[0].split()[0].split("/")[0], "notes.jpg")
    with open(not_image, "w") as f:
        f.write("a text file with an image's name\n")

    def write(name, rows):
        path = os.path.join(folder, name + ".txt")
        with open(path, "w") as f:
            f.write("\n".join(rows) + "\n")
        return path
    k["list_not_image"] = write("list_not_image", lines + [os.path.relpath(not_image, k["lfw"]) + " 0"])
    k["list_missing"] = write("list_missing", lines + ["nobody/nobody_0001.jpg 1"])
    k["list_malformed"] = write("list_malformed", lines[:3] + ["just-a-path.jpg"])
    k["list_empty"] = write("list_empty", [""])
    pairs = open(k["pairs"]).read().splitlines()
    k["pairs_header"] = write("pairs_header", ["ten 300"] + pairs[1:])
    k["pairs_missing"] = write("pairs_missing", [pairs[0]] + [p.replace("person_0", "ghost_0") for p in pairs[1:]])
    k["plan"] = write("plan", ['{"keep": "half"}'])
    for name, keep in (("unknown", '{"conv9": 2}'), ("zero", '{"conv1": 0}'), ("over", '{"conv1": 999}'),
                       ("ratio", '{"conv1": 0.5}')):     # plan files hold counts, 1..channels of a real group
        k["plan_" + name] = write("plan_" + name, ['{"keep": %s}' % keep])


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kit")
    k = make_kit(folder / "inputs")
    bad = str(folder / "inputs" / "bad")
    os.makedirs(bad)
    _bad_nets(k, bad)
    _bad_weights(k, bad)
    _bad_lists(k, bad)
    return k


EVAL = ["--model", "{net}", "--weights", "{weights}", "--blob", "fc5", "--lfw-dir", "{lfw}", "--pairs", "{pairs}",
        "--out", "{out}", "--quiet"]
FINETUNE = ["--model", "{net}", "--weights", "{weights}", "--train-list", "{list}", "--train-root", "{lfw}",
            "--loss", "asoftmax", "--epochs", "1", "--batch", "4", "--out", "{out}", "--quiet"]
PRUNE = ["--model", "{net}", "--weights", "{weights}", "--data", "{lfw}", "--images", "4", "--out", "{out}", "--quiet"]
PIPELINE = ["--model", "{net}", "--weights", "{weights}", "--train-list", "{list}", "--train-root", "{lfw}",
            "--lfw-dir", "{lfw}", "--pairs", "{pairs}", "--eval-folds", "1-10", "--keep", "0.5", "--out", "{out}",
            "--quiet"]
SENSITIVITY = ["--model", "{net}", "--weights", "{weights}", "--blob", "fc5", "--data", "{lfw}", "--images", "4",
               "--judge-images", "2", "--out", "{out}", "--quiet"]
TAYLOR = ["--model", "{net}", "--weights", "{weights}", "--train-list", "{list}", "--train-root", "{lfw}",
          "--remove-per-step", "1", "--target-share", "0.5", "--out", "{out}", "--quiet"]
PRIORITISE = ["--model", "{net}", "--train-list", "{list}", "--train-root", "{lfw}", "--out", "{out}", "--quiet"]


def with_(base, **flags):
    """``base`` with flags replaced or added (flag_name=value; value None removes the flag)."""
    args = list(base)
    for name, value in flags.items():
        flag = "--" + name.rstrip("_").replace("_", "-")
        if flag in args:
            i = args.index(flag)
            del args[i:i + 2]
        if value is not None:
            args += [flag, value]
    return args


# (module, arguments, text the error line must contain); {name} is a kit file, {out} the output folder
CASES = [
    # ---- python -m eval_lfw
    ("eval_lfw", with_(EVAL, model="{syntax}"), "syntax.prototxt"),
    ("eval_lfw", with_(EVAL, model="{empty_net}"), "empty.prototxt"),
    ("eval_lfw", with_(EVAL, weights="{truncated}"), "truncated.caffemodel"),
    ("eval_lfw", with_(EVAL, weights="{text_weights}"), "text.caffemodel"),
    ("eval_lfw", with_(EVAL, weights="{foreign}"), "'conv1'"),
    ("eval_lfw", with_(EVAL, weights="{no_fc5}"), "'fc5'"),
    ("eval_lfw", with_(EVAL, model="{unknown_type}"), "ChannelShuffle"),
    ("eval_lfw", with_(EVAL, model="{loop}"), "'conv2' reads blob 'fc5'"),
    ("eval_lfw", with_(EVAL, model="{in_place}"), "'conv2'"),
    ("eval_lfw", with_(EVAL, model="{big_kernel}"), "big_kernel.prototxt"),
    ("eval_lfw", with_(EVAL, model="{python}"), "no_such_module_anywhere"),
    ("eval_lfw", with_(EVAL, pairs="{pairs_header}"), "pairs_header.txt"),
    ("eval_lfw", with_(EVAL, pairs="{pairs_missing}"), "ghost_0"),
    ("eval_lfw", with_(EVAL, eval_folds="11-12"), "11"),
    ("eval_lfw", with_(EVAL, batch="0"), "--batch"),
    ("eval_lfw", with_(EVAL, pairs="{out}/results.json"), "results.json"),   # an input where an output goes
    # ---- python -m finetune
    ("finetune", with_(FINETUNE, epochs="0"), "--epochs"),
    ("finetune", with_(FINETUNE, epochs="-1"), "--epochs"),
    ("finetune", with_(FINETUNE, snapshot_every="-1"), "--snapshot-every"),
    ("finetune", with_(FINETUNE, batch="0"), "--batch"),
    ("finetune", with_(FINETUNE, finetune_lr="nan"), "--finetune-lr"),
    ("finetune", with_(FINETUNE, momentum="1.5"), "--momentum"),
    ("finetune", with_(FINETUNE, batch="500"), "batch size 500"),
    ("finetune", with_(FINETUNE, train_list="{list_not_image}"), "notes.jpg"),
    ("finetune", with_(FINETUNE, train_list="{list_missing}"), "nobody_0001.jpg"),
    ("finetune", with_(FINETUNE, train_list="{list_malformed}"), "list_malformed.txt:4"),
    ("finetune", with_(FINETUNE, train_list="{list_empty}"), "list_empty.txt"),
    ("finetune", with_(FINETUNE, weights="{no_fc5}"), "'fc5'"),
    ("finetune", with_(FINETUNE, weights="{foreign}"), "'conv1'"),
    ("finetune", with_(FINETUNE, model="{unknown_type}"), "ChannelShuffle"),
    ("finetune", with_(FINETUNE, model="{misspelt}"), "conv9"),
    ("finetune", with_(FINETUNE, model="{python}"), "no_such_module_anywhere"),
    ("finetune", with_(FINETUNE, loss="distill", teacher="{net}", teacher_weights="{out}/final.caffemodel"),
     "--teacher-weights"),
    ("finetune", with_(FINETUNE, weights="{out}/snapshots/start.caffemodel"), "--weights"),
    ("finetune", with_(FINETUNE, gpu="0"), "--gpu 0"),
    ("finetune", with_(FINETUNE, loss="distill", distill_features="conv9"), "conv9"),
    ("finetune", with_(FINETUNE, loss="distill", distill_features="auto") + ["--precompute-teacher"],
     "--precompute-teacher"),
    ("finetune", with_(FINETUNE, loss="distill", distill_features="auto", feature_weight="0"), "--feature-weight"),
    ("finetune", with_(FINETUNE, augment_scale="1.5"), "--augment-scale"),
    ("finetune", with_(FINETUNE, loss="distill", augment_shift="2") + ["--precompute-teacher"], "--precompute-teacher"),
    # ---- python -m prune
    ("prune", with_(PRUNE, samples_per_image="0"), "--samples-per-image"),
    ("prune", with_(PRUNE, images="0"), "--images"),
    ("prune", with_(PRUNE, keep="0"), "--keep"),
    ("prune", with_(PRUNE, keep="1.5"), "--keep"),
    ("prune", with_(PRUNE, keep="conv9=0.5"), "conv9"),
    ("prune", with_(PRUNE, macs_target="1.5"), "--macs-target"),
    ("prune", with_(PRUNE, finetune_epochs_per_layer="-1"), "--finetune-epochs-per-layer"),
    ("prune", with_(PRUNE, weights="{no_fc5}"), "'fc5'"),
    ("prune", with_(PRUNE, weights="{truncated}"), "truncated.caffemodel"),
    ("prune", with_(PRUNE, model="{in_place}"), "'conv2'"),
    ("prune", with_(PRUNE, model="{loop}"), "'conv2' reads blob 'fc5'"),
    ("prune", with_(PRUNE, weights="{out}/pruned.caffemodel"), "--weights"),
    ("prune", with_(PRUNE, plan="{plan}", keep=None), "plan.txt"),
    ("prune", with_(PRUNE, plan="{plan_unknown}"), "no layer or channel group named 'conv9'"),
    ("prune", with_(PRUNE, plan="{plan_zero}"), "group 'conv1' keeps 0 channels"),
    ("prune", with_(PRUNE, plan="{plan_over}"), "group 'conv1' keeps 999 channels"),
    ("prune", with_(PRUNE, plan="{plan_ratio}"), "group 'conv1' keeps 0.5 channels"),
    ("prune", with_(PRUNE, round_to="0"), "--round-to"),
    # ---- python -m prune.sensitivity: the same plan flags, refused before the analysis runs
    ("prune.sensitivity", with_(SENSITIVITY, plan="{plan_unknown}"), "conv9"),
    ("prune.sensitivity", with_(SENSITIVITY, plan="{plan_zero}"), "group 'conv1' keeps 0 channels"),
    ("prune.sensitivity", with_(SENSITIVITY, plan="{plan_over}"), "group 'conv1' keeps 999 channels"),
    ("prune.sensitivity", with_(SENSITIVITY, keep="conv9=0.5"), "conv9"),
    ("prune", with_(PRUNE, finetune_epochs_final="1", train_list="{list_not_image}", train_root="{lfw}"),
     "notes.jpg"),
    # ---- python -m apps.pipeline
    ("apps.pipeline", with_(PIPELINE, weights="{out}/model.caffemodel"), "--weights"),
    ("apps.pipeline", with_(PIPELINE, model="{out}/deploy.prototxt"), "--model"),
    ("apps.pipeline", with_(PIPELINE, images="0"), "--images"),
    ("apps.pipeline", with_(PIPELINE, finetune_epochs_per_layer="-1"), "--finetune-epochs-per-layer"),
    ("apps.pipeline", with_(PIPELINE, baseline_epochs="0"), "--baseline-epochs"),
    ("apps.pipeline", with_(PIPELINE, criterion="best"), "--criterion"),
    ("apps.pipeline", with_(PIPELINE, keep="conv9=0.5"), "conv9"),
    ("apps.pipeline", with_(PIPELINE, plan="{plan_unknown}", keep=None), "conv9"),
    ("apps.pipeline", with_(PIPELINE, plan="{plan_over}", keep=None), "group 'conv1' keeps 999 channels"),
    ("apps.pipeline", with_(PIPELINE, model="{unknown_type}"), "ChannelShuffle"),
    ("apps.pipeline", with_(PIPELINE, train_list="{list_not_image}"), "notes.jpg"),
    ("apps.pipeline", with_(PIPELINE, eval_folds="11-12"), "11"),
    ("apps.pipeline", with_(PIPELINE, gpu="0"), "--gpu 0"),
    # ---- the other entry points
    ("prune.stats", ["{loop}", "--weights", "{weights}"], "'conv2' reads blob 'fc5'"),
    ("prune.stats", ["{net}", "--weights", "{no_fc5}"], "layer fc5"),
    ("prune.stats", ["{unknown_type}"], "ChannelShuffle"),
    ("prune.stats", ["{big_kernel}"], "Caffe cannot build this net"),
    ("apps.prioritise.widths", ["--model", "{net}", "--weights", "{no_fc5}", "--out", "{out}"], "'fc5'"),
    ("apps.prioritise.towers", ["--model", "{loop}", "--out", "{out}/towers.prototxt"], "reads blob 'fc5'"),
    ("apps.taylor", with_(TAYLOR, weights="{no_fc5}"), "'fc5'"),
    ("apps.taylor", with_(TAYLOR, remove_per_step="0"), "--remove-per-step"),
    ("apps.prioritise", with_(PRIORITISE, batch="0"), "--batch"),
    ("apps.prioritise", with_(PRIORITISE, pretrain_epochs="-1"), "--pretrain-epochs"),
]

# cases whose output folder exists beforehand, holding what the command would have overwritten
PREPARED = {"{out}/final.caffemodel": "weights", "{out}/snapshots/start.caffemodel": "weights",
            "{out}/pruned.caffemodel": "weights", "{out}/model.caffemodel": "weights",
            "{out}/deploy.prototxt": "net", "{out}/results.json": "pairs"}


def expand(args, k, out):
    values = dict(k, out=out)
    return [a.format(**values) for a in args]


def assert_refused(done, module, text):
    lines = done.stderr.splitlines()
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("python -m %s: error: " % module), done.stderr[-3000:]
    assert text in lines[0], "the error should name %r: %s" % (text, lines[0])
    assert "Traceback" not in done.stderr


def test_the_catalogue_is_big_and_covers_every_driver():
    assert len(CASES) >= 40
    assert {m for m, _, _ in CASES} >= {"eval_lfw", "finetune", "prune", "apps.pipeline", "prune.stats",
                                        "apps.prioritise.widths", "apps.prioritise.towers", "apps.taylor", "apps.prioritise"}


@pytest.mark.parametrize("module, args, text", CASES, ids=["%s-%d" % (m, i) for i, (m, _, _) in enumerate(CASES)])
def test_bad_input_is_refused_up_front(kit, tmp_path, module, args, text):
    out = str(tmp_path / "out")
    for placeholder, source in PREPARED.items():
        if placeholder in args:
            target = placeholder.replace("{out}", out)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copy(kit[source], target)
    before, out_before = tree_digest(kit["folder"]), tree_digest(out) if os.path.exists(out) else None
    done = run_module(module, expand(args, kit, out))
    assert_refused(done, module, text.format(**dict(kit, out=out)))
    assert tree_digest(kit["folder"]) == before, "an input changed"
    if out_before is None:
        assert not os.path.exists(out), "created %s before refusing" % os.listdir(out)
    else:
        assert tree_digest(out) == out_before, "the output folder changed"
    assert litter(kit["folder"]) == []


needs_namespaces = pytest.mark.skipif(not namespaces_work(), reason="needs unshare -rm (a private tmpfs mount)")


@needs_namespaces
@pytest.mark.parametrize("module, base", [("finetune", FINETUNE), ("prune", PRUNE), ("apps.pipeline", PIPELINE),
                                          ("eval_lfw", EVAL)])
@pytest.mark.parametrize("options, text", [("ro", "read-only"), ("size=64k", "MB free")])
def test_a_read_only_or_full_output_folder_is_refused(kit, tmp_path, module, base, options, text):
    mount = str(tmp_path / "mnt")
    before = tree_digest(kit["folder"])
    args = " ".join("'%s'" % a for a in expand(base, kit, mount + "/run"))
    import sys
    done = in_tmpfs(mount, "exec %s -m %s %s" % (sys.executable, module, args), options=options)
    assert_refused(done, module, text)
    assert tree_digest(kit["folder"]) == before


def test_a_corrected_command_is_accepted_in_the_folder_a_refused_one_named(kit, tmp_path):
    """The run folder's config is written only after validation: a refused command leaves nothing that
    makes the corrected one look like 'other settings'."""
    out = str(tmp_path / "out")
    os.makedirs(out)
    assert_refused(run_module("prune", expand(with_(PRUNE, keep="conv1=0.5,conv9=0.5"), kit, out)), "prune",
                   "conv9")
    assert os.listdir(out) == [".lock"] or os.listdir(out) == []
    done = run_module("prune", expand(with_(PRUNE, keep="conv1=0.5"), kit, out))
    assert done.returncode == 0, done.stderr[-2000:]
    plan = json.load(open(os.path.join(out, "config.json")))["plan"]
    assert plan["made_by"]["keep"] == {"conv1": 0.5} and list(plan["keep"]) == ["conv1"]
    assert plan["keep"]["conv1"] == plan["channels"]["conv1"] // 2
    assert json.load(open(os.path.join(out, "plan.json"))) == plan
