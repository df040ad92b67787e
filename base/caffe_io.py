"""Caffe files in and out, through the toolkit's caffe_pb2 (base.proto: BVLC's schema plus the common Caffe
forks' fields), without building a net.

Everything in the toolkit that reads or writes a .prototxt or .caffemodel goes
through here:

* ``read_net(path)``        prototxt  -> NetParameter (V1 ``layers`` upgraded)
* ``read_weights(path)``    caffemodel -> {layer name: [ndarray, ...]}
* ``read_model(path)``, ``write_model(net, path)``  a caffemodel's whole
  NetParameter in and out, unchanged (a fork's fields included)
* ``write_net(net, path)``  NetParameter -> prototxt, atomically
* ``write_weights(net, weights, path)``  -> caffemodel, atomically
* ``check_weights(net, weights)``  every learnable layer has blobs of the
  shapes Caffe will ask for, named errors otherwise
* ``open_net(prototxt, weights)``, ``net_from_param(net)``  a caffe.Net, the
  net checked first for what Caffe would abort on (base.netcheck)
* ``probe_nets(nets)``  build nets in a forked child process, the one way to
  learn what else Caffe would abort on without this process dying (a kernel
  larger than its input, Concat of unequal shapes): the child's last glog
  line becomes the error

Writes go to a temporary file in the destination folder and are renamed over
the target only when complete, so a crash never leaves half a model behind,
and ``protect`` refuses to write over a path the caller read from.
"""
import os
import sys
import shutil
import subprocess
import tempfile
from collections import OrderedDict

import numpy as np
from google.protobuf import text_format

from .proto import caffe_pb2

from . import faults, netcheck
from .errors import CaffeFileError


# ------------------------------------------------------------------ writing

def atomic_write(path, data, protect=(), sync=True):
    """Write bytes or text to ``path`` via a temp file + rename.

    ``protect``: paths that must not be overwritten (the inputs of the job).
    ``sync=False`` skips the fsync: still never a half-written file after a
    crashed process, and fast enough for writing many small files (image crops).
    """
    path = os.fspath(path)
    for p in protect:
        if p and os.path.exists(p) and os.path.exists(path) and os.path.samefile(p, path):
            raise CaffeFileError("refusing to overwrite the input file %s" % path)
        if p and os.path.abspath(p) == os.path.abspath(path):
            raise CaffeFileError("refusing to overwrite the input file %s" % path)
    mode = "w" if isinstance(data, str) else "wb"
    fd, tmp = staging_file(path)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)   # mkstemp makes 0600; outputs are ordinary files
    try:
        with os.fdopen(fd, mode) as f:
            f.write(data)
            f.flush()
            if sync:
                os.fsync(f.fileno())
        faults.point("staged", path)
        os.replace(tmp, path)
    except OSError as e:
        _unlink(tmp)
        raise CaffeFileError("cannot write %s: %s" % (path, e.strerror or e)) from None
    except BaseException:
        _unlink(tmp)
        raise
    faults.point("renamed", path)
    return path


def _unlink(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def staging_file(path):
    """(fd, name) of a new temporary file beside ``path``: ``.NAME.PID.XXXXXXXX.tmp``, unique to this process
    (two processes never share one), and recognisably litter once that process is gone (``sweep_litter``)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        return tempfile.mkstemp(prefix=".%s.%d." % (os.path.basename(path), os.getpid()), suffix=TMP_SUFFIX,
                                dir=folder)
    except OSError as e:
        raise CaffeFileError("cannot write %s: %s" % (path, e.strerror or e)) from None


TMP_SUFFIX = ".tmp"


def _litter_pid(name):
    """The writer's pid of a staging file name, 0 for a staging name without one (older versions), else None."""
    if not (name.startswith(".") and name.endswith(TMP_SUFFIX)):
        return None
    parts = name[1:-len(TMP_SUFFIX)].split(".")
    if len(parts) < 2:
        return None
    for part in reversed(parts[:-1]):
        if part.isdigit():
            return int(part)
    return 0


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_litter(folder, recursive=True, unowned=False):
    """Remove staging files left by killed writers under ``folder``: those whose writer process is gone, and
    with ``unowned`` (the caller holds the folder's lock) also those of older versions, whose names carry no
    pid.  A live process's staging files are never touched.  Returns the paths removed."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in filenames:
            pid = _litter_pid(name)
            if pid is None or pid == os.getpid() or (pid == 0 and not unowned) or (pid and _alive(pid)):
                continue
            path = os.path.join(dirpath, name)
            _unlink(path)
            removed.append(path)
        if not recursive:
            break
    return removed


def net_to_text(net):
    return text_format.MessageToString(net)


def write_net(net, path, protect=()):
    """NetParameter -> prototxt (text format)."""
    return atomic_write(path, net_to_text(net), protect)


def write_or_print_net(net, path=None):
    """The generators' output: the prototxt at ``path``, or on stdout without one."""
    if path:
        return write_net(net, path)
    sys.stdout.write(net_to_text(net))


# Protobuf's Python containers copy floats one by one (seconds for a
# SphereFace-20 model).  Blob data is a packed float field, i.e. raw
# little-endian float32 bytes on the wire, so it is written and read here as
# bytes; messages concatenate, and the small fields go through caffe_pb2.
_LAYER_BLOBS, _NET_LAYER, _BLOB_DATA, _BLOB_DOUBLE_DATA = 7, 100, 5, 8


def _varint(n):
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number, payload):
    """A length-delimited field: tag, length, payload."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _read_varint(buf, i):
    shift = n = 0
    while True:
        byte = buf[i]
        n |= (byte & 0x7F) << shift
        i += 1
        if byte < 0x80:
            return n, i
        shift += 7


def _packed_field(buf, number):
    """Concatenated payloads of a packed repeated field in a serialized message."""
    i, parts = 0, []
    while i < len(buf):
        key, i = _read_varint(buf, i)
        wire = key & 7
        if wire == 0:
            _, i = _read_varint(buf, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            length, i = _read_varint(buf, i)
            if key >> 3 == number:
                parts.append(buf[i:i + length])
            i += length
        else:
            raise CaffeFileError("unexpected protobuf wire type %d" % wire)
    return b"".join(parts)


def weights_to_bytes(net, weights):
    """The binary NetParameter Caffe expects, from a net and its arrays.

    Layers appear in the order of ``net``, each with its name, type and blobs
    (modern ``shape`` field); layers without weights are left out, as in
    Caffe's own ``net.save``.
    """
    out = [caffe_pb2.NetParameter(name=net.name).SerializeToString()]
    for layer in net.layer:
        arrays = weights.get(layer.name)
        if not arrays:
            continue
        parts = [caffe_pb2.LayerParameter(name=layer.name, type=layer.type).SerializeToString()]
        for array in arrays:
            shape = np.shape(array)         # before ascontiguousarray, which makes a 0-d array 1-d
            array = np.ascontiguousarray(array, dtype="<f4")
            blob = caffe_pb2.BlobProto()
            blob.shape.SetInParent()        # written even when empty: a 0-d blob (a shared PReLU slope)
            blob.shape.dim.extend(shape)
            parts.append(_field(_LAYER_BLOBS, blob.SerializeToString() + _field(_BLOB_DATA, array.tobytes())))
        out.append(_field(_NET_LAYER, b"".join(parts)))
    return b"".join(out)


def write_weights(net, weights, path, protect=()):
    """Arrays -> .caffemodel (binary NetParameter)."""
    return atomic_write(path, weights_to_bytes(net, weights), protect)


# ------------------------------------------------------------------ reading

def file_sha256(path, chunk=1 << 20):
    """Hex digest of a file's bytes (keys caches and run configs)."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def caffe_tool(name):
    """Path of one of Caffe's command-line tools (caffe, upgrade_net_proto_*)
    of the Caffe that pycaffe was loaded from, else from PATH."""
    import caffe
    here = os.path.dirname(os.path.abspath(caffe.__file__))
    for up in range(1, 6):
        base = os.path.abspath(os.path.join(here, *[".."] * up))
        for sub in ("bin", os.path.join("build", "tools"), "tools"):
            cand = os.path.join(base, sub, name)
            if os.path.isfile(cand) and os.access(cand, os.X_OK):
                return cand
    found = shutil.which(name)
    if found:
        return found
    raise CaffeFileError("Caffe's %s tool was not found beside %s nor on PATH" % (name, here))


def _upgrade(path, binary):
    """Run Caffe's own upgrader on a V1 file; return the upgraded bytes."""
    tool = caffe_tool("upgrade_net_proto_binary" if binary else "upgrade_net_proto_text")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "upgraded")
        run = subprocess.run([tool, path, out], capture_output=True, text=True)
        if run.returncode != 0 or not os.path.exists(out):
            raise CaffeFileError("%s: Caffe's upgrader failed: %s" % (path, run.stderr.strip()[-500:]))
        with open(out, "rb") as f:
            return f.read()


def read_net(path):
    """Parse a prototxt (BVLC's fields and the Caffe forks' of base/caffe_superset.proto); a mistake is
    reported with file, line, column and layer, an unknown field with the fork that defines it when known."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise CaffeFileError("cannot read net definition %s: %s" % (path, e.strerror)) from None
    except UnicodeDecodeError as e:
        raise CaffeFileError("net definition %s is not UTF-8 text (%s)" % (path, e.reason)) from None
    net = caffe_pb2.NetParameter()
    try:
        text_format.Parse(text, net)   # as Caffe: a non-repeated field given twice is an error
    except text_format.ParseError as e:
        raise CaffeFileError(_parse_error(path, text, e)) from None
    if len(net.layers):
        net = caffe_pb2.NetParameter()
        text_format.Merge(_upgrade(path, binary=False).decode("utf-8"), net)
    _modernise_inputs(net)
    return net


def _parse_error(path, text, error):
    """'FILE:LINE:COL: layer 'x' (Type): what', unknown fields named with their fork."""
    import re
    from . import forks, prototext
    line, column = error.GetLine(), error.GetColumn()
    message = re.sub(r"^\d+:\d+ : ", "", str(error)).replace("caffe_superset.", "")
    layer = prototext.layer_at(text, line) if line else None
    where = "%s:%s:%s" % (path, line, column) if line else path
    if layer is not None:
        where += ": layer %r%s" % (layer[0], " (%s)" % layer[1] if layer[1] else "")
    unknown = re.search(r'Message type "(\w+)" has no field named "(\w+)"', message)
    twice = re.search(r'Message type "(\w+)" should not have multiple "(\w+)" fields', message)
    if unknown:
        owner, field = unknown.groups()
        fork = forks.describe_field(field, owner)
        message = "%s has no field %r in BVLC Caffe nor in the Caffe forks this toolkit reads (%s)" % (
            owner, field, "it is a field of %s" % fork if fork else "a misspelling, or a field of another fork?")
    elif twice:
        message = "%s is given twice in one %s (Caffe refuses a non-repeated field given twice)" % (
            twice.group(2), twice.group(1))
    return "%s: %s" % (where, message)


def _modernise_inputs(net):
    """Legacy ``input:``/``input_dim:`` fields -> an Input layer, as Caffe does."""
    if not len(net.input):
        return
    shapes = [list(s.dim) for s in net.input_shape]
    if not shapes and len(net.input_dim):
        dims = list(net.input_dim)
        shapes = [dims[i:i + 4] for i in range(0, len(dims), 4)]
    if len(shapes) not in (1, len(net.input)):
        raise CaffeFileError("net %r: %d inputs but %d input shapes" % (net.name, len(net.input), len(shapes)))
    layer = caffe_pb2.LayerParameter(name="input", type="Input")
    for i, name in enumerate(net.input):
        layer.top.append(name)
        layer.input_param.shape.add().dim.extend(shapes[min(i, len(shapes) - 1)])
    layers = [layer] + list(net.layer)
    del net.layer[:]
    net.layer.extend(layers)
    del net.input[:]
    del net.input_shape[:]
    del net.input_dim[:]


def blob_array(blob_proto):
    """BlobProto -> float32 array; legacy num/channels/height/width honoured."""
    if blob_proto.HasField("shape"):
        shape = tuple(blob_proto.shape.dim)
    else:
        shape = (blob_proto.num, blob_proto.channels, blob_proto.height, blob_proto.width)
    if len(blob_proto.double_data):
        array = np.asarray(blob_proto.double_data, dtype=np.float32)
    else:
        raw = _packed_field(blob_proto.SerializeToString(), _BLOB_DATA)
        array = np.frombuffer(raw, dtype="<f4").astype(np.float32)
        if array.size != len(blob_proto.data):   # written unpacked by some old tool
            array = np.asarray(blob_proto.data, dtype=np.float32)
    if array.size != int(np.prod(shape)):
        raise CaffeFileError("blob of shape %s holds %d values" % (shape, array.size))
    return array.reshape(shape)


def read_weights(path):
    """Read a .caffemodel into an ordered {layer name: [arrays]}.

    Layers without blobs are left out. V1 models are upgraded by Caffe's tool.
    """
    path = os.fspath(path)
    net = read_model(path)
    if len(net.layers):
        net = caffe_pb2.NetParameter.FromString(_upgrade(path, binary=True))
    weights = OrderedDict()
    for layer in net.layer:
        if len(layer.blobs):
            try:
                weights[layer.name] = [blob_array(b) for b in layer.blobs]
            except CaffeFileError as e:
                raise CaffeFileError("%s, layer %r: %s" % (path, layer.name, e)) from None
    return weights


def read_model(path):
    """A .caffemodel as its whole binary NetParameter, in the superset schema: the Caffe forks' fields are
    decoded, and the bytes of any field neither BVLC nor those forks define are kept as they are."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CaffeFileError("cannot read weights %s: %s" % (path, e.strerror)) from None
    net = caffe_pb2.NetParameter()
    try:
        net.ParseFromString(data)
    except Exception as e:  # DecodeError and friends
        raise CaffeFileError("%s is not a Caffe binary model (%s)" % (path, e)) from None
    return net


def write_model(net, path, protect=()):
    """A whole binary NetParameter -> .caffemodel, atomically; of a model read by ``read_model`` and left
    unchanged, the very bytes it was read from."""
    return atomic_write(path, net.SerializeToString(), protect)


def legacy_equal(stored, wanted):
    """Caffe accepts a legacy 4-D blob when its shape is `wanted` padded with 1s."""
    s, w = tuple(stored), tuple(wanted)
    if s == w:
        return True
    return len(s) == 4 and len(w) <= 4 and s == (1,) * (4 - len(w)) + w


def check_weights(caffe_net, weights, source="weights", complete=False):
    """Compare arrays against the blobs of an instantiated caffe.Net.

    Raises CaffeFileError naming the layer and both shapes, which is what a
    user needs when a caffemodel does not belong to a prototxt; with
    ``complete`` also when a layer with parameters has no arrays at all (it
    would keep its filler's values).  Arrays stored in legacy 4-D form are
    reshaped to the net's shapes in place.
    """
    missing = [name for name in caffe_net.params if name not in weights]
    if complete and missing:
        raise CaffeFileError("%s has no weights for layer%s %s of the net (a caffemodel of another net, or cut short?)"
                             % (source, "s" if len(missing) > 1 else "", ", ".join(repr(m) for m in missing[:5])
                                + (" and %d more" % (len(missing) - 5) if len(missing) > 5 else "")))
    for name, blobs in caffe_net.params.items():
        if name not in weights:
            continue
        arrays = weights[name]
        if len(arrays) != len(blobs):
            raise CaffeFileError("%s: layer %r has %d blobs, the net expects %d"
                                 % (source, name, len(arrays), len(blobs)))
        for i, (a, b) in enumerate(zip(arrays, blobs)):
            if not legacy_equal(a.shape, b.data.shape):
                raise CaffeFileError("%s: layer %r blob %d has shape %s, the net expects %s"
                                     % (source, name, i, tuple(a.shape), tuple(b.data.shape)))
            arrays[i] = a.reshape(b.data.shape)


def load_into(caffe_net, weights, source="weights", complete=False):
    """Copy arrays into a caffe.Net by layer name (after check_weights; ``complete``: every layer's)."""
    check_weights(caffe_net, weights, source, complete)
    for name, blobs in caffe_net.params.items():
        for b, a in zip(blobs, weights.get(name, ())):
            b.data[...] = a


def open_net(prototxt, weights=None, phase="test"):
    """caffe.Net from a prototxt (+ optional caffemodel, which must hold every layer's weights) with named errors.

    The prototxt is parsed and checked here first (base.netcheck) so a syntax
    error, an unknown layer type or a broken blob graph names file and layer
    rather than surfacing as a glog abort inside Caffe.
    """
    import caffe
    netcheck.check_net(read_net(prototxt), os.fspath(prototxt), _phase(phase))
    net = caffe.Net(os.fspath(prototxt), _phase(phase))
    if weights is not None:
        arrays = read_weights(weights) if isinstance(weights, (str, os.PathLike)) else weights
        load_into(net, arrays, source=os.fspath(weights) if isinstance(weights, (str, os.PathLike)) else "weights",
                  complete=True)
    return net


def _phase(phase):
    return caffe_pb2.TEST if phase == "test" else caffe_pb2.TRAIN


def net_from_param(net, phase="test"):
    """caffe.Net of a NetParameter held in memory (through a temporary prototxt, as pycaffe needs a file)."""
    import caffe
    netcheck.check_net(net, "net %r" % net.name, _phase(phase))
    with tempfile.TemporaryDirectory() as tmp:
        path = write_net(net, os.path.join(tmp, "net.prototxt"))
        return caffe.Net(path, _phase(phase))


def runnable_net(net, weights=None, source="weights", phase="test"):
    """caffe.Net of the part of ``net`` (a NetParameter) this Caffe build runs -- all of a BVLC net; of a
    Caffe fork's net every layer but the fork's own and those reading what they make
    (netcheck.runnable_view) -- with ``weights`` loaded when given (every layer of that part must have its
    arrays; those of the layers left out are not looked at)."""
    cnet = net_from_param(netcheck.runnable_view(net, _phase(phase))[0], phase)
    if weights is not None:
        load_into(cnet, weights, source, complete=True)
    return cnet


# ------------------------------------------------------------------ building in a child process

def glog_failure(stderr):
    """The reason in a Caffe process's last words: its 'Check failed' / fatal glog line, else the last line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        if line[:1] == "F" and "] " in line:
            return line.split("] ", 1)[1]
    return lines[-1] if lines else "no message"


def _build_in_child(path, phase, copies=1, batch=None):
    """Build one net in a forked child (the parent's Caffe, nothing re-imported); (exit status: 0 built, 4 built
    with a ``blob_problem``, else failed; its stderr)."""
    import caffe
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:   # the child: its stderr into the pipe, then the net, then out without any clean-up
        try:
            os.close(read)
            os.dup2(write, 2)
            caffe.set_mode_cpu()   # no CUDA in a forked child
            problem = netcheck.blob_problem(caffe.Net(path, caffe.TEST if phase == "test" else caffe.TRAIN), copies, batch)
            if problem:
                os.write(2, problem.encode() + b"\n")
            code = 4 if problem else 0
        except BaseException:
            code = 3
        os._exit(code)
    os.close(write)
    chunks = []
    while True:
        chunk = os.read(read, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(read)
    _, status = os.waitpid(pid, 0)
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1, b"".join(chunks).decode(errors="replace")


def probe_nets(nets, copies=1, batch=None):
    """Build every (label, path or NetParameter, phase) once where a failure cannot hurt: in a forked child
    process.  A net Caffe cannot build, or would abort on at its first forward (``blob_problem``), raises
    CaffeFileError naming its label and the reason (``copies``, ``batch``: see blob_problem)."""
    for label, net, phase in nets:   # what can be named precisely is, in this process
        netcheck.check_net(read_net(net) if isinstance(net, (str, os.PathLike)) else net, label, _phase(phase))
    with tempfile.TemporaryDirectory(prefix="probe-") as tmp:
        for i, (label, net, phase) in enumerate(nets):
            path = net if isinstance(net, (str, os.PathLike)) else write_net(net, os.path.join(tmp, "%d.prototxt" % i))
            status, stderr = _build_in_child(os.fspath(path), phase, copies, batch)
            if status == 4:
                raise CaffeFileError("%s: %s" % (label, glog_failure(stderr)))
            if status != 0:
                raise CaffeFileError("%s: Caffe cannot build this net: %s" % (label, glog_failure(stderr)))
