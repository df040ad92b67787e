"""python -m finetune: fine-tune (or train) a Caffe deploy net with Caffe's solver."""
import json

from base import caffe_io, cli
from .driver import FineTuneJob, finetune
from .hooks import add_fold_bn, add_similarity
from .solver import POLICIES

PROG = "python -m finetune"


def parser():
    ap = cli.parser(
        PROG,
        description="Fine-tune a Caffe deploy net with Caffe's own SGD solver, from an image list. "
                    "Writes train/solver prototxts, Caffe snapshots, loss.csv/loss.png and final.caffemodel "
                    "(weights for the unchanged deploy prototxt) into --out. Re-run with --resume to continue "
                    "a killed run from its newest snapshot.")
    cli.add_net(ap, weights_help="its starting caffemodel; omit to train from Caffe's fillers",
                model_help="deploy prototxt of the net to train (one N x 3 x H x W Input)")
    cli.add_train_list(ap, required=True)
    ap.add_argument("--out", required=True, help="run folder (created)")
    ap.add_argument("--loss", choices=("distill", "asoftmax"), default="distill",
                    help="distill: reproduce a teacher's L2-normalised embedding (EuclideanLoss), needs no "
                         "identity labels; asoftmax: A-Softmax classification on the list's labels (default distill)")
    cli.add_teacher(ap, teacher_help="distill: teacher deploy prototxt (default: --model itself, i.e. the net "
                                     "before this fine-tune; its weights default to --weights)")
    ap.add_argument("--precompute-teacher", action="store_true",
                    help="distill: compute the teacher's embeddings of the list images once (cached in "
                         "--cache-dir) and let the train net look them up (read row by row from OUT/teacher_table.npy, never part of a snapshot) instead of "
                         "running the teacher every iteration; with mirroring the target is the mean of the "
                         "image's and its mirror's embeddings. Much faster on a CPU; memory: images x dim floats")
    ap.add_argument("--distill-features", type=cli.name_list, default=(),
                    help="distill: comma-separated blobs whose feature maps the student copies from the teacher "
                         "too (EuclideanLoss, each a mean squared error times --feature-weight; same blob name "
                         "and shape in both nets; the teacher runs in the train net), or 'auto': the output of "
                         "every Eltwise (residual block) that kept its shape. Default: the embedding only")
    ap.add_argument("--feature-weight", type=cli.positive, default=1.0,
                    help="distill: weight of each copied feature map's mean squared error (default 1)")
    add_similarity(ap)
    ap.add_argument("--augment-shift", type=cli.non_negative, default=0,
                    help="online augmentation: random shift of each training image by up to this many pixels "
                         "each way (default 0: none; with a teacher, it runs in the train net and sees the same "
                         "image)")
    ap.add_argument("--augment-scale", type=cli.below_one, default=0.0,
                    help="online augmentation: random zoom by a factor within 1 +- this (e.g. 0.05)")
    ap.add_argument("--augment-colour", type=cli.below_one, default=0.0,
                    help="online augmentation: per colour plane a random gain within 1 +- this and one "
                         "brightness offset within +- this, in input units (pixels map to about [-1, 1])")
    ap.add_argument("--augment-mixup", type=cli.non_negative, default=0.0, metavar="A",
                    help="online augmentation: blend each image with another of the batch, weights from "
                         "Beta(A, A) (e.g. 1: uniform); the teacher runs in the train net and its target is its "
                         "embedding of the blend (default 0: none)")
    add_fold_bn(ap)
    ap.add_argument("--num-classes", type=cli.whole, default=0,
                    help="asoftmax: classes of fc6 (default: 1 + the largest label in the list)")
    ap.add_argument("--margin", type=int, default=4, choices=(1, 2, 3, 4), help="asoftmax: margin m (default 4)")
    ap.add_argument("--native-asoftmax", action="store_true",
                    help="asoftmax: use the SphereFace fork's native MarginInnerProduct layer instead of the "
                         "toolkit's Python layer (only for a Caffe that has it)")
    ap.add_argument("--epochs", type=cli.positive, default=1.0,
                    help="passes over the list; iterations = ceil(images * epochs / batch) (default 1)")
    ap.add_argument("--batch", type=cli.count, default=64, help="images per iteration (default 64)")
    cli.add_finetune_lr(ap, 1e-3, "base learning rate (default 1e-3, the recipe's)")
    ap.add_argument("--lr-policy", choices=POLICIES, default="fixed",
                    help="fixed, step (x gamma every --stepsize iterations) or multistep (x gamma at each of "
                         "--stepvalues) (default fixed)")
    ap.add_argument("--gamma", type=cli.positive, default=0.1, help="lr multiplier of step/multistep (default 0.1)")
    ap.add_argument("--stepsize", type=cli.whole, default=0, help="step policy: iterations between lr drops")
    ap.add_argument("--stepvalues", type=cli.int_list, default=(),
                    help="multistep policy: comma-separated iterations, e.g. 16000,24000")
    ap.add_argument("--momentum", type=cli.below_one, default=0.9, help="SGD momentum (default 0.9)")
    ap.add_argument("--weight-decay", type=cli.non_negative, default=5e-4, help="weight decay (default 5e-4)")
    ap.add_argument("--snapshot-every", type=cli.whole, default=500,
                    help="Caffe snapshot (caffemodel + solverstate) every N iterations, and at the end (default 500)")
    ap.add_argument("--no-mirror", action="store_true", help="no random horizontal flips")
    ap.add_argument("--seed", type=cli.whole, default=0, help="Caffe's random seed (fillers, list shuffling)")
    ap.add_argument("--gpu", type=cli.gpu_ids, default=None,
                    help="GPU id(s): '0' trains with pycaffe on GPU 0; '0,1' runs Caffe's own `caffe train` "
                         "with NCCL on both. Default: CPU")
    ap.add_argument("--resume", action="store_true",
                    help="continue from the newest snapshot in --out (a finished run just reports)")
    cli.add_cache_dir(ap)
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def job_of(a):
    """The FineTuneJob of the parsed arguments."""
    return FineTuneJob(
        deploy=a.model, weights=a.weights, train_list=a.train_list, out=a.out, root_folder=a.train_root,
        head=a.loss, embedding=a.blob, teacher=a.teacher, teacher_weights=a.teacher_weights,
        teacher_embedding=a.teacher_blob, precompute_teacher=a.precompute_teacher,
        distill_features=a.distill_features, feature_weight=a.feature_weight,
        similarity_weight=a.distill_similarity, similarity_hard=a.similarity_hard, augment_shift=a.augment_shift,
        augment_scale=a.augment_scale, augment_colour=a.augment_colour, augment_mixup=a.augment_mixup,
        fold_bn=a.fold_bn,
        num_classes=a.num_classes,
        margin=a.margin, native_asoftmax=a.native_asoftmax, epochs=a.epochs, batch_size=a.batch,
        base_lr=a.finetune_lr, lr_policy=a.lr_policy, gamma=a.gamma, stepsize=a.stepsize,
        stepvalues=a.stepvalues, momentum=a.momentum, weight_decay=a.weight_decay, snapshot_every=a.snapshot_every,
        rgb=a.rgb, mirror=not a.no_mirror, teacher_rgb=a.teacher_rgb, seed=a.seed, gpu=a.gpu, cache_dir=a.cache_dir)


@cli.entry(PROG)
def main(argv=None):
    a = parser().parse_args(argv)
    job = job_of(a)
    cli.check_files(**job.inputs())
    cli.check_out(a.out)
    caffe_io.probe_nets([(flag + " " + path, path, "test") for flag, path in
                         (("--model", job.deploy), ("--teacher", job.teacher)) if path])
    done = finetune(job, resume=a.resume, progress=not a.quiet)
    print(json.dumps({k: v for k, v in done.items() if k != "config"}, indent=1))
    return 0


if __name__ == "__main__":
    cli.run(main)
