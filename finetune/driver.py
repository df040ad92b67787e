"""Fine-tune a deploy net with Caffe's own solver; resumable, with a loss log.

``finetune(FineTuneJob(...))`` writes into ``job.out``:

    train.prototxt  solver.prototxt  deploy.prototxt   what Caffe runs / the result's net
    snapshots/snap_iter_N.caffemodel|.solverstate      Caffe's own snapshots (finetune.loop)
    loss.csv  loss.png                                 iteration, loss
    final.caffemodel                                   the fine-tuned deploy weights
    done.json                                          written last: the run is complete

Killed at any point, the same job with ``resume=True`` restores the newest
solver state and goes on; a finished job returns at once.  Caffe's ImageData
does not record its place in the list, so a resumed run starts the (shuffled)
list afresh: the iteration count and the learning-rate schedule continue
exactly, the order of images does not.
"""
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

from base import caffe_io
from base.lists import read_list
from base.runfolder import RunFolder
from . import heads, loop, solver as solver_mod, trainnet


class FineTuneError(ValueError):
    pass


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

    def inputs(self):
        """{flag: path} of the files the job reads (for a check before anything is written)."""
        return dict(model=self.deploy, weights=self.weights, train_list=self.train_list, teacher=self.teacher,
                    teacher_weights=self.teacher_weights)

    def config(self):
        c = asdict(self)
        c["stepvalues"] = list(self.stepvalues)
        c["gpu"] = list(self.gpu) if self.gpu is not None else None
        if self.head != "softmax-center":   # settings of that head only (a run folder of another head
            del c["lambda_c"], c["center_alpha"]   # made before they existed still resumes)
        for key in ("deploy", "weights", "train_list", "teacher", "teacher_weights"):
            if c[key]:
                c[key + "_sha256"] = caffe_io.file_sha256(c[key])
        return c


def build(job, start_iter=0, progress=True):
    """Write train/solver/deploy prototxts; return (paths, iterations, initial weights dict).

    start_iter: where a resumed run starts (A-Softmax's lambda schedule goes on from there)."""
    p = loop.paths(job.out)
    deploy = caffe_io.read_net(job.deploy)
    items = read_list(job.train_list, job.root_folder)
    n_iter = solver_mod.iterations(len(items), job.epochs, job.batch_size)
    init = caffe_io.read_weights(job.weights) if job.weights else {}
    data, head, extra = heads.data_and_head(job, deploy, items, start_iter, progress)
    init.update(extra)
    net = trainnet.train_net(deploy, data, head)
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
    """Run (or continue) a fine-tune job; returns the done.json record."""
    p = loop.paths(job.out)
    config = job.config()
    with RunFolder(job.out, FineTuneError) as run:
        run.check(config)
        done = run.load("done.json")
        if done is not None and done.get("config") == config:
            return done
        if not resume and loop.latest_snapshot(p["snapshots"])[1]:
            raise FineTuneError("%s already has snapshots; pass --resume to continue them" % job.out)
        p, n_iter, init = build(job, loop.latest_snapshot(p["snapshots"])[0] if resume else 0, progress)
        run.save_config(config)
        start = time.time()
        title = "fine-tune (%s)" % job.head
        if job.gpu is not None and len(job.gpu) > 1:
            _train_multi_gpu(job, p, init)
            record = loop.finish(p, n_iter, title)
        else:
            record = loop.train(job.out, caffe_io.read_net(p["deploy"]), n_iter, init,
                                snapshot_every=job.snapshot_every, title=title,
                                source=job.weights or "initial weights", protect=[job.weights],
                                gpu=job.gpu[0] if job.gpu else None, progress=progress)
        return run.save("done.json", dict(record, config=config, seconds=round(time.time() - start, 1)))


def _train_multi_gpu(job, p, init):
    """Several GPUs: Caffe's own `caffe train` with NCCL, nothing home-made."""
    tool = caffe_io.caffe_tool("caffe")
    train = caffe_io.read_net(p["train"])
    caffe_io.write_weights(train, init, p["init"])
    _, state = loop.latest_snapshot(p["snapshots"])
    cmd = [tool, "train", "-solver", p["solver"], "-gpu", ",".join(str(g) for g in job.gpu)]
    cmd += ["-snapshot", state] if state else ["-weights", p["init"]]
    print("running:", " ".join(cmd), file=sys.stderr)
    run = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)
    with open(p["csv"], "a") as log:
        for m in re.finditer(r"Iteration (\d+), loss = ([-+0-9.eE]+)", run.stderr):
            log.write("%s,%s\n" % m.groups())
    if run.returncode != 0:
        raise FineTuneError("caffe train failed:\n" + run.stderr[-2000:])
    _, state = loop.latest_snapshot(p["snapshots"])
    deploy = caffe_io.read_net(p["deploy"])
    trained = caffe_io.read_weights(state[:-len(".solverstate")] + ".caffemodel")
    weights = {layer.name: trained[layer.name] for layer in deploy.layer if layer.name in trained}
    caffe_io.write_weights(deploy, weights, p["final"], protect=[job.weights])
