"""The walk over the TEST-phase layers that finds the channel groups, and ``build_graph``.

The channel axis (axis 1) of every blob is a list of segments, each a run of
channels of one *atom* (the channels one producer made).  Each layer's rule
(prune.graph.rules) says how its tops' segments follow from its bottoms'
and which parameter slices it owns; a union-find over atoms joins what an
Eltwise or a depthwise conv ties together, and a channel-axis Slice that
cuts inside an atom splits it (and everything tied to it) into two.  At the
end every atom's root is one group.  A layer type without a rule (a Caffe
fork's layer) is a fixed point: what reaches it keeps its channels, the
rest of the net stays prunable.
"""
import dataclasses
import os
from collections import OrderedDict

from base.proto import superset

from .phase import phase_view
from .records import Blob, BlobSlice, Graph, GraphError, Group, Seg, layout
from .rules import ONE_BOTTOM, RULES, SOURCES, rule_unknown


class Walk:
    """One pass over the TEST-phase layers; holds the union-find over atoms."""

    def __init__(self, source):
        self.source = source
        self.parent, self.n, self.origin, self.reasons = [], [], [], []
        self.records = []            # (atom, role, Slice/Consumer/BlobSlice)
        self.shapes = OrderedDict()  # blob -> last shape seen
        self.param_shapes = OrderedDict()
        self.counts = OrderedDict()  # layer -> (field, top segs) that surgery resizes
        self.parts = {}              # a split atom -> its two parts
        self.offset = []             # atom -> its first channel's index among its producer's channels

    # union-find
    def atom(self, n, origin, offset=0):
        self.parent.append(len(self.parent))
        self.n.append(n)
        self.origin.append(origin)
        self.offset.append(offset)
        self.reasons.append([])
        return len(self.parent) - 1

    def name(self, a):
        """Group id of an atom: its producer, and where its channels start there when not at 0."""
        return self.origin[a] if not self.offset[a] else "%s@%d" % (self.origin[a], self.offset[a])

    def find(self, a):
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a, b):
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        if a > b:
            a, b = b, a
        self.parent[b] = a
        self.n[a] = self.n[a] if self.n[a] is not None else self.n[b]
        self.reasons[a] += [r for r in self.reasons[b] if r not in self.reasons[a]]

    def refuse(self, blobs, reason):
        for blob in blobs:
            for s in self.resolve(blob).segs or ():
                root = self.find(s.atom)
                if reason not in self.reasons[root]:
                    self.reasons[root].append(reason)

    def tie(self, layer, blobs):
        """Join the channel spaces of blobs that must keep the same channels."""
        spaces = [self.resolve(b) for b in blobs if b.segs is not None]
        if len(spaces) < len(blobs):
            self.refuse(spaces, "%s %r mixes it with a blob of unknown channels" % (layer.type, layer.name))
            return
        first = [(s.n, s.block) for s in spaces[0].segs]
        if any([(s.n, s.block) for s in b.segs] != first for b in spaces[1:]):
            self.refuse(spaces, "%s %r joins differently composed channel spaces" % (layer.type, layer.name))
            return
        for b in spaces[1:]:
            for s, t in zip(spaces[0].segs, b.segs):
                self.union(s.atom, t.atom)

    def record(self, role, blob, make):
        """One record per segment of ``blob``: make(start, block) -> Slice."""
        for s, start in layout(self.resolve(blob).segs or ()):
            self.records.append((s.atom, role, make(start, s.block)))

    def resolve(self, blob):
        """``blob`` with every split atom replaced by its parts."""
        if blob.segs is None or not self.parts or not any(s.atom in self.parts for s in blob.segs):
            return blob
        segs = []
        for s in blob.segs:
            if s.atom in self.parts:
                segs += self.resolve(Blob([Seg(a, self.n[a], s.block) for a in self.parts[s.atom]], None)).segs
            else:
                segs.append(s)
        return Blob(segs, blob.shape)

    def split(self, atom, k):
        """Cut the channels of ``atom`` and of every atom tied to it at channel k: two new atoms each, tied as
        the old ones were; every record of the old atoms moves to the part holding its channels."""
        root = self.find(atom)
        members = [a for a in range(len(self.parent)) if a not in self.parts and self.find(a) == root]
        firsts, seconds = [], []
        for a in members:
            first = self.atom(k, self.origin[a], self.offset[a])
            second = self.atom(self.n[a] - k, self.origin[a], self.offset[a] + k)
            self.parts[a] = (first, second)
            self.reasons[first], self.reasons[second] = list(self.reasons[root]), list(self.reasons[root])
            firsts.append(first)
            seconds.append(second)
        for part in (firsts, seconds):
            for other in part[1:]:
                self.union(part[0], other)
        moved = []
        for a, role, rec in self.records:
            if a not in self.parts:
                moved.append((a, role, rec))
                continue
            first, second = self.parts[a]
            moved.append((first, role, rec))
            shifted = rec if rec.start is None else dataclasses.replace(rec, start=rec.start + k * rec.block)
            moved.append((second, role, shifted))
        self.records = moved

    def cut(self, layer, blob, bounds):
        """The segments of ``blob`` between consecutive entry positions ``bounds`` along axis 1 (one list per
        part), splitting atoms a bound falls inside; None (and the channels refused) when a bound falls
        inside one channel's block or a channel count is unknown."""
        for point in bounds[1:-1]:
            for s, start in layout(self.resolve(blob).segs):
                if start is None or s.n is None:
                    self.refuse([blob], "Slice %r cuts channels of unknown count" % layer.name)
                    return None
                if start < point < start + s.n * s.block:
                    if (point - start) % s.block:
                        self.refuse([blob], "Slice %r cuts inside one channel's %d entries" % (layer.name, s.block))
                        return None
                    self.split(s.atom, (point - start) // s.block)
                    break
        parts, segs = [], layout(self.resolve(blob).segs)
        for lo, hi in zip(bounds, bounds[1:]):
            parts.append([s for s, start in segs if lo <= start < hi])
        return parts

    def new_space(self, layer, n, top=0):
        name = layer.name if len(layer.top) == 1 else "%s/%s" % (layer.name, layer.top[top])
        return [Seg(self.atom(n, name), n, 1)]

    def error(self, layer, message):
        return GraphError("%s: layer %r (%s): %s" % (self.source, layer.name, layer.type, message))


def build_graph(net, source=None):
    """Channel-dependency groups of a NetParameter (or a prototxt path)."""
    if isinstance(net, (str, os.PathLike)):
        from base import caffe_io
        source = source or os.fspath(net)
        net = caffe_io.read_net(net)
    net = superset(net)   # a stock message (pycaffe's NetSpec) has no fork fields to ask about
    source = source or "net %r" % net.name
    if len(net.layers):
        raise GraphError("%s: legacy V1 'layers'; read it with base.caffe_io.read_net, which upgrades it" % source)
    layers, dropped = phase_view(net)
    w = Walk(source)
    current, order = {}, []  # blob name -> Blob; blobs not yet consumed (net outputs at the end)
    names = set()
    for layer in layers:
        if layer.name in names:
            raise w.error(layer, "a second layer of that name (weights are matched by layer name)")
        names.add(layer.name)
        bots = []
        for name in layer.bottom:
            if name not in current:
                raise w.error(layer, "reads blob %r, which no earlier layer produces" % name)
            bots.append(w.resolve(current[name]))
            if name in order:
                order.remove(name)
        rule = RULES.get(layer.type, rule_unknown)
        if layer.type in ONE_BOTTOM and len(bots) != 1:
            raise w.error(layer, "takes one bottom blob, not %d" % len(bots))
        if not bots and layer.type not in SOURCES and layer.type in RULES:
            raise w.error(layer, "has no bottom blob")
        tops = rule(w, layer, bots)
        for name, top in zip(layer.top, tops):
            current[name] = top
            w.shapes[name] = top.shape
            if top.segs is not None:
                w.record("blobs", top, lambda start, block, name=name: BlobSlice(name, start, block))
            if name not in order:
                order.append(name)
    for name in order:
        w.refuse([current[name]], "reaches the net output %r" % name)
    for layer in dropped:
        w.refuse([current[b] for b in layer.bottom if b in current],
                 "read by layer %r outside the TEST phase" % layer.name)
    refuse_shared_params(w, layers)
    return collect_groups(w, net, layers, order)


def refuse_shared_params(w, layers):
    owners = {}
    for layer in layers:
        for p in layer.param:
            if p.name:
                owners.setdefault(p.name, set()).add(layer.name)
    shared = {name for names in owners.values() if len(names) > 1 for name in names}
    for atom, role, rec in w.records:
        if role != "blobs" and rec.layer in shared:
            w.refuse([Blob([Seg(atom, None, 1)], None)], "layer %r shares its parameters with another layer"
                     % rec.layer)


def collect_groups(w, net, layers, outputs):
    groups, by_root = OrderedDict(), {}
    for atom in range(len(w.parent)):
        root = w.find(atom)
        if root not in by_root and atom not in w.parts:
            gid = w.name(atom)
            by_root[root] = groups[gid] = Group(gid, w.n[root], reasons=list(w.reasons[root]))
    seen = set()
    for atom, role, rec in w.records:
        group = by_root[w.find(atom)]
        key = (group.id, role, rec)
        if key not in seen:  # a blob name rewritten in place is recorded once
            seen.add(key)
            getattr(group, role).append(rec)
    def ids(blob):
        return [(by_root[w.find(s.atom)].id, s.n, s.block) for s in w.resolve(blob).segs]
    def known(blob):   # a count over channels a fixed point made (unknown segments) stays as written
        return all(b.segs is not None for b in (blob if isinstance(blob, list) else [blob]))
    counts = OrderedDict((name, (kind, [ids(b) for b in blob] if isinstance(blob, list) else ids(blob)))
                         for name, (kind, blob) in w.counts.items() if known(blob))
    return Graph(groups, w.shapes, w.param_shapes, counts, outputs, w.source)
