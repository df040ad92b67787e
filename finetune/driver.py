"""Fine-tune a deploy net with Caffe's own solver; resumable, with a loss log.

``finetune(FineTuneJob(...))`` writes into ``job.out``:

    train.prototxt  solver.prototxt  deploy.prototxt   what Caffe runs / the result's net
    snapshots/snap_iter_N.caffemodel|.solverstate      Caffe's own snapshots (finetune.loop)
    loss.csv  loss.png                                 iteration, loss
    final.caffemodel                                   the fine-tuned deploy weights
    done.json                                          written last: the run is complete

Everything the job reads is checked first (``check_job``); nothing is
written before.  Killed at any point, the same job with ``resume=True``
restores the newest intact snapshot (a torn one, from a kill or a full disk
in the middle of Caffe's write, is removed) and goes on exactly: the solver
state is Caffe's, and the data layers are run over the batches already
consumed, so the images continue in the uninterrupted run's order (CPU: the
resumed run's weights are bit-identical to an uninterrupted run's).  A
finished job returns at once; a job whose loss diverged is discarded.
"""
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

from base import caffe_io, cli, netcheck
from base.errors import ToolkitError
from base.lists import read_list
from base.netinput import input_layer
from base.runfolder import RunFolder, cpu_seconds
from . import fold, heads, loop, snapshots, solver as solver_mod, trainnet


class FineTuneError(ToolkitError):
    pass


class Diverged(FineTuneError):
    """The loss became NaN or infinite: the run was discarded (its settings, not its inputs, were wrong)."""


@dataclass
class FineTuneJob:
    deploy: str                          # deploy prototxt of the net to train
    weights: Optional[str]               # its caffemodel (None: Caffe's fillers, i.e. from scratch)
    train_list: str                      # "relative/path label" lines
    out: str                             # run folder
    root_folder: str = ""
    head: str = "distill"                # "distill", "asoftmax" or "softmax-center" (finetune.heads)
    embedding: str = "fc5"
    teacher: Optional[str] = None        # distill: teacher deploy prototxt (default: the net itself)
    teacher_weights: Optional[str] = None
    teacher_embedding: Optional[str] = None
    precompute_teacher: bool = False     # distill: teacher embeddings computed once, looked up by the train net
    distill_features: Sequence[str] = field(default_factory=tuple)   # distill: blobs whose maps are copied too
    feature_weight: float = 1.0          # distill: weight of each copied map's mean squared error
    similarity_weight: float = 0.0       # distill: weight of the batch's pairwise-cosine loss (finetune.similarity)
    similarity_hard: float = 0.0         # distill: its emphasis on the pairs the teacher finds alike
    augment_shift: float = 0             # online augmentation (finetune.augment): pixels of random shift,
    augment_scale: float = 0.0           # random zoom within 1 +- this,
    augment_colour: float = 0.0          # per-plane gain and offset within +- this,
    augment_mixup: float = 0.0           # each image blended with another of the batch, Beta(a, a) weights
    fold_bn: bool = False                # train with frozen BatchNorm + Scale folded into the convs (finetune.fold)
    num_classes: int = 0                 # asoftmax: 0 = 1 + largest label in the list
    margin: int = 4
    native_asoftmax: bool = False
    lambda_c: float = 1e-3               # softmax-center: centre-loss weight
    center_alpha: float = 0.5            # softmax-center: centre update rate
    epochs: float = 1.0
    batch_size: int = 64
    base_lr: float = 1e-3
    lr_policy: str = "fixed"
    gamma: float = 0.1
    stepsize: int = 0
    stepvalues: Sequence[int] = field(default_factory=tuple)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    snapshot_every: int = 500
    rgb: bool = False                    # the net expects RGB planes (ImageData gives BGR)
    teacher_rgb: Optional[bool] = None   # the teacher does (default: same as rgb)
    mirror: bool = True
    seed: int = 0
    gpu: Optional[Sequence[int]] = None  # None: CPU; [id]: pycaffe on that GPU; [a, b, ..]: `caffe train` (NCCL)
    cache_dir: Optional[str] = None      # feature cache of the teacher's embeddings (None: the evaluator's default)

    def inputs(self):
        """{flag: path} of the files the job reads (for a check before anything is written)."""
        return dict(model=self.deploy, weights=self.weights, train_list=self.train_list, teacher=self.teacher,
                    teacher_weights=self.teacher_weights)

    def augmentation(self):
        """finetune.augment's parameters, or None when nothing is changed."""
        p = dict(shift=self.augment_shift, scale=self.augment_scale, colour=self.augment_colour,
                 mixup=self.augment_mixup, seed=self.seed)
        return p if (p["shift"] or p["scale"] or p["colour"] or p["mixup"]) else None

    def config(self):
        c = asdict(self)
        c["stepvalues"] = list(self.stepvalues)
        c["gpu"] = list(self.gpu) if self.gpu is not None else None
        c["distill_features"] = list(self.distill_features)
        del c["cache_dir"]                  # where features are cached changes no result
        for key in ("deploy", "weights", "train_list", "teacher", "teacher_weights"):
            if c[key]:
                c[key + "_sha256"] = caffe_io.file_sha256(c[key])
        return c


def _check_numbers(job):
    """The job's numbers as Caffe needs them (nonsense is refused, not run)."""
    def finite(v):
        return v == v and abs(v) != float("inf")
    bad = [(flag, value, want) for flag, value, ok, want in [
        ("--epochs", job.epochs, finite(job.epochs) and job.epochs > 0, "> 0"),
        ("--batch", job.batch_size, job.batch_size >= 1, ">= 1"),
        ("--finetune-lr", job.base_lr, finite(job.base_lr) and job.base_lr > 0, "> 0"),
        ("--snapshot-every", job.snapshot_every, job.snapshot_every >= 0, ">= 0 (0: only at the end)"),
        ("--momentum", job.momentum, 0 <= job.momentum < 1, "in [0, 1)"),
        ("--weight-decay", job.weight_decay, finite(job.weight_decay) and job.weight_decay >= 0, ">= 0"),
        ("--gamma", job.gamma, finite(job.gamma) and job.gamma > 0, "> 0"),
        ("--feature-weight", job.feature_weight, finite(job.feature_weight) and job.feature_weight > 0, "> 0"),
        ("--distill-similarity", job.similarity_weight, finite(job.similarity_weight)
         and job.similarity_weight >= 0, ">= 0"),
        ("--similarity-hard", job.similarity_hard, finite(job.similarity_hard) and 0 <= job.similarity_hard <= 50,
         "in [0, 50]"),
        ("--augment-shift", job.augment_shift, finite(job.augment_shift) and job.augment_shift >= 0, ">= 0 pixels"),
        ("--augment-scale", job.augment_scale, 0 <= job.augment_scale < 1, "in [0, 1)"),
        ("--augment-colour", job.augment_colour, 0 <= job.augment_colour < 1, "in [0, 1)"),
        ("--augment-mixup", job.augment_mixup, 0 <= job.augment_mixup <= 100, "in [0, 100] (Beta(a, a))"),
        ("--stepsize", job.stepsize, job.stepsize >= 0, ">= 0"),
        ("--stepvalues", list(job.stepvalues), all(v > 0 for v in job.stepvalues)
         and list(job.stepvalues) == sorted(set(job.stepvalues)), "positive and increasing"),
        ("--num-classes", job.num_classes, job.num_classes >= 0, ">= 0 (0: from the list)"),
        ("--margin", job.margin, job.margin in (1, 2, 3, 4), "1, 2, 3 or 4")] if not ok]
    if bad:
        raise FineTuneError("; ".join("%s %s: expected %s" % b for b in bad))
    if job.head not in heads.HEADS:
        raise FineTuneError("unknown head %r: choose %s" % (job.head, ", ".join(heads.HEADS)))
    if job.native_asoftmax and "MarginInnerProduct" not in netcheck.known_types():
        raise FineTuneError("--native-asoftmax: this Caffe build has no MarginInnerProduct layer (the SphereFace "
                            "fork's); leave the flag out for the toolkit's own A-Softmax")


def with_batch(net, batch):
    """A copy of a deploy NetParameter whose Input takes ``batch`` images."""
    copy = type(net)()
    copy.CopyFrom(net)
    input_layer(copy)[0].input_param.shape[0].dim[0] = batch
    return copy


def check_job(job):
    """Everything a job needs, checked before anything is written: numbers, files, that no output overwrites an
    input, nets Caffe can build (base.netcheck), caffemodels holding every layer of their net, a list of images
    Caffe can decode, the GPU.  Raises a named error (a base.errors.ToolkitError)."""
    _check_numbers(job)
    cli.check_files(**job.inputs())
    cli.check_outputs(job.inputs(), [os.path.join(job.out, "")])
    for flag, proto, weights in (("--model", job.deploy, job.weights), ("--teacher", job.teacher, job.teacher_weights)):
        if proto:
            net = caffe_io.read_net(proto)
            netcheck.check_net(net, proto)
            _, shape = input_layer(net, proto)
            if flag == "--model" and job.augment_shift > max(shape[2:]):
                raise FineTuneError("--augment-shift %g: more pixels than the input has (%d x %d)"
                                    % (job.augment_shift, shape[2], shape[3]))
            if flag == "--model":    # its blobs at --batch, with their gradients: what training allocates
                caffe_io.probe_nets([("--batch %d: %s %s" % (job.batch_size, flag, proto), with_batch(net, 1),
                                      "test")], copies=2, batch=job.batch_size)
            if weights:
                caffe_io.check_weights(caffe_io.net_from_param(net), caffe_io.read_weights(weights), weights,
                                       complete=True)
    items = read_list(job.train_list, job.root_folder, decode=True)
    solver_mod.iterations(len(items), job.epochs, job.batch_size)
    cli.check_gpu(tuple(job.gpu or ()))


def build(job, start_iter=0, progress=True):
    """Write train/solver/deploy prototxts; return (paths, iterations, initial weights dict).

    start_iter: where a resumed run starts (A-Softmax's lambda schedule goes on from there)."""
    p = loop.paths(job.out)
    deploy = caffe_io.read_net(job.deploy)
    items = read_list(job.train_list, job.root_folder)
    n_iter = solver_mod.iterations(len(items), job.epochs, job.batch_size)
    init = caffe_io.read_weights(job.weights) if job.weights else {}
    trained = deploy
    if job.fold_bn and init:
        trained, init, found = fold.fold(deploy, init)
        if progress:
            print("fine-tune: " + fold.describe(found), file=sys.stderr)
    data, head, extra = heads.data_and_head(job, trained, items, start_iter, progress)
    init.update(extra)
    net = trainnet.train_net(trained, data, head)
    os.makedirs(p["snapshots"], exist_ok=True)
    caffe_io.write_net(net, p["train"])
    caffe_io.write_net(deploy, p["deploy"], protect=[job.deploy])
    multi = job.gpu is not None and len(job.gpu) > 1
    s = solver_mod.solver(p["train"], n_iter, os.path.join(p["snapshots"], "snap"), base_lr=job.base_lr,
                          lr_policy=job.lr_policy, gamma=job.gamma, stepsize=job.stepsize, stepvalues=job.stepvalues,
                          momentum=job.momentum, weight_decay=job.weight_decay,
                          snapshot=job.snapshot_every if multi else 0,   # pycaffe: the loop snapshots
                          gpu=job.gpu is not None, seed=job.seed)
    if multi:
        s.display = 1          # `caffe train` reports the loss in its log, read back into loss.csv
    caffe_io.atomic_write(p["solver"], caffe_io.net_to_text(s))
    return p, n_iter, init


def finetune(job, resume=True, progress=True):
    """Run (or continue) a fine-tune job; returns the done.json record.  A run whose loss diverges is discarded
    (its folder cleared of snapshots, logs and config), so the corrected command can use the folder."""
    check_job(job)
    p = loop.paths(job.out)
    config = job.config()
    with RunFolder(job.out, FineTuneError) as run:
        if not run.exists("done.json") and not snapshots.latest(p["snapshots"])[1]:
            run.reopen(None)    # a run that ended (Caffe aborted, a kill) before its first snapshot binds nothing
        run.check(config)
        done = run.load("done.json")
        if done is not None and done.get("config") == config:
            return done
        if not resume and snapshots.latest(p["snapshots"])[1]:
            raise FineTuneError("%s already has snapshots; pass --resume to continue them" % job.out)
        cpu = cpu_seconds()   # the teacher's embeddings (build) count as fine-tuning
        p, n_iter, init = build(job, snapshots.latest(p["snapshots"])[0] if resume else 0, progress)
        run.save_config(config)
        try:
            record = _train(job, p, n_iter, init, config, progress)
            return run.save("done.json", dict(record, cpu_seconds=round(cpu_seconds() - cpu, 1)))
        except loop.Diverging as e:
            _discard(run, p)
            raise Diverged("%s (run folder %s cleared: the corrected command can use it)" % (e, job.out)) from None


def exporter(job):
    """trained weights of the deploy's layers -> the deploy net's weights (BatchNorm and Scale put back where
    the job trained them folded into the convolutions)."""
    if not (job.fold_bn and job.weights):
        return lambda weights: weights
    deploy = caffe_io.read_net(job.deploy)
    found = fold.chains(deploy)
    return lambda weights: fold.unfold(weights, found, deploy)


def _train(job, p, n_iter, init, config, progress):
    start = time.time()
    title = "fine-tune (%s)" % job.head
    if job.gpu is not None and len(job.gpu) > 1:
        _train_multi_gpu(job, p, init)
        record = loop.finish(p, n_iter, title)
    else:
        record = loop.train(job.out, caffe_io.read_net(p["deploy"]), n_iter, init,
                            snapshot_every=job.snapshot_every, title=title,
                            source=job.weights or "initial weights", protect=[job.weights],
                            gpu=job.gpu[0] if job.gpu else None, progress=progress, export=exporter(job))
    return dict(record, config=config, seconds=round(time.time() - start, 1))


def _discard(run, p):
    """A diverged run: nothing of it is worth resuming."""
    snapshots.clear(p["snapshots"])
    for key in ("csv", "png", "final", "done", "init"):
        if os.path.exists(p[key]):
            os.unlink(p[key])
    run.reopen(None)


def _train_multi_gpu(job, p, init):
    """Several GPUs: Caffe's own `caffe train` with NCCL, nothing home-made."""
    tool = caffe_io.caffe_tool("caffe")
    train = caffe_io.read_net(p["train"])
    caffe_io.write_weights(train, init, p["init"])
    _, state = snapshots.latest(p["snapshots"])
    cmd = [tool, "train", "-solver", p["solver"], "-gpu", ",".join(str(g) for g in job.gpu)]
    cmd += ["-snapshot", state] if state else ["-weights", p["init"]]
    print("running:", " ".join(cmd), file=sys.stderr)
    run = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)
    with open(p["csv"], "a") as log:
        for m in re.finditer(r"Iteration (\d+), loss = ([-+0-9.eE]+)", run.stderr):
            log.write("%s,%s\n" % m.groups())
    if run.returncode != 0:
        raise FineTuneError("caffe train failed:\n" + run.stderr[-2000:])
    _, state = snapshots.latest(p["snapshots"])
    deploy = caffe_io.read_net(p["deploy"])
    trained = caffe_io.read_weights(state[:-len(".solverstate")] + ".caffemodel")
    weights = exporter(job)({layer.name: trained[layer.name] for layer in deploy.layer if layer.name in trained})
    caffe_io.write_weights(deploy, weights, p["final"], protect=[job.weights])
