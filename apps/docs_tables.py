"""python -m apps.docs_tables: write the results tables of README.md and docs/*.md from docs/results/*.json.

A generated table sits between two marker comments in a markdown file:

    <!-- table: retention rows=thinet,full columns=recipe,macs,lfw -->
    ... written by this script: the table, then a line linking the JSON it came from ...
    <!-- /table -->

The name picks the table (see TABLES); the optional key=value words pick rows, columns or the JSON file.
Everything between the markers is replaced, so a number in such a table is always the JSON's.  With
--check nothing is written: the tables that differ from their JSON are listed and the exit status is 1.
retention.json's LFW accuracies and its TAR fields (``tar_at_far_1e-3``, ``-4``, ``-5``) are percents; the
column of an optional field (TAR, ``finetune_cpu_minutes``) appears when some row has the field, with a dash
in the rows that lack it.
"""
import json
import os
import re

from base import caffe_io, cli

PROG = "python -m apps.docs_tables"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = re.compile(r"<!-- table: ([\w-]+)((?: [\w-]+=[^\s>]+)*) -->\n(.*?)<!-- /table -->", re.S)
DASH = "—"
NETS = {"sphereface4": "SphereFace-4", "sphereface10": "SphereFace-10", "sphereface20": "SphereFace-20",
        "mobilefacenet": "MobileFaceNet"}
VERIFY_RUNTIMES = {"caffe": "Caffe", "opencv-nofusion": "OpenCV, fusion off", "opencv": "OpenCV, fused",
                   "mnn-nowinograd": "MNN, Winograd off", "mnn": "MNN"}   # else runtimes.LABELS


def sci(x):
    """1.5e-4 style, 0 as 0."""
    if x == 0:
        return "0"
    mantissa, exponent = ("%.1e" % x).split("e")
    return "%se%d" % (mantissa, int(exponent))


def percent(value):
    if value is not None and not 0 <= value <= 100:
        raise ValueError("a TAR of %s: TAR fields are percents in [0, 100]" % value)
    return DASH if value is None else "%.2f" % value


def markdown(header, rows, right=()):
    """A markdown table; the columns named in ``right`` are right-aligned (numbers)."""
    rule = ["---:" if h in right else "---" for h in header]
    return ["| %s |" % " | ".join(line) for line in [header, rule] + [[str(c) for c in r] for r in rows]]


def load(results, name):
    path = os.path.join(results, name + ".json")
    try:
        with open(path) as f:
            return json.load(f), path
    except FileNotFoundError:
        raise cli.UsageError("%s: no such results file (named by a table marker)" % path) from None
    except ValueError as e:
        raise cli.UsageError("%s: not JSON: %s" % (path, e)) from None


def listed(args, key, default):
    return args[key].split(",") if key in args else default


def pick(rows, wanted, key, source):
    """``rows`` in the order of ``wanted`` (their ``key`` values); an unknown one is an error naming the file."""
    by_key = {r[key]: r for r in rows}
    missing = [w for w in wanted if w not in by_key]
    if missing:
        raise cli.UsageError("%s has no row %s (rows: %s)" % (source, ", ".join(missing), ", ".join(by_key)))
    return [by_key[w] for w in wanted]


# retention.json: one row per recipe; optional fields get their column only when some row has them.
RETENTION = {
    "recipe": ("recipe", lambda r: r["recipe"]),
    "macs": ("MACs", lambda r: "%.1f %%" % (100 * r["macs_share"])),
    "params": ("params", lambda r: "%.3fM" % (r["params"] / 1e6)),
    "lfw": ("LFW 6-10 (%)", lambda r: "%.2f +- %.2f%s" % (r["lfw_folds_6_10"], r["lfw_std"], (
        " (flip %.2f)" % r["lfw_folds_6_10_flip"] if "lfw_folds_6_10_flip" in r else ""))),
    "tar3": ("TAR @ FAR 1e-3, all pairs (%)", lambda r: percent(r.get("tar_at_far_1e-3"))),
    "tar4": ("TAR @ FAR 1e-4, all pairs (%)", lambda r: percent(r.get("tar_at_far_1e-4"))),
    "tar5": ("TAR @ FAR 1e-5, all pairs (%)", lambda r: percent(r.get("tar_at_far_1e-5"))),
    "sgd": ("SGD", lambda r: "yes" if r["sgd"] else "no"),
    "own_cpu": ("own CPU min", lambda r: "%.1f" % r["own_cpu_minutes"]),
    "finetune_cpu": ("fine-tune CPU min", lambda r: DASH if r.get("finetune_cpu_minutes") is None
                     else "%.1f" % r["finetune_cpu_minutes"]),
    "cpu": ("CPU min, chain", lambda r: "%.1f" % r["cpu_minutes"]),
    "wall": ("wall min, chain", lambda r: "%.1f" % r["wall_minutes"]),
}
RETENTION_OPTIONAL = {"tar3": "tar_at_far_1e-3", "tar4": "tar_at_far_1e-4", "tar5": "tar_at_far_1e-5",
                      "finetune_cpu": "finetune_cpu_minutes"}


def retention(results, args):
    d, path = load(results, args.get("file", "retention"))
    rows = pick(d["rows"], listed(args, "rows", [r["row"] for r in d["rows"]]), "row", path)
    columns = listed(args, "columns", list(RETENTION))
    unknown = [c for c in columns if c not in RETENTION]
    if unknown:
        raise cli.UsageError("table retention: no column %s (columns: %s)" % (", ".join(unknown), ", ".join(RETENTION)))
    columns = [c for c in columns if c not in RETENTION_OPTIONAL or any(RETENTION_OPTIONAL[c] in r for r in rows)]
    lines = markdown([RETENTION[c][0] for c in columns], [[RETENTION[c][1](r) for c in columns] for r in rows])
    if args.get("commands") == "yes":
        lines += [""] + ["- `%s`: `%s`" % (r["row"], r["command"]) for r in rows if r.get("command")]
    if args.get("notes") == "yes" and d.get("data", {}).get("note"):
        lines += ["", "Note (from the JSON): %s." % d["data"]["note"].rstrip(".")]
    return lines, [path]


def criteria(results, args):
    d, path = load(results, args.get("file", "criteria_full_ls_keep05"))
    rows = [[r["criterion"], "%.2f" % r["keep"], "%.2f +- %.2f" % (100 * r["accuracy"], 100 * r["std"]),
             "%.3fM" % (r["params"] / 1e6), "%.1fM" % (r["macs"] / 1e6),
             "%.0f" % r["prune_seconds"] if "prune_seconds" in r else DASH] for r in d["rows"]]
    header = ["criterion", "keep", "LFW folds %s (%%)" % d["test_folds"], "params", "MACs",
              "pruning time (s)"]
    return markdown(header, rows, right=header[1:]), [path]


def sensitivity(results, args):
    d, path = load(results, args.get("file", "mobilefacenet_sensitivity"))
    ratios = listed(args, "ratios", [str(r) for r in d["ratios"]])
    rows = []
    for group, curve in d["curves"].items():
        damage = {float(k): v for k, v in curve["damage"].items()}
        rows.append(["`%s` (%d)" % (group, curve["channels"])] + ["%.3f" % damage[float(k)] for k in ratios])
    header = ["group (channels)"] + ["keep %s" % r for r in ratios]
    return markdown(header, rows, right=header[1:]), [path]


def verify(results, args):
    if "file" not in args:
        raise cli.UsageError("table verify needs file=NAME (a docs/results/NAME.json of python -m prune.verify)")
    d, path = load(results, args["file"])
    from runtimes import LABELS
    rows = [[VERIFY_RUNTIMES.get(name) or LABELS.get(name, name), "%s / %s" % (sci(r["max_rel_deviation"]),
                                                          sci(r["reference_max_rel_deviation"])),
             "%.8f" % r["min_cosine"], "%.2f" % r["latency_ms"], "%.2f" % r["reference_latency_ms"],
             "%.2fx" % r["speedup"], "%.2f" % r["measured_over_macs"]] for name, r in d["runtimes"].items()]
    header = ["runtime", "max rel. deviation (pruned / original)", "min cosine", "pruned ms", "original ms",
              "speed-up", "meas/theo"]
    caption = "MACs reduction %.2fx; %d seeded inputs, median of %d rounds, %d thread(s), %s." % (
        d["macs_reduction"], d["inputs"], d["rounds"], d["threads"], d["date"])
    return [caption, ""] + markdown(header, rows, right=header[3:]), [path]


def runtimes(results, args):
    d, path = load(results, args.get("file", "bench_runtimes"))
    nets = listed(args, "nets", list(dict.fromkeys(r["net"] for r in d["rows"])))
    names = list(d["runtimes"])
    header = ["net", "variant", "MMACs", "MACs red."]
    for name in names:
        header += ["%s ms" % d["runtimes"][name]["label"], "speed-up", "m/t"]
    rows = []
    for r in (r for net in nets for r in d["rows"] if r["net"] == net):
        cells = [NETS.get(r["net"], r["net"]), r["variant"], "%.1f" % (r["macs"] / 1e6), "%.2fx" % r["macs_reduction"]]
        for name in names:
            t = r["runtimes"][name]
            cells += ["%.2f" % t["ms"], "%.2fx" % t["speedup"], "%.2f" % t["measured_over_theoretical"]]
        rows.append(cells)
    return markdown(header, rows, right=header[2:]), [path]


def runtimes_per_layer(results, args):
    d, path = load(results, args.get("file", "bench_runtimes"))
    rows = []
    for name, cause in d["sphereface20_keep05_per_layer"].items():
        label = d["runtimes"][name]["label"]
        for kind, k in cause["kinds"].items():
            rows.append([label, kind, k["layers"], "%.2fx" % k["macs_reduction"], "%.2fx" % k["speedup"],
                         "%.2f" % k["measured_over_theoretical"],
                         "%.1f %%" % (100 * k["ms"] / cause["predicted_ms"])])
        rows.append([label, "layers that count no MACs", "", "", "", "", "%.1f %%" % (
            100 * cause["rest_ms"] / cause["predicted_ms"])])
    header = ["runtime", "layer kind", "layers", "MACs red.", "speed-up", "m/t",
              "share of the original's time (predicted)"]
    return markdown(header, rows, right=header[2:]), [path]


def lfw_runtimes(results, args):
    """benchmarks/bench_lfw_runtimes.py: the LFW protocol with each runtime's own forward pass."""
    d, path = load(results, args.get("file", "lfw_runtimes"))
    rows = [[r["net"], r["label"], r["version"], "%.2f +- %.2f" % (r["lfw"], r["lfw_std"]),
             "%+.2f" % r["lfw_minus_caffe"], percent(r["tar_at_far_1e-4"]), "%+.2f" % r["tar_1e-4_minus_caffe"]]
            for r in d["rows"]]
    header = ["net", "runtime", "version", "LFW (%)", "LFW minus Caffe", "TAR @ FAR 1e-4, all pairs (%)",
              "TAR minus Caffe"]
    data = d["data"]
    caption = ("LFW folds %s, no flip, 10-fold protocol on them; TAR over all pairs of their people (at most %d "
               "images each); %s, %d CPUs." % (data["eval_folds"], data["per_person"], d["machine"]["date"],
                                               d["machine"]["cpu_count"]))
    return [caption, ""] + markdown(header, rows, right=header[3:]), [path]


TABLES = {"retention": retention, "criteria": criteria, "sensitivity": sensitivity, "verify": verify,
          "runtimes": runtimes, "runtimes-per-layer": runtimes_per_layer, "lfw-runtimes": lfw_runtimes}


def block(name, words, md_path, results):
    """The text between one marker pair: the table, then the link to every JSON it read."""
    args = dict(w.split("=", 1) for w in words.split())
    lines, sources = TABLES[name](results, args)
    links = ", ".join("[`docs/results/%s`](%s)" % (os.path.basename(p), os.path.relpath(p, os.path.dirname(md_path)))
                      for p in sources)
    return "\n".join(lines + ["", "Numbers from " + links + " (generated by `%s`)." % PROG]) + "\n"


def regenerate(md_path, root):
    """(text with every table of ``md_path`` rewritten, ["FILE:LINE NAME" of the tables that changed])."""
    results = os.path.join(root, "docs", "results")
    with open(md_path) as f:
        text = f.read()
    changed, out, at = [], [], 0
    for m in MARKER.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        if m.group(1) not in TABLES:
            raise cli.UsageError("%s:%d: no table named %r (tables: %s)" % (
                md_path, line, m.group(1), ", ".join(TABLES)))
        try:
            new = block(m.group(1), m.group(2), md_path, results)
        except KeyError as e:
            raise cli.UsageError("%s:%d: table %s: its JSON has no field %s" % (md_path, line, m.group(1), e)) from None
        except ValueError as e:
            raise cli.UsageError("%s:%d: table %s: %s" % (md_path, line, m.group(1), cli.one_line(e))) from None
        if new != m.group(3):
            changed.append("%s:%d %s" % (os.path.relpath(md_path, root), line, m.group(1)))
        out += [text[at:m.start(3)], new]
        at = m.end(3)
    if text.count("<!-- table:") != len(MARKER.findall(text)):
        raise cli.UsageError("%s: a '<!-- table: NAME -->' marker without its '<!-- /table -->'" % md_path)
    return "".join(out) + text[at:], changed


def documents(root=ROOT):
    """README.md and every docs/*.md: the files that may hold generated tables."""
    docs = os.path.join(root, "docs")
    return [os.path.join(root, "README.md")] + sorted(
        os.path.join(docs, n) for n in os.listdir(docs) if n.endswith(".md"))


def run(root=ROOT, check=False):
    """Rewrite (or with ``check`` only compare) every generated table; returns the stale ones."""
    rewritten = [(path,) + regenerate(path, root) for path in documents(root)]   # every file checked before any write
    if not check:
        for path, text, changed in rewritten:
            if changed:
                caffe_io.atomic_write(path, text)
    return [c for _, _, changed in rewritten for c in changed]


def parse_args(argv=None):
    ap = cli.parser(PROG, __doc__.split("\n\n")[0], epilog="Tables: " + ", ".join(TABLES) + ".")
    ap.add_argument("--check", action="store_true",
                    help="write nothing; list the tables that differ from their JSON and exit 1 if any does")
    ap.add_argument("--repo", default=ROOT, help="the repository whose README.md, docs/*.md and docs/results/ are "
                    "read (default: this one)")
    return ap.parse_args(argv)


@cli.entry(PROG)
def main(argv=None):
    a = parse_args(argv)
    for need in ("README.md", os.path.join("docs", "results")):
        if not os.path.exists(os.path.join(a.repo, need)):
            raise cli.UsageError("--repo %s has no %s: give the repository's folder" % (a.repo, need))
    stale = run(a.repo, check=a.check)
    for name in stale:
        print("%s: %s" % ("stale" if a.check else "rewritten", name))
    return 1 if a.check and stale else 0


if __name__ == "__main__":
    cli.run(main)
