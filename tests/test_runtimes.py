"""Where pruned nets run (issue 19), on small nets and real runtimes: prune.verify in every runtime installed
(Caffe, OpenCV DNN with fusion off and on, MNN with Winograd off and on), channel rounding in the one
ratio -> count rule, the allocator and the driver, the per-layer latency table and the latency-aware
allocation.  No timing is asserted: only that times were measured and how they are combined."""
import json
import os
import subprocess
import sys

import caffe
import numpy as np
import pytest
from caffe import layers as L

from base import caffe_io
from conftest import ROOT
from nets import half_pruned, random_weights, sphereface_path
import runtimes
from prune import latency
from prune.graph import build_graph
from prune.macs import MacsModel
from prune.plans import PlanSpec, make as make_plan
from prune.policy import keep_count, round_count
from prune.sensitivity import SensitivityError, allocate, allocation
from prune.verify import failures, main as verify_main, verify


def small_face_net(w=1):
    """The layer kinds of the face nets at toy size: conv + BatchNorm + Scale + PReLU, a depthwise conv, a 3x3
    residual unit with Eltwise, a 1x1 projection, an InnerProduct embedding; ``w`` times the channels."""
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 24, 24]))
    n.c1 = L.Convolution(n.data, num_output=16 * w, kernel_size=3, stride=2, pad=1)
    n.b1 = L.BatchNorm(n.c1, in_place=True)
    n.s1 = L.Scale(n.c1, bias_term=True, in_place=True)
    n.r1 = L.PReLU(n.c1, in_place=True)
    n.dw = L.Convolution(n.c1, num_output=16 * w, kernel_size=3, pad=1, group=16 * w)
    n.rdw = L.PReLU(n.dw, in_place=True)
    n.u1 = L.Convolution(n.dw, num_output=24 * w, kernel_size=3, pad=1)
    n.ru1 = L.PReLU(n.u1, in_place=True)
    n.u2 = L.Convolution(n.u1, num_output=16 * w, kernel_size=3, pad=1)
    n.ru2 = L.PReLU(n.u2, in_place=True)
    n.res = L.Eltwise(n.dw, n.u2)
    n.p = L.Convolution(n.res, num_output=32 * w, kernel_size=1, stride=2)
    n.rp = L.PReLU(n.p, in_place=True)
    n.fc = L.InnerProduct(n.p, num_output=12)
    return n.to_proto()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(original prototxt, caffemodel), (pruned prototxt, caffemodel): every group kept at half."""
    folder = tmp_path_factory.mktemp("runtimes")
    return half_pruned(caffe_io.write_net(small_face_net(), str(folder / "net.prototxt")), folder, seed=3)


@pytest.fixture(scope="module")
def record(pair):
    return verify(*pair[1], reference=pair[0], rounds=1, min_seconds=0.001)


@pytest.mark.parametrize("kind", runtimes.KINDS)
def test_every_installed_runtime_agrees_with_caffe_and_is_timed(record, kind):
    why = runtimes.missing(kind)
    if why:
        assert record["skipped"][kind] == why
        pytest.skip(why)
    r = record["runtimes"][kind]
    assert "error" not in r and r["version"]
    if kind in runtimes.EXACT:
        assert r["max_rel_deviation"] < 1e-4 and r["reference_max_rel_deviation"] < 1e-4, r
        assert r["min_cosine"] > 1 - 1e-6
    else:   # as deployed: reported, not held to the tolerance
        assert 0 <= r["max_rel_deviation"] < 1e-2 and r["min_cosine"] > 0.999
    if kind == "caffe":
        assert r["max_rel_deviation"] == 0
    assert r["latency_ms"] > 0 and r["reference_latency_ms"] > 0
    assert r["speedup"] == pytest.approx(r["reference_latency_ms"] / r["latency_ms"])
    assert r["measured_over_macs"] == pytest.approx(r["speedup"] / record["macs_reduction"])
    assert record["macs_reduction"] == pytest.approx(record["reference_macs"] / record["macs"])
    assert failures(record, 1e-4) == []


def test_verify_command_writes_its_record_and_fails_on_a_deviation(pair, tmp_path, capsys):
    (proto, model), (pruned, pruned_model) = pair
    out = str(tmp_path / "verify.json")
    args = [pruned, pruned_model, "--reference", proto, model, "--rounds", "1", "--min-seconds", "0.001"]
    assert verify_main(args + ["--json", out]) == 0
    shown = capsys.readouterr().out
    written = json.load(open(out))
    assert written["failures"] == [] and written["reference"] == [proto, model]
    for kind in runtimes.KINDS:
        assert runtimes.LABELS[kind] in shown
    # a tolerance no float runtime meets: exit 1, the failing runtimes named, the record still written
    assert verify_main(args + ["--json", out, "--tolerance", "1e-12", "--runtimes", "opencv-nofusion"]) == 1
    err = capsys.readouterr().err
    if runtimes.missing("opencv-nofusion") is None:
        assert "FAILED" in err and "OpenCV DNN (fusion off) deviates" in err
        assert json.load(open(out))["failures"]


def test_a_runtime_that_is_not_installed_is_skipped_with_a_line(pair):
    code = ("import sys; sys.modules['MNN'] = None\n"
            "from prune.verify import main\n"
            "sys.exit(main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", code, *pair[1], "--rounds", "1", "--min-seconds", "0.001"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    skipped = [line for line in done.stdout.splitlines() if "skipped" in line]
    assert len(skipped) == 2 and all("MNN is not installed" in line for line in skipped), done.stdout


def test_verify_refuses_a_net_with_two_outputs(pair, tmp_path):
    net = caffe_io.read_net(pair[0][0])
    net.layer.add(name="extra", type="InnerProduct", bottom=["p"], top=["extra"]).inner_product_param.num_output = 2
    proto = caffe_io.write_net(net, str(tmp_path / "two.prototxt"))
    model = caffe_io.write_weights(net, random_weights(proto), str(tmp_path / "two.caffemodel"))
    done = subprocess.run([sys.executable, "-m", "prune.verify", proto, model, "--json", str(tmp_path / "v.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.startswith("python -m prune.verify: error: ")
    assert "2 outputs" in done.stderr and len(done.stderr.splitlines()) == 1
    assert not os.path.exists(tmp_path / "v.json")


# ------------------------------------------------------------------ rounding

@pytest.mark.parametrize("round_to", [1, 4, 8, 16])
def test_keep_count_rounds_to_multiples_and_reads_back(round_to):
    for channels in (1, 3, 8, 12, 64, 100, 512):
        for ratio in np.linspace(0.01, 1.0, 60):
            k = keep_count(ratio, channels, round_to)
            assert 1 <= k <= channels
            if round_to == 1:
                assert k == keep_count(ratio, channels) == max(1, min(channels, int(round(ratio * channels))))
            else:
                assert k == channels or (k % round_to == 0 and k >= round_to)
                if k < channels and k > round_to:   # the nearest multiple, unless clipped at either end
                    assert abs(k - ratio * channels) <= round_to / 2 + 1e-9
            assert keep_count(k / channels, channels, round_to) == k     # a ratio derived from a count reads back
            assert round_count(k, channels, round_to) == k                 # and a rounded count stays as it is
            assert round_count(ratio * channels, channels, round_to) == k   # the one rule, on counts
        assert keep_count(1.0, channels, round_to) == channels


def test_the_uniform_macs_ratio_and_the_allocator_keep_multiples():
    net = caffe_io.read_net(sphereface_path(20))
    model = MacsModel(net)
    uniform = make_plan(PlanSpec(macs_target=0.5, allocation="uniform", round_to=16), sphereface_path(20))
    kept = {g: keep_count(uniform.made_by["ratio"], c, 16) for g, c in model.channels().items()}
    assert {g: k for g, k in kept.items() if k < model.channels()[g]} == uniform.keep
    share = uniform.made_by["macs_share"]
    assert all(k % 16 == 0 for k in kept.values()) and share == pytest.approx(model.share(kept)) and share <= 0.5
    table = make_plan(PlanSpec(keep=0.7, round_to=16), sphereface_path(20))
    assert table.keep and all(k % 16 == 0 for k in table.keep.values()) and table.round_to == 16
    whole = make_plan(PlanSpec(keep=0.7), sphereface_path(20))           # rounding works on the counts
    assert whole.rounded(16).keep == {g: round_count(k, whole.channels[g], 16) for g, k in whole.keep.items()
                                      if round_count(k, whole.channels[g], 16) < whole.channels[g]}
    rng = np.random.default_rng(0)
    curves = {g: {"channels": c, "damage": {"%g" % r: rng.uniform(0.01, 1) * (1 - r) ** 2 for r in (0.125, 0.5)}}
              for g, c in model.channels().items()}
    record = {"ratios": [0.125, 0.5], "curves": curves}
    for n in (1, 8, 16):
        kept = allocate(record, model, 0.5, round_to=n)
        assert model.share(kept) <= 0.5
        assert all(k == model.channels()[g] or k % n == 0 for g, k in kept.items())
    content = allocation(record, model, 0.5, round_to=8)
    assert all(k % 8 == 0 or k == model.channels()[g] for g, k in content["keep"].items())


# ------------------------------------------------------------------ latency table and allocation

def test_latency_table_of_every_layer_is_measured_cached_and_interpolated(pair, tmp_path):
    net = caffe_io.read_net(pair[0][0])
    graph = build_graph(net)
    spec = latency.TableSpec(runtime="caffe", points=3, lowest=0.25, round_to=4, rounds=1, min_seconds=0.001)
    table = latency.measure_table(net, spec, graph=graph, cache_dir=str(tmp_path))
    units = latency.costed_units(net, graph)
    assert set(table["units"]) == set(units) == {"c1", "dw", "u1", "u2", "p", "fc"}
    assert units["c1"]["followers"] == ["b1", "s1", "r1"] and units["dw"]["kind"] == "depthwise 3x3 s1"
    u1 = table["units"]["u1"]       # 24 x 16 channels in, both axes cut; counts keep_count(r, C, 4)
    assert u1["rows"] == [8, 16, 24] and u1["cols"] == [4, 8, 16]
    assert all(t > 0 for row in table["tables"][u1["table"]]["ms"] for t in row)
    files = os.listdir(tmp_path)
    assert len(files) == 1
    stamp = os.path.getmtime(tmp_path / files[0])
    again = latency.measure_table(net, spec, graph=graph, cache_dir=str(tmp_path))     # read back, not re-timed
    assert again == table and os.path.getmtime(tmp_path / files[0]) == stamp
    model = latency.LatencyModel(net, table, graph=graph)
    t = table["tables"][u1["table"]]
    at = model.layer_ms("u1", 16, 8) + model.overhead
    assert at == pytest.approx(max(t["ms"][1][1], model.overhead))             # exact at a timed count
    mid = model.layer_ms("u1", 20, 8) + model.overhead                          # linear in between
    assert mid == pytest.approx(max(0.5 * (t["ms"][1][1] + t["ms"][2][1]), model.overhead))
    kept = {g: c // 2 for g, c in model.channels().items()}
    assert model.cost(kept) == pytest.approx(model.rest + sum(model.per_layer(kept).values()))
    assert model.total == pytest.approx(model.cost({})) and model.share({}) == pytest.approx(1.0)


def made_up_table(net, graph, slow):
    """A latency table with known times: every layer costs rows * cols microseconds, those of ``slow`` ten
    times as much (no measurement: this checks the allocator, not a runtime)."""
    units = latency.costed_units(net, graph)
    table = dict(spec=dict(runtime="made-up"), whole_ms=0.0, overhead_ms=0.0, units={}, tables={})
    for name, u in units.items():
        rows = latency.axis_grid(u["rows"], u["cuts"], graph, 0, latency.ratios(8, 0.125))
        cols = latency.axis_grid(u["cols"], u["cuts"], graph, 1, latency.ratios(8, 0.125))
        factor = 10.0 if name in slow else 1.0
        table["units"][name] = dict(table=name, rows=rows, cols=cols)
        table["tables"][name] = dict(rows=rows, cols=cols, ms=[[factor * r * c / 1000 for c in cols] for r in rows])
    return table


def test_the_latency_allocation_spends_its_cuts_where_they_buy_time():
    """Equal damage curves everywhere; the conv4 stage made ten times slower per MAC than it counts: at the
    same MACs target, the allocation ranked by time cuts stage 4 harder and predicts a faster net."""
    net = caffe_io.read_net(sphereface_path(10))
    macs = MacsModel(net)
    graph = macs.graph
    slow = [u for u in latency.costed_units(net, graph) if u.startswith("conv4")]
    model = latency.LatencyModel(net, made_up_table(net, graph, slow), graph=graph)
    curves = {g: {"channels": c, "damage": {"%g" % r: (1 - r) ** 2 for r in (0.125, 0.25, 0.5, 0.75)}}
              for g, c in macs.channels().items()}
    record = {"ratios": [0.125, 0.25, 0.5, 0.75], "curves": curves}
    by_macs = allocate(record, macs, 0.5)
    by_time = allocate(record, macs, 0.5, rank=model)
    assert macs.share(by_time) <= 0.5 and macs.share(by_macs) <= 0.5
    assert model.cost(by_time) < model.cost(by_macs)
    stage4 = [g for g in by_time if g.startswith("conv4")]
    assert all(by_time[g] <= by_macs[g] for g in stage4) and any(by_time[g] < by_macs[g] for g in stage4)
    content = allocation(record, macs, None, latency=model, latency_target=0.4, round_to=8)      # a latency target
    assert content["latency"]["share"] <= 0.4 and content["latency"]["runtime"] == "made-up"
    assert all(k % 8 == 0 or k == macs.channels()[g] for g, k in content["keep"].items())
    with pytest.raises(SensitivityError, match="--latency-target 0.001 is out of reach"):
        allocation(record, macs, None, latency=model, latency_target=0.001)


def test_sensitivity_plans_for_a_latency_target_in_multiples_and_prune_runs_the_plan(tmp_path):
    """python -m prune.sensitivity --latency-target --runtime --round-to on a small net and generated faces:
    the plan meets the predicted latency share in multiples of 4 channels, and python -m prune --plan
    --round-to 4 cuts exactly those counts.  (Channels x4: big enough that cutting a layer saves time
    well beyond the timing noise, so that a 80% latency target is within reach.)"""
    from apps.synthetic import make_dataset
    from prune.__main__ import main as prune_main
    from prune.sensitivity.__main__ import main as sensitivity_main
    images, _ = make_dataset(str(tmp_path / "data"), identities_per_fold=2, images_per_identity=3, size=24,
                             pairs_per_fold=2)
    proto = caffe_io.write_net(small_face_net(4), str(tmp_path / "net.prototxt"))
    model = caffe_io.write_weights(caffe_io.read_net(proto), random_weights(proto, seed=5),
                                   str(tmp_path / "net.caffemodel"))
    runtime = next(k for k in ("mnn", "opencv", "caffe") if runtimes.missing(k) is None)
    out = tmp_path / "sens"
    assert sensitivity_main(["--model", proto, "--weights", model, "--blob", "fc", "--data", images, "--crop", "none",
                             "--images", "24", "--judge-images", "8", "--ratios", "0.25,0.5,0.75",
                             "--latency-target", "0.8", "--runtime", runtime, "--latency-points", "2",
                             "--round-to", "4", "--latency-cache", str(tmp_path / "cache"), "--out", str(out),
                             "--quiet"]) == 0
    content = json.loads((out / "plan.json").read_text())
    made_by = content["made_by"]
    assert made_by["latency"]["runtime"] == runtime and made_by["latency"]["share"] <= 0.8
    assert content["round_to"] == 4 and made_by["macs_target"] is None and made_by["policy"] == "latency"
    assert content["keep"] and all(k % 4 == 0 for k in content["keep"].values())
    assert os.listdir(tmp_path / "cache")
    run_dir = tmp_path / "run"
    assert prune_main(["--model", proto, "--weights", model, "--data", images, "--crop", "none", "--images", "16",
                       "--plan", str(out / "plan.json"), "--round-to", "4", "--out", str(run_dir), "--quiet"]) == 0
    graph = build_graph(str(run_dir / "pruned.prototxt"))
    for gid, c in content["channels"].items():
        assert graph[gid].channels == content["keep"][gid] < c
    # --keep with --round-to: every cut group a multiple of 4 (64 * 0.6 = 38.4 -> 40; 96 * 0.6 = 57.6 -> 56)
    assert prune_main(["--model", proto, "--weights", model, "--data", images, "--crop", "none", "--images", "16",
                       "--keep", "0.6", "--round-to", "4", "--layers", "c1,u1", "--out", str(tmp_path / "keep"),
                       "--quiet"]) == 0
    graph = build_graph(str(tmp_path / "keep" / "pruned.prototxt"))
    assert graph["c1"].channels == 40 and graph["u1"].channels == 56


def test_the_pipeline_rounds_a_given_keep_and_refuses_latency_flags_it_cannot_steer(tmp_path, capsys):
    """apps.pipeline: --keep with --round-to 16 becomes a table of multiples of 16 (the plan stage); a latency
    target or a runtime with nothing to allocate is one usage error, as is --runtime without a target in
    python -m prune.sensitivity."""
    from apps.pipeline import plan_stage, settings
    from base import cli
    from prune.sensitivity.__main__ import main as sensitivity_main
    proto = sphereface_path(4)
    graph = build_graph(proto)
    base = dict(prototxt=proto, caffemodel=None)
    s = settings(["--model", proto, "--keep", "0.6", "--round-to", "16", "--out", str(tmp_path / "p16")])
    given = plan_stage(s, None, base)
    assert given["round_to"] == 16 and given["keep"] and given["allocation"] == "given"
    assert all(k % 16 == 0 for k in given["keep"].values())
    s = settings(["--model", proto, "--keep", "0.6", "--out", str(tmp_path / "p1")])
    assert plan_stage(s, None, base)["keep"] == {g.id: keep_count(0.6, g.channels) for g in graph.prunable()}
    out = str(tmp_path / "out")
    with pytest.raises(cli.UsageError, match="--latency-target is met by the sensitivity allocation"):
        settings(["--keep", "0.5", "--latency-target", "0.5", "--out", out])
    with pytest.raises(cli.UsageError, match="--runtime ranks the sensitivity allocation's cuts"):
        settings(["--macs-target", "0.5", "--allocation", "uniform", "--runtime", "caffe", "--out", out])
    assert sensitivity_main(["--model", proto, "--weights", "w.caffemodel", "--blob", "fc5", "--data", "d",
                             "--runtime", "caffe", "--out", out]) == 2
    assert "--runtime ranks the cuts of an allocation" in capsys.readouterr().err
    assert not os.path.exists(out)
