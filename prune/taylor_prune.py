"""python -m prune.taylor_prune: iterative first-order Taylor filter pruning (Molchanov et al.).

Each step scores every channel of the CURRENT net with prune.taylor (Caffe's
own backward through a distillation train net whose teacher embeddings are
computed once and looked up), removes the K globally lowest (group, channel)
pairs (a group always keeps one channel), writes the smaller net with
prune.surgery, fine-tunes it by distillation for a few hundred iterations and
records what was removed, params, MACs and (with --lfw-dir) LFW accuracy.
Steps repeat until --target-share of the prunable filters is gone or the MACs
are down to --target-macs of the original.

OUT/ holds:
    steps/00/step.json               the unpruned net: params, MACs, accuracy
    steps/NN/scores.json             the step's Taylor scores and the channels it removes
    steps/NN/pruned.{prototxt,caffemodel}, steps/NN/finetune/   surgery and fine-tune
    steps/NN/step.json               written last: the step is done
    deploy.prototxt, model.caffemodel    the final pruned, fine-tuned net
    log.json                          every step + which layers lost filters first
    plots/accuracy.png, plots/removed_per_layer.png
A killed run goes on from where it stopped when the same command is run again;
a run folder made with other settings is refused.
"""
import argparse
import json
import math
import os
import sys
import time
from collections import OrderedDict

import numpy as np

from prune import caffe_io
from prune.cli import entry
from prune.report import save_figure


class TaylorPruneError(ValueError):
    pass


def say(text, quiet=False):
    if not quiet:
        print("[taylor-prune] " + text, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ the schedule

def plan_removal(scores, k):
    """The k lowest (group id, channel) pairs of the global ranking that leave every group a channel."""
    from prune.taylor import global_ranking
    left = {gid: len(s) for gid, s in scores.items()}
    out = []
    for gid, c in global_ranking(scores):
        if len(out) == k:
            break
        if left[gid] > 1:
            left[gid] -= 1
            out.append((gid, c))
    if len(out) < k:
        raise TaylorPruneError("only %d filters can still be removed (every group keeps one), %d asked"
                               % (len(out), k))
    return out


def step_size(a, total):
    """Filters removed per step (K) from --remove-per-step or --remove-share (of all prunable filters)."""
    k = a.remove_per_step if a.remove_per_step is not None else int(round(a.remove_share * total))
    if k < 1:
        raise TaylorPruneError("--remove-share %g of %d prunable filters is less than one filter per step"
                               % (a.remove_share, total))
    return k


def _min_macs(net, weights, graph):
    """MACs of the net with every prunable group cut to one channel: the floor of --target-macs."""
    from prune.stats import net_stats
    from prune.surgery import prune_net
    small, _ = prune_net(net, weights, {g.id: [0] for g in graph.prunable()}, graph=graph)
    return net_stats(small).macs


def check_targets(a, net, weights, graph, macs0):
    """Refuse up front what no schedule can reach."""
    groups = graph.prunable()
    if not groups:
        raise TaylorPruneError("%s: no prunable channel group (python -m prune.groups shows why)" % a.model)
    total = sum(g.channels for g in groups)
    removable = total - len(groups)
    k = step_size(a, total)
    if k > removable:
        raise TaylorPruneError("%d filters per step is more than the %d prunable filters that can go "
                               "(%d in %d groups, each keeps one)" % (k, removable, total, len(groups)))
    if a.target_share is not None:
        need = int(math.ceil(a.target_share * total - 1e-9))
        if need > removable:
            raise TaylorPruneError("--target-share %g means removing %d of %d prunable filters; at most %d can go "
                                   "(each of the %d groups keeps one)" % (a.target_share, need, total, removable,
                                                                         len(groups)))
    else:
        floor = _min_macs(net, weights, graph)
        if floor > a.target_macs * macs0:
            raise TaylorPruneError("--target-macs %g is unreachable: with one channel left in every prunable group "
                                   "the net still has %.4g of its MACs" % (a.target_macs, floor / macs0))
    return total, k


# ------------------------------------------------------------------ one step

def _job(a, d, out, proto, weights, iters):
    from finetune.driver import FineTuneJob
    from finetune.solver import iterations
    epochs = iters * a.batch / float(d["images"])
    while iterations(d["images"], epochs, a.batch) > iters:   # float rounding must not add an iteration
        epochs = np.nextafter(epochs, 0)
    # Mirroring on: the teacher's row is the mean of its embeddings of an image and its mirror, the student
    # sees one view. Without it, self-distillation scores the unpruned net at a loss of exactly zero, where
    # every gradient, and so every Taylor score, is zero.
    return FineTuneJob(deploy=proto, weights=weights, train_list=a.train_list, root_folder=a.train_root, out=out,
                       head="distill", embedding=a.blob, teacher=a.teacher or a.model,
                       teacher_weights=a.teacher_weights or a.weights, teacher_embedding=a.teacher_blob or a.blob,
                       precompute_teacher=True, mirror=True, rgb=a.rgb, epochs=float(epochs), batch_size=a.batch,
                       base_lr=a.lr, snapshot_every=100, seed=a.seed)


def score_net(a, d, out, proto, weights):
    """The distillation train net of the current net (TRAIN phase, current weights, teacher table
    loaded), its own ImageData seeded with --seed, ready for prune.taylor."""
    import caffe
    from finetune import driver
    paths, _, init = driver.build(_job(a, d, out, proto, weights, 1), progress=not a.quiet)
    caffe.set_random_seed(a.seed)
    net = caffe.Net(paths["train"], caffe.TRAIN)
    caffe_io.load_into(net, init, source=weights)
    return net


def score(a, d, folder, proto, weights, graph):
    """{group id: Taylor score per current channel} (scores.json is the record)."""
    from prune.taylor import taylor_scores
    net = score_net(a, d, os.path.join(folder, "score"), proto, weights)
    return taylor_scores(net, graph.prunable(), a.score_batches)


def evaluate(a, proto, weights):
    from eval_lfw.evaluator import evaluate as lfw
    from eval_lfw.features import net_input
    _, (_, h, w) = net_input(caffe_io.read_net(proto), proto)
    r = lfw(proto, a.blob, a.lfw_dir, a.pairs, weights=weights, folds=a.eval_folds,
            crop="112x96" if (h, w) == (112, 96) else "none", bgr=not a.rgb, progress=not a.quiet)
    return dict(accuracy=r["accuracy_mean"], std=r["accuracy_std"], folds=r["folds"])


def _where(path, out):
    """Paths inside the run folder relative to it (the folder can move), others absolute."""
    rel = os.path.relpath(path, out)
    return os.path.abspath(path) if rel.startswith("..") else rel


def _record(a, out, proto, weights, total, alive):
    """What every step.json holds about the net it ends with."""
    from prune.stats import net_stats
    s = net_stats(proto)
    rec = dict(prototxt=_where(proto, out), caffemodel=_where(weights, out),
               params=s.params, macs=s.macs, filters=int(sum(len(v) for v in alive.values())),
               alive={gid: [int(c) for c in v] for gid, v in alive.items()})
    rec["removed_share"] = 1 - rec["filters"] / total
    if a.lfw_dir:
        rec["lfw"] = evaluate(a, proto, weights)
    return rec


def run_step(a, d, n, prev, k):
    """Step n from the net of step n-1's record ``prev``; resumes inside the step."""
    from prune.graph import build_graph
    from prune.surgery import prune_net, save_pruned
    from finetune.driver import finetune
    folder = os.path.join(a.out, "steps", "%02d" % n)
    proto, weights = (os.path.join(a.out, prev[key]) for key in ("prototxt", "caffemodel"))
    net = caffe_io.read_net(proto)
    graph = build_graph(net, proto)
    start = time.time()
    score_path = os.path.join(folder, "scores.json")
    if os.path.exists(score_path):
        plan = json.load(open(score_path))
    else:
        say("step %d: scoring %d batches" % (n, a.score_batches), a.quiet)
        scores = score(a, d, folder, proto, weights, graph)
        removed = OrderedDict((gid, []) for gid in scores)
        for gid, c in plan_removal(scores, k):
            removed[gid].append(c)
        plan = dict(scores={gid: [float(x) for x in s] for gid, s in scores.items()},
                    removed={gid: sorted(int(c) for c in cs) for gid, cs in removed.items() if cs})
        caffe_io.atomic_write(score_path, json.dumps(plan, indent=1))
    pruned = os.path.join(folder, "pruned.prototxt"), os.path.join(folder, "pruned.caffemodel")
    if not os.path.exists(pruned[1]):   # save_pruned renames the caffemodel last
        keep = {gid: np.setdiff1d(np.arange(graph.groups[gid].channels), cs) for gid, cs in plan["removed"].items()}
        net2, w2 = prune_net(net, caffe_io.read_weights(weights), keep, graph=graph)
        save_pruned(net2, w2, *pruned, inputs=(proto, weights))
    say("step %d: removed %d filters from %d groups; fine-tuning %d iterations"
        % (n, k, len(plan["removed"]), a.finetune_iters), a.quiet)
    if a.finetune_iters:
        done = finetune(_job(a, d, os.path.join(folder, "finetune"), *pruned, a.finetune_iters),
                        progress=not a.quiet)
        result, loss = (done["deploy"], done["final"]), done["final_loss"]
    else:
        result, loss = pruned, None
    alive = {gid: np.asarray(v) for gid, v in prev["alive"].items()}
    removed_orig = {}
    for gid, cs in plan["removed"].items():   # current indices -> the original net's channel numbers
        removed_orig[gid] = [int(c) for c in alive[gid][cs]]
        alive[gid] = np.delete(alive[gid], cs)
    rec = dict(step=n, removed={gid: len(cs) for gid, cs in removed_orig.items()}, removed_channels=removed_orig,
               finetune_iters=a.finetune_iters, final_loss=loss)
    rec.update(_record(a, a.out, *result, d["total"], alive))
    rec["seconds"] = round(time.time() - start, 1)
    caffe_io.atomic_write(os.path.join(folder, "step.json"), json.dumps(rec, indent=1))
    return json.loads(json.dumps(rec))


def reached(a, rec, base):
    if a.target_share is not None:
        return rec["removed_share"] >= a.target_share - 1e-9
    return rec["macs"] <= a.target_macs * base["macs"]


# ------------------------------------------------------------------ the run

def check_args(a):
    for flag, path in (("--model", a.model), ("--weights", a.weights), ("--train-list", a.train_list),
                       ("--teacher", a.teacher), ("--teacher-weights", a.teacher_weights), ("--pairs", a.pairs)):
        if path and not os.path.isfile(path):
            raise TaylorPruneError("%s %s: no such file" % (flag, path))
    if a.teacher and not a.teacher_weights:
        raise TaylorPruneError("--teacher %s needs --teacher-weights" % a.teacher)
    if (a.remove_per_step is None) == (a.remove_share is None):
        raise TaylorPruneError("give one of --remove-per-step and --remove-share")
    if (a.target_share is None) == (a.target_macs is None):
        raise TaylorPruneError("give one of --target-share and --target-macs")
    for flag, v in (("--remove-share", a.remove_share), ("--target-share", a.target_share),
                    ("--target-macs", a.target_macs)):
        if v is not None and not 0 < v < 1:
            raise TaylorPruneError("%s must lie between 0 and 1, not %g" % (flag, v))
    if a.remove_per_step is not None and a.remove_per_step < 1:
        raise TaylorPruneError("--remove-per-step must be at least 1, not %d" % a.remove_per_step)
    if a.score_batches < 1 or a.batch < 1 or a.finetune_iters < 0:
        raise TaylorPruneError("--score-batches and --batch must be positive, --finetune-iters not negative")
    if a.lfw_dir and not a.pairs:
        raise TaylorPruneError("--lfw-dir needs --pairs (LFW View 2 pairs.txt)")
    if a.pairs and not a.lfw_dir:
        raise TaylorPruneError("--pairs needs --lfw-dir")


def run(a):
    """The whole schedule; returns the log (also OUT/log.json)."""
    import caffe
    from finetune import lists
    from prune.graph import build_graph
    from prune.stats import net_stats
    caffe.set_mode_cpu()
    check_args(a)
    net, weights = caffe_io.read_net(a.model), caffe_io.read_weights(a.weights)
    caffe_io.open_net(a.model, weights)   # named errors when the caffemodel does not fit
    graph = build_graph(net, a.model)
    os.makedirs(a.out, exist_ok=True)
    from prune.pipeline import check_same_command
    config = check_same_command(a, ("model", "weights", "teacher", "teacher_weights", "train_list"),
                                TaylorPruneError)
    images = len(lists.read_list(a.train_list, a.train_root))
    if a.batch > images:
        raise TaylorPruneError("--batch %d is larger than the training list (%d images)" % (a.batch, images))
    base_path = os.path.join(a.out, "steps", "00", "step.json")
    macs0 = json.load(open(base_path))["macs"] if os.path.exists(base_path) else net_stats(a.model).macs
    total, k = check_targets(a, net, weights, graph, macs0)
    d = dict(images=images, total=total)
    if os.path.exists(base_path):
        base = json.load(open(base_path))
    else:
        say("step 0: the unpruned net%s" % (" on LFW folds " + a.eval_folds if a.lfw_dir else ""), a.quiet)
        alive = {g.id: np.arange(g.channels) for g in graph.prunable()}
        base = dict(step=0, removed={}, removed_channels={}, finetune_iters=0, final_loss=None)
        base.update(_record(a, a.out, os.path.abspath(a.model), os.path.abspath(a.weights), total, alive))
        base["seconds"] = 0
        caffe_io.atomic_write(base_path, json.dumps(base, indent=1))
    steps = [base]
    while not reached(a, steps[-1], base):
        n = len(steps)
        path = os.path.join(a.out, "steps", "%02d" % n, "step.json")
        if os.path.exists(path):
            steps.append(json.load(open(path)))
            continue
        step_k = k
        if a.target_share is not None:
            left = int(math.ceil(a.target_share * total - 1e-9)) - (total - steps[-1]["filters"])
            # a remainder under half a step joins this one, rather than a whole step (scores, fine-tune,
            # LFW) spent on a few filters
            step_k = left if left < 1.5 * k else k
        step_k = min(step_k, steps[-1]["filters"] - len(steps[-1]["alive"]))
        if step_k < 1:
            raise TaylorPruneError("every group is down to one channel and the target is not reached")
        steps.append(run_step(a, d, n, steps[-1], step_k))
        s = steps[-1]
        say("step %d: %.1f%% of the filters removed, MACs %.1f%% of the original%s"
            % (n, 100 * s["removed_share"], 100 * s["macs"] / base["macs"],
               ", LFW %.2f%%" % (100 * s["lfw"]["accuracy"]) if "lfw" in s else ""), a.quiet)
    return finish(a, config, graph, steps)


def spearman(x, y):
    from scipy.stats import spearmanr
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(spearmanr(x, y)[0])


def summary(graph, steps):
    """Which groups lost filters first, and whether wide groups go first (the source's observation)."""
    groups = graph.prunable()
    rows = []
    for g in groups:
        lost = sum(s["removed"].get(g.id, 0) for s in steps)
        first = next((s["step"] for s in steps if s["removed"].get(g.id)), None)
        rows.append(dict(group=g.id, producers=g.layers("producers"), width=g.channels, lost=lost,
                         share_lost=lost / g.channels, first_step=first))
    widths = [r["width"] for r in rows]
    # ranks over all groups; a group never touched counts as losing after the last step
    firsts = [r["first_step"] if r["first_step"] is not None else len(steps) for r in rows]
    return dict(groups=rows,
                order=[r["group"] for r in sorted((r for r in rows if r["first_step"]),
                                                  key=lambda r: (r["first_step"], -r["lost"]))],
                spearman_width_lost=spearman(widths, [r["lost"] for r in rows]),
                spearman_width_share_lost=spearman(widths, [r["share_lost"] for r in rows]),
                spearman_width_first_step=spearman(widths, firsts))


def finish(a, config, graph, steps):
    last = steps[-1]
    for src, dst in ((last["prototxt"], "deploy.prototxt"), (last["caffemodel"], "model.caffemodel")):
        caffe_io.atomic_write(os.path.join(a.out, dst), open(os.path.join(a.out, src), "rb").read(),
                              protect=[a.model, a.weights])
    log = dict(config=config, steps=steps, summary=summary(graph, steps[1:]),
               deploy="deploy.prototxt", caffemodel="model.caffemodel")
    caffe_io.atomic_write(os.path.join(a.out, "log.json"), json.dumps(log, indent=1))
    plots(a.out, log, a.eval_folds if a.lfw_dir else None)
    return log


def plots(out, log, folds):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    folder = os.path.join(out, "plots")
    os.makedirs(folder, exist_ok=True)
    steps = log["steps"]
    if folds:
        fig, ax = plt.subplots(figsize=(6, 3.8))
        x = [100 * s["removed_share"] for s in steps]
        y = [100 * s["lfw"]["accuracy"] for s in steps]
        ax.errorbar(x, y, yerr=[100 * s["lfw"]["std"] for s in steps], marker="o", capsize=3)
        for s, xi, yi in zip(steps, x, y):
            ax.annotate("%.0f%%" % (100 * s["macs"] / steps[0]["macs"]), (xi, yi), textcoords="offset points",
                        xytext=(0, 6), fontsize=7, ha="center")
        ax.set_xlabel("prunable filters removed (%)")
        ax.set_ylabel("LFW accuracy, folds %s (%%)" % folds)
        ax.set_title("Taylor pruning (labels: MACs kept)")
        ax.grid(alpha=0.3)
        save_figure(fig, os.path.join(folder, "accuracy.png"))
    rows = log["summary"]["groups"]
    grid = np.array([[s["removed"].get(r["group"], 0) for s in steps[1:]] for r in rows], dtype=float)
    fig, ax = plt.subplots(figsize=(max(5, 1 + 0.35 * grid.shape[1]), max(3, 0.22 * len(rows) + 1.2)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(["%s (%d)" % (r["group"], r["width"]) for r in rows], fontsize=7)
    ax.set_xticks(range(grid.shape[1]))
    ax.set_xticklabels([str(s["step"]) for s in steps[1:]], fontsize=7)
    ax.set_xlabel("step")
    ax.set_title("filters removed per group (original width)")
    fig.colorbar(im, ax=ax, label="filters removed in the step")
    save_figure(fig, os.path.join(folder, "removed_per_layer.png"))


def print_summary(log, out=sys.stdout):
    s, steps = log["summary"], log["steps"]
    first, last = steps[0], steps[-1]
    print("%d steps: %.1f%% of the prunable filters removed; params %d -> %d, MACs %d -> %d (%.1f%%)"
          % (len(steps) - 1, 100 * last["removed_share"], first["params"], last["params"], first["macs"],
             last["macs"], 100 * last["macs"] / first["macs"]), file=out)
    if "lfw" in last:
        print("LFW folds %s: %.2f%% -> %.2f%%" % (log["config"]["eval_folds"], 100 * first["lfw"]["accuracy"],
                                                  100 * last["lfw"]["accuracy"]), file=out)
    rows = {r["group"]: r for r in s["groups"]}
    print("groups in the order they first lost filters (width, lost, first step):", file=out)
    w = max([len(g) for g in s["order"][:12]] + [10])
    for gid in s["order"][:12]:
        r = rows[gid]
        print("  %-*s %5d %5d  step %d" % (w, gid, r["width"], r["lost"], r["first_step"]), file=out)
    if len(s["order"]) > 12:
        print("  ... %d more" % (len(s["order"]) - 12), file=out)

    def fmt(v):
        return "n/a" if v is None else "%+.2f" % v
    print("Spearman rank correlation with a group's original width: filters lost %s, share lost %s, "
          "first step %s (negative: wide groups go first)" % (fmt(s["spearman_width_lost"]),
                                                              fmt(s["spearman_width_share_lost"]),
                                                              fmt(s["spearman_width_first_step"])), file=out)


# ------------------------------------------------------------------ command line

def parser():
    ap = argparse.ArgumentParser(prog="python -m prune.taylor_prune", description=__doc__.split("\n\n")[0] + "\n\n"
                                 + __doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="deploy prototxt of the net to prune")
    ap.add_argument("--weights", required=True, help="its caffemodel (never overwritten)")
    ap.add_argument("--blob", default="fc5", help="embedding blob (default fc5)")
    ap.add_argument("--rgb", action="store_true", help="the net takes RGB planes (e.g. MobileFaceNet); default BGR")
    ap.add_argument("--train-list", required=True,
                    help="training images, 'path label' lines (python -m finetune.lists); used for the scores and "
                         "the fine-tunes")
    ap.add_argument("--train-root", default="", help="folder the list's paths are relative to")
    ap.add_argument("--teacher", help="teacher deploy prototxt for the distillation loss (default: the unpruned "
                                      "--model itself, i.e. self-distillation)")
    ap.add_argument("--teacher-weights", help="the teacher's caffemodel (needed with --teacher)")
    ap.add_argument("--teacher-blob", help="the teacher's embedding blob (default: --blob)")
    s = ap.add_argument_group("schedule (one of each pair)")
    s.add_argument("--remove-per-step", type=int, help="filters removed per step (K)")
    s.add_argument("--remove-share", type=float,
                   help="filters removed per step as a share of all prunable filters of the original net")
    s.add_argument("--target-share", type=float, help="stop when this share of the prunable filters is removed (the last step "
                                                                     "takes the remainder when it is under half a step)")
    s.add_argument("--target-macs", type=float, help="stop when the MACs are down to this share of the original")
    s.add_argument("--finetune-iters", type=int, default=200, help="fine-tune iterations after each step (default 200)")
    s.add_argument("--score-batches", type=int, default=10,
                   help="training batches the Taylor scores are averaged over (default 10)")
    s.add_argument("--batch", type=int, default=32, help="batch size for scoring and fine-tuning (default 32)")
    s.add_argument("--lr", type=float, default=1e-3, help="fine-tune learning rate, SGD, fixed (default 0.001)")
    e = ap.add_argument_group("evaluation after every step (optional)")
    e.add_argument("--lfw-dir", help="LFW aligned images (e.g. ../shared/data/lfw/images-112x112)")
    e.add_argument("--pairs", help="LFW View 2 pairs.txt")
    e.add_argument("--eval-folds", default="6-10",
                   help="LFW folds to evaluate on, with cross-validation among them (default 6-10: keep the training "
                        "list to people of folds 1-5)")
    ap.add_argument("--out", required=True, help="run folder (the same command again resumes it)")
    ap.add_argument("--seed", type=int, default=0, help="seed of Caffe's data order and fillers (default 0)")
    ap.add_argument("--quiet", action="store_true", help="no progress output")
    return ap


@entry("python -m prune.taylor_prune")
def main(argv=None):
    a = parser().parse_args(argv)
    log = run(a)
    print_summary(log)
    print("pruned net: %s + %s\nlog: %s, plots: %s" % (
        os.path.join(a.out, "deploy.prototxt"), os.path.join(a.out, "model.caffemodel"),
        os.path.join(a.out, "log.json"), os.path.join(a.out, "plots")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
