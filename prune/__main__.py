"""python -m prune: layer-by-layer channel pruning of a Caffe net (with optional fine-tuning)."""
import os

from base import caffe_io, cli, netcheck
from base.errors import ToolkitError
from base.images import image_batches
from base.netinput import input_layer
from prune import options, plans
from prune.criteria import CRITERIA, make as make_criterion
from prune.driver import PruneJob, needs_images, run

PROG = "python -m prune"


def finetune_hooks(a, net):
    """The driver's fine-tune hooks: distil each pruned net from the original one (finetune.hooks)."""
    if not (a.finetune_epochs_per_layer or a.finetune_epochs_final):
        return None, None
    if not a.train_list:
        raise cli.UsageError("fine-tuning needs --train-list (python -m finetune.lists makes one)")
    from finetune.hooks import FineTuneSpec, distill_hooks
    spec = FineTuneSpec(train_list=a.train_list, train_root=a.train_root,
                        epochs_per_layer=a.finetune_epochs_per_layer, epochs_final=a.finetune_epochs_final,
                        lr=a.finetune_lr, batch=a.finetune_batch, embedding=a.blob or net.layer[-1].top[0],
                        rgb=a.rgb, precompute_teacher=a.precompute_teacher, seed=a.seed,
                        gpu=tuple(a.gpu) if a.gpu else None, progress=not a.quiet, cache_dir=a.cache_dir,
                        similarity=a.distill_similarity, similarity_hard=a.similarity_hard, fold_bn=a.fold_bn)
    try:
        return distill_hooks(spec, a.model, a.weights, check_in=a.out)
    except ToolkitError as e:   # its messages name python -m finetune's flags: say which of ours set them
        raise cli.UsageError("fine-tuning with --finetune-batch %d, --finetune-lr %g, --train-list %s: %s"
                             % (a.finetune_batch, a.finetune_lr, a.train_list, e)) from None


def parser():
    ap = cli.parser(
        PROG,
        description="Prune whole channels of a Caffe net, one channel group at a time in network order. "
                    "Before each group the current (already pruned) net and the unpruned one are run over the "
                    "images and every consumer of the group is sampled; the criterion picks the channels to "
                    "keep; every consumer is then reconstructed by least squares (by default all its kept "
                    "weights and its intercept, towards the unpruned net's outputs). A checkpoint is written "
                    "after every group: run the same command again to resume. Result: OUT/pruned.prototxt + "
                    "OUT/pruned.caffemodel (plain Caffe files), OUT/log.json and OUT/plan.json (the channels "
                    "each group keeps, which --plan runs again, edited or not). A net of a Caffe fork (layers "
                    "this Caffe build lacks, e.g. Axpy, Permute, Normalize) is run only on the part without them: "
                    "groups that feed such layers can be pruned by a criterion that reads only weights (l1, "
                    "bnscale, random) with --reconstruct none, the others as usual.")
    cli.add_net(ap, weights_required=True, blob_default=None,
                blob_help="embedding blob, for fine-tuning (default: the net's last output)")
    options.add_images(ap, required=False)
    ap.add_argument("--samples-per-image", type=cli.count, default=10,
                    help="random (output filter, position) samples per image and consumer (default 10, as in "
                         "ThiNet). Memory: one C x C Gram per consumer plus one batch of activations; it does "
                         "not grow with --images; time grows linearly with --images")
    ap.add_argument("--criterion", default=None, choices=sorted(CRITERIA),
                    help="thinet: ThiNet remove-greedy + least squares (default); thinet-add: add-greedy with "
                         "least-squares refit; lasso: He et al. 2017; l1: filter L1 norm; random; actsum: the "
                         "original Sphereface-prune activation-sum pairs; bnscale: largest |gamma| of the "
                         "BatchNorm Scale layers (network slimming; the default with --threshold); taylor: Molchanov's "
                         "first-order Taylor importance from Caffe's backward pass of a label-free loss (distance "
                         "of the net's L2-normalised output to the unpruned net's mean output on the image and "
                         "its mirror), one extra forward+backward pass per group")
    plans.add_arguments(ap)
    options.add_reconstruction(ap)
    ap.add_argument("--seed", type=cli.whole, default=0, help="seed of image draw, sampling and random criterion")
    ft = ap.add_argument_group("fine-tuning (distillation from the unpruned net, Caffe's solver; python -m finetune)")
    ft.add_argument("--finetune-epochs-per-layer", type=cli.non_negative, default=0,
                    help="epochs of fine-tuning after each pruned group (the original recipe: 1; default 0 = none)")
    ft.add_argument("--finetune-epochs-final", type=cli.non_negative, default=0,
                    help="epochs after the last group (the original recipe: 8-9; default 0 = none)")
    cli.add_train_list(ft)
    ft.add_argument("--finetune-batch", type=cli.count, default=64, help="fine-tune batch size (default 64)")
    cli.add_finetune_lr(ft, 1e-3, "fine-tune base lr (default 1e-3, the recipe's)")
    ft.add_argument("--precompute-teacher", action="store_true",
                    help="compute the unpruned net's embeddings of the training images once instead of running "
                         "it inside every fine-tune (as python -m finetune --precompute-teacher; much faster on a CPU)")
    from finetune.hooks import add_fold_bn, add_similarity
    add_similarity(ft)
    add_fold_bn(ft)
    ft.add_argument("--gpu", type=cli.gpu_ids, default=None,
                    help="fine-tune on these GPU ids (as python -m finetune --gpu)")
    cli.add_cache_dir(ft)
    ap.add_argument("--out", required=True, help="run folder (steps/, pruned.prototxt, pruned.caffemodel, log.json)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap


def check_inputs(a, spec):
    """Every input checked before any work (base.cli.check_run_inputs: files, outputs over inputs, a net and a
    caffemodel Caffe can load, the fine-tune list's images, the output folder; and the GPU); returns the net."""
    fine_tune = bool(a.finetune_epochs_per_layer or a.finetune_epochs_final)
    name = plans.criterion_of(a)
    if a.data is None and spec.needs_images():
        raise cli.UsageError("--data is required: the sensitivity allocation (--allocation sensitivity, the default "
                             "with --macs-target, and --latency-target) runs the net on images; --allocation "
                             "uniform does not")
    if a.data is None and (needs_images(make_criterion(name), a.reconstruct) or a.bn_reestimate != "none"
                           or a.blockfit_epochs):
        how = "" if a.reconstruct == "none" else " with --reconstruct " + a.reconstruct
        raise cli.UsageError("--data is required: --criterion %s%s runs the net on images (only l1, bnscale or "
                             "random with --reconstruct none and no --bn-reestimate read the weights alone)"
                             % (name, how))
    cli.check_run_inputs(a, dict(model=a.model, weights=a.weights, train_list=a.train_list, pairs=a.pairs,
                                 plan=a.plan, data=a.data if a.data and os.path.isfile(a.data) else None),
                         nets=[("model", "weights")], train_list=fine_tune, runnable_part=True)
    cli.check_gpu(a.gpu)
    return caffe_io.read_net(a.model)


def check_memory(a, net, images):
    """Refuse sampling settings whose arrays would not fit in the memory free here (the kernel would kill
    the run in its first batch), with the estimate."""
    from prune.graph import build_graph
    from prune.sample import batch_bytes
    free = netcheck.available_memory()
    if not images or free is None:
        return
    need = batch_bytes(build_graph(net, a.model), min(a.batch, images), a.samples_per_image, a.positions_per_image)
    if need > free:
        raise cli.UsageError("--samples-per-image %d, --positions-per-image %d at --batch %d: sampling would hold "
                             "about %.1f GB per batch, more than the %.1f GB of memory free here"
                             % (a.samples_per_image, a.positions_per_image, min(a.batch, images), need / 1e9,
                                free / 1e9))


@cli.entry(PROG)
def main(argv=None):
    a = parser().parse_args(argv)
    plans.check_arguments(a)
    spec = plans.spec_of(a)
    net = check_inputs(a, spec)
    _, shape = input_layer(net, a.model)
    root, rels, pre, _ = options.images_of(a, shape) if a.data else (None, [], None, None)
    check_memory(a, net, len(rels))
    step_ft, final_ft = finetune_hooks(a, net)
    sampling = None
    if spec.needs_images():
        sampling = plans.sampling_of(a, shape, os.path.join(a.out, "plan"), a.blob or net.layer[-1].top[0])
    plan = plans.make(spec, a.model, a.weights, sampling)
    print(plans.summary(plan))
    job = PruneJob(model=a.model, weights=a.weights, out=a.out, criterion=plans.criterion_of(a), plan=plan,
                   samples_per_image=a.samples_per_image, seed=a.seed,
                   reconstruct=a.reconstruct, targets=a.targets, ridge=a.ridge,
                   positions_per_image=a.positions_per_image, bn_reestimate=a.bn_reestimate,
                   blockfit_epochs=a.blockfit_epochs, blockfit_lr=a.blockfit_lr,
                   data=dict(data=a.data, root=root, images=len(rels), lfw_folds=a.lfw_folds,
                             rgb=a.rgb, crop=pre.crop if pre else None))
    log = run(job, lambda: image_batches(root, rels, pre, a.batch), finetune=step_ft, final_finetune=final_ft,
              progress=not a.quiet)
    for s in log["steps"]:
        err = ", ".join("%s %.3f->%.3f" % (k, v["removed"], v.get("target_after", v["rescaled"]))
                        for k, v in s["error"].items())
        print("%-12s %4d -> %-4d  rel. error %s"
              % (s["group"], s["channels"], s["kept"], err or "not measured (no images)"))
    print("pruned net: %s + %s" % (log["prototxt"], log["caffemodel"]))
    left = log["not_run_in_caffe"]
    if left:
        roots = [name for name, _ in netcheck.causes([(x["layer"], x["why"]) for x in left])]
        print("checked in Caffe on the part of the net this build runs; not run there, their blobs checked against "
              "the inferred shapes only: %s (types this Caffe build lacks) and the %d layer(s) reading what they "
              "make (log.json: not_run_in_caffe)" % (", ".join(roots), len(left) - len(roots)))
    return 0


if __name__ == "__main__":
    cli.run(main)
