"""python -m prune.pipeline: baseline -> prune layer by layer (+ fine-tune) -> final fine-tune -> report.

Every stage is evaluated with the LFW protocol on the test folds and recorded;
every stage is a file under OUT/stages/ written when the stage is done, so a
killed run started again with the same command goes on from the last finished
stage (the prune and fine-tune drivers resume inside their stages too) and
ends with the same report.

OUT/ holds at the end:
    deploy.prototxt, model.caffemodel    the pruned net, plain Caffe files
    report.md, report.json               every stage: accuracy, params, MACs; forward time before/after
    plots/                               accuracy vs MACs, channels/params/MACs per layer, loss curves
    baseline/, prune/, stages/           the baseline training, the prune run (steps, fine-tunes), records
"""
import argparse
import json
import os
import sys
import time

import numpy as np

from prune import caffe_io
from prune.cli import entry
from prune.data import shared_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The original Sphereface-prune schedules (layer -> share of channels kept);
# "all" prunes every channel group the graph finds, residual streams included.
PRESETS = {
    4: {"original": dict(conv1_1=0.5, conv2_1=0.5, conv3_1=0.5, conv4_1=0.5)},
    10: {"original": dict(conv1_1=0.75, conv2_2=0.75, conv3_2=0.75, conv3_4=0.75, conv4_1=0.75)},
}


class PipelineError(ValueError):
    pass


class Stages:
    """Finished stages as JSON files: run each one once, even across restarts."""

    def __init__(self, out):
        self.dir = os.path.join(out, "stages")
        os.makedirs(self.dir, exist_ok=True)

    def __call__(self, name, fn):
        path = os.path.join(self.dir, name + ".json")
        if os.path.exists(path):
            return json.load(open(path))
        start = time.time()
        record = fn()
        record["seconds"] = round(time.time() - start, 1)
        text = json.dumps(record, indent=1)
        caffe_io.atomic_write(path, text)
        return json.loads(text)   # as a resumed run will read it


def say(text):
    print("[pipeline] " + text, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ stages

def data_stage(a):
    """The training list and the evaluation set: given, LFW from ../shared, or generated."""
    from finetune import lists
    shared = shared_dir()
    lfw = os.path.join(shared, "data", "lfw")
    if a.lfw_dir is None and os.path.isdir(lfw) and not a.synthetic:
        a.lfw_dir, a.pairs = os.path.join(lfw, "images-112x112"), os.path.join(lfw, "pairs.txt")
    if a.lfw_dir is None:
        from prune.synthetic import make_dataset
        why = "--synthetic" if a.synthetic else "no LFW given and none in " + shared
        say("generating a small synthetic data set (mechanics only: %s)" % why)
        a.lfw_dir, a.pairs = make_dataset(os.path.join(a.out, "data", "synthetic"))
        a.synthetic = True
    if not a.pairs:
        raise PipelineError("--lfw-dir needs --pairs (LFW View 2 pairs.txt)")
    if a.train_list is None:
        from eval_lfw.pairs import parse_folds
        say("training list: people of LFW folds %s under %s" % (a.train_folds, a.lfw_dir))
        s = lists.build(a.lfw_dir, os.path.join(a.out, "data"), folds=parse_folds(a.train_folds), pairs=a.pairs,
                        progress=False)
        a.train_list, a.train_root = os.path.join(a.out, "data", "train.txt"), s["root"]
    n = len(lists.read_list(a.train_list, a.train_root))
    return dict(train_list=os.path.abspath(a.train_list), train_root=a.train_root, train_images=n,
                lfw_dir=a.lfw_dir, pairs=a.pairs, synthetic=bool(a.synthetic))


def baseline_stage(a, d):
    """The net to prune: --weights, or trained here from scratch (distillation from --teacher, or
    A-Softmax on the list's identities when there is no teacher)."""
    if a.weights:
        return dict(prototxt=a.model, caffemodel=a.weights, trained=False)
    from finetune.driver import FineTuneJob, finetune
    mfn = os.path.join(shared_dir(), "models", "mobilefacenet", "mobilefacenet-v0")
    if a.teacher and not a.teacher_weights:
        raise PipelineError("--teacher %s needs --teacher-weights" % a.teacher)
    teacher = a.teacher or (mfn + ".prototxt" if os.path.exists(mfn + ".prototxt") and not d["synthetic"] else None)
    if teacher:
        say("baseline: training %s from scratch for %g epochs, distilled from %s" % (a.model, a.baseline_epochs, teacher))
        job = FineTuneJob(deploy=a.model, weights=None, train_list=d["train_list"], root_folder=d["train_root"],
                          out=os.path.join(a.out, "baseline"), head="distill", embedding=a.blob, teacher=teacher,
                          teacher_weights=a.teacher_weights or mfn + ".caffemodel",
                          teacher_embedding=a.teacher_blob, teacher_rgb=a.teacher_rgb, rgb=a.rgb,
                          precompute_teacher=True,
                          mirror=False, **_schedule(a.baseline_epochs, a.baseline_lr or 0.1, a.batch, d["train_images"]),
                          seed=a.seed, gpu=_gpu(a))
    else:
        say("baseline: training %s from scratch for %g epochs with A-Softmax on the list's identities"
            % (a.model, a.baseline_epochs))
        job = FineTuneJob(deploy=a.model, weights=None, train_list=d["train_list"], root_folder=d["train_root"],
                          out=os.path.join(a.out, "baseline"), head="asoftmax", embedding=a.blob, rgb=a.rgb,
                          **_schedule(a.baseline_epochs, a.baseline_lr or 0.01, a.batch, d["train_images"]), seed=a.seed,
                          gpu=_gpu(a))
    done = finetune(job, resume=True, progress=not a.quiet)
    return dict(prototxt=a.model, caffemodel=done["final"], trained=True, loss_csv=done["loss_csv"],
                teacher=teacher, epochs=a.baseline_epochs, iterations=done["iterations"],
                train_seconds=done["seconds"])


def _gpu(a):
    return None if a.gpu is None else [a.gpu]


def _schedule(epochs, lr, batch, n_images):
    """SGD from ``lr``, divided by 10 at 60 % and 85 % of the iterations (the release's multistep shape)."""
    from finetune.solver import iterations
    n = iterations(n_images, epochs, batch)
    steps = tuple(sorted({max(1, int(n * f)) for f in (0.6, 0.85)}))
    return dict(epochs=epochs, base_lr=lr, batch_size=batch, lr_policy="multistep", gamma=0.1, stepvalues=steps,
                snapshot_every=500)


def evaluate_stage(a, d, proto, weights):
    """LFW protocol on the test folds, and the net's size."""
    from eval_lfw.evaluator import evaluate
    from eval_lfw.features import net_input
    from prune.stats import net_stats
    _, (_, h, w) = net_input(caffe_io.read_net(proto), proto)
    r = evaluate(proto, a.blob, d["lfw_dir"], d["pairs"], weights=weights, folds=a.eval_folds,
                 crop="112x96" if (h, w) == (112, 96) else "none", flip=not a.no_flip, bgr=not a.rgb,
                 progress=not a.quiet)
    s = net_stats(proto)
    return dict(prototxt=proto, caffemodel=weights, accuracy=r["accuracy_mean"], std=r["accuracy_std"],
                tar_at_far_1e3=r["tar_at_far_1e-3"], folds=r["folds"], flip=r["flip"], params=s.params, macs=s.macs)


def prune_stage(a, d, base, keep, layers):
    """prune.driver.run over the whole schedule, fine-tuning after each group and at the end by
    distillation from the baseline (its embeddings computed once; no mirroring, so one row per image)."""
    from finetune.driver import FineTuneJob, finetune
    from prune.data import image_batches, image_files, preprocess_for
    from prune.driver import PruneJob, run
    from finetune.trainnet import input_layer
    _, shape = input_layer(caffe_io.read_net(a.model), a.model)
    root, rels = image_files(d["train_list"], d["train_root"], limit=min(a.images, d["train_images"]), seed=a.seed)
    pre = preprocess_for(shape, root, rels, rgb=a.rgb)

    def hook(epochs):
        def run_one(out, proto, weights):
            job = FineTuneJob(deploy=proto, weights=weights, train_list=d["train_list"], root_folder=d["train_root"],
                              out=out, head="distill", embedding=a.blob, teacher=base["prototxt"],
                              teacher_weights=base["caffemodel"], precompute_teacher=True, mirror=False,
                              rgb=a.rgb, epochs=epochs,
                              batch_size=a.batch, base_lr=a.finetune_lr, snapshot_every=500, seed=a.seed,
                              gpu=_gpu(a))
            return finetune(job, resume=True, progress=not a.quiet)["final"]
        return run_one if epochs else None

    job = PruneJob(model=base["prototxt"], weights=base["caffemodel"], out=os.path.join(a.out, "prune"),
                   criterion=a.criterion, keep=keep, layers=layers, seed=a.seed,
                   data=dict(list=d["train_list"], images=len(rels)))
    return run(job, lambda: image_batches(root, rels, pre, 32), finetune=hook(a.finetune_epochs_per_layer),
               final_finetune=hook(a.finetune_epochs_final), progress=not a.quiet)


def opencv_stage(proto, model, blob, seed=0):
    """The pruned net in OpenCV's DNN module (layer fusion off, so the numbers are comparable): the
    largest deviation from Caffe's output on random inputs, relative to the output's scale."""
    import cv2
    net = caffe_io.open_net(proto, model)
    inp = net.inputs[0]
    x = np.random.default_rng(seed).uniform(-1, 1, (2,) + net.blobs[inp].data.shape[1:]).astype(np.float32)
    net.blobs[inp].reshape(*x.shape)
    ref = net.forward(**{inp: x})[blob].copy()
    cv = cv2.dnn.readNetFromCaffe(proto, model)
    cv.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    cv.enableFusion(False)
    cv.setInput(x)
    out = cv.forward().reshape(ref.shape)   # the final output: forward(name) stops before in-place layers
    return dict(opencv=cv2.__version__, max_rel_deviation=float(np.abs(out - ref).max() / np.abs(ref).max()))


def check_same_command(a, hashed=(), error=PipelineError):
    """A run folder belongs to one command: resuming with other settings would mix two experiments.
    ``hashed``: argument names whose files' sha256 joins the record (same path, other bytes is refused too)."""
    config = {k: v for k, v in sorted(vars(a).items()) if k not in ("quiet", "out")}
    for key in hashed:
        if config.get(key):
            config[key + "_sha256"] = caffe_io.file_sha256(config[key])
    path = os.path.join(a.out, "config.json")
    if os.path.exists(path):
        old = json.load(open(path))
        changed = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
        if changed:
            raise error("%s holds a run made with other settings (%s); use another --out or the same "
                        "arguments to resume it" % (a.out, ", ".join("--" + k.replace("_", "-") for k in changed)))
    else:
        caffe_io.atomic_write(path, json.dumps(config, indent=1))
    return config


def keep_schedule(a, depth):
    """(keep, layers) for the prune driver from --preset / --keep."""
    from prune.__main__ import parse_keep
    if a.keep is not None:
        keep = parse_keep(a.keep)
        return keep, "all"
    if a.preset == "all":
        return 0.5, "all"
    table = PRESETS.get(depth, {}).get(a.preset)
    if table is None:
        raise PipelineError("no %r preset for %s (presets exist for SphereFace-%s); give --keep"
                            % (a.preset, a.model, "/".join(str(k) for k in sorted(PRESETS))))
    return dict(table), "all"


# ------------------------------------------------------------------ command line

def parser():
    ap = argparse.ArgumentParser(
        prog="python -m prune.pipeline", description=__doc__.split("\n\n")[0] + " " + __doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, choices=(4, 10, 20, 36, 64), default=4,
                    help="SphereFace depth: its deploy prototxt from prototxt/ is the net (default 4)")
    ap.add_argument("--model", help="deploy prototxt of another net instead of --depth's")
    ap.add_argument("--weights", help="baseline caffemodel; omitted: a baseline is trained here from scratch")
    ap.add_argument("--blob", default="fc5", help="embedding blob (default fc5)")
    ap.add_argument("--rgb", action="store_true",
                    help="the net takes RGB planes (e.g. a MobileFaceNet); default BGR, as SphereFace and Caffe's "
                         "ImageData")
    ap.add_argument("--out", required=True, help="run folder, e.g. runs/sf4 (a second run resumes it)")
    d = ap.add_argument_group("data")
    d.add_argument("--train-list", help="training list, 'path label' lines (python -m finetune.lists); default: "
                                        "people of --train-folds of LFW (from ../shared)")
    d.add_argument("--train-root", default="", help="folder the training list's paths are relative to")
    d.add_argument("--train-folds", default="1-5", help="LFW folds whose people the default list holds (default 1-5)")
    d.add_argument("--lfw-dir", help="LFW aligned 112x112 images (default ../shared/data/lfw/images-112x112; "
                                     "without it a small synthetic set is generated)")
    d.add_argument("--pairs", help="LFW pairs.txt (default: the one beside --lfw-dir in ../shared)")
    d.add_argument("--eval-folds", default="6-10", help="LFW folds every stage is evaluated on (default 6-10)")
    d.add_argument("--no-flip", action="store_true", help="evaluate without the mirror-image features")
    d.add_argument("--synthetic", action="store_true", help="use the generated data set even where LFW exists")
    b = ap.add_argument_group("baseline (only without --weights)")
    b.add_argument("--baseline-epochs", type=float, default=8, help="epochs of baseline training (default 8)")
    b.add_argument("--baseline-lr", type=float, default=None,
                   help="base lr of baseline training, /10 at 60%% and 85%% of it (default 0.1 with a teacher, "
                        "0.01 with A-Softmax, where 0.1 diverges from scratch)")
    b.add_argument("--teacher", help="teacher deploy prototxt for the baseline's distillation (default: the "
                                     "MobileFaceNet of ../shared; none: A-Softmax on the list's identities)")
    b.add_argument("--teacher-weights", help="teacher caffemodel")
    b.add_argument("--teacher-blob", default="fc1", help="teacher embedding blob (default fc1)")
    b.add_argument("--teacher-rgb", type=lambda v: v.lower() in ("1", "yes", "true"), default=True,
                   help="the teacher takes RGB planes (yes/no, default yes: the MobileFaceNet does)")
    p = ap.add_argument_group("pruning")
    p.add_argument("--criterion", default="thinet", help="channel criterion (python -m prune --help; default thinet)")
    p.add_argument("--preset", default="original", choices=("original", "all"),
                   help="original: the Sphereface-prune schedule (SphereFace-4: conv1_1/2_1/3_1/4_1 at 0.5; "
                        "SphereFace-10: conv1_1/2_2/3_2/3_4/4_1 at 0.75); all: every channel group the graph "
                        "finds, residual streams included, at 0.5 (default original)")
    p.add_argument("--keep", help="instead of --preset: one ratio for every group (0.5) or a table "
                                  "(conv1_1=0.5,conv2_1=0.75)")
    p.add_argument("--images", type=int, default=128, help="images of the training list sampled per group (default 128)")
    f = ap.add_argument_group("fine-tuning (distillation from the baseline; Caffe's solver)")
    f.add_argument("--finetune-epochs-per-layer", type=float, default=1, help="after each pruned group (default 1)")
    f.add_argument("--finetune-epochs-final", type=float, default=9, help="after the last group (default 9)")
    f.add_argument("--finetune-lr", type=float, default=1e-3, help="fine-tune base lr (default 1e-3)")
    ap.add_argument("--batch", type=int, default=64, help="training batch size (default 64)")
    ap.add_argument("--gpu", type=int, default=None,
                    help="GPU id for Caffe (training, sampling, evaluation; needs a CUDA build: "
                         "scripts/setup.sh --gpu); forward times are always measured on the CPU. Default: CPU")
    ap.add_argument("--timing-rounds", type=int, default=7, help="rounds of the forward-time measurement (default 7)")
    ap.add_argument("--seed", type=int, default=0, help="seed of sampling, image draws and Caffe (default 0)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap


def run_pipeline(a):
    from prune import report
    from prune.speed import forward_ms
    start = time.time()
    depth = None if a.model else a.depth
    a.model = a.model or os.path.join(ROOT, "prototxt", "sphereface%d_deploy.prototxt" % a.depth)
    for path in (a.model, a.weights, a.train_list):
        if path and not os.path.exists(path):
            raise PipelineError("no such file: %s" % path)
    os.makedirs(a.out, exist_ok=True)
    keep, layers = keep_schedule(a, depth)
    check_same_command(a)
    if a.gpu is not None:
        import caffe
        caffe.set_device(a.gpu)
        caffe.set_mode_gpu()
    stage = Stages(a.out)
    d = stage("data", lambda: data_stage(a))
    base = stage("baseline", lambda: baseline_stage(a, d))
    evals = [dict(stage="baseline", **stage("eval_baseline", lambda: evaluate_stage(a, d, base["prototxt"],
                                                                                    base["caffemodel"])))]
    say("baseline: LFW folds %s %.2f%%" % (a.eval_folds, 100 * evals[0]["accuracy"]))
    log = stage("prune", lambda: prune_stage(a, d, base, keep, layers))
    for s in log["steps"]:
        name = "eval_step_%02d" % s["step"]
        rec = stage(name, lambda s=s: evaluate_stage(a, d, s["prototxt"], s["caffemodel"]))
        evals.append(dict(stage="%s pruned%s" % (s["group"], " + fine-tuned" if "pruned_caffemodel" in s else ""),
                          **rec))
        say("after %s: LFW %.2f%%" % (s["group"], 100 * rec["accuracy"]))
    if log["final_finetune"]:
        rec = stage("eval_final", lambda: evaluate_stage(a, d, log["prototxt"], log["caffemodel"]))
        evals.append(dict(stage="final fine-tune", **rec))
        say("after the final fine-tune: LFW %.2f%%" % (100 * rec["accuracy"]))
    deploy = os.path.join(a.out, "deploy.prototxt")
    model = os.path.join(a.out, "model.caffemodel")
    caffe_io.atomic_write(deploy, open(log["prototxt"], "rb").read())
    caffe_io.atomic_write(model, open(log["caffemodel"], "rb").read())
    timing = stage("timing", lambda: dict(forward_ms=forward_ms(
        dict(baseline=(base["prototxt"], base["caffemodel"]), pruned=(deploy, model)), rounds=a.timing_rounds)))
    cv = stage("opencv", lambda: opencv_stage(deploy, model, a.blob))
    rep = report.build(a, d, base, log, evals, timing, depth, cv)
    report.write(rep, a.out)
    say("done in %.0f s: %s" % (time.time() - start, os.path.join(a.out, "report.md")))
    return rep


@entry("python -m prune.pipeline")
def main(argv=None):
    a = parser().parse_args(argv)
    rep = run_pipeline(a)
    b, f = rep["stages"][0], rep["stages"][-1]
    print("baseline %.2f%% -> pruned %.2f%% on LFW folds %s; MACs %.1fM -> %.1fM (%.2fx); "
          "Caffe CPU forward (batch 1) %.2f -> %.2f ms/image"
          % (100 * b["accuracy"], 100 * f["accuracy"], a.eval_folds, b["macs"] / 1e6, f["macs"] / 1e6,
             b["macs"] / f["macs"], rep["timing"]["forward_ms"]["baseline"]["1"], rep["timing"]["forward_ms"]["pruned"]["1"]))
    print("pruned net: %s + %s\nreport: %s" % (os.path.join(a.out, "deploy.prototxt"),
                                              os.path.join(a.out, "model.caffemodel"),
                                              os.path.join(a.out, "report.md")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
