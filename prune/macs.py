"""MACs of a net for any number of kept channels per group, without surgery.

A Convolution, Deconvolution or InnerProduct costs (weight size) x (output
positions) multiply-accumulates (prune.stats).  Pruning a group shortens
axis 0 of the weights it produces or carries (depthwise convs) and axis 1 of
the weights that read it, so a layer's MACs scale with the kept shares of
both axes.  ``MacsModel(net).macs({group: kept})`` is therefore exact for the
first-channels surgery prune.stats would measure, at the cost of a sum over
layers: what an allocator needs to try thousands of plans.
"""
from collections import defaultdict

import numpy as np

from prune.graph import build_graph


class MacsModel:
    """The allocator's cost model in MACs: ``cost(kept)`` (= ``macs``), ``share(kept)``, ``total``,
    ``channels()``; prune.latency.LatencyModel has the same interface in milliseconds."""

    unit = "MACs"

    def __init__(self, net, graph=None, source="net"):
        from prune.stats import net_stats
        self.graph = graph or build_graph(net, source=source)
        stats = net_stats(net)
        self.total = stats.macs
        self.layers = {}
        cuts = defaultdict(list)
        for g in self.graph.prunable():
            for s in g.producers + g.passengers + g.consumers:
                if s.blob == 0 and s.axis in (0, 1):
                    cuts[s.layer].append((g.id, s.axis, s.block))
        for rec in stats.layers:
            if rec.macs:
                shape = self.graph.param_shapes[rec.name][0]
                self.layers[rec.name] = (rec.macs, shape[0], int(np.prod(shape[1:2])), cuts.get(rec.name, []))

    def channels(self):
        """{group id: channels} of the prunable groups."""
        return {g.id: g.channels for g in self.graph.prunable()}

    def macs(self, kept):
        """Total MACs with ``kept`` = {group id: number of channels kept} (others whole)."""
        return sum(self.per_layer(kept).values())

    def per_layer(self, kept):
        """{layer: MACs} with ``kept`` channels of each group."""
        out = {}
        for name, (macs, rows, cols, cuts) in self.layers.items():
            dims = [rows, cols]
            for gid, axis, block in cuts:
                if gid in kept:
                    dims[axis] -= (self.graph[gid].channels - kept[gid]) * block
            out[name] = macs * dims[0] / rows * dims[1] / cols
        return out

    def cost(self, kept):
        """The cost the allocator weighs (prune.sensitivity.allocate): the MACs."""
        return self.macs(kept)

    def share(self, kept):
        return self.macs(kept) / self.total
