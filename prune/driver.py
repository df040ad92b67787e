"""Layer-by-layer pruning: one channel group at a time, checkpointed, resumable.

For each selected group, in network order (as ThiNet does):

1. sample the *current* net (already pruned groups included) on the images,
   and, for the least squares, the unpruned net at the same places
   (prune.sample);
2. the criterion picks the channels to keep, as many as the plan says
   (prune.policy.Plan: counts), unless the plan chose them itself (the
   slimming threshold); a criterion that needs a loss gradient (Taylor)
   first gets one backward pass of the current net in Caffe (prune.gradient);
3. every consumer of the group is reconstructed (prune.reconstruct): by
   default all its kept weights and its intercept by least squares towards
   the unpruned net's outputs; or ThiNet's per-channel scale; or not at all;
4. surgery writes ``steps/NN_group/net.prototxt + net.caffemodel`` and
   ``step.json`` (what was removed, reconstruction error of every consumer)
   -- step.json last, so a step is done exactly when it exists;
5. an optional fine-tune hook may replace the step's weights.

Caffe runs only the part of the net this build has (base.netcheck.runnable_view):
a Caffe fork's layers, and what reads them, are set aside; a group read by
one of them is pruned only by a criterion that reads weights alone, with no
reconstruction (checked before any work).

A killed run started again with the same arguments skips the finished steps.
The result is ``pruned.prototxt`` + ``pruned.caffemodel`` in the run folder,
plus ``log.json`` with every step.
"""
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import numpy as np

from base import caffe_io, cli, netcheck
from base.runfolder import RunFolder
from prune import bnstats
from prune.criteria import make as make_criterion
from prune.graph import build_graph
from prune.policy import Plan, PruneError, make_plan, names
from prune.reconstruct import cut
from prune.sample import Evidence, Targets, collect
from prune.surgery import checked_weights, save_pruned
from prune.gradient import gradient_terms


@dataclass
class PruneJob:
    model: str
    weights: str
    out: str
    plan: Plan                         # the channels each group keeps (prune.plans.make)
    criterion: str = "thinet"
    samples_per_image: int = 10
    seed: int = 0
    reconstruct: str = "full"          # full: least squares of every kept weight; scale: ThiNet's; none
    targets: str = "original"          # reconstruct towards the unpruned net's outputs, or the current net's
    ridge: object = "auto"             # float, or "auto": chosen on held-out images per consumer
    positions_per_image: int = 10      # sampled output positions per image for the least squares
    bn_reestimate: str = "none"        # BatchNorm statistics measured again: after each cut, at the end, or never
    blockfit_epochs: float = 0         # after the last cut: each block fitted to the unpruned block (0: no)
    blockfit_lr: float = 3e-4
    data: dict = field(default_factory=dict)   # description of the images, for the record

    def config(self):
        c = asdict(self)
        c["plan"] = self.plan.to_json()
        c["model_sha256"] = caffe_io.file_sha256(self.model)
        c["weights_sha256"] = caffe_io.file_sha256(self.weights)
        return c


def _uses_normals(job):
    """Full least squares, and the scale towards the unpruned net, need the normal equations; ThiNet's own
    scale (towards the current net) needs only the sampled Gram."""
    return job.reconstruct == "full" or (job.reconstruct == "scale" and job.targets == "original")


def needs_images(criterion, reconstruct):
    """Whether a step runs the net on images: to sample for the criterion (a prune.criteria object) or the
    reconstruction."""
    return criterion.needs_images or criterion.needs_gradient or reconstruct != "none"


def _original(job):
    """The unpruned net in Caffe (the part this build runs), and its weights, for reconstruction targets."""
    weights = caffe_io.read_weights(job.weights)
    return caffe_io.runnable_net(caffe_io.read_net(job.model), weights, job.weights), weights


def _check_runnable(job, graph, plan, criterion, left):
    """Before any work: a net with layers this Caffe build lacks (a fork's; ``left``, from
    netcheck.runnable_view) is pruned only where that needs no Caffe run of those layers."""
    if not left:
        return
    gone = {name for name, _ in left}
    roots = netcheck.causes(left)
    what = ", ".join("%s (%s)" % (name, why) for name, why in roots[:2]) + (", ..." if len(roots) > 2 else "")
    if job.bn_reestimate != "none" or job.blockfit_epochs:
        raise PruneError("%s: --%s runs the whole net, and this Caffe build cannot run %s"
                         % (job.model, "bn-reestimate" if job.bn_reestimate != "none" else "blockfit-epochs", what))
    if not needs_images(criterion, job.reconstruct):
        return
    cannot = [gid for gid in plan.keep if any(c.layer in gone for c in graph[gid].consumers)]
    if cannot:
        runs = [gid for gid in plan.keep if gid not in cannot]
        many = len(cannot) > 1
        raise PruneError("%s: group%s %s %s read by layers this Caffe build cannot run (%s), so %s cannot be "
                         "sampled on images: leave %s out (--layers %s) or choose a criterion that reads only "
                         "weights (--criterion l1, bnscale or random) with --reconstruct none"
                         % (job.model, "s" if many else "", ", ".join(cannot), "are" if many else "is", what,
                            "they" if many else "it", "them" if many else "it", ",".join(runs) or "-"))


def _step(job, k, plan, gid, net, weights, criterion, images, original, out_map, teacher=None):
    """Prune one group of the current net: (net, weights, record); ``out_map`` (the original output
    channel of every current one, per layer whose outputs were cut) is updated.  ``teacher``: the unpruned
    caffe.Net, for a criterion that needs a loss gradient."""
    graph = build_graph(net, source=job.model)
    group = graph[gid]
    targets = None
    if _uses_normals(job):
        targets = Targets(net=original[0] if original else None, weights=original[1] if original else None,
                          out_map=out_map, positions=job.positions_per_image)
    if needs_images(criterion, job.reconstruct):
        ev = collect(net, weights, group, images(), job.samples_per_image, seed=job.seed + k, targets=targets)
    else:
        ev = Evidence(group=group, weights=weights)
    if criterion.needs_gradient:
        ev.taylor = gradient_terms(net, weights, [group], images(), teacher)[gid]
    kept = plan.kept.get(gid) or [int(c) for c in criterion.select(ev, plan.keep[gid])]
    removed = sorted(set(range(group.channels)) - set(kept))
    reference = (original[1], out_map) if original else None
    net2, weights2, errors = cut(net, weights, graph, group, ev, kept, job.reconstruct, job.ridge, reference)
    if job.bn_reestimate == "each" and bnstats.batchnorm_layers(net2):
        weights2 = bnstats.reestimate(net2, weights2, images())
    for s in group.producers + group.passengers:     # passengers: depthwise convs, for prune.refit
        if s.blob == 0 and s.axis == 0:
            rows = out_map.get(s.layer, np.arange(np.asarray(weights[s.layer][0]).shape[0]))
            out_map[s.layer] = np.delete(rows, s.indices(removed))
    record = dict(step=k, group=gid, layers=sorted(names(group)), channels=group.channels, kept=len(kept),
                  chosen_by="plan" if gid in plan.kept else "criterion", criterion=job.criterion,
                  reconstruct=job.reconstruct, targets=job.targets,
                  removed_channels=removed, error=errors, images=ev.images, samples=ev.samples,
                  out_map={k_: v.tolist() for k_, v in out_map.items()})
    return net2, weights2, record


def run(job, images, finetune: Optional[Callable] = None, final_finetune: Optional[Callable] = None, progress=True):
    """Prune per ``job``; ``images()`` yields float32 batches for one sampling
    pass (called once per step, twice for a criterion that needs a gradient).  ``finetune(step_dir, proto, weights) ->
    weights`` runs after each step, ``final_finetune`` (same signature) once
    after the last.  Returns the log record."""
    with RunFolder(job.out, PruneError) as folder:
        return _run(job, folder, images, finetune, final_finetune, progress)


def _bn_at_end(folder, proto, model, images):
    """The last step's net with its BatchNorm statistics measured again (kept in the run folder)."""
    path = folder.file("bn_reestimated.caffemodel")
    net = caffe_io.read_net(proto)
    if not os.path.exists(path) and bnstats.batchnorm_layers(net):
        caffe_io.write_weights(net, bnstats.reestimate(net, caffe_io.read_weights(model), images()), path)
    return path if os.path.exists(path) else model


def _blockfit(folder, job, proto, model, images, out_map, progress):
    """finetune.blockfit of the pruned net towards the unpruned one, once (blockfit/record.json)."""
    done = folder.load(os.path.join("blockfit", "record.json"))
    if done is not None:
        return done["caffemodel"]
    from finetune import blockfit
    x = np.concatenate(list(images()))
    net = caffe_io.read_net(proto)
    fitted, blocks = blockfit.fit(net, caffe_io.read_weights(model), caffe_io.read_net(job.model),
                                  caffe_io.read_weights(job.weights), x,
                                  out_map={k: list(v) for k, v in out_map.items()}, epochs=job.blockfit_epochs,
                                  lr=job.blockfit_lr, seed=job.seed, progress=progress)
    path = folder.file(os.path.join("blockfit", "net.caffemodel"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    caffe_io.write_weights(net, fitted, path, protect=(job.model, job.weights))
    folder.save(os.path.join("blockfit", "record.json"), dict(caffemodel=path, blocks=blocks))
    return path


def _run(job, folder, images, finetune, final_finetune, progress):
    from tqdm import tqdm
    config = folder.check(job.config())
    cli.check_outputs(dict(model=job.model, weights=job.weights), [os.path.join(job.out, "")])
    net = caffe_io.read_net(job.model)
    weights = caffe_io.read_weights(job.weights)
    graph = build_graph(net, source=job.model)
    view, left = netcheck.runnable_view(net)
    caffe_io.check_weights(caffe_io.net_from_param(view), weights, job.weights, complete=True)
    checked_weights(graph, weights, job.weights)     # also the layers this Caffe build does not run
    plan = make_plan(graph, job.plan.keep, job.plan.made_by, job.plan.round_to, job.plan.kept)   # fits this net
    criterion = make_criterion(job.criterion, seed=job.seed)
    _check_runnable(job, graph, plan, criterion, left)
    folder.save_config(config)
    folder.save("plan.json", config["plan"])
    proto, model = job.model, job.weights
    original = _original(job) if _uses_normals(job) and job.targets == "original" else None
    teacher = (original or _original(job))[0] if criterion.needs_gradient else None
    out_map = {}
    steps = []
    bar = tqdm(list(plan.keep), desc="prune", unit="group", disable=not progress, dynamic_ncols=True)
    for k, gid in enumerate(bar, 1):
        bar.set_postfix(group=gid)
        step_rel = os.path.join("steps", "%02d_%s" % (k, gid.replace("/", "_")))
        step_dir, record_rel = folder.file(step_rel), os.path.join(step_rel, "step.json")
        record = folder.load(record_rel)
        if record is not None:
            out_map = {k_: np.asarray(v) for k_, v in record.get("out_map", {}).items()}
            steps.append(record)
            proto, model = record["prototxt"], record["caffemodel"]
            continue
        start = time.time()
        net2, weights2, record = _step(job, k, plan, gid, caffe_io.read_net(proto), caffe_io.read_weights(model),
                                       criterion, images, original, out_map, teacher)
        out_proto, out_model = os.path.join(step_dir, "net.prototxt"), os.path.join(step_dir, "net.caffemodel")
        save_pruned(net2, weights2, out_proto, out_model, inputs=(job.model, job.weights))
        record.update(prototxt=out_proto, caffemodel=out_model, seconds=round(time.time() - start, 2))
        if finetune is not None:
            record["pruned_caffemodel"] = out_model
            record["caffemodel"] = finetune(os.path.join(step_dir, "finetune"), out_proto, out_model)
        folder.save(record_rel, record)
        steps.append(record)
        proto, model = record["prototxt"], record["caffemodel"]
    bar.close()
    if job.bn_reestimate in ("end", "each"):
        model = _bn_at_end(folder, proto, model, images)
    if job.blockfit_epochs:
        model = _blockfit(folder, job, proto, model, images, out_map, progress)
    if final_finetune is not None:
        model = final_finetune(os.path.join(job.out, "finetune_final"), proto, model)
    final_proto = os.path.join(job.out, "pruned.prototxt")
    final_model = os.path.join(job.out, "pruned.caffemodel")
    save_pruned(caffe_io.read_net(proto), caffe_io.read_weights(model), final_proto, final_model,
                inputs=(job.model, job.weights))
    log = dict(config=config, steps=steps, prototxt=final_proto, caffemodel=final_model,
               final_finetune=final_finetune is not None,
               not_run_in_caffe=[dict(layer=name, why=why) for name, why in left])
    folder.save("log.json", log)
    return log
