"""Options shared by the prune tools (python -m prune, python -m prune.sensitivity, apps.pipeline): the
images they sample, and how the layers that read a pruned group are reconstructed.

``--data`` is an image list or a folder of identity folders; ``--lfw-folds``
(with ``--pairs``) keeps only people of those LFW View 2 folds and
``--lfw-unpaired`` adds the people named in no pair of pairs.txt, who are in
no test fold either.  Images are drawn once with the seed.
"""
from base import cli
from base.images import preprocess_for
from base.lists import image_files

DEFAULT_IMAGES = 500


def add_images(ap, images_help=None, required=True):
    """--data --data-root --lfw-folds --lfw-unpaired --pairs --images --crop --batch."""
    ap.add_argument("--data", required=required,
                    help="images to sample: an image list ('path label' lines, see --data-root) or a folder of "
                         "identity folders (e.g. ../shared/data/lfw/images-112x112)"
                         + ("" if required else "; not needed by a criterion that reads only weights (l1, bnscale, "
                                                "random) with --reconstruct none"))
    ap.add_argument("--data-root", default="", help="folder the --data list's paths are relative to")
    ap.add_argument("--lfw-folds", default=None,
                    help="with a folder --data: only people of these LFW View 2 folds, e.g. 1-5 (needs --pairs); "
                         "keeps folds 6-10 an honest test set")
    ap.add_argument("--lfw-unpaired", action="store_true",
                    help="with --lfw-folds: also the people named in no pair of pairs.txt (in no test fold)")
    ap.add_argument("--pairs", default=None, help="LFW pairs.txt, for --lfw-folds")
    ap.add_argument("--images", type=cli.count, default=None,
                    help=images_help or "images per sampling pass, drawn once with --seed (default: all, at most "
                                        "%d)" % DEFAULT_IMAGES)
    ap.add_argument("--crop", default="auto", choices=("auto", "112x96", "none"),
                    help="auto: SphereFace 112x96 crop when the images are 112x112 and the net takes 112x96")
    ap.add_argument("--batch", type=cli.count, default=32, help="images per Caffe forward (default 32)")


def people_of(a):
    """The people --lfw-folds / --lfw-unpaired allow, or None for everyone."""
    if a.lfw_unpaired and not a.lfw_folds:
        raise cli.UsageError("--lfw-unpaired adds to --lfw-folds; give --lfw-folds too")
    if not a.lfw_folds:
        return None
    if not a.pairs:
        raise cli.UsageError("--lfw-folds needs --pairs (the LFW pairs.txt)")
    from eval_lfw.pairs import lfw_people, unpaired_people
    people = lfw_people(a.pairs, a.lfw_folds)
    if a.lfw_unpaired:
        people |= unpaired_people(a.pairs, a.data)
    return people


def images_of(a, shape, held_out=0):
    """(root, relative paths, Preprocess, held-out paths) of the sampling images: --images of them (default
    all, at most DEFAULT_IMAGES) and ``held_out`` more, drawn with --seed, kept apart for judging."""
    import numpy as np
    people = people_of(a)
    root, rels = image_files(a.data, a.data_root, people, 0, a.seed)
    want = (a.images or min(len(rels) - held_out, DEFAULT_IMAGES)) + held_out
    if want > len(rels):
        raise cli.UsageError("--images %d%s: %s has only %d images%s"
                             % (a.images or want - held_out, " + %d held out" % held_out if held_out else "",
                                a.data, len(rels), " of the chosen people" if people is not None else ""))
    pick = np.random.default_rng(a.seed).permutation(len(rels))[:want]
    chosen = sorted(rels[i] for i in pick[:want - held_out])
    held = sorted(rels[i] for i in pick[want - held_out:])
    return root, chosen, preprocess_for(shape, root, chosen, a.rgb, a.crop), held


RIDGE_MAX = 1e6    # relative to X'X's diagonal: beyond it the least squares keeps the weights, and overflows


def parse_ridge(text):
    """--ridge: 'auto' or a number in [0, RIDGE_MAX]."""
    import argparse
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= RIDGE_MAX:
        raise argparse.ArgumentTypeError("expected 'auto' or a number in [0, %g], not %r" % (RIDGE_MAX, text))
    return value


def add_reconstruction(ap):
    """--reconstruct --targets --ridge --bn-reestimate --positions-per-image --blockfit-epochs --blockfit-lr."""
    rec = ap.add_argument_group("reconstruction of the layers that read a pruned group")
    rec.add_argument("--reconstruct", default="full", choices=("full", "scale", "none"),
                     help="full (default): least squares of every kept weight and the intercept of each "
                          "consumer; scale: ThiNet's one scale per kept input channel; none: keep the weights")
    rec.add_argument("--targets", default="original", choices=("original", "current"),
                     help="reconstruct towards the unpruned net's outputs (default: later steps correct what "
                          "earlier ones broke) or the current, already pruned net's (ThiNet's)")
    rec.add_argument("--ridge", default="auto", type=parse_ridge,
                     help="ridge of the least squares, pulling towards the current weights, relative to the mean "
                          "diagonal of X'X; auto (default): chosen per layer on held-out images")
    rec.add_argument("--bn-reestimate", default="none", choices=("none", "end", "each"),
                     help="measure the BatchNorm statistics again on the sampling images after the last cut "
                          "(end), after every cut (each), or not (none, default: after the least squares it did "
                          "not help on the real MobileFaceNet, see docs/results.md)")
    rec.add_argument("--positions-per-image", type=cli.count, default=10,
                     help="sampled output positions per image for the least squares, every output channel at "
                          "each (default 10)")
    rec.add_argument("--blockfit-epochs", type=cli.non_negative, default=0,
                     help="after the last cut, fit each block of the pruned net (the layers between two points "
                          "one blob passes) to the unpruned block's output on the sampling images, this many "
                          "passes per block, by Caffe's Adam on cached inputs (finetune.blockfit; no SGD through "
                          "the whole net; a block that gets no better on held-out images keeps its weights; "
                          "default 0: off)")
    rec.add_argument("--blockfit-lr", type=cli.positive, default=3e-4,
                     help="Adam's learning rate of --blockfit-epochs (default 3e-4)")
