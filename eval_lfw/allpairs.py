"""Verification at strict operating points: every pair of images of the test people (numpy, no Caffe).

The 10-fold protocol scores 3,000 pairs; its TAR at FAR 1e-3 rests on about
three impostor pairs, too few to see what a face system running at FAR 1e-4
or 1e-5 sees.  Here every image of every person of the test folds is
compared with every other: same person = genuine, else impostor.  A person
contributes at most ``per_person`` images (the first ones in file order), so
that a few people with hundreds of images do not make most of the genuine
pairs (LFW folds 6-10 at 10 per person: 2,195 people, 4,629 images, 7,423
genuine and 10.7M impostor pairs).

Scores are cosines of the L2-normalised embeddings, with no mean subtracted:
what a deployed system computes, and no statistic of the test images enters.
A pair is accepted when its score is strictly above the threshold; the
threshold of FAR f is the lowest one that accepts at most floor(f * impostor
pairs) impostor pairs, so ties never let the FAR exceed f.
"""
import numpy as np

from .errors import EvalError

FARS = (1e-3, 1e-4, 1e-5)
PER_PERSON = 10
ROC_POINTS = 200


def gallery(tree, people, per_person=PER_PERSON):
    """(relative image paths, person index per image): at most ``per_person`` images of each of ``people``
    (the first in file order) from ``tree`` ({person: [paths]}, base.lists.scan_tree)."""
    if per_person is not None and per_person < 2:
        raise EvalError("--per-person must be 2 or more (a person needs two images to make a genuine pair)")
    missing = sorted(p for p in people if p not in tree)
    if missing:
        raise EvalError("%d people of the test folds have no image folder (first: %s)" % (len(missing), missing[0]))
    rels, labels = [], []
    for k, person in enumerate(sorted(people)):
        files = tree[person][:per_person] if per_person else tree[person]
        rels.extend(files)
        labels.extend([k] * len(files))
    return rels, np.asarray(labels, dtype=np.int64)


def far_key(far):
    """1e-3 -> '1e-3' (the name of an operating point in records and flags)."""
    if not 0 < far < 1:
        return "%g" % far
    exponent = np.log10(far)
    return "1e%d" % round(exponent) if abs(exponent - round(exponent)) < 1e-9 else "%g" % far


def scores(features, labels, block=2048):
    """(genuine scores, impostor scores) of every unordered pair, float32, computed in row blocks."""
    x = np.asarray(features, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if not np.all(norms > 0):
        raise EvalError("%d embeddings are all zero: the net outputs nothing for them" % int((norms == 0).sum()))
    x = x / norms
    labels = np.asarray(labels)
    genuine, impostor = [], []
    for start in range(0, len(x), block):
        stop = min(start + block, len(x))
        s = x[start:stop] @ x[start:].T
        later = np.arange(start, len(x))[None, :] > np.arange(start, stop)[:, None]   # each pair once
        same = labels[start:stop, None] == labels[None, start:]
        genuine.append(s[later & same])
        impostor.append(s[later & ~same])
    return np.concatenate(genuine), np.concatenate(impostor)


def threshold_at(impostor, far):
    """The threshold above which at most floor(far * len(impostor)) impostor scores lie."""
    allowed = int(np.floor(far * len(impostor) + 1e-9))
    if allowed >= len(impostor):
        return -np.inf
    # the (allowed+1)-th highest impostor score: accepting strictly above it admits at most `allowed`
    return float(np.partition(impostor, len(impostor) - 1 - allowed)[len(impostor) - 1 - allowed])


def unusable(labels):
    """Why a gallery gives no operating point (no genuine or no impostor pair), or None."""
    _, counts = np.unique(np.asarray(labels), return_counts=True)
    if not (counts >= 2).any():
        return "no person of the test folds has two images: no genuine pair to verify"
    if len(counts) < 2:
        return "only one person in the test folds: no impostor pair"
    return None


def verify(features, labels, fars=FARS, roc_points=ROC_POINTS):
    """TAR at each FAR over every pair, with the pair counts and a log-spaced ROC."""
    labels = np.asarray(labels)
    why = unusable(labels)
    if why:
        raise EvalError(why)
    genuine, impostor = scores(features, labels)
    tar, thresholds = {}, {}
    for far in fars:
        t = threshold_at(impostor, far)
        key = far_key(far)
        tar[key] = float(np.mean(genuine > t))
        thresholds[key] = t
    return dict(n_people=int(len(np.unique(labels))), n_images=int(len(labels)), n_genuine=int(len(genuine)),
                n_impostor=int(len(impostor)), tar_at_far=tar, thresholds=thresholds,
                roc=roc(genuine, impostor, roc_points))


def roc(genuine, impostor, points=ROC_POINTS):
    """(far, tar) at ``points`` FARs log-spaced from one impostor pair to all of them (for a plot)."""
    n = len(impostor)
    fars = np.unique(np.geomspace(1.0 / n, 1.0, points))
    top = np.sort(impostor)[::-1]
    allowed = np.minimum(np.floor(fars * n + 1e-9).astype(np.int64), n)
    cut = np.where(allowed < n, top[np.minimum(allowed, n - 1)], -np.inf)
    g = np.sort(genuine)
    tar = 1.0 - np.searchsorted(g, cut, side="right") / len(g)
    return dict(far=(allowed / n).tolist(), tar=tar.tolist())


def summary_line(r):
    """'TAR 99.02 / 96.97 / 92.50 % at FAR 1e-3 / 1e-4 / 1e-5 over ... pairs' for the evaluator's output."""
    keys = list(r["tar_at_far"])
    return "all pairs of %d images of %d people (at most %s each): %d genuine, %d impostor; TAR %s %% at FAR %s" % (
        r["n_images"], r["n_people"], r.get("per_person") or "all", r["n_genuine"], r["n_impostor"],
        " / ".join("%.2f" % (100 * r["tar_at_far"][k]) for k in keys), " / ".join(keys))
