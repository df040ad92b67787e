"""LFW accuracy of what finally runs: a net's LFW folds 6-10 protocol with each runtime's own forward pass.

For every net (default: the original MobileFaceNet of ../shared and, when it exists, the pruned one of
scripts/prune_mobilefacenet.sh in runs/mobilefacenet) and every runtime installed (runtimes.KINDS: Caffe,
OpenCV DNN fused and not, MNN with Winograd and without, ONNX Runtime and OpenVINO on the ONNX export):
``eval_lfw.evaluate(..., runtime=KIND)`` on LFW folds 6-10 without flip (10-fold protocol on those 5 folds,
and TAR at FAR 1e-3 / 1e-4 over all pairs of their people, at most 10 images each), and the difference to
Caffe's numbers in points.  Nothing here is trained or calibrated; the nets' training saw only folds 1-5
people and people in no pair.  Rows are written to the JSON as they finish (a killed run resumes).

    .venv/bin/python benchmarks/bench_lfw_runtimes.py
    .venv/bin/python benchmarks/bench_lfw_runtimes.py --net mine=deploy.prototxt,model.caffemodel --runtimes caffe,onnxruntime
"""
import json
import os

from common import LFW_DIR, MFN, PAIRS, ROOT, machine, parser  # first: puts the repository on sys.path

import runtimes  # noqa: E402
from base import caffe_io  # noqa: E402
from eval_lfw import evaluate  # noqa: E402

OUT = os.path.join(ROOT, "docs", "results", "lfw_runtimes.json")
PRUNED = os.path.join(ROOT, "runs", "mobilefacenet")


def parse_args(argv=None):
    p = parser(__doc__)
    p.add_argument("--net", action="append", default=None, metavar="NAME=PROTOTXT,CAFFEMODEL",
                   help="a net to evaluate (repeatable); default the original MobileFaceNet and the pruned one "
                        "in runs/mobilefacenet when it is there")
    p.add_argument("--blob", default="fc1", help="embedding blob: the nets' single output")
    p.add_argument("--bgr", action="store_true", help="the nets take BGR planes (default RGB, as MobileFaceNet)")
    p.add_argument("--crop", default="none", help="eval_lfw crop (none for 112x112 nets)")
    p.add_argument("--lfw-dir", default=LFW_DIR)
    p.add_argument("--pairs", default=PAIRS)
    p.add_argument("--folds", default="6-10")
    p.add_argument("--per-person", type=int, default=10, help="all-pairs protocol: images per person")
    p.add_argument("--runtimes", default=",".join(runtimes.KINDS), help="comma-separated runtimes")
    p.add_argument("--out", default=OUT, help="the JSON written (rows added as they finish)")
    return p.parse_args(argv)


def nets_of(a):
    if a.net:
        return dict((n.split("=", 1)[0], tuple(n.split("=", 1)[1].split(","))) for n in a.net)
    nets = {"original": (MFN + ".prototxt", MFN + ".caffemodel")}
    pruned = (os.path.join(PRUNED, "deploy.prototxt"), os.path.join(PRUNED, "model.caffemodel"))
    if all(os.path.exists(p) for p in pruned):
        nets["pruned"] = pruned
    return nets


def row(a, name, net, kind):
    r = evaluate(net[0], a.blob, a.lfw_dir, a.pairs, weights=net[1], folds=a.folds, crop=a.crop, flip=False,
                 bgr=a.bgr, all_pairs=a.per_person, runtime=kind, progress=False)
    tar = r["all_pairs"]["tar_at_far"]
    return dict(net=name, runtime=kind, label=runtimes.LABELS[kind], version=runtimes.version(kind),
                lfw=100 * r["accuracy_mean"], lfw_std=100 * r["accuracy_std"],
                **{"tar_at_far_%s" % k: 100 * tar[k] for k in ("1e-3", "1e-4")},
                images=r["images_embedded"], prototxt=net[0], caffemodel=net[1])


def main(argv=None):
    a = parse_args(argv)
    kinds = [k for k in a.runtimes.split(",") if k]
    done = json.load(open(a.out)) if os.path.exists(a.out) else None
    rows = done["rows"] if done else []
    have = {(r["net"], r["runtime"]) for r in rows}
    skipped = {}
    for name, net in nets_of(a).items():
        for kind in ["caffe"] + [k for k in kinds if k != "caffe"]:
            if (name, kind) in have:
                continue
            why = runtimes.missing(kind)
            if why:
                skipped[kind] = why
                continue
            rows.append(row(a, name, net, kind))
            print("%-9s %-26s LFW %.2f  TAR@1e-4 %.2f" % (name, rows[-1]["label"], rows[-1]["lfw"],
                                                        rows[-1]["tar_at_far_1e-4"]), flush=True)
            for r in rows:       # differences to Caffe's numbers for the same net
                ref = next(c for c in rows if c["net"] == r["net"] and c["runtime"] == "caffe")
                r["lfw_minus_caffe"] = r["lfw"] - ref["lfw"]
                r["tar_1e-4_minus_caffe"] = r["tar_at_far_1e-4"] - ref["tar_at_far_1e-4"]
            record = dict(machine=machine(), data=dict(
                lfw_dir=a.lfw_dir, pairs=a.pairs, eval_folds=a.folds, flip=False, per_person=a.per_person,
                note="10-fold protocol on folds %s; TAR over all pairs of their people; nothing trained or "
                     "calibrated here" % a.folds), rows=rows, skipped=skipped)
            caffe_io.atomic_write(a.out, json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
