"""python -m apps.pipeline: baseline -> prune layer by layer (+ fine-tune) -> final fine-tune -> report.

Every stage is evaluated with the LFW protocol on the test folds and recorded;
every stage is a file under OUT/stages/ written when the stage is done, so a
killed run started again with the same command goes on from the last finished
stage (the prune and fine-tune drivers resume inside their stages too) and
ends with the same report.

OUT/ holds at the end:
    deploy.prototxt, model.caffemodel    the pruned net, plain Caffe files
    model.onnx                           the same net in ONNX (prune.export), for the runtimes without Caffe
    report.md, report.json               every stage: accuracy, params, MACs; forward time before/after
    plots/                               accuracy vs MACs, channels/params/MACs per layer, loss curves
    baseline/, prune/, stages/           the baseline training, the prune run (steps, fine-tunes), records

The command line is read once into typed settings (``settings(argv)``); the
stages take those and the records of the stages before them, and the report
is built from the records alone.
"""
import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Optional

from base import caffe_io, cli
from base.errors import ToolkitError
from base.runfolder import RunFolder, command_config
from base.shared import shared_dir
from eval_lfw.evaluator import EvalSpec, spec_from_args
from finetune.hooks import FineTuneSpec, add_fold_bn, add_similarity
from prune import options, plans
from prune.criteria import CRITERIA

PROG = "python -m apps.pipeline"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The original Sphereface-prune schedules (layer -> share of channels kept);
# "all" prunes every channel group the graph finds, residual streams included.
PRESETS = {
    4: {"original": dict(conv1_1=0.5, conv2_1=0.5, conv3_1=0.5, conv4_1=0.5)},
    10: {"original": dict(conv1_1=0.75, conv2_2=0.75, conv3_2=0.75, conv3_4=0.75, conv4_1=0.75)},
}


class PipelineError(ToolkitError):
    pass


@dataclass(frozen=True)
class DataSpec:
    """Where the training list and the evaluation set come from (the data stage resolves it)."""
    train_list: Optional[str] = None     # None: the people of train_folds of LFW
    train_root: str = ""
    train_folds: str = "1-5"
    train_unpaired: bool = False         # also the people named in no pair (in no fold)
    lfw_dir: Optional[str] = None        # None: LFW from ../shared, else a generated set
    pairs: Optional[str] = None
    synthetic: bool = False              # the generated set even where LFW exists


@dataclass(frozen=True)
class BaselineSpec:
    """The net to prune: given weights, or trained here from scratch."""
    weights: Optional[str] = None
    epochs: float = 8
    lr: Optional[float] = None           # None: 0.1 with a teacher, 0.01 with A-Softmax
    teacher: Optional[str] = None
    teacher_weights: Optional[str] = None
    teacher_blob: str = "fc1"
    teacher_rgb: bool = True


@dataclass(frozen=True)
class PruneSpec:
    plan: plans.PlanSpec = plans.PlanSpec()   # how many channels each group keeps (prune.plans)
    criterion: str = "thinet"
    images: int = 128
    reconstruct: str = "full"
    targets: str = "original"
    ridge: object = "auto"
    bn_reestimate: str = "none"
    positions_per_image: int = 10
    blockfit_epochs: float = 0           # after the last cut: each block fitted to the unpruned block's output
    blockfit_lr: float = 3e-4


@dataclass(frozen=True)
class Settings:
    """The whole command, typed; nothing changes it after ``settings()``."""
    out: str
    model: str
    depth: Optional[int]
    blob: str
    rgb: bool
    data: DataSpec
    baseline: BaselineSpec
    prune: PruneSpec
    finetune: FineTuneSpec               # train_list filled in from the data stage's record
    evaluation: EvalSpec                 # lfw_dir and pairs filled in from the data stage's record
    gpu: Optional[int] = None
    timing_rounds: int = 7
    eval_steps: str = "all"              # all: every pruned step on LFW; last: the last one only
    seed: int = 0
    quiet: bool = False
    config: dict = dataclasses.field(default_factory=dict, compare=False)   # the arguments, for the run folder


def say(text, quiet=False):
    cli.say("pipeline", text, quiet)


# ------------------------------------------------------------------ stages

def data_stage(spec, out, quiet=False):
    """The training list and the evaluation set: given, LFW from ../shared, or generated."""
    from base.lists import read_list
    from finetune import lists
    shared = shared_dir()
    lfw = os.path.join(shared, "data", "lfw")
    lfw_dir, pairs, synthetic = spec.lfw_dir, spec.pairs, spec.synthetic
    if lfw_dir is None and os.path.isdir(lfw) and not synthetic:
        lfw_dir, pairs = os.path.join(lfw, "images-112x112"), os.path.join(lfw, "pairs.txt")
    if lfw_dir is None:
        from apps.synthetic import make_dataset
        why = "--synthetic" if synthetic else "no LFW given and none in " + shared
        say("generating a small synthetic data set (mechanics only: %s)" % why, quiet)
        lfw_dir, pairs = make_dataset(os.path.join(out, "data", "synthetic"))
        synthetic = True
    train_list, train_root = spec.train_list, spec.train_root
    if train_list is None:
        from eval_lfw.pairs import parse_folds
        say("training list: people of LFW folds %s%s under %s" % (
            spec.train_folds, " and people in no pair" if spec.train_unpaired else "", lfw_dir), quiet)
        s = lists.build(lfw_dir, os.path.join(out, "data"), folds=parse_folds(spec.train_folds), pairs=pairs,
                        unpaired=spec.train_unpaired, progress=False)
        train_list, train_root = os.path.join(out, "data", "train.txt"), s["root"]
    n = len(read_list(train_list, train_root))
    return dict(train_list=os.path.abspath(train_list), train_root=train_root, train_images=n,
                lfw_dir=lfw_dir, pairs=pairs, synthetic=bool(synthetic))


def _schedule(epochs, lr, batch, n_images):
    """SGD from ``lr``, divided by 10 at 60 % and 85 % of the iterations (the release's multistep shape)."""
    from finetune.solver import iterations
    n = iterations(n_images, epochs, batch)
    steps = tuple(sorted({max(1, int(n * f)) for f in (0.6, 0.85)}))
    return dict(epochs=epochs, base_lr=lr, batch_size=batch, lr_policy="multistep", gamma=0.1, stepvalues=steps,
                snapshot_every=500)


def baseline_stage(s, d):
    """The net to prune: --weights, or trained here from scratch (distillation from --teacher, or
    A-Softmax on the list's identities when there is no teacher)."""
    b = s.baseline
    if b.weights:
        return dict(prototxt=s.model, caffemodel=b.weights, trained=False, depth=s.depth)
    from finetune.driver import FineTuneJob, finetune
    mfn = os.path.join(shared_dir(), "models", "mobilefacenet", "mobilefacenet-v0")
    teacher = b.teacher or (mfn + ".prototxt" if os.path.exists(mfn + ".prototxt") and not d["synthetic"] else None)
    common = dict(deploy=s.model, weights=None, train_list=d["train_list"], root_folder=d["train_root"],
                  out=os.path.join(s.out, "baseline"), embedding=s.blob, rgb=s.rgb, seed=s.seed,
                  gpu=None if s.gpu is None else [s.gpu], cache_dir=s.finetune.cache_dir)
    if teacher:
        say("baseline: training %s from scratch for %g epochs, distilled from %s" % (s.model, b.epochs, teacher),
            s.quiet)
        job = FineTuneJob(head="distill", teacher=teacher, teacher_weights=b.teacher_weights or mfn + ".caffemodel",
                          teacher_embedding=b.teacher_blob, teacher_rgb=b.teacher_rgb, precompute_teacher=True,
                          mirror=False, **_schedule(b.epochs, b.lr or 0.1, s.finetune.batch, d["train_images"]),
                          **common)
    else:
        say("baseline: training %s from scratch for %g epochs with A-Softmax on the list's identities"
            % (s.model, b.epochs), s.quiet)
        job = FineTuneJob(head="asoftmax", **_schedule(b.epochs, b.lr or 0.01, s.finetune.batch, d["train_images"]),
                          **common)
    done = finetune(job, resume=True, progress=not s.quiet)
    return dict(prototxt=s.model, caffemodel=done["final"], trained=True, loss_csv=done["loss_csv"],
                teacher=teacher, epochs=b.epochs, iterations=done["iterations"], train_seconds=done["seconds"],
                depth=s.depth)


def evaluate_stage(spec, proto, weights):
    """LFW protocol of ``spec`` (eval_lfw.evaluate_net), and the net's size."""
    from eval_lfw.evaluator import evaluate_net
    from prune.stats import net_stats
    r = evaluate_net(spec, proto, weights)
    st = net_stats(proto)
    return dict(r, prototxt=proto, caffemodel=weights, eval_folds=spec.folds, params=st.params, macs=st.macs)


def sampling_images(s, d, held_out=0):
    """(root, sampling paths, Preprocess, held-out paths) drawn from the training list."""
    import numpy as np
    from base.images import preprocess_for
    from base.lists import image_files
    from base.netinput import input_layer
    _, shape = input_layer(caffe_io.read_net(s.model), s.model)
    root, rels = image_files(d["train_list"], d["train_root"], seed=s.seed)
    n = min(s.prune.images, len(rels) - held_out)
    pick = np.random.default_rng(s.seed).permutation(len(rels))[:n + held_out]
    chosen, held = sorted(rels[i] for i in pick[:n]), sorted(rels[i] for i in pick[n:])
    return root, chosen, preprocess_for(shape, root, chosen, rgb=s.rgb), held


# How each policy is described in the report (apps.report.describe_recipe).
ALLOCATION = {"ratio": "given", "table": "given", "file": "given", "threshold": "given",
              "macs-target": "uniform", "sensitivity": "sensitivity", "latency": "sensitivity"}


def plan_stage(s, d, base):
    """How much each group keeps: prune.plans.make, as in python -m prune (the sensitivity analysis's images
    drawn from the training list; its curves and the plan file in OUT/plan/)."""
    from base.images import image_batches
    out = os.path.join(s.out, "plan")

    def images(held_out):
        root, fit, pre, judge = sampling_images(s, d, held_out=held_out)
        say("sensitivity of every group (%d images sampled, %d judged)" % (len(fit), len(judge)), s.quiet)
        return (lambda: image_batches(root, fit, pre, 32)), (lambda: image_batches(root, judge, pre, 32))
    sampling = plans.Sampling(images, out, s.blob, s.prune.criterion, s.seed, not s.quiet)
    plan = plans.make(s.prune.plan, base["prototxt"], base["caffemodel"], sampling)
    os.makedirs(out, exist_ok=True)
    m = plan.made_by
    extra = dict(allocation=ALLOCATION[m["policy"]], plan=plans.write(plan, os.path.join(out, "plan.json")),
                 round_to=plan.round_to if plan.round_to > 1 else None,
                 **{k: m[k] for k in ("macs_share", "predicted_damage", "latency") if k in m})
    return dict(plan.to_json(), **{k: v for k, v in extra.items() if v is not None})


def prune_stage(s, d, base, plan):
    """prune.driver.run over the plan, fine-tuning after each group and at the end by distillation from the
    baseline (finetune.hooks; its embeddings computed once)."""
    from base.images import image_batches
    from finetune.hooks import distill_hooks
    from prune.driver import PruneJob, run
    from prune.graph import build_graph
    from prune.policy import from_json
    root, rels, pre, _ = sampling_images(s, d)
    ft = dataclasses.replace(s.finetune, train_list=d["train_list"], train_root=d["train_root"])
    step, final = distill_hooks(ft, base["prototxt"], base["caffemodel"])
    p = s.prune
    job = PruneJob(model=base["prototxt"], weights=base["caffemodel"], out=os.path.join(s.out, "prune"),
                   plan=from_json(plan, build_graph(base["prototxt"]), plan["plan"]), criterion=p.criterion,
                   seed=s.seed, reconstruct=p.reconstruct, targets=p.targets, ridge=p.ridge,
                   bn_reestimate=p.bn_reestimate, positions_per_image=p.positions_per_image,
                   blockfit_epochs=p.blockfit_epochs, blockfit_lr=p.blockfit_lr,
                   data=dict(list=d["train_list"], images=len(rels)))
    log = run(job, lambda: image_batches(root, rels, pre, 32), finetune=step, final_finetune=final,
              progress=not s.quiet)
    return dict(log, plan=plan, finetune=dict(epochs_per_layer=ft.epochs_per_layer, epochs_final=ft.epochs_final,
                                              lr=ft.lr, lr_steps=list(ft.lr_steps), batch=ft.batch,
                                              mirror=ft.mirror, loss="distillation from the baseline"))


def export_stage(s, deploy, model):
    """OUT/model.onnx (prune.export), its preprocessing in its metadata; a net with a layer that has no exact
    ONNX form, or no onnx package here, is recorded with the reason instead."""
    from base.netinput import ALIGNED_SIZE, crop_rule, input_layer
    from runtimes.onnx_export import ExportError, export, preprocessing
    try:
        import onnx  # noqa: F401
    except ImportError:
        return dict(onnx=None, reason="the onnx package is not installed (requirements.txt)")
    shape = input_layer(caffe_io.read_net(deploy), deploy)[1]
    crop = crop_rule(shape[2:], ALIGNED_SIZE)     # the pipeline's images are aligned 112x112 faces
    try:
        m = export(deploy, model, preprocessing(deploy, s.rgb, crop))
    except ExportError as e:
        return dict(onnx=None, reason=str(e))
    path = caffe_io.atomic_write(os.path.join(s.out, "model.onnx"), m.SerializeToString())
    return dict(onnx=path, nodes=len(m.graph.node), opset=m.opset_import[0].version)


def verify_stage(deploy, model, base, rounds, seed=0):
    """The pruned net beside the baseline in every runtime installed here (prune.verify): deviation from
    Caffe's output, batch-1 latency of both, speed-up per runtime against the MACs reduction."""
    from prune.verify import failures, verify
    record = verify(deploy, model, reference=(base["prototxt"], base["caffemodel"]), rounds=rounds, seed=seed)
    record["tolerance"] = TOLERANCE
    record["failures"] = failures(record, TOLERANCE)
    return record


TOLERANCE = 1e-4    # prune.verify's default: the largest relative deviation from Caffe of an exact runtime


def evaluations(s, run, ev, base, log):
    """The evaluation records of every stage: baseline, each pruned group, the final fine-tune.  The strict
    operating points (all pairs of the test folds' people) are measured for the baseline, the last pruned
    step and the final net; the steps between get the 10-fold protocol only (it takes a third of the images),
    and with ``eval_steps`` "last" no evaluation at all."""
    evals = [dict(stage="baseline", **run.stage("eval_baseline", lambda: evaluate_stage(
        ev, base["prototxt"], base["caffemodel"])))]
    say("baseline: LFW folds %s %.2f%%" % (ev.folds, 100 * evals[0]["accuracy"]), s.quiet)
    pairs_only = dataclasses.replace(ev, all_pairs=None)
    for step in log["steps"] if s.eval_steps == "all" else log["steps"][-1:]:
        spec = ev if step is log["steps"][-1] else pairs_only
        rec = run.stage("eval_step_%02d" % step["step"],
                        lambda step=step, spec=spec: evaluate_stage(spec, step["prototxt"], step["caffemodel"]))
        tuned = " + fine-tuned" if "pruned_caffemodel" in step else ""
        evals.append(dict(stage="%s pruned%s" % (step["group"], tuned), **rec))
        say("after %s: LFW %.2f%%" % (step["group"], 100 * rec["accuracy"]), s.quiet)
    if log["final_finetune"]:
        rec = run.stage("eval_final", lambda: evaluate_stage(ev, log["prototxt"], log["caffemodel"]))
        evals.append(dict(stage="final fine-tune", **rec))
        say("after the final fine-tune: LFW %.2f%%" % (100 * rec["accuracy"]), s.quiet)
    return evals


# The settings a training stage's divergence frees (the flags to correct); the stage's folder is discarded.
BASELINE_SETTINGS = ("baseline_lr", "baseline_epochs")
FINETUNE_SETTINGS = ("finetune_lr", "finetune_epochs_per_layer", "finetune_epochs_final")


def training_stage(run, name, fn, settings):
    """run.stage(name, fn); when its training diverges the stage's folder (OUT/name) is discarded and
    ``settings`` may change on the next run, so the corrected command resumes from the stages before."""
    from finetune.driver import Diverged
    try:
        return run.stage(name, fn)
    except Diverged as e:
        import shutil
        shutil.rmtree(run.file(name), ignore_errors=True)
        run.reopen(settings)
        raise PipelineError("%s stage: %s; %s discarded, correct %s and run again" % (
            name, str(e).split(" (run folder")[0], run.file(name),
            " or ".join("--" + k.replace("_", "-") for k in settings))) from None


def run_pipeline(s):
    """Every stage of settings ``s`` in its run folder; returns the report."""
    from apps import report
    from runtimes import forward_ms
    start = time.time()
    if s.gpu is not None:
        import caffe
        caffe.set_device(s.gpu)
        caffe.set_mode_gpu()
    with RunFolder(s.out, PipelineError) as run:
        run.guard(s.config, flags=True)
        d = run.stage("data", lambda: data_stage(s.data, s.out, s.quiet))
        ev = dataclasses.replace(s.evaluation, lfw_dir=d["lfw_dir"], pairs=d["pairs"])
        base = training_stage(run, "baseline", lambda: baseline_stage(s, d), BASELINE_SETTINGS)
        plan = run.stage("plan", lambda: plan_stage(s, d, base))
        log = training_stage(run, "prune", lambda: prune_stage(s, d, base, plan), FINETUNE_SETTINGS)
        evals = evaluations(s, run, ev, base, log)
        deploy = run.copy(log["prototxt"], "deploy.prototxt")
        model = run.copy(log["caffemodel"], "model.caffemodel")
        timing = run.stage("timing", lambda: dict(forward_ms=forward_ms(
            dict(baseline=(base["prototxt"], base["caffemodel"]), pruned=(deploy, model)), rounds=s.timing_rounds)))
        onnx = run.stage("export", lambda: export_stage(s, deploy, model))
        checked = run.stage("verify", lambda: verify_stage(deploy, model, base, s.timing_rounds, s.seed))
        rep = report.build(s.out, dict(data=d, baseline=base, prune=log, evaluations=evals, timing=timing,
                                       export=onnx, verify=checked))
        report.write(rep, s.out)
    say("done in %.0f s: %s" % (time.time() - start, os.path.join(s.out, "report.md")), s.quiet)
    return rep


# ------------------------------------------------------------------ command line

def parser():
    ap = cli.parser(PROG, description=__doc__.split("\n\n")[0] + " " + __doc__.split("\n\n")[1], raw=True)
    ap.add_argument("--depth", type=int, choices=(4, 10, 20, 36, 64), default=4,
                    help="SphereFace depth: its deploy prototxt from prototxt/ is the net (default 4)")
    cli.add_net(ap, model_required=False, model_help="deploy prototxt of another net instead of --depth's",
                weights_help="baseline caffemodel; omitted: a baseline is trained here from scratch")
    ap.add_argument("--out", required=True, help="run folder, e.g. runs/sf4 (a second run resumes it)")
    d = ap.add_argument_group("data")
    cli.add_train_list(d, list_help="training list, 'path label' lines (python -m finetune.lists); default: "
                                    "people of --train-folds of LFW (from ../shared)")
    d.add_argument("--train-folds", default="1-5", help="LFW folds whose people the default list holds (default 1-5)")
    d.add_argument("--train-unpaired", action="store_true",
                   help="the default list also holds the people named in no pair of pairs.txt (in no test fold)")
    cli.add_lfw(d)
    d.add_argument("--synthetic", action="store_true", help="use the generated data set even where LFW exists")
    b = ap.add_argument_group("baseline (only without --weights)")
    b.add_argument("--baseline-epochs", type=cli.positive, default=8, help="epochs of baseline training (default 8)")
    b.add_argument("--baseline-lr", type=cli.positive, default=None,
                   help="base lr of baseline training, /10 at 60%% and 85%% of it (default 0.1 with a teacher, "
                        "0.01 with A-Softmax, where 0.1 diverges from scratch)")
    cli.add_teacher(b, blob_default="fc1", rgb_default=True,
                    teacher_help="teacher deploy prototxt for the baseline's distillation (default: the "
                                 "MobileFaceNet of ../shared; none: A-Softmax on the list's identities)")
    p = ap.add_argument_group("pruning")
    p.add_argument("--criterion", default=None, choices=sorted(CRITERIA),
                   help="channel criterion (python -m prune --help; default thinet, bnscale with --threshold)")
    p.add_argument("--images", type=cli.count, default=128, help="images of the training list sampled per group (default 128)")
    how = plans.add_arguments(ap)
    how.add_argument("--preset", default="original", choices=("original", "all"),
                     help="instead of --keep: original: the Sphereface-prune schedule (SphereFace-4: "
                          "conv1_1/2_1/3_1/4_1 at 0.5; SphereFace-10: conv1_1/2_2/3_2/3_4/4_1 at 0.75); all: every "
                          "channel group the graph finds, residual streams included, at 0.5 (default original, "
                          "when no other policy is given)")
    options.add_reconstruction(ap)
    f = ap.add_argument_group("fine-tuning (distillation from the baseline; Caffe's solver)")
    f.add_argument("--finetune-epochs-per-layer", type=cli.non_negative, default=1, help="after each pruned group (default 1)")
    f.add_argument("--finetune-epochs-final", type=cli.non_negative, default=9, help="after the last group (default 9)")
    cli.add_finetune_lr(f, 1e-3, "fine-tune base lr (default 1e-3)")
    f.add_argument("--finetune-lr-steps", type=fractions, default=(),
                   help="fractions of each fine-tune's iterations at which its lr is divided by 10, e.g. 0.6,0.85 "
                        "(default none: a fixed lr)")
    f.add_argument("--finetune-mirror", action="store_true",
                   help="fine-tune on mirrored images too (the target: the mean of the baseline's embeddings of the "
                        "image and its mirror); default off, one embedding per image")
    add_similarity(f)
    add_fold_bn(f)
    ap.add_argument("--batch", type=cli.count, default=64, help="training batch size (default 64)")
    ap.add_argument("--gpu", type=cli.whole, default=None,
                    help="GPU id for Caffe (training, sampling, evaluation; needs a CUDA build: "
                         "scripts/setup.sh --gpu); forward times are always measured on the CPU. Default: CPU")
    ap.add_argument("--timing-rounds", type=cli.count, default=7, help="rounds of the forward-time measurement (default 7)")
    ap.add_argument("--eval-steps", choices=("all", "last"), default="all",
                    help="which pruned steps are evaluated on LFW: all (default; a point each on the accuracy-vs-"
                         "MACs plot) or last (with many groups and no per-layer fine-tune: the MobileFaceNet's 16 "
                         "steps cost about an hour of Caffe forward passes on a 2-core CPU)")
    ap.add_argument("--seed", type=cli.whole, default=0, help="seed of sampling, image draws and Caffe (default 0)")
    cli.add_cache_dir(ap)
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap


def fractions(text):
    """'0.6,0.85' -> (0.6, 0.85): increasing shares strictly between 0 and 1."""
    import argparse
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or list(values) != sorted(set(values)) or not all(0 < v < 1 for v in values):
        raise argparse.ArgumentTypeError("expected increasing fractions in (0, 1) such as 0.6,0.85, not %r" % text)
    return values


def plan_spec(a, depth):
    """The plan flags (prune.plans), --preset standing for --keep when no policy is given."""
    plans.check_arguments(a)
    spec = plans.spec_of(a)
    if spec.given():
        return spec
    if a.preset == "all":
        return dataclasses.replace(spec, keep=0.5)
    table = PRESETS.get(depth, {}).get(a.preset)
    if table is None:
        raise cli.UsageError("no %r preset for %s (presets exist for SphereFace-%s); give --keep"
                             % (a.preset, a.model or "this net", "/".join(str(k) for k in sorted(PRESETS))))
    return dataclasses.replace(spec, keep=dict(table))


def check_inputs(a, model, spec):
    """What would stop the run later, checked before anything is created (base.cli.check_run_inputs: outputs
    over inputs, nets and caffemodels Caffe can load, the training list's images, the output folder), and the
    plan against the net's groups (where it needs no images, nor weights not there yet), the folds, the GPU."""
    from eval_lfw.pairs import parse_folds
    cli.check_run_inputs(a, dict(model=model, weights=a.weights, train_list=a.train_list, pairs=a.pairs,
                                 teacher=a.teacher, teacher_weights=a.teacher_weights, plan=a.plan),
                         nets=[("model", "weights"), ("teacher", "teacher_weights")])
    parse_folds(a.train_folds)
    if a.pairs:   # the evaluation set, checked now rather than after the training
        from base.images import check_images
        from eval_lfw.pairs import read_pairs
        check_images(a.lfw_dir, read_pairs(a.pairs).select(parse_folds(a.eval_folds)).images()[0])
    else:
        parse_folds(a.eval_folds)
    if not spec.needs_images() and (a.weights or spec.policy() != "threshold"):
        plans.make(spec, model, a.weights)
    cli.check_gpu([a.gpu] if a.gpu is not None else [])


def settings(argv=None):
    """The command line read, checked and typed once (nothing is created here)."""
    a = parser().parse_args(argv)
    depth = None if a.model else a.depth
    model = a.model or os.path.join(ROOT, "prototxt", "sphereface%d_deploy.prototxt" % a.depth)
    cli.check_files(model=model, weights=a.weights, train_list=a.train_list, pairs=a.pairs,
                    teacher=a.teacher, teacher_weights=a.teacher_weights)
    cli.check_dirs(lfw_dir=a.lfw_dir)
    if a.teacher and not a.teacher_weights:
        raise cli.UsageError("--teacher %s needs --teacher-weights" % a.teacher)
    if a.lfw_dir and not a.pairs:
        raise cli.UsageError("--lfw-dir needs --pairs (LFW View 2 pairs.txt)")
    spec = plan_spec(a, depth)
    check_inputs(a, model, spec)
    return Settings(
        out=a.out, model=model, depth=depth, blob=a.blob, rgb=a.rgb,
        data=DataSpec(a.train_list, a.train_root, a.train_folds, a.train_unpaired, a.lfw_dir, a.pairs, a.synthetic),
        baseline=BaselineSpec(a.weights, a.baseline_epochs, a.baseline_lr, a.teacher, a.teacher_weights,
                              a.teacher_blob, a.teacher_rgb),
        prune=PruneSpec(spec, plans.criterion_of(a), a.images, a.reconstruct, a.targets, a.ridge, a.bn_reestimate,
                        a.positions_per_image, a.blockfit_epochs, a.blockfit_lr),
        finetune=FineTuneSpec(train_list=None, epochs_per_layer=a.finetune_epochs_per_layer,
                              epochs_final=a.finetune_epochs_final, lr=a.finetune_lr, batch=a.batch,
                              lr_steps=a.finetune_lr_steps, embedding=a.blob, rgb=a.rgb, mirror=a.finetune_mirror,
                              precompute_teacher=True, seed=a.seed,
                              gpu=None if a.gpu is None else (a.gpu,), progress=not a.quiet, cache_dir=a.cache_dir,
                              similarity=a.distill_similarity, similarity_hard=a.similarity_hard,
                              fold_bn=a.fold_bn),
        evaluation=spec_from_args(a, None, None),
        gpu=a.gpu, timing_rounds=a.timing_rounds, eval_steps=a.eval_steps, seed=a.seed, quiet=a.quiet,
        # --eval-steps picks which evaluation stages run, each recorded apart: no net depends on it
        config=command_config(a, leave_out=("quiet", "out", "cache_dir", "latency_cache", "eval_steps")))


@cli.entry(PROG)
def main(argv=None):
    s = settings(argv)
    rep = run_pipeline(s)
    b, f = rep["stages"][0], rep["stages"][-1]
    print("baseline %.2f%% -> pruned %.2f%% on LFW folds %s; MACs %.1fM -> %.1fM (%.2fx); "
          "Caffe CPU forward (batch 1) %.2f -> %.2f ms/image"
          % (100 * b["accuracy"], 100 * f["accuracy"], s.evaluation.folds, b["macs"] / 1e6, f["macs"] / 1e6,
             b["macs"] / f["macs"], rep["timing"]["forward_ms"]["baseline"]["1"],
             rep["timing"]["forward_ms"]["pruned"]["1"]))
    print("pruned net: %s + %s\nreport: %s" % (os.path.join(s.out, "deploy.prototxt"),
                                              os.path.join(s.out, "model.caffemodel"),
                                              os.path.join(s.out, "report.md")))
    return 0


if __name__ == "__main__":
    cli.run(main)
