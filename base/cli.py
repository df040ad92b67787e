"""The command-line layer every ``python -m`` entry point goes through.

* ``entry(prog)`` wraps ``main(argv)``: a user's mistake (ValueError or
  OSError, the message naming the file, layer or flag) becomes ONE line
  ``PROG: error: ...`` on stderr and exit status 2, never a traceback;
  Ctrl-C one line and 130; a closed pipe (``| head``) ends quietly.
* ``parser(prog, ...)`` is argparse whose own errors (a missing or malformed
  flag) take the same one-line road instead of printing the usage block.
* The shared argument groups give a flag one name and one help text in
  every tool: the net (``--model --weights --blob --rgb``), the training
  list (``--train-list --train-root``), the teacher, the LFW evaluation
  (``--lfw-dir --pairs --eval-folds --no-flip``), fine-tuning
  (``--finetune-lr``) and the run (``--out --seed --quiet``).  Old spellings
  (``--root``, ``--lr``, ``--folds``) stay as hidden aliases.
* ``check_files`` refuses missing inputs before anything is created.
"""
import argparse
import functools
import os
import sys


class UsageError(ValueError):
    """A flag that is missing, malformed or contradicts another."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (see ``entry``)."""

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
            except (ValueError, OSError) as e:
                print("%s: error: %s" % (prog, one_line(e)), file=sys.stderr)
                return 2
        return guarded
    return wrap


def run(main):
    """``python -m`` tail: exit with what ``main`` returns."""
    sys.exit(main())


def write_generated(make, output):
    """A net generator's last step: the NetParameter ``make()`` builds (a ValueError of it is a usage
    error) written to ``output``, or printed without one.  Returns the exit status."""
    from .caffe_io import write_or_print_net
    try:
        net = make()
    except ValueError as e:
        raise UsageError(str(e)) from None
    write_or_print_net(net, output)
    return 0


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


def check_dirs(**paths):
    for flag, path in paths.items():
        if path and not os.path.isdir(path):
            raise UsageError("--%s %s: no such folder" % (flag.replace("_", "-"), path))


def hidden_alias(group, flag, dest, **kw):
    """An old spelling of a flag: accepted, not shown in --help."""
    group.add_argument(flag, dest=dest, help=argparse.SUPPRESS, default=argparse.SUPPRESS, **kw)


def yes_no(text):
    """'yes'/'no' (also true/false, 1/0) -> bool."""
    value = text.strip().lower()
    if value in ("1", "yes", "true", "y"):
        return True
    if value in ("0", "no", "false", "n"):
        return False
    raise argparse.ArgumentTypeError("expected yes or no, not %r" % text)


def share(text):
    """A share in (0, 1] (a keep ratio, a level)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("expected a share such as 0.5, not %r" % text) from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError("expected a share in (0, 1], not %r" % text)
    return value


def parse_keep(text):
    """--keep: '0.5' -> 0.5; 'conv1_1=0.5,conv2_1=0.75' -> {layer: ratio}."""
    try:
        if "=" not in text:
            return float(text)
        table = {}
        for item in text.split(","):
            name, value = item.split("=")
            table[name.strip()] = float(value)
        return table
    except ValueError:
        raise argparse.ArgumentTypeError("--keep takes a ratio (0.5) or a table (conv1_1=0.5,conv2_1=0.75), not %r"
                                         % text) from None


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


def add_train_list(group, required=False, list_help=None, old_root=True):
    """--train-list --train-root (old name --root, unless the tool's --root meant another list)."""
    group.add_argument("--train-list", required=required,
                       help=list_help or "training images, 'path label' lines (python -m finetune.lists makes one)")
    group.add_argument("--train-root", default="", help="folder the training list's paths are relative to")
    if old_root:
        hidden_alias(group, "--root", "train_root")


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
    """--lfw-dir --pairs --eval-folds (old name --folds) --no-flip."""
    group.add_argument("--lfw-dir", required=required,
                       help="LFW images as NAME/NAME_0001.jpg (e.g. ../shared/data/lfw/images-112x112)")
    group.add_argument("--pairs", required=required, help="LFW View 2 pairs.txt (header '10 300')")
    group.add_argument("--eval-folds", default=folds_default,
                       help="LFW folds to cross-validate over (default %s; 6-10 for a net trained on the people of "
                            "folds 1-5)" % (folds_default or "all folds of --pairs"))
    hidden_alias(group, "--folds", "eval_folds")
    group.add_argument("--no-flip", action="store_true",
                       help="embedding of the image alone (default: image and its mirror image, concatenated)")


def add_finetune_lr(group, default, help):
    """--finetune-lr (old name --lr)."""
    group.add_argument("--finetune-lr", type=float, default=default, help=help)
    hidden_alias(group, "--lr", "finetune_lr", type=float)


def add_run(ap, out_help, seed_help="seed of image draws, sampling and Caffe (default 0)"):
    """--out --seed --quiet."""
    ap.add_argument("--out", required=True, help=out_help)
    ap.add_argument("--seed", type=int, default=0, help=seed_help)
    ap.add_argument("--quiet", action="store_true", help="no progress output")


def int_list(text):
    """'16000,24000' -> (16000, 24000)."""
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError("expected comma-separated whole numbers, not %r" % text) from None


def gpu_ids(text):
    """'0' or '0,1' -> [0] or [0, 1]."""
    ids = list(int_list(text))
    if not ids:
        raise argparse.ArgumentTypeError("expected GPU ids such as 0 or 0,1, not %r" % text)
    return ids
