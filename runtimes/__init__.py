"""The runtimes a pruned Caffe net is dropped into, behind one small interface.

* ``caffe``: pycaffe itself (the reference);
* ``opencv``: OpenCV's DNN module (``cv2.dnn.readNetFromCaffe``), with layer
  fusion on, as deployments run it; ``opencv-nofusion``: fusion off, which
  computes what Caffe computes to float precision (BRIEF.md);
* ``mnn``: Alibaba's MNN, the model converted by its own Caffe converter
  (``mnnconvert -f CAFFE``, here the converter's library called in a child
  process, see ``convert_mnn``) and run by ``MNN.Interpreter`` with its
  defaults, as deployed; ``mnn-nowinograd``: the same with its Winograd
  convolutions off (session hint WINOGRAD_MEMORY_LEVEL 0: direct
  convolution).  MNN's default picks large Winograd tiles for 3x3 convs,
  which drift from Caffe's output by ~1e-4 relative on SphereFace-20
  (measured); with Winograd off it matches to ~1e-6;
* ``onnxruntime``, ``openvino``: ONNX Runtime (its default graph
  optimisations) and OpenVINO's CPU plugin (fp32 inference precision) on
  the ONNX model that ``prune.export`` writes of the Caffe net: the
  runtimes that no longer read Caffe, and what they run is that file.

``missing(kind)`` says why a runtime cannot run here (not installed, too new)
or None; ``open_session(kind, prototxt, caffemodel, workdir)`` gives a
``Session`` whose ``run(x)`` returns the net's output for one input batch and
whose ``forward()`` repeats the last run (what the timings call).  Every
runtime runs on ``threads`` threads (``pinned``), so their latencies compare.
``median_ms`` times sessions side by side, ``forward_ms`` Caffe's ms per
image of several nets at several batch sizes.
"""
import contextlib
import json
import os
import re
import subprocess
import sys
import time

import numpy as np

from base import caffe_io
from base.errors import ToolkitError

KINDS = ("caffe", "opencv-nofusion", "opencv", "mnn-nowinograd", "mnn", "onnxruntime", "openvino")
# compute what Caffe computes, to float precision
EXACT = ("caffe", "opencv-nofusion", "mnn-nowinograd", "onnxruntime", "openvino")
ONNX_KINDS = ("onnxruntime", "openvino")        # run the ONNX export of the net
LATENCY_KINDS = ("caffe", "opencv", "mnn")      # what --runtime takes: each as deployed (fusion, Winograd on)
LABELS = {"caffe": "Caffe", "opencv-nofusion": "OpenCV DNN (fusion off)", "opencv": "OpenCV DNN (fused)",
          "mnn-nowinograd": "MNN (Winograd off)", "mnn": "MNN", "onnxruntime": "ONNX Runtime (ONNX)",
          "openvino": "OpenVINO CPU (ONNX)"}
WINOGRAD_MEMORY_LEVEL = 3       # MNN's Interpreter::HintMode number of that hint


class RuntimeFailure(ToolkitError):
    """A net a runtime cannot load or convert (named runtime and file)."""


def version(kind):
    """The runtime's version string (None when it is missing)."""
    if missing(kind):
        return None
    if kind == "caffe":
        import caffe
        return getattr(caffe, "__version__", "BVLC")
    if kind.startswith("opencv"):
        import cv2
        return cv2.__version__
    if kind == "onnxruntime":
        import onnxruntime
        return onnxruntime.__version__
    if kind == "openvino":
        import openvino
        return openvino.__version__.split("-")[0]
    return import_mnn().version()


def missing(kind):
    """Why ``kind`` cannot run here, or None when it can."""
    if kind == "caffe":
        return None
    if kind.startswith("opencv"):
        try:
            import cv2
        except ImportError:
            return "OpenCV is not installed (pip install 'opencv-python-headless<5', in requirements.txt)"
        if not hasattr(cv2, "dnn") or not hasattr(cv2.dnn, "readNetFromCaffe"):
            return "OpenCV %s has no cv2.dnn.readNetFromCaffe (OpenCV 5 removed it; use <5)" % cv2.__version__
        return None
    if kind.startswith("mnn"):
        try:
            import_mnn()
            with quiet_stdout():
                import _tools  # noqa: F401  (the converter's library, shipped in the MNN wheel)
        except ImportError:
            return "MNN is not installed (pip install MNN, in requirements.txt)"
        return None
    if kind in ONNX_KINDS:
        module = {"onnxruntime": "onnxruntime", "openvino": "openvino"}[kind]
        for name in ("onnx", module):
            try:
                __import__(name)
            except ImportError:
                return "%s is not installed (pip install %s, in requirements.txt)" % (name, name)
        return None
    raise ValueError("unknown runtime %r (one of %s)" % (kind, ", ".join(KINDS)))


@contextlib.contextmanager
def quiet_stdout():
    """File descriptor 1 to /dev/null inside the block: MNN's library prints notes on the C stdout (on import,
    on every session) that would land in the middle of a command's output."""
    sys.stdout.flush()
    saved = os.dup(1)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)


def import_mnn():
    """The MNN module, imported quietly."""
    with quiet_stdout():
        import MNN
    return MNN


@contextlib.contextmanager
def pinned(threads=1):
    """Caffe's BLAS and OpenCV run on ``threads`` threads inside the block (MNN takes it per session)."""
    from threadpoolctl import threadpool_limits
    cv2 = None
    if missing("opencv") is None:
        import cv2
        before = cv2.getNumThreads()
        cv2.setNumThreads(threads)
    try:
        with threadpool_limits(threads):
            yield
    finally:
        if cv2 is not None:
            cv2.setNumThreads(before)


# The converter library prints its progress on the C stdout; run in a child so that a model it cannot
# convert (it may abort) is one error here, and so that its output stays out of ours.  The wheel's own
# `mnnconvert` script is not used: after converting it tries to install and call a usage-reporting client.
_CONVERT = r"""
import json, os, sys
import _tools
failed = []
for proto, model, out in json.load(sys.stdin):
    ok = _tools.mnnconvert(["mnnconvert", "-f", "CAFFE", "--modelFile", model, "--prototxt", proto,
                            "--MNNModel", out, "--bizCode", "sphereface-prune"])
    if not ok or not os.path.exists(out):
        failed.append(proto)
print(json.dumps(failed), file=sys.stderr)
"""


def convert_mnn(jobs, timeout=600):
    """Convert [(prototxt, caffemodel, out.mnn)] with MNN's Caffe converter, in one child process."""
    if not jobs:
        return
    done = subprocess.run([sys.executable, "-c", _CONVERT], input=json.dumps([list(j) for j in jobs]),
                          capture_output=True, text=True, timeout=timeout)
    lines = done.stderr.strip().splitlines()
    try:
        failed = json.loads(lines[-1]) if lines else None
    except ValueError:
        failed = None
    if done.returncode != 0 or failed is None:
        raise RuntimeFailure("MNN's converter stopped (exit %d) on %s: %s" % (
            done.returncode, jobs[0][0], (lines[-1] if lines else done.stdout.strip().splitlines()[-1:]) or "?"))
    if failed:
        raise RuntimeFailure("MNN's converter could not convert %s" % ", ".join(failed))


class Session:
    """A loaded net in one runtime: ``run(x)`` -> output array; ``forward()`` runs again on the same input."""

    kind = None

    def run(self, x):
        raise NotImplementedError

    def forward(self):
        raise NotImplementedError


class CaffeSession(Session):
    kind = "caffe"

    def __init__(self, proto, model):
        self.net = caffe_io.open_net(proto, model)
        if len(self.net.outputs) != 1:
            raise RuntimeFailure("%s has %d outputs (%s); the runtimes are compared on a net's single output"
                                % (proto, len(self.net.outputs), ", ".join(self.net.outputs)))
        self.input, self.output = self.net.inputs[0], self.net.outputs[0]

    def input_shape(self):
        return tuple(self.net.blobs[self.input].data.shape)

    def run(self, x):
        self.net.blobs[self.input].reshape(*x.shape)
        self.net.reshape()
        self.net.blobs[self.input].data[...] = x
        return self.forward().copy()

    def forward(self):
        self.net.forward()
        return self.net.blobs[self.output].data


class OpenCVSession(Session):
    def __init__(self, proto, model, fusion):
        import cv2
        self.kind = "opencv" if fusion else "opencv-nofusion"
        try:
            self.net = cv2.dnn.readNetFromCaffe(proto, model)
        except cv2.error as e:
            raise RuntimeFailure("OpenCV DNN cannot read %s: %s" % (proto, opencv_message(e))) from None
        self.proto = proto
        self.net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
        self.net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
        self.net.enableFusion(fusion)

    def run(self, x):
        import cv2
        self.net.setInput(np.ascontiguousarray(x, dtype=np.float32))
        try:   # OpenCV creates the layers at the first forward: a type it lacks fails here, not when read
            return np.array(self.forward())
        except cv2.error as e:
            raise RuntimeFailure("OpenCV DNN cannot run %s: %s" % (self.proto, opencv_message(e))) from None

    def forward(self):
        return self.net.forward()       # the final output (forward(name) would stop before in-place layers)


def opencv_message(e):
    """The message of a cv2.error without its version, source file and error code."""
    text = str(e).strip().splitlines()[-1]
    return re.sub(r"^OpenCV\([^)]*\) \S+: error: \([^)]*\) ", "", text)


class MNNSession(Session):
    def __init__(self, path, threads=1, winograd=True):
        self.kind = "mnn" if winograd else "mnn-nowinograd"
        self.mnn = import_mnn()
        with quiet_stdout():
            self.interpreter = self.mnn.Interpreter(path)
            if not winograd:
                self.interpreter.setSessionHint(WINOGRAD_MEMORY_LEVEL, 0)
            self.session = self.interpreter.createSession({"backend": "CPU", "numThread": threads,
                                                           "precision": "high"})
        self.input = self.interpreter.getSessionInput(self.session)
        self.shape = None

    def run(self, x):
        m, x = self.mnn, np.ascontiguousarray(x, dtype=np.float32)
        if self.shape != x.shape:
            with quiet_stdout():
                self.interpreter.resizeTensor(self.input, x.shape)
                self.interpreter.resizeSession(self.session)
            self.shape = x.shape
        self.input.copyFrom(m.Tensor(x.shape, m.Halide_Type_Float, x, m.Tensor_DimensionType_Caffe))
        self.forward()
        out = self.interpreter.getSessionOutput(self.session)
        shape = tuple(out.getShape())
        host = m.Tensor(shape, m.Halide_Type_Float, np.zeros(shape, np.float32), m.Tensor_DimensionType_Caffe)
        out.copyToHostTensor(host)
        return np.array(host.getNumpyData() if hasattr(host, "getNumpyData") else host.getData(),
                        dtype=np.float32).reshape(shape)

    def forward(self):
        self.interpreter.runSession(self.session)


class ONNXRuntimeSession(Session):
    kind = "onnxruntime"

    def __init__(self, model, threads=1):
        """``model``: an .onnx path or an onnx ModelProto."""
        import onnxruntime
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.log_severity_level = 3
        source = model if isinstance(model, str) else model.SerializeToString()
        self.session = onnxruntime.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def run(self, x):
        self.feed = {self.input: np.ascontiguousarray(x, dtype=np.float32)}
        return np.array(self.forward())

    def forward(self):
        return self.session.run(None, self.feed)[0]


class OpenVINOSession(Session):
    """OpenVINO's CPU plugin in fp32 (its default on some CPUs is bf16), compiled for each input shape."""
    kind = "openvino"

    def __init__(self, path, threads=1):
        import openvino
        self.core, self.threads = openvino.Core(), threads
        self.model = self.core.read_model(path)
        self.shape = self.request = None

    def run(self, x):
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.shape != x.shape:
            self.model.reshape({self.model.inputs[0].any_name: list(x.shape)})
            compiled = self.core.compile_model(self.model, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                                   "INFERENCE_NUM_THREADS": self.threads})
            self.request, self.shape = compiled.create_infer_request(), x.shape
        self.x = x
        return np.array(self.forward())

    def forward(self):
        self.request.infer({0: self.x})
        return self.request.get_output_tensor(0).data


def export_onnx(jobs):
    """Write [(prototxt, caffemodel, out.onnx)] with runtimes.onnx_export; a net it cannot export is a
    RuntimeFailure."""
    from runtimes.onnx_export import ExportError, export
    for proto, model, out in jobs:
        try:
            caffe_io.atomic_write(out, export(proto, model).SerializeToString(), sync=False)
        except ExportError as e:
            raise RuntimeFailure("no ONNX export of %s: %s" % (proto, e)) from None


def open_sessions(kinds, nets, workdir, threads=1):
    """{(kind, name): Session} for every runtime of ``kinds`` and every net of ``nets`` = {name: (prototxt,
    caffemodel)}; MNN models are converted into ``workdir`` first (one child process for all of them; the
    keys of ``nets`` name their files there)."""
    if any(k.startswith("mnn") for k in kinds):
        jobs = [(p, m, os.path.join(workdir, "%s.mnn" % name)) for name, (p, m) in nets.items()
                if not os.path.exists(os.path.join(workdir, "%s.mnn" % name))]
        convert_mnn(jobs)
    if any(k in ONNX_KINDS for k in kinds):
        export_onnx([(p, m, os.path.join(workdir, "%s.onnx" % name)) for name, (p, m) in nets.items()
                     if not os.path.exists(os.path.join(workdir, "%s.onnx" % name))])
    sessions = {}
    for kind in kinds:
        for name, (proto, model) in nets.items():
            if kind == "caffe":
                sessions[kind, name] = CaffeSession(proto, model)
            elif kind.startswith("opencv"):
                sessions[kind, name] = OpenCVSession(proto, model, fusion=kind == "opencv")
            elif kind == "onnxruntime":
                sessions[kind, name] = ONNXRuntimeSession(os.path.join(workdir, "%s.onnx" % name), threads)
            elif kind == "openvino":
                sessions[kind, name] = OpenVINOSession(os.path.join(workdir, "%s.onnx" % name), threads)
            else:
                sessions[kind, name] = MNNSession(os.path.join(workdir, "%s.mnn" % name), threads,
                                                  winograd=kind == "mnn")
    return sessions


def median_ms(sessions, rounds=7, min_seconds=0.05):
    """{key: median ms per forward} of ``sessions`` ({key: Session}, each already run once on its input),
    timed side by side after a warm-up: every round runs each in turn, whole forwards, for at least
    ``min_seconds``, so a noisy shared machine slows all of them alike and their ratio stays meaningful."""
    for s in sessions.values():
        s.forward()                             # warm-up
    times = {key: [] for key in sessions}
    for _ in range(rounds):
        for key, s in sessions.items():
            n, start = 0, time.perf_counter()
            while True:
                s.forward()
                n += 1
                elapsed = time.perf_counter() - start
                if elapsed >= min_seconds:
                    break
            times[key].append(1000.0 * elapsed / n)
    return {key: float(np.median(t)) for key, t in times.items()}


def forward_ms(nets, batches=(1, 32), rounds=7, min_seconds=0.2, seed=0):
    """{name: {batch: median ms per image}} of Caffe (CPU) for ``nets`` = {name: (prototxt, caffemodel)},
    timed side by side (median_ms) on the same random input at each batch size."""
    import caffe
    caffe.set_mode_cpu()
    sessions = {name: CaffeSession(proto, weights) for name, (proto, weights) in nets.items()}
    rng = np.random.default_rng(seed)
    out = {name: {} for name in nets}
    for batch in batches:
        inputs = {}
        for s in sessions.values():
            shape = (batch,) + s.input_shape()[1:]
            s.run(inputs.setdefault(shape, rng.uniform(-1, 1, shape).astype(np.float32)))
        ms = median_ms(sessions, rounds, min_seconds)
        for name in sessions:
            out[name][batch] = ms[name] / batch
    return out
