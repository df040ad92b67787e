"""Fine-tune a deploy net with Caffe's own solver; resumable, with a loss log.

``finetune(FineTuneJob(...))`` writes into ``job.out``:

    train.prototxt  solver.prototxt  deploy.prototxt   what Caffe runs / the result's net
    snapshots/snap_iter_N.caffemodel|.solverstate           Caffe's own snapshots
    loss.csv  loss.png                                 iteration, loss
    final.caffemodel                                   the fine-tuned deploy weights
    done.json                                          written last: the run is complete

Killed at any point, the same job with ``resume=True`` restores the newest
solver state and goes on; a finished job returns at once.  Caffe's ImageData
does not record its place in the list, so a resumed run starts the (shuffled)
list afresh: the iteration count and the learning-rate schedule continue
exactly, the order of images does not.
"""
import csv
import glob
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import numpy as np

from prune import caffe_io
from . import lists, solver as solver_mod, trainnet


class FineTuneError(ValueError):
    pass


@dataclass
class FineTuneJob:
    deploy: str                          # deploy prototxt of the net to train
    weights: Optional[str]               # its caffemodel (None: Caffe's fillers, i.e. from scratch)
    train_list: str                      # "relative/path label" lines
    out: str                             # run folder
    root_folder: str = ""
    head: str = "distill"                # "distill" or "asoftmax"
    embedding: str = "fc5"
    teacher: Optional[str] = None        # distill: teacher deploy prototxt (default: the net itself)
    teacher_weights: Optional[str] = None
    teacher_embedding: Optional[str] = None
    precompute_teacher: bool = False     # distill: teacher embeddings computed once, looked up by the train net
    num_classes: int = 0                 # asoftmax: 0 = 1 + largest label in the list
    margin: int = 4
    native_asoftmax: bool = False
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

    def config(self):
        c = asdict(self)
        c["stepvalues"] = list(self.stepvalues)
        c["gpu"] = list(self.gpu) if self.gpu is not None else None
        for key in ("deploy", "weights", "train_list", "teacher", "teacher_weights"):
            if c[key]:
                c[key + "_sha256"] = caffe_io.file_sha256(c[key])
        return c


def _paths(out):
    return dict(train=os.path.join(out, "train.prototxt"), solver=os.path.join(out, "solver.prototxt"),
                deploy=os.path.join(out, "deploy.prototxt"), snapshots=os.path.join(out, "snapshots"),
                csv=os.path.join(out, "loss.csv"), png=os.path.join(out, "loss.png"),
                final=os.path.join(out, "final.caffemodel"), done=os.path.join(out, "done.json"),
                config=os.path.join(out, "config.json"), init=os.path.join(out, "init.caffemodel"))


def _blob_dim(netparam, blob):
    import caffe
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".prototxt") as f:
        f.write(caffe_io.net_to_text(netparam))
        f.flush()
        net = caffe.Net(f.name, caffe.TEST)
    if blob not in net.blobs:
        raise FineTuneError("blob %r not in net %r (blobs: %s)" % (blob, netparam.name, ", ".join(net.blobs)))
    return int(np.prod(net.blobs[blob].data.shape[1:]))


def build(job, start_iter=0, progress=True):
    """Write train/solver/deploy prototxts; return (paths, iterations, initial weights dict).

    start_iter: where a resumed run starts, so A-Softmax's lambda schedule
    (counted inside the layer, not saved by Caffe) goes on from there."""
    p = _paths(job.out)
    deploy = caffe_io.read_net(job.deploy)
    items = lists.read_list(job.train_list, job.root_folder)
    if not items:
        raise FineTuneError("%s: the image list is empty" % job.train_list)
    n_iter = solver_mod.iterations(len(items), job.epochs, job.batch_size)
    data = trainnet.ImageList(source=os.path.abspath(job.train_list), root_folder=job.root_folder,
                              batch_size=job.batch_size, mirror=job.mirror, rgb=job.rgb)
    init = caffe_io.read_weights(job.weights) if job.weights else {}
    if job.head == "asoftmax":
        labels = [label for _, label in items]
        classes = job.num_classes or max(labels) + 1
        if max(labels) >= classes:
            raise FineTuneError("%s: label %d is out of range for %d classes" % (job.train_list, max(labels), classes))
        data.size = _read_size(deploy, items)
        head = trainnet.ASoftmax(num_classes=classes, embedding=job.embedding, m=job.margin, native=job.native_asoftmax,
                                iteration=start_iter, seed=job.seed)
    elif job.head == "distill":
        teacher_proto = job.teacher or job.deploy
        teacher_weights = job.teacher_weights or (job.weights if not job.teacher else None)
        if not teacher_weights:
            raise FineTuneError("distillation needs teacher weights (--teacher-weights)")
        teacher = caffe_io.read_net(teacher_proto)
        t_blob = job.teacher_embedding or job.embedding
        t_rgb = job.rgb if job.teacher_rgb is None else job.teacher_rgb
        student_dim = _blob_dim(deploy, job.embedding)
        if job.precompute_teacher:
            table, index_list = teacher_table(job, teacher_proto, teacher_weights, t_blob, t_rgb, items, progress)
            data.source, data.size = index_list, _read_size(deploy, items)
            head = trainnet.Distill(teacher=None, embedding=job.embedding, teacher_embedding=t_blob,
                                    student_dim=student_dim, teacher_dim=table.shape[1], table_rows=len(table))
            init[trainnet.TEACHER + t_blob] = [table]
        else:
            t_weights = caffe_io.read_weights(teacher_weights)
            head = trainnet.Distill(teacher=teacher, embedding=job.embedding, teacher_embedding=t_blob,
                                    teacher_blobs={name: len(arrays) for name, arrays in t_weights.items()},
                                    student_dim=student_dim, teacher_dim=_blob_dim(teacher, t_blob),
                                    teacher_rgb=t_rgb)
            for name, arrays in t_weights.items():
                init[trainnet.TEACHER + name] = arrays
    else:
        raise FineTuneError("unknown head %r: choose distill or asoftmax" % job.head)
    net = trainnet.train_net(deploy, data, head)
    os.makedirs(p["snapshots"], exist_ok=True)
    caffe_io.write_net(net, p["train"])
    caffe_io.write_net(deploy, p["deploy"], protect=[job.deploy])
    s = solver_mod.solver(p["train"], n_iter, os.path.join(p["snapshots"], "snap"), base_lr=job.base_lr,
                          lr_policy=job.lr_policy, gamma=job.gamma, stepsize=job.stepsize, stepvalues=job.stepvalues,
                          momentum=job.momentum, weight_decay=job.weight_decay, snapshot=job.snapshot_every,
                          gpu=job.gpu is not None, seed=job.seed)
    if job.gpu is not None and len(job.gpu) > 1:
        s.display = 1          # `caffe train` reports the loss in its log, read back into loss.csv
    caffe_io.atomic_write(p["solver"], caffe_io.net_to_text(s))
    return p, n_iter, init


def _read_size(deploy, items):
    """(H, W) to read the files at so that the net sees their centre crop: the
    SphereFace 112x96 crop of 112x112 aligned faces (as the evaluator and the
    sampler do); None (ImageData resizes to the net's input) otherwise."""
    from prune.data import preprocess_for
    _, shape = trainnet.input_layer(deploy)
    pre = preprocess_for(shape, "", [items[0][0]], rgb=False)
    return (112, 112) if pre.crop == "112x96" else None


def teacher_table(job, proto, weights, blob, rgb, items, progress=True):
    """The teacher's embedding of every list image, computed once (through the
    evaluator's feature cache, so later jobs with the same teacher and images
    reuse it), and the list that indexes it: line i is "path i".  With
    mirroring the row is the mean of the L2-normalised embeddings of the image
    and its mirror, the target for either view."""
    from eval_lfw.features import embeddings
    from prune.data import preprocess_for
    _, t_shape = trainnet.input_layer(caffe_io.read_net(proto), proto)
    root = job.root_folder or ""
    rels = [os.path.relpath(path, root) if root else path for path, _ in items]
    pre = preprocess_for(t_shape, root, rels, rgb)
    feats, computed, seconds = embeddings(proto, weights, blob, root, rels, pre, flip=job.mirror, progress=progress)
    if computed and progress:
        print("teacher embeddings: %d images in %.0f s" % (computed, seconds), file=sys.stderr)
    if job.mirror:
        halves = np.split(feats, 2, axis=1)
        feats = sum(h / np.maximum(np.linalg.norm(h, axis=1, keepdims=True), 1e-12) for h in halves) / 2
    index_list = os.path.join(job.out, "teacher_index.txt")
    caffe_io.atomic_write(index_list, lists.list_text([(rel, i) for i, rel in enumerate(rels)]))
    return feats.astype(np.float32), os.path.abspath(index_list)


def latest_snapshot(folder):
    """(iteration, .solverstate path) of the newest complete snapshot, or (0, None)."""
    best = (0, None)
    for state in glob.glob(os.path.join(folder, "snap_iter_*.solverstate")):
        it = int(re.search(r"_(\d+)\.solverstate$", state).group(1))
        if os.path.exists(state[:-len(".solverstate")] + ".caffemodel") and it > best[0]:
            best = (it, state)
    return best


def drop_old_snapshots(folder, keep=2):
    """Snapshots are whole models plus solver state: keep only the newest few."""
    states = sorted(glob.glob(os.path.join(folder, "snap_iter_*.solverstate")),
                    key=lambda s: int(re.search(r"_(\d+)\.solverstate$", s).group(1)))
    for state in states[:-keep]:
        for path in (state, state[:-len(".solverstate")] + ".caffemodel"):
            if os.path.exists(path):
                os.unlink(path)


def _read_csv(path, upto):
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for row in csv.reader(f):
                if len(row) == 2 and row[0].isdigit() and int(row[0]) <= upto:
                    rows.append((int(row[0]), float(row[1])))
    return rows


def plot_loss(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if rows:
        it, loss = np.array(rows).T
        ax.plot(it, loss, lw=0.6, alpha=0.4, label="per iteration")
        k = max(1, len(loss) // 50)
        if k > 1:
            smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
            ax.plot(it[k - 1:], smooth, lw=1.5, label="mean of %d" % k)
        ax.legend()
    ax.set_xlabel("iteration")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    from prune.report import save_figure
    save_figure(fig, path)


def _loss_value(net):
    return float(sum(net.blobs[b].data.sum() for b in net.outputs if "loss" in b))


def finetune(job, resume=True, progress=True):
    """Run (or continue) a fine-tune job; returns the done.json record."""
    p = _paths(job.out)
    config = job.config()
    if os.path.exists(p["done"]):
        done = json.load(open(p["done"]))
        if done.get("config") == config:
            return done
        if not resume:
            raise FineTuneError("%s holds a finished run of a different job; choose another --out" % job.out)
    if os.path.exists(p["config"]):
        old = json.load(open(p["config"]))
        if old != config:
            raise FineTuneError("%s holds a run of a different job (config.json differs); choose another --out"
                                % job.out)
        if not resume and latest_snapshot(p["snapshots"])[1]:
            raise FineTuneError("%s already has snapshots; pass --resume to continue them" % job.out)
    p, n_iter, init = build(job, latest_snapshot(p["snapshots"])[0] if resume else 0, progress)
    caffe_io.atomic_write(p["config"], json.dumps(config, indent=1, sort_keys=True))
    start = time.time()
    if job.gpu is not None and len(job.gpu) > 1:
        _train_multi_gpu(job, p, init)
    else:
        _train_pycaffe(job, p, n_iter, init, progress)
    rows = _read_csv(p["csv"], n_iter)
    plot_loss(rows, p["png"], "fine-tune: %s loss" % job.head)
    done = dict(config=config, iterations=n_iter, final=p["final"], deploy=p["deploy"], loss_csv=p["csv"],
                loss_png=p["png"], final_loss=(float(np.mean([l for _, l in rows[-20:]])) if rows else None),
                seconds=round(time.time() - start, 1))
    caffe_io.atomic_write(p["done"], json.dumps(done, indent=1, sort_keys=True))
    return done


def _train_pycaffe(job, p, n_iter, init, progress):
    import caffe
    from tqdm import tqdm
    if job.gpu:
        caffe.set_device(int(job.gpu[0]))
        caffe.set_mode_gpu()
    else:
        caffe.set_mode_cpu()
    solver = caffe.get_solver(p["solver"])
    _, state = latest_snapshot(p["snapshots"])
    if state:
        solver.restore(state)
        print("resumed from iteration %d (%s)" % (solver.iter, state), file=sys.stderr)
    else:
        caffe_io.load_into(solver.net, init, source=job.weights or "initial weights")
    rows = _read_csv(p["csv"], solver.iter)
    with open(p["csv"] + ".tmp", "w") as f:
        csv.writer(f).writerows(rows)
    os.replace(p["csv"] + ".tmp", p["csv"])
    bar = tqdm(total=n_iter, initial=solver.iter, desc="fine-tune", unit="it", disable=not progress,
               dynamic_ncols=True, file=sys.stderr)
    with open(p["csv"], "a") as log:
        writer = csv.writer(log)
        while solver.iter < n_iter:
            solver.step(1)
            loss = _loss_value(solver.net)
            if not np.isfinite(loss):
                raise FineTuneError("loss became %s at iteration %d; lower the learning rate" % (loss, solver.iter))
            writer.writerow((solver.iter, "%.6g" % loss))
            if solver.iter % 20 == 0:
                log.flush()
            if job.snapshot_every and solver.iter % job.snapshot_every == 0:
                log.flush()
                drop_old_snapshots(p["snapshots"])
            bar.set_postfix(loss="%.4f" % loss)
            bar.update(1)
    bar.close()
    if not (job.snapshot_every and n_iter % job.snapshot_every == 0):
        solver.snapshot()
    drop_old_snapshots(p["snapshots"])
    deploy = caffe_io.read_net(p["deploy"])
    weights = {name: [b.data.copy() for b in blobs] for name, blobs in solver.net.params.items()
               if any(l.name == name for l in deploy.layer)}
    caffe_io.write_weights(deploy, weights, p["final"], protect=[job.weights])
    caffe_io.open_net(p["deploy"], p["final"])   # the result must load in Caffe


def _train_multi_gpu(job, p, init):
    """Several GPUs: Caffe's own `caffe train` with NCCL, nothing home-made."""
    tool = caffe_io.caffe_tool("caffe")
    train = caffe_io.read_net(p["train"])
    caffe_io.write_weights(train, init, p["init"])
    _, state = latest_snapshot(p["snapshots"])
    cmd = [tool, "train", "-solver", p["solver"], "-gpu", ",".join(str(g) for g in job.gpu)]
    cmd += ["-snapshot", state] if state else ["-weights", p["init"]]
    print("running:", " ".join(cmd), file=sys.stderr)
    run = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)
    with open(p["csv"], "a") as log:
        for m in re.finditer(r"Iteration (\d+), loss = ([-+0-9.eE]+)", run.stderr):
            log.write("%s,%s\n" % m.groups())
    if run.returncode != 0:
        raise FineTuneError("caffe train failed:\n" + run.stderr[-2000:])
    _, state = latest_snapshot(p["snapshots"])
    model = state[:-len(".solverstate")] + ".caffemodel"
    deploy = caffe_io.read_net(p["deploy"])
    names = {l.name for l in deploy.layer}
    weights = {k: v for k, v in caffe_io.read_weights(model).items() if k in names}
    caffe_io.write_weights(deploy, weights, p["final"], protect=[job.weights])
