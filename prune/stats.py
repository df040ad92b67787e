"""Size of a Caffe net: parameters and multiply-accumulates per layer and in total.

Shapes come from Caffe itself: the net is instantiated in TEST phase at batch 1
and every number is read off its blobs.

Convention
  MACs  multiply-accumulates for ONE image (not 2xMACs, not FLOPs), counted for
        Convolution (group and depthwise included), Deconvolution and
        InnerProduct: weight values x output positions. Bias adds and every
        other layer (PReLU, ReLU, Eltwise, BatchNorm, Scale, Pooling, ...) count
        0 MACs.
  params every value the layer stores in a caffemodel (BatchNorm's mean,
        variance and scale factor included).
  Loss heads are left out: loss layers (type *Loss, Accuracy, Silence), layers
  that read the label (an A-Softmax fc6) and what lies downstream of them;
  --exclude leaves out more layers (and what depends on them).

    python -m prune.stats NET.prototxt [--weights W.caffemodel] [--exclude LAYER] [--json]
"""
import copy
import dataclasses
import importlib
import json
import os

import numpy as np

from base import caffe_io, cli, forks, netcheck
from base.caffe_io import CaffeFileError
from base.proto import caffe_pb2, superset

CONVENTION = ("MACs = multiply-accumulates per image (not 2xMACs) of Convolution (incl. group/depthwise), "
              "Deconvolution and InnerProduct; all other layers (PReLU, Eltwise, BatchNorm, Scale, Pooling, ...) "
              "count 0. Params = all values stored in the caffemodel (incl. BatchNorm statistics).")
LOSS_TYPES = ("Accuracy", "Silence")


@dataclasses.dataclass
class LayerStats:
    name: str
    type: str
    shape: tuple  # first top, one image (batch axis dropped)
    params: int
    macs: int


@dataclasses.dataclass
class NetStats:
    name: str
    layers: list
    params: int
    macs: int
    inputs: dict  # input blob -> shape of one image
    excluded: list  # (layer, why)
    weights: dict = None  # filled by net_stats(..., weights=): what the caffemodel check found

    def as_dict(self):
        return dict(net=self.name, convention=CONVENTION, inputs={k: list(v) for k, v in self.inputs.items()},
                    layers=[dict(dataclasses.asdict(r), shape=list(r.shape)) for r in self.layers],
                    total=dict(params=self.params, macs=self.macs),
                    excluded=[dict(layer=n, why=w) for n, w in self.excluded], weights=self.weights)


def _is_loss(layer):
    return layer.type.endswith("Loss") or layer.type in LOSS_TYPES


def _label_blobs(net):
    """Blobs that hold labels: the tops after the first of a data layer that reads files (images, then labels),
    an Input top whose name says label, and any blob called 'label'.  Every other top of an Input layer (one
    with several tops, or one of several Input layers) is an input of the net."""
    labels = set()
    for layer in net.layer:
        if layer.type == "Input":
            labels.update(t for t in layer.top if "label" in t.lower())
        elif not len(layer.bottom) and layer.type not in ("DummyData", "Parameter"):
            labels.update(layer.top[1:])
        labels.update(t for t in layer.top if t == "label")
    return labels


def _drop(net, exclude, source):
    """Remove loss heads, the named layers and everything that depends on them."""
    names = [layer.name for layer in net.layer]
    unknown = sorted(set(exclude) - set(names))
    if unknown:
        raise CaffeFileError("%s: no layer named %s (layers: %s)" % (source, ", ".join(unknown), ", ".join(names)))
    labels = _label_blobs(net)
    dead, excluded, kept = set(), [], []
    for layer in net.layer:
        why = None
        if layer.name in exclude:
            why = "--exclude"
        elif _is_loss(layer):
            why = "loss layer"
        elif labels & set(layer.bottom):
            why = "reads the label"
        elif dead & set(layer.bottom):
            why = "depends on an excluded layer"
        if why is None:
            kept.append(layer)
            continue
        excluded.append((layer.name, why))
        # An in-place layer writes its own bottom: leaving it out removes nothing else.
        dead.update(t for t in layer.top if t not in layer.bottom)
    del net.layer[:]
    net.layer.extend(kept)
    return excluded


def _inputs_at_batch_one(net, source):
    """Input layers to batch 1; an ImageData layer becomes the Input it amounts to.

    Other data layers (databases, HDF5, ...) would need their files: refused here
    rather than left to a Caffe abort.
    """
    for i, layer in enumerate(net.layer):
        if layer.type == "Input":
            for shape in layer.input_param.shape:
                if len(shape.dim):
                    shape.dim[0] = 1
        elif layer.type == "ImageData":  # its output shape is in the prototxt
            p = layer.image_data_param
            if not (p.new_height and p.new_width) or layer.transform_param.crop_size:
                raise CaffeFileError("%s: layer %r (ImageData) has no fixed output size (new_height/new_width, no "
                                     "crop); give a deploy prototxt with an Input layer" % (source, layer.name))
            channels = 3 if p.is_color else 1
            shapes = [caffe_pb2.BlobShape(dim=[1, channels, p.new_height, p.new_width]), caffe_pb2.BlobShape(dim=[1])]
            net.layer[i].CopyFrom(caffe_pb2.LayerParameter(
                name=layer.name, type="Input", top=layer.top, include=layer.include, exclude=layer.exclude,
                input_param=caffe_pb2.InputParameter(shape=shapes[:len(layer.top)])))
        elif not len(layer.bottom) and layer.type not in ("DummyData", "Parameter"):
            raise CaffeFileError("%s: layer %r (%s) is a data layer whose output shape comes from its data; give a "
                                 "deploy prototxt with an Input layer" % (source, layer.name, layer.type))


def _check_types(net, source):
    """Caffe aborts on an unknown layer type or a Python layer it cannot import: name them first."""
    import caffe
    known = set(caffe.layer_type_list())
    for layer in net.layer:
        if layer.type not in known:
            raise CaffeFileError("%s: layer %r has type %r, which this Caffe does not have (%s; leave it out, and "
                                 "what depends on it, with --exclude %s)" % (
                                     source, layer.name, layer.type,
                                     forks.describe_type(layer.type) or "a layer of a Caffe fork?", layer.name))
        error = netcheck.fork_field_error(layer, source)
        if error is not None:
            raise CaffeFileError("%s (leave it out with --exclude %s)" % (error, layer.name))
        if layer.type == "Python":
            module, cls = layer.python_param.module, layer.python_param.layer
            try:
                found = hasattr(importlib.import_module(module), cls)
            except ImportError as e:
                raise CaffeFileError("%s: Python layer %r: cannot import %s (%s)" % (source, layer.name, module, e)) \
                    from None
            if not found:
                raise CaffeFileError("%s: Python layer %r: module %s has no %s" % (source, layer.name, module, cls))


def _macs(layer_type, weight, bottom, top):
    if layer_type == "Convolution":
        return weight.size * int(np.prod(top[2:]))
    if layer_type == "Deconvolution":
        return weight.size * int(np.prod(bottom[2:]))
    if layer_type == "InnerProduct":  # one product per output row: rows are the axes between batch and outputs
        return weight.size * int(np.prod(top[1:-1]))
    return 0


def net_stats(net, exclude=(), weights=None, probe=False):
    """Per-layer params and MACs of a net (prototxt path or NetParameter).

    exclude: layer names to leave out (with what depends on them); loss heads go
    automatically. weights: a caffemodel path; its layers must fit the net
    (CaffeFileError otherwise). probe: build the net in a child process first
    (base.netcheck), for a net from a user. Returns a NetStats.
    """
    if isinstance(net, (str, os.PathLike)):
        source = os.fspath(net)
        net = caffe_io.read_net(source)
    else:
        source = "net %r" % net.name
        net = superset(copy.deepcopy(net))
    excluded = _drop(net, set(exclude), source)
    _inputs_at_batch_one(net, source)
    _check_types(net, source)
    if probe:
        caffe_io.probe_nets([(source, net, "test")])
    caffe_net = caffe_io.net_from_param(net)

    declared = {layer.name for layer in net.layer}
    records, inputs = [], {}
    for name, layer in zip(caffe_net._layer_names, caffe_net.layers):
        if name not in declared:  # Split layers Caffe inserts itself
            continue
        tops = caffe_net.top_names[name]
        bottoms = caffe_net.bottom_names[name]
        top = caffe_net.blobs[tops[0]].data.shape if tops else ()
        if layer.type == "Input":
            inputs.update((t, caffe_net.blobs[t].data.shape[1:]) for t in tops)
        blobs = [b.data for b in layer.blobs]
        macs = _macs(layer.type, blobs[0], caffe_net.blobs[bottoms[0]].data.shape if bottoms else (), top) \
            if blobs else 0
        records.append(LayerStats(name, layer.type, tuple(top[1:]), sum(b.size for b in blobs), macs))
    stats = NetStats(net.name, records, sum(r.params for r in records), sum(r.macs for r in records),
                     inputs, excluded)
    if weights is not None:
        stats.weights = _check_weights(caffe_net, os.fspath(weights))
    return stats


def _check_weights(caffe_net, path):
    arrays = caffe_io.read_weights(path)
    caffe_io.check_weights(caffe_net, arrays, source=path)
    missing = [name for name, blobs in caffe_net.params.items() if len(blobs) and name not in arrays]
    if missing:
        raise CaffeFileError("%s has no weights for layer%s %s of the net" % (path, "s" * (len(missing) > 1),
                                                                          ", ".join(missing)))
    unused = [name for name in arrays if name not in caffe_net.params]
    return dict(file=path, layers=len(caffe_net.params), unused=unused)


def fmt_params(n):
    return "%.2fM" % (n / 1e6)


def fmt_macs(n):
    return "%.3fG" % (n / 1e9)


def report(stats, source=""):
    """The human-readable table."""
    lines = ["%s%s" % (stats.name or "net", "  (%s)" % source if source else ""),
             "input: " + ", ".join("%s %s" % (k, "x".join(map(str, v))) for k, v in stats.inputs.items())]
    width = max([len(r.name) for r in stats.layers] + [5])
    types = max([len(r.type) for r in stats.layers] + [4])
    lines.append("%-*s  %-*s  %-14s %12s %15s" % (width, "layer", types, "type", "output", "params", "MACs"))
    for r in stats.layers:
        lines.append("%-*s  %-*s  %-14s %12s %15s" % (width, r.name, types, r.type, "x".join(map(str, r.shape)),
                                                      "{:,}".format(r.params), "{:,}".format(r.macs)))
    lines.append("total: %s params (%s), %s MACs (%s) per image" % (
        fmt_params(stats.params), "{:,}".format(stats.params), fmt_macs(stats.macs), "{:,}".format(stats.macs)))
    if stats.excluded:
        lines.append("left out: " + ", ".join("%s (%s)" % e for e in stats.excluded))
    if stats.weights:
        w = stats.weights
        lines.append("weights %s: all %d layers with parameters present, shapes fit%s" % (
            w["file"], w["layers"], "; not used by this net: " + ", ".join(w["unused"]) if w["unused"] else ""))
    lines.append("convention: " + CONVENTION)
    return "\n".join(lines)


@cli.entry("python -m prune.stats")
def main(argv=None):
    ap = cli.parser("python -m prune.stats", description=__doc__.split("\n\n")[0],
                                 epilog=CONVENTION + " Loss layers, layers that read the label (A-Softmax fc6) and "
                                        "what depends on them are left out automatically.")
    ap.add_argument("prototxt", help="net definition (deploy or train; shapes are taken in TEST phase at batch 1)")
    ap.add_argument("--weights", help="caffemodel: check that it has every parameter blob of the net, in its shape")
    ap.add_argument("--exclude", action="append", default=[], metavar="LAYER",
                    help="leave this layer (and what depends on it) out of the count; repeatable")
    ap.add_argument("--json", action="store_true", help="print JSON (per-layer records, totals, left-out layers)")
    args = ap.parse_args(argv)
    cli.check_file(args.prototxt, "net definition")
    cli.check_files(weights=args.weights)
    stats = net_stats(args.prototxt, exclude=args.exclude, weights=args.weights, probe=True)
    print(json.dumps(stats.as_dict(), indent=1) if args.json else report(stats, args.prototxt))
    return 0


if __name__ == "__main__":
    cli.run(main)
