"""From image files to the net's input: decode, align or crop, scale, batch, prefetch.

Channel order: ``Preprocess(bgr=True)`` keeps OpenCV's BGR order, what nets
trained with Caffe's ImageData layer expect (the official SphereFace models;
the default of evaluate(), python -m eval_lfw, prune and finetune);
``bgr=False`` gives RGB, for nets such as the MobileFaceNet/ArcFace models
(``--rgb``). Values are (x - 127.5) * 0.0078125.
"""
import itertools
import multiprocessing
import os
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import cv2
import numpy as np
from PIL import Image

from .align import ALIGNED_112x112, align_face, landmark_key
from .errors import EvalError

MEAN = 127.5
SCALE = 0.0078125
CROPS = ("112x96", "none")
ALIGNED_SIZE = (112, 112)
# The SphereFace 112x96 crop of a 112x112 aligned image: all rows, columns 8..103.
CROP_COLUMNS = slice(8, 104)


@dataclass(frozen=True)
class Preprocess:
    """How one image file becomes a (3, H, W) float32 net input."""
    height: int
    width: int
    crop: str = "112x96"
    bgr: bool = False
    landmarks: dict = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.crop not in CROPS:
            raise EvalError("unknown crop %r: use one of %s" % (self.crop, ", ".join(CROPS)))
        net = (self.height, self.width)
        if self.crop == "112x96" and net != (112, 96):
            raise EvalError("--crop 112x96 makes 112x96 images but the net's input is %dx%d; "
                            "use --crop none for a net that takes the whole image" % net)
        if self.landmarks is not None and self.crop == "none" and net != ALIGNED_SIZE:
            raise EvalError("aligned faces are 112x112 (or 112x96 with --crop 112x96) but the net's input is %dx%d"
                            % net)

    def source_size(self):
        """(height, width) the image files must have, or None when any size is aligned."""
        if self.landmarks is not None:
            return None
        return ALIGNED_SIZE if self.crop == "112x96" else (self.height, self.width)

    def size_error(self, path, size):
        want = self.source_size()
        hint = ("--crop 112x96 takes 112x112 aligned images" if self.crop == "112x96" else
                "with --crop none the images must match the net's input; 112x112 aligned images "
                "and a 112x96 net need --crop 112x96, raw LFW images need --landmarks")
        return EvalError("image %s is %dx%d (HxW), expected %dx%d: %s" % (path, size[0], size[1], want[0], want[1], hint))

    def __call__(self, path, rel=None):
        image = cv2.imread(path, cv2.IMREAD_COLOR)
        if image is None:
            raise EvalError("cannot decode image %s" % path)
        if self.landmarks is not None:
            image = align_face(image, self.landmarks[landmark_key(rel or path)], ALIGNED_SIZE, ALIGNED_112x112)
        elif image.shape[:2] != self.source_size():
            raise self.size_error(path, image.shape[:2])
        if self.crop == "112x96":
            image = image[:, CROP_COLUMNS]
        if not self.bgr:
            image = image[:, :, ::-1]
        return ((image.astype(np.float32) - MEAN) * SCALE).transpose(2, 0, 1)

    def batch(self, root, rels):
        return np.stack([self(os.path.join(root, r), r) for r in rels])


def check_images(root, rels, pre=None, show=5):
    """Fail before any compute when images (or their landmarks, or right sizes) are missing.

    Without ``pre`` only presence is checked; with it, also landmarks and the
    size read from each file's header (about 0.1 ms an image).
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise EvalError("LFW image folder %s does not exist" % root)
    missing = [os.path.join(root, r) for r in rels if not os.path.isfile(os.path.join(root, r))]
    if missing:
        raise EvalError("%d of the %d images the pairs name are missing under %s; first: %s"
                        % (len(missing), len(rels), root, ", ".join(missing[:show])))
    if pre is None:
        return
    if pre.landmarks is not None:
        lost = [r for r in rels if landmark_key(r) not in pre.landmarks]
        if lost:
            raise EvalError("%d of the %d images have no landmarks; first: %s"
                            % (len(lost), len(rels), ", ".join(lost[:show])))
        return
    want = pre.source_size()
    for r in rels:
        path = os.path.join(root, r)
        try:
            with Image.open(path) as im:
                size = im.size[::-1]
        except OSError as e:
            raise EvalError("cannot read image %s: %s" % (path, e)) from None
        if size != want:
            raise pre.size_error(path, size)


# -------------------------------------------------------------- prefetching

_worker = None


def _init_worker(pre, root):
    global _worker
    _worker = (pre, root)


def _load(rels):
    pre, root = _worker
    return pre.batch(root, rels)


def batches(root, rels, pre, batch, workers=1):
    """Yield (rels, array) batches in order, decoded ``workers`` processes ahead of the caller.

    Processes, not threads: pycaffe keeps the GIL for the whole forward pass,
    so a decoding thread would stall behind it. ``workers=0`` decodes inline,
    as does a single batch.
    """
    root = os.fspath(root)
    chunks = [rels[i:i + batch] for i in range(0, len(rels), batch)]
    if workers == 0 or len(chunks) < 2:  # nothing to overlap with: skip the process start-up
        for chunk in chunks:
            yield chunk, pre.batch(root, chunk)
        return
    # spawn, not fork: the parent holds Caffe and OpenBLAS threads.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(pre, root)) as pool:
        todo = iter(chunks[1:])
        pending = deque((c, pool.submit(_load, c)) for c in itertools.islice(todo, workers + 1))
        # The first batch is decoded here while the workers start up (about a second).
        yield chunks[0], pre.batch(root, chunks[0])
        while pending:
            chunk, future = pending.popleft()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(_load, nxt)))
            yield chunk, future.result()
