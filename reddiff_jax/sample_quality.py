"""How digit-like a set of 32x32 digits is, seen through the digit classifier.

Images are uint8 [N, 32, 32, 1] in [0, 255] (as written to and read from files). The features are
the classifier's penultimate activations (:func:`reddiff_jax.classifier.features`); the distances
are :func:`reddiff_jax.metrics.frechet_distance` and
:func:`reddiff_jax.metrics.kernel_inception_distance`. Their *floor* is the same distance from a
second set of real digits (e.g. training digits) to the reference: a perfect sampler scores about
that, never 0, because two finite samples of one distribution differ.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from reddiff_jax import metrics
from reddiff_jax.classifier import Classifier, embed_digits, load_embedded_classifier

__all__ = ["CONFIDENCE", "classifier_accuracy", "digit_judge", "sample_quality"]

CONFIDENCE = 0.9
"""A digit counts as recognisable when the classifier's top probability is at least this."""


def _distances(
    key: jax.Array, feats: np.ndarray, ref: np.ndarray, num_subsets: int, subset_size: int
) -> dict[str, float]:
    kid = metrics.kernel_inception_distance(
        feats, ref, key=key, num_subsets=num_subsets, subset_size=subset_size
    )
    return {"fd": metrics.frechet_distance(feats, ref), "kid": kid.mean, "kid_std": kid.std}


def sample_quality(
    key: jax.Array,
    samples_u8: np.ndarray,
    reference_u8: np.ndarray,
    *,
    floor_u8: np.ndarray | None = None,
    classifier: Classifier | None = None,
    num_subsets: int = 100,
    subset_size: int = 1000,
) -> dict[str, Any]:
    """Recognisability, class balance, FD and KID of ``samples_u8`` against ``reference_u8``.

    Args:
      key: draws the KID subsets; the floor uses the same key, so with equal set sizes both
        KIDs see the same reference subsets.
      samples_u8: uint8 digits [N, 32, 32, 1] (N >= 2), e.g. unconditional samples.
      reference_u8: uint8 digits [M, 32, 32, 1] (M >= 2), e.g. the held-out digits.
      floor_u8: real digits [F, 32, 32, 1] scored the same way (``floor_*`` keys), or None.
      classifier: defaults to `load_embedded_classifier()`.
      num_subsets: KID subsets.
      subset_size: KID subset size, clipped to the smaller set.

    Returns:
      A JSON-serialisable dict: ``num_samples``, ``num_reference``, ``confidence``
      (`CONFIDENCE`), ``confident_fraction`` (share of samples whose top class probability is
      >= ``confidence``), ``class_histogram`` (list of num_classes fractions of the samples per
      predicted class, summing to 1), ``fd``, ``kid``, ``kid_std``; and ``num_floor``,
      ``floor_fd``, ``floor_kid``, ``floor_kid_std`` (None without ``floor_u8``).
    """
    classifier = load_embedded_classifier() if classifier is None else classifier
    feats, probs = embed_digits(classifier, samples_u8)
    ref_feats, _ = embed_digits(classifier, reference_u8)
    counts = np.bincount(probs.argmax(axis=1), minlength=classifier.config.num_classes)
    out: dict[str, Any] = {
        "num_samples": len(feats),
        "num_reference": len(ref_feats),
        "confidence": CONFIDENCE,
        "confident_fraction": float(np.mean(probs.max(axis=1) >= CONFIDENCE)),
        "class_histogram": [float(c) / len(feats) for c in counts],
        **_distances(key, feats, ref_feats, num_subsets, subset_size),
        "num_floor": None,
        "floor_fd": None,
        "floor_kid": None,
        "floor_kid_std": None,
    }
    if floor_u8 is not None:
        floor_feats, _ = embed_digits(classifier, floor_u8)
        floor = _distances(key, floor_feats, ref_feats, num_subsets, subset_size)
        out["num_floor"] = len(floor_feats)
        out.update({f"floor_{k}": v for k, v in floor.items()})
    return out


def classifier_accuracy(
    restored_u8: np.ndarray, labels: np.ndarray, *, classifier: Classifier | None = None
) -> np.ndarray:
    """Whether the classifier reads each restored digit as its true label.

    Args:
      restored_u8: uint8 digits [N, 32, 32, 1].
      labels: int labels [N] (the digits' true classes).
      classifier: defaults to `load_embedded_classifier()`.

    Returns:
      bool [N]: ``argmax(probabilities) == labels``; its mean is the accuracy.
    """
    classifier = load_embedded_classifier() if classifier is None else classifier
    labels = np.asarray(labels)
    n = np.shape(restored_u8)[0] if np.ndim(restored_u8) else None
    if labels.ndim != 1 or labels.shape[0] != n or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels: expected int labels [{n}] (one per image), got {labels.dtype} {labels.shape}"
        )
    _, probs = embed_digits(classifier, restored_u8)
    return probs.argmax(axis=1) == labels


def digit_judge(image_shape: tuple[int, ...]) -> Any:
    """``judge(x_u8 [N, 32, 32, 1], labels [N]) -> float [N]`` (1.0 where the embedded
    classifier reads the digit as its label), loaded once; None unless ``image_shape`` is the
    classifier's (32, 32, 1)."""
    if tuple(image_shape) != (32, 32, 1):
        return None
    classifier = load_embedded_classifier()
    return lambda x_u8, labels: classifier_accuracy(x_u8, labels, classifier=classifier).astype(
        np.float64
    )
