"""How much accuracy each recovery ingredient keeps: the real MobileFaceNet at half its MACs.

One row per recipe, each adding one ingredient to a previous row: ThiNet as
it was (one scale per kept channel, targets from the pruned net, one keep
ratio for every group); targets from the unpruned net; full least squares of
every kept weight; BatchNorm re-estimation; per-group keep ratios allocated
from a sensitivity analysis, the cuts ranked by MACs or by the time they save
in Caffe (prune.latency; at the same MACs, or at the Caffe latency of the
MACs-ranked plan); distillation fine-tuning with Caffe's solver.
Everything that is sampled, calibrated or trained sees only images of people
of LFW folds 1-5 or of people in no pair of pairs.txt; accuracy is the LFW
protocol over folds 6-10 (5-fold cross-validation, no flip; the last row also
with flip).  ``cpu_minutes`` is the CPU time (user + system, all threads) that
the row's net cost from the unpruned one, cumulative along its chain;
``wall_minutes`` the elapsed time on this 2-core machine (pessimistic when the
machine is shared).  Each row's files live in OUT/ROW/ and a finished row is
read back, so the script resumes; results go to docs/results/retention.json
(rows in order) and the table is printed.

    .venv/bin/python benchmarks/bench_retention.py                  # every row
    .venv/bin/python benchmarks/bench_retention.py --rows thinet,full
"""
import json
import os
import sys
import time

from common import ROOT, add_face_model, machine, parser  # first: puts the repository on sys.path

import numpy as np  # noqa: E402

from base import caffe_io  # noqa: E402
from base.images import image_batches, preprocess_for  # noqa: E402
from base.lists import list_text, scan_tree  # noqa: E402
from base.runfolder import cpu_seconds  # noqa: E402
from eval_lfw.pairs import lfw_people  # noqa: E402

# name: (parent row, what it adds, settings)
ROWS = {
    "unpruned": (None, "the unpruned net", dict(unpruned=True)),
    "thinet": (None, "ThiNet as before: one scale per kept channel, targets from the pruned net, one ratio",
               dict(reconstruct="scale", targets="current", allocation="uniform")),
    "original": ("thinet", "+ targets from the unpruned net", dict(reconstruct="scale", targets="original")),
    "full": ("original", "+ full least squares (every kept weight and the intercept)", dict(reconstruct="full")),
    "bn": ("full", "+ BatchNorm re-estimation", dict(bn=True)),
    "allocated": ("full", "+ sensitivity allocation (per-group ratios; no BatchNorm re-estimation)",
                  dict(allocation="sensitivity")),
    "latency": ("full", "+ sensitivity allocation ranked by the time each cut saves in Caffe (prune.latency; the "
                "allocated row's curves)", dict(allocation="latency")),
    "latency_equal": ("full", "+ sensitivity allocation ranked by Caffe time, to the Caffe latency the allocated "
                      "row's plan predicts (it keeps more MACs)", dict(allocation="latency_equal")),
    "blockfit": ("allocated", "+ block-wise fit: each block fitted to the unpruned block's output on its cached "
                 "inputs (finetune.blockfit; no SGD through the whole net), 6 passes per block", dict(blockfit=6)),
    "blockfit16": ("allocated", "+ block-wise fit, 16 passes per block", dict(blockfit=16)),
    "blockfit_finetune3": ("blockfit", "+ block-wise fit, then distillation fine-tuning, 3 epochs (Caffe SGD)",
                           dict(epochs=3)),
    "blockfit16_similarity3": ("blockfit16", "+ block-wise fit (16 passes), then distillation of the embedding and "
                               "of the cosines between faces, 3 epochs", dict(epochs=3, similarity=True)),
    "finetune3": ("allocated", "+ distillation fine-tuning, 3 epochs (Caffe SGD)", dict(epochs=3)),
    "features3": ("allocated", "+ distillation of the embedding and of the block outputs, 3 epochs (teacher run "
                  "online)", dict(epochs=3, features=True)),
    "augment3": ("allocated", "+ distillation with online augmentation (shift 4 px, zoom 1 +- 0.05, colour +- 0.1; "
                 "teacher run online), 3 epochs", dict(epochs=3, augment=True)),
    "similarity3": ("allocated", "+ distillation of the embedding and of the cosines between the faces of each "
                    "batch (finetune.similarity, hard-pair emphasis), 3 epochs", dict(epochs=3, similarity=True)),
    "mixup3": ("allocated", "+ distillation on mixup blends of two faces of the batch (Beta(a, a); the teacher run "
               "online sees the same blend), 3 epochs", dict(epochs=3, mixup=True)),
    "finetune": ("allocated", "+ distillation fine-tuning, 8 epochs (Caffe SGD)", dict(epochs=8)),
    "full_current": ("thinet", "for comparison: full least squares, targets from the pruned net",
                     dict(reconstruct="full")),
}
DEFAULTS = dict(reconstruct="full", targets="original", allocation="uniform", bn=False, epochs=0, features=False,
                augment=False, similarity=False, mixup=False, blockfit=0, unpruned=False)


def settings(row):
    parent, _, own = ROWS[row]
    out = dict(DEFAULTS) if parent is None else settings(parent)
    out.update(own)
    return out


class Clock:
    """CPU time (this process and its children) and wall time since creation, in minutes."""

    def __init__(self):
        self.cpu, self.wall = cpu_seconds(), time.time()

    def minutes(self):
        return (cpu_seconds() - self.cpu) / 60.0, (time.time() - self.wall) / 60.0


def training_people(tree, pairs):
    """People of LFW folds 1-5 and people in no pair: the only ones anything here learns from."""
    f15 = lfw_people(pairs, "1-5")
    paired = lfw_people(pairs, "1-10")
    return sorted(p for p in tree if p in f15 or p not in paired)


def data(a):
    """(sampling images, the sensitivity analysis's own sampling and held-out images, training list path).
    The sensitivity's held-out images are held out from its own sampling, not from the pruning's."""
    tree = scan_tree(a.lfw_dir)
    people = training_people(tree, a.pairs)
    rels = sorted(r for p in people for r in tree[p])
    order = np.random.default_rng(a.seed).permutation(len(rels))
    sample = [rels[i] for i in sorted(order[:a.images])]
    fit = [rels[i] for i in sorted(order[:a.sensitivity_images])]
    judge = [rels[i] for i in sorted(order[a.sensitivity_images:a.sensitivity_images + a.judge_images])]
    os.makedirs(a.out, exist_ok=True)
    train = os.path.join(a.out, "train.txt")
    if not os.path.exists(train):
        caffe_io.atomic_write(train, list_text([(r, i) for i, p in enumerate(people) for r in tree[p]]))
    return sample, (fit, judge), train


def evaluate(a, proto, weights, flip=False):
    """(accuracy, std) on the pairs of LFW folds 6-10, and the TARs over all pairs of those folds' people
    (at most 10 images each; eval_lfw.allpairs)."""
    from eval_lfw.evaluator import evaluate as lfw
    r = lfw(proto, a.blob, a.lfw_dir, a.pairs, weights=weights, folds="6-10", crop="none", flip=flip, bgr=False,
            progress=False, all_pairs=10)
    tars = {"tar_at_far_" + k: round(100 * v, 2) for k, v in r["all_pairs"]["tar_at_far"].items()}
    return round(100 * r["accuracy_mean"], 2), round(100 * r["accuracy_std"], 2), tars


def keep_plan(a, s, sample, judge, out):
    """The driver's plan: one ratio for the MACs target, or the sensitivity allocation's counts."""
    from prune import plans, policy
    from prune.macs import MacsModel
    net, weights = caffe_io.read_net(a.model), caffe_io.read_weights(a.weights)
    made_by = dict(policy="macs-target" if s["allocation"] == "uniform" else "sensitivity", net=a.model,
                   allocation=s["allocation"], macs_target=a.macs_target)
    if s["allocation"] == "uniform":
        return policy.for_macs(MacsModel(net, source=a.model), "all", a.macs_target, made_by)
    from prune import latency, sensitivity
    fit, held = judge
    pre = preprocess_for((1, 3, 112, 112), a.lfw_dir, fit, True, "none")
    record = sensitivity.analyse(net, weights, lambda: image_batches(a.lfw_dir, fit, pre),   # one analysis for both
                                 lambda: image_batches(a.lfw_dir, held, pre), a.blob,
                                 os.path.join(a.out, "allocated", "sensitivity.json"), progress=not a.quiet)
    macs = MacsModel(net, source=a.model)
    rank = None
    if s["allocation"] != "sensitivity":   # the tables bench_runtimes.py times with (4 counts per axis), cached
        rank = latency.model_for(net, "caffe", source=a.model, graph=macs.graph, points=4,
                                 lowest=min(record["ratios"]), progress=not a.quiet)
    if s["allocation"] == "latency_equal":
        same = rank.share(sensitivity.allocate(record, macs, a.macs_target))
        got = sensitivity.allocation(record, macs, None, latency=rank, latency_target=same)
    else:
        got = sensitivity.allocation(record, macs, a.macs_target, latency=rank)
    made_by.update({k: v for k, v in got.items() if k != "keep"})
    plan = policy.make_plan(macs.graph, got["keep"], made_by)
    os.makedirs(out, exist_ok=True)
    plans.write(plan, os.path.join(out, "plan.json"))
    return plan


def prune_row(a, row, s, sample, judge):
    from prune.driver import PruneJob, run
    out = os.path.join(a.out, row)
    plan = keep_plan(a, s, sample, judge, out)
    pre = preprocess_for((1, 3, 112, 112), a.lfw_dir, sample, True, "none")
    job = PruneJob(model=a.model, weights=a.weights, out=os.path.join(out, "prune"), plan=plan,
                   reconstruct=s["reconstruct"], targets=s["targets"], seed=a.seed)
    log = run(job, lambda: image_batches(a.lfw_dir, sample, pre), progress=not a.quiet)
    return log["prototxt"], log["caffemodel"]


def bn_row(a, row, proto, model, sample):
    from prune import bnstats
    net = caffe_io.read_net(proto)
    pre = preprocess_for((1, 3, 112, 112), a.lfw_dir, sample, True, "none")
    new = bnstats.reestimate(net, caffe_io.read_weights(model), image_batches(a.lfw_dir, sample, pre))
    path = os.path.join(a.out, row, "bn.caffemodel")
    caffe_io.write_weights(net, new, path)
    return path


def blockfit_row(a, row, proto, model, sample, parent):
    """finetune.blockfit over the parent's pruned net, on the sampling images, towards the unpruned net."""
    from finetune import blockfit
    pre = preprocess_for((1, 3, 112, 112), a.lfw_dir, sample, True, "none")
    images = np.concatenate(list(image_batches(a.lfw_dir, sample, pre)))
    log = json.load(open(os.path.join(os.path.dirname(parent["prototxt"]), "log.json")))
    net = caffe_io.read_net(proto)
    fitted, record = blockfit.fit(net, caffe_io.read_weights(model), caffe_io.read_net(a.model),
                                  caffe_io.read_weights(a.weights), images, out_map=log["steps"][-1]["out_map"],
                                  epochs=ROWS[row][2]["blockfit"], lr=a.blockfit_lr, seed=a.seed, progress=not a.quiet)
    out = os.path.join(a.out, row)
    os.makedirs(out, exist_ok=True)
    caffe_io.atomic_write(os.path.join(out, "blockfit.json"), json.dumps(record, indent=1))
    return caffe_io.write_weights(net, fitted, os.path.join(out, "blockfit.caffemodel"))


def finetune_row(a, row, proto, model, epochs, train, features=False, augment=False, similarity=False, mixup=False):
    """Distillation from the unpruned net, lr /10 at 60 % and 85 %, mirrored images. The teacher's embeddings
    are computed once, or with ``features`` the teacher runs in the train net and the output of every residual
    block that kept its shape is copied too (--feature-weight each); with ``augment`` every image is also
    shifted, zoomed and recoloured at random (the teacher runs in the train net and sees the same image)."""
    from finetune.driver import FineTuneJob, finetune
    from finetune.solver import iterations
    n = iterations(sum(1 for _ in open(train)), epochs, 64)
    steps = tuple(sorted({max(1, int(n * f)) for f in (0.6, 0.85)}))
    job = FineTuneJob(deploy=proto, weights=model, train_list=train, root_folder=a.lfw_dir,
                      out=os.path.join(a.out, row, "finetune"), head="distill", embedding=a.blob,
                      teacher=a.model, teacher_weights=a.weights,
                      precompute_teacher=not (features or augment or mixup), augment_mixup=a.mixup if mixup else 0.0,
                      augment_shift=4 if augment else 0, augment_scale=0.05 if augment else 0.0,
                      augment_colour=0.1 if augment else 0.0,
                      distill_features=("auto",) if features else (), feature_weight=a.feature_weight, epochs=epochs,
                      similarity_weight=a.similarity_weight if similarity else 0.0,
                      similarity_hard=a.similarity_hard if similarity else 0.0,
                      batch_size=64, base_lr=a.finetune_lr, lr_policy="multistep", gamma=0.1, stepvalues=steps,
                      mirror=True, rgb=True, seed=a.seed)
    return finetune(job, resume=True, progress=not a.quiet)["final"]


def build_row(a, row, s, done, sample, judge, train):
    """(prototxt, caffemodel, SGD used) of the row's net, from its parent's where it only adds a step."""
    parent, _, own = ROWS[row]
    if own.get("unpruned"):
        return a.model, a.weights, False
    if parent is None or {"reconstruct", "targets", "allocation"} & set(own):
        proto, model = prune_row(a, row, s, sample, judge)
        return proto, model, False
    proto, model = done[parent]["prototxt"], done[parent]["caffemodel"]
    if own.get("bn"):
        return proto, bn_row(a, row, proto, model, sample), done[parent]["sgd"]
    if own.get("blockfit"):
        return proto, blockfit_row(a, row, proto, model, sample, done[parent]), done[parent]["sgd"]
    return proto, finetune_row(a, row, proto, model, own["epochs"], train, own.get("features", False),
                               own.get("augment", False), own.get("similarity", False), own.get("mixup", False)), True


def run_row(a, row, done, sample, judge, train):
    from prune.stats import net_stats
    s = settings(row)
    clock = Clock()
    proto, model, sgd = build_row(a, row, s, done, sample, judge, train)
    cpu, wall = clock.minutes()
    parent = ROWS[row][0]
    chained = parent is not None and not {"reconstruct", "targets", "allocation"} & set(ROWS[row][2])
    base = done[parent] if chained else {"cpu_minutes": 0.0, "wall_minutes": 0.0}
    stats, full = net_stats(proto), net_stats(a.model)
    acc, std, tars = evaluate(a, proto, model)
    rec = dict(recipe=ROWS[row][1], row=row, command=command(a, row), settings=s,
               macs_share=round(stats.macs / full.macs, 4), macs=stats.macs, params=stats.params, lfw_folds_6_10=acc,
               lfw_std=std, **tars, flip=False, sgd=sgd, own_cpu_minutes=round(cpu, 1),
               finetune_cpu_minutes=round(cpu, 1) if chained and sgd else 0.0,
               cpu_minutes=round(base["cpu_minutes"] + cpu, 1), wall_minutes=round(base["wall_minutes"] + wall, 1),
               prototxt=proto, caffemodel=model)
    if row == "finetune":
        rec["lfw_folds_6_10_flip"] = evaluate(a, proto, model, flip=True)[0]
    return rec


def command(a, row):
    """The command line that makes this row (its parents are made on the way, or read back)."""
    flags = ["--rows", row]
    for name in ("macs_target", "images", "finetune_lr", "feature_weight", "similarity_weight", "similarity_hard",
                 "mixup", "blockfit_lr", "seed"):
        value = getattr(a, name)
        if value != PARSER_DEFAULTS[name]:
            flags += ["--" + name.replace("_", "-"), "%g" % value]
    return " ".join([".venv/bin/python benchmarks/bench_retention.py"] + flags)


def refresh(a, done, rows):
    """Rows measured before the all-pairs protocol existed: their nets (when still on disk) evaluated again, the
    TAR fields added, nothing else changed."""
    for row in rows:
        r = done.get(row)
        if r is None or "tar_at_far_1e-4" in r:
            continue
        if not (os.path.exists(r["prototxt"]) and os.path.exists(r["caffemodel"])):
            print("[retention] %s: its net is no longer on disk; run the row again for its TARs" % row,
                  file=sys.stderr)
            continue
        acc, std, tars = evaluate(a, r["prototxt"], r["caffemodel"])
        if (acc, std) != (r["lfw_folds_6_10"], r["lfw_std"]):
            print("[retention] %s: accuracy %.2f +- %.2f now, %.2f +- %.2f recorded" % (
                row, acc, std, r["lfw_folds_6_10"], r["lfw_std"]), file=sys.stderr)
        r.update(tars)


def table(records):
    lines = ["| recipe | MACs | params | LFW 6-10 | TAR@1e-3 | TAR@1e-4 | SGD | CPU min | wall min |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        acc = "%.2f +- %.2f" % (r["lfw_folds_6_10"], r["lfw_std"])
        if "lfw_folds_6_10_flip" in r:
            acc += " (flip %.2f)" % r["lfw_folds_6_10_flip"]
        tar = ["%.2f" % r[k] if k in r else "-" for k in ("tar_at_far_1e-3", "tar_at_far_1e-4")]
        lines.append("| %s | %.1f%% | %.3fM | %s | %s | %s | %s | %.1f | %.1f |" % (
            r["recipe"], 100 * r["macs_share"], r["params"] / 1e6, acc, tar[0], tar[1], "yes" if r["sgd"] else "no",
            r["cpu_minutes"], r["wall_minutes"]))
    return "\n".join(lines)


def parse_args(argv=None):
    p = parser(__doc__)
    add_face_model(p)
    p.add_argument("--rows", default=",".join(ROWS), help="rows to run, in order (a row needs its parent)")
    p.add_argument("--macs-target", type=float, default=0.5, help="share of the MACs to keep")
    p.add_argument("--images", type=int, default=1024, help="sampling images")
    p.add_argument("--sensitivity-images", type=int, default=512, help="sampling images of the sensitivity analysis")
    p.add_argument("--judge-images", type=int, default=128, help="held-out images judging the sensitivity")
    p.add_argument("--finetune-lr", type=float, default=1e-2,
                   help="fine-tune base lr (/10 at 60%% and 85%% of the iterations; mirrored images too)")
    p.add_argument("--feature-weight", type=float, default=0.2,
                   help="weight of each copied block output's mean squared error (the features3 row); 0.2 makes "
                        "the eight maps' terms about as large as the embedding's at the start on the MobileFaceNet")
    p.add_argument("--similarity-weight", type=float, default=10.0,
                   help="loss weight of the pairwise-cosine distillation (the similarity3 row)")
    p.add_argument("--similarity-hard", type=float, default=4.0,
                   help="its emphasis on the pairs the teacher finds alike (exp(hard * teacher cosine))")
    p.add_argument("--mixup", type=float, default=0.4, help="Beta(a, a) of the mixup3 row's blends")
    p.add_argument("--blockfit-lr", type=float, default=3e-4, help="Adam's learning rate of the block-wise fit")
    p.add_argument("--rerun", action="store_true",
                   help="measure the rows of --rows again even where the result file has them (their parents are "
                        "read back)")
    p.add_argument("--refresh", action="store_true",
                   help="add the all-pairs TARs to recorded rows of --rows that lack them (their nets must still be "
                        "on disk), then exit")
    p.add_argument("--seed", type=int, default=0, help="seed of the image draw")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "bench_retention"), help="work folder")
    p.add_argument("--json", default=os.path.join(ROOT, "docs", "results", "retention.json"), help="result file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


PARSER_DEFAULTS = vars(parse_args([]))


def main(argv=None):
    a = parse_args(argv)
    sample, judge, train = data(a)
    done = {}
    if os.path.exists(a.json):
        done = {r["row"]: r for r in json.load(open(a.json))["rows"]}
    wanted = [r.strip() for r in a.rows.split(",") if r.strip()]
    unknown = [r for r in wanted if r not in ROWS]
    if unknown:
        raise SystemExit("unknown row(s) %s; rows: %s" % (", ".join(unknown), ", ".join(ROWS)))
    if a.refresh:
        refresh(a, done, wanted)
        save(a, done, wanted)
        print(table([done[r] for r in ROWS if r in done]))
        return
    for row in wanted:
        if row not in done or a.rerun:
            print("[retention] %s: %s" % (row, ROWS[row][1]), file=sys.stderr, flush=True)
            done[row] = run_row(a, row, done, sample, judge, train)
            done = save(a, done, [row])
    print(table([done[r] for r in ROWS if r in done]))


def save(a, done, measured):
    """Write the rows: those of the result file (another run of this script may have finished some meanwhile;
    notes written by hand are kept), with the rows this run ``measured`` in place of theirs."""
    about = dict(sampling_images=a.images, training_images="LFW folds 1-5 people + people in no pair",
                 evaluation="LFW folds 6-10, 5-fold CV; TAR over all pairs of the images of folds 6-10 people, at "
                            "most 10 each (eval_lfw.allpairs)")
    mine = dict(done)
    if os.path.exists(a.json):
        before = json.load(open(a.json))
        done = dict(done, **{r["row"]: r for r in before["rows"]})
        done.update({r: mine[r] for r in measured})
        about.update({k: v for k, v in before.get("data", {}).items() if k == "note"})
    records = [done[r] for r in ROWS if r in done]
    caffe_io.atomic_write(a.json, json.dumps(dict(machine=machine(), data=about, rows=records), indent=1))
    return done


if __name__ == "__main__":
    main()
