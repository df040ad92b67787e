"""The records of a channel graph: where a group's channels live, the groups, the graph.

Group channel c owns, in every slice, the indices ``start + c*block ..
start + (c+1)*block - 1`` along the slice's axis.  ``Blob`` and ``Seg`` are
how the walk describes a blob's channel axis: a list of segments, each a
run of ``n`` channels of one atom (the channels one producer made), ``block``
entries per channel.
"""
from collections import OrderedDict, namedtuple
from dataclasses import dataclass, field

import numpy as np

from base.errors import ToolkitError


class GraphError(ToolkitError):
    """A net the channel graph cannot analyse (named layer, type and file)."""


def block_indices(start, block, channels):
    """Channel c owns start + c*block .. start + (c+1)*block - 1."""
    channels = np.asarray(channels, dtype=np.int64).reshape(-1, 1)
    return (start + channels * block + np.arange(block)).ravel()


@dataclass(frozen=True)
class Slice:
    """Where a group's channels live along one axis of one parameter blob.

    Group channel c owns indices ``start + c*block .. start + (c+1)*block - 1``
    along ``axis`` of blob ``blob`` of layer ``layer``.
    """
    layer: str
    type: str
    blob: int
    axis: int
    start: int
    block: int = 1

    def indices(self, channels):
        """Indices along ``axis`` owned by the given group channels (in that order)."""
        return block_indices(self.start, self.block, channels)


@dataclass(frozen=True)
class Consumer(Slice):
    """A channel-mixing layer reading the group: its weight (blob 0) input axis.

    ``bottom`` is the blob the consumer reads (what a sampler records). For a
    Convolution, group channel c is input channel ``start + c`` (block 1);
    for an InnerProduct it owns the ``block`` (= H*W) consecutive input
    columns from ``start + c*block``.
    """
    bottom: str = ""


@dataclass(frozen=True)
class BlobSlice:
    """Where a group's channels live along axis 1 of an activation blob."""
    blob: str
    start: int
    block: int = 1

    def indices(self, channels):
        return block_indices(self.start, self.block, channels)


@dataclass
class Group:
    id: str
    channels: int
    producers: list = field(default_factory=list)    # [Slice] output rows (weights and biases)
    passengers: list = field(default_factory=list)   # [Slice] per-channel parameters carried along
    consumers: list = field(default_factory=list)    # [Consumer]
    blobs: list = field(default_factory=list)        # [BlobSlice]
    reasons: list = field(default_factory=list)      # why not prunable (empty: prunable)

    @property
    def prunable(self):
        return not self.reasons

    def layers(self, role):
        """Layer names of producers/passengers/consumers, in net order, once each."""
        return list(OrderedDict.fromkeys(s.layer for s in getattr(self, role)))

    def to_dict(self):
        def rows(items):
            return [dict(vars(s)) for s in items]
        return dict(id=self.id, channels=self.channels, prunable=self.prunable, reasons=list(self.reasons),
                    producers=rows(self.producers), passengers=rows(self.passengers),
                    consumers=rows(self.consumers), blobs=rows(self.blobs))


# A blob as the walk sees it: segments of its channel axis (None: no channel
# space worth tracking) and its shape (None: unknown).
Blob = namedtuple("Blob", "segs shape")
Seg = namedtuple("Seg", "atom n block")


def layout(segs):
    """[(seg, start)] with start the index along axis 1 of the seg's first entry."""
    out, start = [], 0
    for s in segs:
        out.append((s, start))
        start = None if start is None or s.n is None else start + s.n * s.block
    return out


class Graph:
    """The groups of one net (TEST phase): ``graph.groups[id]``, ``graph.prunable()``.

    Also kept for the surgery: ``shapes`` (blob -> inferred shape),
    ``param_shapes`` (layer -> shapes of its parameter blobs) and ``counts``
    (layer -> how its num_output/group/reshape dim follows from its groups).
    """

    def __init__(self, groups, shapes, param_shapes, counts, outputs, source):
        self.groups, self.shapes, self.param_shapes = groups, shapes, param_shapes
        self.counts, self.outputs, self.source = counts, outputs, source

    def prunable(self):
        return [g for g in self.groups.values() if g.prunable]

    def __getitem__(self, gid):
        return self.groups[gid]

    def size(self, segs, kept):
        """Entries along axis 1 of a blob after pruning; kept: {group id: channel count}."""
        return sum(kept.get(gid, n) * block for gid, n, block in segs)

    def consumers_of(self, layer):
        """(group, consumer) pairs for one consumer layer, in input-channel order."""
        found = [(g, c) for g in self.groups.values() for c in g.consumers if c.layer == layer]
        return sorted(found, key=lambda gc: gc[1].start)
