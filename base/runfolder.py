"""The run folder every driver writes into (prune, finetune, pipeline, taylor, prioritise).

    with RunFolder(out) as run:          # creates the folder and takes its lock
        run.guard(config)                # config.json: the same settings, or a refusal naming what differs
        rec = run.stage("data", make)    # stages/data.json: done once, read back on a re-run
        run.save("steps/01/step.json", record)
        run.write("report.md", text)     # every write atomic (temp file + rename)

Resuming: a killed run started again with the same settings finds its
records and skips what they say is done.  Other settings are refused, with
the setting that differs named (``--keep: 0.5 then, 0.75 now``), so two
experiments never mix in one folder.  The lock (``fcntl.flock`` on
``OUT/.lock``, which holds the owner's pid) makes a second process on the
same folder stop at once with the holder's pid; the kernel drops it when the
process ends, however it ends.  A run that fails before its config.json is
written (an input found wrong) removes the folder it created.  Opening a
folder removes the staging files (``.NAME.PID.XXXX.tmp``) a killed run left.
A stage whose training diverged is discarded by its driver, which
``reopen``s the settings it used, so the corrected command is accepted.
"""
import fcntl
import json
import os
import shutil
import time

from .caffe_io import atomic_write, sweep_litter
from .errors import ToolkitError

LOCK = ".lock"
CONFIG = "config.json"
OPEN = "settings_open_after_a_failure"   # config.json key: settings a discarded stage used (see reopen)


class RunFolderError(ToolkitError):
    """A run folder in use, or holding a run of other settings."""


def _short(value, limit=48):
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[:limit - 3] + "..."


def differences(old, new, flags=False):
    """'key: A then, B now' for every key whose value differs (missing counts as None)."""
    def name(key):
        return "--" + key.replace("_", "-") if flags else key
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ["%s: %s then, %s now" % (name(k), _short(old.get(k)), _short(new.get(k))) for k in keys]


class RunFolder:
    """One run's folder: its lock, config guard, finished-stage records and atomic writes."""

    def __init__(self, path, error=RunFolderError):
        self.path = os.fspath(path)
        self.error = error           # the driver's own error type (a ToolkitError): its users catch that one
        self._fd = None
        self._created = False

    # -------------------------------------------------------------- lock
    def __enter__(self):
        return self.open()

    def __exit__(self, kind, value, trace):
        if kind is not None and self._created and not self.exists(CONFIG):
            # refused before its settings were recorded (an input found wrong): leave nothing behind, and
            # remove it while still holding the lock, so a run that starts meanwhile finds no half-gone folder
            shutil.rmtree(self.path, ignore_errors=True)
        elif isinstance(value, Exception) and not isinstance(value, ToolkitError):
            value.run_folder = self.path   # a bug: base.cli.entry writes its traceback here
        self.close()

    def open(self):
        """Create the folder and take its lock (a second holder is refused with the first one's pid); then
        remove the staging files a killed run left (``.NAME.PID.XXXX.tmp``)."""
        for _ in range(10):
            self._created = not os.path.exists(self.path)
            os.makedirs(self.path, exist_ok=True)
            fd = self._lock()
            try:   # the folder may have been removed (a refused run cleaning up) between makedirs and the lock
                if os.path.samestat(os.fstat(fd), os.stat(self.file(LOCK))):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        else:
            raise self.error("%s keeps disappearing (another process removing it?)" % self.path)
        os.ftruncate(fd, 0)
        os.write(fd, b"%d\n" % os.getpid())
        self._fd = fd
        sweep_litter(self.path, unowned=True)
        return self

    def _lock(self):
        fd = os.open(self.file(LOCK), os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise self.error("%s is in use by another run (process %s); wait for it to end or use another --out"
                             % (self.path, holder)) from None
        return fd

    def close(self):
        if self._fd is not None:
            os.close(self._fd)   # releases the flock
            self._fd = None

    # -------------------------------------------------------------- config
    def check(self, config, flags=False):
        """Refuse when config.json holds other settings (but those ``reopen`` freed); returns the config (not
        written: see save_config)."""
        old = self.load(CONFIG)
        if old is not None:
            free = set(old.pop(OPEN, ()))
            changed = differences({k: v for k, v in old.items() if k not in free},
                                  {k: v for k, v in json.loads(json.dumps(config)).items() if k not in free}, flags)
            if changed:
                raise self.error("%s holds a run made with other settings (%s); use another --out or the same "
                                 "arguments to resume it" % (self.path, "; ".join(changed)))
        return config

    def save_config(self, config):
        """config.json, written once the inputs are validated (again when ``reopen`` freed some settings)."""
        old = self.load(CONFIG)
        if old is None or OPEN in old:
            self.save(CONFIG, config)
        return config

    def reopen(self, keys):
        """A stage failed in a way its settings caused (training diverged) and its work was discarded: the
        settings ``keys`` may change on the next run (which then records them).  With ``keys`` None every
        setting may (nothing of the run is kept): config.json goes."""
        old = self.load(CONFIG)
        if old is None:
            return
        if keys is None:
            os.unlink(self.file(CONFIG))
            return
        old[OPEN] = sorted(set(old.get(OPEN, ())) | set(keys))
        self.save(CONFIG, old)

    def guard(self, config, flags=False):
        """check + save_config: call it once the inputs are validated."""
        return self.save_config(self.check(config, flags))

    # -------------------------------------------------------------- files and records
    def file(self, *parts):
        return os.path.join(self.path, *parts)

    def exists(self, *parts):
        return os.path.exists(self.file(*parts))

    def load(self, rel):
        """The JSON record at ``rel``, or None when it is not there."""
        path = self.file(rel)
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return json.load(f)

    def save(self, rel, record):
        """Write a JSON record atomically; returns it as a re-run will read it."""
        text = json.dumps(record, indent=1, sort_keys=rel == CONFIG)
        atomic_write(self.file(rel), text)
        return json.loads(text)

    def write(self, rel, data, protect=()):
        return atomic_write(self.file(rel), data, protect)

    def copy(self, src, rel, protect=()):
        """A file into the folder (atomically), e.g. the final net under a fixed name."""
        with open(src, "rb") as f:
            return self.write(rel, f.read(), protect)

    def stage(self, name, fn):
        """stages/<name>.json: ``fn()``'s record, computed once (its wall time added as 'seconds', the CPU time
        of this process and its children as 'cpu_seconds'; of the last call only, when a kill cut it short)."""
        rel = os.path.join("stages", name + ".json")
        done = self.load(rel)
        if done is not None:
            return done
        start, cpu = time.time(), cpu_seconds()
        record = dict(fn())
        record["seconds"] = round(time.time() - start, 1)
        record["cpu_seconds"] = round(cpu_seconds() - cpu, 1)
        return self.save(rel, record)


def cpu_seconds():
    """User + system CPU time of this process (all threads) and of its finished children."""
    import resource
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def command_config(args, hashed=(), leave_out=("quiet", "out", "cache_dir")):
    """The settings of a command (an argparse Namespace) as a run folder records them: every argument but
    ``leave_out``; ``hashed`` names arguments whose file's sha256 joins them (same path, other bytes differs)."""
    from .caffe_io import file_sha256
    config = {k: v for k, v in sorted(vars(args).items()) if k not in leave_out}
    for key in hashed:
        if config.get(key):
            config[key + "_sha256"] = file_sha256(config[key])
    return config
