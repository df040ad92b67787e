"""Images for sampling: an image list, a folder-per-identity tree, or LFW folds.

Preprocessing is the evaluator's (eval_lfw.images.Preprocess): the net's input
size, (x - 127.5) * 0.0078125, RGB or BGR as the net expects, and the
SphereFace 112x96 crop when the images are 112x112 aligned faces and the net
takes 112x96.
"""
import os

import cv2
import numpy as np

from eval_lfw.images import Preprocess, batches
from eval_lfw.pairs import parse_folds
from finetune.lists import lfw_people, read_list, scan_tree


class DataError(ValueError):
    pass


def shared_dir():
    """The folder of the data and models at hand (LFW, ORL, MobileFaceNet): $SPHEREFACE_SHARED, or
    ``shared`` beside the repository.  Only defaults and tests look here; every tool takes paths."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.environ.get("SPHEREFACE_SHARED", os.path.join(os.path.dirname(repo), "shared"))


def image_files(data, root="", lfw_folds=None, pairs=None, limit=0, seed=0):
    """(root, [relative paths]) of the images to sample.

    data: a list file ("path label" lines, relative to root) or a folder of
    identity sub-folders.  lfw_folds + pairs keep only people of those LFW
    folds.  limit > 0 takes that many images, spread over identities by a
    seeded draw.
    """
    if os.path.isdir(data):
        root = data
        tree = scan_tree(data)
        if lfw_folds:
            if not pairs:
                raise DataError("--lfw-folds needs --pairs (the LFW pairs.txt)")
            people = lfw_people(pairs, parse_folds(lfw_folds))
            tree = {k: v for k, v in tree.items() if k in people}
        rels = [r for files in tree.values() for r in files]
    elif os.path.isfile(data):
        if lfw_folds:
            raise DataError("--lfw-folds filters an image folder; %s is a list file" % data)
        rels = [os.path.relpath(path, root) if root else path for path, _ in read_list(data, root)]
        root = root or ""
    else:
        raise DataError("image data %s is neither a list file nor a folder" % data)
    if not rels:
        raise DataError("no images found in %s" % data)
    if limit and limit > len(rels):
        raise DataError("asked for %d images but %s has only %d" % (limit, data, len(rels)))
    if limit and limit < len(rels):
        pick = np.sort(np.random.default_rng(seed).choice(len(rels), limit, replace=False))
        rels = [rels[i] for i in pick]
    return root, rels


def preprocess_for(net_shape, root, rels, rgb, crop="auto"):
    """Preprocess matching the net input (N, 3, H, W); crop 'auto' looks at the first image."""
    H, W = net_shape[2], net_shape[3]
    if crop == "auto":
        first = cv2.imread(os.path.join(root, rels[0]), cv2.IMREAD_COLOR)
        if first is None:
            raise DataError("cannot decode image %s" % os.path.join(root, rels[0]))
        crop = "112x96" if first.shape[:2] == (112, 112) and (H, W) == (112, 96) else "none"
    return Preprocess(H, W, crop=crop, bgr=not rgb)


def image_batches(root, rels, pre, batch=32, workers=1):
    """Float32 batches in order (decoded in a worker process ahead of Caffe)."""
    for _, x in batches(root, rels, pre, batch, workers):
        yield x
