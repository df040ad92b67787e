"""How many channels each group keeps: the plan, and the policies that make one.

A criterion (prune.criteria) chooses channels *within* a group; a policy
decides how many each group keeps.  Every policy ends in the same object, a
``Plan``: {group id: channels kept} in network order, what made it, and its
``round_to``; the driver runs it, and a plan file is the same object written
down (counts; ratios derived, for reading), which a user may edit.  The
policies (prune.plans makes a plan from one spec):

* one ratio for every selected group, or a table by group or layer (``--keep``);
* the one ratio that leaves a share of the net's MACs (``--macs-target``
  with ``--allocation uniform``);
* network slimming's global |gamma| threshold (``--threshold``): it chooses
  the channels too, and the plan carries them;
* a plan file (``--plan``);
* the sensitivity allocation (prune.sensitivity) by MACs or latency;
* one global ranking of score-based criteria across groups (Taylor's step,
  ``global_ranking``).

``keep_count`` is the one rule from a ratio to a number of channels, and
``round_count`` the same rule on a count (``--round-to``).
"""
import json
import numbers
from dataclasses import dataclass, field

from base.errors import ToolkitError


class PruneError(ToolkitError):
    pass


ROUND_TO_HELP = ("every cut group keeps a multiple of N channels, at least N (vector widths: 4, 8 or 16 are "
                 "common); a group kept whole stays whole")


def round_count(count, channels, round_to=1):
    """The one rounding rule: the nearest whole count to ``count`` (a real number of channels), at least one;
    with ``round_to`` N the nearest multiple of N, at least N.  A count that reaches the whole group (or
    would round up to it) keeps the group whole."""
    round_to = int(round_to or 1)
    if round_to < 1:
        raise PruneError("--round-to must be at least 1, not %d" % round_to)
    if count >= channels:
        return channels
    if round_to == 1:
        return max(1, int(round(count)))
    n = max(round_to, round_to * int(round(count / round_to)))
    return channels if n >= channels else n


def keep_count(ratio, channels, round_to=1):
    """The one rule from a keep ratio to a number of channels (round_count of ratio x channels)."""
    return round_count(ratio * channels, channels, round_to)


@dataclass(frozen=True)
class Plan:
    """How many channels each group keeps: ``keep`` {group id: count} of the groups that lose channels, in
    network order; ``channels`` their widths; ``made_by`` the policy and its parameters (and what it reached,
    e.g. macs_share); ``kept`` {group id: channel indices} where the policy chose the channels itself (the
    threshold) -- the driver uses those instead of asking the criterion."""
    keep: dict
    channels: dict
    made_by: dict
    round_to: int = 1
    kept: dict = field(default_factory=dict)

    def ratios(self):
        return {g: k / self.channels[g] for g, k in self.keep.items()}

    def to_json(self):
        """The plan file's content."""
        content = dict(about="channels each group keeps, for --plan; edit the counts in 'keep' freely (a group "
                             "left out is not pruned; 'ratios' is derived from them, for reading)",
                       made_by=self.made_by, round_to=self.round_to, keep=dict(self.keep),
                       channels=dict(self.channels), ratios={g: round(r, 6) for g, r in self.ratios().items()})
        if self.kept:
            content["kept_channels"] = {g: list(c) for g, c in self.kept.items()}
        return content

    def rounded(self, round_to, source="net"):
        """The plan with every count a multiple of ``round_to`` (round_count); the channels a policy chose
        stay chosen only where the count did not change."""
        if not round_to or round_to == 1:
            return self
        keep = {g: round_count(k, self.channels[g], round_to) for g, k in self.keep.items()}
        return make_plan(None, keep, self.made_by, round_to, self.kept, self.channels, source)


def names(group):
    """The names a user may give a group by: its id and its producer layers."""
    return {group.id} | {s.layer for s in group.producers}


def group_of(graph, name):
    """The prunable group a user named (by group id or producer layer), or a one-line refusal."""
    hits = [g for g in graph.groups.values() if name in names(g)]
    if not hits:
        raise PruneError("%s: no layer or channel group named %r (prunable: %s)"
                         % (graph.source, name, ", ".join(g.id for g in graph.prunable())))
    if not hits[0].prunable:
        raise PruneError("%r cannot be pruned: %s" % (name, "; ".join(hits[0].reasons)))
    return hits[0]


def chosen(graph, layers):
    """The prunable groups of ``layers`` ("all" or [group ids / producer layer names]) in network order."""
    if layers == "all":
        return graph.prunable()
    picked = {g.id for g in (group_of(graph, name) for name in layers)}
    return [g for g in graph.groups.values() if g.id in picked]


def make_plan(graph, keep, made_by, round_to=1, kept=None, channels=None, source=None):
    """The Plan of counts ``keep`` {group or layer name: count}, checked against the net (``graph``; or only
    against ``channels`` {group id: width}): every name a prunable group, every count a whole number in
    1..channels.  Groups kept whole are left out; ``kept`` sets are kept where their size is the count."""
    source = source or graph.source
    counts = {}
    for name, k in keep.items():
        gid = group_of(graph, name).id if graph is not None else name
        width = graph[gid].channels if graph is not None else channels[gid]
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= width:
            raise PruneError("%s: group %r keeps %r channels; a count must be a whole number from 1 to its %d "
                             "channels" % (source, name, k, width))
        if gid in counts:
            raise PruneError("%s: group %r is named twice (%s)" % (source, gid, name))
        counts[gid] = (int(k), width)
    order = list(graph.groups) if graph is not None else list(channels)
    cut = {g: counts[g] for g in order if g in counts and counts[g][0] < counts[g][1]}
    if not cut:
        raise PruneError("%s: every selected group keeps all its channels; nothing to prune" % source)
    sets = {g: [int(c) for c in (kept or {})[g]] for g in cut if len((kept or {}).get(g, ())) == cut[g][0]}
    return Plan(keep={g: k for g, (k, _) in cut.items()}, channels={g: c for g, (_, c) in cut.items()},
                made_by=made_by, round_to=int(round_to or 1), kept=sets)


def from_ratios(graph, layers, keep, made_by, round_to=1):
    """The plan of one ratio for every group of ``layers``, or of a table {group or layer name: ratio}."""
    if isinstance(keep, dict):
        table = {group_of(graph, n).id: r for n, r in keep.items()}
        groups = [g for g in chosen(graph, layers) if g.id in table]
    else:
        table, groups = {}, chosen(graph, layers)
    counts = {}
    for g in groups:
        ratio = table.get(g.id, keep)
        if not 0 < ratio <= 1:
            raise PruneError("keep ratio of %r must be in (0, 1], not %g" % (g.id, ratio))
        counts[g.id] = keep_count(ratio, g.channels, round_to)
    if not counts:
        raise PruneError("nothing to prune: no prunable group selected")
    return make_plan(graph, counts, made_by, round_to)


def for_macs(model, layers, target, made_by, round_to=1):
    """The plan of the single keep ratio that, on every group of ``layers``, leaves ``target`` (a share,
    0..1) of the MACs of ``model`` (a prune.macs.MacsModel): a bisection over the ratio, every count under
    keep_count; ``made_by`` gains the ratio and the share reached."""
    if not 0 < target < 1:
        raise PruneError("--macs-target is the share of MACs to keep, in (0, 1); got %g" % target)
    groups = chosen(model.graph, layers)
    if not groups:
        raise PruneError("nothing to prune: no prunable group selected")

    def counts(ratio):
        return {g.id: keep_count(ratio, g.channels, round_to) for g in groups}

    lowest = model.share(counts(1e-9))
    if target < lowest:
        raise PruneError("pruning the chosen groups to one channel each still leaves %.1f%% of the MACs; "
                         "--macs-target %g cannot be reached (select more layers)" % (100 * lowest, target))
    lo, hi = 0.0, 1.0          # share(lo) <= target < share(hi)
    for _ in range(30):
        mid = (lo + hi) / 2
        if model.share(counts(mid)) <= target:
            lo = mid
        else:
            hi = mid
    made_by = dict(made_by, ratio=lo, macs_share=round(model.share(counts(lo)), 6))
    return make_plan(model.graph, counts(lo), made_by, round_to)


def by_threshold(graph, weights, layers, threshold, made_by):
    """Network slimming's global |gamma| threshold: the plan keeps, in every group of ``layers``, the
    channels whose |gamma| reaches it -- those very channels (``Plan.kept``), so nothing selects again."""
    from prune.criteria.bnscale import global_threshold_keep
    kept = global_threshold_keep(graph, weights, threshold)
    picked = {g.id for g in chosen(graph, layers)}
    kept = {g: k for g, k in kept.items() if g in picked and len(k) < graph[g].channels}
    if not kept:
        raise PruneError("%s: no channel of the selected groups has |gamma| below %g; nothing to prune"
                         % (graph.source, threshold))
    made_by = dict(made_by, kept=sum(len(k) for k in kept.values()), of=sum(graph[g].channels for g in kept))
    return make_plan(graph, {g: len(k) for g, k in kept.items()}, made_by, kept=kept)


def read_plan(path, graph):
    """The plan of a plan file (Plan.to_json: a 'keep' object {group or layer: channels kept}), checked
    against the net; its counts are the plan, as they stand in the file (edited or not)."""
    try:
        with open(path) as f:
            content = json.load(f)
        if not isinstance(content, dict):
            raise ValueError
    except OSError as e:
        raise PruneError("cannot read plan file %s: %s" % (path, e.strerror)) from None
    except ValueError:
        raise PruneError("%s is not a plan file: it needs a JSON object with a 'keep' table "
                         "{group: channels kept}" % path) from None
    made_by = dict(policy="file", file=path, then=content.get("made_by"), then_round_to=content.get("round_to"))
    return from_json(content, graph, path, made_by, round_to=1)


def from_json(content, graph, source, made_by=None, round_to=None):
    """The Plan of a plan file's content, checked against the net (``graph``): names, counts, the widths it
    was made for and the channels it chose; ``made_by`` and ``round_to`` default to the content's own."""
    table, widths, kept = content.get("keep"), content.get("channels", {}), content.get("kept_channels") or {}
    if not isinstance(table, dict) or not isinstance(widths, dict):
        raise PruneError("%s is not a plan file: it needs a JSON object with a 'keep' table "
                         "{group: channels kept}" % source)
    if not table:
        raise PruneError("%s: the plan's 'keep' table is empty; nothing to prune" % source)
    if not isinstance(kept, dict) or not all(isinstance(v, list) for v in kept.values()):
        raise PruneError("%s: 'kept_channels' must be {group: [channel, ...]}" % source)
    kept = {group_of(graph, n).id: v for n, v in kept.items()}
    for gid, chans in kept.items():
        if not all(isinstance(c, int) and 0 <= c < graph[gid].channels for c in chans) or len(set(chans)) < len(chans):
            raise PruneError("%s: 'kept_channels' of %r must be distinct channels 0..%d"
                             % (source, gid, graph[gid].channels - 1))
    made_by = content.get("made_by") if made_by is None else made_by
    round_to = content.get("round_to", 1) if round_to is None else round_to
    plan = make_plan(graph, table, made_by, round_to, kept, source=source)
    for name, width in widths.items():
        if name in table and width != group_of(graph, name).channels:
            raise PruneError("%s: group %r has %d channels in %s, not %r: the plan was made for another net"
                             % (source, name, group_of(graph, name).channels, graph.source, width))
    return plan


def global_ranking(scores):
    """All (group id, channel) pairs, least important first, for one cut across groups (Taylor's step);
    ties in group order, then channel order.  ``scores``: {group id: per-channel scores comparable across
    groups}."""
    pairs = [(float(s), order, gid, c) for order, (gid, values) in enumerate(scores.items())
             for c, s in enumerate(values)]
    return [(gid, c) for _, _, gid, c in sorted(pairs)]
