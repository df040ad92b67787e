"""How many channels each group keeps: the selection policies.

A criterion (prune.criteria) scores or chooses channels *within* a group; a
policy decides how many each group keeps, and every policy ends in the same
data: a plan, [(group id, keep ratio)] in network order, that the driver runs
and a user can read and edit as a plan file.  The policies:

* one ratio for every selected group, or a table by group or layer (``--keep``);
* the one ratio that leaves a share of the net's MACs (``--macs-target``);
* network slimming's global |gamma| threshold (``--threshold``);
* a plan file (``--plan``), e.g. the sensitivity allocation of
  ``python -m prune.sensitivity``;
* one global ranking of score-based criteria across groups (Taylor's step,
  ``global_ranking``).

``keep_count`` is the one rule from a ratio to a number of channels.
"""
import json

from base.errors import ToolkitError
from prune.graph import build_graph


class PruneError(ToolkitError):
    pass


ROUND_TO_HELP = ("every cut group keeps a multiple of N channels, at least N (vector widths: 4, 8 or 16 are "
                 "common); a group kept whole stays whole")


def keep_count(ratio, channels, round_to=1):
    """The one rule from a keep ratio to a number of channels: the nearest count, at least one.

    With ``round_to`` N (``--round-to``) the nearest multiple of N, at least N: a group that is cut keeps a
    multiple of N channels, never zero; a ratio of 1, or a count that would round up to the whole group (or
    beyond), keeps the group whole."""
    round_to = int(round_to or 1)
    if round_to < 1:
        raise PruneError("--round-to must be at least 1, not %d" % round_to)
    if round_to == 1:
        return max(1, min(channels, int(round(ratio * channels))))
    if ratio >= 1:
        return channels
    count = max(round_to, round_to * int(round(ratio * channels / round_to)))
    return channels if count >= channels else count


def rounded(graph, plan, round_to):
    """A plan [(group id, ratio)] as {group id: ratio} whose counts under keep_count are multiples of
    ``round_to``: every ratio replaced by (its rounded count) / channels, which keep_count maps back to exactly
    that count (so the driver, a plan file and a reader agree on every count); groups kept whole are left
    out."""
    table = {gid: keep_count(r, graph[gid].channels, round_to) / graph[gid].channels for gid, r in plan}
    table = {gid: r for gid, r in table.items() if r < 1}
    if not table:
        raise PruneError("with --round-to %d every selected group keeps all its channels; nothing to prune" % round_to)
    return table


def names(group):
    """The names a user may give a group by: its id and its producer layers."""
    return {group.id} | {s.layer for s in group.producers}


def _chosen(graph, layers, keep):
    prunable = graph.prunable()
    if layers == "all":
        return [g for g in prunable if not isinstance(keep, dict) or names(g) & set(keep)]
    chosen = []
    for name in layers:
        hits = [g for g in graph.groups.values() if name in names(g)]
        if not hits:
            raise PruneError("%s: no layer or channel group named %r (prunable: %s)"
                             % (graph.source, name, ", ".join(g.id for g in prunable)))
        if not hits[0].prunable:
            raise PruneError("%r cannot be pruned: %s" % (name, "; ".join(hits[0].reasons)))
        chosen.append(hits[0])
    order = {g.id: i for i, g in enumerate(graph.groups.values())}
    return sorted({g.id: g for g in chosen}.values(), key=lambda g: order[g.id])


def plan_groups(graph, layers, keep):
    """[(group id, ratio)] in network order; every requested name must match a prunable group.

    layers: "all" or [group ids / producer layer names]; keep: one ratio, or {group or layer name: ratio}."""
    out = []
    for g in _chosen(graph, layers, keep):
        if isinstance(keep, dict):
            ratios = [keep[n] for n in names(g) if n in keep]
            if not ratios:
                raise PruneError("no keep ratio given for group %r (layers %s)" % (g.id, ", ".join(sorted(names(g)))))
            ratio = ratios[0]
        else:
            ratio = keep
        if not 0 < ratio <= 1:
            raise PruneError("keep ratio of %r must be in (0, 1], not %g" % (g.id, ratio))
        out.append((g.id, float(ratio)))
    if isinstance(keep, dict):
        unknown = set(keep) - {n for g in graph.groups.values() for n in names(g)}
        if unknown:
            raise PruneError("%s: no layer or channel group named %s" % (graph.source, ", ".join(sorted(unknown))))
    return out


def ratio_for_macs(net, weights, layers, target, source="net", round_to=1):
    """The single keep ratio that, applied to the chosen groups, leaves ``target`` (a share, 0..1) of the
    net's MACs: a bisection over the ratio on the exact MACs model (prune.macs), every count under
    keep_count(ratio, channels, round_to).  ``weights`` is unused (kept for callers).  Returns (ratio, MACs
    share reached)."""
    from prune.macs import MacsModel
    if not 0 < target < 1:
        raise PruneError("--macs-target is the share of MACs to keep, in (0, 1); got %g" % target)
    model = MacsModel(net, source=source)
    plan = plan_groups(model.graph, layers, 1.0)
    if not plan:
        raise PruneError("nothing to prune: no prunable group selected")

    def share(ratio):
        return model.share({gid: keep_count(ratio, model.graph[gid].channels, round_to) for gid, _ in plan})

    lowest = share(1e-9)
    if target < lowest:
        raise PruneError("pruning the chosen groups to one channel each still leaves %.1f%% of the MACs; "
                         "--macs-target %g cannot be reached (select more layers)" % (100 * lowest, target))
    lo, hi = 0.0, 1.0          # share(lo) <= target < share(hi)
    for _ in range(30):
        mid = (lo + hi) / 2
        if share(mid) <= target:
            lo = mid
        else:
            hi = mid
    return lo, share(lo)


def threshold_table(net, weights, layers, threshold, source="net"):
    """Network slimming's global |gamma| threshold as a keep table (ratios) of the groups that lose channels."""
    from prune.criteria.bnscale import global_threshold_keep
    graph = build_graph(net, source=source)
    kept = global_threshold_keep(graph, weights, threshold)
    if layers != "all":
        chosen = {gid for gid, _ in plan_groups(graph, layers, 1.0)}
        kept = {gid: k for gid, k in kept.items() if gid in chosen}
    table = {gid: len(k) / graph[gid].channels for gid, k in kept.items() if len(k) < graph[gid].channels}
    if not table:
        raise PruneError("%s: no channel of the selected groups has |gamma| below %g; nothing to prune"
                         % (source, threshold))
    return table, sum(len(k) for k in kept.values()), sum(graph[g].channels for g in kept)


def read_plan(path):
    """The keep table of a plan file (JSON with a 'keep' object {group or layer: ratio})."""
    try:
        with open(path) as f:
            content = json.load(f)
        table = content["keep"]
        if not isinstance(table, dict) or not all(isinstance(v, (int, float)) for v in table.values()):
            raise ValueError
    except OSError as e:
        raise PruneError("cannot read plan file %s: %s" % (path, e.strerror)) from None
    except (ValueError, KeyError, TypeError):
        raise PruneError("%s is not a plan file: it needs a JSON object with a 'keep' table "
                         "{group: ratio}" % path) from None
    if not table:
        raise PruneError("%s: the plan's 'keep' table is empty; nothing to prune" % path)
    return {k: float(v) for k, v in table.items()}


def global_ranking(scores):
    """All (group id, channel) pairs, least important first, for one cut across groups (Taylor's step);
    ties in group order, then channel order.  ``scores``: {group id: per-channel scores comparable across
    groups}."""
    pairs = [(float(s), order, gid, c) for order, (gid, values) in enumerate(scores.items())
             for c, s in enumerate(values)]
    return [(gid, c) for _, _, gid, c in sorted(pairs)]
