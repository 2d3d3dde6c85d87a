"""The embedded digit classifier, its checkpoint format, the Fréchet distance and KID against
float64 references (scipy's ``sqrtm``, closed forms, a direct O(n^2) MMD), and sample_quality."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import chex
import jax
import numpy as np
import pytest
import scipy.linalg

from reddiff_jax import assets, imageio, metrics, operators, pipeline
from reddiff_jax.classifier import (
    Classifier,
    ClassifierConfig,
    embed_digits,
    features,
    load_classifier,
    load_embedded_classifier,
    logits,
    predict_proba,
    save_classifier,
    train_classifier,
)
from reddiff_jax.data import to_float
from reddiff_jax.sample_quality import classifier_accuracy, sample_quality

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def heldout() -> tuple[np.ndarray, np.ndarray]:
    with np.load(assets.default_heldout_path()) as z:
        return z["images"], z["labels"]


@pytest.fixture(scope="module")
def clf() -> Classifier:
    return load_embedded_classifier()


# --- the shipped classifier -------------------------------------------------------------------


def test_embedded_classifier_resolves_to_the_checkpoints_folder(clf):
    path = assets.embedded_classifier_path()
    assert path.resolve() == REPO / "checkpoints" / "mnist32_classifier"
    assert (path / "README.md").is_file()
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    assert size < 600_000, f"the classifier should stay small, it is {size} bytes"
    assert clf.config == ClassifierConfig.from_dict(clf.config.to_dict())


def test_shipped_classifier_heldout_accuracy_is_at_least_98_5_percent(clf, heldout):
    images, labels = heldout
    correct = classifier_accuracy(images, labels, classifier=clf)
    chex.assert_shape(correct, (1000,))
    assert correct.dtype == np.bool_
    accuracy = float(correct.mean())
    assert accuracy >= 0.985, accuracy
    # the card's figure came from the same computation; allow 2 digits of cross-CPU round-off
    assert abs(accuracy - clf.info["heldout_accuracy"]) <= 0.002


def test_hdr_start_is_read_as_well_as_the_truth(clf, heldout):
    """The README's HDR claim: digit accuracy cannot rise on HDR, because the pseudo-inverse
    start is misread on exactly the digits whose ground truth is misread (first 200)."""
    images, labels = heldout[0][:200], heldout[1][:200]
    op = operators.make_from_spec("hdr", images.shape[1:])
    y = pipeline.simulate(op, to_float(images), jax.random.key(0), sigma_y=0.0)
    start = pipeline.pseudo_inverse(op, y)  # what restore scores as "pinv"
    wrong_truth = np.flatnonzero(~classifier_accuracy(images, labels, classifier=clf))
    start_u8 = imageio.to_uint8(np.asarray(start))
    wrong_start = np.flatnonzero(~classifier_accuracy(start_u8, labels, classifier=clf))
    np.testing.assert_array_equal(wrong_truth, [19, 49, 75])
    np.testing.assert_array_equal(wrong_start, wrong_truth)


def test_features_logits_and_probabilities(clf, heldout):
    x = to_float(heldout[0][:64])
    f = features(clf.params, x, config=clf.config)
    out = logits(clf.params, x, config=clf.config)
    p = predict_proba(clf.params, x, config=clf.config)
    chex.assert_shape(f, (64, clf.config.hidden))
    chex.assert_shape([out, p], (64, 10))
    chex.assert_type([f, out, p], np.float32)
    assert float(np.min(f)) >= 0.0  # after the ReLU
    np.testing.assert_allclose(np.sum(p, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(np.argmax(p, 1), np.argmax(out, 1))
    # embed_digits (uint8, padded batches) agrees with the pure functions to float32 round-off
    f2, p2 = embed_digits(clf, heldout[0][:64], batch_size=50)
    np.testing.assert_allclose(f2, f, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(p2, p, rtol=1e-5, atol=1e-6)


def test_bad_inputs_are_clear_errors(clf, heldout):
    with pytest.raises(ValueError, match=r"x: expected digits \[N, 32, 32, 1\]"):
        logits(clf.params, np.zeros((2, 28, 28, 1), np.float32), config=clf.config)
    with pytest.raises(TypeError, match="to_float"):
        features(clf.params, heldout[0][:2], config=clf.config)
    with pytest.raises(ValueError, match="images_u8: expected uint8"):
        embed_digits(clf, to_float(heldout[0][:2]))
    with pytest.raises(ValueError, match=r"labels: expected int labels \[3\]"):
        classifier_accuracy(heldout[0][:3], heldout[1][:2], classifier=clf)


# --- training ---------------------------------------------------------------------------------

# 3 epochs of 16 steps: ~0.42 held-out accuracy at key 3 (chance 0.1), in ~15 s with compiles
_TINY = ClassifierConfig(
    channels=(8, 8), hidden=32, dropout=0.0, epochs=3, batch_size=16, learning_rate=5e-3
)


def test_tiny_training_is_reproducible_and_beats_chance(heldout):
    images, labels = heldout  # data/mnist32.npz is not committed: train on held-out digits
    train_x, train_y = images[:256], labels[:256]
    a = train_classifier(jax.random.key(3), train_x, train_y, _TINY)
    b = train_classifier(jax.random.key(3), train_x, train_y, _TINY)
    c = train_classifier(jax.random.key(4), train_x, train_y, _TINY)
    chex.assert_trees_all_equal(a, b)  # same key => bit-identical params
    assert not np.array_equal(a["head"]["kernel"], c["head"]["kernel"])
    tiny = Classifier(a, _TINY, {})
    accuracy = classifier_accuracy(images[500:], labels[500:], classifier=tiny).mean()
    assert accuracy > 0.25, accuracy  # chance is 0.1 (10 near-balanced classes)


def test_training_rejects_bad_data():
    x = np.zeros((40, 32, 32, 1), np.uint8)
    with pytest.raises(ValueError, match=r"labels: expected values in 0 \.\. 9"):
        train_classifier(jax.random.key(0), x, np.full(40, 10), _TINY)
    with pytest.raises(ValueError, match="fewer than one batch"):
        train_classifier(jax.random.key(0), x[:8], np.zeros(8, np.int32), _TINY)
    with pytest.raises(ValueError, match="images_u8: expected uint8"):
        train_classifier(jax.random.key(0), x.astype(np.float32), np.zeros(40, np.int32), _TINY)


# --- checkpoints ------------------------------------------------------------------------------


def test_save_load_round_trip_and_refusals(tmp_path, clf):
    path = save_classifier(tmp_path / "c", clf.params, clf.config, {"note": "x"})
    back = load_classifier(path)
    assert back.config == clf.config and back.info == {"note": "x"}
    chex.assert_trees_all_equal(back.params, clf.params)
    with pytest.raises(FileExistsError, match="already exists; pass force=True"):
        save_classifier(path, clf.params, clf.config, None)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not a classifier checkpoint"):
        save_classifier(tmp_path / "other", clf.params, clf.config, None, force=True)
    wrong = dataclasses.replace(clf.config, hidden=64)
    with pytest.raises(
        ValueError, match=r"\['hidden'\]\['kernel'\]: shape \(512, 128\) given, \(512, 64\)"
    ):
        save_classifier(tmp_path / "d", clf.params, wrong, None)


def test_load_errors_name_the_problem(tmp_path, clf):
    with pytest.raises(FileNotFoundError, match="no classifier checkpoint directory at"):
        load_classifier(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"not a classifier checkpoint \(no reddiff_classif"):
        load_classifier(tmp_path / "empty")

    path = save_classifier(tmp_path / "c", clf.params, clf.config, None)
    meta = path / "reddiff_classifier.json"
    record = json.loads(meta.read_text())
    meta.write_text("{ not json")
    with pytest.raises(ValueError, match="corrupt classifier checkpoint, .* is not valid JSON"):
        load_classifier(path)
    meta.write_text(json.dumps({**record, "config": {**record["config"], "hiden": 3}}))
    with pytest.raises(ValueError, match="corrupt classifier checkpoint, bad config"):
        load_classifier(path)
    meta.write_text(json.dumps({**record, "format_version": 99}))
    with pytest.raises(ValueError, match="format version 99 is not supported"):
        load_classifier(path)
    meta.write_text(json.dumps({**record, "config": {**record["config"], "hidden": 64}}))
    with pytest.raises(ValueError, match=r"do not match its config:\n  \['head'\]\['kernel'\]"):
        load_classifier(path)
    meta.write_text(json.dumps(record))
    data = max(
        (p for p in (path / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
    )
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])  # truncate the largest file
    with pytest.raises(ValueError, match="corrupt classifier checkpoint, cannot read its params"):
        load_classifier(path)
    (path / "params" / "_METADATA").unlink()
    with pytest.raises(ValueError, match="_METADATA is missing"):
        load_classifier(path)


# --- Fréchet distance -------------------------------------------------------------------------


def _gaussian(seed: int, n: int, d: int, shift: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mix + shift


def _fd_scipy(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook FID formula with scipy.linalg.sqrtm of the (non-symmetric) product."""
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    diff = a.mean(0) - b.mean(0)
    return float(diff @ diff + np.trace(cov_a + cov_b - 2.0 * root))


def test_frechet_distance_of_a_set_with_itself_is_zero(clf, heldout):
    f = np.asarray(features(clf.params, to_float(heldout[0][:400]), config=clf.config))
    scale = np.trace(np.cov(f.astype(np.float64), rowvar=False))
    # rank-deficient covariance (some ReLU units never fire): sqrt of round-off eigenvalues
    # leaves ~1e-8 relative; require 1e-6 of the total variance
    assert abs(metrics.frechet_distance(f, f)) <= 1e-6 * scale
    g = _gaussian(0, 300, 8, 0.0)
    assert abs(metrics.frechet_distance(g, g)) <= 1e-10 * np.trace(np.cov(g, rowvar=False))


@pytest.mark.parametrize("n_a, n_b, d", [(500, 400, 16), (200, 300, 32)])
def test_frechet_distance_matches_scipy_sqrtm(n_a, n_b, d):
    a, b = _gaussian(1, n_a, d, 0.0), _gaussian(2, n_b, d, 0.5)
    got, want = metrics.frechet_distance(a, b), _fd_scipy(a, b)
    assert want > 1.0
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(metrics.frechet_distance(b, a), want, rtol=1e-6)  # symmetric


def test_frechet_distance_closed_form_for_diagonal_covariances():
    """Columns of a Sylvester-Hadamard matrix (without the constant one) are zero-mean and
    orthogonal, so these sets have exactly diagonal sample covariances var_i and the distance is
    |mu_a - mu_b|^2 + sum_i (sqrt(var_a_i) - sqrt(var_b_i))^2."""
    h = np.array([[1.0]])
    for _ in range(7):  # 128 x 128
        h = np.block([[h, h], [h, -h]])
    d, n = 10, len(h)
    rng = np.random.default_rng(5)
    sd_a, sd_b = rng.uniform(0.5, 2.0, d), rng.uniform(0.5, 2.0, d)
    mu_a, mu_b = rng.normal(size=d), rng.normal(size=d)
    a, b = h[:, 1 : d + 1] * sd_a + mu_a, h[:, d + 1 : 2 * d + 1] * sd_b + mu_b
    var_a, var_b = sd_a**2 * n / (n - 1), sd_b**2 * n / (n - 1)  # unbiased (N - 1) covariance
    np.testing.assert_allclose(np.cov(a, rowvar=False), np.diag(var_a), atol=1e-12)
    want = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    np.testing.assert_allclose(metrics.frechet_distance(a, b), want, rtol=1e-10)


@pytest.mark.parametrize(
    "a, b, match",
    [
        (np.zeros((5,)), np.zeros((5, 2)), r"feats_a must be features \[N, D\]"),
        (np.zeros((5, 3)), np.zeros((5, 2)), "same feature dimension D, got 3 and 2"),
        (np.zeros((1, 2)), np.zeros((5, 2)), "feats_a needs at least 2 rows, got 1"),
        (np.zeros((4, 2)), np.array([[0.0, np.nan]] * 4), "feats_b has non-finite values"),
    ],
)
def test_set_distances_validate_their_inputs(a, b, match):
    with pytest.raises(ValueError, match=match):
        metrics.frechet_distance(a, b)
    with pytest.raises(ValueError, match=match):
        metrics.kernel_inception_distance(a, b, key=jax.random.key(0))


# --- KID --------------------------------------------------------------------------------------


def _mmd2_direct(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(u, v) = (u . v / d + 1)^3, written pair by pair (O(n^2))."""
    d = x.shape[1]
    k = lambda u, v: (np.dot(u, v) / d + 1.0) ** 3  # noqa: E731
    n, m = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kxy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return kxx + kyy - 2.0 * kxy


# one pair of set sizes throughout, so the subset draws compile once: 90 and 70 rows
_A, _B = _gaussian(8, 90, 4, 0.0), _gaussian(9, 70, 4, 0.4)
_KID = dict(num_subsets=200, subset_size=40)


def test_kid_with_whole_sets_equals_the_direct_mmd():
    """With subset_size >= both sets, each subset is a permutation of the whole set."""
    a = _A[:70]
    kid = metrics.kernel_inception_distance(a, _B, key=jax.random.key(0), num_subsets=200)
    want = _mmd2_direct(a, _B)
    assert want > 0.0
    # the kernel sums cancel to a small difference: allow 1e-9 relative for summation order
    np.testing.assert_allclose(kid.mean, want, rtol=1e-9)
    assert kid.std <= 1e-9 * abs(want)


def test_kid_subsets_average_to_the_direct_mmd_of_unequal_sets():
    """Each subset estimate is unbiased for the whole sets' U-statistic: the mean over 200
    subsets is within 4 standard errors of it."""
    kid = metrics.kernel_inception_distance(_A, _B, key=jax.random.key(1), **_KID)
    want = _mmd2_direct(_A, _B)
    assert kid.std > 0.0
    assert abs(kid.mean - want) <= 4.0 * kid.std / np.sqrt(200), (kid, want)


def test_kid_is_a_function_of_the_key():
    one = metrics.kernel_inception_distance(_A, _B, key=jax.random.key(2), **_KID)
    two = metrics.kernel_inception_distance(_A, _B, key=jax.random.key(2), **_KID)
    other = metrics.kernel_inception_distance(_A, _B, key=jax.random.key(3), **_KID)
    assert one == two  # bit-identical floats
    assert one.mean != other.mean
    with pytest.raises(ValueError, match="subset_size: expected an int >= 2"):
        metrics.kernel_inception_distance(_A, _B, key=jax.random.key(2), subset_size=1)
    with pytest.raises(ValueError, match="num_subsets: expected an int >= 1"):
        metrics.kernel_inception_distance(_A, _B, key=jax.random.key(2), num_subsets=0)


# --- sample quality ---------------------------------------------------------------------------


def test_sample_quality_separates_digits_from_noise(clf, heldout):
    images = heldout[0]
    reference, samples, floor = images[:400], images[400:700], images[700:]
    noise = np.random.default_rng(0).integers(0, 256, samples.shape, dtype=np.uint8)
    key, kw = jax.random.key(0), dict(classifier=clf, num_subsets=20, subset_size=200)
    real = sample_quality(key, samples, reference, floor_u8=floor, **kw)
    bad = sample_quality(key, noise, reference, **kw)
    assert json.loads(json.dumps(real)) == real  # JSON-serialisable as it is
    assert real["num_samples"] == 300 and real["num_reference"] == 400 and real["num_floor"] == 300
    np.testing.assert_allclose(sum(real["class_histogram"]), 1.0, atol=1e-12)
    assert len(real["class_histogram"]) == 10 and max(real["class_histogram"]) < 0.2
    assert real["confident_fraction"] > 0.9  # real digits: almost all read with confidence
    assert bad["floor_fd"] is None and bad["num_floor"] is None
    assert bad["fd"] > 10.0 * real["floor_fd"] and bad["kid"] > 10.0 * abs(real["floor_kid"])
    # held-out vs held-out is as close as held-out vs held-out: both at the floor (within 2x)
    assert real["fd"] < 2.0 * real["floor_fd"] + 1e-9
