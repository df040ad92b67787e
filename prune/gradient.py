"""The loss gradient per channel from Caffe's own backward pass: the first-order Taylor terms of channel
importance (Molchanov et al., ICLR 2017) that the ``taylor`` criterion (prune.criteria.taylor) ranks and
``python -m apps.taylor`` prunes by, step after step.

Removing channel c of a group makes every consumer of the group read zero in
that channel (that is exactly what prune.surgery produces). To first order
the loss then changes by

    L(pruned) - L  ~  -sum over consumers k, images, positions of  a_k[c] * dL/da_k[c]

where a_k is the blob consumer k reads and dL/da_k the gradient that flows
back through consumer k alone. ``taylor_terms`` returns that signed sum per
channel, averaged over batches (Caffe's losses already average over the
images of a batch, so the term of one batch is the first-order loss change
on it); ``taylor_scores`` takes its absolute value and L2-normalises it per
group (Molchanov's layer-wise normalisation), so channels of all groups can
be ranked together by ``prune.policy.global_ranking``.

Which blob: the one the consumer reads, as Caffe feeds it. With in-place
layers (conv -> BatchNorm -> Scale -> PReLU all writing blob ``conv1``) the
blob's data after the forward pass is the last in-place output, which the
consumer reads; its diff, however, is overwritten by the in-place layers'
own backward (after a full backward it is the gradient of the conv output).
So the backward pass is run in segments and each consumer's input gradient
is read right after that consumer's backward, before any earlier layer can
overwrite it. Where several layers read a blob Caffe inserts a Split and the
consumer reads its own split top, whose diff holds the gradient through that
consumer only. For a group with one consumer this is Molchanov's criterion
on the activation the next layer sees; for a residual stream group it sums
over every conv that reads the stream (the Eltwise sums that carry the stream
on are not consumers: their share reaches the later consumers anyway).

The sum runs over positions rather than averaging them; the per-group L2
normalisation removes that constant factor except between consumers of
different resolutions in one group, where the sum is the loss change.

Without labels (``python -m prune --criterion taylor``, prune.sensitivity)
``gradient_terms`` runs the current deploy net with ``force_backward`` and
sets the gradient of ``MirrorDistillation`` (towards the unpruned net) at its
outputs; Caffe does the backward pass. The Taylor criterion
(prune.criteria.taylor) turns either kind of terms into scores.

    net = caffe.Net("train.prototxt", caffe.TRAIN)      # any net with a loss
    scores = taylor_scores(net, build_graph(deploy).prunable(), batches=20)
    for gid, channel in global_ranking(scores)[:k]: ...  # the k least important
"""
from collections import OrderedDict, defaultdict

import numpy as np

from base.errors import ToolkitError


class GradientError(ToolkitError):
    """A group whose consumers the given net does not have, or that gets no gradient."""


def _consumer_bottom(net, consumer):
    """Name of the blob Caffe feeds ``consumer`` (its split top when Caffe inserted one)."""
    bottoms = net.bottom_names[consumer.layer]
    if len(bottoms) == 1:
        return bottoms[0]
    found = [b for b in bottoms if b == consumer.bottom or (
        b.startswith(consumer.bottom + "_") and "_split_" in b[len(consumer.bottom):])]
    if len(found) != 1:
        raise GradientError("layer %r reads %s; cannot tell which one is blob %r"
                          % (consumer.layer, ", ".join(bottoms), consumer.bottom))
    return found[0]


def _per_input(a, g, consumer):
    """sum over images and positions of a*g, one value per entry of the consumer's weight input axis."""
    if consumer.type == "InnerProduct":
        return (a.reshape(a.shape[0], -1) * g.reshape(g.shape[0], -1)).sum(0)
    n, c = a.shape[:2]
    return np.einsum("ncp,ncp->c", a.reshape(n, c, -1), g.reshape(n, c, -1))


class _Plan:
    """Where each consumer of each group sits in the net, and its backward segments."""

    def __init__(self, net, groups):
        names = list(net._layer_names)
        self.groups = list(groups)
        self.taps = defaultdict(list)  # layer index -> [(group id, channels, consumer, blob)]
        for g in self.groups:
            if not g.consumers:
                raise GradientError("group %r has no consumer layer: nothing reads its channels" % g.id)
            for c in g.consumers:
                if c.layer not in names:
                    raise GradientError("group %r: consumer layer %r is not in the net" % (g.id, c.layer))
                self.taps[names.index(c.layer)].append((g.id, g.channels, c, _consumer_bottom(net, c)))
        self.names = names

    def blobs(self):
        return {blob for taps in self.taps.values() for *_, blob in taps}


def _run_batch(net, plan, feed, sums, top_diffs=None):
    """One forward + segmented backward; adds each group's per-channel sum of a*g to ``sums``.
    ``top_diffs(net, feed)``, when given, returns {output blob: dL/d(blob)} of a loss computed outside the
    net, after the forward pass of ``feed``."""
    for name, value in (feed or {}).items():
        if name not in net.blobs:
            raise GradientError("batch has blob %r, which the net does not have" % name)
        if net.blobs[name].data.shape != np.shape(value):
            net.blobs[name].reshape(*np.shape(value))
        net.blobs[name].data[...] = value
    net.forward()
    for blob in plan.blobs():  # a consumer that does not back-propagate must leave 0, not a stale diff
        net.blobs[blob].diff[...] = 0
    for blob, diff in (top_diffs(net, feed) if top_diffs else {}).items():
        net.blobs[blob].diff[...] = diff
    start = len(plan.names) - 1
    for index in sorted(plan.taps, reverse=True):
        net.backward(start=plan.names[start], end=plan.names[index])
        start = index - 1
        for gid, channels, consumer, blob in plan.taps[index]:
            b = net.blobs[blob]
            v = _per_input(b.data, b.diff, consumer)
            sums[gid] += v[consumer.indices(np.arange(channels))].reshape(channels, consumer.block).sum(1)


def taylor_terms(net, groups, batches, top_diffs=None, progress=True):
    """{group id: signed sum of a*dL/da per channel, mean over batches} (see the module doc).

    net: caffe.Net with a loss (TRAIN or TEST phase) holding the weights to score, or any net with
    ``force_backward`` and ``top_diffs`` giving the gradient of a loss at its outputs.
    groups: prune.graph Groups (e.g. ``build_graph(deploy).prunable()``); their
    consumer layers must be in ``net`` under the same names.
    batches: a number of batches the net's own data layers fetch, or an
    iterable of {input blob: array} fed to the net's Input layers.
    """
    from tqdm import tqdm
    plan = _Plan(net, groups)
    sums = OrderedDict((g.id, np.zeros(g.channels, dtype=np.float64)) for g in plan.groups)
    count = 0
    feeds = [None] * int(batches) if isinstance(batches, (int, np.integer)) else batches
    for feed in tqdm(feeds, desc="taylor", unit="batch", leave=False, disable=not progress):
        _run_batch(net, plan, feed, sums, top_diffs)
        count += 1
    if not count:
        raise GradientError("no batches to score with")
    dead = [gid for gid, s in sums.items() if not np.any(s)]
    if dead:
        raise GradientError("no gradient reaches group(s) %s: does the net have a loss, and do the layers above "
                          "them back-propagate (learnable parameters or force_backward: true)?" % ", ".join(dead))
    return OrderedDict((gid, s / count) for gid, s in sums.items())


def taylor_scores(net, groups, batches):
    """{group id: per-channel importance}: the Taylor criterion's scores of ``taylor_terms``
    (|term|, L2-normalised per group, so they rank across groups)."""
    from prune.criteria.taylor import Taylor
    from prune.sample import Evidence
    groups = list(groups)
    terms = taylor_terms(net, groups, batches)
    return OrderedDict((g.id, Taylor().scores(Evidence(group=g, weights=None, taylor=terms[g.id]))) for g in groups)


# ------------------------------------------------------------------ the label-free loss of the prune driver

def _unit(x):
    x = x.reshape(x.shape[0], -1).astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _outputs(net, x):
    net.blobs[net.inputs[0]].reshape(*x.shape)
    net.blobs[net.inputs[0]].data[...] = x
    net.forward()
    return {o: np.array(net.blobs[o].data) for o in net.outputs}


class MirrorDistillation:
    """``top_diffs`` of the label-free loss: for every output f of the net,
    L = 1/(2N) sum over images of ||f/|f| - t/|t|||^2 with t the teacher's (the unpruned net's) mean output
    on the image and its mirror -- finetune's distillation head as apps.taylor scores with it.  The mirror
    matters: towards the teacher's own output of the same view the unpruned net has a loss of exactly zero,
    and so zero gradient everywhere."""

    def __init__(self, teacher):
        self.teacher = teacher

    def __call__(self, net, feed):
        x = feed[net.inputs[0]]
        plain = _outputs(self.teacher, x)
        mirrored = _outputs(self.teacher, np.ascontiguousarray(x[..., ::-1]))
        diffs = {}
        for o in net.outputs:
            f = np.asarray(net.blobs[o].data, dtype=np.float64).reshape(x.shape[0], -1)
            u, t = _unit(f), _unit(plain[o] + mirrored[o])
            g = u - t
            g = (g - u * np.sum(g * u, axis=1, keepdims=True)) / np.maximum(
                np.linalg.norm(f, axis=1, keepdims=True), 1e-12)    # through f -> f/|f|
            diffs[o] = (g / x.shape[0]).reshape(net.blobs[o].diff.shape)
        return diffs


def gradient_terms(net_param, weights, groups, images, teacher, progress=False):
    """{group id: taylor_terms} of the current net (``net_param`` + ``weights``, any deploy net) under
    ``MirrorDistillation`` towards ``teacher`` (a caffe.Net of the unpruned net), over ``images`` (an
    iterable of (N, C, H, W) float32 batches).  Caffe back-propagates; numpy computes only the loss's
    gradient at the outputs."""
    from base import caffe_io
    param = type(net_param)()
    param.CopyFrom(net_param)
    param.force_backward = True
    net = caffe_io.runnable_net(param, weights)
    data = net.inputs[0]
    return taylor_terms(net, groups, ({data: x} for x in images), MirrorDistillation(teacher), progress)
