"""Fine-tune driver on real Caffe: distillation, A-Softmax, resume after a kill, bad input."""
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
import caffe
from caffe import layers as L

from base import caffe_io
from base import lists
from finetune import driver, heads, solver, trainnet
from finetune.snapshots import latest as latest_snapshot
from conftest import ROOT


def tiny_deploy(path, width=8, emb=6, size=(24, 20)):
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, size[0], size[1]]))
    n.conv1 = L.Convolution(n.data, num_output=width, kernel_size=3, stride=2, pad=1, weight_filler=dict(type="xavier"))
    n.relu1 = L.PReLU(n.conv1, in_place=True)
    n.fc5 = L.InnerProduct(n.conv1, num_output=emb, weight_filler=dict(type="xavier"))
    caffe_io.write_net(n.to_proto(), str(path))
    return str(path)


@pytest.fixture(scope="module")
def image_list(tmp_path_factory):
    """40 generated images of 4 'identities' (a colour pattern each, plus noise)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    lines = []
    for person in range(4):
        base = rng.integers(0, 255, (28, 24, 3))
        os.makedirs(root / ("p%d" % person))
        for k in range(10):
            img = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / ("p%d" % person) / ("%d.jpg" % k))
            lines.append("p%d/%d.jpg %d" % (person, k, person))
    listing = root / "train.txt"
    listing.write_text("\n".join(lines) + "\n")
    return str(root), str(listing)


def saved_weights(proto, path):
    net = caffe.Net(proto, caffe.TEST)
    net.save(str(path))
    return str(path)


def distill_job(tmp_path, image_list, student, teacher, teacher_weights, **settings):
    """A short distillation job of ``student`` from ``teacher`` on the fixture's list."""
    root, listing = image_list
    return driver.FineTuneJob(deploy=student, weights=None, train_list=listing, root_folder=root,
                              out=str(tmp_path / "run"), teacher=teacher, teacher_weights=teacher_weights, epochs=8,
                              batch_size=8, base_lr=0.05, snapshot_every=0, **settings)


def test_distillation_trains_student_and_keeps_teacher_frozen(tmp_path, image_list):
    root, listing = image_list
    student = tiny_deploy(tmp_path / "student.prototxt", width=4, emb=5)
    teacher = tiny_deploy(tmp_path / "teacher.prototxt", width=8, emb=6, size=(28, 24))
    tw = saved_weights(teacher, tmp_path / "teacher.caffemodel")
    job = distill_job(tmp_path, image_list, student, teacher, tw, rgb=True, teacher_rgb=False)
    done = driver.finetune(job, progress=False)
    train = caffe_io.read_net(os.path.join(job.out, "train.prototxt"))
    types = [l.type for l in train.layer]
    # dims differ (5 vs 6): a projection; sizes differ: a centre crop; student RGB, teacher BGR: one plane swap
    assert "distill_proj" in [l.name for l in train.layer]
    assert types.count("Crop") == 1 and types.count("Slice") == 1
    rows = list(csv.reader(open(done["loss_csv"])))
    assert len(rows) == done["iterations"] == 40
    losses = np.array([float(r[1]) for r in rows])
    assert losses[-10:].mean() < losses[:5].mean(), "distillation loss did not go down"
    # the teacher is frozen: its weights in Caffe's last snapshot equal the given ones
    snap = latest_snapshot(os.path.join(job.out, "snapshots"))[1].replace(".solverstate", ".caffemodel")
    after = caffe_io.read_weights(snap)
    for name, arrays in caffe_io.read_weights(tw).items():
        for a, b in zip(arrays, after[trainnet.TEACHER + name]):
            np.testing.assert_array_equal(a, b)
    # the result is weights for the unchanged deploy prototxt
    net = caffe_io.open_net(student, done["final"])
    assert net.blobs["fc5"].data.shape == (1, 5)
    # a finished job asked again returns at once with the same record
    assert driver.finetune(job, progress=False) == done


def test_precomputed_teacher_table_matches_the_teacher_and_trains(tmp_path, image_list):
    """The teacher's embeddings are computed once into a file the train net reads row by row (the list's label):
    the rows are the teacher's outputs, no snapshot holds them, and the loss curve is the one of the same run
    with the teacher inside the train net (no mirroring: the same target for every image)."""
    root, listing = image_list
    student = tiny_deploy(tmp_path / "student.prototxt", width=4, emb=6, size=(28, 24))
    teacher = tiny_deploy(tmp_path / "teacher.prototxt", width=8, emb=6, size=(28, 24))
    tw = saved_weights(teacher, tmp_path / "teacher.caffemodel")
    job = distill_job(tmp_path, image_list, student, teacher, tw, precompute_teacher=True, mirror=False)
    done = driver.finetune(job, progress=False)
    train = caffe_io.read_net(os.path.join(job.out, "train.prototxt"))
    tables = [l for l in train.layer if l.type == "Python" and l.python_param.layer == "TeacherTable"]
    assert len(tables) == 1 and not any(l.type == "Embed" for l in train.layer)
    assert not any(l.name.startswith(trainnet.TEACHER) and l.type == "Convolution" for l in train.layer)
    # row i of the table file is the teacher's embedding of line i of the index list, as Caffe computes it
    table = np.load(os.path.join(job.out, "teacher_table.npy"))
    index = lists.read_list(os.path.join(job.out, "teacher_index.txt"), root)
    assert [label for _, label in index] == list(range(len(index))) == list(range(len(table)))
    net = caffe_io.open_net(teacher, tw)
    for path, row in [index[0], index[17]]:
        img = np.asarray(Image.open(path).convert("RGB"))[:, :, ::-1].astype(np.float32)   # BGR, as Caffe reads
        net.blobs["data"].data[...] = ((img - 127.5) * 0.0078125).transpose(2, 0, 1)[None]
        np.testing.assert_allclose(table[row], net.forward()["fc5"][0], rtol=1e-4, atol=1e-5)
    # snapshots and the final weights are the student's alone, whatever the table's length
    snap = latest_snapshot(os.path.join(job.out, "snapshots"))[1].replace(".solverstate", ".caffemodel")
    student_layers = {l.name for l in caffe_io.read_net(student).layer}
    assert set(caffe_io.read_weights(snap)) <= student_layers
    assert set(caffe_io.read_weights(done["final"])) <= student_layers
    losses = np.array([float(r[1]) for r in csv.reader(open(done["loss_csv"]))])
    assert losses[-10:].mean() < losses[:5].mean(), "distillation loss did not go down"
    online = distill_job(tmp_path / "online", image_list, student, teacher, tw, precompute_teacher=False,
                         mirror=False)
    again = np.array([float(r[1]) for r in csv.reader(open(driver.finetune(online, progress=False)["loss_csv"]))])
    np.testing.assert_allclose(again, losses, rtol=1e-3, atol=1e-6)


def residual_deploy(path, inner=8, size=(28, 24)):
    """conv1 (8) -> conv2 (inner) -> conv3 (8) -> res = conv1 + conv3 -> fc5: one residual block."""
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, size[0], size[1]]))
    xavier = dict(type="xavier")
    n.conv1 = L.Convolution(n.data, num_output=8, kernel_size=3, stride=2, pad=1, weight_filler=xavier)
    n.conv2 = L.Convolution(n.conv1, num_output=inner, kernel_size=1, weight_filler=xavier)
    n.relu2 = L.ReLU(n.conv2, in_place=True)
    n.conv3 = L.Convolution(n.conv2, num_output=8, kernel_size=3, pad=1, weight_filler=xavier)
    n.res = L.Eltwise(n.conv1, n.conv3)
    n.fc5 = L.InnerProduct(n.res, num_output=6, weight_filler=xavier)
    caffe_io.write_net(n.to_proto(), str(path))
    return str(path)


def test_feature_maps_are_copied_from_the_teacher(tmp_path, image_list):
    root, listing = image_list
    student = residual_deploy(tmp_path / "student.prototxt", inner=3)
    teacher = residual_deploy(tmp_path / "teacher.prototxt")
    tw = saved_weights(teacher, tmp_path / "teacher.caffemodel")
    job = distill_job(tmp_path, image_list, student, teacher, tw, distill_features=("auto",), feature_weight=2.0,
                      mirror=False)
    done = driver.finetune(job, progress=False)
    train = caffe_io.read_net(os.path.join(job.out, "train.prototxt"))
    hints = [l for l in train.layer if l.type == "EuclideanLoss" and l.name.startswith("feature_loss_")]
    # 'auto': the one Eltwise output, whose shape (8 x 14 x 12) the student shares; each weight / its size
    assert [(l.bottom[0], l.bottom[1]) for l in hints] == [("res", trainnet.TEACHER + "res")]
    assert hints[0].loss_weight[0] == pytest.approx(2.0 / (8 * 14 * 12))
    # Caffe's hint loss is the weight x half the mean squared difference of the two maps, per image
    net = caffe.Net(os.path.join(job.out, "train.prototxt"), done["final"], caffe.TRAIN)
    net.forward()
    s, t = net.blobs["res"].data, net.blobs[trainnet.TEACHER + "res"].data
    expected = 2.0 * 0.5 * ((s - t) ** 2).sum() / s.size
    np.testing.assert_allclose(float(net.blobs["feature_loss_res"].data) * hints[0].loss_weight[0], expected,
                               rtol=1e-4)
    # the logged loss is the one the solver minimises: each term times its weight
    weighted = float(net.blobs["distill_loss"].data) + expected
    from finetune.loop import loss_value
    assert loss_value(net) == pytest.approx(weighted, rel=1e-4)
    # and training moved the student's map towards the teacher's, on an image, in the deploy nets
    img = np.random.default_rng(1).normal(0, 0.5, (1, 3, 28, 24)).astype(np.float32)

    def gap(weights):
        a, b = caffe_io.open_net(student, weights), caffe_io.open_net(teacher, tw)
        a.blobs["data"].data[...] = img
        b.blobs["data"].data[...] = img
        a.forward()
        b.forward()
        return float(((a.blobs["res"].data - b.blobs["res"].data) ** 2).mean())

    control = distill_job(tmp_path / "control", image_list, student, teacher, tw, mirror=False)   # embedding only
    g, c = gap(done["final"]), gap(driver.finetune(control, progress=False)["final"]); print("GAP", g, c)
    assert g < 0.75 * c


def test_feature_maps_bad_input_is_named(tmp_path, image_list):
    student = residual_deploy(tmp_path / "student.prototxt")
    teacher = residual_deploy(tmp_path / "teacher.prototxt", size=(28, 24))
    narrow = tiny_deploy(tmp_path / "narrow.prototxt", width=4, size=(28, 24))
    tw = saved_weights(teacher, tmp_path / "teacher.caffemodel")
    for deploy, features, extra, message in [
            (student, ("conv9",), {}, "blob 'conv9' is not in the student nor the teacher net"),
            (narrow, ("conv1",), {}, "blob 'conv1' is 4x14x12 in the student but 8x14x12 in the teacher"),
            (student, ("res",), dict(precompute_teacher=True), "drop --precompute-teacher")]:
        job = distill_job(tmp_path, image_list, deploy, teacher, tw, distill_features=features, **extra)
        with pytest.raises(heads.HeadError, match=re.escape(message)):
            driver.finetune(job, progress=False)
        assert not os.path.exists(job.out) or not os.listdir(job.out)


def jitter_net(path, shape, phase_params):
    """A net of one Input and the Jitter layer, for Caffe to run the augmentation on given images."""
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=list(shape)))
    n.out = L.Python(n.data, module="finetune.augment", layer="Jitter", param_str=json.dumps(phase_params))
    caffe_io.write_net(n.to_proto(), str(path))
    return str(path)


def test_augmentation_in_caffe(tmp_path):
    x = np.random.default_rng(0).normal(0, 0.5, (4, 3, 16, 12)).astype(np.float32)

    def run(params, phase=caffe.TRAIN, images=x):
        net = caffe.Net(jitter_net(tmp_path / "j.prototxt", images.shape, params), phase)
        net.blobs["data"].data[...] = images
        return net.forward()["out"].copy()

    # colour: per image and plane, out = gain * in + offset, gain within 1 +- 0.2, one offset per image
    out = run(dict(colour=0.2))
    for i in range(4):
        offsets = []
        for c in range(3):
            gain, offset = np.polyfit(x[i, c].ravel(), out[i, c].ravel(), 1)
            assert 0.8 - 1e-4 <= gain <= 1.2 + 1e-4
            np.testing.assert_allclose(out[i, c], gain * x[i, c] + offset, atol=1e-5)
            offsets.append(offset)
        assert np.ptp(offsets) < 1e-5 and abs(offsets[0]) <= 0.2 + 1e-5
    # shift: each image is a translation by at most 2 pixels each way, the border repeated
    out = run(dict(shift=2))
    for i in range(4):
        padded = np.pad(x[i], ((0, 0), (2, 2), (2, 2)), mode="edge")
        assert any(np.array_equal(out[i], padded[:, 2 - dy:2 - dy + 16, 2 - dx:2 - dx + 12])
                   for dy in range(-2, 3) for dx in range(-2, 3))
    # no state: the same batch gets the same change (a resumed run replays the same images), another batch not
    params = dict(shift=3, scale=0.1, colour=0.1, seed=5)
    np.testing.assert_array_equal(run(params), run(params))
    assert not np.array_equal(run(params, images=x[::-1].copy())[::-1], run(params))
    # TEST phase: the images as they are
    np.testing.assert_array_equal(run(params, phase=caffe.TEST), x)


def test_augmented_distillation_feeds_the_teacher_the_same_images(tmp_path, image_list):
    student = tiny_deploy(tmp_path / "student.prototxt", width=4, emb=6, size=(28, 24))
    teacher = tiny_deploy(tmp_path / "teacher.prototxt", width=8, emb=6, size=(28, 24))
    tw = saved_weights(teacher, tmp_path / "teacher.caffemodel")
    job = distill_job(tmp_path, image_list, student, teacher, tw, augment_shift=2, augment_scale=0.05,
                      augment_colour=0.1, mirror=False)
    done = driver.finetune(job, progress=False)
    net = caffe.Net(os.path.join(job.out, "train.prototxt"), done["final"], caffe.TRAIN)
    net.forward()
    assert not np.array_equal(net.blobs["data"].data, net.blobs["data_plain"].data)
    conv = [l for l in caffe_io.read_net(os.path.join(job.out, "train.prototxt")).layer
            if l.name == trainnet.TEACHER + "conv1"][0]
    assert conv.bottom[0] == "data", "the teacher reads the augmented images"
    with pytest.raises(heads.HeadError, match="drop --precompute-teacher"):
        driver.finetune(distill_job(tmp_path / "t", image_list, student, teacher, tw, augment_shift=2,
                                    precompute_teacher=True), progress=False)


def _run_cli(args):
    return subprocess.Popen([sys.executable, "-m", "finetune"] + args, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_killed_run_resumes_from_its_snapshot(tmp_path, image_list):
    root, listing = image_list
    model = tiny_deploy(tmp_path / "net.prototxt")
    out = tmp_path / "run"
    args = ["--model", model, "--train-list", listing, "--train-root", root, "--out", str(out), "--loss", "asoftmax",
            "--margin", "2", "--epochs", "400", "--batch", "8", "--finetune-lr", "0.01", "--snapshot-every", "50", "--quiet"]
    first = _run_cli(args)
    deadline = time.time() + 120
    while not latest_snapshot(str(out / "snapshots"))[1] and time.time() < deadline and first.poll() is None:
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed_at = latest_snapshot(str(out / "snapshots"))[0]
    assert killed_at > 0, "no snapshot appeared: " + first.stderr.read()[-2000:]
    assert not (out / "done.json").exists(), "the run finished before it could be killed; make it longer"

    refused = _run_cli(args)
    assert refused.wait() == 2 and "--resume" in refused.stderr.read()

    resumed = _run_cli(args + ["--resume"])
    assert resumed.wait() == 0, resumed.stderr.read()[-2000:]
    assert "resumed from iteration %d" % killed_at in resumed.stderr.read()
    rows = [int(r[0]) for r in csv.reader(open(out / "loss.csv"))]
    assert rows == list(range(1, 2001)), "each iteration logged exactly once across the kill"
    assert killed_at < 2000
    assert caffe_io.open_net(model, str(out / "final.caffemodel")).blobs["fc5"].data.shape == (1, 6)


def test_bad_input_is_named(tmp_path, image_list):
    root, listing = image_list
    with pytest.raises(solver.SolverError, match="unknown lr policy 'cosine'"):
        solver.solver("t.prototxt", 10, "snap", lr_policy="cosine")
    with pytest.raises(solver.SolverError, match="larger than the image list"):
        solver.iterations(40, 1, 64)
    broken = tmp_path / "broken.txt"
    broken.write_text(open(listing).read() + "p9/missing.jpg 3\n")
    with pytest.raises(lists.ListError, match="missing.jpg"):
        lists.read_list(str(broken), root)
    model = tiny_deploy(tmp_path / "net.prototxt")
    job = driver.FineTuneJob(deploy=model, weights=None, train_list=listing, root_folder=root, out=str(tmp_path / "r"),
                             head="asoftmax", num_classes=3, batch_size=8)
    with pytest.raises(heads.HeadError, match="label 3 is out of range for 3 classes"):
        driver.finetune(job, progress=False)
    job = driver.FineTuneJob(deploy=model, weights=None, train_list=listing, root_folder=root, out=str(tmp_path / "r2"),
                             head="asoftmax", batch_size=64)
    with pytest.raises(solver.SolverError, match="batch size 64 is larger than the image list"):
        driver.finetune(job, progress=False)
