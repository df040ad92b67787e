"""Latency of a net on one runtime for any number of kept channels per group: a measured per-layer table.

MACs are not time: a runtime turns some channel counts into speed better than
others (vector widths, Winograd tiles, layers that count no MACs).  So each
costed layer (Convolution, Deconvolution, InnerProduct, as in prune.macs) is
timed on the chosen runtime as a one-layer net: an Input of the layer's input
shape, the layer, and the per-channel layers that follow it in the net
(BatchNorm, Scale, PReLU, ReLU: what the runtimes fuse into it), random
weights.  It is timed at the channel counts the allocator considers: on each
weight axis that a channel group cuts, the counts ``keep_count(r, C,
round_to)`` of every group on that axis for ``points`` ratios r from
``lowest`` to 1 (so with ``round_to`` N only multiples of N), and every
combination of the two axes; between these counts the time is interpolated
bilinearly.  Layers of the same shape share one table, all the counts of a
layer are timed side by side in one process (interleaved rounds, median), and
the table is cached per net, runtime and machine (``cache_dir``), saved after
every layer so that an interrupted measurement resumes.

``LatencyModel(net, table)`` is then the allocator's cost model with the
interface of prune.macs.MacsModel (``cost``, ``share``, ``total``,
``channels``): the predicted milliseconds of a forward pass at batch 1 =
the sum over costed layers of (their time at the kept counts - the runtime's
cost of running an empty net) + the rest of the whole net's measured time
(pooling, Eltwise, ...), taken as fixed.
"""
import hashlib
import json
import os
import platform
import tempfile
from dataclasses import asdict, dataclass

import numpy as np

from base import caffe_io
from base.errors import ToolkitError
from base.proto import caffe_pb2
from prune.graph import build_graph, phase_view
from prune.policy import keep_count

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CACHE = os.path.join(ROOT, ".cache", "latency")
COSTED = ("Convolution", "Deconvolution", "InnerProduct")
PER_CHANNEL = ("BatchNorm", "Scale", "PReLU", "ReLU", "ReLU6", "Bias", "TanH", "Sigmoid", "ELU")


class LatencyError(ToolkitError):
    pass


# ------------------------------------------------------------------ the layers and their one-layer nets

def costed_units(net, graph):
    """{layer: dict(rows, cols, group, type, bottom, followers, cuts)} for every costed layer that has MACs:
    ``rows``/``cols`` are axes 0/1 of its weight, ``cuts`` [(group id, axis, block)] the groups cutting them."""
    from prune.stats import net_stats
    layers, _ = phase_view(net)
    index = {l.name: i for i, l in enumerate(layers)}
    cuts = {}
    for g in graph.prunable():
        for s in g.producers + g.passengers + g.consumers:
            if s.blob == 0 and s.axis in (0, 1):
                cuts.setdefault(s.layer, []).append((g.id, s.axis, s.block))
    units = {}
    for rec in net_stats(net).layers:
        if not rec.macs or rec.type not in COSTED or rec.name not in index:
            continue
        layer = layers[index[rec.name]]
        shape = graph.param_shapes[rec.name][0]
        group = layer.convolution_param.group if rec.type != "InnerProduct" else 1
        units[rec.name] = dict(rows=int(shape[0]), cols=int(shape[1]), group=int(group), type=rec.type,
                               bottom=layer.bottom[0], followers=followers(layers, index[rec.name]),
                               cuts=sorted(cuts.get(rec.name, [])), kind=kind_of(layer, shape))
    return units


def kind_of(layer, shape):
    """A short description of a costed layer: 'fc', 'conv 3x3 s1', 'depthwise 3x3 s2', ..."""
    if layer.type == "InnerProduct":
        return "fc"
    p = layer.convolution_param
    kh, kw = (p.kernel_h, p.kernel_w) if p.kernel_h else ((p.kernel_size[0],) * 2 if p.kernel_size else (1, 1))
    stride = p.stride_h or (p.stride[0] if p.stride else 1)
    what = "depthwise" if p.group > 1 and shape[1] == 1 else "deconv" if layer.type == "Deconvolution" else "conv"
    return "%s %dx%d s%d" % (what, kh, kw, stride)


def followers(layers, i):
    """Names of the per-channel layers that run on layer i's output, in order, up to its first other reader."""
    cur, out = layers[i].top[0], []
    for layer in layers[i + 1:]:
        if cur not in layer.bottom:
            continue
        if layer.type not in PER_CHANNEL or len(layer.bottom) != 1 or len(layer.top) != 1:
            break
        out.append(layer.name)
        cur = layer.top[0]
    return out


def micro_net(layers, name, unit, shapes, rows, cols):
    """The one-layer net of layer ``name`` (its per-channel followers included) with weight axes ``rows`` x
    ``cols``; ``layers``: {name: LayerParameter} of the net, ``shapes``: its blob shapes (prune.graph)."""
    shape = [1] + list(shapes[unit["bottom"]])[1:]
    kind, group = unit["type"], unit["group"]
    depthwise = kind == "Convolution" and group > 1 and unit["cols"] == 1 and group == unit["rows"]
    if kind == "Convolution":
        shape[1] = rows if depthwise else cols * group
    elif kind == "Deconvolution":
        shape[1] = rows
    else:
        shape[1] = shape[1] * cols // unit["cols"]
    out = caffe_pb2.NetParameter(name="unit")
    data = out.layer.add(name="data", type="Input", top=["data"])
    data.input_param.shape.add(dim=[int(d) for d in shape])
    layer = out.layer.add()
    layer.CopyFrom(layers[name])
    if kind == "InnerProduct":
        layer.inner_product_param.num_output = rows
    else:
        layer.convolution_param.num_output = cols * group if kind == "Deconvolution" else rows
        if depthwise:
            layer.convolution_param.group = rows
    for f in unit["followers"]:
        out.layer.add().CopyFrom(layers[f])
    for i, l in enumerate(out.layer[1:]):     # generic names: layers of one shape have one text
        del l.param[:], l.include[:], l.exclude[:], l.bottom[:], l.top[:]
        l.name = "unit" if i == 0 else "after%d" % i
        l.bottom.append("data" if i == 0 else "out")
        l.top.append("out")
    return out


def random_weights(net, seed=0):
    """Weights of every parameter blob Caffe makes for ``net`` (NetParameter): what timing needs (finite
    values of a realistic scale; BatchNorm variances positive and its factor 1)."""
    rng = np.random.default_rng(seed)
    cnet = caffe_io.net_from_param(net)
    types = {l.name: l.type for l in net.layer}
    out = {}
    for name, blobs in cnet.params.items():
        arrays = []
        for i, b in enumerate(blobs):
            shape = b.data.shape
            if types.get(name) == "BatchNorm":
                a = [rng.normal(0, 0.1, shape), rng.uniform(0.5, 2, shape), np.ones(shape)][i]
            elif i == 0 and len(shape) >= 2:
                a = rng.normal(0, np.sqrt(2.0 / max(1, int(np.prod(shape[1:])))), shape)
            else:
                a = rng.uniform(0.05, 0.4, shape) if types.get(name) == "PReLU" else rng.normal(0, 0.1, shape)
            arrays.append(np.asarray(a, dtype=np.float32))
        out[name] = arrays
    return out


def write_net_files(net, stem, seed=0):
    """stem.prototxt + stem.caffemodel (random weights) of a NetParameter; returns the two paths."""
    proto = caffe_io.write_net(net, stem + ".prototxt")
    model = caffe_io.write_weights(net, random_weights(net, seed), stem + ".caffemodel")
    return proto, model


def empty_net():
    """The cheapest net a runtime runs: its per-call cost, subtracted from every layer's time."""
    net = caffe_pb2.NetParameter(name="empty")
    data = net.layer.add(name="data", type="Input", top=["data"])
    data.input_param.shape.add(dim=[1, 1, 1, 1])
    conv = net.layer.add(name="c", type="Convolution", bottom=["data"], top=["out"])
    conv.convolution_param.num_output = 1
    conv.convolution_param.kernel_size.append(1)
    return net


# ------------------------------------------------------------------ the counts timed

def ratios(points, lowest):
    """``points`` keep ratios from ``lowest`` to 1, evenly spaced."""
    if points < 2:
        return [1.0]
    return [lowest + (1 - lowest) * i / (points - 1) for i in range(points)]


def axis_grid(full, cuts, graph, axis, grid_ratios, round_to=1):
    """The values weight axis ``axis`` takes when every group cutting it keeps ``keep_count(r, C, round_to)``
    channels, for each r of ``grid_ratios``; sorted, distinct."""
    on_axis = [(gid, block) for gid, a, block in cuts if a == axis]
    if not on_axis:
        return [full]
    values = {full - sum((graph[g].channels - keep_count(r, graph[g].channels, round_to)) * b for g, b in on_axis)
              for r in grid_ratios}
    return sorted(int(v) for v in values if v > 0)


def machine():
    """What identifies this machine for the cache: host name, CPU model, CPU count."""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
    except OSError:
        pass
    return dict(node=platform.node(), cpu=cpu or platform.processor(), cpus=os.cpu_count())


# ------------------------------------------------------------------ measuring

def time_nets(runtime, nets, threads=1, rounds=5, min_seconds=0.02):
    """{key: median ms at batch 1} of {key: (prototxt, caffemodel)} on ``runtime``, side by side in one
    process (interleaved rounds, runtimes.median_ms)."""
    import runtimes
    with tempfile.TemporaryDirectory() as work, runtimes.pinned(threads):
        sessions = runtimes.open_sessions([runtime], nets, work, threads)
        for (_, key), s in sessions.items():
            shape = next(list(l.input_param.shape[0].dim) for l in caffe_io.read_net(nets[key][0]).layer
                         if l.type == "Input")
            s.run(np.random.default_rng(0).uniform(-1, 1, [1] + shape[1:]).astype(np.float32))
        ms = runtimes.median_ms(sessions, rounds=rounds, min_seconds=min_seconds)
    return {key: t for (_, key), t in ms.items()}


@dataclass(frozen=True)
class TableSpec:
    """How a latency table is measured (all of it goes into the cache key)."""
    runtime: str = "caffe"
    points: int = 8               # counts per cut axis
    lowest: float = 0.125         # the smallest keep ratio timed (the allocator's default floor)
    round_to: int = 1
    threads: int = 1
    rounds: int = 5
    min_seconds: float = 0.02     # per net and round


def cache_path(net, spec, cache_dir=None):
    """The cache file of ``net``'s tables under ``spec`` on this machine (round_to left out: it only picks
    which counts are timed, and each layer's table is keyed by its counts)."""
    import runtimes
    how = {k: v for k, v in asdict(spec).items() if k != "round_to"}
    key = json.dumps(dict(net=caffe_io.net_to_text(net), spec=how, version=runtimes.version(spec.runtime),
                          machine=machine()), sort_keys=True)
    return os.path.join(cache_dir or DEFAULT_CACHE, "%s-%s.json" % (
        spec.runtime, hashlib.sha256(key.encode()).hexdigest()[:20]))


def measure_table(net, spec=TableSpec(), graph=None, source="net", cache_dir=None, progress=False):
    """The latency table of ``net`` on ``spec.runtime`` (read from the cache when measured before; each
    layer's table is saved as soon as it is measured)."""
    import runtimes
    why = runtimes.missing(spec.runtime)
    if why:
        raise LatencyError("--runtime %s: %s" % (spec.runtime, why))
    graph = graph or build_graph(net, source=source)
    path = cache_path(net, spec, cache_dir)
    table = json.load(open(path)) if os.path.exists(path) else dict(
        spec=asdict(spec), version=runtimes.version(spec.runtime), machine=machine(), units={}, tables={})
    layers = {l.name: l for l in phase_view(net)[0]}
    units = costed_units(net, graph)
    grid = ratios(spec.points, spec.lowest)
    dirty = table["spec"] != asdict(spec)
    table["spec"] = asdict(spec)
    with tempfile.TemporaryDirectory() as work:
        if "whole_ms" not in table:
            nets = dict(whole=write_net_files(net, os.path.join(work, "whole")),
                        empty=write_net_files(empty_net(), os.path.join(work, "empty")))
            ms = time_nets(spec.runtime, nets, spec.threads, spec.rounds, max(spec.min_seconds, 0.05))
            table.update(whole_ms=ms["whole"], overhead_ms=ms["empty"])
            _save(path, table)
        for k, (name, unit) in enumerate(units.items()):
            rows = axis_grid(unit["rows"], unit["cuts"], graph, 0, grid, spec.round_to)
            cols = axis_grid(unit["cols"], unit["cuts"], graph, 1, grid, spec.round_to)
            full = micro_net(layers, name, unit, graph.shapes, unit["rows"], unit["cols"])
            sig = hashlib.sha256(("%s|%s|%s" % (caffe_io.net_to_text(full), rows, cols))
                                 .encode()).hexdigest()[:16]
            entry = dict(table=sig, rows=rows, cols=cols)
            if table["units"].get(name) != entry:
                table["units"][name] = entry
                dirty = True
            if sig not in table["tables"]:
                if progress:
                    print("[latency] %s on %s: %s (%d of %d), %d counts" % (
                        source, spec.runtime, name, k + 1, len(units), len(rows) * len(cols)), flush=True)
                nets = {"%d_%d" % (r, c): write_net_files(micro_net(layers, name, unit, graph.shapes, r, c),
                                                          os.path.join(work, "%s_%d_%d" % (sig, r, c)))
                        for r in rows for c in cols}
                ms = time_nets(spec.runtime, nets, spec.threads, spec.rounds, spec.min_seconds)
                table["tables"][sig] = dict(layer=name, rows=rows, cols=cols,
                                            ms=[[ms["%d_%d" % (r, c)] for c in cols] for r in rows])
                dirty = True
            if dirty:
                _save(path, table)
                dirty = False
    return table


def _save(path, table):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    caffe_io.atomic_write(path, json.dumps(table, indent=1), sync=False)


# ------------------------------------------------------------------ the cost model

def _weights(grid, v):
    """[(index, weight)] of linear interpolation on ``grid`` at ``v`` (held flat outside the grid)."""
    if len(grid) == 1 or v <= grid[0]:
        return [(0, 1.0)]
    if v >= grid[-1]:
        return [(len(grid) - 1, 1.0)]
    i = int(np.searchsorted(grid, v))
    t = (v - grid[i - 1]) / (grid[i] - grid[i - 1])
    return [(i - 1, 1.0 - t), (i, t)]


class LatencyModel:
    """Predicted batch-1 milliseconds of a net on one runtime for any kept channel counts (prune.macs's
    interface: ``cost(kept)``, ``share(kept)``, ``total``, ``channels()``; ``kept`` = {group id: count})."""

    unit = "ms"

    def __init__(self, net, table, graph=None, source="net"):
        self.graph = graph or build_graph(net, source=source)
        self.table, self.runtime = table, table["spec"]["runtime"]
        self.units = costed_units(net, self.graph)
        missing = sorted(set(self.units) - set(table["units"]))
        if missing:
            raise LatencyError("the latency table has no entry for layer(s) %s of %s" % (", ".join(missing), source))
        self.overhead = table["overhead_ms"]
        full = sum(self.layer_ms(n, u["rows"], u["cols"]) for n, u in self.units.items())
        self.rest = max(0.0, table["whole_ms"] - full)
        self.total = self.cost({})

    def layer_ms(self, name, rows, cols):
        """Interpolated time of one layer (less the runtime's per-call cost) at weight axes rows x cols."""
        t = self.table["tables"][self.table["units"][name]["table"]]
        ms = sum(wr * wc * t["ms"][i][j] for i, wr in _weights(t["rows"], rows) for j, wc in _weights(t["cols"], cols))
        return max(0.0, ms - self.overhead)

    def dims(self, name, kept):
        """(rows, cols) of a layer's weight with ``kept`` channels of each group."""
        u = self.units[name]
        dims = [u["rows"], u["cols"]]
        for gid, axis, block in u["cuts"]:
            if gid in kept:
                dims[axis] -= (self.graph[gid].channels - kept[gid]) * block
        return dims

    def per_layer(self, kept):
        """{layer: predicted ms} at ``kept``."""
        return {n: self.layer_ms(n, *self.dims(n, kept)) for n in self.units}

    def cost(self, kept):
        return self.rest + sum(self.per_layer(kept).values())

    def share(self, kept):
        return self.cost(kept) / self.total

    def channels(self):
        return {g.id: g.channels for g in self.graph.prunable()}


def model_for(net, runtime, source="net", graph=None, round_to=None, points=None, lowest=0.125, cache_dir=None,
              progress=False):
    """The LatencyModel of ``net`` on ``runtime`` (its table measured now or read from the cache)."""
    spec = TableSpec(runtime=runtime, points=points or TableSpec.points, lowest=lowest, round_to=round_to or 1)
    graph = graph or build_graph(net, source=source)
    table = measure_table(net, spec, graph=graph, source=source, cache_dir=cache_dir, progress=progress)
    return LatencyModel(net, table, graph=graph, source=source)
