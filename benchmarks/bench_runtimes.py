"""Where pruned nets run: batch-1 latency of original and pruned nets in Caffe, OpenCV DNN and MNN, one run.

Nets: SphereFace-4/10/20 (prototxt/, He-scaled random weights: latency
depends on the shapes only, so random weights time exactly what trained ones
would) and the real MobileFaceNet of ../shared.  Variants of each (every
pruned net keeps the first channels of each group, written by prune.surgery
and loaded back by each runtime):

* ``keep 0.75``, ``keep 0.5``: every prunable group at that ratio;
* ``uniform 50% MACs`` / ``... r8``: the one ratio that leaves half the MACs
  (prune.policy.for_macs; counts such as 45 of 64), and the same with
  every count rounded to a multiple of --round-to (prune.policy.keep_count);
* MobileFaceNet only, from its sensitivity curves (--sensitivity, measured by
  the retention work): ``MACs-allocated 50%`` (prune.sensitivity.plan, cuts
  ranked by MACs saved) and ``latency-allocated 50% on R`` (the same MACs
  target, cuts ranked by the time they save on runtime R, from R's measured
  per-layer table, prune.latency), each also rounded; and ``equal-latency on
  R``: no MACs target, the cuts ranked by time on R down to the latency R's
  table predicts for the MACs-allocated net (the same time for less damage:
  it keeps more MACs).

All variants of one net and every runtime run in ONE process, interleaved
round by round (runtimes.median_ms, one thread each, warm-up first);
each number is the median over the rounds of ms per batch-1 forward pass.
speed-up = original ms / variant ms in the same runtime; meas/theo =
speed-up / MACs reduction.  For SphereFace-20 at keep 0.5 the per-layer cause
is measured too: every costed layer alone on each runtime (prune.latency's
tables), its time at full and at half width against its MACs reduction,
grouped by layer kind, and the time of everything else (PReLU, Eltwise, ...).

    .venv/bin/python benchmarks/bench_runtimes.py            # everything; results in docs/results/
    .venv/bin/python benchmarks/bench_runtimes.py --nets sphereface20 --rounds 5
"""
import json
import os
import sys
import tempfile

from common import MFN, ROOT, add_threads_and_seed, machine, parser  # first: puts the repository on sys.path

import numpy as np  # noqa: E402

from base import caffe_io  # noqa: E402
from base.netinput import input_layer  # noqa: E402
import runtimes  # noqa: E402
from prune import latency, sensitivity  # noqa: E402
from prune.graph import build_graph  # noqa: E402
from prune.macs import MacsModel  # noqa: E402
from prune.policy import for_macs, keep_count  # noqa: E402
from prune.surgery import prune_net, save_pruned  # noqa: E402

RESULTS = os.path.join(ROOT, "docs", "results")


def parse_args(argv=None):
    p = parser(__doc__)
    p.add_argument("--nets", default="sphereface4,sphereface10,sphereface20,mobilefacenet",
                   help="comma-separated: sphereface<depth> and/or mobilefacenet")
    p.add_argument("--runtimes", default=",".join(runtimes.LATENCY_KINDS),
                   help="runtimes, comma-separated among %s" % ",".join(runtimes.KINDS))
    p.add_argument("--mobilefacenet", default=MFN, help="MobileFaceNet path prefix (.prototxt, .caffemodel)")
    p.add_argument("--sensitivity", default=os.path.join(RESULTS, "mobilefacenet_sensitivity.json"),
                   help="the MobileFaceNet's sensitivity curves (python -m prune.sensitivity's sensitivity.json)")
    p.add_argument("--macs-target", type=float, default=0.5, help="share of the MACs of the allocated variants")
    p.add_argument("--round-to", type=int, default=8, help="multiple of the rounded variants")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds; the median counts")
    p.add_argument("--min-seconds", type=float, default=0.2, help="least time per net, runtime and round")
    p.add_argument("--latency-points", type=int, default=8, help="counts per axis of the per-layer tables")
    add_threads_and_seed(p, "threads of every runtime", "seed of the random weights and the input")
    p.add_argument("--out", default=os.path.join(RESULTS, "bench_runtimes.json"), help="JSON results")
    return p.parse_args(argv)


def write_variant(net, weights, graph, kept, stem, source):
    """stem.prototxt + .caffemodel: the net with the first ``kept[g]`` channels of each group g."""
    plan = {g: np.arange(k) for g, k in kept.items() if k < graph[g].channels}
    if not plan:
        return source
    pruned, pruned_weights = prune_net(net, weights, plan, graph=graph)
    return save_pruned(pruned, pruned_weights, stem + ".prototxt", stem + ".caffemodel", inputs=source)


def base_net(name, args, folder):
    """(prototxt, caffemodel, note) of a benchmark net, or None when its files are absent."""
    if name == "mobilefacenet":
        proto, model = args.mobilefacenet + ".prototxt", args.mobilefacenet + ".caffemodel"
        return (proto, model, "real weights") if os.path.exists(model) else None
    proto = os.path.join(ROOT, "prototxt", "%s_deploy.prototxt" % name)
    if not os.path.exists(proto):
        raise SystemExit("--nets: unknown net %r" % name)
    net = caffe_io.read_net(proto)
    model = caffe_io.write_weights(net, latency.random_weights(net, args.seed), os.path.join(folder, name + ".caffemodel"))
    return proto, model, "random weights"


def uniform_variants(net, model, args):
    """{label: kept counts} of the ratio-for-every-group variants."""
    ch = model.channels()
    out = {"keep 0.75": {g: keep_count(0.75, c) for g, c in ch.items()},
           "keep 0.5": {g: keep_count(0.5, c) for g, c in ch.items()}}
    for n in (1, args.round_to):
        plan = for_macs(model, "all", args.macs_target, dict(policy="macs-target"), round_to=n)
        out["uniform %d%% MACs%s" % (100 * args.macs_target, " r%d" % n if n > 1 else "")] = {
            g: plan.keep.get(g, c) for g, c in ch.items()}
    return out


def allocated_variants(net, proto, model, args, kinds):
    """{label: kept} of the MACs- and latency-allocated MobileFaceNets (sensitivity curves of --sensitivity),
    and {runtime: LatencyModel}."""
    record = json.load(open(args.sensitivity))
    lowest = min(record["ratios"])
    out, models = {}, {}
    for n in (1, args.round_to):
        suffix = " r%d" % n if n > 1 else ""
        out["MACs-allocated%s" % suffix] = sensitivity.allocate(record, model, args.macs_target, round_to=n)
        for kind in kinds:
            lat = latency.model_for(net, kind, source=proto, graph=model.graph, round_to=n, points=args.latency_points,
                                    lowest=lowest, progress=True)
            models.setdefault(kind, lat)
            out["latency-allocated on %s%s" % (kind, suffix)] = sensitivity.allocate(
                record, model, args.macs_target, round_to=n, rank=lat)
            if n == 1:      # no MACs target: the latency the MACs-ranked plan predicts, at the least damage
                out["equal-latency on %s" % kind] = sensitivity.allocate(
                    record, lat, lat.share(out["MACs-allocated"]), rank=lat)
    return out, models, record


def time_variants(files, kinds, args):
    """{(runtime, label): median ms} of every variant in every runtime, one process, interleaved."""
    with tempfile.TemporaryDirectory() as work, runtimes.pinned(args.threads):
        nets = {"v%d" % i: f for i, f in enumerate(files.values())}
        sessions = runtimes.open_sessions(kinds, nets, work, args.threads)
        _, shape = input_layer(caffe_io.read_net(files[next(iter(files))][0]))
        x = np.random.default_rng(args.seed).uniform(-1, 1, (1,) + tuple(shape[1:])).astype(np.float32)
        for s in sessions.values():
            s.run(x)
        ms = runtimes.median_ms(sessions, rounds=args.rounds, min_seconds=args.min_seconds)
    labels = dict(zip(nets, files))
    return {(kind, labels[key]): t for (kind, key), t in ms.items()}


def layer_cause(net, proto, model, kept, kinds, args):
    """Per layer kind, on each runtime: the costed layers' time alone (prune.latency's tables) at full and at
    ``kept`` width against their MACs, and the rest of the net's time (layers that count no MACs)."""
    out = {}
    for kind in kinds:
        lat = latency.model_for(net, kind, source=proto, graph=model.graph, points=args.latency_points, progress=True)
        full, cut = lat.per_layer({}), lat.per_layer(kept)
        m_full, m_cut = model.per_layer({}), model.per_layer(kept)
        rows = {}
        for name, u in lat.units.items():
            r = rows.setdefault(u["kind"], dict(layers=0, ms=0.0, ms_pruned=0.0, macs=0.0, macs_pruned=0.0))
            r["layers"] += 1
            r["ms"] += full[name]
            r["ms_pruned"] += cut[name]
            r["macs"] += m_full[name]
            r["macs_pruned"] += m_cut[name]
        for r in rows.values():
            r["speedup"] = r["ms"] / max(r["ms_pruned"], 1e-9)
            r["macs_reduction"] = r["macs"] / max(r["macs_pruned"], 1e-9)
            r["measured_over_theoretical"] = r["speedup"] / r["macs_reduction"]
        out[kind] = dict(kinds=rows, rest_ms=lat.rest, whole_ms=lat.table["whole_ms"],
                         predicted_ms=lat.cost({}), predicted_pruned_ms=lat.cost(kept),
                         overhead_ms=lat.overhead)
    return out


def bench_net(name, args, kinds, folder):
    """The rows of one net: every variant in every runtime."""
    found = base_net(name, args, folder)
    if found is None:
        print("%s: files not found, skipped" % name, file=sys.stderr)
        return [], None
    proto, model_path, note = found
    net, weights = caffe_io.read_net(proto), caffe_io.read_weights(model_path)
    macs = MacsModel(net, source=proto)
    variants = {"original": {}}
    variants.update(uniform_variants(net, macs, args))
    extra, curves = {}, None
    if name == "mobilefacenet" and os.path.exists(args.sensitivity):
        allocated, _, curves = allocated_variants(net, proto, macs, args, kinds)
        variants.update(allocated)
    files = {label: write_variant(net, weights, macs.graph, kept, os.path.join(folder, "%s_%d" % (name, i)),
                                  (proto, model_path)) for i, (label, kept) in enumerate(variants.items())}
    print("timing %s: %d nets x %d runtimes x %d rounds ..." % (name, len(files), len(kinds), args.rounds),
          file=sys.stderr, flush=True)
    ms = time_variants(files, kinds, args)
    rows = []
    for label, kept in variants.items():
        reduction = macs.total / macs.macs(kept)
        row = dict(net=name, weights=note, variant=label, macs=macs.macs(kept), macs_reduction=reduction,
                   channels={g: k for g, k in kept.items() if k < macs.graph[g].channels}, runtimes={})
        if curves is not None:      # the accuracy budget: the damage the sensitivity curves predict
            row["predicted_damage"] = sensitivity.predicted_damage(curves, kept)
        for kind in kinds:
            speedup = ms[kind, "original"] / ms[kind, label]
            row["runtimes"][kind] = dict(ms=ms[kind, label], speedup=speedup, measured_over_theoretical=speedup / reduction)
        rows.append(row)
    if name == "sphereface20":
        extra = layer_cause(net, proto, macs, variants["keep 0.5"], kinds, args)
    return rows, extra


def print_table(rows, kinds):
    head = "%-14s %-30s %8s %8s" % ("net", "variant", "MMACs", "MACs red")
    for kind in kinds:
        head += " | %-6.6s %7s %7s %5s" % (kind, "ms", "speedup", "m/t")
    print(head)
    for r in rows:
        line = "%-14s %-30s %8.1f %7.2fx" % (r["net"], r["variant"][:30], r["macs"] / 1e6, r["macs_reduction"])
        for kind in kinds:
            t = r["runtimes"][kind]
            line += " | %-6s %7.2f %6.2fx %5.2f" % ("", t["ms"], t["speedup"], t["measured_over_theoretical"])
        print(line)


def print_cause(cause):
    for kind, c in cause.items():
        print("SphereFace-20 keep 0.5 on %s, per layer kind (each layer timed alone): whole net %.2f ms, "
              "predicted %.2f -> %.2f ms, rest (no MACs) %.2f ms" % (kind, c["whole_ms"], c["predicted_ms"],
                                                                    c["predicted_pruned_ms"], c["rest_ms"]))
        for k, r in sorted(c["kinds"].items()):
            print("    %-20s %2d layers  %8.2f -> %7.2f ms  %5.2fx  MACs %5.2fx  meas/theo %.2f" % (
                k, r["layers"], r["ms"], r["ms_pruned"], r["speedup"], r["macs_reduction"],
                r["measured_over_theoretical"]))


def main(argv=None):
    args = parse_args(argv)
    kinds = [k.strip() for k in args.runtimes.split(",") if k.strip()]
    skipped = {k: runtimes.missing(k) for k in kinds if runtimes.missing(k)}
    for k, why in skipped.items():
        print("%s skipped: %s" % (runtimes.LABELS[k], why), file=sys.stderr)
    kinds = [k for k in kinds if k not in skipped]
    rows, cause, load = [], {}, [os.getloadavg()]
    with tempfile.TemporaryDirectory() as folder:
        for name in args.nets.split(","):
            got, extra = bench_net(name.strip(), args, kinds, folder)
            rows += got
            cause = extra or cause
    print("batch 1, median of %d interleaved rounds, %d thread(s) per runtime, %s" % (args.rounds, args.threads,
                                                                                   machine()["node"]))
    print_table(rows, kinds)
    print_cause(cause)
    result = dict(runtimes={k: dict(label=runtimes.LABELS[k], version=runtimes.version(k)) for k in kinds},
                  skipped=skipped, rounds=args.rounds, min_seconds=args.min_seconds, threads=args.threads,
                  macs_target=args.macs_target, round_to=args.round_to, sensitivity=args.sensitivity,
                  rows=rows, sphereface20_keep05_per_layer=cause, cpu=latency.machine()["cpu"],
                  load_average_start_end=load + [os.getloadavg()], **machine())
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    caffe_io.atomic_write(args.out, json.dumps(result, indent=1) + "\n")
    print("wrote %s" % args.out)


if __name__ == "__main__":
    main()
