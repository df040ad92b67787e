"""Which criterion keeps accuracy: prune the real MobileFaceNet, evaluate on LFW folds 6-10.

Every prunable channel group is pruned to the same keep ratio with each
criterion (sampling images of LFW folds 1-5 people only), with no
fine-tuning, and the pruned net is evaluated on LFW folds 6-10 (5-fold
cross-validation over those folds, no flip). Each cell's prune run lives in
OUT/CRITERION_KEEP/ and is resumed (and its result reused) when the script
runs again; the table is printed and written to OUT/criteria.json
(OUT/criteria_finetuned.json with --finetune-epochs).

    .venv/bin/python benchmarks/bench_criteria.py
    .venv/bin/python benchmarks/bench_criteria.py --criteria thinet,l1 --keeps 0.5
"""
import json
import os
import sys
import time

from common import ROOT, add_face_model, machine, parser  # first: puts the repository on sys.path

from eval_lfw.evaluator import evaluate  # noqa: E402
from base import caffe_io  # noqa: E402
from base.images import image_batches, preprocess_for  # noqa: E402
from base.lists import image_files  # noqa: E402
from eval_lfw.pairs import lfw_people  # noqa: E402
from prune.driver import PruneJob, run  # noqa: E402
from prune.plans import PlanSpec, make as make_plan  # noqa: E402
from prune.stats import net_stats  # noqa: E402


def parse_args(argv=None):
    p = parser(__doc__)
    add_face_model(p)
    p.add_argument("--rgb", action="store_true", default=True, help="the net takes RGB (MobileFaceNet does)")
    p.add_argument("--criteria", default="thinet,l1,random,actsum,lasso", help="comma-separated criteria")
    p.add_argument("--keeps", default="0.75,0.5", help="comma-separated keep ratios (every group)")
    p.add_argument("--images", type=int, default=128, help="sampling images (people of LFW folds 1-5)")
    p.add_argument("--test-folds", default="6-10", help="LFW folds to evaluate on")
    p.add_argument("--finetune-epochs", type=float, default=0,
                   help="also fine-tune each pruned net this many epochs by distillation from the original net "
                        "(its embeddings computed once, no mirroring) on the images of LFW folds 1-5 people, "
                        "and evaluate again")
    p.add_argument("--finetune-lr", type=float, default=0.01, help="fine-tune base lr")
    p.add_argument("--reconstruct", default="scale", choices=("full", "scale", "none"),
                   help="consumer reconstruction after each cut: scale, ThiNet's (the earlier criteria runs' setting; "
                        "L1, random and actsum were measured with none); full: the driver's default least squares")
    p.add_argument("--targets", default="current", choices=("original", "current"),
                   help="reconstruction targets (the earlier criteria runs: current, the pruned net's own outputs)")
    p.add_argument("--finetune-batch", type=int, default=32, help="fine-tune batch size")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "bench_criteria"), help="output folder")
    return p.parse_args(argv)


def train_list(a):
    """All images of LFW folds 1-5 people, as an ImageData list (built once)."""
    from finetune.lists import build
    from eval_lfw.pairs import parse_folds
    path = os.path.join(a.out, "train_f1-5", "train.txt")
    if not os.path.exists(path):
        build(a.lfw_dir, os.path.dirname(path), folds=parse_folds("1-5"), pairs=a.pairs, progress=False)
    return path


def main(argv=None):
    a = parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    root, rels = image_files(a.lfw_dir, people=lfw_people(a.pairs, "1-5"), limit=a.images)
    pre = preprocess_for((1, 3, 112, 112), root, rels, rgb=a.rgb, crop="none")

    def accuracy(proto, weights, record=None):
        """LFW accuracy, params, MACs; kept in ``record`` (JSON) so a rerun skips finished evaluations."""
        if record and os.path.exists(record):
            return json.load(open(record))
        r = evaluate(proto, a.blob, a.lfw_dir, a.pairs, weights=weights, folds=a.test_folds, crop="none",
                     flip=False, bgr=not a.rgb, progress=False)
        s = net_stats(proto)
        out = dict(accuracy=r["accuracy_mean"], std=r["accuracy_std"], params=s.params, macs=s.macs)
        if record:
            caffe_io.atomic_write(record, json.dumps(out, indent=1))
        return out

    rows = [dict(criterion="none", keep=1.0, **accuracy(a.model, a.weights, os.path.join(a.out, "original.json")))]
    for keep in [float(k) for k in a.keeps.split(",")]:
        for crit in a.criteria.split(","):
            cell = os.path.join(a.out, "%s_%g" % (crit, keep))
            start = time.time()
            published = a.reconstruct if crit in ("thinet", "thinet-add", "lasso") or a.reconstruct == "full" else "none"
            job = PruneJob(model=a.model, weights=a.weights, out=cell, criterion=crit,
                           plan=make_plan(PlanSpec(keep=keep), a.model),
                           reconstruct=published, targets=a.targets,
                           data=dict(data=a.lfw_dir, images=len(rels), lfw_folds="1-5", rgb=a.rgb))
            log = run(job, lambda: image_batches(root, rels, pre, 32), progress=False)
            prune_s = sum(step["seconds"] for step in log["steps"])   # the recorded steps: right on a rerun too
            row = dict(criterion=crit, keep=keep, prune_seconds=round(prune_s, 1),
                       **accuracy(log["prototxt"], log["caffemodel"], os.path.join(cell, "accuracy.json")))
            if a.finetune_epochs:
                from finetune.driver import FineTuneJob, finetune
                job = FineTuneJob(deploy=log["prototxt"], weights=log["caffemodel"], train_list=train_list(a),
                                  root_folder=a.lfw_dir, out=os.path.join(cell, "finetune"), embedding=a.blob,
                                  teacher=a.model, teacher_weights=a.weights, precompute_teacher=True,
                                  mirror=False, rgb=a.rgb, epochs=a.finetune_epochs, batch_size=a.finetune_batch,
                                  base_lr=a.finetune_lr, snapshot_every=100)
                done = finetune(job, progress=False)
                ft = accuracy(log["prototxt"], done["final"], os.path.join(cell, "finetune", "accuracy.json"))
                row.update(finetuned_accuracy=ft["accuracy"], finetuned_std=ft["std"],
                           finetune=dict(epochs=a.finetune_epochs, lr=a.finetune_lr, batch=a.finetune_batch,
                                         iterations=done["iterations"], seconds=done["seconds"]))
            rows.append(row)
            print("%-8s keep %.2f  LFW %.2f%% +- %.2f%s  params %.3fM  MACs %.3fG  (%.0f s)"
                  % (crit, keep, 100 * row["accuracy"], 100 * row["std"],
                     "  fine-tuned %.2f%% +- %.2f" % (100 * row["finetuned_accuracy"], 100 * row["finetuned_std"])
                     if "finetuned_accuracy" in row else "", row["params"] / 1e6, row["macs"] / 1e9,
                     time.time() - start), flush=True)
            name = "criteria%s.json" % ("_finetuned" if a.finetune_epochs else "")
            caffe_io.atomic_write(os.path.join(a.out, name), json.dumps(dict(
                rows=rows, images=len(rels), test_folds=a.test_folds, reconstruct=a.reconstruct,
                targets=a.targets, **machine()), indent=1))
    print("\n| criterion | keep | LFW folds %s (%%), no fine-tuning | after fine-tuning | params | MACs |"
          % a.test_folds)
    print("|---|---|---|---|---|---|")
    for r in rows:
        ft = ("%.2f +- %.2f" % (100 * r["finetuned_accuracy"], 100 * r["finetuned_std"])
              if "finetuned_accuracy" in r else "")
        print("| %s | %.2f | %.2f +- %.2f | %s | %.3fM | %.1fM |" % (
            r["criterion"], r["keep"], 100 * r["accuracy"], 100 * r["std"], ft, r["params"] / 1e6, r["macs"] / 1e6))
    return 0


if __name__ == "__main__":
    sys.exit(main())
