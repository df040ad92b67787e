"""The LFW verification protocol on features: pure numpy, no Caffe.

For each test fold: subtract the mean feature of the training folds (the
other selected folds), L2-normalise, score each pair by cosine similarity,
pick the threshold that maximises accuracy on the training folds, and report
accuracy on the test fold. A pair is called "same" when its score is
strictly above the threshold.
"""
import numpy as np

from .errors import EvalError

FAR = 1e-3


def cosine_scores(left, right, mean):
    a = left - mean
    b = right - mean
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


def accuracy(scores, same, threshold):
    return float(np.mean((scores > threshold) == same))


def best_threshold(scores, same):
    """(threshold, accuracy) maximising accuracy on (scores, same).

    Candidates lie between consecutive distinct scores (their midpoint), or
    below the lowest / at the highest; the exact optimum, no grid. On a tie
    the lowest threshold wins.
    """
    scores = np.asarray(scores, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    if scores.size == 0:
        raise EvalError("no training pairs to choose a threshold from")
    order = np.argsort(scores, kind="stable")
    s, y = scores[order], same[order]
    n = len(s)
    # k = how many of the lowest scores are called "different"
    diff_below = np.concatenate([[0], np.cumsum(~y)])
    same_above = y.sum() - np.concatenate([[0], np.cumsum(y)])
    correct = diff_below + same_above
    valid = np.ones(n + 1, dtype=bool)
    valid[1:n] = s[1:] > s[:-1]  # a cut inside a run of equal scores is impossible
    correct = np.where(valid, correct, -1)
    k = int(np.argmax(correct))
    if k == 0:
        t = np.nextafter(s[0], -np.inf)
    elif k == n:
        t = s[-1]
    else:
        t = 0.5 * (s[k - 1] + s[k])
        if t >= s[k]:  # rounding of adjacent floats
            t = s[k - 1]
    return float(t), float(correct[k]) / n


def roc(scores, same):
    """(far, tar, thresholds) of calling "same" at score >= each threshold, from strict to lax."""
    scores = np.asarray(scores, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], same[order]
    last = np.r_[s[1:] != s[:-1], True]  # the end of each run of equal scores
    tp = np.cumsum(y)[last]
    fp = np.cumsum(~y)[last]
    tar = np.r_[0.0, tp / max(y.sum(), 1)]
    far = np.r_[0.0, fp / max((~y).sum(), 1)]
    return far, tar, np.r_[np.inf, s[last]]


def tar_at_far(far, tar, target=FAR):
    """Highest TAR among operating points with FAR <= target."""
    ok = far <= target
    return float(tar[ok].max()) if ok.any() else 0.0


def cross_validate(left, right, same, fold, folds=None):
    """Leave-one-fold-out verification over ``folds`` (default: all folds present).

    left, right: (n_pairs, D) features of each pair's two images; same: bool
    per pair; fold: fold number per pair. Returns a dict of plain numbers plus
    ``scores`` (each pair scored with its own test fold's mean) and ``roc``.
    """
    left = np.asarray(left, dtype=np.float64)
    right = np.asarray(right, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    fold = np.asarray(fold)
    folds = sorted(set(int(f) for f in fold)) if folds is None else sorted(set(folds))
    if len(folds) < 2:
        raise EvalError("cross-validation needs at least 2 folds, got %s" % folds)
    absent = [f for f in folds if not np.any(fold == f)]
    if absent:
        raise EvalError("no pairs in fold(s) %s" % absent)
    used = np.isin(fold, folds)
    scores = np.full(len(same), np.nan)
    accs, thresholds, train_accs = [], [], []
    for f in folds:
        test = fold == f
        train = used & ~test
        mean = np.concatenate([left[train], right[train]]).mean(0)
        s = cosine_scores(left, right, mean)
        t, train_acc = best_threshold(s[train], same[train])
        accs.append(accuracy(s[test], same[test], t))
        thresholds.append(t)
        train_accs.append(train_acc)
        scores[test] = s[test]
    far, tar, thr = roc(scores[used], same[used])
    return {
        "folds": folds,
        "accuracy_mean": float(np.mean(accs)),
        "accuracy_std": float(np.std(accs)),
        "fold_accuracy": accs,
        "thresholds": thresholds,
        "train_accuracy": train_accs,
        "tar_at_far_1e-3": tar_at_far(far, tar, FAR),
        "auc": float(np.trapezoid(tar, far)),
        "n_pairs": int(used.sum()),
        "scores": scores[used],
        "same": same[used],
        "roc": {"far": far, "tar": tar, "threshold": thr},
    }
