"""Channel-dependency groups of a Caffe net, from its NetParameter alone.

A *group* is a set of channels that must disappear together: removing
channel c of a group removes row c of every producer (conv/fc outputs), entry
c of every per-channel passenger (PReLU, BatchNorm, Scale, depthwise conv ...)
and input channel c (or its H*W block of columns) of every consumer (the
first channel-mixing layers downstream, the ones a ThiNet-style selector
reconstructs).

How it is found (in the spirit of Torch-Pruning's dependency graph): the
layers of the TEST-phase view are walked in order; the channel axis (axis 1)
of every blob is described as a list of segments, each a run of channels of
one *atom* (the channels one producer made). Each layer type has a rule
(``RULES``, prune.graph.rules; ``register_rule`` adds one for a new type) saying how its tops' segments follow from its bottoms' and which
parameter slices it owns; a union-find over atoms joins what an Eltwise or a
depthwise conv ties together. Layers that end prunable flow (losses, Softmax,
Python layers, the net's outputs and inputs) mark what reaches them
unprunable, with a reason. No rule is specific to one network.

Blob shapes are inferred here too (Caffe's own formulas), because an
InnerProduct consumer needs H*W per channel and the surgery checks weights
against the shapes the pruned net will ask for; tests compare them with
real Caffe.

The parts: ``records`` (Slice, Consumer, BlobSlice, Group, Graph), ``phase``
(the layers of one phase), ``shapes`` (blob shapes), ``rules`` (one per
layer type, and how to register one) and ``walk`` (the pass and
``build_graph``).
"""
from .phase import phase_view
from .records import (Blob, BlobSlice, Consumer, Graph, GraphError, Group, Seg, Slice, block_indices,  # noqa: F401
                      layout)
from .rules import RULES, SOURCES, passenger, register_rule  # noqa: F401
from .shapes import conv_geometry, conv_output, data_shapes  # noqa: F401
from .walk import Walk, build_graph  # noqa: F401
