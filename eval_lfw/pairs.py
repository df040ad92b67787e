"""LFW View 2 ``pairs.txt``: folds of matched and mismatched pairs.

The file opens with ``F N`` (10 300 for View 2); then each of the F folds
holds N same-person lines ``name i j`` followed by N different-person lines
``name1 i name2 j``. Image numbers map to the LFW layout
``name/name_000i.jpg``.
"""
import os
from dataclasses import dataclass

import numpy as np

from .errors import EvalError


def image_path(name, number):
    """Path of an LFW image relative to the data set folder."""
    return "%s/%s_%04d.jpg" % (name, name, number)


@dataclass(frozen=True)
class Pairs:
    """Pair k compares ``left[k]`` with ``right[k]`` (relative paths)."""
    left: tuple
    right: tuple
    same: np.ndarray   # bool, one per pair
    fold: np.ndarray   # int, 1-based fold of each pair
    source: str = "pairs"

    def __len__(self):
        return len(self.left)

    @property
    def folds(self):
        return sorted(set(int(f) for f in self.fold))

    def images(self):
        """Unique images in first-use order, and each pair's (left, right) row in that list."""
        index = {}
        for path in self.left + self.right:
            index.setdefault(path, len(index))
        rows = np.array([[index[a], index[b]] for a, b in zip(self.left, self.right)], dtype=np.int64)
        return list(index), rows.reshape(-1, 2)

    def take(self, index):
        """The pairs at positions ``index`` (fold numbers kept)."""
        index = np.asarray(index, dtype=np.int64)
        return Pairs(tuple(self.left[i] for i in index), tuple(self.right[i] for i in index),
                     self.same[index], self.fold[index], self.source)

    def select(self, folds):
        """The pairs of the given folds only."""
        folds = sorted(set(folds))
        missing = [f for f in folds if f not in self.folds]
        if missing:
            raise EvalError("%s has folds %s; asked for %s" % (self.source, _span(self.folds), missing))
        return self.take(np.flatnonzero(np.isin(self.fold, folds)))


def _span(folds):
    return "%d-%d" % (folds[0], folds[-1]) if folds == list(range(folds[0], folds[-1] + 1)) else str(folds)


def _number(token, path, lineno):
    try:
        value = int(token)
    except ValueError:
        raise EvalError("%s:%d: %r is not an image number" % (path, lineno, token)) from None
    if value < 1:
        raise EvalError("%s:%d: image number %d must be 1 or more" % (path, lineno, value))
    return value


def read_pairs(path):
    """Parse a View 2 pairs file; a malformed line raises EvalError naming it."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise EvalError("cannot read pairs file %s: %s" % (path, getattr(e, "strerror", None) or e)) from None
    numbered = [(i + 1, line.split()) for i, line in enumerate(lines) if line.strip()]
    if not numbered:
        raise EvalError("%s is empty" % path)
    lineno, header = numbered[0]
    if len(header) != 2 or not all(t.isdigit() for t in header) or int(header[0]) < 1 or int(header[1]) < 1:
        raise EvalError("%s:%d: expected the header 'FOLDS PAIRS_PER_HALF' (e.g. '10 300'), got %r"
                        % (path, lineno, lines[lineno - 1].strip()))
    n_folds, half = int(header[0]), int(header[1])
    body = numbered[1:]
    if len(body) != 2 * n_folds * half:
        where = body[-1][0] if body else lineno
        raise EvalError("%s: header '%d %d' promises %d pair lines, the file has %d (last at line %d)"
                        % (path, n_folds, half, 2 * n_folds * half, len(body), where))
    left, right, same, fold = [], [], [], []
    for k, (lineno, fields) in enumerate(body):
        want_same = (k // half) % 2 == 0
        if want_same and len(fields) != 3:
            raise EvalError("%s:%d: a same-person pair needs 3 fields 'name i j', got %d: %r"
                            % (path, lineno, len(fields), " ".join(fields)))
        if not want_same and len(fields) != 4:
            raise EvalError("%s:%d: a different-person pair needs 4 fields 'name1 i name2 j', got %d: %r"
                            % (path, lineno, len(fields), " ".join(fields)))
        if want_same:
            a = image_path(fields[0], _number(fields[1], path, lineno))
            b = image_path(fields[0], _number(fields[2], path, lineno))
        else:
            a = image_path(fields[0], _number(fields[1], path, lineno))
            b = image_path(fields[2], _number(fields[3], path, lineno))
        left.append(a)
        right.append(b)
        same.append(want_same)
        fold.append(k // (2 * half) + 1)
    return Pairs(tuple(left), tuple(right), np.array(same, dtype=bool), np.array(fold, dtype=np.int64), path)


def parse_folds(text):
    """'1-10', '6-10', '1,3,5' or '2-4,7' -> sorted fold numbers."""
    folds = set()
    for part in str(text).split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if lo > hi:
                    raise ValueError
                folds.update(range(lo, hi + 1))
            else:
                folds.add(int(part))
        except ValueError:
            raise EvalError("bad fold list %r: use e.g. 1-10, 6-10 or 1,3,5" % text) from None
    if min(folds) < 1:
        raise EvalError("bad fold list %r: folds are numbered from 1" % text)
    return sorted(folds)


def lfw_people(pairs_path, folds):
    """Names of the people in the given folds of an LFW View 2 pairs file (e.g. to train on folds 1-5 only)."""
    if isinstance(folds, str):
        folds = parse_folds(folds)
    pairs = read_pairs(pairs_path).select(folds)
    return {p.split("/", 1)[0] for p in pairs.left + pairs.right}


def unpaired_people(pairs_path, folder):
    """Names of the people (identity sub-folders of ``folder``) that no pair of the pairs file names: they
    are in no fold, so a net may learn from them whatever folds it is tested on."""
    named = lfw_people(pairs_path, read_pairs(pairs_path).folds)
    return {d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d))} - named
