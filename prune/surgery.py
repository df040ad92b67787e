"""Remove channels from a Caffe net: the pruned NetParameter and weights.

    net2, weights2 = prune_net(net, weights, {"conv2_1": kept, ...})
    save_pruned(net2, weights2, "pruned.prototxt", "pruned.caffemodel",
                inputs=("net.prototxt", "net.caffemodel"))

``keep`` maps a group id (see prune.graph) to the channels that stay; groups
left out keep all their channels. Every producer row, passenger entry and
consumer input slice of a group is removed at once, num_output (and the
``group`` of a depthwise conv) follow. ``new_consumer_weights`` replaces the
weight (blob 0) of consumer layers, e.g. with ThiNet's least-squares rescale
of the kept input channels.
"""
import copy
import importlib
import os
from collections import OrderedDict, defaultdict

import numpy as np

from base import caffe_io, faults, netcheck
from base.errors import ToolkitError
from base.forks import DEPTHWISE_TYPES
from base.proto import superset
from prune.graph import build_graph, data_shapes, phase_view


class PlanError(ToolkitError):
    """A keep-list or a replacement weight that does not fit the net."""


def check_keep(graph, keep):
    """{group id: kept channels} -> {group id: sorted int array}, every mistake named."""
    plan = OrderedDict()
    for gid, kept in keep.items():
        if gid not in graph.groups:
            known = ", ".join(g.id for g in graph.prunable()[:12])
            raise PlanError("%s: no channel group %r (prunable groups: %s%s)"
                            % (graph.source, gid, known, ", ..." if len(graph.prunable()) > 12 else ""))
        group = graph.groups[gid]
        kept = np.asarray(list(kept))
        if kept.size and (kept.ndim != 1 or not np.issubdtype(kept.dtype, np.integer)):
            raise PlanError("group %r: kept channels must be integers, got %r" % (gid, kept.tolist()[:8]))
        kept = kept.astype(np.int64)
        if kept.size == group.channels and np.array_equal(np.sort(kept), np.arange(group.channels)):
            continue  # nothing removed: fine even for an unprunable group
        if not group.prunable:
            raise PlanError("group %r cannot be pruned: %s" % (gid, "; ".join(group.reasons)))
        if kept.size == 0:
            raise PlanError("group %r would lose all its %d channels; keep at least one" % (gid, group.channels))
        bad = kept[(kept < 0) | (kept >= group.channels)]
        if bad.size:
            raise PlanError("group %r has channels 0..%d; %s out of range"
                            % (gid, group.channels - 1, ", ".join(map(str, bad[:8]))))
        uniq, counts = np.unique(kept, return_counts=True)
        if (counts > 1).any():
            raise PlanError("group %r: channel(s) %s listed twice"
                            % (gid, ", ".join(map(str, uniq[counts > 1][:8]))))
        plan[gid] = uniq
    return plan


def checked_weights(graph, weights, source="weights"):
    """Copies of the arrays, legacy 4-D shapes reshaped, mismatches named (``source``: the weights' name)."""
    out = OrderedDict()
    for name, arrays in weights.items():
        arrays = [np.array(a, dtype=np.float32) for a in arrays]  # copies: the result never aliases the input
        want = graph.param_shapes.get(name)
        if want is not None:
            if len(arrays) != len(want):
                raise caffe_io.CaffeFileError("%s: layer %r has %d blobs, %s expects %d"
                                              % (source, name, len(arrays), graph.source, len(want)))
            for i, (a, shape) in enumerate(zip(arrays, want)):
                if not caffe_io.legacy_equal(a.shape, shape):
                    raise caffe_io.CaffeFileError("%s: layer %r blob %d has shape %s, %s expects %s"
                                                  % (source, name, i, tuple(a.shape), graph.source, tuple(shape)))
                arrays[i] = a.reshape(shape)
        out[name] = arrays
    return out


def prune_net(net, weights, keep, new_consumer_weights=None, graph=None):
    """(pruned NetParameter, pruned weights) for ``keep`` = {group id: kept channels}.

    net: NetParameter; weights: {layer: [arrays]} as caffe_io.read_weights
    gives. new_consumer_weights: {consumer layer: weight array} whose input
    axis is already pruned; its output axis may be the original or the pruned
    one (rows of a pruned producer are then dropped here). The inputs are not
    modified.
    """
    graph = graph or build_graph(net)
    plan = check_keep(graph, keep)
    arrays = checked_weights(graph, weights)

    cuts = defaultdict(list)        # (layer, blob, axis) -> [indices to delete]
    consumer_axes = defaultdict(set)
    for gid, kept in plan.items():
        group = graph.groups[gid]
        gone = np.setdiff1d(np.arange(group.channels), kept)
        for s in group.producers + group.passengers + group.consumers:
            cuts[(s.layer, s.blob, s.axis)].append(s.indices(gone))
        for c in group.consumers:
            consumer_axes[c.layer].add(c.axis)
    for layer, blob, axis in cuts:
        if layer not in arrays:
            raise caffe_io.CaffeFileError("weights have no layer %r, whose channels are pruned" % layer)

    def cut(layer, blob, array, axes):
        for (name, b, axis), idx in cuts.items():
            if name == layer and b == blob and axis in axes:
                array = np.delete(array, np.concatenate(idx), axis=axis)
        return array

    def axes(layer, blob):
        return {a for (name, b, a) in cuts if (name, b) == (layer, blob)}

    pruned = OrderedDict((name, [cut(name, i, a, axes(name, i)) for i, a in enumerate(blobs)])
                         for name, blobs in arrays.items())
    consumers = {c.layer for g in graph.groups.values() for c in g.consumers}
    for layer, new in (new_consumer_weights or {}).items():
        if layer not in consumers:
            raise PlanError("new weights given for %r, which consumes no channel group" % layer)
        if layer not in pruned:
            raise caffe_io.CaffeFileError("weights have no layer %r to replace" % layer)
        new = np.asarray(new, dtype=np.float32)
        full = pruned[layer][0].shape
        inputs_only = cut(layer, 0, arrays[layer][0], consumer_axes[layer]).shape
        if new.shape == full:
            pruned[layer][0] = new.copy()
        elif new.shape == inputs_only:  # drop the rows of a pruned producer here
            pruned[layer][0] = cut(layer, 0, new, axes(layer, 0) - consumer_axes[layer])
        else:
            raise PlanError("new weights for %r have shape %s; expected %s (pruned) or %s (inputs pruned)"
                            % (layer, new.shape, full, inputs_only))

    kept_counts = {gid: len(k) for gid, k in plan.items()}
    net2 = copy.deepcopy(net)
    for layer in net2.layer:
        if layer.name not in graph.counts:
            continue
        kind, segs = graph.counts[layer.name]
        size = graph.size(segs, kept_counts) if kind != "slice" else None
        if kind == "num_output":
            param = layer.inner_product_param if layer.type == "InnerProduct" else layer.convolution_param
            param.num_output = size
        elif kind == "depthwise":
            layer.convolution_param.num_output = size
            if layer.convolution_param.HasField("group") or layer.type not in DEPTHWISE_TYPES:
                layer.convolution_param.group = size  # a fork's depthwise type without group: one per channel
        elif kind == "reshape":
            layer.reshape_param.shape.dim[1] = size
        elif kind == "slice":
            points = [graph.size(s, kept_counts) for s in segs]
            if points != [graph.size(s, {}) for s in segs]:  # pruned: the cuts move (an unpruned Slice stays as is)
                del layer.slice_param.slice_point[:]
                layer.slice_param.slice_point.extend(points)
    return net2, pruned


def _loadable_view(net, graph):
    """The TEST-phase net with file-reading data layers swapped for Input layers.

    So the check needs neither the training images nor a Python layer's data
    source; shapes come from the graph.
    """
    view = copy.deepcopy(net)
    layers, _ = phase_view(view)
    for layer in layers:
        if layer.type in ("Input", "DummyData") or layer.bottom or layer.type not in (
                "Data", "ImageData", "HDF5Data", "MemoryData", "WindowData", "Python"):
            continue
        shapes = data_shapes(layer) if layer.type != "Python" else [graph.shapes.get(t) for t in layer.top]
        if any(s is None for s in shapes):
            raise caffe_io.CaffeFileError("cannot check the pruned net: data layer %r (%s) has no fixed shape; "
                                          "prune the deploy net (Input layers)" % (layer.name, layer.type))
        name, top = layer.name, list(layer.top)
        layer.Clear()
        layer.name, layer.type = name, "Input"
        layer.top.extend(top)
        for s in shapes:  # batch 1: the check loads weights, a training batch would only cost memory
            layer.input_param.shape.add().dim.extend((1,) + tuple(s[1:]))
    for layer in phase_view(view)[0]:
        if layer.type != "Python":
            continue
        try:  # Caffe would abort the process on a failed import
            importlib.import_module(layer.python_param.module)
        except ImportError as e:
            raise caffe_io.CaffeFileError("cannot check the pruned net: Python layer %r needs module %r (%s)"
                                          % (layer.name, layer.python_param.module, e)) from None
    return view


def check_saved(net, weights, proto_path, model_path, graph=None, names=None):
    """Load the written files in real Caffe (TEST phase); return the caffe.Net.

    Shapes are checked first (named errors), then Caffe copies the weights
    from the file and every blob is compared with what was meant to be saved.
    A net with layers this Caffe build lacks (a fork's) is checked in Caffe
    on the part it can run (base.netcheck.runnable_view), every other layer's
    weights against the shapes the channel graph infers.  ``names``: how to
    call the two files in errors (the user's paths, when these are staged).
    """
    import caffe
    proto_name, model_name = names or (proto_path, model_path)
    graph = graph or build_graph(net, source=proto_name)
    checked_weights(graph, weights, model_name)
    loadable = _loadable_view(net, graph)
    view, left = netcheck.runnable_view(loadable)
    if not view.layer:
        return None
    netcheck.check_net(view, proto_name)
    # nothing set aside, translated or replaced: then Caffe loads the very file written
    whole = not left and superset(view) == superset(loadable) == superset(net)
    cnet = caffe.Net(proto_path, caffe.TEST) if whole else caffe_io.net_from_param(view)
    caffe_io.check_weights(cnet, OrderedDict((k, list(v)) for k, v in weights.items()), source=model_name)
    cnet.copy_from(model_path)
    for name, blobs in cnet.params.items():
        for i, b in enumerate(blobs):
            if name in weights and not np.array_equal(b.data.ravel(), np.asarray(weights[name][i]).ravel()):
                raise caffe_io.CaffeFileError("%s: layer %r blob %d did not load as written" % (model_name, name, i))
    return cnet


def save_pruned(net, weights, proto_path, model_path, inputs=()):
    """Write prototxt + caffemodel, each only once real Caffe has loaded both.

    inputs: the files the pruned net came from; neither output may be one of them.
    """
    proto_path, model_path = os.fspath(proto_path), os.fspath(model_path)
    if os.path.abspath(proto_path) == os.path.abspath(model_path):
        raise caffe_io.CaffeFileError("prototxt and caffemodel outputs are the same path %s" % proto_path)
    protect = [os.fspath(p) for p in inputs if p]
    for out in (proto_path, model_path):  # refuse before writing either file
        for p in protect:
            if os.path.abspath(p) == os.path.abspath(out) or (
                    os.path.exists(out) and os.path.exists(p) and os.path.samefile(p, out)):
                raise caffe_io.CaffeFileError("refusing to overwrite the input file %s" % out)
    # Written beside the targets under names of this process (base.caffe_io.staging_file: a killed run's are
    # swept when its folder is opened again) and renamed only once Caffe has loaded them.
    staged = []
    try:
        for path in (proto_path, model_path):
            fd, name = caffe_io.staging_file(path)
            os.close(fd)
            staged.append(name)
        caffe_io.write_net(net, staged[0], protect)
        caffe_io.write_weights(net, weights, staged[1], protect)
        check_saved(net, weights, staged[0], staged[1], names=(proto_path, model_path))
        os.replace(staged[0], proto_path)
        faults.point("renamed", proto_path)
        os.replace(staged[1], model_path)
    except BaseException:
        for path in staged:
            if os.path.exists(path):
                os.unlink(path)
        raise
    faults.point("renamed", model_path)
    return proto_path, model_path
