"""Train nets made from a deploy net: image-list data in front, a loss behind.

``train_net(deploy, data, head)`` takes any deploy NetParameter whose single
Input is N x 3 x H x W and returns the NetParameter Caffe's solver trains:

* data: ``ImageData`` (the list format of finetune.lists) with the SphereFace
  transform, (x - 127.5) * 0.0078125 and mirroring.  ImageData decodes with
  OpenCV, i.e. BGR; for a net that expects RGB the three planes are swapped
  back with native Slice + Concat, so the deployed net keeps its convention.
* head ``ASoftmax``: fc6 A-Softmax on the embedding (the toolkit's Python layer
  on BVLC Caffe, or the SphereFace fork's native layer) + SoftmaxWithLoss.
* head ``SoftmaxCenter``: fc6 InnerProduct + SoftmaxWithLoss + the
  centre-loss Python layer (finetune.centerloss) on the embedding.
* head ``Distill``: a frozen teacher net (layers renamed ``teacher/...``,
  lr_mult 0) reads the same images; both embeddings are L2-normalised with
  native layers and compared by EuclideanLoss.  A learned linear projection
  is added on the student side only when the dimensions differ.  Or, much
  cheaper when the teacher is big and the device is a CPU, the teacher's
  embeddings are computed once and the train net looks them up: the list's
  label is then the image's row, read from a memory-mapped ``.npy`` file by
  the ``finetune.teachertable`` Python layer (``Distill(teacher=None,
  table=PATH)``), so the table is no parameter: snapshots and the final
  caffemodel hold the student alone, whatever the list's length.  Either way the
  cosines between the faces of a batch can be distilled too
  (``Distill(similarity=W)``, finetune.similarity, a Python loss layer).

Only native Caffe layers are used outside the Python A-Softmax, so a user's
GPU Caffe trains these nets unchanged.
"""
import copy
import functools
import json
import os
from dataclasses import dataclass

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

import base  # noqa: F401  (first: quiets glog before caffe loads)
from base.errors import ToolkitError
from base.images import MEAN, SCALE
from base.netinput import input_layer
from base.proto import caffe_pb2, stock, superset

TEACHER = "teacher/"
# The SphereFace fork's names of the margins m = 1..4.
MARGIN_TYPES = ("SINGLE", "DOUBLE", "TRIPLE", "QUADRUPLE")


class TrainNetError(ToolkitError):
    pass


@dataclass
class ImageList:
    """Where the training images are and how Caffe should read them."""
    source: str                 # list file: "relative/path label" per line
    root_folder: str = ""
    batch_size: int = 64
    mirror: bool = True
    rgb: bool = False           # the net expects RGB planes (Caffe/SphereFace: BGR)
    shuffle: bool = True
    size: tuple = None          # (H, W) the files are read at, when larger than the net's input: centre crop
    augment: dict = None        # finetune.augment's parameters (shift, scale, colour, seed); None: none


@dataclass
class ASoftmax:
    num_classes: int
    embedding: str = "fc5"
    m: int = 4
    native: bool = False        # the SphereFace fork's MarginInnerProduct instead of the Python layer
    base: float = 1000
    gamma: float = 0.12
    power: float = 1
    lambda_min: float = 5
    iteration: int = 0          # lambda's schedule position (the layer counts; a resumed run starts here)
    seed: int = 0               # of the Python layer's weight fill (Caffe's fillers take the solver's seed)


@dataclass
class SoftmaxCenter:
    """Softmax on the list's labels + centre loss (the channel-prioritisation recipe)."""
    num_classes: int
    embedding: str = "fc5"
    lambda_c: float = 1e-3      # centre-loss weight
    alpha: float = 0.5          # centre update rate


@dataclass
class Distill:
    teacher: caffe_pb2.NetParameter     # deploy net of the teacher; None: a table of its embeddings
    embedding: str = "fc5"              # student blob
    teacher_embedding: str = "fc5"      # teacher blob
    student_dim: int = 0                # filled by train_net when unknown
    teacher_dim: int = 0
    teacher_rgb: bool = False           # the teacher expects RGB planes
    teacher_blobs: dict = None          # {layer: number of weight blobs}, to freeze each one
    loss_weight: float = 1.0
    table: str = None                   # teacher None: .npy of its embeddings, row i for the list's label i
    features: tuple = ()                # ((blob, loss weight), ...): feature maps copied from the teacher too
    similarity: float = 0.0             # loss weight of the pairwise-cosine loss (finetune.similarity); 0: none
    similarity_hard: float = 0.0        # its emphasis on the pairs the teacher finds alike


@functools.lru_cache(maxsize=None)
def fork_net_class():
    """NetParameter of the SphereFace Caffe fork: BVLC's schema plus MarginInnerProduct.

    BVLC's caffe_pb2 has no ``margin_inner_product_param``; the fork adds it to
    LayerParameter as field 147 (BVLC later gave 147 to ``swish_param``, which
    is left out here). Building that schema here lets the native
    train net be an ordinary message whose text is exactly what the fork parses.
    """
    F = descriptor_pb2.FieldDescriptorProto
    fd = descriptor_pb2.FileDescriptorProto()
    stock().DESCRIPTOR.CopyToProto(fd)   # BVLC's schema (package caffe), not the toolkit's superset
    fd.name = "caffe_sphereface_fork.proto"
    msg = fd.message_type.add(name="MarginInnerProductParameter")
    kinds = msg.enum_type.add(name="MarginType")
    for number, name in enumerate(MARGIN_TYPES):
        kinds.value.add(name=name, number=number)
    for name, number, kind, extra in [
            ("num_output", 1, F.TYPE_UINT32, {}),
            ("type", 2, F.TYPE_ENUM, dict(type_name=".caffe.MarginInnerProductParameter.MarginType",
                                          default_value="SINGLE")),
            ("weight_filler", 3, F.TYPE_MESSAGE, dict(type_name=".caffe.FillerParameter")),
            ("axis", 4, F.TYPE_INT32, dict(default_value="1")),
            ("base", 5, F.TYPE_FLOAT, dict(default_value="1")),
            ("gamma", 6, F.TYPE_FLOAT, dict(default_value="0")),
            ("power", 7, F.TYPE_FLOAT, dict(default_value="1")),
            ("iteration", 8, F.TYPE_INT32, dict(default_value="0")),
            ("lambda_min", 9, F.TYPE_FLOAT, dict(default_value="0"))]:
        msg.field.add(name=name, number=number, type=kind, label=F.LABEL_OPTIONAL, **extra)
    layer = next(m for m in fd.message_type if m.name == "LayerParameter")
    # The fork predates BVLC's swish_param, which took the same number 147.
    kept = [f for f in layer.field if f.number != 147]
    del layer.field[:]
    layer.field.extend(kept)
    layer.field.add(name="margin_inner_product_param", number=147, type=F.TYPE_MESSAGE, label=F.LABEL_OPTIONAL,
                    type_name=".caffe.MarginInnerProductParameter")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    return message_factory.MessageFactory(pool).GetPrototype(pool.FindMessageTypeByName("caffe.NetParameter"))


def _image_data(net, data, top, shape):
    """ImageData at shape's H x W, SphereFace transform; top is in BGR order."""
    layer = net.layer.add(name="data", type="ImageData", top=[top, "label"])
    layer.transform_param.mirror = data.mirror
    layer.transform_param.scale = SCALE
    layer.transform_param.mean_value.extend([MEAN] * 3)
    p = layer.image_data_param
    p.source, p.batch_size, p.shuffle, p.new_height, p.new_width = data.source, data.batch_size, data.shuffle, *shape[2:]
    if data.root_folder:
        p.root_folder = data.root_folder.rstrip("/") + "/"


def _swap_planes(net, bottom, top):
    """B,G,R planes -> R,G,B (OpenCV decodes BGR; some nets want RGB)."""
    split = net.layer.add(name=top + "_split", type="Slice", bottom=[bottom],
                          top=[top + "_c0", top + "_c1", top + "_c2"])
    split.slice_param.axis = 1
    net.layer.add(name=top, type="Concat", bottom=[top + "_c2", top + "_c1", top + "_c0"], top=[top])
    return top


def _frozen_copy(layer, prefix, renamed_input, n_blobs):
    out = copy.deepcopy(layer)
    out.name = prefix + layer.name
    out.bottom[:] = [renamed_input.get(b, prefix + b) for b in layer.bottom]
    out.top[:] = [prefix + t for t in layer.top]
    del out.param[:]
    for _ in range(n_blobs):
        out.param.add(lr_mult=0, decay_mult=0)
    if layer.type == "BatchNorm":
        out.batch_norm_param.use_global_stats = True
    return out


def _l2_normalise(net, bottom, name):
    """x / ||x|| with native layers: SUMSQ Reduction, Power -1/2, broadcast Scale."""
    sq = net.layer.add(name=name + "_sumsq", type="Reduction", bottom=[bottom], top=[name + "_sumsq"])
    sq.reduction_param.operation = caffe_pb2.ReductionParameter.SUMSQ
    sq.reduction_param.axis = 1
    inv = net.layer.add(name=name + "_invnorm", type="Power", bottom=[name + "_sumsq"], top=[name + "_invnorm"])
    inv.power_param.power = -0.5
    inv.power_param.shift = 1e-10
    sc = net.layer.add(name=name, type="Scale", bottom=[bottom, name + "_invnorm"], top=[name])
    sc.scale_param.axis = 0
    return name


def _center_crop(net, bottom, top, batch, shape, full):
    """The centre H x W of a larger image (e.g. SphereFace's 112x96 inside an
    ArcFace-aligned 112x112: columns 8..103), with native layers."""
    (H, W), (FH, FW) = shape[2:], full[2:]
    if H > FH or W > FW or (FH - H) % 2 or (FW - W) % 2:
        raise TrainNetError("student input %dx%d cannot be centred in the teacher's %dx%d" % (H, W, FH, FW))
    ref = net.layer.add(name=top + "_shape", type="DummyData", top=[top + "_shape"])
    ref.dummy_data_param.shape.add().dim.extend([batch, 3, H, W])
    crop = net.layer.add(name=top, type="Crop", bottom=[bottom, top + "_shape"], top=[top])
    crop.crop_param.axis = 2
    crop.crop_param.offset.extend([(FH - H) // 2, (FW - W) // 2])
    return top


def _input_chain(net, raw, top, rgb, batch, shape, full):
    """Blob `top` fed to a net: the raw BGR images, plane-swapped and/or
    centre-cropped as that net needs."""
    steps = [s for s in (rgb and "swap", shape[2:] != full[2:] and "crop") if s]
    current = raw
    for i, step in enumerate(steps):
        name = top if i == len(steps) - 1 else top + "_" + step
        current = (_swap_planes(net, current, name) if step == "swap"
                   else _center_crop(net, current, name, batch, shape, full))
    return current


def train_net(deploy, data, head, name=None):
    """Deploy NetParameter + ImageList + head (ASoftmax, SoftmaxCenter or Distill) -> train NetParameter.

    With a Distill head whose teacher takes larger images, the list is read at
    the teacher's size and the student sees the centre crop.
    """
    if not isinstance(head, (ASoftmax, SoftmaxCenter, Distill)):
        raise TrainNetError("unknown head %r" % (head,))
    deploy = superset(deploy)   # the toolkit's schema (base.proto), whatever made the message
    inp, shape = input_layer(deploy)
    top = inp.top[0]
    net = caffe_pb2.NetParameter(name=name or (deploy.name + "_train"))
    full = shape
    table = isinstance(head, Distill) and head.teacher is None
    if isinstance(head, Distill) and not table:
        _, full = input_layer(head.teacher, "teacher net")
    if data.size:
        full = shape[:2] + tuple(data.size)
    plain = not data.rgb and full[2:] == shape[2:]
    raw = top if plain else "data_bgr"
    if data.augment:   # right after the reader, so that a teacher in the net sees the same changed image
        _image_data(net, data, raw + "_plain", full)
        jitter = net.layer.add(name="augment", type="Python", bottom=[raw + "_plain"], top=[raw])
        jitter.python_param.module, jitter.python_param.layer = "finetune.augment", "Jitter"
        jitter.python_param.param_str = json.dumps(data.augment, sort_keys=True)
    else:
        _image_data(net, data, raw, full)
    if not plain:
        _input_chain(net, raw, top, data.rgb, data.batch_size, shape, full)
    blobs = set()
    for layer in deploy.layer:
        if layer is inp:
            continue
        net.layer.add().CopyFrom(layer)
        blobs.update(layer.top)
    if head.embedding not in blobs:
        raise TrainNetError("embedding blob %r is not produced by the net (blobs: %s)"
                            % (head.embedding, ", ".join(sorted(blobs))))
    if isinstance(head, ASoftmax):
        return _asoftmax_head(net, head)
    if isinstance(head, SoftmaxCenter):
        return _softmax_center_head(net, head)
    if table:
        return _teacher_table(net, head)
    return _teacher_net(net, head, data, raw, full)


def _asoftmax_head(net, head):
    """fc6 A-Softmax (Python layer, or the fork's native one) + SoftmaxWithLoss."""
    emb = head.embedding
    if head.native:
        # BVLC's caffe_pb2 has no margin_inner_product_param: use the fork's schema.
        net = fork_net_class().FromString(net.SerializeToString())
        fc6 = net.layer.add(name="fc6", type="MarginInnerProduct", bottom=[emb, "label"], top=["fc6", "lambda"])
        fc6.param.add(lr_mult=1, decay_mult=1)
        mp = fc6.margin_inner_product_param
        mp.num_output, mp.type = head.num_classes, head.m - 1
        mp.weight_filler.type = "xavier"
        mp.base, mp.gamma, mp.power, mp.lambda_min, mp.iteration = (
            head.base, head.gamma, head.power, head.lambda_min, head.iteration)
    else:
        p = dict(num_output=head.num_classes, m=head.m, base=head.base, gamma=head.gamma,
                 power=head.power, lambda_min=head.lambda_min, iteration=head.iteration, seed=head.seed)
        fc6 = net.layer.add(name="fc6", type="Python", bottom=[emb, "label"], top=["fc6", "lambda"])
        fc6.param.add(lr_mult=1, decay_mult=1)
        fc6.python_param.module = "finetune.asoftmax"
        fc6.python_param.layer = "MarginInnerProduct"
        fc6.python_param.param_str = json.dumps(p, sort_keys=True)
    net.layer.add(name="softmax_loss", type="SoftmaxWithLoss", bottom=["fc6", "label"], top=["softmax_loss"])
    return net


def _softmax_center_head(net, head):
    """fc6 (InnerProduct) + SoftmaxWithLoss + the centre-loss Python layer (weight lambda_c) on the embedding."""
    emb = head.embedding
    fc6 = net.layer.add(name="fc6", type="InnerProduct", bottom=[emb], top=["fc6"])
    fc6.inner_product_param.num_output = head.num_classes
    fc6.inner_product_param.weight_filler.type = "xavier"
    net.layer.add(name="softmax_loss", type="SoftmaxWithLoss", bottom=["fc6", "label"], top=["softmax_loss"])
    center = net.layer.add(name="center_loss", type="Python", bottom=[emb, "label"], top=["center_loss"],
                           loss_weight=[head.lambda_c])
    center.param.add(lr_mult=0, decay_mult=0)   # the layer moves its centres itself
    center.python_param.module = "finetune.centerloss"
    center.python_param.layer = "CenterLoss"
    center.python_param.param_str = json.dumps(dict(num_output=head.num_classes, alpha=head.alpha), sort_keys=True)
    return net


def _teacher_table(net, head):
    """Distillation from precomputed teacher embeddings: the image's row (its label) read from the table file."""
    if not head.table or head.teacher_dim < 1:
        raise TrainNetError("a teacher table needs its file and dimension")
    layer = net.layer.add(name=TEACHER + head.teacher_embedding, type="Python", bottom=["label"],
                          top=[TEACHER + head.teacher_embedding])
    layer.python_param.module, layer.python_param.layer = "finetune.teachertable", "TeacherTable"
    layer.python_param.param_str = json.dumps(dict(path=os.path.abspath(head.table)), sort_keys=True)
    return _distill_loss(net, head, head.embedding)


def _teacher_net(net, head, data, raw, full):
    """Distillation from a frozen copy of the teacher net reading the same images."""
    teacher = superset(head.teacher)
    t_inp, t_shape = input_layer(teacher, "teacher net")
    teacher_input = raw
    if head.teacher_rgb or t_shape[2:] != full[2:]:   # e.g. a 112x96 teacher: the same crop as the student's
        teacher_input = _input_chain(net, raw, TEACHER + "data", head.teacher_rgb, data.batch_size, t_shape, full)
    t_blobs = set()
    for layer in teacher.layer:
        if layer is t_inp:
            continue
        net.layer.add().CopyFrom(_frozen_copy(layer, TEACHER, {t_inp.top[0]: teacher_input},
                                              head.teacher_blobs.get(layer.name, 0)))
        t_blobs.update(layer.top)
    if head.teacher_embedding not in t_blobs:
        raise TrainNetError("teacher embedding blob %r not in the teacher net" % head.teacher_embedding)
    for blob, weight in head.features:   # FitNets-style hints: the maps themselves, where the shapes agree
        if blob not in t_blobs:
            raise TrainNetError("feature blob %r not in the teacher net" % blob)
        hint = net.layer.add(name="feature_loss_" + blob, type="EuclideanLoss", bottom=[blob, TEACHER + blob],
                             top=["feature_loss_" + blob])
        hint.loss_weight.append(weight)
    return _distill_loss(net, head, head.embedding)


def _distill_loss(net, head, emb):
    """EuclideanLoss between the L2-normalised student (projected when the
    dimensions differ) and teacher embeddings."""
    student = emb
    if head.student_dim != head.teacher_dim:
        proj = net.layer.add(name="distill_proj", type="InnerProduct", bottom=[emb], top=["distill_proj"])
        proj.inner_product_param.num_output = head.teacher_dim
        proj.inner_product_param.bias_term = False
        proj.inner_product_param.weight_filler.type = "xavier"
        student = "distill_proj"
    s = _l2_normalise(net, student, "student_l2")
    t = _l2_normalise(net, TEACHER + head.teacher_embedding, "teacher_l2")
    loss = net.layer.add(name="distill_loss", type="EuclideanLoss", bottom=[s, t], top=["distill_loss"])
    loss.loss_weight.append(head.loss_weight)
    if head.similarity:
        sim = net.layer.add(name="similarity_loss", type="Python", bottom=[s, t], top=["similarity_loss"])
        sim.loss_weight.append(head.similarity)
        sim.python_param.module, sim.python_param.layer = "finetune.similarity", "SimilarityLoss"
        sim.python_param.param_str = json.dumps(dict(hard=head.similarity_hard), sort_keys=True)
    return net
