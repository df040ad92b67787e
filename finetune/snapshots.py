"""Caffe's snapshots of a training run: which are intact, the newest intact one, restoring it exactly.

Caffe writes ``snap_iter_N.caffemodel`` then ``snap_iter_N.solverstate`` in
place (not atomically): a kill or a full disk in the middle leaves a torn
file, and restoring a torn solver state aborts the process
(``sgd_solver.cpp Check failed: state.history_size() == history_.size()``).
So a snapshot counts only when both files parse, the state's iteration is
the file's, and its history has one entry per learnable parameter blob of
the caffemodel (two for Adam), each of that blob's size.  ``latest`` skips
(and ``drop_torn`` removes) the others, falling back to the newest intact
snapshot.

``restore(solver, state)`` hands Caffe the solver state without its
``learned_net`` path (a path relative to where the first run started) and
loads the weights from the checked caffemodel itself; ``fast_forward`` then
runs the data layers over the batches the snapshot's iterations consumed,
so the images (their shuffled order and random mirroring) continue exactly
where the uninterrupted run would be: a resumed run repeats an
uninterrupted one.
"""
import glob
import os
import re
import shutil

from base import caffe_io
from base.errors import ToolkitError
from caffe.proto import caffe_pb2

STATE, MODEL = ".solverstate", ".caffemodel"
DATA_TYPES = ("ImageData", "Data", "HDF5Data", "WindowData", "MemoryData")
# Solvers keeping two history blobs per parameter (Caffe's AdamSolver and AdaDeltaSolver).
TWO_HISTORIES = ("Adam", "AdaDelta")


class SnapshotError(ToolkitError):
    pass


def iteration(state):
    m = re.search(r"_(\d+)\.solverstate$", state)
    return int(m.group(1)) if m else -1


def model_of(state):
    return state[:-len(STATE)] + MODEL


def states(folder):
    """Every .solverstate in ``folder``, newest first."""
    return sorted(glob.glob(os.path.join(folder, "snap_iter_*" + STATE)), key=iteration, reverse=True)


def read_state(path):
    state = caffe_pb2.SolverState()
    try:
        with open(path, "rb") as f:
            state.ParseFromString(f.read())
    except Exception as e:   # OSError, DecodeError
        raise SnapshotError("%s cannot be read (%s)" % (path, e)) from None
    return state


def expected(folder):
    """(history blobs per parameter, {layer: indices of blobs another layer owns}) from the run's solver and
    train prototxts."""
    run = os.path.dirname(os.path.abspath(folder))
    per, owned = 1, None
    solver = os.path.join(run, "solver.prototxt")
    if os.path.exists(solver):
        from google.protobuf import text_format
        s = caffe_pb2.SolverParameter()
        with open(solver) as f:
            text_format.Merge(f.read(), s)
        per = 2 if s.type in TWO_HISTORIES else 1
    shared = {}
    train = os.path.join(run, "train.prototxt")
    if os.path.exists(train):
        seen = set()
        for layer in caffe_io.read_net(train).layer:   # a blob shared by ParamSpec name is learned by its first owner
            for i, spec in enumerate(layer.param):
                if spec.name and spec.name in seen:
                    shared.setdefault(layer.name, set()).add(i)
                if spec.name:
                    seen.add(spec.name)
    return per, shared


def check(state_path, per=1, shared=None):
    """Raise SnapshotError saying why the snapshot pair of ``state_path`` cannot be restored."""
    model = model_of(state_path)
    if not os.path.exists(model):
        raise SnapshotError("%s has no %s" % (state_path, os.path.basename(model)))
    state = read_state(state_path)
    if state.iter != iteration(state_path):
        raise SnapshotError("%s holds iteration %d" % (state_path, state.iter))
    try:
        weights = caffe_io.read_weights(model)
    except caffe_io.CaffeFileError as e:
        raise SnapshotError(str(e)) from None
    sizes = [a.size for name, arrays in weights.items() for i, a in enumerate(arrays)
             if i not in (shared or {}).get(name, ())]
    if not sizes or len(state.history) != per * len(sizes):
        raise SnapshotError("%s holds %d history blobs for %d parameter blobs" % (state_path, len(state.history),
                                                                                 len(sizes)))
    for i, h in enumerate(state.history):
        n = len(h.data) or len(h.double_data)
        if n != sizes[i % len(sizes)]:
            raise SnapshotError("%s: history blob %d holds %d values, its parameter %d" % (state_path, i, n,
                                                                                         sizes[i % len(sizes)]))
    return weights


def scan(folder):
    """([(iteration, state path)] of intact snapshots, newest first; [(state path, why)] of torn ones)."""
    per, shared = expected(folder)
    good, torn = [], []
    for path in states(folder):
        try:
            check(path, per, shared)
            good.append((iteration(path), path))
        except SnapshotError as e:
            torn.append((path, str(e)))
    return good, torn


def latest(folder):
    """(iteration, .solverstate path) of the newest intact snapshot, or (0, None)."""
    good, _ = scan(folder)
    return good[0] if good else (0, None)


def drop_torn(folder):
    """Remove snapshots that cannot be restored, and caffemodels without a state newer than the newest intact
    snapshot (a kill between Caffe's two writes); returns [(path, why)]."""
    good, torn = scan(folder)
    newest = good[0][0] if good else 0
    for path, _ in torn:
        for name in (path, model_of(path)):
            if os.path.exists(name):
                os.unlink(name)
    lone = [m for m in glob.glob(os.path.join(folder, "snap_iter_*" + MODEL))
            if not os.path.exists(m[:-len(MODEL)] + STATE) and iteration(m[:-len(MODEL)] + STATE) > newest]
    for m in lone:
        os.unlink(m)
    return torn + [(m, "no solver state beside it") for m in lone]


def drop_old(folder, keep=2):
    """Snapshots are whole models plus solver state: keep only the newest ``keep``."""
    for state in states(folder)[keep:]:
        for path in (state, model_of(state)):
            if os.path.exists(path):
                os.unlink(path)


def restore(solver, state_path):
    """Restore ``solver`` from an intact snapshot (see the module doc); returns its iteration."""
    per, shared = expected(os.path.dirname(state_path))
    weights = check(state_path, per, shared)
    state = read_state(state_path)
    state.ClearField("learned_net")
    fd, tmp = caffe_io.staging_file(state_path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(state.SerializeToString())
        solver.restore(tmp)
    finally:
        os.unlink(tmp)
    caffe_io.load_into(solver.net, weights, source=model_of(state_path), complete=True)
    return solver.iter


def fast_forward(solver, iterations, iter_size=1):
    """Run the train net's data layers over the batches ``iterations`` solver steps consumed."""
    net = solver.net
    index = [i for i, layer in enumerate(net.layers) if layer.type in DATA_TYPES]
    for _ in range(iterations * iter_size):
        for i in index:
            net._forward(i, i)


def check_space(folder, model_bytes, per=1):
    """Refuse a snapshot that cannot fit: Caffe aborts on a failed write.  ``model_bytes``: the caffemodel's
    size; the state adds ``per`` copies of the parameters."""
    need = model_bytes * (2 + per) + (1 << 20)
    if not os.access(folder, os.W_OK):
        raise SnapshotError("cannot write a snapshot into %s (read-only?)" % folder)
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    if free < need:
        raise SnapshotError("no room for a snapshot in %s: about %.1f MB needed, %.1f MB free; free some space and "
                            "run the same command again to resume" % (folder, need / 1e6, free / 1e6))


def clear(folder):
    shutil.rmtree(folder, ignore_errors=True)
