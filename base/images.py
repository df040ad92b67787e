"""From image files to the net's input: decode, align or crop, scale, batch, prefetch.

Alignment: five points (x, y; 0-based pixels; left eye, right eye, nose tip,
left and right mouth corner, as MTCNN gives them) are mapped onto a template
by a similarity transform (rotation, uniform scale, shift).

Channel order: ``Preprocess(bgr=True)`` keeps OpenCV's BGR order, what nets
trained with Caffe's ImageData layer expect (the official SphereFace models;
the default of evaluate(), python -m eval_lfw, prune and finetune);
``bgr=False`` gives RGB, for nets such as the MobileFaceNet/ArcFace models
(``--rgb``). Values are (x - 127.5) * 0.0078125.
"""
import itertools
import multiprocessing
import os
import signal
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import cv2
import numpy as np
from PIL import Image


from .netinput import ALIGNED_SIZE, CROP_COLUMNS, CROPS, crop_rule
from .errors import ToolkitError

MEAN = 127.5
SCALE = 0.0078125


class ImageError(ToolkitError):
    """An image, landmark file or preprocessing the net cannot use (the message names it)."""



# The SphereFace template for 96x112 (width x height) crops.
SPHEREFACE_96x112 = np.array([[30.2946, 51.6963], [65.5318, 51.5014], [48.0252, 71.7366],
                              [33.5493, 92.3655], [62.7299, 92.2041]])
# The same template moved 8 px right: the 112x112 layout of the aligned LFW set,
# whose columns 8..103 are then exactly the SphereFace crop.
ALIGNED_112x112 = SPHEREFACE_96x112 + [8.0, 0.0]


def similarity_transform(src, dst):
    """2x3 matrix M of the similarity that maps ``src`` points onto ``dst`` in the least-squares sense.

    Closed form of Umeyama (1991): no reflection, so a mirrored point set is
    matched by a rotation, never flipped.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    xs, xd = src - mu_s, dst - mu_d
    var_s = (xs ** 2).sum() / len(src)
    if var_s == 0:
        raise ImageError("the landmarks all coincide; no transform can be estimated")
    u, sig, vt = np.linalg.svd(xd.T @ xs / len(src))
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[1] = -1.0
    rot = u @ np.diag(d) @ vt
    scale = (sig * d).sum() / var_s
    m = np.empty((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - scale * rot @ mu_s
    return m


def align_face(image, points, size=(112, 112), template=ALIGNED_112x112):
    """Warp ``image`` so that its five ``points`` land on ``template``; ``size`` is (height, width)."""
    m = similarity_transform(points, template)
    return cv2.warpAffine(image, m, (int(size[1]), int(size[0])), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def landmark_key(path):
    """'.../Name/Name_0001.jpg' -> 'Name/Name_0001.jpg', the key both files share."""
    parts = os.fspath(path).replace("\\", "/").split("/")
    return "/".join(parts[-2:])


def read_landmarks(path):
    """{'Name/Name_0001.jpg': (5, 2) array} from lines 'PATH x1 y1 x2 y2 ... x5 y5'."""
    path = os.fspath(path)
    out = {}
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ImageError("cannot read landmark file %s: %s" % (path, getattr(e, "strerror", None) or e)) from None
    for lineno, line in enumerate(lines, 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) != 11:
            raise ImageError("%s:%d: expected 'PATH x1 y1 ... x5 y5' (11 fields), got %d"
                            % (path, lineno, len(fields)))
        try:
            pts = np.array([float(v) for v in fields[1:]]).reshape(5, 2)
        except ValueError:
            raise ImageError("%s:%d: landmark coordinates must be numbers" % (path, lineno)) from None
        out[landmark_key(fields[0])] = pts
    if not out:
        raise ImageError("%s holds no landmarks" % path)
    return out


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
            raise ImageError("unknown crop %r: use one of %s" % (self.crop, ", ".join(CROPS)))
        net = (self.height, self.width)
        if self.crop == "112x96" and net != (112, 96):
            raise ImageError("--crop 112x96 makes 112x96 images but the net's input is %dx%d; "
                            "use --crop none for a net that takes the whole image" % net)
        if self.landmarks is not None and self.crop == "none" and net != ALIGNED_SIZE:
            raise ImageError("aligned faces are 112x112 (or 112x96 with --crop 112x96) but the net's input is %dx%d"
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
        return ImageError("image %s is %dx%d (HxW), expected %dx%d: %s" % (path, size[0], size[1], want[0], want[1], hint))

    def __call__(self, path, rel=None):
        image = cv2.imread(path, cv2.IMREAD_COLOR)
        if image is None:
            raise ImageError("cannot decode image %s" % path)
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
        raise ImageError("LFW image folder %s does not exist" % root)
    missing = [os.path.join(root, r) for r in rels if not os.path.isfile(os.path.join(root, r))]
    if missing:
        raise ImageError("%d of the %d images the pairs name are missing under %s; first: %s"
                        % (len(missing), len(rels), root, ", ".join(missing[:show])))
    if pre is None:
        return
    if pre.landmarks is not None:
        lost = [r for r in rels if landmark_key(r) not in pre.landmarks]
        if lost:
            raise ImageError("%d of the %d images have no landmarks; first: %s"
                            % (len(lost), len(rels), ", ".join(lost[:show])))
        return
    want = pre.source_size()
    for r in rels:
        path = os.path.join(root, r)
        try:
            with Image.open(path) as im:
                size = im.size[::-1]
        except OSError as e:
            raise ImageError("cannot read image %s: %s" % (path, e)) from None
        if size != want:
            raise pre.size_error(path, size)


# -------------------------------------------------------------- prefetching

_worker = None


def _init_worker(pre, root):
    global _worker
    _worker = (pre, root)
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the parent's to report (one line), not each worker's


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


def preprocess_for(net_shape, root, rels, rgb, crop="auto"):
    """Preprocess matching the net input (N, 3, H, W); crop 'auto' applies the crop rule to the first image."""
    H, W = net_shape[2], net_shape[3]
    if crop == "auto":
        path = os.path.join(root, rels[0])
        try:
            with Image.open(path) as im:
                size = im.size[::-1]
        except OSError:
            raise ImageError("cannot decode image %s" % path) from None
        crop = crop_rule((H, W), size)
    return Preprocess(H, W, crop=crop, bgr=not rgb)


def image_batches(root, rels, pre, batch=32, workers=1):
    """Float32 batches in order (decoded in a worker process ahead of Caffe)."""
    for _, x in batches(root, rels, pre, batch, workers):
        yield x
