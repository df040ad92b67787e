"""python -m apps.taylor: iterative first-order Taylor filter pruning (Molchanov et al.).

Each step scores every channel of the CURRENT net with prune.gradient (Caffe's
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
import dataclasses
import json
import math
import os
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import numpy as np

from base import caffe_io, cli
from base.errors import ToolkitError
from base.figures import pyplot, save_figure
from base.runfolder import RunFolder, command_config
from eval_lfw.evaluator import EvalSpec, spec_from_args
from finetune import driver

PROG = "python -m apps.taylor"


class TaylorPruneError(ToolkitError):
    pass


@dataclass(frozen=True)
class Settings:
    """The whole command, typed; nothing changes it after ``settings()``."""
    model: str
    weights: str
    train_list: str
    out: str
    blob: str = "fc5"
    rgb: bool = False
    train_root: str = ""
    teacher: Optional[str] = None        # None: the unpruned --model (self-distillation)
    teacher_weights: Optional[str] = None
    teacher_blob: Optional[str] = None
    remove_per_step: Optional[int] = None
    remove_share: Optional[float] = None
    target_share: Optional[float] = None
    target_macs: Optional[float] = None
    finetune_iters: int = 200
    score_batches: int = 10
    batch: int = 32
    lr: float = 1e-3
    evaluation: Optional[EvalSpec] = None   # None: no LFW evaluation
    seed: int = 0
    quiet: bool = False
    config: dict = dataclasses.field(default_factory=dict, compare=False)   # the arguments, for the run folder
    cache_dir: Optional[str] = None      # the feature cache (teacher embeddings, LFW features)


def say(text, quiet=False):
    cli.say("taylor", text, quiet)


# ------------------------------------------------------------------ the schedule

def plan_removal(scores, k):
    """The k lowest (group id, channel) pairs of the global ranking that leave every group a channel."""
    from prune.policy import global_ranking
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


def step_size(st, total):
    """Filters removed per step (K) from --remove-per-step or --remove-share (of all prunable filters)."""
    k = st.remove_per_step if st.remove_per_step is not None else int(round(st.remove_share * total))
    if k < 1:
        raise TaylorPruneError("--remove-share %g of %d prunable filters is less than one filter per step"
                               % (st.remove_share, total))
    return k


def _min_macs(net, weights, graph):
    """MACs of the net with every prunable group cut to one channel: the floor of --target-macs."""
    from prune.stats import net_stats
    from prune.surgery import prune_net
    small, _ = prune_net(net, weights, {g.id: [0] for g in graph.prunable()}, graph=graph)
    return net_stats(small).macs


def check_targets(st, net, weights, graph, macs0):
    """Refuse up front what no schedule can reach."""
    groups = graph.prunable()
    if not groups:
        raise TaylorPruneError("%s: no prunable channel group (python -m prune.groups shows why)" % st.model)
    total = sum(g.channels for g in groups)
    removable = total - len(groups)
    k = step_size(st, total)
    if k > removable:
        raise TaylorPruneError("%d filters per step is more than the %d prunable filters that can go "
                               "(%d in %d groups, each keeps one)" % (k, removable, total, len(groups)))
    if st.target_share is not None:
        need = int(math.ceil(st.target_share * total - 1e-9))
        if need > removable:
            raise TaylorPruneError("--target-share %g means removing %d of %d prunable filters; at most %d can go "
                                   "(each of the %d groups keeps one)" % (st.target_share, need, total, removable,
                                                                         len(groups)))
    else:
        floor = _min_macs(net, weights, graph)
        if floor > st.target_macs * macs0:
            raise TaylorPruneError("--target-macs %g is unreachable: with one channel left in every prunable group "
                                   "the net still has %.4g of its MACs" % (st.target_macs, floor / macs0))
    return total, k


# ------------------------------------------------------------------ one step

def _job(st, d, out, proto, weights, iters):
    from finetune.solver import iterations
    epochs = iters * st.batch / float(d["images"])
    while iterations(d["images"], epochs, st.batch) > iters:   # float rounding must not add an iteration
        epochs = np.nextafter(epochs, 0)
    # Mirroring on: the teacher's row is the mean of its embeddings of an image and its mirror, the student
    # sees one view. Without it, self-distillation scores the unpruned net at a loss of exactly zero, where
    # every gradient, and so every Taylor score, is zero.
    return driver.FineTuneJob(deploy=proto, weights=weights, train_list=st.train_list, root_folder=st.train_root, out=out,
                       head="distill", embedding=st.blob, teacher=st.teacher or st.model,
                       teacher_weights=st.teacher_weights or st.weights, teacher_embedding=st.teacher_blob or st.blob,
                       precompute_teacher=True, mirror=True, rgb=st.rgb, epochs=float(epochs), batch_size=st.batch,
                       base_lr=st.lr, snapshot_every=100, seed=st.seed, cache_dir=st.cache_dir)


def score_net(st, d, out, proto, weights):
    """The distillation train net of the current net (TRAIN phase, current weights, teacher table
    loaded), its own ImageData seeded with --seed, ready for prune.gradient."""
    import caffe
    paths, _, init = driver.build(_job(st, d, out, proto, weights, 1), progress=not st.quiet)
    caffe.set_random_seed(st.seed)
    net = caffe.Net(paths["train"], caffe.TRAIN)
    caffe_io.load_into(net, init, source=weights)
    return net


def score(st, d, folder, proto, weights, graph):
    """{group id: Taylor score per current channel} (scores.json is the record)."""
    from prune.gradient import taylor_scores
    net = score_net(st, d, os.path.join(folder, "score"), proto, weights)
    return taylor_scores(net, graph.prunable(), st.score_batches)


def _where(path, out):
    """Paths inside the run folder relative to it (the folder can move), others absolute."""
    rel = os.path.relpath(path, out)
    return os.path.abspath(path) if rel.startswith("..") else rel


def _record(st, out, proto, weights, total, alive):
    """What every step.json holds about the net it ends with."""
    from prune.stats import net_stats
    s = net_stats(proto)
    rec = dict(prototxt=_where(proto, out), caffemodel=_where(weights, out),
               params=s.params, macs=s.macs, filters=int(sum(len(v) for v in alive.values())),
               alive={gid: [int(c) for c in v] for gid, v in alive.items()})
    rec["removed_share"] = 1 - rec["filters"] / total
    if st.evaluation is not None:
        from eval_lfw.evaluator import evaluate_net
        rec["lfw"] = evaluate_net(st.evaluation, proto, weights)
    return rec


def step_plan(st, d, folder, n, k, proto, weights, graph):
    """Step n's scores and the channels it removes (steps/NN/scores.json, computed once)."""
    rel = os.path.join("steps", "%02d" % n, "scores.json")
    plan = folder.load(rel)
    if plan is not None:
        return plan
    say("step %d: scoring %d batches" % (n, st.score_batches), st.quiet)
    scores = score(st, d, folder.file("steps", "%02d" % n), proto, weights, graph)
    removed = OrderedDict((gid, []) for gid in scores)
    for gid, c in plan_removal(scores, k):
        removed[gid].append(c)
    return folder.save(rel, dict(scores={gid: [float(x) for x in s] for gid, s in scores.items()},
                                 removed={gid: sorted(int(c) for c in cs) for gid, cs in removed.items() if cs}))


def run_step(st, d, run, n, prev, k):
    """Step n from the net of step n-1's record ``prev``; resumes inside the step."""
    from prune.graph import build_graph
    from prune.surgery import prune_net, save_pruned
    folder = run.file("steps", "%02d" % n)
    proto, weights = (os.path.join(st.out, prev[key]) for key in ("prototxt", "caffemodel"))
    net = caffe_io.read_net(proto)
    graph = build_graph(net, proto)
    start = time.time()
    plan = step_plan(st, d, run, n, k, proto, weights, graph)
    pruned = os.path.join(folder, "pruned.prototxt"), os.path.join(folder, "pruned.caffemodel")
    if not os.path.exists(pruned[1]):   # save_pruned renames the caffemodel last
        keep = {gid: np.setdiff1d(np.arange(graph.groups[gid].channels), cs) for gid, cs in plan["removed"].items()}
        net2, w2 = prune_net(net, caffe_io.read_weights(weights), keep, graph=graph)
        save_pruned(net2, w2, *pruned, inputs=(proto, weights))
    say("step %d: removed %d filters from %d groups; fine-tuning %d iterations"
        % (n, k, len(plan["removed"]), st.finetune_iters), st.quiet)
    if st.finetune_iters:
        done = driver.finetune(_job(st, d, os.path.join(folder, "finetune"), *pruned, st.finetune_iters),
                        progress=not st.quiet)
        result, loss = (done["deploy"], done["final"]), done["final_loss"]
    else:
        result, loss = pruned, None
    alive = {gid: np.asarray(v) for gid, v in prev["alive"].items()}
    removed_orig = {}
    for gid, cs in plan["removed"].items():   # current indices -> the original net's channel numbers
        removed_orig[gid] = [int(c) for c in alive[gid][cs]]
        alive[gid] = np.delete(alive[gid], cs)
    rec = dict(step=n, removed={gid: len(cs) for gid, cs in removed_orig.items()}, removed_channels=removed_orig,
               finetune_iters=st.finetune_iters, final_loss=loss)
    rec.update(_record(st, st.out, *result, d["total"], alive))
    rec["seconds"] = round(time.time() - start, 1)
    return run.save(os.path.join("steps", "%02d" % n, "step.json"), rec)


def reached(st, rec, base):
    if st.target_share is not None:
        return rec["removed_share"] >= st.target_share - 1e-9
    return rec["macs"] <= st.target_macs * base["macs"]


# ------------------------------------------------------------------ the run

def check_args(st):
    """What no schedule can do, refused before anything is read or written."""
    if (st.remove_per_step is None) == (st.remove_share is None):
        raise TaylorPruneError("give one of --remove-per-step and --remove-share")
    if (st.target_share is None) == (st.target_macs is None):
        raise TaylorPruneError("give one of --target-share and --target-macs")
    for flag, v in (("--remove-share", st.remove_share), ("--target-share", st.target_share),
                    ("--target-macs", st.target_macs)):
        if v is not None and not 0 < v < 1:
            raise TaylorPruneError("%s must lie between 0 and 1, not %g" % (flag, v))
    if st.remove_per_step is not None and st.remove_per_step < 1:
        raise TaylorPruneError("--remove-per-step must be at least 1, not %d" % st.remove_per_step)
    if st.score_batches < 1 or st.batch < 1 or st.finetune_iters < 0:
        raise TaylorPruneError("--score-batches and --batch must be positive, --finetune-iters not negative")


def base_step(st, run, graph, total):
    """Step 0, the unpruned net (steps/00/step.json)."""
    rel = os.path.join("steps", "00", "step.json")
    base = run.load(rel)
    if base is not None:
        return base
    say("step 0: the unpruned net%s" % (" on LFW folds " + st.evaluation.folds if st.evaluation else ""), st.quiet)
    alive = {g.id: np.arange(g.channels) for g in graph.prunable()}
    base = dict(step=0, removed={}, removed_channels={}, finetune_iters=0, final_loss=None)
    base.update(_record(st, st.out, os.path.abspath(st.model), os.path.abspath(st.weights), total, alive))
    base["seconds"] = 0
    return run.save(rel, base)


def step_size_left(st, k, total, last):
    """Filters the next step removes: K, or the remainder of --target-share when under 1.5 K."""
    step_k = k
    if st.target_share is not None:
        left = int(math.ceil(st.target_share * total - 1e-9)) - (total - last["filters"])
        # a remainder under half a step joins this one, rather than a whole step (scores, fine-tune,
        # LFW) spent on a few filters
        step_k = left if left < 1.5 * k else k
    step_k = min(step_k, last["filters"] - len(last["alive"]))
    if step_k < 1:
        raise TaylorPruneError("every group is down to one channel and the target is not reached")
    return step_k


def run(st):
    """The whole schedule of settings ``st``; returns the log (also OUT/log.json)."""
    import caffe
    from base.lists import read_list
    from prune.graph import build_graph
    from prune.stats import net_stats
    caffe.set_mode_cpu()
    check_args(st)
    net, weights = caffe_io.read_net(st.model), caffe_io.read_weights(st.weights)
    caffe_io.open_net(st.model, weights)   # named errors when the caffemodel does not fit
    graph = build_graph(net, st.model)
    images = len(read_list(st.train_list, st.train_root))
    if st.batch > images:
        raise TaylorPruneError("--batch %d is larger than the training list (%d images)" % (st.batch, images))
    done = os.path.join(st.out, "steps", "00", "step.json")
    macs0 = json.load(open(done))["macs"] if os.path.exists(done) else net_stats(st.model).macs
    total, k = check_targets(st, net, weights, graph, macs0)
    with RunFolder(st.out, TaylorPruneError) as folder:
        config = folder.guard(st.config, flags=True)
        d = dict(images=images, total=total)
        steps = [base_step(st, folder, graph, total)]
        while not reached(st, steps[-1], steps[0]):
            n = len(steps)
            done = folder.load(os.path.join("steps", "%02d" % n, "step.json"))
            steps.append(done or run_step(st, d, folder, n, steps[-1], step_size_left(st, k, total, steps[-1])))
            s = steps[-1]
            say("step %d: %.1f%% of the filters removed, MACs %.1f%% of the original%s"
                % (n, 100 * s["removed_share"], 100 * s["macs"] / steps[0]["macs"],
                   ", LFW %.2f%%" % (100 * s["lfw"]["accuracy"]) if "lfw" in s else ""), st.quiet or done)
        return finish(st, folder, config, graph, steps)


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


def finish(st, run, config, graph, steps):
    last = steps[-1]
    for src, dst in ((last["prototxt"], "deploy.prototxt"), (last["caffemodel"], "model.caffemodel")):
        run.copy(run.file(src), dst, protect=[st.model, st.weights])
    log = dict(config=config, steps=steps, summary=summary(graph, steps[1:]),
               deploy="deploy.prototxt", caffemodel="model.caffemodel")
    run.save("log.json", log)
    plots(st.out, log, st.evaluation.folds if st.evaluation else None)
    return log


def plots(out, log, folds):
    plt = pyplot()
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
    ap = cli.parser(PROG, description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1], raw=True)
    cli.add_net(ap, weights_required=True, model_help="deploy prototxt of the net to prune",
                weights_help="its caffemodel (never overwritten)")
    cli.add_train_list(ap, required=True,
                       list_help="training images, 'path label' lines (python -m finetune.lists); used for the "
                                 "scores and the fine-tunes")
    cli.add_teacher(ap, teacher_help="teacher deploy prototxt for the distillation loss (default: the unpruned "
                                     "--model itself, i.e. self-distillation; needs --teacher-weights)")
    s = ap.add_argument_group("schedule (one of each pair)")
    step = s.add_mutually_exclusive_group(required=True)
    step.add_argument("--remove-per-step", type=cli.count, help="filters removed per step (K)")
    step.add_argument("--remove-share", type=cli.open_fraction,
                      help="filters removed per step as a share of all prunable filters of the original net")
    stop = s.add_mutually_exclusive_group(required=True)
    stop.add_argument("--target-share", type=cli.open_fraction, help="stop when this share of the prunable filters is removed "
                                                         "(the last step takes the remainder when it is under half "
                                                         "a step)")
    stop.add_argument("--target-macs", type=cli.open_fraction, help="stop when the MACs are down to this share of the original")
    s.add_argument("--finetune-iters", type=cli.whole, default=200, help="fine-tune iterations after each step (default 200)")
    s.add_argument("--score-batches", type=cli.count, default=10,
                   help="training batches the Taylor scores are averaged over (default 10)")
    s.add_argument("--batch", type=cli.count, default=32, help="batch size for scoring and fine-tuning (default 32)")
    cli.add_finetune_lr(s, 1e-3, "fine-tune learning rate, SGD, fixed (default 0.001)")
    cli.add_lfw(ap.add_argument_group("evaluation after every step (optional)"))
    cli.add_run(ap, "run folder (the same command again resumes it)",
                seed_help="seed of Caffe's data order and fillers (default 0)")
    cli.add_cache_dir(ap)
    return ap


def settings(argv=None):
    """The command line read, checked and typed once (nothing is created here)."""
    a = parser().parse_args(argv)
    cli.check_files(model=a.model, weights=a.weights, train_list=a.train_list, teacher=a.teacher,
                    teacher_weights=a.teacher_weights, pairs=a.pairs)
    if a.teacher and not a.teacher_weights:
        raise cli.UsageError("--teacher %s needs --teacher-weights" % a.teacher)
    if bool(a.lfw_dir) != bool(a.pairs):
        raise cli.UsageError("--lfw-dir and --pairs go together (LFW images and their View 2 pairs.txt)")
    cli.check_run_inputs(a, dict(model=a.model, weights=a.weights, train_list=a.train_list, teacher=a.teacher,
                                 teacher_weights=a.teacher_weights, pairs=a.pairs),
                         nets=[("model", "weights"), ("teacher", "teacher_weights")])
    evaluation = spec_from_args(a, a.lfw_dir, a.pairs) if a.lfw_dir else None
    st = Settings(model=a.model, weights=a.weights, train_list=a.train_list, out=a.out, blob=a.blob, rgb=a.rgb,
                  train_root=a.train_root, teacher=a.teacher, teacher_weights=a.teacher_weights,
                  teacher_blob=a.teacher_blob, remove_per_step=a.remove_per_step, remove_share=a.remove_share,
                  target_share=a.target_share, target_macs=a.target_macs, finetune_iters=a.finetune_iters,
                  score_batches=a.score_batches, batch=a.batch, lr=a.finetune_lr, evaluation=evaluation, seed=a.seed,
                  quiet=a.quiet, cache_dir=a.cache_dir,
                  config=command_config(a, hashed=("model", "weights", "teacher", "teacher_weights", "train_list")))
    check_args(st)
    return st


@cli.entry(PROG)
def main(argv=None):
    st = settings(argv)
    log = run(st)
    print_summary(log)
    print("pruned net: %s + %s\nlog: %s, plots: %s" % (
        os.path.join(st.out, "deploy.prototxt"), os.path.join(st.out, "model.caffemodel"),
        os.path.join(st.out, "log.json"), os.path.join(st.out, "plots")))
    return 0


if __name__ == "__main__":
    cli.run(main)
