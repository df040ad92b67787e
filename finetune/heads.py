"""The one data + head builder of every train net: the image list as ImageData reads it, and the loss.

``data_and_head(job, deploy, items, ...)`` turns a FineTuneJob's settings into
what ``trainnet.train_net`` (or ``apps.prioritise.towers``) takes: an ``ImageList``, a
head (A-Softmax, softmax + centre loss, or distillation) and the extra
initial weights the head brings (the teacher's, or its embedding table).
"""
import os
import sys

import numpy as np

from base import caffe_io
from base.errors import ToolkitError
from base.images import preprocess_for
from base.lists import list_text
from base.netinput import ALIGNED_SIZE, input_layer
from . import trainnet


class HeadError(ToolkitError):
    pass


HEADS = ("distill", "asoftmax", "softmax-center")


def read_size(deploy, items):
    """(H, W) to read the files at so that the net sees their centre crop: the
    SphereFace 112x96 crop of 112x112 aligned faces (the crop rule of
    base.netinput, as the evaluator and the sampler apply it); None (ImageData
    resizes to the net's input) otherwise."""
    _, shape = input_layer(deploy)
    pre = preprocess_for(shape, "", [items[0][0]], rgb=False)
    return ALIGNED_SIZE if pre.crop == "112x96" else None


def blob_dim(netparam, blob):
    """Entries per image of blob ``blob`` of a NetParameter (from real Caffe)."""
    net = caffe_io.net_from_param(netparam)
    if blob not in net.blobs:
        raise HeadError("blob %r not in net %r (blobs: %s)" % (blob, netparam.name, ", ".join(net.blobs)))
    return int(np.prod(net.blobs[blob].data.shape[1:]))


def teacher_table(items, root, out, proto, weights, blob, rgb, mirror, progress=True, cache_dir=None):
    """The teacher's embedding of every list image, computed once (through the
    evaluator's feature cache, so later jobs with the same teacher and images
    reuse it), and the list that indexes it: line i is "path i".  With
    mirroring the row is the mean of the L2-normalised embeddings of the image
    and its mirror, the target for either view."""
    from eval_lfw.features import DEFAULT_CACHE, embeddings
    _, t_shape = input_layer(caffe_io.read_net(proto), proto)
    root = root or ""
    rels = [os.path.relpath(path, root) if root else path for path, _ in items]
    pre = preprocess_for(t_shape, root, rels, rgb)
    feats, computed, seconds = embeddings(proto, weights, blob, root, rels, pre, flip=mirror, progress=progress,
                                          cache_dir=cache_dir or DEFAULT_CACHE)
    if computed and progress:
        print("teacher embeddings: %d images in %.0f s" % (computed, seconds), file=sys.stderr)
    if mirror:
        halves = np.split(feats, 2, axis=1)
        feats = sum(h / np.maximum(np.linalg.norm(h, axis=1, keepdims=True), 1e-12) for h in halves) / 2
    index_list = os.path.join(out, "teacher_index.txt")
    caffe_io.atomic_write(index_list, list_text([(rel, i) for i, rel in enumerate(rels)]))
    return feats.astype(np.float32), os.path.abspath(index_list)


def write_table(table, path):
    """The teacher table as an .npy file (atomically), read memory-mapped by finetune.teachertable."""
    import io
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(table, dtype=np.float32))
    return caffe_io.atomic_write(path, buf.getvalue())


def _classes(job, items, deploy):
    """The classifier's classes; refused when its weights (with gradient and momentum) would not fit in the
    memory free here -- a label far beyond the others makes that many classes."""
    from base.netcheck import available_memory
    labels = [label for _, label in items]
    classes = job.num_classes or max(labels) + 1
    if max(labels) >= classes:
        raise HeadError("%s: label %d is out of range for %d classes" % (job.train_list, max(labels), classes))
    need, free = 3 * 4 * classes * blob_dim(deploy, job.embedding), available_memory()
    if free is not None and need > free:
        raise HeadError("%s: %d classes (labels up to %d) need about %.1f GB of classifier weights, more than the "
                        "%.1f GB of memory free here" % (job.train_list, classes, max(labels), need / 1e9, free / 1e9))
    return classes


def feature_losses(deploy, teacher, names, weight):
    """((blob, loss weight), ...) of the feature maps the student copies from the teacher, each weighted by
    weight / its size, so that each term is weight x half its mean squared error.  names ["auto"]: the output
    of every Eltwise (residual block) whose shape the student kept."""
    s_net, t_net = caffe_io.net_from_param(deploy), caffe_io.net_from_param(teacher)
    shape = {b: tuple(v.data.shape[1:]) for b, v in s_net.blobs.items()}
    t_shape = {b: tuple(v.data.shape[1:]) for b, v in t_net.blobs.items()}
    if list(names) == ["auto"]:
        names = [top for layer in deploy.layer if layer.type == "Eltwise" for top in layer.top
                 if shape.get(top) == t_shape.get(top)]
    for blob in names:
        missing = [who for who, blobs in (("student", shape), ("teacher", t_shape)) if blob not in blobs]
        if missing:
            raise HeadError("--distill-features: blob %r is not in the %s net" % (blob, " nor the ".join(missing)))
        if shape[blob] != t_shape[blob]:
            raise HeadError("--distill-features: blob %r is %s in the student but %s in the teacher; only maps "
                            "of the same shape can be copied" % (blob, "x".join(map(str, shape[blob])),
                                                                 "x".join(map(str, t_shape[blob]))))
    return tuple((blob, weight / float(np.prod(shape[blob]))) for blob in dict.fromkeys(names))


def _distill(job, deploy, items, data, progress):
    teacher_proto = job.teacher or job.deploy
    teacher_weights = job.teacher_weights or (job.weights if not job.teacher else None)
    if not teacher_weights:
        raise HeadError("distillation needs teacher weights (--teacher-weights)")
    t_blob = job.teacher_embedding or job.embedding
    t_rgb = job.rgb if job.teacher_rgb is None else job.teacher_rgb
    student_dim = blob_dim(deploy, job.embedding)
    features = tuple(job.distill_features or ())
    if job.precompute_teacher:
        if features:
            raise HeadError("--distill-features copies the teacher's feature maps, which a table of embeddings "
                            "does not hold: drop --precompute-teacher")
        if data.augment:
            raise HeadError("--augment-shift/--augment-scale/--augment-colour/--augment-mixup change each image, so "
                            "the target "
                            "is the teacher's view of the changed image, which a table cannot hold: drop "
                            "--precompute-teacher")
        table, index_list = teacher_table(items, job.root_folder, job.out, teacher_proto, teacher_weights, t_blob,
                                          t_rgb, job.mirror, progress, job.cache_dir)
        data.source, data.size = index_list, read_size(deploy, items)
        head = trainnet.Distill(teacher=None, embedding=job.embedding, teacher_embedding=t_blob,
                                student_dim=student_dim, teacher_dim=table.shape[1],
                                table=write_table(table, os.path.join(job.out, "teacher_table.npy")),
                                similarity=job.similarity_weight, similarity_hard=job.similarity_hard)
        return head, {}
    data.size = read_size(deploy, items)   # 112x112 aligned faces: read whole, the student sees the 112x96 crop
    teacher = caffe_io.read_net(teacher_proto)
    t_weights = caffe_io.read_weights(teacher_weights)
    if job.fold_bn:   # frozen anyway: the same function, computed faster
        from .fold import fold
        teacher, t_weights, _ = fold(teacher, t_weights)
    head = trainnet.Distill(teacher=teacher, embedding=job.embedding, teacher_embedding=t_blob,
                            teacher_blobs={name: len(arrays) for name, arrays in t_weights.items()},
                            student_dim=student_dim, teacher_dim=blob_dim(teacher, t_blob), teacher_rgb=t_rgb,
                            features=feature_losses(deploy, teacher, features, job.feature_weight) if features else (),
                            similarity=job.similarity_weight, similarity_hard=job.similarity_hard)
    return head, {trainnet.TEACHER + name: arrays for name, arrays in t_weights.items()}


def data_and_head(job, deploy, items, start_iter=0, progress=True):
    """(ImageList, head, extra initial weights) of a finetune.driver.FineTuneJob.

    start_iter: where a resumed run starts, so A-Softmax's lambda schedule
    (counted inside the layer, not saved by Caffe) goes on from there."""
    if not items:
        raise HeadError("%s: the image list is empty" % job.train_list)
    augment = job.augmentation()
    data = trainnet.ImageList(source=os.path.abspath(job.train_list), root_folder=job.root_folder,
                              batch_size=job.batch_size, mirror=job.mirror, rgb=job.rgb, augment=augment)
    if job.head == "distill":
        head, init = _distill(job, deploy, items, data, progress)
        return data, head, init
    if job.head not in HEADS:
        raise HeadError("unknown head %r: choose %s" % (job.head, ", ".join(HEADS)))
    data.size = read_size(deploy, items)
    if job.head == "asoftmax":
        head = trainnet.ASoftmax(num_classes=_classes(job, items, deploy), embedding=job.embedding, m=job.margin,
                                 native=job.native_asoftmax, iteration=start_iter, seed=job.seed)
    else:
        head = trainnet.SoftmaxCenter(num_classes=_classes(job, items, deploy), embedding=job.embedding,
                                      lambda_c=job.lambda_c, alpha=job.center_alpha)
    return data, head, {}
