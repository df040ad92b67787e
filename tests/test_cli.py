"""The command-line layer on real processes: every `python -m` entry point answers a bad input with one
line `python -m X: error: ...` and exit status 2, creates nothing first; a bug is one line `internal error`,
exit status 1, its traceback kept (run folder, temporary file or --debug); a run folder in use is refused."""
import argparse
import ast
import os
import subprocess
import sys
import tempfile

import pytest

from base import cli
from base.errors import ToolkitError
from base.runfolder import RunFolder, RunFolderError
from conftest import ROOT
from test_architecture import PACKAGES, module_name, python_files

MISSING = "/nonexistent/missing"
UNWRITABLE = "/dev/null/sub"     # /dev/null is a file: no folder can be made below it


def entry_points():
    """Every module of the toolkit that runs as `python -m`."""
    found = set()
    for path in python_files(*PACKAGES):
        tree = ast.parse(open(path).read())
        runs = path.endswith("__main__.py") or any(
            isinstance(n, ast.If) and "__main__" in ast.unparse(n.test) for n in tree.body)
        if runs:
            name = module_name(path)
            found.add(name[:-len(".__main__")] if name.endswith(".__main__") else name)
    return found


def sphereface4():
    return os.path.join(ROOT, "prototxt", "sphereface4_deploy.prototxt")


# (module, arguments with a missing input file or an output path that cannot be written); OUT is the
# output the command would create
CASES = [
    ("prune", ["--model", MISSING + ".prototxt", "--weights", MISSING + ".caffemodel", "--data", MISSING,
               "--out", "OUT"]),
    ("prune", ["--model", sphereface4(), "--weights", MISSING + ".caffemodel", "--data", MISSING, "--out", "OUT"]),
    ("prune.sensitivity", ["--model", MISSING + ".prototxt", "--weights", MISSING + ".caffemodel", "--blob", "fc5",
                           "--data", MISSING, "--out", "OUT"]),
    ("prune.groups", [MISSING + ".prototxt"]),
    ("prune.stats", [MISSING + ".prototxt"]),
    ("prune.verify", [MISSING + ".prototxt", MISSING + ".caffemodel", "--json", "OUT/verify.json"]),
    ("prune.verify", [sphereface4(), MISSING + ".caffemodel", "--json", "OUT/verify.json"]),
    ("prune.export", [MISSING + ".prototxt", MISSING + ".caffemodel", "-o", "OUT/net.onnx"]),
    ("prune.export", [sphereface4(), MISSING + ".caffemodel", "-o", "OUT/net.onnx"]),
    ("apps.prioritise.widths", ["--model", MISSING + ".prototxt", "--weights", MISSING + ".caffemodel", "--out", "OUT"]),
    ("apps.prioritise.towers", ["--model", MISSING + ".prototxt", "--out", "OUT/towers.prototxt"]),
    ("apps.prioritise.towers", ["--model", sphereface4(), "--out", UNWRITABLE + "/towers.prototxt"]),
    ("finetune", ["--model", MISSING + ".prototxt", "--train-list", MISSING + ".txt", "--out", "OUT"]),
    ("finetune.lists", [MISSING, "OUT"]),
    ("eval_lfw", ["--model", MISSING + ".prototxt", "--weights", MISSING + ".caffemodel", "--blob", "fc5",
                  "--lfw-dir", MISSING, "--pairs", MISSING + ".txt", "--out", "OUT"]),
    ("prototxt", ["--folder", UNWRITABLE]),
    ("prototxt.sphereface", ["--depth", "4", "-o", UNWRITABLE + "/sf4.prototxt"]),
    ("prototxt.facenets", ["--net", "vgg", "-o", UNWRITABLE + "/vgg.prototxt"]),
    ("apps.pipeline", ["--model", MISSING + ".prototxt", "--out", "OUT"]),
    ("apps.pipeline", ["--keep", "foo", "--out", "OUT"]),
    ("apps.taylor", ["--model", MISSING + ".prototxt", "--weights", MISSING + ".caffemodel", "--train-list",
                     MISSING + ".txt", "--remove-per-step", "1", "--target-share", "0.5", "--out", "OUT"]),
    ("apps.prioritise", ["--model", MISSING + ".prototxt", "--train-list", MISSING + ".txt", "--out", "OUT"]),
    ("apps.docs_tables", ["--repo", MISSING]),
]


def run_module(module, args, **kw):
    return subprocess.run([sys.executable, "-m", module] + args, cwd=ROOT, capture_output=True, text=True,
                          timeout=300, **kw)


def test_every_entry_point_is_checked():
    assert entry_points() == {m for m, _ in CASES}


@pytest.mark.parametrize("module, args", CASES, ids=["%s-%d" % (m, i) for i, (m, _) in enumerate(CASES)])
def test_bad_input_is_one_line_exit_2_and_creates_nothing(module, args, tmp_path):
    out = str(tmp_path / "out")
    done = run_module(module, [a.replace("OUT", out) for a in args])
    lines = done.stderr.splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("python -m %s: error: " % module), done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert not os.path.exists(out), "%s created %s before refusing" % (module, os.listdir(out))


def test_a_run_folder_in_use_is_refused_with_the_holders_pid(tmp_path):
    out = str(tmp_path / "run")
    with RunFolder(out):
        done = run_module("apps.pipeline", ["--synthetic", "--quiet", "--out", out])
    assert done.returncode == 2 and "process %d" % os.getpid() in done.stderr, done.stderr
    assert len(done.stderr.splitlines()) == 1 and "in use" in done.stderr
    with RunFolder(out) as again:      # the lock went with its holder
        assert again.load("config.json") is None


def test_run_folder_guard_records_and_names_what_differs(tmp_path):
    with RunFolder(tmp_path / "run") as run:
        run.guard(dict(keep=0.5, seed=0), flags=True)
        calls = []
        first = run.stage("data", lambda: calls.append(1) or dict(n=3))
        again = run.stage("data", lambda: calls.append(1) or dict(n=4))
        assert calls == [1] and first["n"] == again["n"] == 3 and "seconds" in first
        with pytest.raises(RunFolderError, match=r"other settings \(--keep: 0.5 then, 0.75 now\)"):
            run.guard(dict(keep=0.75, seed=0), flags=True)
    with RunFolder(tmp_path / "run") as run:
        with pytest.raises(RunFolderError, match="in use by another run"):
            RunFolder(tmp_path / "run").open()


def test_entry_wrapper_interrupt_and_broken_pipe(capsys):
    def interrupted(argv):
        raise KeyboardInterrupt
    assert cli.entry("python -m x")(interrupted)([]) == 130
    assert capsys.readouterr().err == "python -m x: interrupted\n"

    def bad(argv):
        raise ToolkitError("first line\nsecond line")
    assert cli.entry("python -m x")(bad)([]) == 2
    assert capsys.readouterr().err == "python -m x: error: first line | second line\n"


# A bug inside a toolkit function, in a real process: read_net raises a plain ValueError.
BUG = ("import sys\nfrom base import caffe_io\n"
       "def broken(path):\n    raise ValueError('a bug inside the toolkit')\n"
       "caffe_io.read_net = broken\nfrom prune.groups import main\nsys.exit(main(sys.argv[1:]))\n")


def test_a_bug_is_an_internal_error_exit_1_with_its_traceback_kept(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-c", BUG] + list(args), cwd=ROOT, capture_output=True, text=True,
                              timeout=300, env=dict(os.environ, TMPDIR=str(tmp_path)))
    done = run(sphereface4())
    lines = done.stderr.splitlines()
    assert done.returncode == 1, done.stderr
    assert len(lines) == 1 and lines[0].startswith("python -m prune.groups: internal error (a bug"), done.stderr
    assert "ValueError: a bug inside the toolkit" in lines[0] and "error: " not in lines[0]
    saved = lines[0].split("; the traceback is in ", 1)[1]
    assert os.path.dirname(saved) == str(tmp_path)
    text = open(saved).read()
    assert text.startswith("Traceback (most recent call last)") and "in broken" in text
    shown = run(sphereface4(), "--debug")
    assert shown.returncode == 1 and "Traceback (most recent call last)" in shown.stderr and "in broken" in shown.stderr
    assert shown.stderr.splitlines()[-1].endswith("the traceback is above")
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(saved)]     # --debug wrote no file
    missing = run(MISSING + ".prototxt")          # a user's mistake is still one, exit 2
    assert missing.returncode == 2 and missing.stderr.startswith("python -m prune.groups: error: "), missing.stderr


def test_a_bug_in_a_run_leaves_its_traceback_in_the_run_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def run(argv):
        with RunFolder(argv[0]) as folder:
            folder.guard(dict(seed=0))
            return {}["missing"]      # a bug
    out = tmp_path / "run"
    assert cli.entry("python -m x")(run)([str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("python -m x: internal error") and "KeyError: 'missing'" in err
    assert err.endswith("; the traceback is in %s\n" % (out / cli.TRACEBACK))
    assert "in run" in (out / cli.TRACEBACK).read_text()

    def early(argv):                  # a bug before the run's settings were recorded: its folder goes away
        with RunFolder(argv[0]):
            raise ValueError("early")
    assert cli.entry("python -m x")(early)([str(tmp_path / "early")]) == 1
    saved = capsys.readouterr().err.strip().split("; the traceback is in ", 1)[1]
    assert not (tmp_path / "early").exists() and os.path.dirname(saved) == str(tmp_path)
    assert "ValueError: early" in open(saved).read()


def test_every_parser_has_the_debug_flag(capsys):
    with pytest.raises(SystemExit):
        cli.parser("python -m x", "x").parse_args(["--help"])
    assert "--debug" in capsys.readouterr().out
    assert cli.parser("python -m x", "x").parse_args(["--debug"]).debug
    # every entry point's parser is base.cli's: none is built with argparse directly
    direct = [os.path.relpath(p, ROOT) for p in python_files(*PACKAGES) if p != cli.__file__
              and "ArgumentParser(" in open(p).read()]
    assert direct == []


def test_a_closed_pipe_ends_quietly():
    proc = subprocess.Popen([sys.executable, "-m", "prune.groups", sphereface4()], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()     # the reader went away (as `| head` does)
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert "Traceback" not in err and "Broken pipe" not in err and err == ""


def test_a_flag_has_one_name(capsys):
    from finetune.__main__ import parser as finetune_parser
    from eval_lfw.__main__ import parser as eval_parser
    a = finetune_parser().parse_args(["--model", "m", "--train-list", "l", "--out", "o", "--train-root", "r",
                                      "--finetune-lr", "0.5"])
    assert (a.train_root, a.finetune_lr) == ("r", 0.5)
    eval_args = ["--model", "m", "--weights", "w", "--blob", "b", "--lfw-dir", "d", "--pairs", "p"]
    assert eval_parser().parse_args(eval_args + ["--eval-folds", "6-10"]).eval_folds == "6-10"
    with pytest.raises(cli.UsageError, match="--folds"):      # the old spellings are gone
        eval_parser().parse_args(eval_args + ["--folds", "6-10"])
    with pytest.raises(cli.UsageError, match="--root"):
        finetune_parser().parse_args(["--model", "m", "--train-list", "l", "--out", "o", "--root", "r"])
    with pytest.raises(SystemExit):
        finetune_parser().parse_args(["--help"])
    shown = capsys.readouterr().out
    assert "--train-root" in shown and "--finetune-lr" in shown and "--root " not in shown and "--lr " not in shown


def test_options_that_exclude_each_other_are_refused_together(capsys):
    from prune.__main__ import main as prune_main
    args = ["--model", sphereface4(), "--weights", "w", "--data", "d", "--out", "o"]
    assert prune_main(args + ["--keep", "0.5", "--threshold", "0.1"]) == 2
    assert "argument --threshold: not allowed with argument --keep" in capsys.readouterr().err
    assert prune_main(args + ["--macs-target", "0.5", "--threshold", "0.1"]) == 2
    assert "not allowed with argument --macs-target" in capsys.readouterr().err
    with pytest.raises(argparse.ArgumentTypeError, match="--keep takes a ratio"):
        cli.parse_keep("half")
