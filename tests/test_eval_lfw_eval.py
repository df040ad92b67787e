"""evaluate() and the CLI on a tiny real Caffe net and a synthetic LFW folder."""
import glob
import json
import os
import shutil

import caffe
import cv2
import numpy as np
import pytest
from caffe import layers as L

from eval_lfw import evaluate
from eval_lfw.__main__ import main
from eval_lfw.errors import EvalError
from eval_lfw.features import extract
from base.images import ImageError, Preprocess
from eval_lfw.pairs import read_pairs
from eval_lfw.protocol import cross_validate
from base import caffe_io

PEOPLE = ["Ann", "Bob", "Cid", "Dee"]
PAIRS = """2\t2
Ann\t1\t2
Bob\t1\t3
Ann\t1\tCid\t1
Bob\t2\tDee\t1
Cid\t1\t2
Dee\t2\t3
Ann\t3\tDee\t2
Cid\t3\tBob\t1
"""


def tiny_net(tmp, height=112, width=96):
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 3, height, width]))
    n.conv1 = L.Convolution(n.data, num_output=4, kernel_size=5, stride=4,
                            weight_filler=dict(type="gaussian", std=0.05), bias_filler=dict(type="constant", value=0.1))
    n.relu1 = L.PReLU(n.conv1, in_place=True)
    n.feat = L.InnerProduct(n.conv1, num_output=8, weight_filler=dict(type="xavier"))
    model = caffe_io.write_net(n.to_proto(), os.path.join(tmp, "tiny_%dx%d.prototxt" % (height, width)))
    caffe.set_random_seed(0)
    weights = model.replace(".prototxt", ".caffemodel")
    caffe.Net(model, caffe.TEST).save(weights)
    return model, weights


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("lfw"))
    rng = np.random.default_rng(0)
    root = os.path.join(tmp, "images")
    for name in PEOPLE:
        base = cv2.GaussianBlur(rng.integers(0, 256, (112, 112, 3)).astype(np.uint8), (0, 0), 4)
        os.makedirs(os.path.join(root, name))
        for i in range(1, 4):
            img = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
            cv2.imwrite(os.path.join(root, name, "%s_%04d.jpg" % (name, i)), img)
    pairs = os.path.join(tmp, "pairs.txt")
    with open(pairs, "w") as f:
        f.write(PAIRS)
    model, weights = tiny_net(tmp)
    return dict(tmp=tmp, root=root, pairs=pairs, model=model, weights=weights)


def expected_input(path, crop=True, bgr=False):
    img = cv2.imread(path)
    if crop:
        img = img[:, 8:104]
    if not bgr:
        img = img[:, :, ::-1]
    return ((img.astype(np.float32) - 127.5) * 0.0078125).transpose(2, 0, 1)


@pytest.mark.parametrize("workers", [0, 1])
def test_features_see_the_cropped_rgb_pixels_and_their_mirror(data, workers):
    net = caffe_io.open_net(data["model"], data["weights"])
    rels = ["Ann/Ann_0001.jpg", "Bob/Bob_0002.jpg", "Cid/Cid_0003.jpg", "Dee/Dee_0001.jpg", "Ann/Ann_0002.jpg",
            "Bob/Bob_0001.jpg", "Cid/Cid_0002.jpg"]
    # batch 2: four batches, more than the prefetch queue holds
    feats = extract(net, "data", data["root"], rels, Preprocess(112, 96), flip=True, batch=2, workers=workers,
                    progress=False)
    assert feats.shape == (7, 2 * 3 * 112 * 96)
    for row, rel in zip(feats, rels):
        x = expected_input(os.path.join(data["root"], rel))
        np.testing.assert_array_equal(row[:x.size], x.ravel())
        np.testing.assert_array_equal(row[x.size:], x[:, :, ::-1].ravel())
    bgr = extract(net, "data", data["root"], rels[:1], Preprocess(112, 96, bgr=True), flip=False, workers=0,
                  progress=False)
    np.testing.assert_array_equal(bgr[0], expected_input(os.path.join(data["root"], rels[0]), bgr=True).ravel())


def test_evaluate_matches_a_plain_forward_and_caches(data, tmp_path):
    cache = str(tmp_path / "cache")
    r = evaluate(data["model"], "feat", data["root"], data["pairs"], weights=data["weights"], cache_dir=cache,
                 batch=5, progress=False)
    assert r["folds"] == [1, 2] and r["n_pairs"] == 8 and r["n_images"] == 12
    assert r["feature_dim"] == 16 and not r["from_cache"] and len(os.listdir(cache)) == 1

    # The same numbers from features computed image by image with pycaffe directly.
    net = caffe.Net(data["model"], data["weights"], caffe.TEST)
    pairs = read_pairs(data["pairs"])

    def embed(rel):
        x = expected_input(os.path.join(data["root"], rel), bgr=True)   # evaluate()'s default order
        out = []
        for img in (x, x[:, :, ::-1]):
            net.blobs["data"].data[...] = img
            out.append(net.forward()["feat"][0].copy())
        return np.concatenate(out)

    ref = cross_validate([embed(a) for a in pairs.left], [embed(b) for b in pairs.right], pairs.same, pairs.fold)
    np.testing.assert_allclose(r["scores"], ref["scores"], rtol=1e-5, atol=1e-6)
    assert r["fold_accuracy"] == ref["fold_accuracy"]

    again = evaluate(data["model"], "feat", data["root"], data["pairs"], weights=data["weights"], cache_dir=cache,
                     progress=False)
    assert again["from_cache"] and np.array_equal(again["scores"], r["scores"])
    # without flip: served from the flip entry, equal to a fresh computation
    half = evaluate(data["model"], "feat", data["root"], data["pairs"], weights=data["weights"], cache_dir=cache,
                    flip=False, progress=False)
    fresh = evaluate(data["model"], "feat", data["root"], data["pairs"], weights=data["weights"], cache_dir=None,
                     flip=False, workers=0, progress=False)
    assert half["from_cache"] and not fresh["from_cache"] and half["feature_dim"] == 8
    np.testing.assert_allclose(half["scores"], fresh["scores"], atol=1e-5)  # batch 5 vs 64: BLAS rounding
    # an in-memory net works too (never cached)
    mem = evaluate(net, "feat", data["root"], data["pairs"], folds="1-2", cache_dir=cache, progress=False)
    np.testing.assert_allclose(mem["scores"], r["scores"], rtol=1e-5, atol=1e-6)


def test_cache_fills_in_only_missing_or_changed_images(data, tmp_path):
    cache, root = str(tmp_path / "cache"), str(tmp_path / "images")
    shutil.copytree(data["root"], root)
    run = lambda pairs: evaluate(data["model"], "feat", root, pairs, weights=data["weights"], cache_dir=cache,
                                 flip=False, workers=0, progress=False)
    pairs = read_pairs(data["pairs"])
    first = run(pairs.take([0, 2, 4, 6]))  # one same and one different pair per fold
    assert first["images_computed"] == first["n_images"] == 6
    full = run(pairs)
    assert full["n_images"] == 12 and full["images_computed"] == 6
    img = os.path.join(root, "Bob", "Bob_0003.jpg")
    cv2.imwrite(img, 255 - cv2.imread(img))
    changed = run(pairs)
    assert changed["images_computed"] == 1 and changed["scores"][1] != full["scores"][1]
    assert sorted(os.listdir(cache)) == [os.path.basename(f) for f in sorted(glob.glob(cache + "/*-noflip.npz"))]


def test_wrong_blob_lists_the_blobs(data):
    with pytest.raises(EvalError, match=r"has no blob 'fc5'; its blobs are: data, conv1, feat"):
        evaluate(data["model"], "fc5", data["root"], data["pairs"], weights=data["weights"], cache_dir=None)


def test_a_single_fold_is_refused_before_compute(data):
    with pytest.raises(EvalError, match=r"at least 2 folds; .*pairs.txt selects \[2\]"):
        evaluate(data["model"], "feat", data["root"], data["pairs"], weights=data["weights"], folds="2")


def test_missing_images_are_counted_before_compute(data, tmp_path):
    pairs = tmp_path / "pairs.txt"
    pairs.write_text(PAIRS.replace("Dee\t2\t3", "Eve\t2\t3").replace("Cid\t3\tBob\t1", "Cid\t7\tBob\t1"))
    with pytest.raises(ImageError) as e:
        evaluate(data["model"], "feat", data["root"], str(pairs), weights="/nonexistent.caffemodel", cache_dir=None)
    msg = str(e.value)
    assert msg.startswith("3 of the 13 images the pairs name are missing under %s" % data["root"])
    assert os.path.join(data["root"], "Eve/Eve_0002.jpg") in msg and "Cid/Cid_0007.jpg" in msg


def test_wrong_image_size_without_crop(data):
    with pytest.raises(ImageError, match=r"image .*Ann_0001.jpg is 112x112 \(HxW\), expected 112x96: "
                                        r"with --crop none .* need --crop 112x96"):
        evaluate(data["model"], "feat", data["root"], data["pairs"], weights=data["weights"], crop="none",
                 cache_dir=None)
    model, weights = tiny_net(data["tmp"], 112, 112)
    with pytest.raises(ImageError, match="net's input is 112x112; use --crop none"):
        evaluate(model, "feat", data["root"], data["pairs"], weights=weights, cache_dir=None)
    r = evaluate(model, "feat", data["root"], data["pairs"], weights=weights, crop="none", flip=False,
                 cache_dir=None, workers=0, progress=False)
    assert r["feature_dim"] == 8


def test_cli_writes_json_and_roc(data, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--model", data["model"], "--weights", data["weights"], "--blob", "feat", "--lfw-dir", data["root"],
            "--pairs", data["pairs"], "--out", str(out), "--cache-dir", str(tmp_path / "c"), "--quiet"]
    assert main(args) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["folds"] == [1, 2] and len(result["fold_accuracy"]) == 2 and result["flip"]
    assert (out / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "mean accuracy" in printed and "roc.png" in printed
    assert main(args[:5] + ["fc7"] + args[6:]) == 2
    assert "eval_lfw: error: %s has no blob 'fc7'" % data["model"] in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["opencv-nofusion", "mnn-nowinograd", "onnxruntime", "openvino"])
def test_the_protocol_runs_inside_another_runtime_with_caffes_features(data, tmp_path, kind):
    """--runtime: the runtime's own forward pass gives the embeddings (cached apart from Caffe's), and an exact
    runtime gives Caffe's features to float precision, so the same accuracy and thresholds."""
    import runtimes
    if runtimes.missing(kind):
        pytest.skip(runtimes.missing(kind))
    cache = str(tmp_path / "cache")
    ref = evaluate(data["model"], "feat", data["root"], data["pairs"], weights=data["weights"], cache_dir=cache,
                   progress=False)
    r = evaluate(data["model"], "feat", data["root"], data["pairs"], weights=data["weights"], cache_dir=cache,
                 progress=False, runtime=kind)
    assert r["runtime"] == kind and not r["from_cache"] and len(os.listdir(cache)) == 2
    assert r["accuracy_mean"] == ref["accuracy_mean"]
    np.testing.assert_allclose(r["thresholds"], ref["thresholds"], atol=1e-4)
    again = evaluate(data["model"], "feat", data["root"], data["pairs"], weights=data["weights"], cache_dir=cache,
                     progress=False, runtime=kind)
    assert again["from_cache"] and again["accuracy_mean"] == r["accuracy_mean"]


def test_a_runtime_needs_the_nets_output_as_blob(data, capsys):
    args = ["--model", data["model"], "--weights", data["weights"], "--lfw-dir", data["root"], "--pairs",
            data["pairs"], "--no-cache", "--quiet", "--runtime", "onnxruntime"]
    assert main(args + ["--blob", "conv1"]) == 2
    err = capsys.readouterr().err
    assert "--runtime onnxruntime gives the net's output (feat)" in err and len(err.strip().splitlines()) == 1
    assert main(args + ["--blob", "feat"]) == 0
    assert "forward pass: onnxruntime" in capsys.readouterr().out
