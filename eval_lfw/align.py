"""Five-point face alignment by a similarity transform (rotation, uniform scale, shift).

Points are (x, y) in 0-based pixel coordinates, ordered left eye, right eye,
nose tip, left mouth corner, right mouth corner (as MTCNN gives them).
"""
import os

import cv2
import numpy as np

from .errors import EvalError

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
        raise EvalError("the landmarks all coincide; no transform can be estimated")
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
        raise EvalError("cannot read landmark file %s: %s" % (path, getattr(e, "strerror", None) or e)) from None
    for lineno, line in enumerate(lines, 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) != 11:
            raise EvalError("%s:%d: expected 'PATH x1 y1 ... x5 y5' (11 fields), got %d"
                            % (path, lineno, len(fields)))
        try:
            pts = np.array([float(v) for v in fields[1:]]).reshape(5, 2)
        except ValueError:
            raise EvalError("%s:%d: landmark coordinates must be numbers" % (path, lineno)) from None
        out[landmark_key(fields[0])] = pts
    if not out:
        raise EvalError("%s holds no landmarks" % path)
    return out
