"""evaluate(): features once per unique image (cached), then the numpy protocol."""
import json
import os
import time

import numpy as np
from dataclasses import dataclass
from typing import Optional

from base import caffe_io
from base.figures import pyplot
from base.images import Preprocess, check_images, preprocess_for, read_landmarks
from base.netinput import input_layer

from . import allpairs
from . import features as F
from .errors import EvalError
from .pairs import Pairs, parse_folds, read_pairs
from .protocol import cross_validate


def evaluate(model, blob, lfw_dir, pairs, *, weights=None, folds=None, crop="112x96", flip=True, bgr=True,
             landmarks=None, batch=64, workers=1, cache_dir=F.DEFAULT_CACHE, progress=True, all_pairs=None,
             runtime="caffe"):
    """LFW 10-fold (or ``folds``-only) verification of one model.

    model: a deploy prototxt path (with ``weights``, a caffemodel path) or an
    instantiated caffe.Net (never cached: its files are unknown). pairs: a
    pairs.txt path or a Pairs. folds: None (all), '6-10', or a list.
    landmarks: a 5-point file to align raw LFW images on the fly.
    all_pairs: None, or at most that many images per person (0: all of them)
    for the strict operating points (eval_lfw.allpairs) over every pair of
    images of the people of those folds, under ``result["all_pairs"]``.
    runtime: the forward pass of that runtime (runtimes.KINDS) on the files,
    whose single output must be ``blob``; default Caffe's.
    Returns the dict of protocol.cross_validate plus what was evaluated and how.
    """
    if not isinstance(pairs, Pairs):
        pairs = read_pairs(pairs)
    if folds is not None:
        pairs = pairs.select(parse_folds(folds) if isinstance(folds, str) else folds)
    if len(pairs.folds) < 2:
        raise EvalError("cross-validation needs at least 2 folds; %s selects %s" % (pairs.source, pairs.folds))
    rels, rows = pairs.images()
    n_pair_images = len(rels)
    gallery = None if all_pairs is None else gallery_of(pairs, lfw_dir, all_pairs)
    if gallery is not None:
        known = set(rels)
        rels = rels + [r for r in gallery[0] if r not in known]
    check_images(lfw_dir, rels)

    from_files = isinstance(model, (str, os.PathLike))
    model, weights, (height, width) = checked_net(model, weights, blob, runtime)
    pre = Preprocess(height, width, crop, bgr, read_landmarks(landmarks) if landmarks else None)

    if from_files:
        feats, n_todo, seconds = F.embeddings(model, weights, blob, lfw_dir, rels, pre, flip, batch, workers,
                                              cache_dir, progress, landmarks, runtime)
    else:
        check_images(lfw_dir, rels, pre)
        start = time.perf_counter()
        feats = F.extract(model, blob, lfw_dir, rels, pre, flip, batch, workers, progress)
        n_todo, seconds = len(rels), time.perf_counter() - start

    result = cross_validate(feats[rows[:, 0]], feats[rows[:, 1]], pairs.same, pairs.fold)
    if gallery is not None:
        where = {r: i for i, r in enumerate(rels)}
        result["all_pairs"] = dict(per_person=all_pairs or None, folds=result["folds"],
                                   **allpairs.verify(feats[[where[r] for r in gallery[0]]], gallery[1]))
    result.update({
        "model": model if from_files else "caffe.Net",
        "weights": weights,
        "blob": blob,
        "runtime": runtime,
        "lfw_dir": os.fspath(lfw_dir),
        "pairs": pairs.source,
        "crop": crop,
        "flip": bool(flip),
        "channel_order": "BGR" if bgr else "RGB",
        "landmarks": os.fspath(landmarks) if landmarks else None,
        "n_images": n_pair_images,
        "images_embedded": len(rels),
        "feature_dim": int(feats.shape[1]),
        "from_cache": not n_todo,
        "images_computed": n_todo,
        "feature_seconds": round(seconds, 3),
        "images_per_second": round(n_todo / seconds, 2) if seconds else None,
    })
    return result


def checked_net(model, weights, blob, runtime):
    """(model, weights, (input height, width)) of a net given by files or as a caffe.Net, refused before any
    work when ``blob`` is not in it, its weights are missing or ``runtime`` cannot run it."""
    if not isinstance(model, (str, os.PathLike)):
        if runtime != "caffe":
            raise EvalError("a runtime other than Caffe needs the net's files, not a caffe.Net")
        _, (_, height, width), names = F.describe(model)
        F.check_blob(names, blob, "the net")
        return model, weights, (height, width)
    model = os.fspath(model)
    netparam = caffe_io.read_net(model)
    _, (_, _, height, width) = input_layer(netparam, model)
    F.check_blob(F.net_blobs(netparam), blob, model)
    if weights is None:
        raise EvalError("%s: the weights (a .caffemodel) are needed too" % model)
    weights = os.fspath(weights)
    if not os.path.isfile(weights):
        raise EvalError("weights file %s does not exist" % weights)
    check_runtime(runtime, netparam, blob, model)
    return model, weights, (height, width)


def check_runtime(kind, netparam, blob, source):
    """Refuse up front a runtime that is not installed here, or a ``blob`` that is not the net's single output
    (what every runtime but Caffe hands back)."""
    if kind == "caffe":
        return
    import runtimes
    if kind not in runtimes.KINDS:
        raise EvalError("unknown runtime %r (one of %s)" % (kind, ", ".join(runtimes.KINDS)))
    why = runtimes.missing(kind)
    if why:
        raise EvalError("--runtime %s: %s" % (kind, why))
    consumed = {b for layer in netparam.layer for b in layer.bottom if b not in layer.top}
    outputs = [t for t in F.net_blobs(netparam) if t not in consumed]
    if outputs != [blob]:
        raise EvalError("%s: --runtime %s gives the net's output (%s), so --blob must be it, not %r"
                        % (source, kind, ", ".join(outputs), blob))


def gallery_of(pairs, lfw_dir, per_person):
    """(images, person per image) of the all-pairs protocol over the people of ``pairs``, checked before any
    work: a same-person pair means someone has two images, a different-person pair two people."""
    from base.lists import scan_tree
    people = {p.split("/", 1)[0] for p in pairs.left + pairs.right}
    gallery = allpairs.gallery(scan_tree(lfw_dir), people, per_person or None)
    why = allpairs.unusable(gallery[1])
    if why:
        raise EvalError("%s (all-pairs protocol over %s)" % (why, lfw_dir))
    return gallery


@dataclass(frozen=True)
class EvalSpec:
    """How the drivers evaluate a net: built once from the command line, never changed."""
    lfw_dir: Optional[str]               # None until the caller knows it (dataclasses.replace fills it in)
    pairs: Optional[str]
    folds: str = "6-10"
    blob: str = "fc5"
    flip: bool = True
    rgb: bool = False
    progress: bool = True
    cache_dir: Optional[str] = None      # the feature cache (None: the default, .cache/eval_lfw)
    all_pairs: Optional[int] = allpairs.PER_PERSON   # strict operating points, at most this many images a person


def spec_from_args(a, lfw_dir, pairs):
    """The EvalSpec of the drivers' shared flags (--eval-folds, --blob, --no-flip, --rgb, --quiet, --cache-dir)."""
    return EvalSpec(lfw_dir, pairs, folds=a.eval_folds, blob=a.blob, flip=not a.no_flip, rgb=a.rgb,
                    progress=not a.quiet, cache_dir=a.cache_dir)


def evaluate_net(spec, proto, weights):
    """The LFW protocol of ``spec`` on one net given by files, the crop by base.netinput's rule
    (decided on the first image); returns the record a driver keeps."""
    _, shape = input_layer(caffe_io.read_net(proto), proto)
    pairs = read_pairs(spec.pairs)
    rels, _ = pairs.images()
    check_images(spec.lfw_dir, rels[:1])
    crop = preprocess_for(shape, spec.lfw_dir, rels[:1], spec.rgb).crop
    r = evaluate(proto, spec.blob, spec.lfw_dir, pairs, weights=weights, folds=spec.folds, crop=crop, flip=spec.flip,
                 bgr=not spec.rgb, progress=spec.progress, cache_dir=spec.cache_dir or F.DEFAULT_CACHE,
                 all_pairs=spec.all_pairs)
    record = dict(accuracy=r["accuracy_mean"], std=r["accuracy_std"], tar_at_far_1e3=r["tar_at_far_1e-3"],
                  folds=r["folds"], flip=r["flip"])
    if "all_pairs" in r:
        a = r["all_pairs"]
        record["all_pairs"] = {k: a[k] for k in ("per_person", "n_people", "n_images", "n_genuine", "n_impostor",
                                                 "tar_at_far")}
    return record


def summary(result):
    """Human-readable lines: one per fold, then the mean."""
    lines = ["fold  threshold  accuracy"]
    for f, t, a in zip(result["folds"], result["thresholds"], result["fold_accuracy"]):
        lines.append("%4d  %9.4f  %7.2f%%" % (f, t, 100 * a))
    lines.append("mean accuracy %.2f%% +- %.2f (std over %d folds %s), TAR %.2f%% at FAR 1e-3, AUC %.4f"
                 % (100 * result["accuracy_mean"], 100 * result["accuracy_std"], len(result["folds"]),
                    _span(result["folds"]), 100 * result["tar_at_far_1e-3"], result["auc"]))
    if result["from_cache"]:
        how = "all from cache"
    else:
        how = "%d computed in %.1f s (%s img/s)" % (result["images_computed"], result["feature_seconds"],
                                                   result["images_per_second"])
        if result["images_computed"] < result["images_embedded"]:
            how += ", %d from cache" % (result["images_embedded"] - result["images_computed"])
    if "all_pairs" in result:
        lines.append(allpairs.summary_line(result["all_pairs"]))
    lines.append("%d pairs, %d images (features: %s), blob %s (%d-d%s), %s, forward pass: %s" % (
        result["n_pairs"], result["n_images"], how, result["blob"], result["feature_dim"],
        " with flip" if result["flip"] else "", result["channel_order"], result.get("runtime", "caffe")))
    return lines


def _span(folds):
    return "%d-%d" % (folds[0], folds[-1]) if folds == list(range(folds[0], folds[-1] + 1)) else str(folds)


def to_json(result):
    """The result without its per-pair arrays, ready for json.dump."""
    return {k: v for k, v in result.items() if k not in ("scores", "same", "roc")}


def write_report(result, out_dir, protect=()):
    """results.json and roc.png into ``out_dir``; returns their paths."""
    json_path = caffe_io.atomic_write(os.path.join(out_dir, "results.json"),
                                      json.dumps(to_json(result), indent=2) + "\n", protect)
    png_path = os.path.join(out_dir, "roc.png")
    caffe_io.atomic_write(png_path, roc_png(result), protect)
    return json_path, png_path


def roc_png(result):
    """The ROC curve (TAR against FAR, log scale) as PNG bytes."""
    import io
    plt = pyplot()
    far, tar = result["roc"]["far"], result["roc"]["tar"]
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    keep = far > 0
    ax.semilogx(far[keep], tar[keep], drawstyle="steps-post", label="%d test pairs" % result["n_pairs"])
    lowest = far[keep].min() if keep.any() else 1e-4
    low = float(tar[keep].min()) if keep.any() else 0.0
    if "all_pairs" in result:
        a = result["all_pairs"]
        afar, atar = np.asarray(a["roc"]["far"]), np.asarray(a["roc"]["tar"])
        ax.semilogx(afar[afar > 0], atar[afar > 0], drawstyle="steps-post",
                    label="all %d pairs of %d images" % (a["n_genuine"] + a["n_impostor"], a["n_images"]))
        lowest, low = min(lowest, afar[afar > 0].min()), min(low, float(atar[afar > 0].min()))
        ax.legend(fontsize=8, loc="lower right")
    ax.axvline(1e-3, color="grey", lw=0.8, ls="--")
    ax.set_xlim(min(1e-4, lowest), 1)
    ax.set_ylim(max(0.0, low - 0.1 * (1 - low) - 0.005), 1.0 + 0.02 * (1 - low) + 0.001)
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.set_title("LFW folds %s: accuracy %.2f%%, TAR@FAR=1e-3 %.2f%%" % (
        _span(result["folds"]), 100 * result["accuracy_mean"], 100 * result["tar_at_far_1e-3"]), fontsize=9)
    ax.grid(True, which="both", lw=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
