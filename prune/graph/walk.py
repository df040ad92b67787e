"""The walk over the TEST-phase layers that finds the channel groups, and ``build_graph``.

The channel axis (axis 1) of every blob is a list of segments, each a run of
channels of one *atom* (the channels one producer made).  Each layer's rule
(prune.graph.rules) says how its tops' segments follow from its bottoms'
and which parameter slices it owns; a union-find over atoms joins what an
Eltwise or a depthwise conv ties together.  At the end every atom's root is
one group.
"""
import os
from collections import OrderedDict

from .phase import phase_view
from .records import Blob, BlobSlice, Graph, GraphError, Group, Seg, layout
from .rules import ONE_BOTTOM, RULES, SOURCES


class Walk:
    """One pass over the TEST-phase layers; holds the union-find over atoms."""

    def __init__(self, source):
        self.source = source
        self.parent, self.n, self.origin, self.reasons = [], [], [], []
        self.records = []            # (atom, role, Slice/Consumer/BlobSlice)
        self.shapes = OrderedDict()  # blob -> last shape seen
        self.param_shapes = OrderedDict()
        self.counts = OrderedDict()  # layer -> (field, top segs) that surgery resizes
        self.pending = []            # unknown layers: (layer, bottom atoms)

    # union-find
    def atom(self, n, origin):
        self.parent.append(len(self.parent))
        self.n.append(n)
        self.origin.append(origin)
        self.reasons.append([])
        return len(self.parent) - 1

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
            for s in blob.segs or ():
                root = self.find(s.atom)
                if reason not in self.reasons[root]:
                    self.reasons[root].append(reason)

    def tie(self, layer, blobs):
        """Join the channel spaces of blobs that must keep the same channels."""
        spaces = [b for b in blobs if b.segs is not None]
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
        for s, start in layout(blob.segs or ()):
            self.records.append((s.atom, role, make(start, s.block)))

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
            bots.append(current[name])
            if name in order:
                order.remove(name)
        rule = RULES.get(layer.type)
        if layer.type in ONE_BOTTOM and len(bots) != 1:
            raise w.error(layer, "takes one bottom blob, not %d" % len(bots))
        if rule is None:
            w.pending.append((layer, [s.atom for b in bots for s in b.segs or ()]))
            tops = [Blob(None, None)] * len(layer.top)
        else:
            if not bots and layer.type not in SOURCES:
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
        if root not in by_root:
            gid = w.origin[atom]
            by_root[root] = groups[gid] = Group(gid, w.n[root], reasons=list(w.reasons[root]))
    seen = set()
    for atom, role, rec in w.records:
        group = by_root[w.find(atom)]
        key = (group.id, role, rec)
        if key not in seen:  # a blob name rewritten in place is recorded once
            seen.add(key)
            getattr(group, role).append(rec)
    for layer, atoms in w.pending:
        live = [by_root[w.find(a)] for a in atoms if not by_root[w.find(a)].reasons]
        if live:
            raise w.error(layer, "unknown layer type, and prunable channels (group %r) reach it; "
                                 "the channel graph only knows: %s" % (live[0].id, ", ".join(sorted(RULES))))
    counts = OrderedDict((name, (kind, [(by_root[w.find(s.atom)].id, s.n, s.block) for s in blob.segs]))
                         for name, (kind, blob) in w.counts.items())
    return Graph(groups, w.shapes, w.param_shapes, counts, outputs, w.source)
