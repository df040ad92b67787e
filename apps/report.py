"""The pipeline's report: report.json, a readable report.md and the plots.

Everything measured goes in; the accuracy verdict (final vs baseline) is
stated whatever it is.  Wall and CPU times and forward timings are the only
numbers that differ between two runs of the same command (they live under
"timing" and "wall_seconds").
"""
import glob
import json
import os
import platform
import time

import numpy as np

from base import caffe_io
from base.figures import pyplot, save_figure
from finetune.loop import read_loss_csv

TOLERANCE = 0.015   # the accuracy drop the SphereFace-4 demo is held to (issue: within 1.5 points)


def _layers(proto):
    """{layer: (output channels, params, MACs)} of the layers that have weights."""
    from prune.stats import net_stats
    net = {l.name: l for l in caffe_io.read_net(proto).layer}
    out = {}
    for r in net_stats(proto).layers:
        if r.params and r.type in ("Convolution", "InnerProduct", "Deconvolution"):
            out[r.name] = (int(r.shape[0]) if r.shape else 0, r.params, r.macs)
    return {k: v for k, v in out.items() if k in net}


def build(out, records):
    """The report of a finished pipeline run in ``out``, from its stage records alone:
    data, baseline, prune (the driver's log + its fine-tune settings), evaluations, timing, verify (prune.verify's
    record of the pruned net beside the baseline)."""
    d, base, log, evals = records["data"], records["baseline"], records["prune"], records["evaluations"]
    before, after = _layers(base["prototxt"]), _layers(log["prototxt"])
    b, f = evals[0], evals[-1]
    t = records["timing"]["forward_ms"]
    speed = {batch: t["baseline"][batch] / t["pruned"][batch] for batch in t["baseline"]}
    return dict(
        net=base["prototxt"], depth=base.get("depth"), criterion=log["config"]["criterion"],
        reconstruction={k: log["config"].get(k) for k in ("reconstruct", "targets", "ridge", "bn_reestimate")},
        plan=log.get("plan", dict(allocation="given")),
        schedule=[dict(group=s["group"], layers=s["layers"], channels=s["channels"], kept=s["kept"],
                       error=s["error"]) for s in log["steps"]],
        data=dict(train_list=d["train_list"], train_images=d["train_images"], eval_folds=b["eval_folds"],
                  flip=b["flip"], synthetic=d["synthetic"], lfw_dir=d["lfw_dir"]),
        baseline=dict(trained=base["trained"], teacher=base.get("teacher"), epochs=base.get("epochs"),
                      iterations=base.get("iterations")),
        finetune=log["finetune"],
        stages=[dict({k: e[k] for k in ("stage", "accuracy", "std", "tar_at_far_1e3", "params", "macs", "caffemodel")},
                     **{k: e[k] for k in ("all_pairs",) if k in e}) for e in evals],
        layers={name: dict(channels_before=before[name][0], channels_after=after.get(name, (0,))[0],
                           params_before=before[name][1], params_after=after.get(name, (0, 0))[1],
                           macs_before=before[name][2], macs_after=after.get(name, (0, 0, 0))[2])
                for name in before},
        verdict=verdict(b, f),
        outputs=dict(prototxt=os.path.join(out, "deploy.prototxt"), caffemodel=os.path.join(out, "model.caffemodel"),
                     onnx={k: v for k, v in records["export"].items() if k in ("onnx", "nodes", "opset", "reason")},
                     **verified(records["verify"])),
        loss_curves=loss_curves(out, base, log),
        timing=dict(forward_ms=t, speedup=speed, measured_over_macs={k: v / (b["macs"] / f["macs"])
                                                                    for k, v in speed.items()},
                    runtimes=runtime_times(records["verify"]), cpu_minutes=cpu_minutes(out),
                    machine="%s, %d CPUs, Python %s" % (platform.platform(), os.cpu_count(),
                                                        platform.python_version()),
                    date=time.strftime("%Y-%m-%d")),
        wall_seconds=wall_seconds(out),
    )


def verified(record):
    """What prune.verify found, the parts that repeat exactly: every runtime's version and deviation from
    Caffe, the runtimes the net was verified in (deviation within the tolerance), those skipped."""
    from runtimes import LABELS
    runtimes = {}
    for kind, r in record["runtimes"].items():
        runtimes[kind] = dict(label=LABELS[kind], **{k: r[k] for k in ("error", "version", "max_rel_deviation",
                                                                        "min_cosine") if k in r})
    ok = [k for k, r in runtimes.items() if "error" not in r and r["max_rel_deviation"] <= record["tolerance"]]
    return dict(runtimes=runtimes, verified_in=ok, tolerance=record["tolerance"],
                skipped={LABELS[k]: why for k, why in record["skipped"].items()}, failures=record["failures"])


def runtime_times(record):
    """{runtime: baseline and pruned batch-1 ms, speed-up, measured / theoretical} of prune.verify's record."""
    return {kind: dict(baseline_ms=r["reference_latency_ms"], pruned_ms=r["latency_ms"], speedup=r["speedup"],
                       measured_over_macs=r["measured_over_macs"])
            for kind, r in record["runtimes"].items() if "error" not in r}


def verdict(b, f):
    """Final accuracy against the baseline's, and the size ratios."""
    drop = b["accuracy"] - f["accuracy"]
    return dict(baseline=b["accuracy"], final=f["accuracy"], drop_points=100 * drop,
                within_1_5_points=bool(drop <= TOLERANCE), macs_ratio=b["macs"] / f["macs"],
                params_ratio=b["params"] / f["params"])


def loss_curves(out, base, log):
    """{name: loss.csv} of the baseline training and of every fine-tune."""
    curves = [("baseline", base.get("loss_csv"))]
    curves += [("step %d %s" % (s["step"], s["group"]), os.path.join(os.path.dirname(s["prototxt"]), "finetune",
                                                                     "loss.csv")) for s in log["steps"]]
    if log["final_finetune"]:
        curves.append(("final", os.path.join(out, "prune", "finetune_final", "loss.csv")))
    return dict(curves)


def wall_seconds(out):
    """Seconds of each finished stage, in the order they finished."""
    paths = sorted(glob.glob(os.path.join(out, "stages", "*.json")), key=os.path.getmtime)
    return {os.path.basename(p)[:-5]: json.load(open(p)).get("seconds") for p in paths}


def cpu_minutes(out):
    """CPU minutes (user + system, all threads and children) of each finished stage, and of all the
    fine-tuning inside the prune stage (every fine-tune's done.json; the teacher's embeddings included)."""
    stages = {os.path.basename(p)[:-5]: json.load(open(p)).get("cpu_seconds")
              for p in sorted(glob.glob(os.path.join(out, "stages", "*.json")), key=os.path.getmtime)}
    tunes = [json.load(open(p)).get("cpu_seconds") for p in glob.glob(os.path.join(out, "prune", "**", "done.json"),
                                                                       recursive=True)]
    minutes = {k: round(v / 60, 1) for k, v in stages.items() if v is not None}
    minutes["finetune"] = round(sum(v for v in tunes if v is not None) / 60, 1)
    minutes["total"] = round(sum(v for v in stages.values() if v is not None) / 60, 1)
    return minutes


def write(rep, out):
    plots = os.path.join(out, "plots")
    os.makedirs(plots, exist_ok=True)
    paths = plot_all(rep, plots)
    rep = dict(rep, plots={k: os.path.relpath(v, out) for k, v in paths.items()})
    caffe_io.atomic_write(os.path.join(out, "report.json"), json.dumps(rep, indent=1) + "\n")
    caffe_io.atomic_write(os.path.join(out, "report.md"), markdown(rep))


def markdown(rep):
    v, t = rep["verdict"], rep["timing"]
    data = rep["data"]
    lines = ["# Pruning report: %s" % os.path.basename(rep["net"]), "",
             "Criterion **%s**; fine-tuning %g epoch(s) after each group and %g at the end (%s). "
             "Evaluated on LFW folds %s%s (%s); training data: %d images of %s."
             % (rep["criterion"], rep["finetune"]["epochs_per_layer"], rep["finetune"]["epochs_final"],
                rep["finetune"]["loss"], data["eval_folds"], " with flipped features" if data["flip"] else "",
                "GENERATED SYNTHETIC DATA: the accuracies test the mechanics, not face recognition"
                if data["synthetic"] else data["lfw_dir"], data["train_images"], data["train_list"]), ""]
    base = rep["baseline"]
    if base["trained"]:
        lines += ["Baseline trained here from scratch: %g epochs (%d iterations), %s." % (
            base["epochs"], base["iterations"], "distilled from %s" % base["teacher"] if base["teacher"]
            else "A-Softmax on the list's identities"), ""]
    lines += [describe_recipe(rep), ""]
    lines += ["## Result", "",
              "Final accuracy %.2f%% against the baseline's %.2f%%: %s, %s 1.5 points of the baseline. "
              "MACs %.2fx fewer, parameters %.2fx fewer." % (
                  100 * v["final"], 100 * v["baseline"],
                  "a drop of %.2f points" % v["drop_points"] if v["drop_points"] > 0
                  else "no drop (%+.2f points)" % -v["drop_points"],
                  "within" if v["within_1_5_points"] else "NOT within", v["macs_ratio"], v["params_ratio"]), "",
              "| stage | LFW accuracy (%) | TAR@FAR=1e-3, pairs (%) | TAR@FAR 1e-3 / 1e-4 / 1e-5, all pairs (%) "
              "| params | MACs |", "|---|---|---|---|---|---|"]
    for s in rep["stages"]:
        tars = (s.get("all_pairs") or {}).get("tar_at_far", {})
        lines.append("| %s | %.2f +- %.2f | %.2f | %s | %.3fM | %.1fM |" % (
            s["stage"], 100 * s["accuracy"], 100 * s["std"], 100 * s["tar_at_far_1e3"],
            " / ".join("%.2f" % (100 * v) for v in tars.values()) or "-", s["params"] / 1e6, s["macs"] / 1e6))
    a = rep["stages"][0].get("all_pairs")
    if a:
        lines += ["", "All pairs: every pair of the %d images of the %d people of the test folds (at most %s each): "
                      "%d genuine, %d impostor pairs (eval_lfw.allpairs)." % (
                          a["n_images"], a["n_people"], a["per_person"] or "all", a["n_genuine"], a["n_impostor"])]
    lines += ["", "## Caffe CPU forward time (median of repeated rounds, both nets in one process)", "",
              "| batch | baseline ms/image | pruned ms/image | speed-up | MACs ratio | measured / theoretical |",
              "|---|---|---|---|---|---|"]
    for batch in t["forward_ms"]["baseline"]:
        lines.append("| %s | %.3f | %.3f | %.2fx | %.2fx | %.2f |" % (
            batch, t["forward_ms"]["baseline"][batch], t["forward_ms"]["pruned"][batch], t["speedup"][batch],
            v["macs_ratio"], t["measured_over_macs"][batch]))
    lines += runtime_table(rep)
    lines += ["", "Machine: %s; %s." % (t["machine"], t["date"]), "",
              "## Layers", "", "| layer | channels | params | MACs |", "|---|---|---|---|"]
    for name, l in rep["layers"].items():
        lines.append("| %s | %d -> %d | %.3fM -> %.3fM | %.1fM -> %.1fM |" % (
            name, l["channels_before"], l["channels_after"], l["params_before"] / 1e6, l["params_after"] / 1e6,
            l["macs_before"] / 1e6, l["macs_after"] / 1e6))
    lines += ["", "## Groups pruned (relative error of each consumer's output: channels removed -> reconstructed; "
              "against the unpruned net where its targets came from there)", "",
              "| group | channels | error |", "|---|---|---|"]
    for s in rep["schedule"]:
        err = ", ".join("%s %.3f -> %.3f" % (k, e["removed"], e.get("target_after", e["rescaled"]))
                        for k, e in s["error"].items())
        lines.append("| %s | %d -> %d | %s |" % (s["group"], s["channels"], s["kept"], err))
    lines += ["", "## Wall time per stage (s)", "", "| stage | seconds |", "|---|---|"]
    lines += ["| %s | %s |" % (k, w) for k, w in rep["wall_seconds"].items()]
    lines += ["", "## Plots", ""] + ["![%s](%s)" % (k, p) for k, p in rep.get("plots", {}).items()]
    lines += closing_lines(rep)
    return "\n".join(lines)


def runtime_table(rep):
    """The section on the runtimes the pruned net was verified and timed in."""
    o, times = rep["outputs"], rep["timing"].get("runtimes", {})
    lines = ["", "## Runtimes: verified and timed (prune.verify; batch 1, both nets and every runtime in one "
             "process, interleaved rounds, one thread each)", "",
             "| runtime | version | max rel. deviation from Caffe | min cosine | baseline ms | pruned ms | speed-up "
             "| measured / theoretical |", "|---|---|---|---|---|---|---|---|"]
    for kind, r in o["runtimes"].items():
        if "error" in r:
            lines.append("| %s | | FAILED: %s | | | | | |" % (r["label"], r["error"]))
            continue
        t = times.get(kind, {})
        lines.append("| %s | %s | %.1e | %.7f | %.2f | %.2f | %.2fx | %.2f |" % (
            r["label"], r["version"], r["max_rel_deviation"], r["min_cosine"], t.get("baseline_ms", 0),
            t.get("pruned_ms", 0), t.get("speedup", 0), t.get("measured_over_macs", 0)))
    return lines + [""] + ["%s: skipped (%s)." % (label, why) for label, why in o["skipped"].items()]


def closing_lines(rep):
    """Where the pruned net is, the runtimes it was verified in and its latency in each."""
    o, times = rep["outputs"], rep["timing"].get("runtimes", {})
    labels = {k: r["label"] for k, r in o["runtimes"].items()}
    named = ", ".join("%s (%.2f ms)" % (labels[k], times[k]["pruned_ms"]) if k in times else labels[k]
                      for k in o["verified_in"])
    lines = ["", "Pruned net: `%s` + `%s` (plain Caffe files), verified in: %s (relative deviation from Caffe "
              "within %.0e; batch-1 latency in brackets)." % (o["prototxt"], o["caffemodel"], named or "none",
                                                             o["tolerance"])]
    e = o["onnx"]
    lines += ["", "ONNX: `%s` (opset %d, %d nodes; prune.export, the preprocessing in its metadata)."
              % (e["onnx"], e["opset"], e["nodes"]) if e["onnx"] else "No ONNX file: %s." % e["reason"]]
    if o["failures"]:
        lines += ["", "**Not verified**: %s." % "; ".join(o["failures"])]
    return lines + [""]


def describe_recipe(rep):
    """One sentence: how much each group kept and how its consumers were reconstructed."""
    p, r = rep["plan"], rep["reconstruction"]
    how = {"given": "as given (--keep/--preset)",
           "uniform": "one ratio for every group, for %.1f%% of the MACs" % (100 * p.get("macs_share", 0)),
           "sensitivity": "allocated per group from the sensitivity analysis (%s), %.1f%% of the MACs"
                          % (p.get("plan"), 100 * p.get("macs_share", 0))}[p["allocation"]]
    how += rounding_and_latency(p)
    rec = {"full": "least squares of all kept weights and the intercept", "scale": "ThiNet's per-channel scale",
           "none": "no reconstruction", None: "ThiNet's per-channel scale"}[r.get("reconstruct")]
    target = {"original": " towards the unpruned net's outputs", "current": " towards the pruned net's own outputs",
              None: ""}[r.get("targets")]
    bn = {"end": "; BatchNorm statistics measured again at the end", "each": "; BatchNorm statistics measured "
          "again after every cut"}.get(r.get("bn_reestimate"), "")
    return "Channels kept: %s. Consumers of each cut group: %s%s%s." % (how, rec, target if r.get("reconstruct") !=
                                                                         "none" else "", bn)


def rounding_and_latency(p):
    """The plan's channel rounding and latency ranking, as a clause ('' without either)."""
    text = ""
    lat = p.get("latency")
    if lat:
        text += "; cuts ranked by the time they save on %s (predicted %.2f of %.2f ms%s)" % (
            lat["runtime"], lat["predicted_ms"], lat["unpruned_ms"],
            ", latency target %.0f%%" % (100 * lat["target"]) if lat.get("target") else "")
    if (p.get("round_to") or 1) > 1:
        text += "; every count a multiple of %d" % p["round_to"]
    return text


def plot_all(rep, folder):
    plt = pyplot()
    out = {}
    st = rep["stages"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    macs = np.array([s["macs"] for s in st]) / 1e6
    acc = np.array([s["accuracy"] for s in st]) * 100
    ax.plot(macs, acc, "o-")
    for s, x, y in zip(st, macs, acc):
        ax.annotate(s["stage"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("MACs per image (M)")
    ax.set_ylabel("LFW accuracy, folds %s (%%)" % rep["data"]["eval_folds"])
    ax.set_title("accuracy vs MACs over the stages")
    ax.grid(True, lw=0.3)
    out["accuracy_vs_macs"] = save_figure(fig, os.path.join(folder, "accuracy_vs_macs.png"))

    names = list(rep["layers"])
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(names)), 3.5))
    ax.bar(x - 0.2, [rep["layers"][n]["channels_before"] for n in names], 0.4, label="before")
    ax.bar(x + 0.2, [rep["layers"][n]["channels_after"] for n in names], 0.4, label="after")
    ax.set_xticks(x, names, rotation=60, fontsize=7)
    ax.set_ylabel("output channels")
    ax.legend()
    out["channels"] = save_figure(fig, os.path.join(folder, "channels.png"))

    fig, axes = plt.subplots(2, 1, figsize=(max(6, 0.5 * len(names)), 6), sharex=True)
    for ax, key, unit in ((axes[0], "params", "parameters (M)"), (axes[1], "macs", "MACs (M)")):
        ax.bar(x - 0.2, [rep["layers"][n][key + "_before"] / 1e6 for n in names], 0.4, label="before")
        ax.bar(x + 0.2, [rep["layers"][n][key + "_after"] / 1e6 for n in names], 0.4, label="after")
        ax.set_ylabel(unit)
        ax.legend()
    axes[1].set_xticks(x, names, rotation=60, fontsize=7)
    out["params_macs"] = save_figure(fig, os.path.join(folder, "params_macs.png"))

    curves = [(k, [r[:2] for r in read_loss_csv(p)]) for k, p in rep["loss_curves"].items()]
    curves = [(k, r) for k, r in curves if r]
    if curves:
        fig, axes = plt.subplots(1, len(curves), figsize=(3 * len(curves), 3), squeeze=False)
        for ax, (name, rows) in zip(axes[0], curves):
            it, loss = np.array(rows).T
            ax.plot(it, loss, lw=0.6)
            ax.set_title(name, fontsize=8)
            ax.set_xlabel("iteration", fontsize=7)
        axes[0][0].set_ylabel("training loss")
        out["loss"] = save_figure(fig, os.path.join(folder, "loss.png"))
    return out
