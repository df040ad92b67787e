"""The all-pairs protocol (strict operating points) against a brute-force computation, and through the CLI."""
import itertools
import json
import os

import cv2
import numpy as np
import pytest

from eval_lfw import allpairs
from eval_lfw.__main__ import main
from eval_lfw.errors import EvalError


def brute_force(features, labels, far):
    """Every pair by a double loop; the best TAR over every threshold whose FAR (accept: score > t) is <= far."""
    x = [np.asarray(f, np.float64) / np.linalg.norm(f) for f in features]
    gen, imp = [], []
    for i, j in itertools.combinations(range(len(x)), 2):
        (gen if labels[i] == labels[j] else imp).append(float(np.float32(x[i] @ x[j])))
    best = 0.0
    for t in [-np.inf] + sorted(set(gen + imp)):
        if sum(s > t for s in imp) <= far * len(imp):
            best = max(best, sum(s > t for s in gen) / len(gen))
    return best, len(gen), len(imp)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tar_at_far_is_the_brute_force_optimum(seed):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(12), rng.integers(1, 6, 12))
    centres = rng.normal(size=(12, 6))
    feats = centres[labels] + rng.normal(0, 0.9, (len(labels), 6))
    r = allpairs.verify(feats, labels, fars=(0.3, 0.05, 0.01, 1e-9))
    assert [allpairs.far_key(f) for f in (0.3, 0.05, 0.01, 1e-9)] == ["0.3", "0.05", "1e-2", "1e-9"]
    for far in (0.3, 0.05, 0.01, 1e-9):
        key = allpairs.far_key(far)
        tar, n_gen, n_imp = brute_force(feats, labels, far)
        assert r["tar_at_far"][key] == pytest.approx(tar, abs=1e-12), key
    assert (r["n_genuine"], r["n_impostor"]) == (n_gen, n_imp)
    assert r["n_genuine"] + r["n_impostor"] == len(labels) * (len(labels) - 1) // 2


def test_ties_never_let_the_far_exceed_the_target():
    # Every image is one of three directions: scores take only three values, most pairs tie.
    directions = np.eye(3)
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 3])
    feats = directions[[0, 0, 1, 1, 1, 2, 2, 0, 2]]
    genuine, impostor = allpairs.scores(feats, labels)
    for far in (0.0, 0.1, 0.2, 0.5, 0.9, 1.0):
        r = allpairs.verify(feats, labels, fars=(far,))
        key = allpairs.far_key(far)
        t = r["thresholds"][key]
        assert np.mean(impostor > t) <= far + 1e-12
        assert r["tar_at_far"][key] == pytest.approx(brute_force(feats, labels, far)[0])
    # FAR 0 with tied top impostors: nothing at the tied score may pass
    assert allpairs.verify(feats, labels, fars=(1e-9,))["tar_at_far"]["1e-9"] == 0.0


def test_gallery_caps_each_person_at_the_first_images_in_file_order():
    tree = {"Ann": ["Ann/Ann_%04d.jpg" % i for i in range(1, 26)], "Bob": ["Bob/Bob_0001.jpg", "Bob/Bob_0002.jpg"],
            "Cid": ["Cid/Cid_0001.jpg"], "Dee": ["Dee/Dee_0001.jpg"]}
    rels, labels = allpairs.gallery(tree, {"Ann", "Bob", "Cid"}, per_person=10)
    assert rels[:10] == tree["Ann"][:10] and rels[10:] == tree["Bob"] + tree["Cid"]
    assert labels.tolist() == [0] * 10 + [1, 1, 2]
    assert len(allpairs.gallery(tree, {"Ann"}, per_person=None)[0]) == 25
    with pytest.raises(EvalError, match="no image folder"):
        allpairs.gallery(tree, {"Ann", "Eve"})
    with pytest.raises(EvalError, match="2 or more"):
        allpairs.gallery(tree, {"Ann"}, per_person=1)


def test_roc_is_monotone_and_ends_at_all_pairs():
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(20), 3)
    feats = rng.normal(size=(20, 5))[labels] + rng.normal(0, 1.0, (60, 5))
    roc = allpairs.verify(feats, labels)["roc"]
    assert np.all(np.diff(roc["far"]) >= 0) and np.all(np.diff(roc["tar"]) >= 0)
    assert roc["far"][-1] == 1.0 and roc["tar"][-1] == 1.0


def test_cli_all_pairs_on_a_generated_set(tmp_path):
    """python -m eval_lfw --protocol all-pairs with a real Caffe net: every image of the folds' people (capped)."""
    from test_eval_lfw_eval import tiny_net
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    counts = {"Ann": 4, "Bob": 3, "Cid": 2, "Dee": 5, "Eve": 3}
    for name, n in counts.items():
        base = cv2.GaussianBlur(rng.integers(0, 256, (112, 112, 3)).astype(np.uint8), (0, 0), 4)
        os.makedirs(root / name)
        for i in range(1, n + 1):
            img = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
            cv2.imwrite(str(root / name / ("%s_%04d.jpg" % (name, i))), img)
    # fold 1 names Ann, Bob, Cid; fold 2 names Dee and Eve
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("2\t1\nAnn\t1\t2\nAnn\t1\tBob\t1\nDee\t1\t2\nDee\t1\tEve\t1\n")
    model, weights = tiny_net(str(tmp_path))
    out = tmp_path / "out"
    assert main(["--model", model, "--weights", weights, "--blob", "feat", "--lfw-dir", str(root), "--pairs",
                 str(pairs), "--protocol", "all-pairs", "--per-person", "4", "--no-flip", "--no-cache", "--quiet",
                 "--out", str(out)]) == 0
    r = json.load(open(out / "results.json"))["all_pairs"]
    capped = [min(n, 4) for name, n in counts.items() if name != "Cid"]   # Cid is in no pair: in no fold
    assert r["n_images"] == sum(capped) and r["n_people"] == 4 and r["per_person"] == 4
    assert r["n_genuine"] == sum(n * (n - 1) // 2 for n in capped)
    assert r["n_genuine"] + r["n_impostor"] == sum(capped) * (sum(capped) - 1) // 2
    assert set(r["tar_at_far"]) == {"1e-3", "1e-4", "1e-5"}
    assert main(["--model", model, "--weights", weights, "--blob", "feat", "--lfw-dir", str(root), "--pairs",
                 str(pairs), "--protocol", "all-pairs", "--per-person", "1", "--quiet"]) == 2
