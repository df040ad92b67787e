"""Image lists for Caffe's ImageData layer, built from a folder-per-identity tree.

The list format (base.lists) is what ImageData reads: one ``relative/path
label`` per line, the label (an integer 0..K-1) after the last space, the
path relative to the layer's ``root_folder``.

``python -m finetune.lists ROOT OUT`` turns a CASIA-WebFace-style tree
(ROOT/identity/*.jpg) into OUT/train.txt (+ OUT/val.txt, a held-out share of
each identity's images), OUT/identities.txt (label, name, counts) and
OUT/summary.json (root folder for ImageData, counts, skipped files).  Every
image is decoded once, so an unreadable file is found here, named and left
out, instead of aborting Caffe hours into training.  With ``--crop-112x96``
the aligned 112x112 images are cut to SphereFace's 112x96 (columns 8..103)
into OUT/images/, which then becomes the list's root.  With ``--pairs`` only
the people of the chosen LFW View 2 folds (default 1-5) are kept, so an
evaluation on the other folds stays identity-disjoint from training.
"""
import json
import math
import os
import sys
import zlib

import numpy as np

from base import cli
from base.caffe_io import atomic_write
from base.lists import ListError, image_data_root, list_text, scan_tree
from base.netinput import ALIGNED_SIZE, crop_112x96 as crop_columns

PROG = "python -m finetune.lists"

def split_validation(files, fraction, seed, identity):
    """Hold out round(fraction * n) of one identity's images (at least one stays for training).

    The draw depends only on seed, identity name and its files, so adding or
    removing other identities does not change this one's split.
    """
    n_val = min(int(math.floor(fraction * len(files) + 0.5)), len(files) - 1)
    if n_val <= 0:
        return list(files), []
    rng = np.random.default_rng([seed, zlib.crc32(identity.encode("utf-8"))])
    held = set(rng.choice(len(files), size=n_val, replace=False).tolist())
    return ([f for i, f in enumerate(files) if i not in held],
            [f for i, f in enumerate(files) if i in held])


def crop_112x96(image):
    """Aligned 112x112 (ArcFace template) -> SphereFace's 112x96: columns 8..103."""
    if image.shape[:2] != ALIGNED_SIZE:
        raise ListError("is %dx%d (HxW), not an aligned 112x112 image" % image.shape[:2])
    return crop_columns(image)


def _encode(image, path):
    import cv2
    ext = os.path.splitext(path)[1].lower()
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if ext in (".jpg", ".jpeg") else []
    ok, data = cv2.imencode(ext, image, params)
    if not ok:
        raise ListError("cannot encode %s" % path)
    return data.tobytes()


def build(root, out, val_fraction=0.0, seed=0, crop=False, min_images=1, folds=None, pairs=None, unpaired=False,
          progress=True):
    """Check (and crop) every image of the tree, then write the lists; returns the summary.

    Unreadable images are reported as they are met, left out, and listed in
    the summary; the run goes on.
    """
    import cv2
    from tqdm import tqdm

    root, out = os.path.abspath(os.fspath(root)), os.path.abspath(os.fspath(out))
    if not 0.0 <= val_fraction < 1.0:
        raise ListError("the validation fraction must be in [0, 1), got %r" % val_fraction)
    if min_images < 1:
        raise ListError("min images per identity must be 1 or more, got %r" % min_images)
    if folds is not None and pairs is None:
        raise ListError("LFW folds need the pairs file (--pairs) that defines them")
    images_dir = os.path.join(out, "images")
    if crop and os.path.abspath(images_dir) == root:
        raise ListError("the crops would overwrite the input images in %s" % root)

    tree = scan_tree(root)
    summary = {"source": root, "root": image_data_root(images_dir if crop else root), "seed": seed,
               "val_fraction": val_fraction, "min_images": min_images, "crop_112x96": crop}
    if pairs is not None:
        folds = sorted(folds or range(1, 6))
        from eval_lfw.pairs import lfw_people, unpaired_people
        people = lfw_people(pairs, folds)
        if unpaired:
            people |= unpaired_people(pairs, root)
        summary.update(pairs=os.path.abspath(pairs), lfw_folds=folds, unpaired=unpaired, lfw_people=len(people),
                       lfw_people_without_folder=len(people - set(tree)))
        tree = {name: files for name, files in tree.items() if name in people}
        if not tree:
            raise ListError("none of the %d people of LFW folds %s has a folder under %s" % (len(people), folds, root))

    if not any(len(files) >= min_images for files in tree.values()):   # before decoding: none can have enough
        raise ListError("no identity under %s has %d or more images" % (root, min_images))
    skipped, readable = [], {}
    total = sum(len(f) for f in tree.values())
    bar = tqdm(total=total, desc="crop" if crop else "check", unit="img", disable=not progress)
    for name, files in tree.items():
        kept = []
        for rel in files:
            bar.update(1)
            src = os.path.join(root, rel)
            try:
                image = cv2.imread(src, cv2.IMREAD_COLOR)
                if image is None:
                    raise ListError("cannot be decoded as an image")
                if crop:
                    atomic_write(os.path.join(images_dir, rel), _encode(crop_112x96(image), rel),
                                 protect=(src,), sync=False)
            except (ListError, OSError) as e:
                skipped.append({"path": src, "reason": str(e)})
                bar.write("skipped %s: %s" % (src, e), file=sys.stderr)
                continue
            kept.append(rel)
        readable[name] = kept
    bar.close()

    few = [name for name, files in readable.items() if len(files) < min_images]
    identities = [name for name in readable if len(readable[name]) >= min_images]
    if not identities:
        raise ListError("no identity under %s has %d or more readable images" % (root, min_images))
    train, val, table = [], [], []
    for label, name in enumerate(identities):
        t, v = split_validation(readable[name], val_fraction, seed, name)
        train += [(rel, label) for rel in t]
        val += [(rel, label) for rel in v]
        table.append("%d %s %d %d\n" % (label, name, len(t), len(v)))

    atomic_write(os.path.join(out, "train.txt"), list_text(train))
    if val:
        atomic_write(os.path.join(out, "val.txt"), list_text(val))
    atomic_write(os.path.join(out, "identities.txt"), "".join(table))
    summary.update(num_classes=len(identities), train=len(train), val=len(val), images_seen=total,
                   identities_below_min_images=len(few), skipped=skipped)
    atomic_write(os.path.join(out, "summary.json"), json.dumps(summary, indent=1) + "\n")
    return summary


# ------------------------------------------------------------------ command line

def parser():
    ap = cli.parser(
        PROG,
        description="Build Caffe ImageData lists (train.txt, val.txt) from a folder-per-identity image tree "
                    "(ROOT/identity/*.jpg, the CASIA-WebFace layout). Labels are 0..K-1 in sorted identity order. "
                    "Every image is decoded once; unreadable ones are reported, skipped and listed in summary.json.")
    ap.add_argument("root", help="image tree: one folder per identity")
    ap.add_argument("out", help="output folder for train.txt, val.txt, identities.txt, summary.json (and images/)")
    ap.add_argument("--val-fraction", type=float, default=0.0,
                    help="share of each identity's images held out in val.txt (rounded; at least one image "
                         "of each identity stays in train.txt); default 0 = no validation list")
    ap.add_argument("--seed", type=cli.whole, default=0, help="seed of the validation draw (default 0)")
    ap.add_argument("--crop-112x96", action="store_true",
                    help="write SphereFace 112x96 crops (columns 8..103) of aligned 112x112 images to OUT/images/ "
                         "and list those; images of another size are skipped and reported")
    ap.add_argument("--min-images", type=cli.count, default=1,
                    help="leave out identities with fewer readable images than this (default 1)")
    ap.add_argument("--pairs", help="LFW View 2 pairs.txt: keep only the people of --lfw-folds")
    ap.add_argument("--lfw-folds", default=None,
                    help="LFW folds whose people are kept, e.g. 1-5 or 1,3,5 (default 1-5; needs --pairs)")
    return ap


def report(s, out):
    print("%d identities, %d training and %d validation images; ImageData root_folder: %s"
          % (s["num_classes"], s["train"], s["val"], s["root"]))
    if "lfw_folds" in s:
        print("people of LFW folds %s only (%d in the pairs file, %d of them without a folder)"
              % (s["lfw_folds"], s["lfw_people"], s["lfw_people_without_folder"]))
    if s["identities_below_min_images"]:
        print("%d identities left out with fewer than %d readable images"
              % (s["identities_below_min_images"], s["min_images"]))
    if s["skipped"]:
        print("WARNING: %d of %d images skipped as unreadable; they are listed in %s"
              % (len(s["skipped"]), s["images_seen"], os.path.join(out, "summary.json")), file=sys.stderr)


@cli.entry(PROG)
def main(argv=None):
    args = parser().parse_args(argv)
    cli.check_files(pairs=args.pairs)
    folds = None
    if args.lfw_folds is not None:
        from eval_lfw.pairs import parse_folds
        folds = parse_folds(args.lfw_folds)
    s = build(args.root, args.out, args.val_fraction, args.seed, args.crop_112x96, args.min_images, folds, args.pairs)
    report(s, args.out)
    return 0


if __name__ == "__main__":
    cli.run(main)
