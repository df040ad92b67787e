"""Seconds and peak resident memory to sample one channel group with prune.sample.collect.

The net (SphereFace-20 with He-scaled random weights by default) runs in
real Caffe over seeded random images (uniform in [-1, 1], the range of the
preprocessed input; random pixels cost Caffe the same as faces), and
collect() accumulates one C x C Gram per consumer of the group at
--samples-per-image (output filter, position) samples per image. The default
group, conv3_1, is SphereFace-20's stage-3 residual stream: 256 channels read
by 5 consumers (conv3_2, conv3_4, conv3_6, conv3_8 and conv4_1).

Each image count (--images x every --scales entry) runs in a fresh
subprocess, so its peak RSS (getrusage ru_maxrss) is its own; flat peak RSS
across the scales shows memory does not grow with the number of images.
One more subprocess times Caffe's forward passes alone over the first
--images images, to show what sampling adds to them.

    .venv/bin/python benchmarks/bench_sampling.py             # 250/500/1000 images, 100,000 samples at 4x
    .venv/bin/python benchmarks/bench_sampling.py --quick     # smoke run
"""
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
from threadpoolctl import threadpool_limits

from common import ROOT, add_threads_and_seed, machine, parser  # first: puts the repository on sys.path

from base import caffe_io  # noqa: E402


def parse_args(argv=None):
    p = parser(__doc__)
    p.add_argument("--model", default=os.path.join(ROOT, "prototxt", "sphereface20_deploy.prototxt"),
                   help="deploy prototxt")
    p.add_argument("--weights", default="",
                   help="caffemodel (default: He-scaled random weights, seeded, as tests/nets.py makes them)")
    p.add_argument("--group", default="conv3_1", help="channel group id (python -m prune.groups NET lists them)")
    p.add_argument("--images", type=int, default=250, help="images of the 1x run")
    p.add_argument("--scales", default="1,2,4", help="comma-separated multiples of --images, one subprocess each")
    p.add_argument("--samples-per-image", type=int, default=100, help="samples per image and consumer")
    p.add_argument("--batch", type=int, default=32, help="images per Caffe forward pass")
    add_threads_and_seed(p, "BLAS threads (Caffe and numpy)", "seed of the weights, the images and the sampled positions")
    p.add_argument("--single", choices=["sample", "forward"],
                   help="measure one run of --images images in this process and print it as JSON "
                        "(what each subprocess does): 'sample' runs collect(), 'forward' Caffe's forward passes only")
    p.add_argument("--quick", action="store_true", help="smoke run: 16 images x 1,2 and 20 samples per image")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "bench_sampling.json"), help="JSON results")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.scales, args.samples_per_image, args.batch = 16, "1,2", 20, 8
    return args


def random_images(n, batch, shape, seed):
    """Batches generated on demand: the image count itself never sits in memory."""
    rng = np.random.default_rng(seed)
    for start in range(0, n, batch):
        yield rng.uniform(-1, 1, (min(batch, n - start),) + shape).astype(np.float32)


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def single(args):
    """One measurement in this process: {"seconds", "rss_before_mb", "peak_rss_mb", ...}."""
    import caffe
    from tqdm import tqdm
    from prune.graph import build_graph
    from prune.sample import collect
    caffe.set_mode_cpu()
    net = caffe_io.read_net(args.model)
    if args.weights:
        weights = caffe_io.read_weights(args.weights)
    else:
        from tests.nets import random_weights
        weights = random_weights(args.model, seed=args.seed)
    group = build_graph(net, args.model)[args.group]
    cnet = caffe_io.open_net(args.model, args.weights or None)
    inp = cnet.inputs[0]
    shape = cnet.blobs[inp].data.shape[1:]
    images = random_images(args.images, args.batch, shape, args.seed)
    before = peak_rss_mb()
    bar = tqdm(total=args.images, desc="%s %d images" % (args.single, args.images), unit="img", dynamic_ncols=True)
    start = time.perf_counter()
    if args.single == "sample":
        del cnet
        ev = collect(net, weights, group, images, args.samples_per_image, args.seed, progress=bar)
        seconds = time.perf_counter() - start
        assert ev.images == args.images and all(G.shape == (group.channels,) * 2 for G in ev.grams.values())
    else:
        for x in images:
            cnet.blobs[inp].reshape(*x.shape)
            cnet.blobs[inp].data[...] = x
            cnet.forward()
            bar.update(len(x))
        seconds = time.perf_counter() - start
    bar.close()
    return {"mode": args.single, "images": args.images, "samples": args.images * args.samples_per_image,
            "seconds": round(seconds, 2), "rss_before_mb": round(before, 1), "peak_rss_mb": round(peak_rss_mb(), 1),
            "group": group.id, "channels": group.channels, "consumers": [c.layer for c in group.consumers]}


def subprocess_run(args, mode, images):
    cmd = [sys.executable, os.path.abspath(__file__), "--single", mode, "--images", str(images),
           "--model", args.model, "--group", args.group, "--samples-per-image", str(args.samples_per_image),
           "--batch", str(args.batch), "--threads", str(args.threads), "--seed", str(args.seed)]
    if args.weights:
        cmd += ["--weights", args.weights]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit("the %s run over %d images failed (exit %d)" % (mode, images, done.returncode))
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    args = parse_args(argv)
    if args.single:
        with threadpool_limits(args.threads):
            print(json.dumps(single(args)))
        return
    runs = [subprocess_run(args, "sample", int(round(args.images * float(s)))) for s in args.scales.split(",")]
    forward = subprocess_run(args, "forward", args.images)
    first = runs[0]
    print("%s, group %s (%d channels, consumers %s), %d samples per image and consumer, batch %d, "
          "%d BLAS thread(s), random weights and images, %s"
          % (os.path.basename(args.model), first["group"], first["channels"], ", ".join(first["consumers"]),
             args.samples_per_image, args.batch, args.threads, machine()["node"]))
    print("%8s  %20s  %9s  %10s  %16s  %14s" % ("images", "samples per consumer", "seconds", "ms/image",
                                               "RSS before (MB)", "peak RSS (MB)"))
    for r in runs + [forward]:
        label = r["samples"] if r["mode"] == "sample" else "(Caffe forward only)"
        print("%8d  %20s  %9.1f  %10.1f  %16.0f  %14.0f" % (r["images"], label, r["seconds"],
                                                          1000 * r["seconds"] / r["images"], r["rss_before_mb"],
                                                          r["peak_rss_mb"]))
    result = {"net": os.path.basename(args.model), "weights": args.weights or "random (tests/nets.py)",
              "group": first["group"], "channels": first["channels"], "consumers": first["consumers"],
              "samples_per_image": args.samples_per_image, "batch": args.batch, "threads": args.threads,
              "runs": runs, "forward_only": forward, **machine()}
    caffe_io.atomic_write(args.out, json.dumps(result, indent=2) + "\n")
    print("wrote %s" % args.out)


if __name__ == "__main__":
    main()
