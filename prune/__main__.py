"""python -m prune: layer-by-layer channel pruning of a Caffe net."""
import argparse
import json
import os
import sys

from prune import caffe_io
from prune.cli import entry
from prune.criteria import CRITERIA
from prune.data import image_batches, image_files, preprocess_for
from prune.driver import PruneError, PruneJob, plan_groups, run


def parse_keep(text):
    """'0.5' -> 0.5; 'conv1_1=0.5,conv2_1=0.75' -> dict."""
    try:
        if "=" not in text:
            return float(text)
        table = {}
        for item in text.split(","):
            name, value = item.split("=")
            table[name.strip()] = float(value)
        return table
    except ValueError:
        raise argparse.ArgumentTypeError("--keep takes a ratio (0.5) or a table (conv1_1=0.5,conv2_1=0.75), not %r"
                                         % text) from None


def parse_ridge(text):
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        value = -1
    if not value >= 0:
        raise argparse.ArgumentTypeError("--ridge takes 'auto' or a number >= 0, not %r" % text)
    return value


def read_plan(path):
    """The keep table of a plan file."""
    try:
        content = json.load(open(path))
        table = content["keep"]
        if not isinstance(table, dict) or not all(isinstance(v, (int, float)) for v in table.values()):
            raise ValueError
    except OSError as e:
        raise PruneError("cannot read plan file %s: %s" % (path, e.strerror)) from None
    except (ValueError, KeyError, TypeError):
        raise PruneError("%s is not a plan file: it needs a JSON object with a 'keep' table "
                         "{group: ratio}" % path) from None
    if not table:
        raise PruneError("%s: the plan's 'keep' table is empty; nothing to prune" % path)
    return {k: float(v) for k, v in table.items()}


def threshold_table(net, weights, layers, a):
    """--threshold as the driver's per-group keep table (ratios), only groups that lose channels."""
    from prune.criteria.bnscale import global_threshold_keep
    from prune.graph import build_graph
    if a.macs_target is not None:
        raise PruneError("--threshold and --macs-target both choose how much to keep; give one")
    if a.criterion not in (None, "bnscale"):
        raise PruneError("--threshold prunes by |gamma|: it needs --criterion bnscale, not %s" % a.criterion)
    a.criterion = "bnscale"
    graph = build_graph(net, source=a.model)
    kept = global_threshold_keep(graph, weights, a.threshold)
    if layers != "all":
        chosen = {gid for gid, _ in plan_groups(graph, layers, 1.0)}
        kept = {gid: k for gid, k in kept.items() if gid in chosen}
    table = {gid: len(k) / graph[gid].channels for gid, k in kept.items() if len(k) < graph[gid].channels}
    if not table:
        raise PruneError("%s: no channel of the selected groups has |gamma| below %g; nothing to prune"
                         % (a.weights, a.threshold))
    print("--threshold %g: %d of %d channels kept in %d groups"
          % (a.threshold, sum(len(k) for k in kept.values()), sum(graph[g].channels for g in kept), len(table)))
    return table


def finetune_hooks(a, net):
    """Callables for the driver: distill each pruned net from the original one."""
    if not (a.finetune_epochs_per_layer or a.finetune_epochs_final):
        return None, None
    if not a.train_list:
        raise PruneError("fine-tuning needs --train-list (python -m finetune.lists makes one)")
    from finetune.driver import FineTuneJob, finetune
    blob = a.blob or net.layer[-1].top[0]

    def hook(epochs):
        def run_one(out, proto, weights):
            job = FineTuneJob(deploy=proto, weights=weights, train_list=a.train_list, root_folder=a.train_root,
                              out=out,
                              head="distill", embedding=blob, teacher=a.model, teacher_weights=a.weights,
                              precompute_teacher=a.precompute_teacher,
                              epochs=epochs, batch_size=a.finetune_batch, base_lr=a.finetune_lr, rgb=a.rgb,
                              seed=a.seed, gpu=[int(g) for g in a.gpu.split(",")] if a.gpu else None)
            return finetune(job, resume=True, progress=not a.quiet)["final"]
        return run_one if epochs else None
    return hook(a.finetune_epochs_per_layer), hook(a.finetune_epochs_final)


def parser():
    ap = argparse.ArgumentParser(
        prog="python -m prune",
        description="Prune whole channels of a Caffe net, one channel group at a time in network order. "
                    "Before each group the current (already pruned) net is run over the images and every "
                    "consumer of the group is sampled; the criterion picks the channels to keep; ThiNet and "
                    "LASSO then rescale the consumers' kept inputs by least squares. A checkpoint is written "
                    "after every group: run the same command again to resume. Result: OUT/pruned.prototxt + "
                    "OUT/pruned.caffemodel (plain Caffe files) and OUT/log.json.")
    ap.add_argument("--model", required=True, help="deploy prototxt")
    ap.add_argument("--weights", required=True, help="its caffemodel (never modified)")
    ap.add_argument("--data", required=True,
                    help="images to sample: an image list ('path label' lines, see --root) or a folder of "
                         "identity folders (e.g. ../shared/data/lfw/images-112x112)")
    ap.add_argument("--root", default="", help="folder the list's paths are relative to")
    ap.add_argument("--lfw-folds", default=None,
                    help="with a folder --data: only people of these LFW View 2 folds, e.g. 1-5 (needs --pairs); "
                         "keeps folds 6-10 an honest test set")
    ap.add_argument("--pairs", default=None, help="LFW pairs.txt, for --lfw-folds")
    ap.add_argument("--images", type=int, default=None,
                    help="images per sampling pass, drawn once with --seed (default: all, at most 500)")
    ap.add_argument("--samples-per-image", type=int, default=10,
                    help="random (output filter, position) samples per image and consumer (default 10, as in "
                         "ThiNet). Memory: one C x C Gram per consumer plus one batch of activations; it does "
                         "not grow with --images; time grows linearly with --images")
    ap.add_argument("--criterion", default=None, choices=sorted(CRITERIA),
                    help="thinet: ThiNet remove-greedy + least squares (default); thinet-add: add-greedy with "
                         "least-squares refit; lasso: He et al. 2017; l1: filter L1 norm; random; actsum: the "
                         "original Sphereface-prune activation-sum pairs; bnscale: largest |gamma| of the "
                         "BatchNorm Scale layers (network slimming; the default with --threshold)")
    ap.add_argument("--keep", type=parse_keep, default=0.5,
                    help="share of channels kept: one ratio for every selected group (0.5), or a table by "
                         "layer/group name (conv1_1=0.5,conv2_1=0.75)")
    ap.add_argument("--macs-target", type=float, default=None,
                    help="instead of --keep: the share of the net's MACs to keep (e.g. 0.5); one keep ratio for "
                         "all selected groups is found by bisection (each probe a real surgery measured by "
                         "python -m prune.stats) and reported")
    ap.add_argument("--threshold", type=float, default=None,
                    help="instead of --keep: network slimming's global threshold (e.g. 0.1); every channel whose "
                         "|gamma| (Scale after BatchNorm, the largest over a residual stream) is below it goes, "
                         "so each group keeps its own share; a group keeps at least its largest channel. Needs "
                         "BatchNorm + Scale after the convs and --criterion bnscale (implied)")
    ap.add_argument("--plan", default=None,
                    help="instead of --keep: a plan file (JSON with a 'keep' table of per-group ratios, as "
                         "python -m prune.sensitivity writes it; groups left out are not pruned)")
    ap.add_argument("--layers", default="all",
                    help="comma-separated layers or group ids to prune, in any order (they are pruned in "
                         "network order); default all prunable groups (python -m prune.groups lists them)")
    rec = ap.add_argument_group("reconstruction of the layers that read a pruned group")
    rec.add_argument("--reconstruct", default="full", choices=("full", "scale", "none"),
                     help="full (default): least squares of every kept weight and the intercept of each "
                          "consumer; scale: ThiNet's one scale per kept input channel; none: keep the weights")
    rec.add_argument("--targets", default="original", choices=("original", "current"),
                     help="reconstruct towards the unpruned net's outputs (default; later steps correct earlier "
                          "ones) or the current, already pruned net's")
    rec.add_argument("--ridge", default="auto", type=parse_ridge,
                     help="ridge of the least squares, towards the current weights, relative to the mean "
                          "diagonal of X'X; auto (default): chosen per layer on held-out images")
    rec.add_argument("--positions-per-image", type=int, default=10,
                     help="sampled output positions per image for the least squares (all output channels at "
                          "each; default 10)")
    ap.add_argument("--rgb", action="store_true",
                    help="the net expects RGB planes (e.g. MobileFaceNet); default BGR (Caffe, SphereFace)")
    ap.add_argument("--crop", default="auto", choices=("auto", "112x96", "none"),
                    help="auto: SphereFace 112x96 crop when the images are 112x112 and the net takes 112x96")
    ap.add_argument("--batch", type=int, default=32, help="images per Caffe forward (default 32)")
    ap.add_argument("--seed", type=int, default=0, help="seed of image draw, sampling and random criterion")
    ft = ap.add_argument_group("fine-tuning (distillation from the unpruned net, Caffe's solver; python -m finetune)")
    ft.add_argument("--finetune-epochs-per-layer", type=float, default=0,
                    help="epochs of fine-tuning after each pruned group (the original recipe: 1; default 0 = none)")
    ft.add_argument("--finetune-epochs-final", type=float, default=0,
                    help="epochs after the last group (the original recipe: 8-9; default 0 = none)")
    ft.add_argument("--train-list", help="image list for fine-tuning ('path label' lines; python -m finetune.lists)")
    ft.add_argument("--train-root", default="", help="folder the training list's paths are relative to")
    ft.add_argument("--blob", default=None, help="embedding blob (default: the net's last output)")
    ft.add_argument("--finetune-batch", type=int, default=64, help="fine-tune batch size (default 64)")
    ft.add_argument("--finetune-lr", type=float, default=1e-3, help="fine-tune base lr (default 1e-3, the recipe's)")
    ft.add_argument("--precompute-teacher", action="store_true",
                    help="compute the unpruned net's embeddings of the training images once instead of running "
                         "it inside every fine-tune (as python -m finetune --precompute-teacher; much faster on a CPU)")
    ft.add_argument("--gpu", default=None, help="fine-tune on these GPU ids (as python -m finetune --gpu)")
    ap.add_argument("--out", required=True, help="run folder (steps/, pruned.prototxt, pruned.caffemodel, log.json)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap


@entry("python -m prune")
def main(argv=None):
    a = parser().parse_args(argv)
    for path in (a.model, a.weights):
        if not os.path.exists(path):
            raise PruneError("no such file: %s" % path)
    net = caffe_io.read_net(a.model)
    from finetune.trainnet import input_layer
    _, shape = input_layer(net, a.model)
    root, rels = image_files(a.data, a.root, a.lfw_folds, a.pairs, a.images or 0, a.seed)
    if a.images is None and len(rels) > 500:
        root, rels = image_files(a.data, a.root, a.lfw_folds, a.pairs, 500, a.seed)
    pre = preprocess_for(shape, root, rels, a.rgb, a.crop)
    layers = "all" if a.layers == "all" else [s.strip() for s in a.layers.split(",") if s.strip()]
    if a.plan is not None:
        a.keep = read_plan(a.plan)
    if a.threshold is not None:
        a.keep, layers = threshold_table(net, caffe_io.read_weights(a.weights), layers, a), "all"
    elif a.macs_target is not None:
        from prune.driver import ratio_for_macs
        a.keep, reached = ratio_for_macs(net, caffe_io.read_weights(a.weights), layers, a.macs_target, a.model)
        print("--macs-target %g: keep ratio %.4f on every selected group leaves %.2f%% of the MACs"
              % (a.macs_target, a.keep, 100 * reached))
    job = PruneJob(model=a.model, weights=a.weights, out=a.out, criterion=a.criterion or "thinet", keep=a.keep,
                   layers=layers, samples_per_image=a.samples_per_image, seed=a.seed,
                   reconstruct=a.reconstruct, targets=a.targets, ridge=a.ridge,
                   positions_per_image=a.positions_per_image,
                   data=dict(data=a.data, root=root, images=len(rels), lfw_folds=a.lfw_folds,
                             rgb=a.rgb, crop=pre.crop))
    step_ft, final_ft = finetune_hooks(a, net)
    log = run(job, lambda: image_batches(root, rels, pre, a.batch), finetune=step_ft, final_finetune=final_ft,
              progress=not a.quiet)
    for s in log["steps"]:
        err = ", ".join("%s %.3f->%.3f" % (k, v["removed"], v["rescaled"]) for k, v in s["error"].items())
        print("%-12s %4d -> %-4d  rel. error %s" % (s["group"], s["channels"], s["kept"], err))
    print("pruned net: %s + %s" % (log["prototxt"], log["caffemodel"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
