"""Fuzz-style: every entry point fed mutated inputs -- image lists with odd whitespace and paths, truncated
images and caffemodels, extreme flag values -- as a user runs it (a real process).  Each case ends with
success, or exit 2 and one line ``python -m X: error: ...`` that leaves no folder the corrected command must
match; never Caffe's abort (134), a kill, or a traceback.

The cases are generated, not hand-picked; ``make test`` runs a seeded sample of each kind (SAMPLE), the full
sweep is in the slow tier (``make test-all``)."""
import os
import random
import shutil

import pytest

from kit import make_kit, run_module

SAMPLE = 2       # cases of each kind in make test

NET = ["--model", "{net}", "--weights", "{weights}"]
ENTRY = {   # module -> arguments of a small run that succeeds on the kit
    "finetune": NET + ["--train-list", "{list}", "--train-root", "{lfw}", "--loss", "asoftmax", "--margin", "2",
                       "--epochs", "1", "--batch", "4", "--out", "{out}", "--quiet"],   # Caffe's ImageData reads it
    "prune": NET + ["--data", "{data}", "--data-root", "{lfw}", "--images", "8", "--keep", "0.5", "--out", "{out}",
                    "--quiet"],
    "prune.sensitivity": NET + ["--blob", "fc5", "--data", "{lfw}", "--images", "8", "--judge-images", "4",
                                "--ratios", "0.5", "--batch", "4", "--out", "{out}", "--quiet"],
    "prune.verify": ["{net}", "{weights}", "--runtimes", "caffe,opencv-nofusion", "--rounds", "1", "--min-seconds",
                     "0.001", "--inputs", "1", "--json", "{folder}/verify.json"],
    "prune.stats": ["{net}", "--weights", "{weights}"],
    "prune.groups": ["{net}"],
    "eval_lfw": NET + ["--blob", "fc5", "--lfw-dir", "{lfw}", "--pairs", "{pairs}", "--out", "{out}", "--quiet"],
    "finetune.lists": ["{lfw}", "{out}", "--val-fraction", "0.3"],
}
LISTED = ("finetune", "prune")            # the entry points reading an image list
WEIGHTED = [m for m, args in ENTRY.items() if "{weights}" in args]

EXTREME = ("0", "-1", "nan", "inf", "1e308", "99999999999", "abc")
FLAGS = {   # flags whose every accepted value still runs briefly
    "finetune": ("--epochs", "--batch", "--finetune-lr", "--momentum", "--weight-decay", "--snapshot-every",
                 "--seed", "--augment-shift", "--augment-scale"),
    "prune": ("--keep", "--images", "--batch", "--samples-per-image", "--positions-per-image", "--ridge", "--seed",
              "--round-to"),
    "prune.sensitivity": ("--images", "--judge-images", "--ratios", "--batch", "--macs-target"),
    "prune.verify": ("--inputs", "--threads", "--tolerance", "--seed"),
    "eval_lfw": ("--batch",),
    "finetune.lists": ("--val-fraction", "--min-images", "--seed"),
}


def _line(i, f):
    def change(lines):
        lines[i] = f(lines[i])
        return lines
    return change


LIST_MUTATIONS = {
    "trailing-space": _line(1, lambda s: s + " "),
    "leading-space": _line(1, lambda s: " " + s),
    "two-spaces": _line(1, lambda s: s.replace(" ", "  ")),
    "tab": _line(1, lambda s: s.replace(" ", "\t")),
    "crlf": lambda lines: [s + "\r" for s in lines],
    "blank-line": lambda lines: lines[:2] + [""] + lines[2:],
    "blank-end": lambda lines: lines + [""],
    "absolute": lambda lines: ["{lfw}/" + s for s in lines],
    "no-label": _line(1, lambda s: s.rpartition(" ")[0]),
    "text-label": _line(1, lambda s: s.rpartition(" ")[0] + " x"),
    "huge-label": _line(1, lambda s: s.rpartition(" ")[0] + " 99999999999"),
    "big-label": _line(1, lambda s: s.rpartition(" ")[0] + " 2000000000"),
    "spaced-name": _line(1, lambda s: "{spaced} 0"),
}
IMAGE_CUTS = (0, 10, 200, 0.5)
MODEL_CUTS = (0, 10, 0.5, -1)


def cases():
    out = [("list-%s-%s" % (name, m), m, dict(list=name)) for name in LIST_MUTATIONS for m in LISTED]
    out += [("image-%s-%s" % (cut, m), m, dict(image=cut)) for cut in IMAGE_CUTS for m in LISTED]
    out += [("model-%s-%s" % (cut, m), m, dict(model=cut)) for cut in MODEL_CUTS for m in WEIGHTED]
    out += [("flag-%s%s-%s" % (m, flag, v), m, dict(flag=(flag, v))) for m, flags in FLAGS.items() for flag in flags
            for v in EXTREME]
    return out


def sampled():
    """Every case; all but a seeded SAMPLE of each kind (list, image, model, flag) in the slow tier."""
    all_cases = cases()
    rng, keep = random.Random(27), set()
    for kind in ("list", "image", "model", "flag"):
        keep.update(rng.sample([name for name, _, _ in all_cases if name.startswith(kind + "-")], SAMPLE))
    return [pytest.param(m, change, id=name, marks=() if name in keep else pytest.mark.slow)
            for name, m, change in all_cases]


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    return make_kit(tmp_path_factory.mktemp("kit"))


def cut(path, at):
    data = open(path, "rb").read()
    n = int(len(data) * at) if isinstance(at, float) else (len(data) + at if at < 0 else at)
    with open(path, "wb") as f:
        f.write(data[:n])


def mutated(kit, folder, change):
    """{placeholder: path} of the kit with ``change`` applied to copies in ``folder``."""
    files = dict(kit, folder=folder, lfw=os.path.join(folder, "lfw"), out=os.path.join(folder, "out"))
    shutil.copytree(kit["lfw"], files["lfw"])
    shutil.copy(kit["weights"], os.path.join(folder, "w.caffemodel"))
    files["weights"] = os.path.join(folder, "w.caffemodel")
    lines = open(kit["list"]).read().splitlines()
    first = os.path.join(files["lfw"], lines[0].rpartition(" ")[0])
    files["spaced"] = os.path.join(os.path.dirname(lines[0]), "a copy é.jpg")
    shutil.copy(first, os.path.join(files["lfw"], files["spaced"]))
    if "list" in change:
        lines = [s.format(**files) for s in LIST_MUTATIONS[change["list"]](lines)]
    if "image" in change:
        cut(first, change["image"])
    if "model" in change:
        cut(files["weights"], change["model"])
    files["list"] = files["data"] = os.path.join(folder, "train.txt")
    with open(files["list"], "w", newline="") as f:
        f.write("\n".join(lines) + "\n")
    return files


@pytest.mark.parametrize("module, change", sampled())
def test_a_mutated_input_is_a_success_or_one_line(kit, tmp_path, module, change):
    files = mutated(kit, str(tmp_path), change)
    args = [a.format(**files) for a in ENTRY[module]]
    if "flag" in change:
        flag, value = change["flag"]
        if flag in args:
            i = args.index(flag)
            del args[i:i + 2]
        args += [flag, value]
    done = run_module(module, args, timeout=300)
    err = done.stderr
    assert done.returncode in (0, 2), (done.returncode, err[-3000:])
    assert "Traceback" not in err and "Check failed" not in err and "*** " not in err, err[-3000:]
    if done.returncode == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("python -m %s: error: " % module), err[-3000:]
        assert not os.path.exists(files["out"]) or "corrected command" in err, os.listdir(files["out"])
