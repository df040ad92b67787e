"""The one training loop: Caffe's solver driven from pycaffe, resumable, with a loss log.

    record = train(folder, deploy, n_iter, init, title="fine-tune")              # solver.step(1) per iteration
    record = train(folder, deploy, n_iter, init, step=penalised, columns=("penalty",))

``folder`` holds solver.prototxt (written by the caller) and receives
snapshots/ (Caffe's own, the newest two kept), loss.csv (iteration, loss[,
extra columns]), loss.png and final.caffemodel (the weights of ``deploy``'s
layers, checked by loading them in Caffe).  A per-iteration ``step(solver)
-> (loss, *extra)`` replaces ``solver.step(1)``: the BN-scale penalties of
channel prioritisation (apps.prioritise.penalty.step) are one.  Killed at any
point, the same call restores the newest intact snapshot (finetune.snapshots:
a torn one is removed) and goes on exactly where the uninterrupted run would
be, images included.
"""
import csv
import os
import sys

import numpy as np

from base import caffe_io, faults
from base.errors import ToolkitError
from base.figures import pyplot, save_figure
from . import snapshots


class TrainError(ToolkitError):
    pass


class Diverging(TrainError):
    """The loss became NaN or infinite (the settings, e.g. the learning rate, are at fault)."""


def paths(folder):
    """Where everything of one training run lives."""
    return dict(train=os.path.join(folder, "train.prototxt"), solver=os.path.join(folder, "solver.prototxt"),
                deploy=os.path.join(folder, "deploy.prototxt"), snapshots=os.path.join(folder, "snapshots"),
                csv=os.path.join(folder, "loss.csv"), png=os.path.join(folder, "loss.png"),
                final=os.path.join(folder, "final.caffemodel"), done=os.path.join(folder, "done.json"),
                init=os.path.join(folder, "init.caffemodel"))


def read_loss_csv(path, upto=None):
    """[(iteration, loss, *extra columns)] of a loss.csv, up to iteration ``upto`` (all when None)."""
    rows = []
    if path and os.path.exists(path):
        with open(path) as f:
            for row in csv.reader(f):
                if len(row) >= 2 and row[0].isdigit() and (upto is None or int(row[0]) <= upto):
                    try:
                        rows.append((int(row[0]),) + tuple(float(v) for v in row[1:]))
                    except ValueError:   # a row cut short by a kill or a full disk: its iteration is redone
                        continue
    return rows


def plot_loss(rows, path, title):
    """Loss per iteration and its running mean (rows: (iteration, loss))."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if rows:
        it, loss = np.array([r[:2] for r in rows]).T
        ax.plot(it, loss, lw=0.6, alpha=0.4, label="per iteration")
        k = max(1, len(loss) // 50)
        if k > 1:
            smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
            ax.plot(it[k - 1:], smooth, lw=1.5, label="mean of %d" % k)
        ax.legend()
    ax.set_xlabel("iteration")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    save_figure(fig, path)


def loss_value(net):
    """The net's loss after a forward pass, as the solver minimises it: its outputs named *loss*, each times
    its loss_weight (1 for a loss layer that names none)."""
    weights = net.blob_loss_weights
    return float(sum(net.blobs[b].data.sum() * weights[b] for b in net.outputs if "loss" in b))


def plain_step(solver):
    solver.step(1)
    return (loss_value(solver.net),)


def deploy_weights(net, deploy):
    """{layer: [arrays]} of a trained caffe.Net, for the layers of the deploy NetParameter."""
    names = {layer.name for layer in deploy.layer}
    return {name: [b.data.copy() for b in blobs] for name, blobs in net.params.items() if name in names}


def _restore(solver, p, init, source, title, on_start):
    for path, why in snapshots.drop_torn(p["snapshots"]):
        print("%s: removed a snapshot that cannot be restored: %s" % (title, why), file=sys.stderr)
    _, state = snapshots.latest(p["snapshots"])
    if state:
        snapshots.restore(solver, state)
        snapshots.fast_forward(solver, solver.iter, _iter_size(p["solver"]))
        print("%s: resumed from iteration %d (%s)" % (title, solver.iter, state), file=sys.stderr)
    else:
        caffe_io.load_into(solver.net, init, source=source)
        if on_start is not None:
            on_start(solver.net)
    rows = read_loss_csv(p["csv"], solver.iter)   # a killed run's rows after its snapshot go
    caffe_io.atomic_write(p["csv"], "".join(",".join(_fmt(v) for v in r) + "\n" for r in rows), sync=False)


def _iter_size(solver_path):
    from google.protobuf import text_format
    from caffe.proto import caffe_pb2
    s = caffe_pb2.SolverParameter()
    with open(solver_path) as f:
        text_format.Merge(f.read(), s)
    return max(1, s.iter_size)


def check_finite(solver, title):
    """Weights that overflowed (a learning rate far too high) diverge whatever the loss still says."""
    for name, blobs in solver.net.params.items():
        if not all(np.isfinite(b.data).all() for b in blobs):
            raise Diverging("%s: the weights of layer %r became NaN or infinite by iteration %d; lower the learning "
                            "rate" % (title, name, solver.iter))


def snapshot(solver, p, title="fine-tune"):
    """Caffe's snapshot of the solver (of finite weights), once there is room for it (a failed write aborts
    Caffe)."""
    check_finite(solver, title)
    model_bytes = sum(b.data.size * 4 for blobs in solver.net.params.values() for b in blobs)
    snapshots.check_space(p["snapshots"], model_bytes, per=2)
    solver.snapshot()
    state = os.path.join(p["snapshots"], "snap_iter_%d%s" % (solver.iter, snapshots.STATE))
    faults.point("snapshot", state, files=(snapshots.model_of(state), state))
    snapshots.drop_old(p["snapshots"])


def _fmt(value):
    return str(value) if isinstance(value, int) else "%.6g" % value


def train(folder, deploy, n_iter, init, step=plain_step, columns=(), snapshot_every=500, title="fine-tune",
          source="initial weights", on_start=None, protect=(), gpu=None, progress=True, export=None):
    """Train to ``n_iter`` iterations with folder/solver.prototxt (see the module doc); returns the record.

    step: solver -> (loss, *extra columns); on_start: caffe.Net -> None, once before the first iteration
    of a fresh run (e.g. an initialisation); gpu: None (CPU) or a GPU id; export: the trained weights of the
    deploy's layers -> the deploy's weights (default: as they are)."""
    import caffe
    from tqdm import tqdm
    if gpu is None:
        caffe.set_mode_cpu()
    else:
        caffe.set_device(int(gpu))
        caffe.set_mode_gpu()
    p = paths(folder)
    os.makedirs(p["snapshots"], exist_ok=True)
    solver = caffe.get_solver(p["solver"])
    _restore(solver, p, init, source, title, on_start)
    bar = tqdm(total=n_iter, initial=solver.iter, desc=title, unit="it", disable=not progress,
               dynamic_ncols=True, file=sys.stderr)
    with open(p["csv"], "a", buffering=1) as log:
        writer = csv.writer(log, lineterminator="\n")
        while solver.iter < n_iter:
            with np.errstate(all="ignore"):   # a NaN or inf the Python layers meet is the divergence named below
                values = step(solver)
            if not np.isfinite(values[0]):
                raise Diverging("%s: loss became %s at iteration %d; lower the learning rate"
                                % (title, values[0], solver.iter))
            try:   # line-buffered: a row is on disk before the next iteration (and a full disk shows here)
                writer.writerow((solver.iter,) + tuple("%.6g" % v for v in values))
            except OSError as e:
                raise TrainError("%s: cannot write %s (%s); make room and run the same command again to resume"
                                 % (title, p["csv"], e.strerror or e)) from None
            if snapshot_every and solver.iter % snapshot_every == 0:
                snapshot(solver, p, title)
            bar.set_postfix(dict(zip(("loss",) + tuple(columns), ("%.4f" % v for v in values))))
            bar.update(1)
    bar.close()
    if snapshots.latest(p["snapshots"])[0] != n_iter:
        snapshot(solver, p, title)
    check_finite(solver, title)
    weights = deploy_weights(solver.net, deploy)
    caffe_io.write_weights(deploy, export(weights) if export else weights, p["final"], protect=protect)
    caffe_io.open_net(p["deploy"], p["final"])   # the result must load in Caffe
    return finish(p, n_iter, title, columns)


def finish(p, n_iter, title, columns=()):
    """Loss plot and the record of a finished run (its loss.csv read back)."""
    rows = read_loss_csv(p["csv"], n_iter)
    plot_loss([(r[0], sum(r[1:])) for r in rows], p["png"],
              "%s: %s" % (title, " + ".join(("loss",) + tuple(columns))))
    tail = rows[-20:]
    record = dict(iterations=n_iter, final=p["final"], deploy=p["deploy"], loss_csv=p["csv"], loss_png=p["png"],
                  final_loss=float(np.mean([r[1] for r in tail])) if tail else None,
                  snapshot=(snapshots.latest(p["snapshots"])[1] or "").replace(".solverstate", ".caffemodel"))
    for i, name in enumerate(columns, 2):
        record["final_" + name] = float(np.mean([r[i] for r in tail])) if tail else None
    return record
