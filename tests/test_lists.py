"""Image lists: the ImageData format, the tree -> list tool, crops, LFW folds."""
import json
import os

import cv2
import numpy as np
import pytest

import caffe
from caffe import layers as L

from finetune import lists
from base.errors import ToolkitError
from base.lists import ListError, read_list
from eval_lfw.pairs import lfw_people
from finetune.lists import build
from base import caffe_io
from conftest import shared_path


def make_tree(root, counts, size=(112, 112), ext=".png"):
    """root/idN/idN_k.png with a recognisable pixel pattern per image."""
    for name, n in counts.items():
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for k in range(n):
            img = np.zeros(size + (3,), np.uint8)
            img[:, :, 0] = np.arange(size[1]) % 256              # column index in blue
            img[:, :, 1] = (len(name) * 17 + k) % 256
            cv2.imwrite(os.path.join(root, name, "%s_%d%s" % (name, k, ext)), img)


# ------------------------------------------------------------------ read_list

def test_read_list_validates_and_names_the_line(tmp_path):
    make_tree(str(tmp_path / "img"), {"a": 2})
    good = tmp_path / "good.txt"
    good.write_text("a/a_0.png 0\na/a_1.png 1\r\n")      # a CRLF line: ImageData's atoi stops at the \\r
    items = read_list(str(good), str(tmp_path / "img"), num_classes=2)
    assert items == [(str(tmp_path / "img" / "a" / "a_0.png"), 0), (str(tmp_path / "img" / "a" / "a_1.png"), 1)]
    cases = [("a/a_0.png 0\na/missing.png 0\n", "bad.txt:2: image .*missing.png does not exist"),
             ("a/a_0.png 0\na/a_1.png 2\n", "bad.txt:2: label 2 is out of range for 2 classes"),
             ("a/a_0.png x\n", "bad.txt:1: label 'x' is not an integer"),
             ("a/a_0.png -1\n", "bad.txt:1: label -1 is negative"),
             ("a/a_0.png\n", "bad.txt:1: expected 'relative/path label'"),
             ("a/a_0.png 0\n\na/a_1.png 1\n", "bad.txt:2: the line is empty"),   # ImageData: an image with no path
             ("\n", "is empty")]
    for text, words in cases:
        (tmp_path / "bad.txt").write_text(text)
        with pytest.raises(ListError, match=words):
            read_list(str(tmp_path / "bad.txt"), str(tmp_path / "img"), num_classes=2)
    with pytest.raises(ListError, match="cannot read image list"):
        read_list(str(tmp_path / "nope.txt"))
    assert issubclass(ListError, ToolkitError)


# ------------------------------------------------------------------ build

def test_build_lists_split_and_skip_unreadable(tmp_path, capsys):
    root = str(tmp_path / "tree")
    make_tree(root, {"bob": 10, "ann": 5, "cid": 1, "dee": 3})
    with open(os.path.join(root, "ann", "ann_9.jpg"), "wb") as f:      # truncated download
        f.write(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "tree" / "ann" / "notes.txt").write_text("not an image")
    (tmp_path / "tree" / "ann" / ".hidden.png").write_bytes(b"")
    out = str(tmp_path / "out")
    s = build(root, out, val_fraction=0.2, seed=3, min_images=2, progress=False)

    bad = os.path.join(root, "ann", "ann_9.jpg")
    assert [k["path"] for k in s["skipped"]] == [bad]
    assert "skipped %s" % bad in capsys.readouterr().err
    # cid has one image (< min_images 2): left out and counted; labels follow sorted names.
    assert (s["num_classes"], s["identities_below_min_images"], s["images_seen"]) == (3, 1, 20)
    names = [line.split()[1] for line in open(os.path.join(out, "identities.txt"))]
    assert names == ["ann", "bob", "dee"]
    train = read_list(os.path.join(out, "train.txt"), s["root"], num_classes=3)
    val = read_list(os.path.join(out, "val.txt"), s["root"], num_classes=3)
    per = lambda items, label: sum(1 for _, lab in items if lab == label)
    # round(0.2 n) held out: ann 5 -> 1, bob 10 -> 2, dee 3 -> 1
    assert [per(val, k) for k in range(3)] == [1, 2, 1]
    assert [per(train, k) for k in range(3)] == [4, 8, 2]
    assert not {p for p, _ in train} & {p for p, _ in val}
    assert all(os.path.basename(p).startswith(names[lab]) for p, lab in train + val)
    assert json.load(open(os.path.join(out, "summary.json")))["skipped"][0]["path"] == bad

    # Deterministic for a seed; another seed draws other images; an identity's
    # draw does not depend on the other identities.
    again = build(root, str(tmp_path / "again"), val_fraction=0.2, seed=3, min_images=2, progress=False)
    assert open(os.path.join(out, "val.txt")).read() == open(str(tmp_path / "again" / "val.txt")).read()
    build(root, str(tmp_path / "other"), val_fraction=0.2, seed=4, min_images=2, progress=False)
    assert open(os.path.join(out, "val.txt")).read() != open(str(tmp_path / "other" / "val.txt")).read()
    make_tree(root, {"eve": 6})
    more = build(root, str(tmp_path / "more"), val_fraction=0.2, seed=3, min_images=2, progress=False)
    bob = lambda folder: sorted(l.split()[0] for l in open(os.path.join(folder, "val.txt")) if l.startswith("bob/"))
    assert bob(out) == bob(str(tmp_path / "more")) and more["num_classes"] == 4 and again["val"] == 4


def test_crops_are_columns_8_to_103_and_wrong_sizes_are_skipped(tmp_path):
    root = str(tmp_path / "tree")
    make_tree(root, {"a": 2, "b": 1})
    make_tree(root, {"c": 1}, size=(120, 100))
    out = str(tmp_path / "out")
    s = build(root, out, crop=True, progress=False)
    assert s["root"] == os.path.join(out, "images") + os.sep
    crop = cv2.imread(os.path.join(out, "images", "a", "a_1.png"))
    assert crop.shape == (112, 96, 3)
    np.testing.assert_array_equal(crop[0, :, 0], np.arange(8, 104))
    assert len(s["skipped"]) == 1 and "not an aligned 112x112" in s["skipped"][0]["reason"]
    assert s["num_classes"] == 2 and s["train"] == 3
    for path, _ in read_list(os.path.join(out, "train.txt"), s["root"]):
        assert path.startswith(os.path.join(out, "images"))


def test_imagedata_reads_the_list(tmp_path):
    """The format is Caffe's own: ImageData loads the built list with its labels."""
    root = str(tmp_path / "tree")
    make_tree(root, {"a": 2, "b": 3})
    out = str(tmp_path / "out")
    s = build(root, out, crop=True, progress=False)
    n = caffe.NetSpec()
    n.data, n.label = L.ImageData(image_data_param=dict(source=os.path.join(out, "train.txt"), root_folder=s["root"],
                                                        batch_size=5), ntop=2)
    caffe_io.write_net(n.to_proto(), str(tmp_path / "data.prototxt"))
    net = caffe.Net(str(tmp_path / "data.prototxt"), caffe.TEST)
    net.forward()
    assert net.blobs["data"].data.shape == (5, 3, 112, 96)
    assert net.blobs["label"].data.tolist() == [0, 0, 1, 1, 1]
    np.testing.assert_array_equal(net.blobs["data"].data[0, 0, 0], np.arange(8, 104))


def write_pairs(path):
    # 2 folds x (1 same + 1 different) pairs
    path.write_text("2\t1\nA\t1\t2\nB\t1\tC\t1\nD\t1\t2\nE\t1\tF\t1\n")


def test_lfw_folds_keep_only_their_people(tmp_path, capsys):
    root = str(tmp_path / "tree")
    make_tree(root, {k: 2 for k in "ABCDEFG"})
    write_pairs(tmp_path / "pairs.txt")
    s = build(root, str(tmp_path / "f1"), folds=[1], pairs=str(tmp_path / "pairs.txt"), progress=False)
    assert open(str(tmp_path / "f1" / "identities.txt")).read().split()[1::4] == ["A", "B", "C"]
    assert s["lfw_folds"] == [1] and s["num_classes"] == 3
    rc = lists.main([root, str(tmp_path / "f2"), "--pairs", str(tmp_path / "pairs.txt"), "--lfw-folds", "2"])
    assert rc == 0 and "3 identities" in capsys.readouterr().out
    assert lists.main([root, str(tmp_path / "x"), "--lfw-folds", "1-5"]) == 2
    assert "need the pairs file" in capsys.readouterr().err
    assert lists.main([root, str(tmp_path / "x"), "--pairs", str(tmp_path / "pairs.txt"), "--lfw-folds", "3"]) == 2
    assert "folds" in capsys.readouterr().err
    assert lists.main([str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert lists.main([root, str(tmp_path / "x"), "--val-fraction", "1"]) == 2


def test_real_lfw_folds_are_identity_disjoint():
    pairs = shared_path("data", "lfw", "pairs.txt")
    first, last = lfw_people(pairs, range(1, 6)), lfw_people(pairs, range(6, 11))
    assert (len(first), len(last), len(first & last)) == (2086, 2195, 0)


@pytest.mark.slow
def test_real_lfw_folds_1_5_cropped(tmp_path):
    """Folds 1-5 of the real LFW, cropped to 112x96 (about 7 s here)."""
    root = shared_path("data", "lfw", "images-112x112")
    s = build(root, str(tmp_path), val_fraction=0.1, crop=True, pairs=shared_path("data", "lfw", "pairs.txt"),
              progress=False)
    assert (s["num_classes"], s["train"] + s["val"], len(s["skipped"])) == (2086, 5373, 0)
    last = lfw_people(shared_path("data", "lfw", "pairs.txt"), range(6, 11))
    names = {line.split()[1] for line in open(str(tmp_path / "identities.txt"))}
    assert not names & last
    items = read_list(str(tmp_path / "train.txt"), s["root"], num_classes=2086)
    assert cv2.imread(items[0][0]).shape == (112, 96, 3)
