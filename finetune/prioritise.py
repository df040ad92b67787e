"""python -m finetune.prioritise: channel prioritisation, one BN net serving several widths (issue 9).

Stages, each recorded in OUT/stages/<name>.json when done (a killed run
started again with the same command goes on from the last finished stage, and
inside a training stage from its newest snapshot; other settings are refused):

1. pretrain    the BN net (BatchNorm + Scale after the convs) trained with the
               loss + lambda_s sum|gamma| + lambda_m sum max(0, gamma_{k+1} - gamma_k)
               (finetune.bnscale.step in a pycaffe loop, Caffe's Adam);
               from scratch the gammas start monotone, 1 - (k-1)/N
2. prune       every channel with |gamma| below a global threshold goes
               (network slimming, prune.surgery): a slimmer deploy net
3. multiwidth  the slim net fine-tuned as one Caffe net of towers at the
               utilisation levels (finetune.towers), BatchNorm/Scale frozen,
               the towers' losses summed
4. export      a standalone deploy prototxt + caffemodel per level
               (OUT/width100|75|50.prototxt/.caffemodel)
5. evaluate    with --lfw-dir and --pairs: the LFW protocol on --eval-folds
               for every level

OUT/results.md and results.json: accuracy, MACs and params per level.
The loss is softmax + center loss on the list's labels (the source's recipe)
or distillation from a teacher's embeddings (computed once).
"""
import argparse
import csv
import json
import os
import sys
import time
import types

import numpy as np

from prune import caffe_io
from prune.cli import entry
from . import bnscale, driver, lists, solver as solver_mod, trainnet


class PrioritiseError(ValueError):
    pass


def say(text, a):
    if not a.quiet:
        print("[prioritise] " + text, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ train nets

def _split(trunk, data, head):
    """train_net(trunk, data, head) cut after the trunk: (data + trunk net, head layers)."""
    single = trainnet.train_net(trunk, data, head)
    names = {l.name for l in trunk.layer}
    last = max(i for i, l in enumerate(single.layer) if l.name in names)
    body = type(single)()
    body.CopyFrom(single)
    del body.layer[last + 1:]
    return body, list(single.layer[last + 1:])


def softmax_center_head(a, classes):
    """fc6 (InnerProduct) + SoftmaxWithLoss + the center-loss Python layer (weight lambda_c) on the embedding."""
    from caffe.proto import caffe_pb2
    fc6 = caffe_pb2.LayerParameter(name="fc6", type="InnerProduct", bottom=[a.blob], top=["fc6"])
    fc6.inner_product_param.num_output = classes
    fc6.inner_product_param.weight_filler.type = "xavier"
    loss = caffe_pb2.LayerParameter(name="softmax_loss", type="SoftmaxWithLoss", bottom=["fc6", "label"],
                                    top=["softmax_loss"])
    center = caffe_pb2.LayerParameter(name="center_loss", type="Python", bottom=[a.blob, "label"],
                                      top=["center_loss"], loss_weight=[a.lambda_c])
    center.param.add(lr_mult=0, decay_mult=0)   # the layer moves its centres itself
    center.python_param.module = "finetune.centerloss"
    center.python_param.layer = "CenterLoss"
    center.python_param.param_str = json.dumps(dict(num_output=classes, alpha=a.center_alpha), sort_keys=True)
    return [fc6, loss, center]


def data_and_head(a, deploy, folder, progress):
    """(ImageList, head for trainnet.train_net or None, own head layers or None, extra initial weights)."""
    items = lists.read_list(a.train_list, a.train_root)
    if not items:
        raise PrioritiseError("%s: the image list is empty" % a.train_list)
    data = trainnet.ImageList(source=os.path.abspath(a.train_list), root_folder=a.train_root,
                              batch_size=a.batch, mirror=True, rgb=a.rgb, size=driver._read_size(deploy, items))
    if a.loss == "softmax":
        labels = [label for _, label in items]
        classes = a.num_classes or max(labels) + 1
        if max(labels) >= classes:
            raise PrioritiseError("%s: label %d is out of range for %d classes" % (a.train_list, max(labels), classes))
        head = trainnet.ASoftmax(num_classes=classes, embedding=a.blob)   # only its data layers are kept
        return data, head, softmax_center_head(a, classes), {}, len(items)
    job = types.SimpleNamespace(root_folder=a.train_root, mirror=True, out=folder)
    table, index_list = driver.teacher_table(job, a.teacher, a.teacher_weights, a.teacher_blob, a.teacher_rgb,
                                             items, progress)
    data.source = index_list
    head = trainnet.Distill(teacher=None, embedding=a.blob, teacher_embedding=a.teacher_blob,
                            student_dim=driver._blob_dim(deploy, a.blob), teacher_dim=table.shape[1],
                            table_rows=len(table))
    return data, head, None, {trainnet.TEACHER + a.teacher_blob: [table]}, len(items)


def pretrain_net(a, deploy, folder, progress=True):
    """The stage-1 train NetParameter, its extra initial weights, the list's size."""
    data, head, own, init, n = data_and_head(a, deploy, folder, progress)
    body, head_layers = _split(deploy, data, head)
    body.layer.extend(own if own is not None else head_layers)
    return body, init, n


def multiwidth_train(a, deploy, folder, progress=True):
    """The stage-3 towers train NetParameter (one head per tower, losses summed, BN/Scale frozen)."""
    from finetune.towers import add_heads, multiwidth_net, suffix
    data, head, own, init, n = data_and_head(a, deploy, folder, progress)
    body, head_layers = _split(multiwidth_net(deploy, a.levels, freeze_bn=True), data, head)
    net = add_heads(body, own if own is not None else head_layers, a.blob, a.levels)
    for layer in net.layer:
        # each width keeps its own class centres: shared ones would be moved once per tower per batch
        if layer.type == "Python" and layer.python_param.module == "finetune.centerloss":
            layer.param[0].name = layer.name + "_centres"
    towers = [suffix(p) for p in a.levels]
    return net, init, n, towers


# ------------------------------------------------------------------ the training loop

def _read_rows(path, upto):
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for row in csv.reader(f):
                if len(row) == 3 and row[0].isdigit() and int(row[0]) <= upto:
                    rows.append((int(row[0]), float(row[1]), float(row[2])))
    return rows


def train(a, folder, netparam, init, n_iter, lambda_s, lambda_m, monotone, deploy, title, progress=True):
    """Adam on ``netparam`` for n_iter iterations with the gamma penalties, resuming from the newest
    snapshot in folder/snapshots; writes loss.csv (iteration, loss, penalty), loss.png and
    final.caffemodel (the weights of ``deploy``'s layers).  Returns the record."""
    import caffe
    from tqdm import tqdm
    paths = dict(train=os.path.join(folder, "train.prototxt"), solver=os.path.join(folder, "solver.prototxt"),
                 snapshots=os.path.join(folder, "snapshots"), csv=os.path.join(folder, "loss.csv"),
                 png=os.path.join(folder, "loss.png"), final=os.path.join(folder, "final.caffemodel"),
                 deploy=os.path.join(folder, "deploy.prototxt"))
    os.makedirs(paths["snapshots"], exist_ok=True)
    caffe_io.write_net(netparam, paths["train"])
    caffe_io.write_net(deploy, paths["deploy"])
    s = solver_mod.solver(paths["train"], n_iter, os.path.join(paths["snapshots"], "snap"), base_lr=a.lr,
                          momentum=a.beta1, momentum2=0.999, type="Adam", weight_decay=a.weight_decay,
                          seed=a.seed)
    caffe_io.atomic_write(paths["solver"], caffe_io.net_to_text(s))
    caffe.set_mode_cpu()
    solver = caffe.get_solver(paths["solver"])
    _, state = driver.latest_snapshot(paths["snapshots"])
    if state:
        solver.restore(state)
        say("%s: resumed from iteration %d" % (title, solver.iter), a)
    else:
        caffe_io.load_into(solver.net, init, source=title + " initial weights")
        if monotone:
            bnscale.monotone_init(solver.net)
    rows = _read_rows(paths["csv"], solver.iter)
    with open(paths["csv"] + ".tmp", "w") as f:
        csv.writer(f).writerows(rows)
    os.replace(paths["csv"] + ".tmp", paths["csv"])
    bar = tqdm(total=n_iter, initial=solver.iter, desc=title, unit="it", disable=not progress, dynamic_ncols=True,
               file=sys.stderr)
    with open(paths["csv"], "a") as log:
        writer = csv.writer(log)
        while solver.iter < n_iter:
            loss, penalty = bnscale.step(solver, lambda_s, lambda_m)
            if not np.isfinite(loss):
                raise PrioritiseError("%s: loss became %s at iteration %d; lower --lr" % (title, loss, solver.iter))
            writer.writerow((solver.iter, "%.6g" % loss, "%.6g" % penalty))
            if a.snapshot_every and solver.iter % a.snapshot_every == 0:
                log.flush()
                solver.snapshot()
                driver.drop_old_snapshots(paths["snapshots"])
            bar.set_postfix(loss="%.4f" % loss, penalty="%.4f" % penalty)
            bar.update(1)
    bar.close()
    if driver.latest_snapshot(paths["snapshots"])[0] != n_iter:
        solver.snapshot()
    driver.drop_old_snapshots(paths["snapshots"])
    names = {l.name for l in deploy.layer}
    weights = {name: [b.data.copy() for b in blobs] for name, blobs in solver.net.params.items() if name in names}
    caffe_io.write_weights(deploy, weights, paths["final"], protect=[a.weights])
    caffe_io.open_net(paths["deploy"], paths["final"])   # the result must load in Caffe
    rows = _read_rows(paths["csv"], n_iter)
    driver.plot_loss([(i, l + p) for i, l, p in rows], paths["png"], "%s: loss + penalty" % title)
    tail = rows[-20:]
    return dict(deploy=paths["deploy"], caffemodel=paths["final"], iterations=n_iter, loss_csv=paths["csv"],
                snapshot=driver.latest_snapshot(paths["snapshots"])[1].replace(".solverstate", ".caffemodel"),
                final_loss=float(np.mean([l for _, l, _ in tail])) if tail else None,
                final_penalty=float(np.mean([p for _, _, p in tail])) if tail else None)


# ------------------------------------------------------------------ stages

def check_scales(graph):
    """Every prunable channel group needs a Scale (the BN gamma) to be scored and masked."""
    bare = [g.id for g in graph.prunable() if not any(s.type == "Scale" and s.blob == 0 for s in g.passengers)]
    if bare:
        raise PrioritiseError("%s: channel group(s) %s have no BatchNorm + Scale after their convs; channel "
                              "prioritisation needs a BN net (e.g. python -m prototxt.sphereface --bn)"
                              % (graph.source, ", ".join(bare)))


def gamma_summary(graph, weights):
    from prune.criteria.bnscale import scale_gammas
    out = {}
    for g in graph.prunable():
        gamma = scale_gammas(g, weights)
        out[g.id] = dict(channels=g.channels, mean_abs=float(gamma.mean()),
                         monotone_violations=int((np.diff(gamma) > 0).sum()))
    return out


def pretrain_stage(a, progress=True):
    from prune.graph import build_graph
    folder = os.path.join(a.out, "pretrain")
    deploy = caffe_io.read_net(a.model)
    graph = build_graph(deploy, source=a.model)
    check_scales(graph)
    net, init, n = pretrain_net(a, deploy, folder, progress)
    if a.weights:
        init.update(caffe_io.read_weights(a.weights))
    n_iter = solver_mod.iterations(n, a.pretrain_epochs, a.batch)
    rec = train(a, folder, net, init, n_iter, a.lambda_s, a.lambda_m, not a.weights, deploy, "pretrain", progress)
    rec["gammas"] = gamma_summary(graph, caffe_io.read_weights(rec["caffemodel"]))
    return rec


def prune_stage(a, pre):
    from prune.criteria.bnscale import global_threshold_keep
    from prune.graph import build_graph
    from prune.stats import net_stats
    from prune.surgery import prune_net, save_pruned
    net = caffe_io.read_net(pre["deploy"])
    weights = caffe_io.read_weights(pre["caffemodel"])
    graph = build_graph(net, source=pre["deploy"])
    keep = global_threshold_keep(graph, weights, a.threshold)
    net2, weights2 = prune_net(net, weights, keep, graph=graph)
    folder = os.path.join(a.out, "prune")
    proto, model = os.path.join(folder, "slim.prototxt"), os.path.join(folder, "slim.caffemodel")
    save_pruned(net2, weights2, proto, model, inputs=(pre["deploy"], pre["caffemodel"]))
    before, after = net_stats(net), net_stats(net2)
    return dict(prototxt=proto, caffemodel=model, threshold=a.threshold,
                groups={gid: [graph[gid].channels, len(k)] for gid, k in keep.items()},
                params=[before.params, after.params], macs=[before.macs, after.macs])


def multiwidth_stage(a, pre, slim, progress=True):
    folder = os.path.join(a.out, "multiwidth")
    deploy = caffe_io.read_net(slim["prototxt"])
    net, init, n, towers = multiwidth_train(a, deploy, folder, progress)
    init.update(caffe_io.read_weights(slim["caffemodel"]))
    # the classifier (or projection) and the class centres go on from pre-training
    trained = caffe_io.read_weights(pre["snapshot"])
    heads = {l.name for l in net.layer} - {l.name for l in deploy.layer}
    for name in heads:
        base = name.split("@")[0]
        if base in trained and base not in {l.name for l in deploy.layer}:
            init[name] = [x.copy() for x in trained[base]]
    n_iter = solver_mod.iterations(n, a.finetune_epochs, a.batch)
    return train(a, folder, net, init, n_iter, 0.0, 0.0, False, deploy, "multiwidth", progress)


def export_stage(a, fine):
    from prune.widths import export_width
    rows = []
    for p in a.levels:
        stem = os.path.join(a.out, "width%g" % (100 * p))
        stats = export_width(fine["deploy"], fine["caffemodel"], p, stem + ".prototxt", stem + ".caffemodel")
        rows.append(dict(level=p, prototxt=stem + ".prototxt", caffemodel=stem + ".caffemodel",
                         params=stats.params, macs=stats.macs))
    return dict(levels=rows)


def evaluate_level(a, row):
    from prune.pipeline import evaluate_stage
    return evaluate_stage(a, dict(lfw_dir=a.lfw_dir, pairs=a.pairs), row["prototxt"], row["caffemodel"])


def results(a, pre, slim, fine, exported, evals):
    rows = []
    for row, ev in zip(exported["levels"], evals):
        rows.append(dict(level=row["level"], params=row["params"], macs=row["macs"], prototxt=row["prototxt"],
                         caffemodel=row["caffemodel"], accuracy=ev and ev["accuracy"], std=ev and ev["std"],
                         folds=ev and ev["folds"]))
    rec = dict(model=a.model, weights=a.weights, train_list=a.train_list, loss=a.loss, eval_folds=a.eval_folds,
               lambda_s=a.lambda_s, lambda_m=a.lambda_m, threshold=a.threshold,
               pretrain=dict(iterations=pre["iterations"], final_loss=pre["final_loss"],
                             final_penalty=pre["final_penalty"]),
               prune=dict(groups=slim["groups"], params=slim["params"], macs=slim["macs"]),
               multiwidth=dict(iterations=fine["iterations"], final_loss=fine["final_loss"]), levels=rows)
    lines = ["# Channel prioritisation: %s" % a.model, "",
             "Loss %s; lambda_s %g, lambda_m %g; %d pre-training + %d multi-width iterations (batch %d, Adam lr %g); "
             "global |gamma| threshold %g: %s -> %s MACs." % (
                 a.loss, a.lambda_s, a.lambda_m, pre["iterations"], fine["iterations"], a.batch, a.lr, a.threshold,
                 _m(slim["macs"][0]), _m(slim["macs"][1])), "",
             "| width | LFW accuracy (folds %s) | multi-adds | params | files |" % a.eval_folds,
             "|---|---|---|---|---|"]
    for r in rows:
        acc = "%.2f %% +- %.2f" % (100 * r["accuracy"], 100 * r["std"]) if r["accuracy"] is not None else "-"
        lines.append("| %g %% | %s | %s | %.4g M | `%s` |" % (100 * r["level"], acc, _m(r["macs"]), r["params"] / 1e6,
                                                             os.path.basename(r["prototxt"])))
    caffe_io.atomic_write(os.path.join(a.out, "results.json"), json.dumps(rec, indent=1) + "\n")
    caffe_io.atomic_write(os.path.join(a.out, "results.md"), "\n".join(lines) + "\n")
    return rec


def _m(macs):
    return "%.4g M" % (macs / 1e6)


def run(a):
    from prune.pipeline import Stages, check_same_command
    for path in (a.model, a.weights, a.train_list, a.teacher, a.teacher_weights, a.pairs):
        if path and not os.path.exists(path):
            raise PrioritiseError("no such file: %s" % path)
    if a.lfw_dir and not os.path.isdir(a.lfw_dir):
        raise PrioritiseError("no such folder: %s" % a.lfw_dir)
    if bool(a.lfw_dir) != bool(a.pairs):
        raise PrioritiseError("evaluation needs both --lfw-dir and --pairs")
    if a.loss == "distill" and not (a.teacher and a.teacher_weights):
        raise PrioritiseError("--loss distill needs --teacher and --teacher-weights")
    if 1.0 not in a.levels:
        raise PrioritiseError("--levels must include 1.0, the full width")
    os.makedirs(a.out, exist_ok=True)
    check_same_command(a)
    progress = not a.quiet
    stage = Stages(a.out)
    start = time.time()
    pre = stage("pretrain", lambda: pretrain_stage(a, progress))
    say("pretrain: %d iterations, loss %.4f, penalty %.4f" % (pre["iterations"], pre["final_loss"],
                                                              pre["final_penalty"]), a)
    slim = stage("prune", lambda: prune_stage(a, pre))
    say("prune at |gamma| < %g: %s -> %s MACs (%s)" % (a.threshold, _m(slim["macs"][0]), _m(slim["macs"][1]),
                                                       ", ".join("%s %d/%d" % (g, k[1], k[0])
                                                                 for g, k in slim["groups"].items())), a)
    fine = stage("multiwidth", lambda: multiwidth_stage(a, pre, slim, progress))
    exported = stage("export", lambda: export_stage(a, fine))
    evals = [None] * len(exported["levels"])
    if a.lfw_dir:
        evals = [stage("evaluate_width%g" % (100 * row["level"]), lambda row=row: evaluate_level(a, row))
                 for row in exported["levels"]]
    rec = results(a, pre, slim, fine, exported, evals)
    say("done in %.0f s: %s" % (time.time() - start, os.path.join(a.out, "results.md")), a)
    return rec


# ------------------------------------------------------------------ command line

def parser():
    doc = __doc__.split("\n\n")
    ap = argparse.ArgumentParser(prog="python -m finetune.prioritise", description="\n\n".join(doc[:3]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    from prune.widths import parse_levels
    ap.add_argument("--model", required=True,
                    help="deploy prototxt of a BN net (BatchNorm + Scale after every conv), e.g. from "
                         "python -m prototxt.sphereface --depth 4 --bn")
    ap.add_argument("--weights", help="its caffemodel to start from (default: Caffe's fillers, gammas monotone)")
    ap.add_argument("--train-list", required=True, help="'path label' lines (python -m finetune.lists)")
    ap.add_argument("--train-root", default="", help="folder the list's paths are relative to")
    ap.add_argument("--out", required=True, help="run folder (a second run with the same command resumes it)")
    ap.add_argument("--blob", default="fc5", help="embedding blob (default fc5)")
    ap.add_argument("--rgb", action="store_true", help="the net takes RGB planes (default BGR, as SphereFace)")
    lo = ap.add_argument_group("loss")
    lo.add_argument("--loss", choices=("softmax", "distill"), default="softmax",
                    help="softmax: softmax + center loss on the list's labels (the source's recipe); distill: "
                         "match a teacher's L2-normalised embeddings, computed once (default softmax)")
    lo.add_argument("--num-classes", type=int, default=0, help="softmax classes (default: 1 + largest label)")
    lo.add_argument("--lambda-c", type=float, default=1e-3, help="center loss weight (default 1e-3)")
    lo.add_argument("--center-alpha", type=float, default=0.5, help="center update rate alpha (default 0.5)")
    lo.add_argument("--teacher", help="distill: teacher deploy prototxt")
    lo.add_argument("--teacher-weights", help="distill: teacher caffemodel")
    lo.add_argument("--teacher-blob", default="fc1", help="distill: teacher embedding blob (default fc1)")
    lo.add_argument("--teacher-rgb", type=lambda v: v.lower() in ("1", "yes", "true"), default=True,
                    help="distill: the teacher takes RGB planes (yes/no, default yes)")
    pr = ap.add_argument_group("prioritisation")
    pr.add_argument("--lambda-s", type=float, default=1e-3, help="sparsity weight on sum |gamma| (default 1e-3)")
    pr.add_argument("--lambda-m", type=float, default=4e-5,
                    help="monotonicity weight on sum max(0, gamma_{k+1} - gamma_k) (default 4e-5)")
    pr.add_argument("--threshold", type=float, default=0.1,
                    help="global |gamma| threshold: channels below it are pruned after pre-training (default 0.1)")
    pr.add_argument("--levels", type=parse_levels, default=[1.0, 0.75, 0.5],
                    help="utilisation levels, 1.0 included (default 1.0,0.75,0.5)")
    tr = ap.add_argument_group("training (Caffe's Adam, pycaffe loop)")
    tr.add_argument("--pretrain-epochs", type=float, default=8, help="epochs of pre-training (default 8)")
    tr.add_argument("--finetune-epochs", type=float, default=4, help="epochs of multi-width fine-tuning (default 4)")
    tr.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate, both stages (default 1e-4)")
    tr.add_argument("--beta1", type=float, default=0.5, help="Adam beta1 (default 0.5; beta2 0.999)")
    tr.add_argument("--weight-decay", type=float, default=1e-5, help="default 1e-5")
    tr.add_argument("--batch", type=int, default=64, help="images per batch (default 64)")
    tr.add_argument("--snapshot-every", type=int, default=500, help="snapshot period in iterations (default 500)")
    ev = ap.add_argument_group("evaluation (only with --lfw-dir and --pairs)")
    ev.add_argument("--lfw-dir", help="LFW aligned images (e.g. ../shared/data/lfw/images-112x112)")
    ev.add_argument("--pairs", help="LFW pairs.txt")
    ev.add_argument("--eval-folds", default="6-10", help="LFW folds to evaluate on (default 6-10)")
    ev.add_argument("--no-flip", action="store_true", help="evaluate without the mirror-image features")
    ap.add_argument("--seed", type=int, default=0, help="Caffe's random seed (default 0)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap


@entry("python -m finetune.prioritise")
def main(argv=None):
    a = parser().parse_args(argv)
    rec = run(a)
    for r in rec["levels"]:
        acc = "LFW %.2f%%" % (100 * r["accuracy"]) if r["accuracy"] is not None else "not evaluated"
        print("width %3g%%: %s, %s MACs, %.4gM params  %s" % (100 * r["level"], acc, _m(r["macs"]), r["params"] / 1e6,
                                                             r["prototxt"]))
    print("results: %s" % os.path.join(a.out, "results.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
