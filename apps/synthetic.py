"""A small generated face-like data set, for the demo and tests where ../shared is absent.

Each identity is a smooth random colour pattern (a few blurred blobs); its
images are that pattern shifted by a few pixels, with its own brightness and
noise.  The folder layout and ``pairs.txt`` follow LFW (``name/name_000i.jpg``,
View 2 format, identity-disjoint folds), so every tool of the toolkit reads it
as it reads LFW.  It exercises the mechanics; its accuracies say nothing about
faces.
"""
import os

import cv2
import numpy as np

from base.caffe_io import atomic_write


def make_dataset(out, identities_per_fold=6, images_per_identity=8, pairs_per_fold=20, folds=10, size=112,
                 seed=0):
    """Write the images and pairs.txt under ``out``; returns (image folder, pairs path)."""
    rng = np.random.default_rng(seed)
    images = os.path.join(out, "images")
    names = ["person_%03d" % i for i in range(folds * identities_per_fold)]
    for name in names:
        base = np.zeros((size + 16, size + 16, 3), np.float32)
        for _ in range(6):
            y, x = rng.integers(0, size + 16, 2)
            cv2.circle(base, (int(x), int(y)), int(rng.integers(8, 30)), rng.uniform(0, 255, 3).tolist(), -1)
        base = cv2.GaussianBlur(base, (0, 0), 5)
        for k in range(1, images_per_identity + 1):
            dy, dx = rng.integers(0, 17, 2)
            img = base[dy:dy + size, dx:dx + size] * rng.uniform(0.8, 1.2) + rng.normal(0, 8, (size, size, 3))
            ok, data = cv2.imencode(".jpg", np.clip(img, 0, 255).astype(np.uint8))
            atomic_write(os.path.join(images, name, "%s_%04d.jpg" % (name, k)), data.tobytes(), sync=False)
    lines = ["%d\t%d" % (folds, pairs_per_fold)]
    for f in range(folds):
        people = names[f * identities_per_fold:(f + 1) * identities_per_fold]
        for _ in range(pairs_per_fold):
            name = people[rng.integers(len(people))]
            i, j = rng.choice(images_per_identity, 2, replace=False) + 1
            lines.append("%s\t%d\t%d" % (name, i, j))
        for _ in range(pairs_per_fold):
            a, b = rng.choice(len(people), 2, replace=False)
            i, j = rng.integers(1, images_per_identity + 1, 2)
            lines.append("%s\t%d\t%s\t%d" % (people[a], i, people[b], j))
    pairs = atomic_write(os.path.join(out, "pairs.txt"), "\n".join(lines) + "\n")
    return images, pairs
