"""Images/s of the evaluator's feature extraction against plain back-to-back net.forward().

Both run in the same process on the same images and the same net: "plain"
copies already-decoded batches into the input blob and calls net.forward();
the evaluator decodes JPEGs (in a worker process by default) while Caffe runs.
A ratio near 1 means decoding is hidden behind the forward pass.

    .venv/bin/python benchmarks/bench_eval_lfw.py            # MobileFaceNet from ../shared
    .venv/bin/python benchmarks/bench_eval_lfw.py --help
"""
import json
import os
import time

from common import ROOT, add_face_model, machine, parser  # first: puts the repository on sys.path

import caffe  # noqa: E402

from eval_lfw.features import extract  # noqa: E402
from base.images import Preprocess  # noqa: E402
from eval_lfw.pairs import read_pairs  # noqa: E402
from base import caffe_io  # noqa: E402


def parse_args(argv=None):
    p = parser(__doc__)
    add_face_model(p, pairs_help="pairs.txt; its first --images unique images are used")
    p.add_argument("--crop", default="none", choices=["112x96", "none"], help="as in python -m eval_lfw")
    p.add_argument("--images", type=int, default=320, help="images per measurement")
    p.add_argument("--batch", type=int, default=64, help="images per forward pass")
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds; the best round of each method counts")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "bench_eval_lfw.json"), help="JSON results")
    return p.parse_args(argv)


def plain(net, inp, batches):
    start = time.perf_counter()
    for x in batches:
        if net.blobs[inp].data.shape[0] != len(x):
            net.blobs[inp].reshape(*x.shape)
            net.reshape()
        net.blobs[inp].data[...] = x
        net.forward()
    return time.perf_counter() - start


def evaluator(net, args, rels, pre, workers):
    start = time.perf_counter()
    feats = extract(net, args.blob, args.lfw_dir, rels, pre, flip=False, batch=args.batch, workers=workers,
                    progress=False)
    seconds = time.perf_counter() - start
    assert len(feats) == len(rels), "the evaluator returned %d rows for %d images" % (len(feats), len(rels))
    return seconds


def main(argv=None):
    args = parse_args(argv)
    caffe.set_mode_cpu()
    rels = read_pairs(args.pairs).images()[0][:args.images]
    net = caffe_io.open_net(args.model, args.weights)
    inp = net.inputs[0]
    _, h, w = net.blobs[inp].data.shape[1:]
    pre = Preprocess(h, w, args.crop)
    start = time.perf_counter()
    batches = [pre.batch(args.lfw_dir, rels[i:i + args.batch]) for i in range(0, len(rels), args.batch)]
    decode_s = time.perf_counter() - start
    plain(net, inp, batches[:1])  # warm-up: allocations at the full batch size

    methods = {"plain net.forward() on preloaded batches": lambda: plain(net, inp, batches),
               "evaluator, 1 decoding process": lambda: evaluator(net, args, rels, pre, 1),
               "evaluator, decoding inline": lambda: evaluator(net, args, rels, pre, 0)}
    seconds = {name: [] for name in methods}
    for _ in range(args.repeats):
        for name, run in methods.items():
            seconds[name].append(run())
    base = len(rels) / min(seconds[next(iter(methods))])
    rows = []
    for name, times in seconds.items():
        rate = len(rels) / min(times)
        rows.append({"method": name, "images_per_s": round(rate, 2), "ratio_to_plain": round(rate / base, 3),
                     "seconds": [round(t, 2) for t in times]})
    width = max(len(r["method"]) for r in rows)
    print("%d images, batch %d, %s, blob %s, %s" % (len(rels), args.batch, os.path.basename(args.model),
                                                   args.blob, machine()["node"]))
    print("%-*s  %9s  %8s" % (width, "method", "images/s", "ratio"))
    for r in rows:
        print("%-*s  %9.2f  %8.3f" % (width, r["method"], r["images_per_s"], r["ratio_to_plain"]))
    print("JPEG decode + preprocessing alone: %.0f images/s" % (len(rels) / decode_s))
    result = {"images": len(rels), "batch": args.batch, "model": args.model, "blob": args.blob,
              "decode_images_per_s": round(len(rels) / decode_s, 1), "rows": rows, **machine()}
    caffe_io.atomic_write(args.out, json.dumps(result, indent=2) + "\n")
    print("wrote %s" % args.out)


if __name__ == "__main__":
    main()
