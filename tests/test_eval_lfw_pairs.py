"""pairs.txt parser: the View 2 layout, fold numbers, and errors naming the line."""
import numpy as np
import pytest

from eval_lfw.errors import EvalError
from eval_lfw.pairs import parse_folds, read_pairs

from conftest import shared_path

GOOD = """2\t2
Ann\t1\t2
Bob\t1\t3
Ann\t1\tCid\t4
Bob\t2\tDee\t1
Eve\t1\t2
Ann\t2\t3
Eve\t1\tBob\t3
Cid\t2\tDee\t2
"""


def write(tmp_path, text, name="pairs.txt"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_good_file(tmp_path):
    p = read_pairs(write(tmp_path, GOOD))
    assert len(p) == 8
    assert p.left[0] == "Ann/Ann_0001.jpg" and p.right[0] == "Ann/Ann_0002.jpg"
    assert p.left[2] == "Ann/Ann_0001.jpg" and p.right[2] == "Cid/Cid_0004.jpg"
    assert p.same.tolist() == [True, True, False, False] * 2
    assert p.fold.tolist() == [1, 1, 1, 1, 2, 2, 2, 2]
    images, rows = p.images()
    assert len(images) == len(set(images)) == 12
    for (a, b), left, right in zip(rows, p.left, p.right):
        assert images[a] == left and images[b] == right
    assert p.take([5, 2]).left == ("Ann/Ann_0002.jpg", "Ann/Ann_0001.jpg")
    two = p.select([2])
    assert two.fold.tolist() == [2] * 4 and two.left[0] == "Eve/Eve_0001.jpg"


def test_real_view2_file():
    p = read_pairs(shared_path("data", "lfw", "pairs.txt"))
    assert len(p) == 6000 and p.folds == list(range(1, 11))
    for f in range(1, 11):
        assert (p.fold == f).sum() == 600 and p.same[p.fold == f].sum() == 300
    images, _ = p.images()
    assert len(images) == 7701  # the unique images the full protocol touches


@pytest.mark.parametrize("text, line, words", [
    (GOOD.replace("Bob\t1\t3", "Bob\t1"), 3, "3 fields"),
    (GOOD.replace("Ann\t1\tCid\t4", "Ann\t1\t4"), 4, "4 fields"),
    (GOOD.replace("Eve\t1\t2", "Eve\tone\t2"), 6, "not an image number"),
    (GOOD.replace("Cid\t2\tDee\t2", "Cid\t2\tDee\t0"), 9, "1 or more"),
    (GOOD.replace("2\t2\n", "ten 300\n"), 1, "header"),
])
def test_malformed_line_is_named(tmp_path, text, line, words):
    path = write(tmp_path, text)
    with pytest.raises(EvalError) as e:
        read_pairs(path)
    assert "%s:%d:" % (path, line) in str(e.value) and words in str(e.value)


def test_wrong_count_and_missing_file(tmp_path):
    path = write(tmp_path, GOOD + "Ann\t1\t2\n")
    with pytest.raises(EvalError, match="promises 8 pair lines, the file has 9"):
        read_pairs(path)
    with pytest.raises(EvalError, match="cannot read pairs file"):
        read_pairs(str(tmp_path / "absent.txt"))


def test_fold_lists():
    assert parse_folds("1-10") == list(range(1, 11))
    assert parse_folds("6-10") == [6, 7, 8, 9, 10]
    assert parse_folds("1,3, 5") == [1, 3, 5]
    assert parse_folds("2-3,7") == [2, 3, 7]
    for bad in ("x", "5-3", "0-2", ""):
        with pytest.raises(EvalError):
            parse_folds(bad)


def test_select_unknown_fold(tmp_path):
    p = read_pairs(write(tmp_path, GOOD))
    with pytest.raises(EvalError, match=r"has folds 1-2; asked for \[3\]"):
        p.select([1, 3])
    assert np.array_equal(p.select([1, 2]).fold, p.fold)
