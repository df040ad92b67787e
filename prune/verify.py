"""python -m prune.verify: a (pruned) Caffe net checked and timed in every runtime it may be deployed in.

The net runs in Caffe (the reference) and in every other runtime installed
here (runtimes: OpenCV DNN with fusion off and on, MNN through its
Caffe converter with Winograd convolutions off and on) on the same seeded
inputs; for each runtime the largest
deviation of its output from Caffe's, relative to the output's largest
magnitude, and the lowest cosine between the two outputs (embeddings).  Then
the median batch-1 latency of every runtime, all of them in this one process,
interleaved round by round, every runtime on --threads threads, after a
warm-up.  With --reference (the original net) the same for it, and the
measured speed-up in each runtime against the MACs reduction.

A runtime that is not installed is skipped with a line saying so; one that
cannot convert, load or run the net is a failure: its FAILED row with the
reason, the other runtimes and --json still written.  Exit status 0 when every runtime that
computes exactly (OpenCV with fusion off, MNN with Winograd off) agrees with
Caffe within --tolerance, 1 when one does not; the deviation of the runtimes
as deployed (OpenCV fused, MNN's defaults) is reported, not held to it.
"""
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

from base import caffe_io, cli
import runtimes

PROG = "python -m prune.verify"


def inputs(shape, n, seed=0):
    """``n`` seeded batch-1 inputs in the face nets' normalised range [-1, 1]."""
    rng = np.random.default_rng(seed)
    return [rng.uniform(-1, 1, (1,) + tuple(shape[1:])).astype(np.float32) for _ in range(n)]


def deviation(session, xs, ref):
    """dict(max_rel_deviation, min_cosine) of one session's outputs on ``xs`` against Caffe's ``ref``."""
    scale = max(float(np.abs(r).max()) for r in ref) or 1.0
    dev, cos = 0.0, 1.0
    for x, r in zip(xs, ref):
        y = np.asarray(session.run(x), dtype=np.float64).reshape(r.shape)
        dev = max(dev, float(np.abs(y - r).max()) / scale)
        a, b = y.ravel(), r.ravel()
        cos = min(cos, float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30)))
    return dict(max_rel_deviation=dev, min_cosine=cos)


def measure(kind, nets, work, threads, xs, refs):
    """(sessions, {net name: deviation}) of one runtime, its sessions left on the timed input and warmed up."""
    sessions = runtimes.open_sessions([kind], nets, work, threads)
    agree = {name: deviation(sessions[kind, name], xs, refs[name]) for name in nets}
    for s in sessions.values():
        s.run(xs[0])
        s.forward()
    return sessions, agree


def reason(e):
    """One line of a runtime's exception (OpenCV's name their source file first, the message last)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if isinstance(e, runtimes.RuntimeFailure):
        return lines[0]
    return "%s: %s" % (type(e).__name__, lines[-1] if lines else "no message")


def verify(proto, model, reference=None, kinds=runtimes.KINDS, n_inputs=4, rounds=7, min_seconds=0.05, threads=1,
           seed=0):
    """The record of one verification (see the module's docstring); ``reference`` = (prototxt, caffemodel).
    Any exception of a runtime other than Caffe (converting, loading or running the net) is that runtime's
    error; the others are still measured."""
    from prune.stats import net_stats
    nets = {"net": (proto, model)}
    if reference:
        nets["reference"] = tuple(reference)
    skipped = {k: runtimes.missing(k) for k in kinds if runtimes.missing(k)}
    kinds = ["caffe"] + [k for k in kinds if k != "caffe" and k not in skipped]
    errors = {}
    with tempfile.TemporaryDirectory() as work, runtimes.pinned(threads):
        sessions = runtimes.open_sessions(["caffe"], nets, work, threads)   # the reference: its errors are ours
        xs = inputs(sessions["caffe", "net"].input_shape(), n_inputs, seed)
        refs = {name: [sessions["caffe", name].run(x).astype(np.float64) for x in xs] for name in nets}
        agree = {"caffe": {name: deviation(sessions["caffe", name], xs, refs[name]) for name in nets}}
        for s in sessions.values():
            s.run(xs[0])
        for kind in kinds[1:]:
            try:
                more, agree[kind] = measure(kind, nets, work, threads, xs, refs)
            except Exception as e:      # noqa: BLE001 -- whatever a runtime raises (cv2.error, MNN's) is its row
                errors[kind] = reason(e)
                continue
            sessions.update(more)
        ms = runtimes.median_ms(sessions, rounds=rounds, min_seconds=min_seconds)
    macs = {name: net_stats(p).macs for name, (p, _) in nets.items()}
    result = {}
    for kind in kinds:
        if kind in errors:
            result[kind] = dict(error=errors[kind])
            continue
        r = dict(version=runtimes.version(kind), **agree[kind]["net"], latency_ms=ms[kind, "net"])
        if reference:
            r.update(reference_latency_ms=ms[kind, "reference"],
                     reference_max_rel_deviation=agree[kind]["reference"]["max_rel_deviation"],
                     speedup=ms[kind, "reference"] / ms[kind, "net"])
            r["measured_over_macs"] = r["speedup"] / (macs["reference"] / macs["net"])
        result[kind] = r
    return dict(net=proto, caffemodel=model, reference=list(reference) if reference else None,
                macs=macs["net"], reference_macs=macs.get("reference"),
                macs_reduction=macs["reference"] / macs["net"] if reference else None,
                runtimes=result, skipped=skipped, inputs=n_inputs, rounds=rounds, threads=threads,
                machine="%s, %d CPUs" % (platform.platform(), os.cpu_count()), date=time.strftime("%Y-%m-%d"))


def failures(record, tolerance):
    """Lines naming every runtime that failed: could not load the net, or (an exact one) deviates too much."""
    out = []
    for kind, r in record["runtimes"].items():
        if "error" in r:
            out.append("%s: %s" % (runtimes.LABELS[kind], r["error"]))
        elif kind in runtimes.EXACT and (r["max_rel_deviation"] > tolerance or
                                r.get("reference_max_rel_deviation", 0) > tolerance):
            out.append("%s deviates from Caffe by %.2e (relative; tolerance %.0e)" % (
                runtimes.LABELS[kind], max(r["max_rel_deviation"], r.get("reference_max_rel_deviation", 0)),
                tolerance))
    return out


def table(record):
    """The record as the lines of a readable table."""
    ref = record["reference"] is not None
    head = "%-24s %-8s %13s %12s %10s" % ("runtime", "version", "max rel. dev.", "min cos", "ms (b1)")
    if ref:
        head += " %10s %9s %9s" % ("ref. ms", "speed-up", "meas/theo")
    lines = [head]
    for kind, r in record["runtimes"].items():
        if "error" in r:
            lines.append("%-24s FAILED: %s" % (runtimes.LABELS[kind], r["error"]))
            continue
        line = "%-24s %-8s %13.2e %12.9f %10.3f" % (runtimes.LABELS[kind], str(r["version"])[:8],
                                                    r["max_rel_deviation"], r["min_cosine"], r["latency_ms"])
        if ref:
            line += " %10.3f %8.2fx %9.2f" % (r["reference_latency_ms"], r["speedup"], r["measured_over_macs"])
        lines.append(line)
    for kind, why in record["skipped"].items():
        lines.append("%-24s skipped: %s" % (runtimes.LABELS[kind], why))
    macs = "MACs %.1fM" % (record["macs"] / 1e6)
    if ref:
        macs += " (reference %.1fM: %.2fx fewer)" % (record["reference_macs"] / 1e6, record["macs_reduction"])
    lines.append("%s; batch 1, median of %d interleaved rounds, %d thread(s) per runtime; %d seeded inputs"
                 % (macs, record["rounds"], record["threads"], record["inputs"]))
    return lines


def runtime_list(text):
    """--runtimes: comma-separated names of runtimes.KINDS (caffe is always run: the reference)."""
    import argparse
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in runtimes.KINDS]
    if unknown or not names:
        raise argparse.ArgumentTypeError("expected runtimes among %s, not %r" % (",".join(runtimes.KINDS), text))
    return tuple(dict.fromkeys(["caffe"] + names))


def parser():
    ap = cli.parser(PROG, description=__doc__.split("\n\n")[1], raw=True)
    ap.add_argument("prototxt", help="deploy prototxt of the net to verify (one input, one output)")
    ap.add_argument("caffemodel", help="its weights")
    ap.add_argument("--reference", nargs=2, metavar=("ORIG.prototxt", "ORIG.caffemodel"), default=None,
                    help="the original net: verified and timed beside it, speed-up against the MACs reduction")
    ap.add_argument("--runtimes", type=runtime_list, default=runtimes.KINDS,
                    help="runtimes to run, comma-separated (default all: %s)" % ",".join(runtimes.KINDS))
    ap.add_argument("--inputs", type=cli.count, default=4, help="seeded random inputs compared (default 4)")
    ap.add_argument("--rounds", type=cli.count, default=7, help="interleaved timing rounds (default 7)")
    ap.add_argument("--min-seconds", type=cli.positive, default=0.05,
                    help="least time of each net and runtime per round (default 0.05)")
    ap.add_argument("--threads", type=cli.count, default=1, help="threads of every runtime (default 1)")
    ap.add_argument("--tolerance", type=cli.positive, default=1e-4,
                    help="largest relative deviation from Caffe allowed (default 1e-4; OpenCV fused and MNN "
                         "with Winograd are reported, not held to it)")
    ap.add_argument("--json", default=None, help="also write the record to this file")
    ap.add_argument("--seed", type=cli.whole, default=0, help="seed of the inputs (default 0)")
    return ap


def check_inputs(a):
    """Every input checked before any work: the files, a net Caffe builds (in a child process: Caffe aborts
    on what it cannot build) with one output, a caffemodel holding every layer; --json not over an input."""
    pairs = [("", a.prototxt, a.caffemodel)] + ([("--reference ",) + tuple(a.reference)] if a.reference else [])
    for flag, proto, model in pairs:
        cli.check_file(proto, flag + "prototxt" if flag else "prototxt")
        cli.check_file(model, flag + "caffemodel" if flag else "caffemodel")
    if a.json:
        cli.check_outputs({"prototxt": a.prototxt, "caffemodel": a.caffemodel,
                           "--reference": a.reference[0] if a.reference else None,
                           "--reference ": a.reference[1] if a.reference else None}, [a.json])
        cli.check_out(os.path.dirname(os.path.abspath(a.json)), flag="--json")
    caffe_io.probe_nets([(p, p, "test") for _, p, _ in pairs])
    for _, proto, model in pairs:
        net = caffe_io.read_net(proto)
        cnet = caffe_io.net_from_param(net)
        if len(cnet.outputs) != 1:
            raise cli.UsageError("%s has %d outputs (%s); a net is verified on its single output"
                                 % (proto, len(cnet.outputs), ", ".join(cnet.outputs)))
        caffe_io.check_weights(cnet, caffe_io.read_weights(model), model, complete=True)


@cli.entry(PROG)
def main(argv=None):
    a = parser().parse_args(argv)
    check_inputs(a)
    record = verify(a.prototxt, a.caffemodel, a.reference, a.runtimes, a.inputs, a.rounds, a.min_seconds, a.threads,
                    a.seed)
    print("\n".join(table(record)))
    record["failures"] = failures(record, a.tolerance)
    record["tolerance"] = a.tolerance
    if a.json:
        caffe_io.atomic_write(a.json, json.dumps(record, indent=1) + "\n")
    if record["failures"]:
        print("%s: FAILED: %s" % (PROG, "; ".join(record["failures"])), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    cli.run(main)
