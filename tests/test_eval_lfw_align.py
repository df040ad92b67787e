"""Five-point similarity alignment, checked on images warped by a known transform."""
import cv2
import numpy as np
import pytest
from skimage.transform import SimilarityTransform

from base.images import (ALIGNED_112x112, SPHEREFACE_96x112, ImageError, Preprocess, align_face, read_landmarks,
                            similarity_transform)


def similarity(angle_deg, scale, shift):
    a = np.deg2rad(angle_deg)
    rot = scale * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return np.hstack([rot, np.reshape(shift, (2, 1))])


def apply(m, pts):
    return pts @ m[:, :2].T + m[:, 2]


def smooth_face(seed=0):
    """A 112x112 colour image with structure at many scales (warps show up as errors)."""
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(rng.random((112, 112, 3)).astype(np.float32), (0, 0), 2.5)
    img = (img - img.min()) / (img.max() - img.min())
    return (img * 255).round().astype(np.uint8)


def test_templates():
    assert ALIGNED_112x112[:, 0] - SPHEREFACE_96x112[:, 0] == pytest.approx([8] * 5)
    # the crop that turns the aligned layout into the SphereFace one
    assert np.all((ALIGNED_112x112[:, 0] >= 8) & (ALIGNED_112x112[:, 0] < 104))


def test_recovers_a_known_similarity():
    m = similarity(-17, 2.3, (81.0, 37.5))
    np.testing.assert_allclose(similarity_transform(ALIGNED_112x112, apply(m, ALIGNED_112x112)), m, atol=1e-9)


def test_least_squares_fit_agrees_with_skimage():
    rng = np.random.default_rng(3)
    src = ALIGNED_112x112 + rng.normal(0, 3, (5, 2))
    dst = apply(similarity(25, 0.6, (5, -9)), src) + rng.normal(0, 2, (5, 2))
    ref = SimilarityTransform.from_estimate(src, dst)
    np.testing.assert_allclose(similarity_transform(src, dst), ref.params[:2], atol=1e-9)


def test_never_reflects():
    mirrored = ALIGNED_112x112 * [-1, 1] + [112, 0]
    m = similarity_transform(ALIGNED_112x112, mirrored)
    assert np.linalg.det(m[:, :2]) > 0
    with pytest.raises(ImageError, match="coincide"):
        similarity_transform(np.ones((5, 2)), ALIGNED_112x112)


def test_aligns_an_image_warped_by_a_known_transform():
    aligned = smooth_face()
    m = similarity(12, 1.5, (50, 30))  # aligned -> raw 250x250 coordinates, all inside
    raw = cv2.warpAffine(aligned, m, (250, 250), flags=cv2.INTER_CUBIC)
    back = align_face(raw, apply(m, ALIGNED_112x112), (112, 112), ALIGNED_112x112)
    err = np.abs(back.astype(float) - aligned)[4:-4, 4:-4]
    assert err.mean() < 0.5 and np.percentile(err, 99) <= 3
    # a one-pixel shift of the landmarks is clearly worse
    off = align_face(raw, apply(m, ALIGNED_112x112) + [1.7, 0], (112, 112), ALIGNED_112x112)
    assert np.abs(off.astype(float) - aligned)[4:-4, 4:-4].mean() > 10 * err.mean()


def test_preprocess_with_landmarks_matches_the_aligned_image(tmp_path):
    aligned = smooth_face(1)
    m = similarity(-8, 1.6, (20, 40))
    (tmp_path / "Ann").mkdir()
    cv2.imwrite(str(tmp_path / "Ann" / "Ann_0001.png"), cv2.warpAffine(aligned, m, (250, 250), flags=cv2.INTER_CUBIC))
    cv2.imwrite(str(tmp_path / "aligned.png"), aligned)
    lm = tmp_path / "landmarks.txt"
    lm.write_text("/some/where/Ann/Ann_0001.png " + " ".join("%.4f" % v for v in apply(m, ALIGNED_112x112).ravel()) + "\n")
    marks = read_landmarks(str(lm))
    from_raw = Preprocess(112, 96, "112x96", landmarks=marks)(str(tmp_path / "Ann" / "Ann_0001.png"), "Ann/Ann_0001.png")
    from_aligned = Preprocess(112, 96, "112x96")(str(tmp_path / "aligned.png"))
    assert from_raw.shape == from_aligned.shape == (3, 112, 96)
    assert np.abs(from_raw - from_aligned)[:, 4:-4, 4:-4].mean() < 2.0 * 0.0078125


def test_landmark_file_errors(tmp_path):
    bad = tmp_path / "lm.txt"
    bad.write_text("A/A_0001.jpg 1 2 3 4 5 6 7 8 9 10\nA/A_0002.jpg 1 2 3\n")
    with pytest.raises(ImageError, match=r"lm.txt:2: expected .* \(11 fields\), got 4"):
        read_landmarks(str(bad))
    bad.write_text("A/A_0001.jpg 1 2 3 4 5 6 7 8 9 x\n")
    with pytest.raises(ImageError, match="lm.txt:1: landmark coordinates must be numbers"):
        read_landmarks(str(bad))
