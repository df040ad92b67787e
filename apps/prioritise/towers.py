"""One Caffe net that trains several widths of the same weights (channel prioritisation).

The fine-tuning of channel prioritisation sums the loss of the sub-networks
at utilisation levels p (100, 75, 50 %), the p % sub-network being the first
ceil(p * C) channels of every prunable channel group (``apps.prioritise.widths``), all
of them one set of weights.  Here that is one ordinary Caffe net:

* the deploy net's trunk appears once per level ("tower"); the full tower
  keeps the deploy names (so the deploy caffemodel loads by name), tower p
  has every layer and blob suffixed ``@<100p>`` (``conv1_1@75``);
* every learnable blob carries a ParamSpec name (``conv1_1_w0``) identical in
  all towers, so Caffe shares data AND diff: each tower's backward adds its
  gradient into the one shared diff and the solver updates one weight;
* in tower p, each blob that a consumer of a prunable group reads (the output
  after the producers' last per-channel passenger: BN, Scale, PReLU,
  depthwise conv ...) is multiplied in place by a fixed 0/1 channel mask.  The
  mask is a native ``Scale`` whose scale comes from a second bottom built of
  ``DummyData`` constant runs (ones for kept channels, zeros for dropped
  ones) + ``Concat``: it lives in the prototxt, has no learnable blob, and
  needs no weights loaded after the solver is made;
* each tower gets the head (A-Softmax, distillation, or any layers written
  for the full tower's embedding); head layers that read the embedding are
  repeated per tower with shared params, the others (teacher side, tables)
  appear once; the towers' losses are summed with weights.

Since consumers are linear in their input channels and passengers act per
channel, tower p computes exactly what ``apps.prioritise.widths.export_width(p)``
writes as a standalone net (tested in tests/test_towers.py).

BatchNorm/Scale are frozen by default (the method fixes them while
fine-tuning): BN uses its stored statistics in every phase (towers would
otherwise overwrite each other's running averages in the shared blobs) and
the Scale layers after BN get lr_mult 0.

    python -m apps.prioritise.towers --model NET.prototxt --levels 1,0.75,0.5 --out towers.prototxt
"""
import copy

import numpy as np

from apps.prioritise.widths import add_levels, level_keep
from base import caffe_io, cli
from base.errors import ToolkitError
from base.proto import caffe_pb2, superset
from prune.graph import build_graph

LEVELS = (1.0, 0.75, 0.5)


PROG = "python -m apps.prioritise.towers"
DESCRIPTION = ("Write the multi-width net of a deploy prototxt: one tower per utilisation level, all "
               "sharing the deploy's weights by param name, tower p keeping the first ceil(p * C) "
               "channels of every prunable channel group through fixed masks. The deploy caffemodel "
               "loads into it unchanged (by layer name) and one forward gives every width's outputs "
               "(blobs suffixed @75, @50 ...).")


class TowerError(ToolkitError):
    pass


def suffix(p):
    """Name suffix of the level-p tower: '' for the full one, '@75' for 0.75."""
    return "" if p == 1 else "@%g" % (100 * p)


def _check_levels(levels, loss_weights):
    levels = list(levels)
    for p in levels:
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise TowerError("utilisation level must be in (0, 1], got %r" % (p,))
    if 1 not in levels:
        raise TowerError("levels %s lack the full tower 1.0, whose layers carry the deploy names "
                         "(the deploy caffemodel loads into it by name)" % levels)
    if len({suffix(p) for p in levels}) != len(levels):
        raise TowerError("levels %s repeat a level" % levels)
    if loss_weights is None:
        loss_weights = [1.0] * len(levels)
    loss_weights = list(loss_weights)
    if len(loss_weights) != len(levels) or any(
            isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0 for w in loss_weights):
        raise TowerError("loss_weights %r: one number >= 0 per level %s is needed" % (loss_weights, levels))
    # full tower first: it owns the shared params and keeps the deploy's layer order
    pairs = sorted(zip(levels, loss_weights), key=lambda pw: -pw[0])
    return [p for p, _ in pairs], [w for _, w in pairs]


def tower_masks(graph, p):
    """{blob read by a consumer: 0/1 float32 mask along its axis 1} of level p
    (only blobs where the level drops something)."""
    masks = {}
    for gid, kept in level_keep(graph, p).items():
        group = graph[gid]
        gone = np.arange(len(kept), group.channels)
        if not gone.size:
            continue
        where = {b.blob: b for b in group.blobs}
        for c in group.consumers:
            shape = graph.shapes.get(c.bottom)
            if c.bottom not in where or not shape or len(shape) < 2:
                raise TowerError("%s: the channels of group %r in blob %r (read by %r) cannot be located"
                                 % (graph.source, gid, c.bottom, c.layer))
            mask = masks.setdefault(c.bottom, np.ones(shape[1], dtype=np.float32))
            mask[where[c.bottom].indices(gone)] = 0
    return masks


def _runs(mask):
    """[(value, length)] of consecutive equal entries."""
    edges = np.flatnonzero(np.diff(mask)) + 1
    starts, ends = np.r_[0, edges], np.r_[edges, mask.size]
    return [(float(mask[s]), int(e - s)) for s, e in zip(starts, ends)]


def _mask_layers(blob, mask):
    """DummyData runs + Concat -> mask vector; Scale multiplies ``blob`` by it in place."""
    stem = blob + "/mask"
    runs = _runs(mask)
    dummy = caffe_pb2.LayerParameter(name=stem + "_runs", type="DummyData",
                                     top=["%s_r%d" % (stem, i) for i in range(len(runs))])
    for value, n in runs:
        dummy.dummy_data_param.shape.add().dim.append(n)
        dummy.dummy_data_param.data_filler.add(type="constant", value=value)
    cat = caffe_pb2.LayerParameter(name=stem + "_vec", type="Concat", bottom=list(dummy.top), top=[stem + "_vec"])
    cat.concat_param.axis = 0
    scale = caffe_pb2.LayerParameter(name=stem, type="Scale", bottom=[blob, stem + "_vec"], top=[blob])
    scale.scale_param.axis = 1
    return [dummy, cat, scale]


def _blob_count(layer, graph=None):
    if graph is not None and layer.name in graph.param_shapes:
        return len(graph.param_shapes[layer.name])
    t, bottoms = layer.type, len(layer.bottom)
    if t in ("Convolution", "Deconvolution", "InnerProduct", "Embed"):
        p = {"InnerProduct": layer.inner_product_param, "Embed": layer.embed_param}.get(t, layer.convolution_param)
        return 1 + bool(p.bias_term)
    if t == "Scale":
        return (bottoms == 1) + bool(layer.scale_param.bias_term)
    if t == "Bias":
        return int(bottoms == 1)
    if t == "BatchNorm":
        return 3
    if t == "PReLU":
        return 1
    return len(layer.param)  # Python layers declare theirs; other types have none


def _share(layer, base, n_blobs, freeze):
    """Name every learnable blob ``<base>_w<i>`` (unless named already), base
    being the full tower's layer name, so every tower names it alike."""
    while len(layer.param) < n_blobs:
        layer.param.add()
    for i in range(n_blobs):
        spec = layer.param[i]
        if not spec.name:
            spec.name = "%s_w%d" % (base, i)
        if layer.type == "BatchNorm" or freeze:
            spec.lr_mult, spec.decay_mult = 0, 0


def _renamed(layer, sfx, local):
    """Copy of ``layer`` in a tower: name and the tower's own blobs suffixed."""
    out = copy.deepcopy(layer)
    out.name = layer.name + sfx
    out.bottom[:] = [b + sfx if b in local else b for b in layer.bottom]
    out.top[:] = [t + sfx if t in local else t for t in layer.top]
    return out


def multiwidth_net(deploy, levels=LEVELS, graph=None, freeze_bn=True):
    """Deploy NetParameter -> the same net with one tower per level, sharing all
    params by name; tower p masks what the dropped channels feed its consumers.

    The single Input is shared.  Outputs: each tower's output blobs (``fc5``,
    ``fc5@75`` ...).  ``graph``: prune.graph.build_graph(deploy) when known.
    """
    levels, _ = _check_levels(levels, None)
    deploy = superset(deploy)   # the toolkit's schema (base.proto), whatever made the message
    graph = graph or build_graph(deploy)
    inputs = [l for l in deploy.layer if l.type == "Input"]
    if len(inputs) != 1:
        raise TowerError("%s: a deploy net with exactly one Input layer is needed, found %d"
                         % (graph.source, len(inputs)))
    inp = inputs[0]
    trunk = [l for l in deploy.layer if l is not inp]
    local = {t for l in trunk for t in l.top}
    writers = {}
    for i, l in enumerate(trunk):
        for t in l.top:
            writers.setdefault(t, []).append(i)
    order = {l.name: i for i, l in enumerate(trunk)}
    # BN frozen: the Scale layers applied to a BatchNorm's output are frozen with it
    after_bn, last_type = set(), {}
    for l in trunk:
        if l.type == "Scale" and len(l.bottom) == 1 and last_type.get(l.bottom[0]) == "BatchNorm":
            after_bn.add(l.name)
        for t in l.top:
            last_type[t] = l.type

    net = caffe_pb2.NetParameter()
    net.CopyFrom(deploy)
    del net.layer[:]
    net.name = "%s_towers" % (deploy.name or "net")
    net.layer.add().CopyFrom(inp)
    for p in levels:
        sfx = suffix(p)
        after = {}
        for blob, mask in tower_masks(graph, p).items() if p < 1 else ():
            readers = [order[c.layer] for g in graph.prunable() for c in g.consumers if c.bottom == blob]
            first = min(readers)
            where = max(i for i in writers[blob] if i < first)
            after.setdefault(where, []).append((blob, mask))
        for i, layer in enumerate(trunk):
            out = _renamed(layer, sfx, local)
            _share(out, layer.name, _blob_count(layer, graph), freeze_bn and layer.name in after_bn)
            if layer.type == "BatchNorm" and freeze_bn:
                out.batch_norm_param.use_global_stats = True
            net.layer.add().CopyFrom(out)
            for blob, mask in after.get(i, ()):
                net.layer.extend(_mask_layers(blob + sfx, mask))
    return net


def add_heads(net, head, embedding, levels=LEVELS, loss_weights=None):
    """``net`` (from multiwidth_net) + head layers written for the full tower's
    ``embedding`` -> a copy with the head repeated per tower.

    A head layer that (transitively) reads the embedding is repeated with the
    tower's suffix and shared params; the others (label tables, a frozen
    teacher) appear once.  Each tower's loss layers get its weight
    (``loss_weights``, one per level, default 1): their given loss_weight is
    multiplied, a ``*Loss`` layer without one gets the weight itself.
    """
    levels, weights = _check_levels(levels, loss_weights)
    net, head = superset(net), [superset(layer) for layer in head]
    blobs = {t for l in net.layer for t in l.top}
    for p in levels:
        if embedding + suffix(p) not in blobs:
            raise TowerError("embedding blob %r of level %g is not in the net" % (embedding + suffix(p), p))
    tied, plan = {embedding}, []
    for layer in head:
        on = any(b in tied for b in layer.bottom)
        if on:
            tied.update(layer.top)
        plan.append((layer, on))
    if not any(on for _, on in plan):
        raise TowerError("no head layer reads the embedding %r" % embedding)
    out = copy.deepcopy(net)
    for k, (p, w) in enumerate(zip(levels, weights)):
        sfx = suffix(p)
        for layer, on in plan:
            if not on:
                if k == 0:
                    out.layer.add().CopyFrom(layer)
                continue
            copied = _renamed(layer, sfx, tied)
            _share(copied, layer.name, _blob_count(layer), False)
            if len(copied.loss_weight):
                copied.loss_weight[:] = [w * lw for lw in copied.loss_weight]
            elif layer.type.endswith("Loss"):
                copied.loss_weight.append(w)
            out.layer.add().CopyFrom(copied)
    return out


def multiwidth_train_net(deploy, data, head, levels=LEVELS, loss_weights=None, graph=None, freeze_bn=True):
    """Deploy NetParameter + finetune.trainnet ImageList + head (ASoftmax or
    Distill) -> the multi-width train NetParameter: one data layer, one tower
    per level, the head per tower, the losses summed with ``loss_weights``."""
    from finetune.trainnet import train_net
    towers = multiwidth_net(deploy, levels, graph, freeze_bn)
    single = train_net(towers, data, head)
    trunk = {l.name for l in towers.layer}
    last = max(i for i, l in enumerate(single.layer) if l.name in trunk)
    body = copy.deepcopy(single)
    del body.layer[last + 1:]
    return add_heads(body, list(single.layer[last + 1:]), head.embedding, levels, loss_weights)


@cli.entry(PROG)
def main(argv=None):
    ap = cli.parser(PROG, DESCRIPTION)
    ap.add_argument("--model", required=True, help="deploy prototxt of the full-width net (one Input)")
    add_levels(ap, LEVELS)
    ap.add_argument("--keep-bn-trainable", action="store_true",
                    help="do not freeze BatchNorm statistics and the Scale after it (default: frozen, "
                         "as the method's fine-tuning does)")
    ap.add_argument("--out", required=True, help="output prototxt (never the --model file)")
    a = ap.parse_args(argv)
    cli.check_files(model=a.model)
    cli.check_outputs(dict(model=a.model), [a.out])
    deploy = caffe_io.read_net(a.model)
    net = multiwidth_net(deploy, a.levels, build_graph(deploy, source=a.model), freeze_bn=not a.keep_bn_trainable)
    caffe_io.write_net(net, a.out, protect=(a.model,))
    print("%s: %d towers (%s), %d layers" % (a.out, len(a.levels), ", ".join("%g%%" % (100 * p) for p in a.levels),
                                              len(net.layer)))
    return 0


if __name__ == "__main__":
    cli.run(main)
