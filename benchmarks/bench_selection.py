"""Seconds per ThiNet channel selection: Gram form (prune.gram) against the plain ThiNet loop.

Both get the same contributions X (samples x C, seeded random with the
structure of real ones: channels correlated through shared factors, scales
spread over two orders of magnitude, a few nearly dead channels) and remove
half of the channels greedily.

* plain loop, as ThiNet's paper states it: at every step, for every
  candidate c, the squared norm over ALL samples of the removed set's summed
  contribution, ||X[:, removed + [c]].sum(1)||^2 (a running sum of the
  removed columns is kept; the norms of all candidates are one vectorised
  pass over X per step, in row chunks to bound memory): O(samples x C) a step.
* Gram form: prune.gram.remove_greedy(G, n) on G = X^T X: O(C) a step. The
  sampler accumulates G anyway; forming it from X is timed separately.

The selected channels (and their order) must be identical; the script stops
with an error if they are not. With --sampling-json (written by
bench_sampling.py) the selection time is set against the time to sample one
group.

    .venv/bin/python benchmarks/bench_selection.py
    .venv/bin/python benchmarks/bench_selection.py --quick     # smoke run, seconds
"""
import json
import os
import time

import numpy as np
from threadpoolctl import threadpool_limits

from common import ROOT, machine, parser  # first: puts the repository on sys.path

from base import caffe_io  # noqa: E402
from prune.gram import remove_greedy  # noqa: E402


def parse_args(argv=None):
    p = parser(__doc__)
    p.add_argument("--channels", default="64,128,256,512", help="comma-separated channel counts C")
    p.add_argument("--samples", type=int, default=100000, help="samples (rows of X)")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed calls of the Gram form and of forming G (median counts); the plain loop runs once")
    p.add_argument("--chunk", type=int, default=512, help="rows of X per vectorised pass of the plain loop")
    p.add_argument("--seed", type=int, default=0, help="seed of X (C is added for each size)")
    p.add_argument("--threads", type=int, default=1,
                   help="BLAS threads (forming G); on a busy machine extra threads wait on each other")
    p.add_argument("--sampling-json", default=os.path.join(ROOT, "runs", "bench_sampling.json"),
                   help="bench_sampling.py results, to compare selection with sampling time (skipped if absent)")
    p.add_argument("--quick", action="store_true", help="smoke run: C = 64,128 and 20,000 samples")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "bench_selection.json"), help="JSON results")
    args = p.parse_args(argv)
    if args.quick:
        args.channels, args.samples = "64,128", 20000
    return args


def contributions(samples, channels, seed):
    """samples x C float64: shared factors + own noise, log-normal channel scales, 1/16 channels nearly dead."""
    rng = np.random.default_rng(seed)
    factors = max(4, channels // 8)
    X = rng.standard_normal((samples, factors)) @ rng.standard_normal((factors, channels))
    X /= np.sqrt(factors)
    X += rng.standard_normal((samples, channels))
    X += rng.normal(0, 0.3, channels)          # per-channel offset: contributions are not zero-mean
    scale = np.exp(rng.normal(0, 1, channels))
    scale[rng.choice(channels, max(1, channels // 16), replace=False)] *= 1e-3
    X *= scale
    return X


def remove_plain(X, n_remove, chunk):
    """ThiNet's greedy removal, costs recomputed from the samples at every step."""
    n, C = X.shape
    running = np.zeros(n)                     # X[:, removed].sum(1)
    available = np.ones(C, dtype=bool)
    removed = []
    for _ in range(n_remove):
        cand = np.flatnonzero(available)
        cost = np.zeros(len(cand))
        for s in range(0, n, chunk):
            S = X[s:s + chunk, cand]          # a copy: the candidates' columns
            S += running[s:s + chunk, None]   # removed-set sum with each candidate added
            cost += np.einsum("ij,ij->j", S, S)
        c = int(cand[np.argmin(cost)])
        removed.append(c)
        available[c] = False
        running += X[:, c]
    return removed


def timed(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, float(np.median(times))


def measure(C, args):
    X = contributions(args.samples, C, args.seed + C)
    n_remove = C // 2
    G, form_s = timed(lambda: X.T @ X, args.repeats)
    gram_sel, gram_s = timed(lambda: remove_greedy(G, n_remove), args.repeats)
    plain_sel, plain_s = timed(lambda: remove_plain(X, n_remove, args.chunk), 1)
    if plain_sel != gram_sel:
        step = next(i for i, (a, b) in enumerate(zip(plain_sel, gram_sel)) if a != b)
        raise SystemExit("C=%d: the two selections differ first at step %d (plain %d, Gram %d)"
                         % (C, step, plain_sel[step], gram_sel[step]))
    return {"channels": C, "samples": args.samples, "removed": n_remove, "plain_loop_s": round(plain_s, 4),
            "gram_form_ms": round(1000 * gram_s, 3), "speedup": round(plain_s / gram_s, 1),
            "form_gram_ms": round(1000 * form_s, 2), "same_channels": True}


def sampling_reference(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def main(argv=None):
    args = parse_args(argv)
    with threadpool_limits(args.threads):
        run(args)


def run(args):
    rows = []
    print("X: %d samples x C float64; remove C/2 channels; plain loop once, Gram form median of %d; "
          "%d BLAS thread(s); %s" % (args.samples, args.repeats, args.threads, machine()["node"]))
    print("%5s  %8s  %12s  %12s  %10s  %12s  %s" % ("C", "removed", "plain loop s", "Gram form ms", "speed-up",
                                                  "form G ms", "same channels"))
    for C in (int(c) for c in args.channels.split(",")):
        row = measure(C, args)
        rows.append(row)
        print("%5d  %8d  %12.3f  %12.3f  %9.0fx  %12.1f  %s" % (C, row["removed"], row["plain_loop_s"],
                                                                row["gram_form_ms"], row["speedup"],
                                                                row["form_gram_ms"], "yes"))

    result = {"samples": args.samples, "repeats": args.repeats, "seed": args.seed, "threads": args.threads,
              "rows": rows, **machine()}
    ref = sampling_reference(args.sampling_json)
    if ref is None:
        print("no %s: run benchmarks/bench_sampling.py to compare selection with sampling time" % args.sampling_json)
    else:
        base = min(ref["runs"], key=lambda r: abs(r["samples"] - args.samples))
        same = [r for r in rows if r["channels"] == ref["channels"]]
        sel = same[0] if same else min(rows, key=lambda r: abs(r["channels"] - ref["channels"]))
        share = sel["gram_form_ms"] / 1000 / base["seconds"]
        print("sampling group %s (%d channels, %d consumers) at %d samples/consumer took %.1f s (%s, %s); "
              "Gram selection at C=%d: %.2f ms = %.5f%% of it"
              % (ref["group"], ref["channels"], len(ref["consumers"]), base["samples"], base["seconds"],
                 ref["net"], ref["date"], sel["channels"], sel["gram_form_ms"], 100 * share))
        result["vs_sampling"] = {"group": ref["group"], "net": ref["net"], "sampling_s": base["seconds"],
                                 "sampling_samples": base["samples"], "selection_channels": sel["channels"],
                                 "selection_ms": sel["gram_form_ms"], "selection_share": share}
    caffe_io.atomic_write(args.out, json.dumps(result, indent=2) + "\n")
    print("wrote %s" % args.out)


if __name__ == "__main__":
    main()
