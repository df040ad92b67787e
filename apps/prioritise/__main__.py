"""python -m apps.prioritise: channel prioritisation, one BN net serving several widths .

Stages, each recorded in OUT/stages/<name>.json when done (a killed run
started again with the same command goes on from the last finished stage, and
inside a training stage from its newest snapshot; other settings are refused):

1. pretrain    the BN net (BatchNorm + Scale after the convs) trained with the
               loss + lambda_s sum|gamma| + lambda_m sum max(0, gamma_{k+1} - gamma_k)
               (apps.prioritise.penalty.step as the per-iteration hook of finetune.loop,
               Caffe's Adam);
               from scratch the gammas start monotone, 1 - (k-1)/N
2. prune       every channel with |gamma| below a global threshold goes
               (network slimming, prune.surgery): a slimmer deploy net
3. multiwidth  the slim net fine-tuned as one Caffe net of towers at the
               utilisation levels (apps.prioritise.towers), BatchNorm/Scale frozen,
               the towers' losses summed
4. export      a standalone deploy prototxt + caffemodel per level
               (OUT/width100|75|50.prototxt/.caffemodel)
5. evaluate    with --lfw-dir and --pairs: the LFW protocol on --eval-folds
               for every level

OUT/results.md and results.json: accuracy, MACs and params per level.
The loss is softmax + center loss on the list's labels (the source's recipe)
or distillation from a teacher's embeddings (computed once).
"""
import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from apps.prioritise import penalty
from base import caffe_io, cli
from base.errors import ToolkitError
from base.lists import read_list
from base.runfolder import RunFolder, command_config
from eval_lfw.evaluator import EvalSpec, spec_from_args
from finetune import heads, loop, solver as solver_mod, trainnet
from finetune.driver import FineTuneJob

PROG = "python -m apps.prioritise"


class PrioritiseError(ToolkitError):
    pass


@dataclass(frozen=True)
class Settings:
    """The whole command, typed; nothing changes it after ``settings()``."""
    model: str
    train_list: str
    out: str
    weights: Optional[str] = None
    train_root: str = ""
    blob: str = "fc5"
    rgb: bool = False
    loss: str = "softmax"                # softmax (+ centre loss) or distill
    num_classes: int = 0
    lambda_c: float = 1e-3
    center_alpha: float = 0.5
    teacher: Optional[str] = None
    teacher_weights: Optional[str] = None
    teacher_blob: str = "fc1"
    teacher_rgb: bool = True
    lambda_s: float = 1e-3
    lambda_m: float = 4e-5
    threshold: float = 0.1
    levels: Tuple[float, ...] = (1.0, 0.75, 0.5)
    pretrain_epochs: float = 8
    finetune_epochs: float = 4
    lr: float = 1e-4
    beta1: float = 0.5
    weight_decay: float = 1e-5
    batch: int = 64
    snapshot_every: int = 500
    evaluation: Optional[EvalSpec] = None   # None: no LFW evaluation
    seed: int = 0
    quiet: bool = False
    config: dict = dataclasses.field(default_factory=dict, compare=False)   # the arguments, for the run folder
    cache_dir: Optional[str] = None      # the feature cache (teacher embeddings, LFW features)


def say(text, st):
    cli.say("prioritise", text, st.quiet)


# ------------------------------------------------------------------ train nets

def job_of(st, folder):
    """The fine-tune job whose data and head (finetune.heads) the train nets of this run use."""
    return FineTuneJob(deploy=st.model, weights=None, train_list=st.train_list, root_folder=st.train_root, out=folder,
                       head="softmax-center" if st.loss == "softmax" else "distill", embedding=st.blob,
                       teacher=st.teacher, teacher_weights=st.teacher_weights, teacher_embedding=st.teacher_blob,
                       teacher_rgb=st.teacher_rgb, precompute_teacher=True, num_classes=st.num_classes,
                       lambda_c=st.lambda_c, center_alpha=st.center_alpha, batch_size=st.batch, mirror=True,
                       rgb=st.rgb, seed=st.seed, cache_dir=st.cache_dir)


def data_and_head(st, deploy, folder, progress):
    """(ImageList, head, extra initial weights, images in the list)."""
    items = read_list(st.train_list, st.train_root)
    data, head, init = heads.data_and_head(job_of(st, folder), deploy, items, progress=progress)
    return data, head, init, len(items)


def pretrain_net(st, deploy, folder, progress=True):
    """The stage-1 train NetParameter, its extra initial weights, the list's size."""
    data, head, init, n = data_and_head(st, deploy, folder, progress)
    return trainnet.train_net(deploy, data, head), init, n


def multiwidth_train(st, deploy, folder, progress=True):
    """The stage-3 towers train NetParameter (one head per tower, losses summed, BN/Scale frozen)."""
    from apps.prioritise.towers import multiwidth_train_net, suffix
    data, head, init, n = data_and_head(st, deploy, folder, progress)
    net = multiwidth_train_net(deploy, data, head, st.levels, freeze_bn=True)
    for layer in net.layer:
        # each width keeps its own class centres: shared ones would be moved once per tower per batch
        if layer.type == "Python" and layer.python_param.module == "finetune.centerloss":
            layer.param[0].name = layer.name + "_centres"
    return net, init, n, [suffix(p) for p in st.levels]


def train(st, folder, netparam, init, n_iter, lambda_s, lambda_m, monotone, deploy, title, progress=True):
    """Adam on ``netparam`` for n_iter iterations through finetune.loop, the gamma penalties its
    per-iteration hook; loss.csv has (iteration, loss, penalty).  Returns the record."""
    p = loop.paths(folder)
    os.makedirs(p["snapshots"], exist_ok=True)
    caffe_io.write_net(netparam, p["train"])
    caffe_io.write_net(deploy, p["deploy"])
    s = solver_mod.solver(p["train"], n_iter, os.path.join(p["snapshots"], "snap"), base_lr=st.lr,
                          momentum=st.beta1, momentum2=0.999, type="Adam", weight_decay=st.weight_decay,
                          seed=st.seed)
    caffe_io.atomic_write(p["solver"], caffe_io.net_to_text(s))
    rec = loop.train(folder, deploy, n_iter, init, step=lambda solver: penalty.step(solver, lambda_s, lambda_m),
                     columns=("penalty",), snapshot_every=st.snapshot_every, title=title,
                     source=title + " initial weights", on_start=penalty.monotone_init if monotone else None,
                     protect=[st.weights], progress=progress)
    return dict(rec, caffemodel=rec["final"])


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


def pretrain_stage(st, progress=True):
    from prune.graph import build_graph
    folder = os.path.join(st.out, "pretrain")
    deploy = caffe_io.read_net(st.model)
    graph = build_graph(deploy, source=st.model)
    check_scales(graph)
    net, init, n = pretrain_net(st, deploy, folder, progress)
    if st.weights:
        init.update(caffe_io.read_weights(st.weights))
    n_iter = solver_mod.iterations(n, st.pretrain_epochs, st.batch)
    rec = train(st, folder, net, init, n_iter, st.lambda_s, st.lambda_m, not st.weights, deploy, "pretrain", progress)
    rec["gammas"] = gamma_summary(graph, caffe_io.read_weights(rec["caffemodel"]))
    return rec


def prune_stage(st, pre):
    from prune.criteria.bnscale import global_threshold_keep
    from prune.graph import build_graph
    from prune.stats import net_stats
    from prune.surgery import prune_net, save_pruned
    net = caffe_io.read_net(pre["deploy"])
    weights = caffe_io.read_weights(pre["caffemodel"])
    graph = build_graph(net, source=pre["deploy"])
    keep = global_threshold_keep(graph, weights, st.threshold)
    net2, weights2 = prune_net(net, weights, keep, graph=graph)
    folder = os.path.join(st.out, "prune")
    proto, model = os.path.join(folder, "slim.prototxt"), os.path.join(folder, "slim.caffemodel")
    save_pruned(net2, weights2, proto, model, inputs=(pre["deploy"], pre["caffemodel"]))
    before, after = net_stats(net), net_stats(net2)
    return dict(prototxt=proto, caffemodel=model, threshold=st.threshold,
                groups={gid: [graph[gid].channels, len(k)] for gid, k in keep.items()},
                params=[before.params, after.params], macs=[before.macs, after.macs])


def multiwidth_stage(st, pre, slim, progress=True):
    folder = os.path.join(st.out, "multiwidth")
    deploy = caffe_io.read_net(slim["prototxt"])
    net, init, n, towers = multiwidth_train(st, deploy, folder, progress)
    init.update(caffe_io.read_weights(slim["caffemodel"]))
    # the classifier (or projection) and the class centres go on from pre-training
    trained = caffe_io.read_weights(pre["snapshot"])
    added = {l.name for l in net.layer} - {l.name for l in deploy.layer}
    for name in added:
        base = name.split("@")[0]
        if base in trained and base not in {l.name for l in deploy.layer}:
            init[name] = [x.copy() for x in trained[base]]
    n_iter = solver_mod.iterations(n, st.finetune_epochs, st.batch)
    return train(st, folder, net, init, n_iter, 0.0, 0.0, False, deploy, "multiwidth", progress)


def export_stage(st, fine):
    from apps.prioritise.widths import export_levels
    return dict(levels=export_levels(fine["deploy"], fine["caffemodel"], st.levels, st.out, progress=False))


def evaluate_level(st, row):
    from eval_lfw.evaluator import evaluate_net
    return evaluate_net(st.evaluation, row["prototxt"], row["caffemodel"])


def results(st, run, pre, slim, fine, exported, evals):
    rows = []
    for row, ev in zip(exported["levels"], evals):
        rows.append(dict(level=row["level"], params=row["params"], macs=row["macs"], prototxt=row["prototxt"],
                         caffemodel=row["caffemodel"], accuracy=ev and ev["accuracy"], std=ev and ev["std"],
                         folds=ev and ev["folds"]))
    folds = st.evaluation.folds if st.evaluation else None
    rec = dict(model=st.model, weights=st.weights, train_list=st.train_list, loss=st.loss, eval_folds=folds,
               lambda_s=st.lambda_s, lambda_m=st.lambda_m, threshold=st.threshold,
               pretrain=dict(iterations=pre["iterations"], final_loss=pre["final_loss"],
                             final_penalty=pre["final_penalty"]),
               prune=dict(groups=slim["groups"], params=slim["params"], macs=slim["macs"]),
               multiwidth=dict(iterations=fine["iterations"], final_loss=fine["final_loss"]), levels=rows)
    lines = ["# Channel prioritisation: %s" % st.model, "",
             "Loss %s; lambda_s %g, lambda_m %g; %d pre-training + %d multi-width iterations (batch %d, Adam lr %g); "
             "global |gamma| threshold %g: %s -> %s MACs." % (
                 st.loss, st.lambda_s, st.lambda_m, pre["iterations"], fine["iterations"], st.batch, st.lr, st.threshold,
                 _m(slim["macs"][0]), _m(slim["macs"][1])), "",
             "| width | LFW accuracy (folds %s) | multi-adds | params | files |" % folds,
             "|---|---|---|---|---|"]
    for r in rows:
        acc = "%.2f %% +- %.2f" % (100 * r["accuracy"], 100 * r["std"]) if r["accuracy"] is not None else "-"
        lines.append("| %g %% | %s | %s | %.4g M | `%s` |" % (100 * r["level"], acc, _m(r["macs"]), r["params"] / 1e6,
                                                             os.path.basename(r["prototxt"])))
    run.save("results.json", rec)
    run.write("results.md", "\n".join(lines) + "\n")
    return rec


def _m(macs):
    return "%.4g M" % (macs / 1e6)


def run(st):
    """Every stage of settings ``st`` in its run folder; returns the results record."""
    from prune.graph import build_graph
    progress = not st.quiet
    start = time.time()
    check_scales(build_graph(st.model))
    with RunFolder(st.out, PrioritiseError) as folder:
        folder.guard(st.config, flags=True)
        pre = folder.stage("pretrain", lambda: pretrain_stage(st, progress))
        say("pretrain: %d iterations, loss %.4f, penalty %.4f" % (pre["iterations"], pre["final_loss"],
                                                                  pre["final_penalty"]), st)
        slim = folder.stage("prune", lambda: prune_stage(st, pre))
        say("prune at |gamma| < %g: %s -> %s MACs (%s)" % (st.threshold, _m(slim["macs"][0]), _m(slim["macs"][1]),
                                                           ", ".join("%s %d/%d" % (g, k[1], k[0])
                                                                     for g, k in slim["groups"].items())), st)
        fine = folder.stage("multiwidth", lambda: multiwidth_stage(st, pre, slim, progress))
        exported = folder.stage("export", lambda: export_stage(st, fine))
        evals = [None] * len(exported["levels"])
        if st.evaluation is not None:
            evals = [folder.stage("evaluate_width%g" % (100 * row["level"]), lambda row=row: evaluate_level(st, row))
                     for row in exported["levels"]]
        rec = results(st, folder, pre, slim, fine, exported, evals)
    say("done in %.0f s: %s" % (time.time() - start, os.path.join(st.out, "results.md")), st)
    return rec


# ------------------------------------------------------------------ command line

def parser():
    from apps.prioritise.widths import add_levels
    doc = __doc__.split("\n\n")
    ap = cli.parser(PROG, description="\n\n".join(doc[:3]), raw=True)
    cli.add_net(ap, model_help="deploy prototxt of a BN net (BatchNorm + Scale after every conv), e.g. from "
                               "python -m prototxt.sphereface --depth 4 --bn",
                weights_help="its caffemodel to start from (default: Caffe's fillers, gammas monotone)")
    cli.add_train_list(ap, required=True)
    ap.add_argument("--out", required=True, help="run folder (a second run with the same command resumes it)")
    lo = ap.add_argument_group("loss")
    lo.add_argument("--loss", choices=("softmax", "distill"), default="softmax",
                    help="softmax: softmax + center loss on the list's labels (the source's recipe); distill: "
                         "match a teacher's L2-normalised embeddings, computed once (default softmax)")
    lo.add_argument("--num-classes", type=cli.whole, default=0, help="softmax classes (default: 1 + largest label)")
    lo.add_argument("--lambda-c", type=cli.non_negative, default=1e-3, help="center loss weight (default 1e-3)")
    lo.add_argument("--center-alpha", type=cli.fraction, default=0.5, help="center update rate alpha (default 0.5)")
    cli.add_teacher(lo, blob_default="fc1", rgb_default=True, teacher_help="distill: teacher deploy prototxt")
    pr = ap.add_argument_group("prioritisation")
    pr.add_argument("--lambda-s", type=cli.non_negative, default=1e-3, help="sparsity weight on sum |gamma| (default 1e-3)")
    pr.add_argument("--lambda-m", type=cli.non_negative, default=4e-5,
                    help="monotonicity weight on sum max(0, gamma_{k+1} - gamma_k) (default 4e-5)")
    pr.add_argument("--threshold", type=cli.non_negative, default=0.1,
                    help="global |gamma| threshold: channels below it are pruned after pre-training (default 0.1)")
    add_levels(pr)
    tr = ap.add_argument_group("training (Caffe's Adam, the pycaffe loop of finetune.loop)")
    tr.add_argument("--pretrain-epochs", type=cli.positive, default=8, help="epochs of pre-training (default 8)")
    tr.add_argument("--finetune-epochs", type=cli.positive, default=4, help="epochs of multi-width fine-tuning (default 4)")
    cli.add_finetune_lr(tr, 1e-4, "Adam learning rate, both stages (default 1e-4)")
    tr.add_argument("--beta1", type=cli.below_one, default=0.5, help="Adam beta1 (default 0.5; beta2 0.999)")
    tr.add_argument("--weight-decay", type=cli.non_negative, default=1e-5, help="default 1e-5")
    tr.add_argument("--batch", type=cli.count, default=64, help="images per batch (default 64)")
    tr.add_argument("--snapshot-every", type=cli.whole, default=500, help="snapshot period in iterations (default 500)")
    cli.add_lfw(ap.add_argument_group("evaluation (only with --lfw-dir and --pairs)"))
    ap.add_argument("--seed", type=cli.whole, default=0, help="Caffe's random seed (default 0)")
    cli.add_cache_dir(ap)
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap


def settings(argv=None):
    """The command line read, checked and typed once (nothing is created here)."""
    a = parser().parse_args(argv)
    cli.check_files(model=a.model, weights=a.weights, train_list=a.train_list, teacher=a.teacher,
                    teacher_weights=a.teacher_weights, pairs=a.pairs)
    cli.check_dirs(lfw_dir=a.lfw_dir)
    if bool(a.lfw_dir) != bool(a.pairs):
        raise cli.UsageError("evaluation needs both --lfw-dir and --pairs")
    if a.loss == "distill" and not (a.teacher and a.teacher_weights):
        raise cli.UsageError("--loss distill needs --teacher and --teacher-weights")
    if 1.0 not in a.levels:
        raise cli.UsageError("--levels must include 1.0, the full width")
    cli.check_run_inputs(a, dict(model=a.model, weights=a.weights, train_list=a.train_list, teacher=a.teacher,
                                 teacher_weights=a.teacher_weights, pairs=a.pairs),
                         nets=[("model", "weights"), ("teacher", "teacher_weights")])
    evaluation = spec_from_args(a, a.lfw_dir, a.pairs) if a.lfw_dir else None
    return Settings(model=a.model, train_list=a.train_list, out=a.out, weights=a.weights, train_root=a.train_root,
                    blob=a.blob, rgb=a.rgb, loss=a.loss, num_classes=a.num_classes, lambda_c=a.lambda_c,
                    center_alpha=a.center_alpha, teacher=a.teacher, teacher_weights=a.teacher_weights,
                    teacher_blob=a.teacher_blob, teacher_rgb=a.teacher_rgb, lambda_s=a.lambda_s, lambda_m=a.lambda_m,
                    threshold=a.threshold, levels=tuple(a.levels), pretrain_epochs=a.pretrain_epochs,
                    finetune_epochs=a.finetune_epochs, lr=a.finetune_lr, beta1=a.beta1, weight_decay=a.weight_decay,
                    batch=a.batch, snapshot_every=a.snapshot_every, evaluation=evaluation, seed=a.seed,
                    quiet=a.quiet, config=command_config(a), cache_dir=a.cache_dir)


@cli.entry(PROG)
def main(argv=None):
    st = settings(argv)
    rec = run(st)
    for r in rec["levels"]:
        acc = "LFW %.2f%%" % (100 * r["accuracy"]) if r["accuracy"] is not None else "not evaluated"
        print("width %3g%%: %s, %s MACs, %.4gM params  %s" % (100 * r["level"], acc, _m(r["macs"]), r["params"] / 1e6,
                                                             r["prototxt"]))
    print("results: %s" % os.path.join(st.out, "results.md"))
    return 0


if __name__ == "__main__":
    cli.run(main)
