"""Sensitivity of a net to pruning each channel group, and the allocation it implies.

For every prunable group and every keep ratio of a grid, the group alone is
cut with the closed-form step of the driver (criterion + least-squares
reconstruction of its consumers) and the damage to the net's output is
measured on images the step did not sample: the mean of 1 - cos between the
pruned and the unpruned net's embedding.  One sampling pass per group serves
every ratio.  The curves are the data of Distiller's and NNI's sensitivity
analysis; ``allocate`` turns them into per-group channel counts that reach a MACs
target with the least summed damage (greedy: each step takes the cut that
costs the least damage per MAC saved, with the MACs of every layer recomputed
for the current widths, since a 1x1 conv's cost depends on both groups it
joins).  prune.plans turns the allocation into a plan (counts), in every
entry point; ``python -m prune.sensitivity`` (``__main__``) writes the curves
and, given a plan policy, the plan file that ``python -m prune --plan FILE``
runs.
"""
import json
import os

import numpy as np

from base import caffe_io
from base.errors import ToolkitError
from prune.criteria import make as make_criterion
from prune.policy import keep_count, round_count
from prune.reconstruct import cut
from prune.graph import build_graph
from prune.sample import Targets, collect
from prune.gradient import gradient_terms


class SensitivityError(ToolkitError):
    pass


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
    net, graph, unmeasured = runnable_part(net, blob)
    chosen = [g for g in graph.prunable() if (groups is None or g.id in groups) and g.id not in unmeasured]
    if not chosen:
        raise SensitivityError("no prunable group to analyse" + (" in the part of the net this Caffe build runs"
                                                                 if unmeasured else ""))
    record = json.load(open(out_path)) if os.path.exists(out_path) else {}
    if record and (record.get("ratios") != list(ratios) or record.get("blob") != blob):
        raise SensitivityError("%s holds an analysis with other ratios or blob; use another output" % out_path)
    record.update(ratios=list(ratios), blob=blob, curves=record.get("curves", {}))
    if unmeasured:
        record["not_measured"] = unmeasured
    todo = [g for g in chosen if g.id not in record["curves"]]
    reference = embed(net, weights, judge(), blob) if todo else None
    for g in tqdm(todo, desc="sensitivity", unit="group", disable=not progress):
        curve = group_curve(net, weights, graph, g, fit, judge, reference, blob, ratios, **step)
        record["curves"][g.id] = {"channels": g.channels, "damage": {"%g" % r: d for r, d in curve.items()}}
        caffe_io.atomic_write(out_path, json.dumps(record, indent=1))
    return record


def runnable_part(net, blob):
    """(net Caffe runs, its graph, {group: why not measured}) -- of a Caffe fork's net the part this build runs
    (netcheck.runnable_view); a group is measured there only when it is prunable in the whole net and all its
    layers are in that part.  ``blob`` must be made in it."""
    from base import netcheck
    view, left = netcheck.runnable_view(net)
    if not left:
        return net, build_graph(net), {}
    if blob not in {t for layer in view.layer for t in layer.top}:
        raise SensitivityError("blob %r is made by layers this Caffe build cannot run (%s); give --blob of the "
                               "part it runs" % (blob, "; ".join("%s: %s" % lw for lw in left[:2])))
    whole, part = build_graph(net), build_graph(view)
    inside = {layer.name for layer in view.layer}
    prunable = {g.id for g in whole.prunable()}
    unmeasured = {}
    for g in part.prunable():
        if g.id not in prunable:
            unmeasured[g.id] = "fixed in the whole net: " + "; ".join(whole[g.id].reasons) if g.id in whole.groups \
                else "not a group of the whole net"
    for g in whole.prunable():
        outside = sorted({n for role in ("producers", "passengers", "consumers") for n in g.layers(role)} - inside)
        if outside:
            unmeasured[g.id] = "read by layers this Caffe build cannot run (%s)" % ", ".join(outside)
    return view, part, unmeasured


def merge(records, wanted, sources):
    """One record of the shards' records (same ratios and blob), every group of ``wanted`` measured once."""
    first = records[0]
    for r, where in zip(records, sources):
        if (r.get("ratios"), r.get("blob")) != (first.get("ratios"), first.get("blob")):
            raise SensitivityError("%s has other ratios or blob than %s" % (where, sources[0]))
    curves = {}
    for r, where in zip(records, sources):
        twice = sorted(set(curves) & set(r["curves"]))
        if twice:
            raise SensitivityError("%s measures group %s again" % (where, twice[0]))
        curves.update(r["curves"])
    missing = [g for g in wanted if g not in curves]
    if missing:
        raise SensitivityError("the shards %s leave out group%s %s: merge every shard" % (
            ", ".join(sources), "s" if len(missing) > 1 else "", ", ".join(missing[:5])))
    return dict(first, curves={g: curves[g] for g in wanted})


def _interpolated(curve, channels):
    """Damage for every kept count 1..channels, linear in the ratio between the measured points
    (whole group: no damage)."""
    r = np.array(sorted(float(k) for k in curve["damage"]) + [1.0])
    d = np.array([curve["damage"]["%g" % k] for k in r[:-1]] + [0.0])
    d = np.maximum.accumulate(d[::-1])[::-1]     # more channels never hurt more
    return np.interp(np.arange(channels + 1) / channels, r, d)


def _lower(k, channels, floor, step, round_to):
    """The next smaller count of a group at ``k``: one move of ``step`` channels (default 1/32 of the group;
    whole multiples of ``round_to``), the count by the one rounding rule (prune.policy.round_count), never
    below ``floor``."""
    move = max(1, channels // 32) if step is None else step
    move = max(round_to, round_to * int(round(move / round_to)))
    return max(floor, round_count(k - move, channels, round_to))


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
    floor = {gid: keep_count(lowest, c, round_to) for gid, c in widths.items()}   # as the curves were cut
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


def allocation(record, macs_model, target=None, latency=None, latency_target=None, round_to=1, **kw):
    """{keep: {group id: channels kept}, macs_share, predicted_damage[, latency]} for ``target`` (a share of
    the MACs) and/or ``latency_target`` (a share of ``latency``'s predicted time, a
    prune.latency.LatencyModel).  With ``latency`` the moves are ranked by the time they save on its
    runtime, so at a MACs target alone the allocation still spends its cuts where they buy time."""
    goals = [(m, t) for m, t in ((macs_model, target), (latency, latency_target)) if t is not None]
    if not goals:
        raise SensitivityError("an allocation needs a MACs target or a latency target")
    kept = allocate(record, goals[0][0], goals[0][1], round_to=round_to, rank=latency, also=goals[1:], **kw)
    out = dict(keep=kept, macs_share=round(macs_model.share(kept), 6), predicted_damage=predicted_damage(record, kept))
    if latency is not None:
        out["latency"] = dict(runtime=latency.runtime, target=latency_target,
                              share=round(latency.share(kept), 6), predicted_ms=round(latency.cost(kept), 4),
                              unpruned_ms=round(latency.total, 4),
                              ranked_by="time saved on %s (prune.latency)" % latency.runtime)
    return out


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
