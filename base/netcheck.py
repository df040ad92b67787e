"""What Caffe would abort on, found before a net is handed to it.

Caffe answers a net it cannot build with a glog ``Check failed`` and
``abort()`` (exit status 134, no Python exception to catch).  ``check_net``
looks at a NetParameter in the phase Caffe will build and raises a
``CaffeFileError`` naming the file and the layer instead:

* a layer type this Caffe build does not have (a fork's layer, named with
  its fork when base.forks knows it), or a Python layer whose module cannot
  be found;
* a field of a Caffe fork (base/caffe_superset.proto reads them, Caffe's own
  parser refuses the whole prototxt), named with its fork;
* a bottom no earlier layer produces (a misspelt blob, or a loop: a layer
  reading what a later one writes), a top produced by two layers;
* a layer that may not run in place writing over its input (a Convolution
  whose top is its bottom computes garbage, Reshape/Flatten abort);
* two layers of one name (weights are stored by layer name);
* an Input without a shape; a data layer whose source file is missing or
  whose image list is empty or names a missing first image.

What no look at the NetParameter finds (a kernel larger than its input, Concat
of unequal shapes), ``base.caffe_io.probe_nets`` learns by building the net
in a child process.
``phase_view`` is Caffe's own layer filter (phase, level, stage rules);
``runnable_view`` the part of a fork's net this Caffe build can run (what
the toolkit checks in Caffe when the whole net cannot be).
"""
import os

from . import forks
from .errors import CaffeFileError
from .proto import caffe_pb2, superset

# Types whose output may overwrite their input (element-wise layers and what BVLC runs in place).
IN_PLACE = frozenset(("ReLU", "PReLU", "ELU", "Sigmoid", "TanH", "AbsVal", "BNLL", "Power", "Exp", "Log", "Threshold",
                      "Dropout", "BatchNorm", "Scale", "Bias", "Clip", "Swish", "Softmax"))
DATA_SOURCES = {"ImageData": "image_data_param", "Data": "data_param", "HDF5Data": "hdf5_data_param",
                "WindowData": "window_data_param"}


def _meets(rule, state):
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    if any(s not in state.stage for s in rule.stage):
        return False
    return not any(s in state.stage for s in rule.not_stage)


def phase_view(net, phase=caffe_pb2.TEST):
    """(layers Caffe instantiates in ``phase``, layers it leaves out), as Caffe's FilterNet."""
    state = caffe_pb2.NetState(phase=phase, level=net.state.level, stage=list(net.state.stage))
    kept, dropped = [], []
    for layer in net.layer:
        if len(layer.include):
            on = any(_meets(r, state) for r in layer.include)
        else:
            on = not any(_meets(r, state) for r in layer.exclude)
        (kept if on else dropped).append(layer)
    return kept, dropped


def known_types():
    import caffe
    return frozenset(caffe.layer_type_list())


def _check_type(layer, known, source):
    if layer.type not in known:
        raise CaffeFileError("%s: layer %r has type %r, which this Caffe build does not have (%s)"
                     % (source, layer.name, layer.type, forks.describe_type(layer.type) or "a layer of a Caffe fork?"))
    if layer.type == "Python":
        import importlib.util
        module = layer.python_param.module
        try:
            found = bool(module) and importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found or not layer.python_param.layer:
            raise CaffeFileError("%s: Python layer %r: module %r (layer %r) cannot be found on the Python path"
                         % (source, layer.name, module, layer.python_param.layer))


def _check_blobs(layer, blobs, producer, source):
    """Bottoms defined before use; tops new, or in place (top i == bottom i) where the type allows it."""
    for bottom in layer.bottom:
        if bottom not in blobs:
            raise CaffeFileError("%s: layer %r reads blob %r, which no earlier layer produces (a misspelt name, "
                                 "or a loop through a later layer)" % (source, layer.name, bottom))
    for i, top in enumerate(layer.top):
        in_place = i < len(layer.bottom) and layer.bottom[i] == top
        if in_place and layer.type not in IN_PLACE and layer.type in known_types() and layer.type != "Python":
            raise CaffeFileError("%s: layer %r (%s) writes its output over its input blob %r (in place); only "
                                 "element-wise layers (ReLU, PReLU, BatchNorm, Scale, ...) may run in place"
                                 % (source, layer.name, layer.type, top))
        if top in blobs and not in_place:
            raise CaffeFileError("%s: blob %r is produced by two layers, %r and %r"
                                 % (source, top, producer[top], layer.name))
        blobs.add(top)
        producer.setdefault(top, layer.name)


def _check_source(layer, source):
    field = DATA_SOURCES.get(layer.type)
    if field is None:
        return
    param = getattr(layer, field)
    path = param.source
    if layer.type == "ImageData":
        _check_image_list(layer, path, param.root_folder, source)
    elif not path or not os.path.exists(path):
        raise CaffeFileError("%s: data layer %r reads %r, which does not exist" % (source, layer.name, path))


def _check_image_list(layer, path, root, source):
    """Caffe's ImageData reads the whole list at set-up and the first image at once."""
    try:
        with open(path, encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), None)
    except (OSError, UnicodeDecodeError) as e:
        raise CaffeFileError("%s: data layer %r reads image list %r: %s" % (source, layer.name, path,
                                                                    getattr(e, "strerror", None) or e)) from None
    if first is None:
        raise CaffeFileError("%s: data layer %r: image list %s is empty" % (source, layer.name, path))
    image = root + first.rstrip().rpartition(" ")[0]
    if not os.path.isfile(image):
        raise CaffeFileError("%s: data layer %r: the first image of %s, %s, does not exist"
                             % (source, layer.name, path, image))


# What BVLC Caffe offers instead of a fork field, where it has the same thing.
FORK_FIELD_HINTS = {
    "pooling_param.ceil_mode": "BVLC Caffe spells it pooling_param { round_mode: CEIL } (ceil_mode: true, the "
                               "default of both) or FLOOR (ceil_mode: false)",
}


def fork_field_error(layer, source):
    """The error for a layer setting a fork's field (Caffe's parser refuses the whole prototxt), or None."""
    found = forks.fork_fields(superset(layer))
    if not found:
        return None
    field, fork = found[0]
    hint = FORK_FIELD_HINTS.get(field)
    return CaffeFileError("%s: layer %r (%s) sets %s, a field of %s that this Caffe build does not read: its parser "
                  "refuses the prototxt%s" % (source, layer.name, layer.type, field, forks.fork_name(fork),
                                              "; " + hint if hint else ""))


def check_net(net, source="net", phase=caffe_pb2.TEST, types=True):
    """Raise CaffeFileError (naming ``source`` and the layer) for what Caffe would abort on; see the module doc.
    ``types=False``: all but the layer types and fork fields (for a net whose fork layers are set aside)."""
    for layer in net.layer if types else ():   # Caffe parses every layer's fields, whatever its phase
        error = fork_field_error(layer, source)
        if error is not None:
            raise error
    layers, _ = phase_view(net, phase)
    known = known_types()
    blobs, producer, names = set(), {}, {}
    for layer in layers:
        if layer.name in names:
            raise CaffeFileError("%s: two layers are named %r (weights are stored by layer name)"
                                 % (source, layer.name))
        names[layer.name] = layer
        if types:
            _check_type(layer, known, source)
        if layer.type == "Input" and len(layer.input_param.shape) == 0:
            raise CaffeFileError("%s: Input layer %r has no shape" % (source, layer.name))
        for shape in layer.input_param.shape if layer.type == "Input" else ():
            if not all(d >= 1 for d in shape.dim):   # Caffe builds a 0, then aborts at the blob's first use
                raise CaffeFileError("%s: Input layer %r has shape %s: every dimension must be 1 or more"
                             % (source, layer.name, " x ".join(str(d) for d in shape.dim)))
        _check_source(layer, source)
        _check_blobs(layer, blobs, producer, source)
    if not layers:
        raise CaffeFileError("%s: the net has no layers in the %s phase" % (source, "TEST" if phase == caffe_pb2.TEST
                                                                     else "TRAIN"))
    return net


def runnable_view(net, phase=caffe_pb2.TEST):
    """(view, left out): the ``phase`` layers of ``net`` that this Caffe build can run -- every layer but those
    of a type it lacks or setting a fork's field, and those reading what a left-out layer makes -- and
    [(layer, why)] of the layers left out.  What BVLC can run the same is translated: pooling ceil_mode into
    round_mode, the forks' depthwise types into a Convolution with group = num_output (the same blobs; a
    depthwise layer with a channel multiplier must set its group).
    The view's dangling blobs are its outputs."""
    known = known_types()
    view = caffe_pb2.NetParameter()
    view.CopyFrom(superset(net))
    layers, _ = phase_view(view, phase)
    kept, left, tainted = [], [], set()
    for original in layers:
        layer = caffe_pb2.LayerParameter()
        layer.CopyFrom(original)
        if layer.pooling_param.HasField("ceil_mode"):
            p = layer.pooling_param
            p.round_mode = caffe_pb2.PoolingParameter.CEIL if p.ceil_mode else caffe_pb2.PoolingParameter.FLOOR
            p.ClearField("ceil_mode")
        if layer.type in forks.DEPTHWISE_TYPES:   # the forks' fast kernels of a Convolution with group = channels
            layer.type = "Convolution"
            if not layer.convolution_param.HasField("group"):
                layer.convolution_param.group = layer.convolution_param.num_output
        fields = forks.fork_fields(layer)
        why = None
        if layer.type not in known:
            why = "type %s (%s) is not in this Caffe build" % (
                layer.type, forks.describe_type(layer.type) or "a Caffe fork's layer?")
        elif fields:
            why = "sets %s, a field of %s" % (fields[0][0], forks.fork_name(fields[0][1]))
        elif tainted & set(layer.bottom):
            why = _TAINTED + "%s, made by a layer left out" % ", ".join(sorted(tainted & set(layer.bottom)))
        if why is None:
            kept.append(layer)
        else:
            left.append((layer.name, why))
            tainted.update(layer.top)
    del view.layer[:]
    view.layer.extend(kept)
    return view, left


def causes(left):
    """Of runnable_view's [(layer, why)], those set aside for themselves (a type or field this build lacks),
    not for reading what another set-aside layer makes."""
    return [(name, why) for name, why in left if not why.startswith(_TAINTED)]


_TAINTED = "reads "


def blob_problem(net, copies=1, batch=None):
    """What a built net would abort on when run, or None: a blob with a zero dimension (Caffe builds it, then
    aborts at its first use), or blobs larger than the memory free here (``copies`` of each: 2 in training,
    which keeps the gradients; ``batch``: the net was built for one image, it will run this many); Caffe
    allocates them at the first forward and dies there."""
    for name, blob in net.blobs.items():
        if 0 in blob.shape:
            return "blob %r has shape %s: a zero dimension (Caffe aborts when it is used)" % (
                name, " x ".join(str(d) for d in blob.shape))
    need = 4 * copies * ((batch or 1) * sum(b.count for b in net.blobs.values()) +
                         sum(p.count for params in net.params.values() for p in params))
    free = available_memory()
    if free is not None and need > free:
        return "its blobs need about %.1f GB %s, more than the %.1f GB of memory free here (lower the batch or " \
               "the input size)" % (need / 1e9, "at a batch of %d" % batch if batch else "at this input shape",
                                    free / 1e9)
    return None


def available_memory():
    """Bytes of memory free for a new allocation (MemAvailable), or None where /proc/meminfo is not."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
