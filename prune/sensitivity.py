"""Sensitivity of a net to pruning each channel group, and the allocation it implies.

For every prunable group and every keep ratio of a grid, the group alone is
cut with the closed-form step of the driver (criterion + least-squares
reconstruction of its consumers) and the damage to the net's output is
measured on images the step did not sample: the mean of 1 - cos between the
pruned and the unpruned net's embedding.  One sampling pass per group serves
every ratio.  The curves are the data of Distiller's and NNI's sensitivity
analysis; ``allocate`` turns them into per-group keep ratios that reach a MACs
target with the least summed damage (greedy: each step takes the cut that
costs the least damage per MAC saved, with the MACs of every layer recomputed
for the current widths, since a 1x1 conv's cost depends on both groups it
joins).  The result is a plan file a user can read and edit, which
``python -m prune --plan FILE`` runs.
"""
import json
import os

import numpy as np

from base import caffe_io, cli
from base.runfolder import CONFIG, RunFolder, command_config
from prune.criteria import CRITERIA, make as make_criterion
from prune.policy import keep_count
from prune.reconstruct import cut
from prune.graph import build_graph
from prune.sample import Targets, collect
from prune.taylor import gradient_terms


class SensitivityError(ValueError):
    pass


# flags that shape only the plan, recomputed from the curves on every run; the rest make the curves
PLAN_ONLY = ("macs_target", "round_to", "latency_target", "runtime", "latency_points", "latency_cache",
             "quiet", "out")


RATIOS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)


def embed(net, weights, batches, blob):
    """The ``blob`` output of the net for every image of ``batches``, rows L2-normalised."""
    cnet = caffe_io.net_from_param(net)
    caffe_io.load_into(cnet, weights)
    data = cnet.inputs[0]
    out = []
    for x in batches:
        cnet.blobs[data].reshape(*x.shape)
        cnet.blobs[data].data[...] = x
        cnet.forward()
        out.append(np.array(cnet.blobs[blob].data).reshape(x.shape[0], -1))
    e = np.concatenate(out).astype(np.float64)
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


def group_curve(net, weights, graph, group, fit, judge, reference, blob, ratios, criterion="thinet",
                samples_per_image=10, positions=10, ridge="auto", seed=0):
    """{ratio: mean 1 - cos} for one group cut alone; ``fit()`` yields the sampling batches, ``judge()`` the
    held-out ones, ``reference`` their unpruned embeddings."""
    ev = collect(net, weights, group, fit(), samples_per_image, seed=seed,
                 targets=Targets(net=None, positions=positions))
    chooser = make_criterion(criterion, seed=seed)
    if chooser.needs_gradient:     # the net here is the unpruned one: it is its own teacher
        teacher = caffe_io.runnable_net(net, weights)
        ev.taylor = gradient_terms(net, weights, [group], fit(), teacher)[group.id]
    curve = {}
    for r in ratios:
        kept = [int(c) for c in chooser.select(ev, keep_count(r, group.channels))]
        net2, weights2, _ = cut(net, weights, graph, group, ev, kept, "full", ridge)
        e = embed(net2, weights2, judge(), blob)
        curve[r] = float(np.mean(1.0 - np.sum(e * reference, axis=1)))
    return curve


def analyse(net, weights, fit, judge, blob, out_path, ratios=RATIOS, groups=None, progress=True, **step):
    """Curves of every prunable group (or ``groups``), saved to ``out_path`` (JSON) after each group so a
    killed run resumes.  Returns the record."""
    from tqdm import tqdm
    graph = build_graph(net)
    chosen = [g for g in graph.prunable() if groups is None or g.id in groups]
    if not chosen:
        raise SensitivityError("no prunable group to analyse")
    record = json.load(open(out_path)) if os.path.exists(out_path) else {}
    if record and (record.get("ratios") != list(ratios) or record.get("blob") != blob):
        raise SensitivityError("%s holds an analysis with other ratios or blob; use another output" % out_path)
    record.update(ratios=list(ratios), blob=blob, curves=record.get("curves", {}))
    reference = embed(net, weights, judge(), blob)
    for g in tqdm(chosen, desc="sensitivity", unit="group", disable=not progress):
        if g.id in record["curves"]:
            continue
        curve = group_curve(net, weights, graph, g, fit, judge, reference, blob, ratios, **step)
        record["curves"][g.id] = {"channels": g.channels, "damage": {"%g" % r: d for r, d in curve.items()}}
        caffe_io.atomic_write(out_path, json.dumps(record, indent=1))
    return record


def _interpolated(curve, channels):
    """Damage for every kept count 1..channels, linear in the ratio between the measured points
    (whole group: no damage)."""
    r = np.array(sorted(float(k) for k in curve["damage"]) + [1.0])
    d = np.array([curve["damage"]["%g" % k] for k in r[:-1]] + [0.0])
    d = np.maximum.accumulate(d[::-1])[::-1]     # more channels never hurt more
    return np.interp(np.arange(channels + 1) / channels, r, d)


def _floor(lowest, channels, round_to):
    """The fewest channels a group keeps: ``lowest`` of them, a multiple of ``round_to`` (the whole group
    when that is all it can keep)."""
    if round_to <= 1:
        return max(1, int(np.ceil(lowest * channels)))
    count = max(round_to, round_to * int(np.ceil(lowest * channels / round_to)))
    return channels if count >= channels else count


def _lower(k, channels, floor, step, round_to):
    """The next smaller count of a group at ``k``: one move of ``step`` channels (default 1/32 of the group,
    at least one; a multiple of ``round_to``), never below ``floor``."""
    move = max(1, channels // 32) if step is None else step
    if round_to <= 1:
        return max(floor, k - move)
    move = max(round_to, round_to * int(round(move / round_to)))
    return max(floor, round_to * ((k - move) // round_to))


def _best_cut(kept, widths, floor, damage, rank, need, step, round_to):
    """(group, new count) of the move with the least damage per unit of ``rank``'s cost saved; moves that
    save nothing there are ranked by what they save of ``need`` (the model of an unmet target) instead."""
    for model in (rank, need) if rank is not need else (rank,):
        now, best = model.cost(kept), None
        for gid, k in kept.items():
            k2 = _lower(k, widths[gid], floor[gid], step, round_to)
            if k2 >= k:
                continue
            saved = now - model.cost(dict(kept, **{gid: k2}))
            if saved <= 0:
                continue
            cost = (damage[gid][k2] - damage[gid][k]) / saved
            if best is None or cost < best[0]:
                best = (cost, gid, k2)
        if best is not None:
            return best[1], best[2]
    return None


def allocate(record, macs_model, target, min_ratio=None, step=None, round_to=1, rank=None, also=()):
    """Per-group kept channel counts that bring ``macs_model`` -- the cost model: prune.macs.MacsModel, or
    prune.latency.LatencyModel (anything with ``cost(kept)``, ``total``) -- to ``target`` (a share of its
    total) with the least summed damage.  min_ratio: the fewest channels a group keeps, as a share (default
    the smallest measured ratio); step: channels removed per move (default 1/32 of the group, at least 1);
    round_to: every cut group keeps a multiple of it (prune.policy.keep_count); rank: the cost model whose
    saving ranks the moves (default ``macs_model``; a LatencyModel spends the cuts where they buy time on its
    runtime); also: more [(cost model, target share)] that must hold too."""
    curves = record["curves"]
    widths = {gid: c["channels"] for gid, c in curves.items()}
    lowest = min(float(r) for r in record["ratios"]) if min_ratio is None else min_ratio
    round_to = max(1, int(round_to or 1))
    floor = {gid: _floor(lowest, c, round_to) for gid, c in widths.items()}
    damage = {gid: _interpolated(curves[gid], c) for gid, c in widths.items()}
    goals = [(macs_model, target)] + list(also)
    kept = dict(widths)
    while True:
        unmet = [(m, t) for m, t in goals if m.cost(kept) > t * m.total]
        if not unmet:
            break
        move = _best_cut(kept, widths, floor, damage, rank or macs_model, unmet[0][0], step, round_to)
        if move is None:
            model, goal = unmet[0]
            what = getattr(model, "unit", "MACs")
            raise SensitivityError("the groups cannot be cut below %.1f%% of the %s (each keeps at least %g "
                                   "of its channels); --%s-target %g is out of reach"
                                   % (100 * model.cost(kept) / model.total, "MACs" if what == "MACs" else
                                      "latency", lowest, "macs" if what == "MACs" else "latency", goal))
        kept[move[0]] = move[1]
    _refill(kept, widths, damage, goals, round_to)
    return kept


def _refill(kept, widths, damage, goals, round_to=1):
    """Give back channels (``round_to`` at a time, or the rest of the group) where they buy the most damage
    while every target still holds (the greedy moves in steps, so it overshoots by up to one step)."""
    while True:
        best = None
        for gid, k in kept.items():
            if k >= widths[gid]:
                continue
            k2 = min(widths[gid], k + round_to)
            trial = dict(kept, **{gid: k2})
            if any(m.cost(trial) > t * m.total for m, t in goals):
                continue
            gain = damage[gid][k] - damage[gid][k2]
            if best is None or gain > best[0]:
                best = (gain, gid, k2)
        if best is None or best[0] <= 0:
            return
        kept[best[1]] = best[2]


def predicted_damage(record, kept):
    """The summed damage the curves of ``record`` predict for ``kept`` = {group id: channels kept} (groups
    left out are whole)."""
    curves = record["curves"]
    return sum(float(_interpolated(curves[g], curves[g]["channels"])[k]) for g, k in kept.items())


def plan(record, macs_model, target=None, latency=None, latency_target=None, round_to=1, **kw):
    """The plan file's content: per-group keep ratios (exact channel counts under the driver's rule) for
    ``target`` (a share of the MACs) and/or ``latency_target`` (a share of ``latency``'s predicted time, a
    prune.latency.LatencyModel).  With ``latency`` the moves are ranked by the time they save on its
    runtime, so at a MACs target alone the allocation still spends its cuts where they buy time."""
    goals = [(m, t) for m, t in ((macs_model, target), (latency, latency_target)) if t is not None]
    if not goals:
        raise SensitivityError("a plan needs a MACs target or a latency target")
    kept = allocate(record, goals[0][0], goals[0][1], round_to=round_to, rank=latency, also=goals[1:], **kw)
    widths = macs_model.channels()
    predicted = predicted_damage(record, kept)
    content = {
        "about": "per-group keep ratios for python -m prune --plan; edit freely (a group left out is not pruned)",
        "macs_target": target,
        "macs_share": round(macs_model.share(kept), 6),
        "predicted_damage": predicted,
        "keep": {g: kept[g] / widths[g] for g in kept if kept[g] < widths[g]},
        "channels": {g: [kept[g], widths[g]] for g in kept},
    }
    if round_to and round_to > 1:
        content["round_to"] = int(round_to)
    if latency is not None:
        content["latency"] = dict(runtime=latency.runtime, target=latency_target,
                                  share=round(latency.share(kept), 6), predicted_ms=round(latency.cost(kept), 4),
                                  unpruned_ms=round(latency.total, 4),
                                  ranked_by="time saved on %s (prune.latency)" % latency.runtime)
    return content


def plot(record, path):
    """One curve per group: damage against the keep ratio."""
    from base.figures import pyplot, save_figure
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for gid, curve in record["curves"].items():
        ratios = sorted(float(r) for r in curve["damage"])
        ax.plot(ratios + [1.0], [curve["damage"]["%g" % r] for r in ratios] + [0.0], marker=".",
                label="%s (%d)" % (gid, curve["channels"]))
    ax.set_xlabel("share of the group's channels kept")
    ax.set_ylabel("damage: mean 1 - cos to the unpruned embedding")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    return save_figure(fig, path)


def parser():
    from prune import options
    ap = cli.parser(
        "python -m prune.sensitivity",
        description="Measure how much each channel group of a net can lose: every prunable group alone is cut to "
                    "each ratio of --ratios with the closed-form step of python -m prune (ThiNet choice, least "
                    "squares towards the unpruned net) and the damage to the embedding (mean 1 - cos to the "
                    "unpruned net's) is measured on --judge-images images the step did not sample. Writes "
                    "OUT/sensitivity.json (resumable) and OUT/sensitivity.png; with --macs-target also "
                    "OUT/plan.json, per-group keep ratios with the least summed damage for that MACs share, "
                    "which python -m prune --plan OUT/plan.json runs (edit it freely); --latency-target (or "
                    "--runtime) allocates by the measured latency of every layer on a runtime instead.")
    cli.add_net(ap, weights_required=True, blob_default=None, blob_required=True,
                blob_help="embedding blob whose change is the damage (e.g. fc5, fc1)")
    options.add_images(ap, "images the closed-form step samples (default: all, at most %d)" % options.DEFAULT_IMAGES)
    ap.add_argument("--judge-images", type=cli.count, default=128,
                    help="further images, never sampled, on which the damage is measured (default 128)")
    ap.add_argument("--ratios", type=_ratios, default=RATIOS,
                    help="keep ratios to try, comma-separated (default %s)" % ",".join("%g" % r for r in RATIOS))
    ap.add_argument("--criterion", default="thinet", choices=sorted(CRITERIA),
                    help="channel criterion of the step (default thinet)")
    ap.add_argument("--macs-target", type=cli.share, default=None,
                    help="also write OUT/plan.json: the allocation that keeps this share of the MACs")
    from prune import latency
    latency.add_arguments(ap)
    cli.add_run(ap, "folder for sensitivity.json, sensitivity.png and plan.json")
    return ap


def _ratios(text):
    import argparse
    try:
        values = tuple(sorted({float(v) for v in text.split(",") if v.strip()}))
    except ValueError:
        values = ()
    if not values or not all(0 < v < 1 for v in values):
        raise argparse.ArgumentTypeError("expected comma-separated ratios in (0, 1), not %r" % text)
    return values


@cli.entry("python -m prune.sensitivity")
def main(argv=None):
    from base.images import image_batches
    from base.netinput import input_layer
    from prune import options
    from prune import latency
    a = parser().parse_args(argv)
    latency.check_arguments(a)
    if a.round_to and a.macs_target is None and a.latency_target is None:
        raise cli.UsageError("--round-to rounds the plan's counts: give --macs-target or --latency-target")
    cli.check_run_inputs(a, dict(model=a.model, weights=a.weights, pairs=a.pairs,
                                 data=a.data if os.path.isfile(a.data) else None), nets=[("model", "weights")])
    net, weights = caffe_io.read_net(a.model), caffe_io.read_weights(a.weights)
    _, shape = input_layer(net, a.model)
    root, fit, pre, judge = options.images_of(a, shape, held_out=a.judge_images)
    from prune.macs import MacsModel
    macs = MacsModel(net, source=a.model)
    with RunFolder(a.out, SensitivityError) as run:
        if run.exists("sensitivity.json") and not run.exists(CONFIG):
            raise SensitivityError("%s holds a sensitivity.json without the config.json that says how it was made; "
                                   "use another --out" % a.out)
        hashed = ("model", "weights", "pairs") + (("data",) if os.path.isfile(a.data) else ())
        run.guard(command_config(a, hashed=hashed, leave_out=PLAN_ONLY), flags=True)
        record = analyse(net, weights, lambda: image_batches(root, fit, pre, a.batch),
                         lambda: image_batches(root, judge, pre, a.batch), a.blob, run.file("sensitivity.json"),
                         a.ratios, progress=not a.quiet, criterion=a.criterion, seed=a.seed)
        plot(record, run.file("sensitivity.png"))
        print("%-32s %5s  %s" % ("group", "chans", "  ".join("%6g" % r for r in a.ratios)))
        for gid, c in record["curves"].items():
            print("%-32s %5d  %s" % (gid, c["channels"], "  ".join("%6.4f" % c["damage"]["%g" % r]
                                                                   for r in a.ratios)))
        if a.macs_target is not None or a.latency_target is not None:
            write_plan(a, net, record, macs)
    return 0


def write_plan(a, net, record, macs):
    """OUT/plan.json for --macs-target and/or --latency-target (--runtime, --round-to), and its summary line."""
    from prune import latency
    runtime = latency.runtime_of(a)
    model = None
    if runtime:
        model = latency.model_for(net, runtime, source=a.model, graph=macs.graph, round_to=a.round_to,
                                  points=a.latency_points, lowest=min(a.ratios), cache_dir=a.latency_cache,
                                  progress=not a.quiet)
    content = plan(record, macs, a.macs_target, latency=model, latency_target=a.latency_target,
                   round_to=a.round_to or 1)
    caffe_io.atomic_write(os.path.join(a.out, "plan.json"), json.dumps(content, indent=1))
    goals = (["%.1f%% of the MACs (reached %.2f%%)" % (100 * a.macs_target, 100 * content["macs_share"])]
             if a.macs_target is not None else [])
    if model is not None:
        lat = content["latency"]
        shares = "%.2f%% predicted: %.2f of %.2f ms" % (100 * lat["share"], lat["predicted_ms"], lat["unpruned_ms"])
        goals.append("%.1f%% of the latency on %s (%s)" % (100 * a.latency_target, runtime, shares)
                     if a.latency_target is not None else "cuts ranked by the time they save on %s (%s)"
                     % (runtime, shares))
    print("plan for %s, predicted damage %.3f%s: %s" % (", ".join(goals), content["predicted_damage"],
                                                        ", multiples of %d channels" % a.round_to if a.round_to
                                                        else "", os.path.join(a.out, "plan.json")))


if __name__ == "__main__":
    cli.run(main)
