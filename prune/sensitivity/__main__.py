"""python -m prune.sensitivity: the sensitivity curves of every channel group, and a plan (prune.plans)."""
import os

from base import caffe_io, cli
from base.runfolder import CONFIG, RunFolder, command_config, differences
from prune import plans
from prune.criteria import CRITERIA
from prune.sensitivity import SensitivityError

PROG = "python -m prune.sensitivity"


def parser():
    from prune import options
    ap = cli.parser(
        PROG,
        description="Measure how much each channel group of a net can lose: every prunable group alone is cut to "
                    "each ratio of --ratios with the closed-form step of python -m prune (ThiNet choice, least "
                    "squares towards the unpruned net) and the damage to the embedding (mean 1 - cos to the "
                    "unpruned net's) is measured on --judge-images images the step did not sample. Writes "
                    "OUT/sensitivity.json (resumable) and OUT/sensitivity.png; given a plan policy (the flags "
                    "of python -m prune: --macs-target for the allocation with the least summed damage, "
                    "--latency-target or --runtime to allocate by the measured latency of every layer on a "
                    "runtime, or --keep, --threshold, --plan) also OUT/plan.json, the channels each group keeps, "
                    "which python -m prune --plan OUT/plan.json runs (edit the counts freely).")
    cli.add_net(ap, weights_required=True, blob_default=None, blob_required=True,
                blob_help="embedding blob whose change is the damage (e.g. fc5, fc1)")
    options.add_images(ap, "images the closed-form step samples (default: all, at most %d)" % options.DEFAULT_IMAGES)
    ap.add_argument("--criterion", default=None, choices=sorted(CRITERIA),
                    help="channel criterion of the step (default thinet; bnscale with --threshold)")
    plans.add_arguments(ap)
    shards = ap.add_argument_group("sharing the analysis between machines (a job array: every group's curve is "
                                   "measured alone, so shards merged equal one run)")
    how = shards.add_mutually_exclusive_group()
    how.add_argument("--shard", type=shard, default=None, metavar="I/N",
                     help="measure only the I-th of every N prunable groups (in network order) into this --out; "
                          "no plan (it needs every curve): merge the N folders")
    how.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                     help="the folders of the shards of one analysis (the same flags but --shard and --out): "
                          "their curves into OUT/sensitivity.json, then the plan as usual")
    cli.add_run(ap, "folder for sensitivity.json, sensitivity.png and plan.json")
    return ap


def shard(text):
    """'I/N' with 1 <= I <= N -> (I, N)."""
    import argparse
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError("expected I/N (e.g. 2/4), not %r" % text) from None
    if not 1 <= i <= n:
        raise argparse.ArgumentTypeError("expected I/N with 1 <= I <= N, not %r" % text)
    return i, n


def merged(a, config, graph, spec):
    """The shards' curves of --merge as one record, after checking that they measured what this run would."""
    import json
    from prune import policy
    from prune.sensitivity import merge
    records = []
    mine = json.loads(json.dumps({k: v for k, v in config.items() if k not in SHARD_ONLY}))   # as stored
    for folder in a.merge:
        paths = [os.path.join(folder, name) for name in (CONFIG, "sensitivity.json")]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise SensitivityError("--merge %s: no %s (the --out of a --shard run?)" % (folder, missing[0]))
        theirs = {k: v for k, v in json.load(open(paths[0])).items() if k not in SHARD_ONLY}
        other = differences(theirs, mine, flags=True)
        if other:
            raise SensitivityError("--merge %s was measured with other settings (%s)" % (folder, "; ".join(other)))
        records.append(json.load(open(paths[1])))
    unmeasured = {g for r in records for g in r.get("not_measured", {})}    # a fork net's groups left out
    wanted = [g.id for g in (graph.prunable() if spec.layers == "all" else policy.chosen(graph, spec.layers))
              if g.id not in unmeasured]
    return merge(records, wanted, a.merge)


@cli.entry(PROG)
def main(argv=None):
    from base.netinput import input_layer
    a = parser().parse_args(argv)
    plans.check_arguments(a)
    spec = plans.spec_of(a)
    if a.shard and spec.given():
        raise cli.UsageError("--shard measures part of the curves and makes no plan: give the plan flags to the "
                             "--merge run")
    if a.round_to > 1 and not spec.given():
        raise cli.UsageError("--round-to rounds a plan's counts: give --macs-target, --latency-target, --keep, "
                             "--threshold or --plan")
    cli.check_run_inputs(a, dict(model=a.model, weights=a.weights, pairs=a.pairs, plan=a.plan,
                                 data=a.data if os.path.isfile(a.data) else None), nets=[("model", "weights")],
                         runnable_part=True)
    net, weights = caffe_io.read_net(a.model), caffe_io.read_weights(a.weights)
    _, shape = input_layer(net, a.model)
    sampling = plans.sampling_of(a, shape, a.out, a.blob)
    if spec.given() and not spec.needs_images():   # a plan that needs no analysis: refused before it runs
        plans.make(spec, a.model, a.weights)
    with RunFolder(a.out, SensitivityError) as run:
        if run.exists("sensitivity.json") and not run.exists(CONFIG):
            raise SensitivityError("%s holds a sensitivity.json without the config.json that says how it was made; "
                                   "use another --out" % a.out)
        hashed = ("model", "weights", "pairs", "plan") + (("data",) if os.path.isfile(a.data) else ())
        config = command_config(a, hashed=hashed, leave_out=PLAN_ONLY)
        if a.merge:
            from prune.graph import build_graph
            record = merged(a, config, build_graph(net, a.model), spec)
        run.guard(config, flags=True)
        if a.merge:
            run.save("sensitivity.json", record)    # the analysis below finds every curve measured
        record = plans.analysis(spec, net, weights, sampling, shard=a.shard)
        print("%-32s %5s  %s" % ("group", "chans", "  ".join("%6g" % r for r in a.ratios)))
        for gid, c in record["curves"].items():
            print("%-32s %5d  %s" % (gid, c["channels"], "  ".join("%6.4f" % c["damage"]["%g" % r]
                                                                   for r in a.ratios)))
        if spec.given():
            plan = plans.make(spec, a.model, a.weights, sampling)
            print("%s: %s" % (plans.summary(plan), plans.write(plan, os.path.join(a.out, "plan.json"))))
    return 0


# Flags that only shape the plan made from the curves: a second run with other values reads the curves back.
PLAN_ONLY = ("macs_target", "allocation", "keep", "threshold", "plan", "round_to", "latency_target", "runtime",
             "latency_points", "latency_cache", "quiet", "out", "debug")
SHARD_ONLY = PLAN_ONLY + ("shard", "merge")     # what may differ between the shards and their merge


if __name__ == "__main__":
    cli.run(main)
