"""One spec, one function: the plan (prune.policy.Plan) of every entry point.

``python -m prune``, ``python -m prune.sensitivity`` and ``apps.pipeline``
take the same flags (``add_arguments``), read them into a ``PlanSpec``
(``spec_of``) and make the plan with ``make``: every policy -- a ratio or a
table, a MACs target with one ratio (``--allocation uniform``) or by the
sensitivity analysis, a latency target, network slimming's threshold, a plan
file -- is there in each of them, and ``--round-to`` rounds the counts of any.
"""
import json
import os
from dataclasses import dataclass
from typing import Callable, Optional

from base import caffe_io, cli
from prune import policy as P
from prune.graph import build_graph
from prune.sensitivity import RATIOS

POLICY_FLAGS = ("keep", "macs_target", "latency_target", "threshold", "plan")


@dataclass(frozen=True)
class PlanSpec:
    keep: object = None                  # a ratio or {group or layer: ratio}; None: 0.5 unless another policy
    layers: object = "all"               # "all" or [group ids / producer layer names]
    macs_target: Optional[float] = None  # the share of the MACs to keep
    allocation: str = "sensitivity"      # how a target is met: the sensitivity analysis, or one uniform ratio
    latency_target: Optional[float] = None   # the share of the batch-1 latency on `runtime` to keep
    runtime: Optional[str] = None        # rank the allocation's cuts by the time they save there
    threshold: Optional[float] = None    # network slimming's global |gamma| threshold
    plan: Optional[str] = None           # a plan file
    round_to: int = 1                    # every cut group keeps a multiple of it
    ratios: tuple = RATIOS               # the sensitivity analysis's grid
    judge_images: int = 128              # ... and its held-out images
    latency_points: Optional[int] = None
    latency_cache: Optional[str] = None

    def policy(self):
        if self.plan is not None:
            return "file"
        if self.threshold is not None:
            return "threshold"
        if self.macs_target is None and self.latency_target is None:
            return "table" if isinstance(self.keep, dict) else "ratio"
        if self.allocation == "uniform":
            return "macs-target"
        return "latency" if self.runtime_of() else "sensitivity"

    def given(self):
        """Whether any policy flag was given (prune.sensitivity writes a plan only then)."""
        return any(getattr(self, k) is not None for k in POLICY_FLAGS)

    def needs_images(self):
        """Whether making the plan runs the net on images (the sensitivity analysis)."""
        return self.policy() in ("sensitivity", "latency")

    def runtime_of(self):
        """The runtime the allocation is ranked on: --runtime, caffe with --latency-target alone, or None."""
        return self.runtime or ("caffe" if self.latency_target is not None else None)


@dataclass(frozen=True)
class Sampling:
    """What the sensitivity analysis runs on: ``images(held_out)`` -> (fit, judge), two callables yielding
    float32 batches; ``folder`` gets sensitivity.json (resumable) and sensitivity.png."""
    images: Callable
    folder: str
    blob: str
    criterion: str = "thinet"
    seed: int = 0
    progress: bool = False


def make(spec, model, weights=None, sampling=None):
    """The plan of ``spec`` for the net ``model`` (a prototxt path; ``weights`` its caffemodel, read by the
    threshold and the sensitivity analysis; ``sampling`` the analysis's images), rounded to spec.round_to."""
    net = caffe_io.read_net(model)
    graph = build_graph(net, source=model)
    how = spec.policy()
    made_by = dict(policy=how, net=model, layers=spec.layers if spec.layers == "all" else list(spec.layers))
    if how == "file":
        plan = P.read_plan(spec.plan, graph)
        if spec.layers != "all":
            only = {g.id for g in P.chosen(graph, spec.layers)}
            plan = P.make_plan(graph, {g: k for g, k in plan.keep.items() if g in only}, plan.made_by,
                               kept=plan.kept, source=spec.plan)
    elif how == "threshold":
        plan = P.by_threshold(graph, caffe_io.read_weights(weights), spec.layers, spec.threshold,
                              dict(made_by, threshold=spec.threshold))
    elif how in ("ratio", "table"):
        keep = 0.5 if spec.keep is None else spec.keep
        plan = P.from_ratios(graph, spec.layers, keep, dict(made_by, keep=keep), spec.round_to)
    elif how == "macs-target":
        from prune.macs import MacsModel
        plan = P.for_macs(MacsModel(net, graph=graph), spec.layers, spec.macs_target,
                          dict(made_by, macs_target=spec.macs_target), spec.round_to)
    else:
        plan = _allocated(spec, net, graph, weights, sampling, made_by)
    return plan.rounded(spec.round_to, model)


def analysis(spec, net, weights, sampling, shard=None):
    """The sensitivity curves (prune.sensitivity.analyse) of the groups of spec.layers, and their plot;
    ``shard`` = (i, n): only the i-th of every n of those groups, in network order (1-based)."""
    from prune import sensitivity
    graph = build_graph(net)
    groups = None if spec.layers == "all" else [g.id for g in P.chosen(graph, spec.layers)]
    if shard:
        groups = [g for k, g in enumerate(groups or [g.id for g in graph.prunable()]) if k % shard[1] == shard[0] - 1]
    fit, judge = sampling.images(spec.judge_images)
    os.makedirs(sampling.folder, exist_ok=True)
    record = sensitivity.analyse(net, weights, fit, judge, sampling.blob,
                                 os.path.join(sampling.folder, "sensitivity.json"), spec.ratios, groups=groups,
                                 progress=sampling.progress, criterion=sampling.criterion, seed=sampling.seed)
    sensitivity.plot(record, os.path.join(sampling.folder, "sensitivity.png"))
    if groups is not None:
        record = dict(record, curves={g: c for g, c in record["curves"].items() if g in groups})
    return record


def _allocated(spec, net, graph, weights, sampling, made_by):
    """The sensitivity allocation for spec's MACs and/or latency target (ranked by time on its runtime)."""
    from prune import latency, sensitivity
    from prune.macs import MacsModel
    if sampling is None:
        raise P.PruneError("the sensitivity allocation runs the net on images: give --data")
    record = analysis(spec, net, caffe_io.read_weights(weights), sampling)
    macs = MacsModel(net, graph=graph)
    runtime, model = spec.runtime_of(), None
    if runtime:
        cli.say("plan", "latency table of every layer on %s" % runtime, not sampling.progress)
        model = latency.model_for(net, runtime, graph=graph, round_to=spec.round_to, points=spec.latency_points,
                                  lowest=min(spec.ratios), cache_dir=spec.latency_cache, progress=sampling.progress)
    got = sensitivity.allocation(record, macs, spec.macs_target, latency=model, latency_target=spec.latency_target,
                                 round_to=spec.round_to)
    made_by = dict(made_by, macs_target=spec.macs_target, latency_target=spec.latency_target, runtime=runtime,
                   criterion=sampling.criterion, ratios=list(spec.ratios), judge_images=spec.judge_images,
                   macs_share=got["macs_share"],
                   predicted_damage=got["predicted_damage"], **({"latency": got["latency"]} if model else {}))
    return P.make_plan(graph, got["keep"], made_by, spec.round_to)


def sampling_of(a, shape, folder, blob):
    """The Sampling of the prune tools' image flags (prune.options: --data, --images, --batch, --seed)."""
    from base.images import image_batches
    from prune import options

    def images(held_out):
        root, fit, pre, judge = options.images_of(a, shape, held_out=held_out)
        return (lambda: image_batches(root, fit, pre, a.batch)), (lambda: image_batches(root, judge, pre, a.batch))
    return Sampling(images, folder, blob, criterion_of(a), a.seed, not a.quiet)


def write(plan, path):
    """The plan file (Plan.to_json), written whole or not at all."""
    caffe_io.atomic_write(path, json.dumps(plan.to_json(), indent=1))
    return path


def summary(plan):
    """One line: the policy and every group's count."""
    m = plan.made_by
    reached = "".join(", %s %s" % (k.replace("_", " "), m[k]) for k in ("macs_share", "predicted_damage") if k in m)
    rounding = ", multiples of %d" % plan.round_to if plan.round_to > 1 else ""
    return "plan (%s%s%s): %s" % (m["policy"], reached, rounding, ", ".join(
        "%s %d/%d" % (g, k, plan.channels[g]) for g, k in plan.keep.items()))


# ------------------------------------------------------------------ command line

def add_arguments(ap):
    """The plan flags of every entry point; returns the group of the mutually exclusive policies (where
    apps.pipeline adds its --preset)."""
    from prune.latency import TableSpec
    from runtimes import LATENCY_KINDS
    g = ap.add_argument_group("how many channels each group keeps (prune.plans; one of --keep, --macs-target, "
                              "--threshold, --plan)")
    how = g.add_mutually_exclusive_group()
    how.add_argument("--keep", type=cli.parse_keep, default=None,
                     help="share of channels kept: one ratio for every selected group (0.5, the default), or a "
                          "table by layer/group name (conv1_1=0.5,conv2_1=0.75)")
    how.add_argument("--macs-target", type=cli.open_fraction, default=None,
                     help="the share of the net's MACs to keep (e.g. 0.5); how much each group keeps: see "
                          "--allocation")
    how.add_argument("--threshold", type=cli.non_negative, default=None,
                     help="network slimming's global threshold (e.g. 0.1): every channel whose |gamma| (Scale "
                          "after BatchNorm, the largest over a residual stream) is below it goes, chosen once "
                          "here; a group keeps at least its largest channel. Needs BatchNorm + Scale after the "
                          "convs; implies --criterion bnscale")
    how.add_argument("--plan", default=None,
                     help="a plan file, JSON with a 'keep' table {group or layer: channels kept} (as every "
                          "entry point writes it: OUT/plan.json; run as it stands, edited or not; groups left "
                          "out are not pruned)")
    g.add_argument("--allocation", default="sensitivity", choices=("sensitivity", "uniform"),
                   help="with --macs-target: sensitivity (default): per-group counts with the least summed damage "
                        "of the sensitivity analysis (needs images; curves in OUT/plan/); uniform: one ratio for "
                        "every selected group, found by bisection on the MACs model")
    g.add_argument("--layers", type=cli.name_list, default=None,
                   help="comma-separated layers or group ids the plan may cut, in any order (they are pruned in "
                        "network order); default all prunable groups (python -m prune.groups lists them)")
    g.add_argument("--round-to", type=cli.count, default=1, metavar="N", help="with any policy: " + P.ROUND_TO_HELP)
    g.add_argument("--latency-target", type=cli.open_fraction, default=None,
                   help="the share of the net's batch-1 latency on --runtime to keep (e.g. 0.5), met by the "
                        "sensitivity allocation, predicted from a per-layer table measured on that runtime "
                        "(prune.latency); with --macs-target both must hold")
    g.add_argument("--runtime", choices=LATENCY_KINDS, default=None,
                   help="the runtime the latency table is measured on (default caffe with --latency-target); "
                        "given with --macs-target alone, the allocation still ranks its cuts by the time they save "
                        "there (opencv: OpenCV DNN with fusion, as deployed; mnn: MNN's converter and interpreter)")
    g.add_argument("--latency-points", type=cli.count, default=None,
                   help="channel counts timed per cut weight axis of every layer (default %d; interpolated "
                        "between)" % TableSpec.points)
    g.add_argument("--latency-cache", default=None,
                   help="folder of the measured tables, one per net, runtime and machine (default .cache/latency "
                        "in the repository)")
    g.add_argument("--ratios", type=_ratios, default=RATIOS,
                   help="keep ratios the sensitivity analysis tries, comma-separated (default %s)"
                        % ",".join("%g" % r for r in RATIOS))
    g.add_argument("--judge-images", type=cli.count, default=128,
                   help="further images, never sampled, on which the sensitivity analysis measures the damage "
                        "(default 128)")
    return how


def _ratios(text):
    import argparse
    try:
        values = tuple(sorted({float(v) for v in text.split(",") if v.strip()}))
    except ValueError:
        values = ()
    if not values or not all(0 < v < 1 for v in values):
        raise argparse.ArgumentTypeError("expected comma-separated ratios in (0, 1), not %r" % text)
    return values


def spec_of(a, **instead):
    """The PlanSpec of parsed arguments (``instead``: fields an entry point sets itself, e.g. a preset)."""
    fields = {k: getattr(a, k) for k in PlanSpec.__dataclass_fields__}
    fields["layers"] = "all" if a.layers in (None, ("all",)) else a.layers
    return PlanSpec(**dict(fields, **instead))


def criterion_of(a):
    """--criterion, or bnscale with --threshold, thinet otherwise."""
    return a.criterion or ("bnscale" if a.threshold is not None else "thinet")


def check_arguments(a):
    """Refuse up front: flags that steer nothing, a runtime not installed here, --threshold with another
    criterion."""
    import runtimes
    uniform = a.allocation == "uniform" and a.macs_target is not None
    if a.latency_target is not None and (uniform or any(getattr(a, k) is not None for k in ("keep", "threshold",
                                                                                             "plan"))):
        raise cli.UsageError("--latency-target is met by the sensitivity allocation; it excludes --keep, "
                             "--threshold, --plan and --allocation uniform")
    if a.runtime and a.latency_target is None and a.macs_target is None:
        raise cli.UsageError("--runtime ranks the cuts of an allocation: give --macs-target or --latency-target")
    if a.runtime and uniform:
        raise cli.UsageError("--runtime ranks the sensitivity allocation's cuts; --allocation uniform has none")
    if a.threshold is not None and a.criterion not in (None, "bnscale"):
        raise cli.UsageError("--threshold prunes by |gamma|: it needs --criterion bnscale, not %s" % a.criterion)
    runtime = spec_of(a).runtime_of()
    why = runtime and runtimes.missing(runtime)
    if why:
        raise cli.UsageError("--runtime %s: %s" % (runtime, why))
