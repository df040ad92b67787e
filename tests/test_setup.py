"""scripts/setup.sh and its helper: idempotent, and no mirror host in the repo."""
import os
import subprocess
import sys

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import apt_mirror  # noqa: E402


def test_mirror_from_deb822_and_one_line_sources(tmp_path):
    deb822 = tmp_path / "debian.sources"
    deb822.write_text(
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\nComponents: main\n\n"
        "Types: deb\nURIs: http://other.example/node\nSuites: nodistro\nComponents: main\n\n"
        "Types: deb\nEnabled: no\nURIs: http://disabled.example/debian\nSuites: bookworm\nComponents: main\n\n"
        "Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\nComponents: main contrib\n")
    assert apt_mirror.debian_mirror([str(deb822)], "bookworm") == "http://mirror.example/debian"

    one_line = tmp_path / "sources.list"
    one_line.write_text("# comment\ndeb [arch=amd64 signed-by=/k.gpg] http://m.example/debian bookworm-updates main\n"
                        "deb http://m.example/debian bookworm main non-free\n")
    assert apt_mirror.debian_mirror([str(one_line)], "bookworm") == "http://m.example/debian"
    assert apt_mirror.debian_mirror([str(one_line)], "trixie") is None


def test_second_setup_run_reuses_everything():
    run = subprocess.run(["bash", os.path.join(ROOT, "scripts", "setup.sh")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "pycaffe OK" in run.stdout
    assert "==> Build" not in run.stdout, "a second set-up must not rebuild Caffe"


def test_no_registry_or_mirror_host_committed():
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    # spelled in pieces so that this file does not name them either
    hosts = [".".join(p) for p in (("deb", "debian", "org"), ("snapshot", "debian", "org"), ("pypi", "org"),
                                   ("files", "pythonhosted", "org"), ("ftp", "debian", "org"))]
    for path in listed:
        full = os.path.join(ROOT, path)
        if not os.path.isfile(full) or path.endswith(".caffemodel"):
            continue
        with open(full, "rb") as f:
            text = f.read().decode("utf-8", "replace")
        for host in hosts:
            assert host not in text, "%s names the host %s" % (path, host)
