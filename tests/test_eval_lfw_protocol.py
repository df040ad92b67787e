"""The fold/threshold logic on features, against hand-computed numbers and brute force."""
import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from eval_lfw.errors import EvalError
from eval_lfw.protocol import accuracy, best_threshold, cross_validate, roc, tar_at_far


def test_best_threshold_hand_case():
    # sorted scores with labels F T F T T; cuts below k lowest: k=0..5 -> 3,4,3,4,3,2 correct
    t, acc = best_threshold([0.3, 0.1, 0.5, 0.2, 0.4], [False, False, True, True, True])
    assert t == pytest.approx(0.15) and acc == pytest.approx(0.8)  # the lowest of the two best cuts


def test_best_threshold_never_splits_equal_scores():
    t, acc = best_threshold([0.2, 0.5, 0.5, 0.9], [False, True, False, True])
    assert acc == pytest.approx(0.75)
    assert accuracy(np.array([0.2, 0.5, 0.5, 0.9]), np.array([False, True, False, True]), t) == acc
    t, acc = best_threshold([0.4, 0.4], [True, True])  # everything "same": below the lowest score
    assert t < 0.4 and acc == 1.0


def test_best_threshold_is_the_brute_force_optimum():
    rng = np.random.default_rng(1)
    for _ in range(20):
        same = rng.random(60) < 0.5
        scores = np.round(rng.normal(same * 0.8, 0.5), 2)  # rounding makes ties
        t, acc = best_threshold(scores, same)
        grid = np.concatenate([[scores.min() - 1], np.unique(scores)])
        best = max(np.mean((scores > g) == same) for g in grid)
        assert acc == pytest.approx(best) and accuracy(scores, same, t) == pytest.approx(acc)


def three_folds():
    """Per fold: a same pair, then a different pair; each fold's four vectors sum to zero."""
    left = np.array([[1, 0], [-1, 1], [0, 1], [1, -1], [1, 1], [0, -1]], float)
    right = np.array([[1, .1], [-1, -1.1], [.5, 1], [-1.5, -1], [-1, .2], [0, -.2]], float)
    same = np.array([True, False] * 3)
    fold = np.array([1, 1, 2, 2, 3, 3])
    return left, right, same, fold


def test_cross_validation_hand_case():
    # Training means are zero, so scores are plain cosines:
    s1, d1 = 1 / math.sqrt(1.01), -0.1 / math.sqrt(2 * 2.21)       # fold 1
    s2, d2 = 1 / math.sqrt(1.25), -0.5 / math.sqrt(2 * 3.25)       # fold 2
    s3, d3 = -0.8 / math.sqrt(2 * 1.04), 1.0                       # fold 3: the net gets it backwards
    # Test 1, train {2,3}: sorted s3(S) d2(D) s2(S) d3(D): the best cut (2 of 4) is below all -> d1 wrong.
    # Test 2, train {1,3}: likewise -> d2 wrong.  Test 3, train {1,2}: cut between d1 and s2 -> both wrong.
    r = cross_validate(*three_folds())
    assert r["folds"] == [1, 2, 3] and r["n_pairs"] == 6
    assert r["fold_accuracy"] == [0.5, 0.5, 0.0]
    assert r["train_accuracy"] == [0.5, 0.5, 1.0]
    assert r["thresholds"][0] < r["scores"][4] and r["thresholds"][0] == pytest.approx(s3)
    assert r["thresholds"][2] == pytest.approx((d1 + s2) / 2)
    assert r["accuracy_mean"] == pytest.approx(1 / 3)
    assert r["accuracy_std"] == pytest.approx(math.sqrt(1 / 18))
    np.testing.assert_allclose(r["scores"], [s1, d1, s2, d2, s3, d3])


def test_mean_of_training_folds_is_subtracted():
    left, right, same, fold = three_folds()
    shifted = cross_validate(left + [100, -50], right + [100, -50], same, fold)
    plain = cross_validate(left, right, same, fold)
    np.testing.assert_allclose(shifted["scores"], plain["scores"], atol=1e-12)
    assert shifted["fold_accuracy"] == plain["fold_accuracy"]


def test_fold_subset_trains_on_the_other_selected_folds_only():
    left, right, same, fold = three_folds()
    r = cross_validate(left, right, same, fold, folds=[1, 2])
    assert r["folds"] == [1, 2] and r["n_pairs"] == 4
    # test 1 trains on fold 2 alone (s2 > d2: cut between them), and d1 < cut < s1
    assert r["fold_accuracy"] == [1.0, 1.0]
    with pytest.raises(EvalError, match="at least 2 folds"):
        cross_validate(left, right, same, fold, folds=[2])
    with pytest.raises(EvalError, match=r"fold\(s\) \[4\]"):
        cross_validate(left, right, same, fold, folds=[1, 4])


def test_roc_and_tar_match_sklearn():
    rng = np.random.default_rng(2)
    same = rng.random(4000) < 0.5
    scores = np.round(rng.normal(same * 2.0, 1.0), 3)
    far, tar, thr = roc(scores, same)
    ref_far, ref_tar, _ = roc_curve(same, scores, drop_intermediate=False)
    np.testing.assert_allclose(far, ref_far)
    np.testing.assert_allclose(tar, ref_tar)
    assert np.trapezoid(tar, far) == pytest.approx(roc_auc_score(same, scores))
    for target in (1e-3, 1e-2, 0.1):
        assert tar_at_far(far, tar, target) == ref_tar[ref_far <= target].max()
    # by hand: 2 different pairs -> FAR steps of 0.5
    far, tar, _ = roc([0.9, 0.8, 0.7, 0.1], [True, False, True, False])
    assert far.tolist() == [0, 0, 0.5, 0.5, 1] and tar.tolist() == [0, 0.5, 0.5, 1, 1]
    assert tar_at_far(far, tar, 1e-3) == 0.5
