"""Recovery components of the fine-tune: similarity-structure distillation (finetune.similarity) and mixup
(finetune.augment), each in Caffe and in a distillation run."""
import csv
import itertools
import json
import os

import caffe
import numpy as np
import pytest
from caffe import layers as L

from base import caffe_io
from finetune import driver
from finetune.similarity import loss_and_gradient
from finetune import trainnet
from finetune.loop import latest_snapshot
from test_finetune import distill_job, image_list, jitter_net, saved_weights, tiny_deploy  # noqa: F401  (fixture)


def brute_force_loss(x, t, hard):
    """The module doc's formula by a double loop over pairs."""
    num = den = 0.0
    for i, j in itertools.combinations(range(len(x)), 2):
        w = np.exp(hard * float(t[i] @ t[j]))
        num += w * (float(x[i] @ x[j]) - float(t[i] @ t[j])) ** 2
        den += w
    return num / den


def rows(rng, n, d):
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("hard", [0.0, 5.0])
def test_loss_and_gradient_against_brute_force_and_finite_differences(hard):
    rng = np.random.default_rng(0)
    x, t = rows(rng, 7, 4), rows(rng, 7, 4)
    loss, grad = loss_and_gradient(x, t, hard)
    assert loss == pytest.approx(brute_force_loss(x, t, hard), rel=1e-12)
    eps, numeric = 1e-6, np.zeros_like(x)
    for i, j in np.ndindex(*x.shape):
        up, down = x.copy(), x.copy()
        up[i, j] += eps
        down[i, j] -= eps
        numeric[i, j] = (brute_force_loss(up, t, hard) - brute_force_loss(down, t, hard)) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-9)
    assert loss_and_gradient(t, t, hard)[0] == 0.0


def similarity_net(tmp_path, n, d, hard, weight):
    net = caffe.NetSpec()
    net.student = L.Input(shape=dict(dim=[n, d]))
    net.teacher = L.Input(shape=dict(dim=[n, d]))
    net.loss = L.Python(net.student, net.teacher, python_param=dict(
        module="finetune.similarity", layer="SimilarityLoss", param_str='{"hard": %g}' % hard), loss_weight=weight)
    proto = net.to_proto()
    proto.force_backward = True
    return caffe.Net(caffe_io.write_net(proto, str(tmp_path / "sim.prototxt")), caffe.TRAIN)


def test_caffe_layer_forward_and_backward(tmp_path):
    rng = np.random.default_rng(1)
    x, t = rows(rng, 6, 5).astype(np.float32), rows(rng, 6, 5).astype(np.float32)
    net = similarity_net(tmp_path, 6, 5, hard=3.0, weight=2.5)
    net.blobs["student"].data[...], net.blobs["teacher"].data[...] = x, t
    out = net.forward()["loss"][0]
    assert float(out) == pytest.approx(brute_force_loss(x.astype(np.float64), t.astype(np.float64), 3.0), rel=1e-5)
    net.backward()
    # Caffe's diff at the student = loss weight x the gradient of the loss: central differences of Caffe forwards
    eps, numeric = 1e-3, np.zeros_like(x)
    for i, j in np.ndindex(*x.shape):
        for sign in (1, -1):
            moved = x.copy()
            moved[i, j] += sign * eps
            net.blobs["student"].data[...] = moved
            numeric[i, j] += sign * 2.5 * float(net.forward()["loss"][0]) / (2 * eps)
    np.testing.assert_allclose(net.blobs["student"].diff, numeric, rtol=2e-2, atol=1e-4)
    assert not net.blobs["teacher"].diff.any()


def test_distillation_with_similarity_trains_the_pairwise_cosines(tmp_path, image_list):  # noqa: F811
    student = tiny_deploy(tmp_path / "student.prototxt", width=4, emb=6, size=(28, 24))
    teacher = tiny_deploy(tmp_path / "teacher.prototxt", width=8, emb=6, size=(28, 24))
    tw = saved_weights(teacher, tmp_path / "teacher.caffemodel")
    job = distill_job(tmp_path, image_list, student, teacher, tw, precompute_teacher=True, mirror=False,
                      similarity_weight=10.0, similarity_hard=2.0)
    done = driver.finetune(job, progress=False)
    train = caffe_io.read_net(os.path.join(job.out, "train.prototxt"))
    sim = [l for l in train.layer if l.name == "similarity_loss"]
    assert len(sim) == 1 and list(sim[0].bottom) == ["student_l2", "teacher_l2"] and sim[0].loss_weight == [10.0]
    losses = np.array([float(r[1]) for r in csv.reader(open(done["loss_csv"]))])
    assert losses[-10:].mean() < losses[:5].mean(), "the weighted loss did not go down"
    # the deployed net is the student alone
    assert caffe_io.open_net(student, done["final"]).blobs["fc5"].data.shape == (1, 6)


def test_bad_similarity_settings_are_refused(tmp_path, image_list):  # noqa: F811
    student = tiny_deploy(tmp_path / "student.prototxt")
    for bad in (dict(similarity_weight=-1.0), dict(similarity_hard=float("nan")), dict(similarity_hard=99.0)):
        job = distill_job(tmp_path, image_list, student, student, None, **bad)
        with pytest.raises(driver.FineTuneError, match="--distill-similarity|--similarity-hard"):
            driver.check_job(job)


def test_mixup_is_the_convex_combination_of_two_images_of_the_batch(tmp_path):
    from finetune.augment import mixup
    x = np.random.default_rng(0).normal(0, 0.5, (6, 3, 8, 6)).astype(np.float32)
    net = caffe.Net(jitter_net(tmp_path / "m.prototxt", x.shape, dict(mixup=1.0, seed=3)), caffe.TRAIN)
    net.blobs["data"].data[...] = x
    out = net.forward()["out"].copy()
    for i in range(6):
        # out_i = lam x_i + (1 - lam) x_j for one j of the batch and one lam in [0, 1]: solve for lam per j
        fits = []
        for j in range(6):
            d = (x[i] - x[j]).ravel()
            lam = 1.0 if not d.any() else float(d @ (out[i] - x[j]).ravel() / (d @ d))
            fits.append((np.abs(lam * x[i] + (1 - lam) * x[j] - out[i]).max(), lam))
        err, lam = min(fits)
        assert err < 1e-5 and -1e-6 <= lam <= 1 + 1e-6
    blended, partner, lam = mixup(x, np.random.default_rng(1), 0.4)
    assert sorted(partner) == list(range(6))
    np.testing.assert_allclose(blended, lam[:, None, None, None] * x + (1 - lam[:, None, None, None]) * x[partner],
                               rtol=1e-6)
    net = caffe.Net(jitter_net(tmp_path / "t.prototxt", x.shape, dict(mixup=1.0)), caffe.TEST)
    net.blobs["data"].data[...] = x
    np.testing.assert_array_equal(net.forward()["out"], x)


def test_mixup_distillation_shows_the_teacher_the_same_blend(tmp_path, image_list):  # noqa: F811
    student = tiny_deploy(tmp_path / "student.prototxt", width=4, emb=6, size=(28, 24))
    teacher = tiny_deploy(tmp_path / "teacher.prototxt", width=8, emb=6, size=(28, 24))
    tw = saved_weights(teacher, tmp_path / "teacher.caffemodel")
    job = distill_job(tmp_path, image_list, student, teacher, tw, augment_mixup=1.0, mirror=False)
    done = driver.finetune(job, progress=False)
    train = caffe_io.read_net(os.path.join(job.out, "train.prototxt"))
    augment = [l for l in train.layer if l.name == "augment"][0]
    assert json.loads(augment.python_param.param_str)["mixup"] == 1.0
    snap = latest_snapshot(os.path.join(job.out, "snapshots"))[1].replace(".solverstate", ".caffemodel")
    net = caffe.Net(os.path.join(job.out, "train.prototxt"), snap, caffe.TRAIN)   # student and frozen teacher
    net.forward()
    # the blend is what both nets read: the teacher's embedding of the blended images, computed apart
    assert not np.array_equal(net.blobs["data"].data, net.blobs["data_plain"].data)
    alone = caffe_io.open_net(teacher, tw)
    alone.blobs["data"].reshape(*net.blobs["data"].data.shape)
    alone.blobs["data"].data[...] = net.blobs["data"].data
    np.testing.assert_allclose(alone.forward()["fc5"], net.blobs[trainnet.TEACHER + "fc5"].data, rtol=1e-4,
                               atol=1e-5)
    with pytest.raises(driver.FineTuneError, match="--augment-mixup"):
        driver.check_job(distill_job(tmp_path / "bad", image_list, student, teacher, tw, augment_mixup=-1.0))
