"""The documentation: README.md is a front door, every generated results table is what its JSON gives,
and every relative link of README.md and docs/*.md reaches an existing file and heading."""
import json
import os
import re
import shutil

import pytest

from apps import docs_tables
from conftest import ROOT

LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_every_generated_table_is_what_its_json_gives():
    assert docs_tables.run(ROOT, check=True) == []
    used = {m.group(1) for path in docs_tables.documents() for m in docs_tables.MARKER.finditer(open(path).read())}
    assert used == set(docs_tables.TABLES), "tables no page uses: %s" % (set(docs_tables.TABLES) - used)


def test_the_readme_is_a_front_door():
    text = open(os.path.join(ROOT, "README.md"), "rb").read()
    assert len(text) <= 15000, "README.md is %d bytes" % len(text)
    for line in ("make demo   # set up (first time only), then run the demo on the embedded default",
                 "make test   # set up (first time only), then run the test suite"):
        assert line in text.decode()
    assert "<!-- table: retention" in text.decode()


def slug(heading):
    """GitHub's anchor of a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path):
    found, seen = set(), {}
    in_code = False
    for line in open(path):
        in_code ^= line.startswith("```")
        m = re.match(r"(#+) (.*)", line) if not in_code else None
        if m:
            s = slug(m.group(2))
            found.add(s if s not in seen else "%s-%d" % (s, seen[s]))
            seen[s] = seen.get(s, 0) + 1
    return found


def test_every_relative_link_reaches_a_file_and_heading():
    broken = []
    for path in docs_tables.documents():
        for target in LINK.findall(open(path).read()):
            if re.match(r"\w+:", target):
                continue
            file, _, anchor = target.partition("#")
            dest = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
            if not os.path.exists(dest):
                broken.append("%s: %s (no file)" % (os.path.relpath(path, ROOT), target))
            elif anchor and anchor not in anchors(dest):
                broken.append("%s: %s (no heading)" % (os.path.relpath(path, ROOT), target))
    assert broken == []


def retention_rows(results, rows):
    os.makedirs(results, exist_ok=True)
    with open(os.path.join(results, "retention.json"), "w") as f:
        json.dump(dict(rows=rows, data={}), f)


def row(name, **extra):
    return dict(recipe="recipe " + name, row=name, macs_share=0.5, params=500000, lfw_folds_6_10=95.0,
                lfw_std=1.0, sgd=False, own_cpu_minutes=1.0, cpu_minutes=2.0, wall_minutes=3.0, **extra)


def test_retention_shows_tar_columns_only_when_rows_have_them(tmp_path):
    results = str(tmp_path)
    retention_rows(results, [row("a"), row("b")])
    lines, _ = docs_tables.retention(results, {})
    assert "TAR" not in lines[0] and "fine-tune CPU min" not in lines[0]
    retention_rows(results, [row("a"), row("b", **{"tar_at_far_1e-3": 95.12, "tar_at_far_1e-4": 80.0, "command":
                                                    "bench b", "finetune_cpu_minutes": 4.5})])
    lines, _ = docs_tables.retention(results, {"commands": "yes"})
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    a, b = ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:4])
    tar3, tar4 = header.index("TAR @ FAR 1e-3, all pairs (%)"), header.index("TAR @ FAR 1e-4, all pairs (%)")
    assert (a[tar3], a[tar4], b[tar3], b[tar4]) == ("—", "—", "95.12", "80.00")
    assert (a[header.index("fine-tune CPU min")], b[header.index("fine-tune CPU min")]) == ("—", "4.5")
    assert lines[-1] == "- `b`: `bench b`"
    retention_rows(results, [row("a", **{"tar_at_far_1e-3": 9512})])
    with pytest.raises(ValueError, match="TAR fields are percents"):
        docs_tables.retention(results, {})


def tiny_repo(tmp_path, readme):
    (tmp_path / "docs").mkdir()
    shutil.copytree(os.path.join(ROOT, "docs", "results"), str(tmp_path / "docs" / "results"))
    (tmp_path / "README.md").write_text(readme)
    (tmp_path / "docs" / "page.md").write_text("# page\n")
    return tmp_path


def test_a_stale_table_is_reported_then_rewritten(tmp_path, capsys):
    repo = tiny_repo(tmp_path, "# x\n\n<!-- table: criteria -->\n| made up | 1 |\n<!-- /table -->\ntail\n")
    before = (repo / "README.md").read_text()
    assert docs_tables.main(["--check", "--repo", str(repo)]) == 1
    assert "stale: README.md:3 criteria" in capsys.readouterr().out
    assert (repo / "README.md").read_text() == before
    assert docs_tables.main(["--repo", str(repo)]) == 0
    after = (repo / "README.md").read_text()
    assert "| thinet | 0.50 | 80.23 +- 1.47 |" in after and "made up" not in after and after.endswith("tail\n")
    assert "](docs/results/criteria_full_ls_keep05.json)" in after
    assert docs_tables.main(["--check", "--repo", str(repo)]) == 0


@pytest.mark.parametrize("readme, words", [
    ("<!-- table: nosuch -->\n<!-- /table -->\n", "README.md:1: no table named 'nosuch'"),
    ("<!-- table: criteria -->\nno end\n", "without its '<!-- /table -->'"),
    ("<!-- table: verify -->\n<!-- /table -->\n", "table verify needs file=NAME"),
    ("<!-- table: verify file=missing -->\n<!-- /table -->\n", "missing.json: no such results file"),
    ("<!-- table: retention rows=nosuch -->\n<!-- /table -->\n", "has no row nosuch"),
    ("<!-- table: retention columns=nosuch -->\n<!-- /table -->\n", "no column nosuch"),
    ("<!-- table: sensitivity file=retention -->\n<!-- /table -->\n", "its JSON has no field 'ratios'"),
])
def test_a_bad_marker_is_one_line_before_anything_is_written(tmp_path, capsys, readme, words):
    repo = tiny_repo(tmp_path, readme)
    (repo / "docs" / "page.md").write_text("<!-- table: criteria -->\n<!-- /table -->\n")
    assert docs_tables.main(["--repo", str(repo)]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1, err
    assert (repo / "README.md").read_text() == readme
    assert (repo / "docs" / "page.md").read_text() == "<!-- table: criteria -->\n<!-- /table -->\n"
