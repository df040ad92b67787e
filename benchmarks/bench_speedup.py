"""Measured Caffe CPU speed-up of pruned nets against their MACs reduction.

Every prunable channel group of each net is cut to --keeps of its channels
(the first ones: timing depends only on the shapes, so no selection is run)
with prune.surgery, written to a temporary folder and loaded back by real
Caffe. The original and its pruned versions are timed in ONE process,
interleaved round by round (runtimes.forward_ms), at batch 1 and 32; each
number is the median over the rounds of milliseconds per image. SphereFace
nets get He-scaled random weights (tests/nets.py); MobileFaceNet is the real
model from ../shared (skipped if absent).

    speed-up  = ms/image of the original / ms/image of the pruned net
    MACs red. = MACs of the original / MACs of the pruned net (prune.stats)
    meas/theo = speed-up / MACs reduction (1.0: the pruned net is exactly as
                much faster as its MACs say)

    .venv/bin/python benchmarks/bench_speedup.py
    .venv/bin/python benchmarks/bench_speedup.py --nets sphereface20 --rounds 9
"""
import json
import os
import sys
import tempfile

import numpy as np
from threadpoolctl import threadpool_limits

from common import MFN, ROOT, add_threads_and_seed, machine, parser  # first: puts the repository on sys.path

from base import caffe_io  # noqa: E402
from prune.graph import build_graph  # noqa: E402
from runtimes import forward_ms  # noqa: E402
from prune.stats import net_stats  # noqa: E402
from prune.surgery import prune_net, save_pruned  # noqa: E402


def parse_args(argv=None):
    p = parser(__doc__)
    p.add_argument("--nets", default="sphereface4,sphereface10,sphereface20,mobilefacenet",
                   help="comma-separated: sphereface<depth> (prototxt/sphereface<depth>_deploy.prototxt, random "
                        "weights) and/or mobilefacenet (--mobilefacenet)")
    p.add_argument("--mobilefacenet", default=MFN, help="MobileFaceNet path prefix (.prototxt, .caffemodel)")
    p.add_argument("--keeps", default="0.75,0.5", help="comma-separated fractions of channels kept in every group")
    p.add_argument("--batches", default="1,32", help="comma-separated batch sizes")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds; the median counts")
    p.add_argument("--min-seconds", type=float, default=0.2, help="least time per net, batch and round")
    add_threads_and_seed(p, "BLAS threads of Caffe", "seed of the random weights and the input")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "bench_speedup.json"), help="JSON results")
    return p.parse_args(argv)


def source(name, args):
    """(prototxt, caffemodel or None for random weights), or None when the files are absent."""
    if name == "mobilefacenet":
        proto, model = args.mobilefacenet + ".prototxt", args.mobilefacenet + ".caffemodel"
        return (proto, model) if os.path.exists(proto) and os.path.exists(model) else None
    if name.startswith("sphereface") and name[len("sphereface"):].isdigit():
        proto = os.path.join(ROOT, "prototxt", "%s_deploy.prototxt" % name)
        return (proto, None) if os.path.exists(proto) else None
    raise SystemExit("--nets: unknown net %r (sphereface<depth> or mobilefacenet)" % name)


def variants(name, proto, model, keeps, folder, seed):
    """{label: (prototxt, caffemodel)}: the original and one pruned net per keep ratio."""
    net = caffe_io.read_net(proto)
    if model is None:
        from tests.nets import random_weights
        weights = random_weights(proto, seed=seed)
        model = os.path.join(folder, name + ".caffemodel")
        caffe_io.write_weights(net, weights, model)
    else:
        weights = caffe_io.read_weights(model)
    graph = build_graph(net, proto)
    out = {"original": (proto, model)}
    for keep in keeps:
        plan = {g.id: np.arange(max(1, int(round(keep * g.channels)))) for g in graph.prunable()}
        pruned, pruned_weights = prune_net(net, weights, plan, graph=graph)
        stem = os.path.join(folder, "%s_keep%g" % (name, keep))
        out["keep %g" % keep] = save_pruned(pruned, pruned_weights, stem + ".prototxt", stem + ".caffemodel",
                                            inputs=(proto, model))
    return out


def main(argv=None):
    args = parse_args(argv)
    keeps = [float(k) for k in args.keeps.split(",")]
    batches = tuple(int(b) for b in args.batches.split(","))
    rows = []
    with tempfile.TemporaryDirectory() as folder, threadpool_limits(args.threads):
        for name in args.nets.split(","):
            found = source(name, args)
            if found is None:
                print("%s: files not found, skipped" % name)
                continue
            nets = variants(name, *found, keeps, folder, args.seed)
            macs = {label: net_stats(proto).macs for label, (proto, _) in nets.items()}
            print("timing %s: %d nets x batches %s x %d rounds ..." % (name, len(nets), args.batches, args.rounds),
                  file=sys.stderr, flush=True)
            ms = forward_ms(nets, batches=batches, rounds=args.rounds, min_seconds=args.min_seconds, seed=args.seed)
            for label in nets:
                reduction = macs["original"] / macs[label]
                row = {"net": name, "variant": label, "macs": macs[label], "macs_reduction": round(reduction, 3)}
                for b in batches:
                    speedup = ms["original"][b] / ms[label][b]
                    row["batch%d" % b] = {"ms_per_image": round(ms[label][b], 3), "speedup": round(speedup, 3),
                                          "measured_over_theoretical": round(speedup / reduction, 3)}
                rows.append(row)

    head = "%-14s  %-10s  %8s  %9s" % ("net", "variant", "MMACs", "MACs red.")
    for b in batches:
        head += "  %12s  %8s  %9s" % ("b%d ms/img" % b, "speed-up", "meas/theo")
    print("Caffe CPU, %d BLAS thread(s), median of %d interleaved rounds, %s" % (args.threads, args.rounds,
                                                                              machine()["node"]))
    print(head)
    for r in rows:
        line = "%-14s  %-10s  %8.1f  %8.2fx" % (r["net"], r["variant"], r["macs"] / 1e6, r["macs_reduction"])
        for b in batches:
            m = r["batch%d" % b]
            line += "  %12.2f  %7.2fx  %9.2f" % (m["ms_per_image"], m["speedup"], m["measured_over_theoretical"])
        print(line)
    result = {"keeps": keeps, "batches": list(batches), "rounds": args.rounds, "min_seconds": args.min_seconds,
              "threads": args.threads, "rows": rows, **machine()}
    caffe_io.atomic_write(args.out, json.dumps(result, indent=2) + "\n")
    print("wrote %s" % args.out)


if __name__ == "__main__":
    main()
