"""python -m eval_lfw: LFW verification accuracy (10-fold protocol) of a Caffe face model."""
import os

import runtimes
from base import caffe_io, cli
from base.netinput import CROPS

from .features import DEFAULT_CACHE

PROG = "python -m eval_lfw"

EPILOG = """\
Protocol: each test fold is scored with the mean feature of the other selected
folds subtracted, L2 normalisation and cosine similarity; its threshold is the
one that maximises accuracy on those other folds. Reported: mean and std (over
folds) of the test-fold accuracies, TAR at FAR 1e-3 and the ROC of the pooled
test-fold scores.  With --protocol all-pairs, also every pair of images of the
people of the selected folds (at most --per-person images each): TAR at FAR
1e-3, 1e-4 and 1e-5 on plain cosines (no mean subtracted), thresholds that
never let more than FAR x impostor pairs through.

Example (the MobileFaceNet at hand, 112x112 input, no crop, no flip):
  python -m eval_lfw --model mobilefacenet-v0.prototxt --weights mobilefacenet-v0.caffemodel \\
      --blob fc1 --lfw-dir lfw/images-112x112 --pairs lfw/pairs.txt --crop none --no-flip --out runs/mfn
"""


def parser():
    p = cli.parser(PROG, description=__doc__.split(":", 1)[1].strip(), epilog=EPILOG, raw=True)
    cli.add_net(p, weights_required=True, weights_help="the .caffemodel for --model", blob_default=None,
                blob_required=True, blob_help="blob whose values are the face embedding (fc5 for SphereFace)",
                model_help="deploy prototxt; its Input layer gives the image size")
    cli.add_lfw(p, required=True, folds_default=None)
    p.add_argument("--crop", choices=CROPS, default="112x96",
                   help="112x96: the SphereFace crop, columns 8..103 of the 112x112 aligned images (default); "
                        "none: images go in whole and must match the net's input size")
    p.add_argument("--landmarks", default=None,
                   help="5-point landmark file for raw (e.g. 250x250) LFW images, lines "
                        "'NAME/NAME_0001.jpg x1 y1 ... x5 y5' (eyes, nose, mouth corners; 0-based pixels); "
                        "faces are aligned to the 112x112 template, then --crop applies")
    p.add_argument("--protocol", choices=("pairs", "all-pairs"), default="pairs",
                   help="pairs: the 10-fold protocol on pairs.txt (default); all-pairs: that, and also every pair "
                        "of images of the people of the folds (eval_lfw.allpairs), TAR at FAR 1e-3, 1e-4 and 1e-5: "
                        "the operating points face systems run at, which the 3,000 test pairs cannot resolve")
    p.add_argument("--per-person", type=cli.whole, default=10,
                   help="with --protocol all-pairs: at most this many images of each person, the first in file "
                        "order (default 10, so a few people with hundreds of images do not make most genuine "
                        "pairs; 0: all)")
    p.add_argument("--runtime", default="caffe", choices=runtimes.KINDS,
                   help="whose forward pass computes the embeddings (default caffe): opencv / opencv-nofusion "
                        "(OpenCV DNN reading the Caffe files, fusion on / off), mnn / mnn-nowinograd (MNN's Caffe "
                        "converter, Winograd on / off), onnxruntime / openvino (the ONNX file of python -m "
                        "prune.export); the images are preprocessed here as for Caffe (docs/deployment.md), and "
                        "--blob must be the net's single output")
    p.add_argument("--batch", type=cli.count, default=64, help="images per forward pass (default 64)")
    p.add_argument("--workers", type=cli.whole, default=1,
                   help="image-decoding processes running ahead of Caffe (default 1; 0 decodes in between forwards)")
    p.add_argument("--out", default=None, help="folder for results.json and roc.png (default: print only)")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE,
                   help="feature cache, keyed by model, weights, blob, preprocessing and image list "
                        "(default: .cache/eval_lfw in the repository)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the feature cache")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


@cli.entry(PROG)
def main(argv=None):
    args = parser().parse_args(argv)
    if args.batch < 1 or args.workers < 0:
        raise cli.UsageError("--batch must be >= 1 and --workers >= 0")
    if args.per_person == 1:
        raise cli.UsageError("--per-person must be 0 (all images) or 2 or more: a genuine pair needs two images")
    inputs = dict(model=args.model, weights=args.weights, pairs=args.pairs, landmarks=args.landmarks)
    cli.check_files(**inputs)
    if args.out:
        cli.check_outputs(inputs, [os.path.join(args.out, name) for name in ("results.json", "roc.png")])
        cli.check_out(args.out)
    caffe_io.probe_nets([("--model " + args.model, args.model, "test")])
    from . import evaluator
    result = evaluator.evaluate(
        args.model, args.blob, args.lfw_dir, args.pairs, weights=args.weights, folds=args.eval_folds,
        crop=args.crop, flip=not args.no_flip, bgr=not args.rgb, landmarks=args.landmarks, batch=args.batch,
        workers=args.workers, cache_dir=None if args.no_cache else args.cache_dir, progress=not args.quiet,
        all_pairs=args.per_person if args.protocol == "all-pairs" else None, runtime=args.runtime)
    paths = evaluator.write_report(result, args.out, protect=(args.model, args.weights, args.pairs)) if args.out else ()
    print("\n".join(evaluator.summary(result)))
    if paths:
        print("wrote %s" % ", ".join(paths))
    return 0


if __name__ == "__main__":
    cli.run(main)
