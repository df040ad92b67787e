"""Layer-by-layer pruning: one channel group at a time, checkpointed, resumable.

For each selected group, in network order (as ThiNet does):

1. sample the *current* net (already pruned groups included) on the images;
2. the criterion picks the channels to keep;
3. the consumers' kept input channels are rescaled by least squares when the
   criterion asks for it;
4. surgery writes ``steps/NN_group/net.prototxt + net.caffemodel`` and
   ``step.json`` (what was removed, reconstruction error of every consumer
   before and after the rescale) -- step.json last, so a step is done exactly
   when it exists;
5. an optional fine-tune hook may replace the step's weights.

A killed run started again with the same arguments skips the finished steps.
The result is ``pruned.prototxt`` + ``pruned.caffemodel`` in the run folder,
plus ``log.json`` with every step.
"""
import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import numpy as np

from prune import caffe_io, gram
from prune.criteria import make as make_criterion
from prune.graph import build_graph
from prune import reconstruct as ls
from prune.sample import Targets, collect
from prune.surgery import prune_net, save_pruned


class PruneError(ValueError):
    pass


@dataclass
class PruneJob:
    model: str
    weights: str
    out: str
    criterion: str = "thinet"
    keep: object = 0.5                 # float for every selected group, or {group or layer name: ratio}
    layers: object = "all"             # "all" or [group ids / producer layer names]
    samples_per_image: int = 10
    seed: int = 0
    reconstruct: str = "full"          # full: least squares of every kept weight; scale: ThiNet's; none
    targets: str = "original"          # reconstruct towards the unpruned net's outputs, or the current net's
    ridge: object = "auto"             # float, or "auto": chosen on held-out images per consumer
    positions_per_image: int = 10      # sampled output positions per image for the least squares
    data: dict = field(default_factory=dict)   # description of the images, for the record

    def config(self):
        c = asdict(self)
        c["model_sha256"] = caffe_io.file_sha256(self.model)
        c["weights_sha256"] = caffe_io.file_sha256(self.weights)
        return c


def keep_count(ratio, channels):
    """The one rule from a keep ratio to a number of channels: the nearest count, at least one."""
    return max(1, int(round(ratio * channels)))


def _names(group):
    return {group.id} | {s.layer for s in group.producers}


def plan_groups(graph, layers, keep):
    """[(group id, ratio)] in network order; every requested name must match a prunable group."""
    prunable = graph.prunable()
    if layers == "all":
        chosen = [g for g in prunable if not isinstance(keep, dict) or _names(g) & set(keep)]
    else:
        chosen = []
        for name in layers:
            hits = [g for g in graph.groups.values() if name in _names(g)]
            if not hits:
                raise PruneError("%s: no layer or channel group named %r (prunable: %s)"
                                 % (graph.source, name, ", ".join(g.id for g in prunable)))
            if not hits[0].prunable:
                raise PruneError("%r cannot be pruned: %s" % (name, "; ".join(hits[0].reasons)))
            chosen.append(hits[0])
        order = {g.id: i for i, g in enumerate(graph.groups.values())}
        chosen = sorted({g.id: g for g in chosen}.values(), key=lambda g: order[g.id])
    out = []
    for g in chosen:
        if isinstance(keep, dict):
            ratios = [keep[n] for n in _names(g) if n in keep]
            if not ratios:
                raise PruneError("no keep ratio given for group %r (layers %s)" % (g.id, ", ".join(sorted(_names(g)))))
            ratio = ratios[0]
        else:
            ratio = keep
        if not 0 < ratio <= 1:
            raise PruneError("keep ratio of %r must be in (0, 1], not %g" % (g.id, ratio))
        out.append((g.id, float(ratio)))
    if isinstance(keep, dict):
        unknown = set(keep) - {n for g in graph.groups.values() for n in _names(g)}
        if unknown:
            raise PruneError("%s: no layer or channel group named %s" % (graph.source, ", ".join(sorted(unknown))))
    return out


def ratio_for_macs(net, weights, layers, target, source="net"):
    """The single keep ratio that, applied to the chosen groups (``layers`` as
    in PruneJob), leaves ``target`` (a share, 0..1) of the net's MACs: a
    bisection over the ratio, each probe a real surgery (first channels kept)
    measured by prune.stats.  Returns (ratio, MACs share reached)."""
    from prune.stats import net_stats
    graph = build_graph(net, source=source)
    plan = plan_groups(graph, layers, 1.0)
    if not plan:
        raise PruneError("nothing to prune: no prunable group selected")
    full = net_stats(net).macs

    def share(ratio):
        keep = {gid: list(range(keep_count(ratio, graph[gid].channels))) for gid, _ in plan}
        return net_stats(prune_net(net, weights, keep, graph=graph)[0]).macs / full

    if not 0 < target < 1:
        raise PruneError("--macs-target is the share of MACs to keep, in (0, 1); got %g" % target)
    lowest = share(1e-9)
    if target < lowest:
        raise PruneError("pruning the chosen groups to one channel each still leaves %.1f%% of the MACs; "
                         "--macs-target %g cannot be reached (select more layers)" % (100 * lowest, target))
    lo, hi = 0.0, 1.0          # share(lo) <= target < share(hi)
    for _ in range(16):
        mid = (lo + hi) / 2
        if share(mid) <= target:
            lo = mid
        else:
            hi = mid
    return lo, share(lo)


def rescaled_consumers(group, weights, grams, kept):
    """ThiNet's last step: each consumer's kept input channels times w = argmin ||y - X_S w||."""
    removed = np.setdiff1d(np.arange(group.channels), kept)
    new = {}
    for c in group.consumers:
        W = np.asarray(weights[c.layer][0], dtype=np.float32)
        w = gram.least_squares_scale(grams[c.layer], kept)
        scale = np.ones(W.shape[c.axis], dtype=np.float32)
        scale[c.indices(kept)] = np.repeat(w, c.block)
        shape = [1] * W.ndim
        shape[c.axis] = -1
        new[c.layer] = np.delete(W * scale.reshape(shape), c.indices(removed), axis=c.axis)
    return new


def reconstruction(group, grams, kept):
    """Relative error ||y - y_S||^2 / ||y||^2 per consumer, plain and after rescale."""
    out = {}
    for c in group.consumers:
        G = grams[c.layer]
        e = max(gram.energy(G), 1e-30)
        w = gram.least_squares_scale(G, kept)
        out[c.layer] = dict(removed=gram.residual(G, kept) / e, rescaled=gram.residual(G, kept, w) / e)
    return out


def _uses_normals(job):
    """Full least squares, and the scale towards the unpruned net, need the normal equations; ThiNet's own
    scale (towards the current net) needs only the sampled Gram."""
    return job.reconstruct == "full" or (job.reconstruct == "scale" and job.targets == "original")


def _original(job):
    """The unpruned net in Caffe, and its weights, for reconstruction targets."""
    return caffe_io.open_net(job.model, job.weights), caffe_io.read_weights(job.weights)


def _step(job, k, gid, ratio, net, weights, criterion, images, original, out_map):
    """Prune one group of the current net: (net, weights, record); ``out_map`` is updated."""
    graph = build_graph(net, source=job.model)
    group = graph[gid]
    n_keep = keep_count(ratio, group.channels)
    targets = None
    if _uses_normals(job):
        targets = Targets(net=original[0] if original else None, weights=original[1] if original else None,
                          out_map=out_map, positions=job.positions_per_image)
    ev = collect(net, weights, group, images(), job.samples_per_image, seed=job.seed + k, targets=targets)
    kept = [int(c) for c in criterion.select(ev, n_keep)]
    removed = sorted(set(range(group.channels)) - set(kept))
    net2, weights2, errors = cut(net, weights, graph, group, ev, kept, job.reconstruct, job.ridge)
    for s in group.producers + group.passengers:     # passengers: depthwise convs, for prune.refit
        if s.blob == 0 and s.axis == 0:
            rows = out_map.get(s.layer, np.arange(np.asarray(weights[s.layer][0]).shape[0]))
            out_map[s.layer] = np.delete(rows, s.indices(removed))
    record = dict(step=k, group=gid, layers=sorted(_names(group)), channels=group.channels, kept=len(kept),
                  ratio=ratio, criterion=job.criterion, reconstruct=job.reconstruct, targets=job.targets,
                  removed_channels=removed, error=errors, images=ev.images, samples=ev.samples,
                  out_map={k_: v.tolist() for k_, v in out_map.items()})
    return net2, weights2, record


def cut(net, weights, graph, group, ev, kept, reconstruct="full", ridge="auto"):
    """(net, weights, errors) with the group cut to ``kept`` and its consumers reconstructed."""
    new, folds, errors = consumer_weights(net, group, weights, ev, kept, reconstruct, ridge)
    net2, weights2 = prune_net(net, weights, {group.id: kept}, {k: v[0] for k, v in new.items()}, graph=graph)
    for layer, (_, bias) in new.items():
        if bias is not None:
            weights2[layer][1] = bias.astype(np.float32)
    for bn, bias in folds.items():
        weights2[bn] = fold_into_batchnorm(weights2[bn], bias)
    return net2, weights2, errors


def intercept_home(net, layer_name):
    """The BatchNorm that alone reads this layer's output (its mean can absorb an intercept), or None."""
    layers = list(net.layer)
    i = next(j for j, l in enumerate(layers) if l.name == layer_name)
    top = layers[i].top[0]
    readers = []
    for l in layers[i + 1:]:
        if top in l.bottom:
            readers.append(l)
        if top in l.top:
            break
    if len(readers) == 1 and readers[0].type == "BatchNorm":
        return readers[0].name
    return None


def fold_into_batchnorm(blobs, bias):
    """BatchNorm blobs whose mean absorbs ``bias`` added before it: (x + b - m) = (x - (m - b))."""
    mean, var, factor = [np.array(b, dtype=np.float64) for b in blobs]
    f = float(factor.ravel()[0])
    scale = 1.0 / f if f != 0 else 0.0
    mean, var = mean * scale - bias, var * scale
    return [mean.astype(np.float32), var.astype(np.float32), np.ones_like(factor, dtype=np.float32)]


def consumer_weights(net, group, weights, ev, kept, reconstruct="full", ridge="auto"):
    """New weights of the group's consumers after removing all but ``kept``:
    ({layer: (weight with removed inputs dropped, new bias or None)}, {BatchNorm: intercept to fold},
    {layer: relative reconstruction error record})."""
    removed = np.setdiff1d(np.arange(group.channels), kept)
    layers = {l.name: l for l in net.layer}
    new, folds, errors = {}, {}, {}
    scaled = {}
    for c in group.consumers:
        normal = ev.normals.get(c.layer)
        W = np.asarray(weights[c.layer][0], dtype=np.float32)
        errors[c.layer] = _scale_error(ev.grams[c.layer], kept)
        if reconstruct == "none":
            continue
        if normal is None:      # too wide for the normal equations: ThiNet's scale on the sampled Gram
            scaled = scaled or rescaled_consumers(group, weights, ev.grams, kept)
            new[c.layer] = (scaled[c.layer], None)
            continue
        k2 = int(np.prod(W.shape[2:])) if layers[c.layer].type != "InnerProduct" else 1
        gone = ls.input_columns(layers[c.layer].type, c, removed, k2)
        dim = normal.dim
        cols = np.setdiff1d(np.arange(dim), gone)
        if reconstruct == "scale":
            new[c.layer] = (_scaled_from_normal(normal, W, weights[c.layer], layers[c.layer], c, cols), None)
            continue
        flat = W.reshape(W.shape[0], -1).astype(np.float64)
        has_bias = len(weights[c.layer]) > 1
        home = None if has_bias else intercept_home(net, c.layer)
        b0 = np.asarray(weights[c.layer][1], dtype=np.float64).ravel() if has_bias else None
        Wn, b, ridge = ls.solve(normal, cols, flat[:, cols], b0, intercept=has_bias or home is not None,
                                ridge=ridge)
        errors[c.layer].update(target_before=ls.relative_error(normal, np.arange(dim), flat, b0 if has_bias else
                                                               (np.zeros(W.shape[0]) if home else None)),
                               target_after=ls.relative_error(normal, cols, Wn, b), ridge=ridge)
        shape = list(W.shape)
        shape[1] = -1
        new[c.layer] = (Wn.reshape(shape).astype(np.float32) if layers[c.layer].type != "InnerProduct"
                        else Wn.astype(np.float32).reshape(W.shape[0], -1), b if has_bias else None)
        if home is not None:
            folds[home] = b
    return new, folds, errors


def _scaled_from_normal(normal, W, blobs, layer, consumer, cols):
    """ThiNet's per-channel scale against the sampled targets: every kept input channel of the layer
    (of this group or not) times its least-squares scale; removed columns dropped."""
    flat = W.reshape(W.shape[0], -1)
    block = consumer.block if layer.type == "InnerProduct" else int(np.prod(W.shape[2:]))
    channel_cols = [np.arange(s, s + block) for s in range(0, flat.shape[1], block)]
    kept_cols = set(cols.tolist())
    channel_cols = [cc for cc in channel_cols if cc[0] in kept_cols]
    w = ls.channel_scales(normal, flat, blobs[1] if len(blobs) > 1 else None, channel_cols)
    out = flat.copy()
    for scale, cc in zip(w, channel_cols):
        out[:, cc] *= scale
    shape = list(W.shape)
    shape[1] = -1
    return out[:, np.sort(cols)].reshape(shape if layer.type != "InnerProduct" else (W.shape[0], -1))


def _scale_error(G, kept):
    e = max(gram.energy(G), 1e-30)
    w = gram.least_squares_scale(G, kept)
    return dict(removed=gram.residual(G, kept) / e, rescaled=gram.residual(G, kept, w) / e)


def run(job, images, finetune: Optional[Callable] = None, final_finetune: Optional[Callable] = None, progress=True):
    """Prune per ``job``; ``images()`` yields float32 batches for one sampling
    pass (called once per step).  ``finetune(step_dir, proto, weights) ->
    weights`` runs after each step, ``final_finetune`` (same signature) once
    after the last.  Returns the log record."""
    from tqdm import tqdm
    os.makedirs(job.out, exist_ok=True)
    config = job.config()
    cfg_path = os.path.join(job.out, "config.json")
    if os.path.exists(cfg_path):
        if json.load(open(cfg_path)) != config:
            raise PruneError("%s holds a run with other settings (config.json differs); use another --out" % job.out)
    else:
        caffe_io.atomic_write(cfg_path, json.dumps(config, indent=1, sort_keys=True))
    net = caffe_io.read_net(job.model)
    weights = caffe_io.read_weights(job.weights)
    graph = build_graph(net, source=job.model)
    plan = plan_groups(graph, job.layers, job.keep)
    if not plan:
        raise PruneError("nothing to prune: no prunable group selected")
    criterion = make_criterion(job.criterion, seed=job.seed)
    proto, model = job.model, job.weights
    original = _original(job) if _uses_normals(job) and job.targets == "original" else None
    out_map = {}
    steps = []
    bar = tqdm(plan, desc="prune", unit="group", disable=not progress, dynamic_ncols=True)
    for k, (gid, ratio) in enumerate(bar, 1):
        bar.set_postfix(group=gid)
        step_dir = os.path.join(job.out, "steps", "%02d_%s" % (k, gid.replace("/", "_")))
        record_path = os.path.join(step_dir, "step.json")
        if os.path.exists(record_path):
            record = json.load(open(record_path))
            out_map = {k: np.asarray(v) for k, v in record.get("out_map", {}).items()}
            steps.append(record)
            proto, model = record["prototxt"], record["caffemodel"]
            continue
        start = time.time()
        net2, weights2, record = _step(job, k, gid, ratio, caffe_io.read_net(proto), caffe_io.read_weights(model),
                                       criterion, images, original, out_map)
        out_proto, out_model = os.path.join(step_dir, "net.prototxt"), os.path.join(step_dir, "net.caffemodel")
        save_pruned(net2, weights2, out_proto, out_model, inputs=(job.model, job.weights))
        record.update(prototxt=out_proto, caffemodel=out_model, seconds=round(time.time() - start, 2))
        if finetune is not None:
            record["pruned_caffemodel"] = out_model
            record["caffemodel"] = finetune(os.path.join(step_dir, "finetune"), out_proto, out_model)
        caffe_io.atomic_write(record_path, json.dumps(record, indent=1))
        steps.append(record)
        proto, model = record["prototxt"], record["caffemodel"]
    bar.close()
    if final_finetune is not None:
        model = final_finetune(os.path.join(job.out, "finetune_final"), proto, model)
    final_proto = os.path.join(job.out, "pruned.prototxt")
    final_model = os.path.join(job.out, "pruned.caffemodel")
    save_pruned(caffe_io.read_net(proto), caffe_io.read_weights(model), final_proto, final_model,
                inputs=(job.model, job.weights))
    log = dict(config=config, steps=steps, prototxt=final_proto, caffemodel=final_model,
               final_finetune=final_finetune is not None)
    caffe_io.atomic_write(os.path.join(job.out, "log.json"), json.dumps(log, indent=1))
    return log
