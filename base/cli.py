"""The command-line layer every ``python -m`` entry point goes through.

* ``entry(prog)`` wraps ``main(argv)``: a user's mistake (a
  base.errors.ToolkitError, the message naming the file, layer or flag, or a
  missing or unreadable file) becomes ONE line ``PROG: error: ...`` on stderr
  and exit status 2, never a traceback.  Any other exception is a bug: one
  line ``PROG: internal error ...`` and exit status 1, its traceback written
  to the run folder when the run has one (``internal-error.txt``), else to a
  temporary file, both named in the line; ``--debug`` (every parser has it)
  prints it instead.  Ctrl-C one line and 130; a closed pipe (``| head``)
  ends quietly.
* ``parser(prog, ...)`` is argparse whose own errors (a missing or malformed
  flag) take the same one-line road instead of printing the usage block.
* The shared argument groups give a flag one name and one help text in
  every tool: the net (``--model --weights --blob --rgb``), the training
  list (``--train-list --train-root``), the teacher, the LFW evaluation
  (``--lfw-dir --pairs --eval-folds --no-flip``), fine-tuning
  (``--finetune-lr``) and the run (``--out --seed --quiet``).  A flag has
  one name: no hidden aliases of old spellings.
* ``check_files`` refuses missing inputs before anything is created.
"""
import argparse
import functools
import os
import sys
import tempfile
import traceback

from .errors import ToolkitError, UsageError

# What ``entry`` reports as the user's mistake; any other exception is a bug of the toolkit.
USER_ERRORS = (ToolkitError, FileNotFoundError, NotADirectoryError, PermissionError, IsADirectoryError)
DEBUG = "--debug"
TRACEBACK = "internal-error.txt"   # in the run folder (base.runfolder tags an error with it)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors and the global --debug flag (see ``entry``)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.add_argument(DEBUG, action="store_true",
                          help="on an internal error (a bug, exit status 1) print its traceback instead of writing "
                               "it to a file")

    def error(self, message):
        raise UsageError(message)


def parser(prog, description, epilog=None, raw=False):
    """The parser of one entry point; ``raw`` keeps the description's line breaks."""
    fmt = argparse.RawDescriptionHelpFormatter if raw else argparse.HelpFormatter
    return Parser(prog=prog, description=description, epilog=epilog, formatter_class=fmt)


def one_line(error):
    """An exception's message on one line (multi-line messages are joined with ' | ')."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " | ".join(lines) or type(error).__name__


def entry(prog):
    """Decorate ``main(argv) -> exit status`` as described in the module doc."""
    def wrap(main):
        @functools.wraps(main)
        def guarded(argv=None):
            try:
                code = main(argv)
                sys.stdout.flush()
                return 0 if code is None else code
            except KeyboardInterrupt:
                print("%s: interrupted" % prog, file=sys.stderr)
                return 130
            except BrokenPipeError:   # the reader went away: no message, no flush error at exit
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                return 1
            except USER_ERRORS as e:
                print("%s: error: %s" % (prog, one_line(e)), file=sys.stderr)
                return 2
            except Exception as e:
                args = sys.argv[1:] if argv is None else list(argv)
                return internal_error(prog, e, DEBUG in args[:args.index("--")] if "--" in args else DEBUG in args)
        return guarded
    return wrap


def internal_error(prog, error, debug):
    """Report a bug: one line naming it and where its traceback is (printed above it with ``debug``); exit 1."""
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    where = "above"
    if debug:
        sys.stderr.write(text)
    else:
        try:
            where = "in " + save_traceback(prog, text, getattr(error, "run_folder", None))
        except (OSError, ToolkitError):   # nowhere to write it: then it is shown
            sys.stderr.write(text)
    print("%s: internal error (a bug of the toolkit, not a mistake of yours; please report it): %s: %s; "
          "the traceback is %s" % (prog, type(error).__name__, one_line(error), where), file=sys.stderr)
    return 1


def save_traceback(prog, text, folder):
    """The traceback's file: TRACEBACK in the run ``folder`` when there is one, else a new temporary file."""
    if folder and os.path.isdir(folder):
        from .caffe_io import atomic_write
        return atomic_write(os.path.join(folder, TRACEBACK), text)
    fd, path = tempfile.mkstemp(prefix="%s-internal-error-" % prog.split()[-1], suffix=".txt")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def run(main):
    """``python -m`` tail: exit with what ``main`` returns."""
    sys.exit(main())


def say(tag, text, quiet=False):
    """A progress line of a long-running driver on stderr: ``[tag] text``."""
    if not quiet:
        print("[%s] %s" % (tag, text), file=sys.stderr, flush=True)


def check_file(path, name):
    """Refuse a missing input file up front, naming it as the user gave it (``name``: its flag or role)."""
    if path and not os.path.isfile(path):
        what = "is a folder, not a file" if os.path.isdir(path) else "no such file"
        raise UsageError("%s %s: %s" % (name, path, what))


def check_files(**paths):
    """check_file for flags: check_files(model=path, train_list=...) names them --model, --train-list."""
    for flag, path in paths.items():
        check_file(path, "--" + flag.replace("_", "-"))


def check_outputs(inputs, outputs, out=None):
    """Refuse, before any work, a run whose outputs would write over one of its inputs.

    inputs: {flag: path} of the files read; outputs: paths the run writes (a path ending in '/' is a folder
    the run writes anything into); out: the run folder, whose own records count as outputs too."""
    written = [p for p in outputs if p]
    if out:
        written.append(os.path.join(out, ".lock"))
        written.append(os.path.join(out, "config.json"))

    def real(path):
        return os.path.realpath(path)
    for flag, path in inputs.items():
        if not path:
            continue
        here = real(path)
        for target in written:
            folder = target.endswith("/")
            hit = (here.startswith(real(target) + os.sep) if folder else
                   here == real(target) or (os.path.exists(target) and os.path.samefile(path, target)))
            if hit:
                raise UsageError("%s %s is %s this run writes; it would be overwritten: copy it elsewhere or "
                                 "use another --out" % (_flag(flag), path,
                                                        "inside the folder %s, which" % target if folder else
                                                        "the output %s, which" % target))


def check_out(out, need_bytes=1 << 20, flag="--out"):
    """Refuse an output folder that cannot be written (read-only, a file, no permission) or that has not
    ``need_bytes`` free, before any work (a write failing in Caffe aborts the process)."""
    if not out:
        return
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError("%s %s is a file, not a folder" % (flag, out))
    here = os.path.abspath(out)
    while not os.path.exists(here):
        here = os.path.dirname(here)
    if not os.path.isdir(here):
        raise UsageError("%s %s: %s is a file, no folder can be made below it" % (flag, out, here))
    st = os.statvfs(here)
    if st.f_flag & os.ST_RDONLY:
        raise UsageError("%s %s: %s is on a read-only file system" % (flag, out, here))
    if not os.access(here, os.W_OK | os.X_OK):
        raise UsageError("%s %s: no permission to write in %s" % (flag, out, here))
    free = st.f_bavail * st.f_frsize
    if free < need_bytes:
        raise UsageError("%s %s: %.1f MB free there, this run needs at least %.1f MB" % (flag, out, free / 1e6,
                                                                                      need_bytes / 1e6))


def check_run_inputs(a, inputs, nets=(), train_list=True, runnable_part=False):
    """The common checks of a driver writing into the run folder ``a.out``, before anything is created:
    ``inputs`` ({dest: path}) exist and lie outside the run folder; the folder can be written and has room for
    a few copies of the weights; every (prototxt dest, caffemodel dest) of ``nets`` is a net Caffe builds
    (base.netcheck, in a child process) with a caffemodel holding all its layers -- with ``runnable_part``,
    for a driver that runs only what this Caffe build can (python -m prune), the part of the net left when a
    Caffe fork's layers are set aside (netcheck.runnable_view); with ``train_list`` the list's images are all
    images Caffe can decode."""
    from . import caffe_io, netcheck
    from .lists import read_list
    check_files(**inputs)
    check_outputs(inputs, [os.path.join(a.out, "")])
    weights = [inputs.get(w) for _, w in nets if inputs.get(w)]
    check_out(a.out, need_bytes=(1 << 20) + 4 * sum(os.path.getsize(w) for w in weights))
    given = [(n, caffe_io.read_net(inputs[n]), inputs.get(w)) for n, w in nets if inputs.get(n)]
    if runnable_part:
        for n, net, _ in given:
            netcheck.check_net(net, _flag(n) + " " + inputs[n], types=False)
        given = [(n, netcheck.runnable_view(net)[0], w) for n, net, w in given]
    caffe_io.probe_nets([(_flag(n) + " " + inputs[n], net, "test") for n, net, _ in given])
    for _, net, weight in given:
        if weight:
            caffe_io.check_weights(caffe_io.net_from_param(net), caffe_io.read_weights(weight), weight, complete=True)
    if train_list and inputs.get("train_list"):
        read_list(inputs["train_list"], getattr(a, "train_root", ""), decode=True, progress=not getattr(a, "quiet", False))


def _flag(name):
    return name if name.startswith("-") else "--" + name.replace("_", "-")


def check_dirs(**paths):
    for flag, path in paths.items():
        if path and not os.path.isdir(path):
            raise UsageError("--%s %s: no such folder" % (flag.replace("_", "-"), path))


def yes_no(text):
    """'yes'/'no' (also true/false, 1/0) -> bool."""
    value = text.strip().lower()
    if value in ("1", "yes", "true", "y"):
        return True
    if value in ("0", "no", "false", "n"):
        return False
    raise argparse.ArgumentTypeError("expected yes or no, not %r" % text)


INT_MAX = 2 ** 31 - 1    # whole-number flags end in Caffe's int32 fields (sizes, iterations, seeds) or beside them


def _number(kind, low=None, high=None, low_open=False, high_open=False):
    """An argparse type: ``kind`` (int or float) within [low, high] (open ends as asked; an int at most
    INT_MAX, which protobuf refuses past); NaN refused."""
    if kind is int and high is None:
        high = INT_MAX
    what = "a whole number" if kind is int else "a number"
    bounds = []
    if low is not None:
        bounds.append("%s %s" % (">" if low_open else ">=", low))
    if high is not None:
        bounds.append("%s %s" % ("<" if high_open else "<=", high))
    want = "%s %s" % (what, " and ".join(bounds)) if bounds else what

    def parse(text):
        try:
            value = kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError("expected %s, not %r" % (want, text)) from None
        ok = value == value and abs(value) != float("inf")
        if ok and low is not None:
            ok = value > low if low_open else value >= low
        if ok and high is not None:
            ok = value < high if high_open else value <= high
        if not ok:
            raise argparse.ArgumentTypeError("expected %s, not %r" % (want, text))
        return value
    parse.__name__ = want
    return parse


count = _number(int, 1)                          # images, batches, samples, rounds: at least 1
whole = _number(int, 0)                          # iterations, snapshot periods (0: none), classes (0: auto)
positive = _number(float, 0, low_open=True)      # epochs of a training, learning rates, gamma
non_negative = _number(float, 0)                 # epochs that may be 0 (none), weight decay, loss weights
fraction = _number(float, 0, 1, low_open=True)   # a share in (0, 1]
below_one = _number(float, 0, 1, high_open=True)  # momentum, Adam betas: [0, 1)
open_fraction = _number(float, 0, 1, low_open=True, high_open=True)   # a share strictly between 0 and 1


def parse_keep(text):
    """--keep: '0.5' -> 0.5; 'conv1_1=0.5,conv2_1=0.75' -> {layer: ratio}."""
    try:
        if "=" not in text:
            return _keep_ratio(float(text), text)
        table = {}
        for item in text.split(","):
            name, value = item.split("=")
            if not name.strip():
                raise ValueError(item)
            table[name.strip()] = _keep_ratio(float(value), item)
        return table
    except ValueError:
        raise argparse.ArgumentTypeError("--keep takes a ratio (0.5) or a table (conv1_1=0.5,conv2_1=0.75), not %r"
                                         % text) from None


def _keep_ratio(value, text):
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError("--keep ratios are shares of the channels in (0, 1], not %r" % text)
    return value


# ------------------------------------------------------------------ shared argument groups

def add_net(ap, weights_required=False, weights_help="its caffemodel (never modified)", blob_default="fc5",
            blob_help=None, blob_required=False, model_required=True,
            model_help="deploy prototxt of the net (one N x 3 x H x W Input)"):
    """--model --weights --blob --rgb."""
    ap.add_argument("--model", required=model_required, help=model_help)
    ap.add_argument("--weights", required=weights_required, help=weights_help)
    ap.add_argument("--blob", default=blob_default, required=blob_required,
                    help=blob_help or "blob whose values are the face embedding (default %s)" % blob_default)
    ap.add_argument("--rgb", action="store_true",
                    help="the net takes RGB planes (e.g. the MobileFaceNet of ../shared); default BGR, the order "
                         "Caffe's ImageData and the SphereFace release use")


def add_train_list(group, required=False, list_help=None):
    """--train-list --train-root."""
    group.add_argument("--train-list", required=required,
                       help=list_help or "training images, 'path label' lines (python -m finetune.lists makes one)")
    group.add_argument("--train-root", default="", help="folder the training list's paths are relative to")


def add_teacher(group, blob_default=None, rgb_default=None, teacher_help=None):
    """--teacher --teacher-weights --teacher-blob --teacher-rgb (distillation)."""
    group.add_argument("--teacher", help=teacher_help or "teacher deploy prototxt of the distillation")
    group.add_argument("--teacher-weights", help="the teacher's caffemodel")
    group.add_argument("--teacher-blob", default=blob_default,
                       help="the teacher's embedding blob (default %s)" % (blob_default or "--blob"))
    group.add_argument("--teacher-rgb", type=yes_no, default=rgb_default,
                       help="whether the teacher takes RGB planes, yes/no (default %s)"
                            % ({None: "the same as --rgb", True: "yes", False: "no"}[rgb_default]))


def add_lfw(group, required=False, folds_default="6-10"):
    """--lfw-dir --pairs --eval-folds --no-flip."""
    group.add_argument("--lfw-dir", required=required,
                       help="LFW images as NAME/NAME_0001.jpg (e.g. ../shared/data/lfw/images-112x112)")
    group.add_argument("--pairs", required=required, help="LFW View 2 pairs.txt (header '10 300')")
    group.add_argument("--eval-folds", default=folds_default,
                       help="LFW folds to cross-validate over (default %s; 6-10 for a net trained on the people of "
                            "folds 1-5)" % (folds_default or "all folds of --pairs"))
    group.add_argument("--no-flip", action="store_true",
                       help="embedding of the image alone (default: image and its mirror image, concatenated)")


def add_finetune_lr(group, default, help):
    """--finetune-lr."""
    group.add_argument("--finetune-lr", type=positive, default=default, help=help)


def add_cache_dir(ap):
    """--cache-dir: the evaluator's feature cache (LFW features, teacher embeddings)."""
    ap.add_argument("--cache-dir", default=None,
                    help="feature cache of the LFW evaluation and the teacher's embeddings, keyed by model bytes, "
                         "preprocessing and images (default: .cache/eval_lfw in the repository)")


def check_gpu(ids):
    """Refuse --gpu up front where Caffe would abort: a CPU-only build, or a device that is not there.
    Probed in a child process (Caffe's answer to either is abort())."""
    import subprocess
    if not ids:
        return
    code = "import caffe, sys\nfor i in sys.argv[1:]:\n    caffe.set_device(int(i))\n    caffe.set_mode_gpu()\n"
    run = subprocess.run([sys.executable, "-c", code] + [str(i) for i in ids], capture_output=True, text=True,
                         timeout=300)
    if run.returncode != 0:
        from .caffe_io import glog_failure
        reason = glog_failure(run.stderr)
        if "CPU-only" in reason or "CPU_ONLY" in reason:
            reason = "this Caffe is built CPU-only (scripts/setup.sh --gpu builds a CUDA one)"
        raise UsageError("--gpu %s: %s" % (",".join(str(i) for i in ids), reason))


def add_run(ap, out_help, seed_help="seed of image draws, sampling and Caffe (default 0)"):
    """--out --seed --quiet."""
    ap.add_argument("--out", required=True, help=out_help)
    ap.add_argument("--seed", type=whole, default=0, help=seed_help)
    ap.add_argument("--quiet", action="store_true", help="no progress output")


def int_list(text):
    """'16000,24000' -> (16000, 24000)."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = None
    if values is None or not all(abs(v) <= INT_MAX for v in values):
        raise argparse.ArgumentTypeError("expected comma-separated whole numbers up to %d, not %r" % (INT_MAX, text))
    return values


def name_list(text):
    """'a,b' -> ('a', 'b'): names such as blobs or layers."""
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated names, not %r" % text)
    return names


def gpu_ids(text):
    """'0' or '0,1' -> [0] or [0, 1]."""
    ids = list(int_list(text))
    if not ids or min(ids) < 0:
        raise argparse.ArgumentTypeError("expected GPU ids such as 0 or 0,1, not %r" % text)
    return ids
