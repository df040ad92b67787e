"""python -m prune.demo: the README's main command (make demo) until the per-depth pipeline lands.

With the shared data (../shared or $SPHEREFACE_SHARED): the real MobileFaceNet
is pruned with ThiNet (keep 0.75 on every channel group, sampling images of
LFW folds 1-5 people), and both nets are evaluated on LFW folds 6-10 with the
standard protocol; the pruned net is also run in OpenCV's DNN module.
Without it: a random-weight SphereFace-4 is pruned on generated images (the
mechanics only: no accuracy can be measured without faces).
"""
import argparse
import json
import os
import sys
import time

import numpy as np

from prune import caffe_io
from prune.driver import PruneJob, run
from prune.stats import net_stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _shared():
    return os.environ.get("SPHEREFACE_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))


def _opencv_check(proto, model, x, blob):
    import cv2
    import caffe
    net = caffe.Net(proto, model, caffe.TEST)
    net.blobs[net.inputs[0]].reshape(*x.shape)
    ref = net.forward(**{net.inputs[0]: x})[blob]
    cv = cv2.dnn.readNetFromCaffe(proto, model)
    cv.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    cv.enableFusion(False)
    cv.setInput(x)
    # the net's final output: OpenCV's forward(name) would stop before in-place layers on that blob
    out = cv.forward().reshape(ref.shape)
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def real_demo(out, shared, keep, images):
    from eval_lfw.evaluator import evaluate
    from prune.data import image_batches, image_files, preprocess_for
    proto = os.path.join(shared, "models", "mobilefacenet", "mobilefacenet-v0.prototxt")
    model = os.path.join(shared, "models", "mobilefacenet", "mobilefacenet-v0.caffemodel")
    lfw = os.path.join(shared, "data", "lfw", "images-112x112")
    pairs = os.path.join(shared, "data", "lfw", "pairs.txt")
    root, rels = image_files(lfw, lfw_folds="1-5", pairs=pairs, limit=images)
    pre = preprocess_for((1, 3, 112, 112), root, rels, rgb=True)
    print("1/3 pruning the real MobileFaceNet: ThiNet, keep %.2f of every channel group, %d images of LFW "
          "folds 1-5 people" % (keep, len(rels)))
    job = PruneJob(model=proto, weights=model, out=os.path.join(out, "prune"), keep=keep,
                   data=dict(data=lfw, images=len(rels), lfw_folds="1-5", rgb=True))
    log = run(job, lambda: image_batches(root, rels, pre, 32))
    results = {}
    for i, (name, p, w) in enumerate((("original", proto, model), ("pruned", log["prototxt"], log["caffemodel"])), 2):
        print("%d/3 LFW folds 6-10 (cross-validated over those 5 folds, no flip): %s net" % (i, name))
        r = evaluate(p, "fc1", lfw, pairs, weights=w, folds="6-10", crop="none", flip=False, bgr=False)
        s = net_stats(p)
        results[name] = dict(accuracy=r["accuracy_mean"], std=r["accuracy_std"], params=s.params, macs=s.macs)
    x = pre.batch(root, rels[:4])
    deviation = _opencv_check(log["prototxt"], log["caffemodel"], x, "fc1")
    return log, results, deviation


def synthetic_demo(out, keep):
    proto = os.path.join(ROOT, "prototxt", "sphereface4_deploy.prototxt")
    import caffe
    net = caffe.Net(proto, caffe.TEST)
    rng = np.random.default_rng(0)
    weights = {n: [rng.normal(0, np.sqrt(2.0 / max(1, np.prod(b.data.shape[1:]))), b.data.shape).astype(np.float32)
                   if b.data.ndim > 1 else np.full(b.data.shape, 0.25 if "relu" in n else 0.0, np.float32)
                   for b in blobs] for n, blobs in net.params.items()}
    model = caffe_io.write_weights(caffe_io.read_net(proto), weights, os.path.join(out, "sphereface4_random.caffemodel"))
    images = rng.normal(0, 0.5, (32, 3, 112, 96)).astype(np.float32)
    print("no ../shared here: pruning a random-weight SphereFace-4 on 32 generated images (mechanics only)")
    job = PruneJob(model=proto, weights=model, out=os.path.join(out, "prune"), keep=keep)
    log = run(job, lambda: iter([images[:16], images[16:]]))
    results = {name: dict(params=net_stats(p).params, macs=net_stats(p).macs)
               for name, p in (("original", proto), ("pruned", log["prototxt"]))}
    return log, results, _opencv_check(log["prototxt"], log["caffemodel"], images[:2], "fc5")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m prune.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "demo"), help="run folder (default runs/demo)")
    ap.add_argument("--keep", type=float, default=0.75, help="share of channels kept in every group (default 0.75)")
    ap.add_argument("--images", type=int, default=128, help="images for ThiNet's sampling (default 128)")
    a = ap.parse_args(argv)
    start = time.time()
    shared = _shared()
    if os.path.isdir(os.path.join(shared, "models", "mobilefacenet")):
        log, results, deviation = real_demo(a.out, shared, a.keep, a.images)
    else:
        log, results, deviation = synthetic_demo(a.out, a.keep)
    o, p = results["original"], results["pruned"]
    print("\n%-9s %10s %12s %s" % ("net", "params", "MACs", "LFW folds 6-10"))
    for name, r in results.items():
        acc = "%.2f%% +- %.2f" % (100 * r["accuracy"], 100 * r["std"]) if "accuracy" in r else "n/a"
        print("%-9s %9.3fM %11.3fG %s" % (name, r["params"] / 1e6, r["macs"] / 1e9, acc))
    print("MACs kept: %.1f%%; OpenCV DNN vs Caffe on the pruned net: max rel. deviation %.1e"
          % (100.0 * p["macs"] / o["macs"], deviation))
    caffe_io.atomic_write(os.path.join(a.out, "demo.json"),
                          json.dumps(dict(results=results, opencv_deviation=deviation,
                                          seconds=round(time.time() - start, 1)), indent=1))
    print("pruned net: %s\n           %s\nreport: %s (%.0f s)" % (log["prototxt"], log["caffemodel"],
                                                               os.path.join(a.out, "demo.json"), time.time() - start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
