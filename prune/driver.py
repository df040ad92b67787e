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
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import numpy as np

from base import caffe_io
from base.runfolder import RunFolder
from prune import gram
from prune.criteria import make as make_criterion
from prune.graph import build_graph
from prune.sample import collect
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
    data: dict = field(default_factory=dict)   # description of the images, for the record

    def config(self):
        c = asdict(self)
        c["model_sha256"] = caffe_io.file_sha256(self.model)
        c["weights_sha256"] = caffe_io.file_sha256(self.weights)
        return c


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
        keep = {gid: list(range(max(1, int(round(ratio * graph[gid].channels))))) for gid, _ in plan}
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


def run(job, images, finetune: Optional[Callable] = None, final_finetune: Optional[Callable] = None, progress=True):
    """Prune per ``job``; ``images()`` yields float32 batches for one sampling
    pass (called once per step).  ``finetune(step_dir, proto, weights) ->
    weights`` runs after each step, ``final_finetune`` (same signature) once
    after the last.  Returns the log record."""
    with RunFolder(job.out, PruneError) as folder:
        return _run(job, folder, images, finetune, final_finetune, progress)


def _run(job, folder, images, finetune, final_finetune, progress):
    from tqdm import tqdm
    config = folder.check(job.config())
    net = caffe_io.read_net(job.model)
    weights = caffe_io.read_weights(job.weights)
    graph = build_graph(net, source=job.model)
    plan = plan_groups(graph, job.layers, job.keep)
    if not plan:
        raise PruneError("nothing to prune: no prunable group selected")
    criterion = make_criterion(job.criterion, seed=job.seed)
    folder.save_config(config)
    proto, model = job.model, job.weights
    steps = []
    bar = tqdm(plan, desc="prune", unit="group", disable=not progress, dynamic_ncols=True)
    for k, (gid, ratio) in enumerate(bar, 1):
        bar.set_postfix(group=gid)
        step_dir = os.path.join(job.out, "steps", "%02d_%s" % (k, gid.replace("/", "_")))
        record_path = os.path.join(step_dir, "step.json")
        if os.path.exists(record_path):
            record = folder.load(record_path)
            steps.append(record)
            proto, model = record["prototxt"], record["caffemodel"]
            continue
        start = time.time()
        net = caffe_io.read_net(proto)
        weights = caffe_io.read_weights(model)
        graph = build_graph(net, source=proto)
        group = graph[gid]
        n_keep = max(1, int(round(ratio * group.channels)))
        ev = collect(net, weights, group, images(), job.samples_per_image, seed=job.seed + k)
        kept = [int(c) for c in criterion.select(ev, n_keep)]
        new = rescaled_consumers(group, weights, ev.grams, kept) if criterion.rescale else None
        net2, weights2 = prune_net(net, weights, {gid: kept}, new, graph=graph)
        out_proto, out_model = os.path.join(step_dir, "net.prototxt"), os.path.join(step_dir, "net.caffemodel")
        save_pruned(net2, weights2, out_proto, out_model, inputs=(job.model, job.weights))
        record = dict(step=k, group=gid, layers=sorted(_names(group)), channels=group.channels, kept=len(kept),
                      ratio=ratio, criterion=job.criterion, rescaled=bool(criterion.rescale),
                      removed_channels=sorted(set(range(group.channels)) - set(kept)),
                      error=reconstruction(group, ev.grams, kept), images=ev.images, samples=ev.samples,
                      prototxt=out_proto, caffemodel=out_model, seconds=round(time.time() - start, 2))
        if finetune is not None:
            record["pruned_caffemodel"] = out_model
            record["caffemodel"] = finetune(os.path.join(step_dir, "finetune"), out_proto, out_model)
        folder.save(record_path, record)
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
    folder.save("log.json", log)
    return log
