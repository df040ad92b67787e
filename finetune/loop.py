"""The one training loop: Caffe's solver driven from pycaffe, resumable, with a loss log.

    record = train(folder, deploy, n_iter, init, title="fine-tune")              # solver.step(1) per iteration
    record = train(folder, deploy, n_iter, init, step=penalised, columns=("penalty",))

``folder`` holds solver.prototxt (written by the caller) and receives
snapshots/ (Caffe's own, the newest two kept), loss.csv (iteration, loss[,
extra columns]), loss.png and final.caffemodel (the weights of ``deploy``'s
layers, checked by loading them in Caffe).  A per-iteration ``step(solver)
-> (loss, *extra)`` replaces ``solver.step(1)``: the BN-scale penalties of
channel prioritisation (finetune.bnscale.step) are one.  Killed at any
point, the same call restores the newest snapshot and goes on.
"""
import csv
import glob
import os
import re
import sys

import numpy as np

from base import caffe_io
from base.figures import pyplot, save_figure


class TrainError(ValueError):
    pass


def paths(folder):
    """Where everything of one training run lives."""
    return dict(train=os.path.join(folder, "train.prototxt"), solver=os.path.join(folder, "solver.prototxt"),
                deploy=os.path.join(folder, "deploy.prototxt"), snapshots=os.path.join(folder, "snapshots"),
                csv=os.path.join(folder, "loss.csv"), png=os.path.join(folder, "loss.png"),
                final=os.path.join(folder, "final.caffemodel"), done=os.path.join(folder, "done.json"),
                init=os.path.join(folder, "init.caffemodel"))


def _iteration(state):
    return int(re.search(r"_(\d+)\.solverstate$", state).group(1))


def latest_snapshot(folder):
    """(iteration, .solverstate path) of the newest complete snapshot, or (0, None)."""
    best = (0, None)
    for state in glob.glob(os.path.join(folder, "snap_iter_*.solverstate")):
        it = _iteration(state)
        if os.path.exists(state[:-len(".solverstate")] + ".caffemodel") and it > best[0]:
            best = (it, state)
    return best


def drop_old_snapshots(folder, keep=2):
    """Snapshots are whole models plus solver state: keep only the newest few."""
    states = sorted(glob.glob(os.path.join(folder, "snap_iter_*.solverstate")), key=_iteration)
    for state in states[:-keep]:
        for path in (state, state[:-len(".solverstate")] + ".caffemodel"):
            if os.path.exists(path):
                os.unlink(path)


def read_loss_csv(path, upto=None):
    """[(iteration, loss, *extra columns)] of a loss.csv, up to iteration ``upto`` (all when None)."""
    rows = []
    if path and os.path.exists(path):
        with open(path) as f:
            for row in csv.reader(f):
                if len(row) >= 2 and row[0].isdigit() and (upto is None or int(row[0]) <= upto):
                    rows.append((int(row[0]),) + tuple(float(v) for v in row[1:]))
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
    """The net's loss after a forward pass: the sum of its outputs named *loss*."""
    return float(sum(net.blobs[b].data.sum() for b in net.outputs if "loss" in b))


def plain_step(solver):
    solver.step(1)
    return (loss_value(solver.net),)


def deploy_weights(net, deploy):
    """{layer: [arrays]} of a trained caffe.Net, for the layers of the deploy NetParameter."""
    names = {layer.name for layer in deploy.layer}
    return {name: [b.data.copy() for b in blobs] for name, blobs in net.params.items() if name in names}


def _restore(solver, p, init, source, title, on_start):
    _, state = latest_snapshot(p["snapshots"])
    if state:
        solver.restore(state)
        print("%s: resumed from iteration %d (%s)" % (title, solver.iter, state), file=sys.stderr)
    else:
        caffe_io.load_into(solver.net, init, source=source)
        if on_start is not None:
            on_start(solver.net)
    rows = read_loss_csv(p["csv"], solver.iter)   # a killed run's rows after its snapshot go
    caffe_io.atomic_write(p["csv"], "".join(",".join(_fmt(v) for v in r) + "\n" for r in rows), sync=False)


def _fmt(value):
    return str(value) if isinstance(value, int) else "%.6g" % value


def train(folder, deploy, n_iter, init, step=plain_step, columns=(), snapshot_every=500, title="fine-tune",
          source="initial weights", on_start=None, protect=(), gpu=None, progress=True):
    """Train to ``n_iter`` iterations with folder/solver.prototxt (see the module doc); returns the record.

    step: solver -> (loss, *extra columns); on_start: caffe.Net -> None, once before the first iteration
    of a fresh run (e.g. an initialisation); gpu: None (CPU) or a GPU id."""
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
    with open(p["csv"], "a") as log:
        writer = csv.writer(log)
        while solver.iter < n_iter:
            values = step(solver)
            if not np.isfinite(values[0]):
                raise TrainError("%s: loss became %s at iteration %d; lower the learning rate"
                                 % (title, values[0], solver.iter))
            writer.writerow((solver.iter,) + tuple("%.6g" % v for v in values))
            if solver.iter % 20 == 0:
                log.flush()
            if snapshot_every and solver.iter % snapshot_every == 0:
                log.flush()
                solver.snapshot()
                drop_old_snapshots(p["snapshots"])
            bar.set_postfix(dict(zip(("loss",) + tuple(columns), ("%.4f" % v for v in values))))
            bar.update(1)
    bar.close()
    if latest_snapshot(p["snapshots"])[0] != n_iter:
        solver.snapshot()
    drop_old_snapshots(p["snapshots"])
    caffe_io.write_weights(deploy, deploy_weights(solver.net, deploy), p["final"], protect=protect)
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
                  snapshot=(latest_snapshot(p["snapshots"])[1] or "").replace(".solverstate", ".caffemodel"))
    for i, name in enumerate(columns, 2):
        record["final_" + name] = float(np.mean([r[i] for r in tail])) if tail else None
    return record
