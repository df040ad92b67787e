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
from finetune.snapshots import latest as latest_snapshot
from prune.plans import PlanSpec, make as make_plan
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


def bn_net(path, inplace):
    """conv1 -> BN -> Scale -> PReLU (foldable); conv2 read twice (not); conv3 -> BN with batch statistics (not)."""
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 3, 12, 10]))
    n.conv1 = L.Convolution(n.data, num_output=5, kernel_size=3, pad=1, bias_term=False)
    if inplace:
        n.bn1 = L.BatchNorm(n.conv1, batch_norm_param=dict(use_global_stats=True, eps=1e-3), in_place=True)
        n.sc1 = L.Scale(n.bn1, bias_term=True, in_place=True)
        top = n.sc1
    else:
        n.bn1 = L.BatchNorm(n.conv1, batch_norm_param=dict(use_global_stats=True, eps=1e-3))
        n.sc1 = L.Scale(n.bn1, bias_term=True)
        top = n.sc1
    n.relu1 = L.PReLU(top, in_place=True)
    n.conv2 = L.Convolution(n.relu1, num_output=4, kernel_size=1)
    n.bn2 = L.BatchNorm(n.conv2, batch_norm_param=dict(use_global_stats=True))
    n.sc2 = L.Scale(n.bn2, bias_term=True)
    n.side = L.Eltwise(n.conv2, n.sc2)
    n.conv3 = L.Convolution(n.side, num_output=4, kernel_size=3, group=4)
    n.bn3 = L.BatchNorm(n.conv3)
    n.sc3 = L.Scale(n.bn3, bias_term=True)
    n.fc = L.InnerProduct(n.sc3, num_output=3)
    return caffe_io.write_net(n.to_proto(), str(path))


def random_bn_weights(proto, seed):
    rng = np.random.default_rng(seed)
    net = caffe.Net(proto, caffe.TEST)
    out = {}
    for name, blobs in net.params.items():
        arrays = [rng.normal(0, 0.5, b.data.shape).astype(np.float32) for b in blobs]
        if net.layers[list(net._layer_names).index(name)].type == "BatchNorm":
            sf = np.float32(0.7)   # Caffe stores sums: mean = blob0 / factor, var = blob1 / factor
            arrays = [arrays[0] * sf, np.abs(arrays[1]) * sf + 0.1, np.array([sf], np.float32)]
        out[name] = arrays
    return out


@pytest.mark.parametrize("inplace", [True, False])
def test_folded_batchnorm_computes_the_same_and_unfolds_into_the_deploy_layers(tmp_path, inplace):
    from finetune import fold
    proto = bn_net(tmp_path / "bn.prototxt", inplace)
    net, weights = caffe_io.read_net(proto), random_bn_weights(proto, 0)
    folded, fw, found = fold.fold(net, weights)
    assert [(c.conv, c.bn, c.scale) for c in found] == [("conv1", "bn1", "sc1")]
    assert [l.name for l in folded.layer if l.type in ("BatchNorm", "Scale")] == ["bn2", "sc2", "bn3", "sc3"]
    x = np.random.default_rng(1).normal(size=(2, 3, 12, 10)).astype(np.float32)

    def run(param, w):
        n = caffe.Net(caffe_io.write_net(param, str(tmp_path / "n.prototxt")), caffe.TEST)
        for name, arrays in w.items():
            for blob, a in zip(n.params[name], arrays):
                blob.data[...] = a
        n.blobs["data"].data[...] = x
        return n.forward()["fc"].copy()

    ref = run(net, weights)
    np.testing.assert_allclose(run(folded, fw), ref, rtol=1e-5, atol=1e-5)
    back = fold.unfold({k: v for k, v in fw.items()}, found, net)
    assert set(back) == set(weights) and [a.shape for a in back["conv1"]] == [a.shape for a in weights["conv1"]]
    np.testing.assert_allclose(run(net, back), ref, rtol=1e-5, atol=1e-5)


def test_finetune_with_folded_batchnorm_writes_the_deploy_net(tmp_path, image_list):  # noqa: F811
    root, listing = image_list
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, 28, 24]))
    n.conv1 = L.Convolution(n.data, num_output=4, kernel_size=3, stride=2, bias_term=False)
    n.bn1 = L.BatchNorm(n.conv1, batch_norm_param=dict(use_global_stats=True))
    n.sc1 = L.Scale(n.bn1, bias_term=True, in_place=True)
    n.relu1 = L.PReLU(n.sc1, in_place=True)
    n.fc5 = L.InnerProduct(n.relu1, num_output=6)
    student = caffe_io.write_net(n.to_proto(), str(tmp_path / "student.prototxt"))
    weights = caffe_io.write_weights(caffe_io.read_net(student), random_bn_weights(student, 2),
                                     str(tmp_path / "student.caffemodel"))
    teacher = tiny_deploy(tmp_path / "teacher.prototxt", width=8, emb=6, size=(28, 24))
    tw = saved_weights(teacher, tmp_path / "teacher.caffemodel")
    job = driver.FineTuneJob(deploy=student, weights=weights, train_list=listing, root_folder=root,
                             out=str(tmp_path / "run"), teacher=teacher, teacher_weights=tw, epochs=2, batch_size=8,
                             base_lr=0.01, snapshot_every=0, mirror=False, fold_bn=True)
    done = driver.finetune(job, progress=False)
    train = caffe_io.read_net(os.path.join(job.out, "train.prototxt"))
    assert not [l.name for l in train.layer if l.name in ("bn1", "sc1")] and "BatchNorm" not in [l.type for l in
                                                                                                   train.layer]
    final = caffe_io.read_weights(done["final"])
    assert set(final) == set(caffe_io.read_weights(weights))
    np.testing.assert_allclose(final["bn1"][1], 1 - 1e-5)      # BatchNorm became the identity
    np.testing.assert_array_equal(final["sc1"][0], 1)
    # the deploy net with the final weights computes what the trained (folded) student computes
    snap = latest_snapshot(os.path.join(job.out, "snapshots"))[1].replace(".solverstate", ".caffemodel")
    net = caffe.Net(os.path.join(job.out, "train.prototxt"), snap, caffe.TEST)
    net.forward()
    deployed = caffe_io.open_net(student, done["final"])
    deployed.blobs["data"].reshape(*net.blobs["data"].data.shape)
    deployed.blobs["data"].data[...] = net.blobs["data"].data
    np.testing.assert_allclose(deployed.forward()["fc5"], net.blobs["fc5"].data, rtol=1e-4, atol=1e-5)


def test_blockwise_fit_lowers_each_blocks_error_towards_the_unpruned_block(tmp_path):
    """A small residual net pruned to half by least squares, then every block fitted to the unpruned block's
    output (finetune.blockfit): no block's held-out error rises, some fall, and so does the net's."""
    from finetune import blockfit
    from nets import caffe_forward, random_weights
    from prune.driver import PruneJob, run
    from test_retention import _batches, _write, low_dimensional_images, small_residual_net
    proto = _write(small_residual_net(), tmp_path / "res.prototxt")
    weights = random_weights(proto, seed=0)
    model = caffe_io.write_weights(caffe_io.read_net(proto), weights, str(tmp_path / "res.caffemodel"))
    x, held = low_dimensional_images(256, 1), low_dimensional_images(64, 2)
    log = run(PruneJob(model=proto, weights=model, out=str(tmp_path / "prune"), plan=make_plan(PlanSpec(), proto)), _batches(x, 64),
              progress=False)
    student = caffe_io.read_net(log["prototxt"])
    assert [(s, b) for s, b, _ in blockfit.blocks(student)] == [("data", "s1"), ("s1", "s2"), ("s2", "fc")]
    fitted, record = blockfit.fit(student, caffe_io.read_weights(log["caffemodel"]), caffe_io.read_net(proto),
                                  weights, x, out_map=log["steps"][-1]["out_map"], epochs=30, lr=1e-3, batch=16,
                                  progress=False)
    assert all(r["error_after"] <= r["error_before"] for r in record if r["kept"])
    assert any(r["kept"] and r["error_after"] < 0.9 * r["error_before"] for r in record), record
    out = caffe_io.write_weights(student, fitted, str(tmp_path / "fitted.caffemodel"))
    want = caffe_forward(proto, weights, held)["fc"]

    def error(w):
        return float(np.mean((caffe_forward(log["prototxt"], w, held)["fc"] - want) ** 2) / np.mean(want ** 2))
    assert error(caffe_io.read_weights(out)) < error(caffe_io.read_weights(log["caffemodel"]))


def test_prune_driver_runs_the_blockwise_fit_after_the_last_cut_and_resumes_it(tmp_path):
    from nets import caffe_forward, random_weights
    from prune.driver import PruneJob, run
    from test_retention import _batches, _write, low_dimensional_images, small_residual_net
    proto = _write(small_residual_net(), tmp_path / "res.prototxt")
    weights = random_weights(proto, seed=1)
    model = caffe_io.write_weights(caffe_io.read_net(proto), weights, str(tmp_path / "res.caffemodel"))
    x, held = low_dimensional_images(256, 1), low_dimensional_images(64, 2)
    want = caffe_forward(proto, weights, held)["fc"]
    errors = {}
    for epochs in (0, 20):
        job = PruneJob(model=proto, weights=model, out=str(tmp_path / ("e%d" % epochs)),
                       plan=make_plan(PlanSpec(), proto),
                       blockfit_epochs=epochs, blockfit_lr=1e-3)
        log = run(job, _batches(x, 64), progress=False)
        got = caffe_forward(log["prototxt"], caffe_io.read_weights(log["caffemodel"]), held)["fc"]
        errors[epochs] = float(np.mean((got - want) ** 2) / np.mean(want ** 2))
    assert errors[20] < errors[0], errors
    record = json.load(open(tmp_path / "e20" / "blockfit" / "record.json"))
    assert len(record["blocks"]) == 3 and os.path.exists(record["caffemodel"])
    before = os.path.getmtime(record["caffemodel"])
    assert run(job, _batches(x, 64), progress=False)["caffemodel"] == log["caffemodel"]   # done: not fitted again
    assert os.path.getmtime(record["caffemodel"]) == before
