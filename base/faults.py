"""Fault injection for the kill -9 tests: a process that dies at one named write point.

Production runs never set the variables and pay one dictionary look-up per
write.  ``SPHEREFACE_FAULT=EVENT@TEXT#N`` makes the process SIGKILL itself at
the N-th (default 1st) ``point(EVENT, path)`` whose path contains TEXT:

* ``staged``: a file is complete under its temporary name, not yet renamed;
* ``renamed``: the file is in place, nothing after it done yet;
* ``snapshot``: Caffe has written a snapshot pair, older ones not yet dropped;
* ``torn-snapshot``: as ``snapshot``, but the pair is first cut to half its
  size, what a kill (or a full disk) in the middle of Caffe's write leaves.

``SPHEREFACE_FAULT_LOG=FILE`` appends ``EVENT path`` for every point reached,
so a test can list every write point of a run and kill at each (a staging
file's process-unique part written as ``~``).
"""
import os
import re
import signal

_counts = {}
# A staging file's process-unique part (base.caffe_io.staging_file): one point whatever the run's pid.
_STAGING = re.compile(r"\.\d+\.[A-Za-z0-9_]+\.tmp(?=$|\.)")


def canonical(path):
    """The absolute path with a staging file's pid and random letters replaced by '~'."""
    return _STAGING.sub(".~.tmp", os.path.abspath(path))


def point(event, path, files=()):
    """A write point: log it, and die here when SPHEREFACE_FAULT names it (see the module doc)."""
    log = os.environ.get("SPHEREFACE_FAULT_LOG")
    if log:
        with open(log, "a") as f:
            f.write("%s %s\n" % (event, canonical(path)))
    spec = os.environ.get("SPHEREFACE_FAULT")
    if not spec:
        return
    want, _, rest = spec.partition("@")
    text, _, nth = rest.partition("#")
    torn = want == "torn-snapshot" and event == "snapshot"
    if (want != event and not torn) or text not in canonical(path):
        return
    _counts[spec] = _counts.get(spec, 0) + 1
    if _counts[spec] != int(nth or 1):
        return
    if torn:
        for name in files:
            os.truncate(name, os.path.getsize(name) // 2)
    os.kill(os.getpid(), signal.SIGKILL)
