"""One plan spec, three entry points (python -m prune, python -m prune.sensitivity, apps.pipeline): the same
plan file (prune.plans.make); a plan file's counts are run as they stand, edited by hand or not.  (A plan
file naming an unknown group or a count out of range is refused up front: tests/test_bad_inputs.py.)"""
import json

import pytest

from base import caffe_io
from nets import random_weights
from prune.graph import build_graph
from test_bnscale import bn_net

SPECS = {
    "table, rounded": ["--keep", "c1=0.5,c2=0.7", "--round-to", "4"],
    "uniform MACs target": ["--macs-target", "0.6", "--allocation", "uniform", "--layers", "c2,c1"],
    "threshold": ["--threshold", "0.1"],
}


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    """A residual stream (c1) and an inner group (c2) with BatchNorm + Scale, |gamma| set so that a 0.1
    threshold cuts both; generated faces of the net's input size."""
    from apps.synthetic import make_dataset
    folder = tmp_path_factory.mktemp("plans")
    proto = caffe_io.write_net(bn_net(), str(folder / "bn.prototxt"))
    weights = random_weights(proto, seed=2)
    weights["sc1"][0][:] = [0.9, -0.02, 0.5, 0.05, 0.0, 0.3, 0.01, 0.2]
    weights["sc3"][0][:] = [0.01, 0.03, -0.6, 0.02, 0.04, 0.0, 0.01, 0.0]
    weights["sc2"][0][:] = [0.05, -0.4, 0.3, 0.02, 0.15, -0.09, 0.5, 0.11]
    model = caffe_io.write_weights(caffe_io.read_net(proto), weights, str(folder / "bn.caffemodel"))
    images, _ = make_dataset(str(folder / "data"), identities_per_fold=2, images_per_identity=2, size=12,
                             pairs_per_fold=1)
    return dict(model=proto, weights=model, images=images)


SENSITIVITY = ["--judge-images", "4", "--ratios", "0.5"]     # the analysis's grid, for the sensitivity policy


def prune_flags(kit, out):
    return ["--model", kit["model"], "--weights", kit["weights"], "--data", kit["images"], "--crop", "none",
            "--images", "8", "--out", str(out), "--quiet"]


def through_prune(kit, flags, out):
    from prune.__main__ import main
    assert main(prune_flags(kit, out) + SENSITIVITY + flags) == 0
    return json.loads((out / "plan.json").read_text())


def through_sensitivity(kit, flags, out):
    from prune.sensitivity.__main__ import main
    assert main(prune_flags(kit, out) + ["--blob", "fc"] + SENSITIVITY + flags) == 0
    assert (out / "sensitivity.json").exists()
    return json.loads((out / "plan.json").read_text())


def through_pipeline(kit, flags, out):
    from apps.pipeline import plan_stage, settings
    s = settings(["--model", kit["model"], "--weights", kit["weights"], "--blob", "fc", "--images", "8",
                  "--out", str(out), "--quiet"] + SENSITIVITY + flags)
    record = plan_stage(s, dict(train_list=kit["images"], train_root=""),
                        dict(prototxt=kit["model"], caffemodel=kit["weights"]))
    content = json.loads((out / "plan" / "plan.json").read_text())
    assert {k: record[k] for k in content} == content      # the stage's record is the plan, and more
    return content


@pytest.mark.parametrize("spec", list(SPECS))
def test_one_spec_makes_the_same_plan_file_in_every_entry_point(kit, tmp_path, spec):
    flags = SPECS[spec]
    got = {how.__name__: how(kit, flags, tmp_path / how.__name__)
           for how in (through_prune, through_sensitivity, through_pipeline)}
    plan = got["through_prune"]
    assert got["through_sensitivity"] == plan and got["through_pipeline"] == plan
    assert plan["made_by"]["net"] == kit["model"] and set(plan["keep"]) == {"c1", "c2"}
    assert all(1 <= plan["keep"][g] < plan["channels"][g] == 8 for g in plan["keep"])
    if spec == "table, rounded":
        assert plan["keep"] == {"c1": 4, "c2": 4} and plan["round_to"] == 4     # 0.7 x 8 = 5.6 -> 4
    elif spec == "threshold":
        assert plan["kept_channels"] == {"c1": [0, 2, 5, 7], "c2": [1, 2, 4, 6, 7]}
    else:
        assert plan["made_by"]["macs_share"] <= 0.6 and plan["made_by"]["layers"] == ["c2", "c1"]
    pruned = build_graph(str(tmp_path / "through_prune" / "pruned.prototxt"))
    assert {g: pruned[g].channels for g in plan["keep"]} == plan["keep"]


def test_the_sensitivity_allocation_is_a_policy_of_every_entry_point(kit, tmp_path):
    """--macs-target (the sensitivity allocation by default) in python -m prune, prune.sensitivity and the
    pipeline: the same flags and images (--data) give the same plan in the first two; the pipeline, whose
    images come from its training list, makes a plan of the same kind that meets the target."""
    flags = ["--macs-target", "0.6"]
    plan = through_prune(kit, flags, tmp_path / "prune")
    assert (tmp_path / "prune" / "plan" / "sensitivity.json").exists()
    assert through_sensitivity(kit, flags, tmp_path / "sensitivity") == plan
    piped = through_pipeline(kit, flags, tmp_path / "pipeline")
    for made_by in (plan["made_by"], piped["made_by"]):
        assert made_by["policy"] == "sensitivity" and made_by["macs_share"] <= 0.6 and made_by["ratios"] == [0.5]
        assert made_by["criterion"] == "thinet" and made_by["predicted_damage"] > 0
    pruned = build_graph(str(tmp_path / "prune" / "pruned.prototxt"))
    assert {g: pruned[g].channels for g in plan["keep"]} == plan["keep"]


def test_a_plan_file_with_edited_counts_is_run_as_edited(kit, tmp_path):
    """Counts no policy gives (3 and 5 of 8) written into a plan file by hand: python -m prune cuts exactly
    those, the run's plan says it came from that file (and what made the file); --round-to rounds them;
    prune.sensitivity and apps.pipeline read the same counts."""
    from prune.__main__ import main as prune_main
    made = through_prune(kit, ["--keep", "0.5"], tmp_path / "made")
    assert made["keep"] == {"c1": 4, "c2": 4} and made["ratios"] == {"c1": 0.5, "c2": 0.5}
    made["keep"] = {"c1": 3, "c2": 5}                  # the ratios left as they were: only counts are read
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(made))
    run = through_prune(kit, ["--plan", str(edited)], tmp_path / "run")
    assert run["keep"] == {"c1": 3, "c2": 5} and run["ratios"] == {"c1": 0.375, "c2": 0.625}
    assert run["made_by"]["policy"] == "file" and run["made_by"]["file"] == str(edited)
    assert run["made_by"]["then"]["keep"] == 0.5
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    assert [(s["group"], s["kept"]) for s in log["steps"]] == [("c1", 3), ("c2", 5)]
    pruned = build_graph(str(tmp_path / "run" / "pruned.prototxt"))
    assert pruned["c1"].channels == 3 and pruned["c2"].channels == 5
    assert prune_main(prune_flags(kit, tmp_path / "rounded") + ["--plan", str(edited), "--round-to", "4"]) == 0
    log = json.loads((tmp_path / "rounded" / "log.json").read_text())
    assert [(s["group"], s["kept"]) for s in log["steps"]] == [("c1", 4), ("c2", 4)]
    for how in (through_sensitivity, through_pipeline):
        assert how(kit, ["--plan", str(edited)], tmp_path / how.__name__)["keep"] == {"c1": 3, "c2": 5}


def test_a_plan_file_is_checked_against_the_net(kit):
    """Names, counts, the widths it was made for and the channels it chose, each refused with what is wrong;
    kept channel sets are used only where their size is the count."""
    from prune.policy import PruneError, from_json
    graph = build_graph(kit["model"])
    plan = from_json({"keep": {"c3": 4, "c2": 5}, "channels": {"c1": 8, "c2": 8},
                      "kept_channels": {"c1": [0, 1, 2, 3], "c2": [0, 1]}}, graph, "p.json")
    assert plan.keep == {"c1": 4, "c2": 5} and plan.kept == {"c1": [0, 1, 2, 3]}     # c3: a producer of c1
    for bad, says in (({"keep": {"c1": 4}, "channels": {"c1": 16}}, "made for another net"),
                      ({"keep": {"c1": 8}}, "nothing to prune"),
                      ({"keep": {}}, "empty"),
                      ({"keep": [4]}, "is not a plan file"),
                      ({"keep": {"c1": 3}, "kept_channels": {"c1": [0, 0, 9]}}, r"distinct channels 0\.\.7"),
                      ({"keep": {"fc": 3}}, "'fc' cannot be pruned"),
                      ({"keep": {"c1": True}}, "whole number"),
                      ({"keep": {"c1": 3, "c3": 2}}, "named twice")):
        with pytest.raises(PruneError, match=says):
            from_json(bad, graph, "p.json")
