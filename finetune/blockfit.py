"""Block-wise reconstruction: each block of a pruned net fitted by SGD to the unpruned net's block output.

The closed-form step refits each consumer of a cut group by least squares,
one linear layer at a time.  A block (the layers between two points where a
single blob carries everything forward: a residual unit, a bottleneck) can
do more with all its weights at once, through its nonlinearities.  Here the
pruned net's blocks are fitted in network order, each on its own:

    input:  what the pruned net (blocks before already fitted) feeds the block
    target: the unpruned net's output of the same block on the same images
            (its kept channels, where the block's output stream was pruned)
    loss:   squared error relative to the target's energy (Caffe's
            EuclideanLoss with a loss weight), Caffe's Adam solver

A block's forward and backward are a fraction of the whole net's, and its
inputs are cached once per block, so a pass over the images per block costs
about one forward and backward of the whole net: no SGD runs through the
net, and no labels are needed.  A block whose fit does not lower the error
on held-out images keeps its weights.  The blocks are cut at the blobs that
are the only live blob between two layers (``cut_points``); frozen BatchNorm
stays frozen (``use_global_stats``), everything else with weights learns.
"""
import os
import sys
import tempfile

import numpy as np

from base import caffe_io
from base.errors import ToolkitError
from base.netinput import input_layer
from base.proto import caffe_pb2


class BlockFitError(ToolkitError):
    pass


def cut_points(net):
    """[(layer index, blob)]: after layer i, ``blob`` is the only blob a later layer still reads."""
    layers = list(net.layer)
    last_read = {}
    for k, layer in enumerate(layers):
        for b in layer.bottom:
            last_read[b] = k
    cuts, live = [], set()
    for i, layer in enumerate(layers):
        live.update(layer.top)
        live = {b for b in live if last_read.get(b, -1) > i}
        if len(live) == 1 and layer.type != "Input" and i < len(layers) - 1:
            cuts.append((i, next(iter(live))))
    return cuts


def blocks(net, min_layers=3):
    """[(input blob, output blob, layer indices)] between consecutive cut points (short runs merged forward),
    the last one ending at the net's output."""
    cuts = cut_points(net)
    inp = input_layer(net)[0]
    start, source, found = list(net.layer).index(inp) + 1, inp.top[0], []
    for i, blob in cuts:
        if i + 1 - start >= min_layers:
            found.append((source, blob, list(range(start, i + 1))))
            start, source = i + 1, blob
    if start < len(net.layer):
        found.append((source, net.layer[-1].top[0], list(range(start, len(net.layer)))))
    return found


def block_net(net, indices, source, shape, target=None):
    """A net of the block's layers reading Input ``source`` of ``shape``; with ``target`` = (blob, shape,
    loss weight) an EuclideanLoss of the block's output against an Input 'target'."""
    out = caffe_pb2.NetParameter(name="block")
    inp = out.layer.add(name=source, type="Input", top=[source])
    inp.input_param.shape.add().dim.extend(shape)
    for k in indices:
        layer = out.layer.add()
        layer.CopyFrom(net.layer[k])
        if layer.type == "BatchNorm":   # frozen, as in the deploy net (Caffe would use batch statistics in TRAIN)
            layer.batch_norm_param.use_global_stats = True
    if target is not None:
        blob, tshape, weight = target
        t = out.layer.add(name="target", type="Input", top=["target"])
        t.input_param.shape.add().dim.extend(tshape)
        loss = out.layer.add(name="block_loss", type="EuclideanLoss", bottom=[blob, "target"], top=["block_loss"])
        loss.loss_weight.append(weight)
    return out


def _forward(cnet, source, blob, x, batch):
    outs = []
    for s in range(0, len(x), batch):
        chunk = x[s:s + batch]
        cnet.blobs[source].reshape(*chunk.shape)
        cnet.blobs[source].data[...] = chunk
        cnet.forward()
        outs.append(cnet.blobs[blob].data.copy())
    return np.concatenate(outs)


def _error(cnet, source, blob, x, y, batch):
    """Relative squared error of the block's output against y."""
    pred = _forward(cnet, source, blob, x, batch)
    return float(((pred - y) ** 2).sum() / max((y ** 2).sum(), 1e-30))


def fit(student, weights, teacher, teacher_weights, images, out_map=None, epochs=4, lr=1e-4, batch=32,
        held_out=0.1, seed=0, progress=True):
    """New weights of ``student`` (NetParameter) with every block fitted; returns (weights, per-block record).

    images: a (N, C, H, W) float32 array fed to both nets; out_map: {layer: kept output channels} of the
    pruning (prune.driver's log), so a pruned stream's target is the teacher's kept channels."""
    import caffe
    from .solver import solver
    weights = {k: [np.array(a) for a in v] for k, v in weights.items()}
    t_layers = {l.name: l for l in teacher.layer}
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    n_val = max(1, int(round(held_out * len(images))))
    val, train = order[:n_val], order[n_val:]
    x_s = x_t = np.asarray(images, np.float32)
    record = []
    for b, (source, blob, indices) in enumerate(blocks(student)):
        names = [student.layer[k].name for k in indices]
        if any(n not in t_layers for n in names):
            raise BlockFitError("block %s..%s: the teacher has no layer %s" % (source, blob, next(
                n for n in names if n not in t_layers)))
        s_net = block_net(student, indices, source, [batch] + list(x_s.shape[1:]))
        t_net = block_net(teacher, [list(t_layers).index(n) for n in names], source, [batch] + list(x_t.shape[1:]))
        t_c = caffe_io.net_from_param(t_net)
        caffe_io.load_into(t_c, {n: teacher_weights[n] for n in names if n in teacher_weights})
        y = _forward(t_c, source, blob, x_t, batch)
        keep = kept_channels(student, blob, indices[-1], out_map or {})
        target = y[:, keep] if keep is not None else y
        s_c = caffe_io.net_from_param(s_net)
        if target.shape[1:] != s_c.blobs[blob].data.shape[1:]:
            raise BlockFitError("block %s -> %s: the pruned block gives %s, the unpruned one's kept channels %s"
                                % (source, blob, s_c.blobs[blob].data.shape[1:], target.shape[1:]))
        own = {n: weights[n] for n in names if n in weights}
        caffe_io.load_into(s_c, own)
        before = _error(s_c, source, blob, x_s[val], target[val], batch)
        tuned = _train_block(caffe, solver, student, indices, source, blob, x_s[train], target[train], own,
                             epochs, lr, batch, rng)
        caffe_io.load_into(s_c, tuned)
        after = _error(s_c, source, blob, x_s[val], target[val], batch)
        kept = after < before
        if kept:
            weights.update(tuned)
        else:
            caffe_io.load_into(s_c, own)
        record.append(dict(block=b, input=source, output=blob, layers=len(indices), error_before=before,
                           error_after=after, kept=kept))
        if progress:
            print("[blockfit] block %d %s -> %s: held-out error %.4f -> %.4f%s" % (
                b, source, blob, before, after, "" if kept else " (not better: weights kept)"), file=sys.stderr)
        x_s, x_t = _forward(s_c, source, blob, x_s, batch), y
    return weights, record


def kept_channels(net, blob, before, out_map):
    """The unpruned net's channels that ``blob`` (as layer ``before`` leaves it) still has, from the pruning's
    out_map {layer: kept output channels}: the map of the layer that wrote it, or, through layers that keep
    their input's channels (Eltwise, activations, BatchNorm), of what they read; None when it was never cut."""
    for k in range(before, -1, -1):
        layer = net.layer[k]
        if blob in layer.top:
            if layer.name in out_map:
                return list(out_map[layer.name])
            if layer.type in NEW_CHANNELS or not layer.bottom:
                return None
            return kept_channels(net, layer.bottom[0], k - 1, out_map)
    return None


# Layers whose output channels are their own (num_output), not their input's.
NEW_CHANNELS = ("Convolution", "Deconvolution", "InnerProduct", "Concat", "Slice", "Input")


def _train_block(caffe, solver, net, indices, source, blob, x, y, init, epochs, lr, batch, rng):
    """The block's weights after ``epochs`` of SGD on (x, y) in Caffe's solver."""
    n_iter = max(1, int(np.ceil(epochs * len(x) / batch)))
    energy = float(np.mean((y.reshape(len(y), -1) ** 2).sum(1)))
    # EuclideanLoss is 1/2 the mean squared distance per image: weighted by 2 / the target's energy it is the
    # relative error, the same scale in every block, so one learning rate fits all
    train = block_net(net, indices, source, [batch] + list(x.shape[1:]),
                      target=(blob, [batch] + list(y.shape[1:]), 2.0 / max(energy, 1e-30)))
    with tempfile.TemporaryDirectory() as tmp:
        path = caffe_io.write_net(train, os.path.join(tmp, "train.prototxt"))
        s = solver(path, n_iter, os.path.join(tmp, "snap"), base_lr=lr, lr_policy="multistep", gamma=0.1,
                   stepvalues=(max(1, int(n_iter * 0.75)),), weight_decay=0, type="Adam", momentum2=0.999)
        spath = caffe_io.atomic_write(os.path.join(tmp, "solver.prototxt"), caffe_io.net_to_text(s))
        adam = caffe.get_solver(spath)
        caffe_io.load_into(adam.net, init)
        perm = np.array([], dtype=np.int64)
        for _ in range(n_iter):
            if len(perm) < batch:
                perm = np.concatenate([perm, rng.permutation(len(x))])
            pick, perm = perm[:batch], perm[batch:]
            adam.net.blobs[source].data[...] = x[pick]
            adam.net.blobs["target"].data[...] = y[pick]
            adam.step(1)
        return {name: [b.data.copy() for b in blobs] for name, blobs in adam.net.params.items()}
