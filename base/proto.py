"""The toolkit's ``caffe_pb2``: BVLC Caffe's messages plus the fields of the common Caffe forks.

    from base.proto import caffe_pb2        # instead of pycaffe's caffe.proto.caffe_pb2

``base/caffe_superset.proto`` is BVLC's ``caffe.proto`` with every BVLC field
at its BVLC number, plus the fields and messages of the Caffe forks that
most face and detection models in the wild come from (SphereFace, SSD,
ShuffleNet, pooling ``ceil_mode``, Interp; ``base.forks`` lists them) at the
forks' own field numbers.  ``scripts/setup.sh`` compiles it with protoc into
the virtual environment.  The toolkit's own file I/O (``base.caffe_io``)
reads and writes through it, so a fork's prototxt parses and is written back
unchanged; Caffe itself still parses with its stock schema, and
``base.netcheck`` names the fork layers and fields a net holds before Caffe
sees it.

* ``caffe_pb2``      the superset module (package ``caffe_superset``)
* ``stock_pb2``      pycaffe's own ``caffe_pb2``
* ``superset(msg)``  a message of either schema as the superset's (converted through its bytes)
* ``is_superset(msg)``
"""
import hashlib
import os

PROTO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "caffe_superset.proto")
MODULE = "caffe_superset_pb2"      # what scripts/setup.sh writes into the venv's site-packages
STAMP = "caffe_superset.sha256"   # beside it: the sha256 of the .proto it was compiled from


class ProtoSetupError(ImportError):
    """The superset schema is not compiled, or was compiled from another version of the .proto."""


def _load():
    import importlib
    try:
        module = importlib.import_module(MODULE)
    except ImportError:
        raise ProtoSetupError("the toolkit's caffe.proto superset (base/caffe_superset.proto) is not compiled: "
                              "run scripts/setup.sh (it compiles it with protoc)") from None
    stamp = os.path.join(os.path.dirname(os.path.abspath(module.__file__)), STAMP)
    try:
        with open(stamp) as f:
            compiled = f.read().strip()
    except OSError:
        compiled = None
    with open(PROTO, "rb") as f:
        current = hashlib.sha256(f.read()).hexdigest()
    if compiled != current:
        raise ProtoSetupError("base/caffe_superset.proto changed since scripts/setup.sh compiled it (%s): run "
                              "scripts/setup.sh again" % module.__file__)
    return module


caffe_pb2 = _load()


def stock():
    """pycaffe's own caffe_pb2 (imported on first use: it loads Caffe)."""
    from caffe.proto import caffe_pb2 as stock_pb2
    return stock_pb2


def is_superset(message):
    return message.DESCRIPTOR.file is caffe_pb2.DESCRIPTOR


def superset(message):
    """``message`` as a message of the superset schema: itself when it is one, else a converted copy (stock
    messages, e.g. from pycaffe's NetSpec, carry the same names and numbers)."""
    if is_superset(message):
        return message
    cls = getattr(caffe_pb2, message.DESCRIPTOR.name)
    return cls.FromString(message.SerializeToString())
