"""Embeddings of a list of images from a Caffe net, with an on-disk cache.

Each unique image goes through the net once (twice with its mirror image);
decoding runs in worker processes ahead of Caffe's forward pass.
"""
import hashlib
import io
import json
import os
import time

import numpy as np
from tqdm import tqdm

from base import caffe_io

from base.images import batches, check_images

from .errors import EvalError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CACHE = os.path.join(ROOT, ".cache", "eval_lfw")


def net_blobs(netparam):
    names = []
    for layer in netparam.layer:
        for top in layer.top:
            if top not in names:
                names.append(top)
    return names


def check_blob(names, blob, source="net"):
    if blob not in names:
        raise EvalError("%s has no blob %r; its blobs are: %s" % (source, blob, ", ".join(names)))


def describe(net):
    """(input name, (C, H, W), blob names) of an instantiated caffe.Net."""
    if not net.inputs:
        raise EvalError("the net has no Input blob to feed images to: build it from a deploy prototxt")
    name = net.inputs[0]
    return name, tuple(net.blobs[name].data.shape[1:]), list(net.blobs)


def extract(net, blob, root, rels, pre, flip=True, batch=64, workers=1, progress=True):
    """(len(rels), D) float32 embeddings; with ``flip`` the mirror's embedding is appended (2D)."""
    inp, chw, _ = describe(net)
    shape = net.blobs[inp].data.shape

    def forward(x):
        if net.blobs[inp].data.shape[0] != len(x):
            net.blobs[inp].reshape(len(x), *chw)
            net.reshape()
        net.blobs[inp].data[...] = x
        net.forward()
        return net.blobs[blob].data.reshape(len(x), -1).copy()
    try:
        return extract_with(forward, root, rels, pre, flip, batch, workers, progress)
    finally:
        if net.blobs[inp].data.shape != shape:  # hand the caller's net back as it came
            net.blobs[inp].reshape(*shape)
            net.reshape()


def extract_with(forward, root, rels, pre, flip=True, batch=64, workers=1, progress=True):
    """extract() through ``forward(x) -> (len(x), D)``: Caffe's, or another runtime's session (runtimes)."""
    out = []
    bar = tqdm(total=len(rels), unit="img", desc="features", disable=not progress, leave=False)
    for chunk, x in batches(root, rels, pre, batch, workers):
        feats = [forward(x)]
        if flip:
            feats.append(forward(np.ascontiguousarray(x[..., ::-1])))
        out.append(np.concatenate([f.reshape(len(x), -1) for f in feats], axis=1))
        bar.update(len(chunk))
    bar.close()
    if not out:
        return np.zeros((0, 0), np.float32)
    return np.concatenate(out)


def extract_in_runtime(kind, model, weights, root, rels, pre, flip=True, batch=64, workers=1, progress=True):
    """extract() with the forward pass of runtime ``kind`` (runtimes.KINDS: the net converted, exported or
    loaded as that runtime deploys it; its output is the net's single output)."""
    import tempfile
    import runtimes
    with tempfile.TemporaryDirectory() as work:
        session = runtimes.open_sessions([kind], {"net": (model, weights)}, work, threads=os.cpu_count())[
            kind, "net"]
        return extract_with(lambda x: np.asarray(session.run(x), np.float32), root, rels, pre, flip, batch,
                            workers, progress)


def embeddings(model, weights, blob, root, rels, pre, flip=True, batch=64, workers=1, cache_dir=DEFAULT_CACHE,
               progress=True, landmarks=None, runtime="caffe"):
    """extract() for a model given by files, with the on-disk cache: only images
    not seen before with these model bytes and preprocessing go through Caffe
    (or ``runtime``: extract_in_runtime).
    Returns (features, number computed, seconds of computing)."""
    key = cache_key(model, weights, blob, pre, root, landmarks, runtime)
    cache = FeatureCache(cache_dir, key) if cache_dir else None
    if cache:
        caffe_io.sweep_litter(cache_dir, recursive=False)   # staging files of killed writers (shared folder)
    sigs = signatures(root, rels) if cache else None
    rows = cache.lookup(rels, sigs, flip) if cache else [None] * len(rels)
    todo = [i for i, row in enumerate(rows) if row is None]
    seconds = 0.0
    if todo:
        todo_rels = [rels[i] for i in todo]
        check_images(root, todo_rels, pre)
        net = caffe_io.open_net(model, weights) if runtime == "caffe" else None
        start = time.perf_counter()
        if net is not None:
            new = extract(net, blob, root, todo_rels, pre, flip, batch, workers, progress)
        else:   # the runtime's conversion or export counts in its seconds
            new = extract_in_runtime(runtime, model, weights, root, todo_rels, pre, flip, batch, workers, progress)
        seconds = time.perf_counter() - start
        for i, row in zip(todo, new):
            rows[i] = row
        if cache:
            cache.store(todo_rels, [sigs[i] for i in todo], new, flip)
    return np.stack(rows), len(todo), seconds


# ------------------------------------------------------------------ cache

def cache_key(model, weights, blob, pre, root, landmarks=None, runtime="caffe"):
    """Hash of what every feature of a run depends on: model and weight bytes,
    blob, preprocessing and the image folder. Images are matched one by one
    in the cache entry (by path, size and mtime), so any subset of folds
    reuses what an earlier run computed."""
    parts = {"model": caffe_io.file_sha256(model), "weights": caffe_io.file_sha256(weights), "blob": blob,
             "input": [pre.height, pre.width], "crop": pre.crop, "bgr": pre.bgr,
             "landmarks": caffe_io.file_sha256(landmarks) if landmarks else None, "root": os.path.realpath(root)}
    if runtime != "caffe":      # Caffe's keys stay as they were: its cached features still count
        parts["runtime"] = runtime
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def signatures(root, rels):
    """'size:mtime' of each image: a changed file is recomputed."""
    out = []
    for r in rels:
        st = os.stat(os.path.join(root, r))
        out.append("%d:%d" % (st.st_size, st.st_mtime_ns))
    return out


def _read(path):
    if not os.path.isfile(path):
        return [], [], None
    try:
        with np.load(path, allow_pickle=False) as z:
            return list(z["images"]), list(z["signatures"]), z["features"]
    except (OSError, ValueError, KeyError):
        return [], [], None  # a damaged entry is recomputed, never trusted


class FeatureCache:
    """Features of one model + preprocessing (``key``), image by image, in ``cache_dir``.

    One file per flip setting. A request without flip is also served by the
    flip entry (its first half), so both numbers cost one extraction.
    """

    def __init__(self, cache_dir, key):
        self.cache_dir, self.key = cache_dir, key

    def path(self, flip):
        return os.path.join(self.cache_dir, "%s-%s.npz" % (self.key, "flip" if flip else "noflip"))

    def lookup(self, rels, sigs, flip):
        """Per image its cached feature row or None."""
        found = {}
        for entry_flip in (flip, True):
            images, signs, feats = _read(self.path(entry_flip))
            if feats is None:
                continue
            if entry_flip != flip:
                feats = feats[:, :feats.shape[1] // 2]
            for image, sign, row in zip(images, signs, feats):
                found.setdefault((image, sign), row)
        return [found.get((r, s)) for r, s in zip(rels, sigs)]

    def store(self, rels, sigs, feats, flip):
        """Add (or refresh) these images' rows in the entry for ``flip``."""
        images, signs, old = _read(self.path(flip))
        rows = {}
        if old is not None and old.shape[1] == feats.shape[1]:
            rows = {image: (sign, row) for image, sign, row in zip(images, signs, old)}
        rows.update({r: (s, row) for r, s, row in zip(rels, sigs, feats)})
        buf = io.BytesIO()
        np.savez(buf, images=np.array(list(rows)), signatures=np.array([v[0] for v in rows.values()]),
                 features=np.stack([v[1] for v in rows.values()]).astype(np.float32))
        return caffe_io.atomic_write(self.path(flip), buf.getvalue())
