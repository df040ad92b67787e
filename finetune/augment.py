"""Online augmentation as a Caffe Python layer: a random shift, scale and colour change of every training image.

    layer { name: "augment" type: "Python" bottom: "data_plain" top: "data_bgr"
            python_param { module: "finetune.augment" layer: "Jitter"
                           param_str: '{"shift": 4, "scale": 0.05, "colour": 0.1, "seed": 0}' } }

It sits right after the ImageData layer (``trainnet.train_net`` puts it there),
so the student and a teacher run in the train net see the same changed image,
and its target is the teacher's view of that image.  Per image: a translation
of up to ``shift`` pixels each way, a zoom by a factor within 1 +- ``scale``
about the centre (nearest pixel, the border repeated), and per colour plane a
gain within 1 +- ``colour`` plus one brightness offset within +- ``colour``
(in the net's input units, where the SphereFace transform maps the pixel range
to about [-1, 1]).  With ``mixup`` = a, each image is then blended with another
image of the batch (a random pairing): lam * x_i + (1 - lam) * x_j, lam drawn
from Beta(a, a) per image; with a teacher in the train net the target is the
teacher's embedding of that blend, a face between two people that a few
thousand training images would never show.  Only in the TRAIN phase; TEST
passes the images through.

The draw of a batch is seeded by ``seed`` and the batch's own bytes, so the
layer keeps no state: a resumed run (which replays the data layers, not this
one) draws the same changes as the uninterrupted run.
"""
import zlib

import numpy as np

import caffe

from base.errors import ToolkitError

from .layerparams import json_params

DEFAULTS = {"shift": 0, "scale": 0.0, "colour": 0.0, "mixup": 0.0, "seed": 0}


class AugmentError(ToolkitError):
    pass


def jitter(batch, rng, shift=0, scale=0.0, colour=0.0):
    """The changed copy of an N x C x H x W batch (see the module doc)."""
    n, c, h, w = batch.shape
    out = np.empty_like(batch)
    rows, cols = np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64)
    for i in range(n):
        zoom = 1.0 + rng.uniform(-scale, scale)
        dy, dx = rng.uniform(-shift, shift, size=2)
        # output pixel p reads input pixel centre + (p - centre) / zoom - offset
        src_r = np.clip(np.rint((rows - (h - 1) / 2) / zoom + (h - 1) / 2 - dy), 0, h - 1).astype(int)
        src_c = np.clip(np.rint((cols - (w - 1) / 2) / zoom + (w - 1) / 2 - dx), 0, w - 1).astype(int)
        gain = 1.0 + rng.uniform(-colour, colour, size=(c, 1, 1))
        out[i] = batch[i][:, src_r][:, :, src_c] * gain + rng.uniform(-colour, colour)
    return out


def mixup(batch, rng, alpha):
    """(blended batch, partner index, lam per image): image i blended with image partner[i] of the batch."""
    n = len(batch)
    partner = rng.permutation(n)
    lam = rng.beta(alpha, alpha, size=n).astype(batch.dtype)
    return lam[:, None, None, None] * batch + (1 - lam)[:, None, None, None] * batch[partner], partner, lam


def check(params, layer="Jitter"):
    """The parameters as numbers in range, or AugmentError naming the one at fault."""
    p = json_params(params, DEFAULTS, layer, AugmentError) if isinstance(params, str) else dict(DEFAULTS, **params)
    for key, ok in (("shift", p["shift"] >= 0), ("scale", 0 <= p["scale"] < 1), ("colour", 0 <= p["colour"] < 1),
                    ("mixup", 0 <= p["mixup"] <= 100)):
        if not ok:
            raise AugmentError("%s: %s %r out of range (shift >= 0 pixels, scale and colour in [0, 1), mixup in "
                               "[0, 100])" % (layer, key, p[key]))
    return p


class Jitter(caffe.Layer):
    def setup(self, bottom, top):
        if len(bottom) != 1 or len(top) != 1:
            raise AugmentError("Jitter takes one bottom (the images) and gives one top")
        self.p = check(self.param_str)

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        x = bottom[0].data
        if self.phase != caffe.TRAIN:
            top[0].data[...] = x
            return
        rng = np.random.default_rng([self.p["seed"], zlib.crc32(x.tobytes())])
        out = jitter(x, rng, self.p["shift"], self.p["scale"], self.p["colour"])
        top[0].data[...] = mixup(out, rng, self.p["mixup"])[0] if self.p["mixup"] else out

    def backward(self, top, propagate_down, bottom):
        pass   # images: nothing below learns
