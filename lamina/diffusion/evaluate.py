"""Quality of class-conditional digit samples, measured: intended-class accuracy and a Fréchet distance.

A small classifier (scikit-learn's MLPClassifier, one hidden layer of 128 ReLU units) is trained on the
training split of scikit-learn's digits at first use (a few seconds; cached for the process). It scores
samples: the share classified as the class they were generated for, and the Fréchet distance (Heusel et
al. 2017, the FID formula) between the Gaussians of its hidden features on the samples and on the
held-out real digits. Real held-out digits score about 0.97 and a distance near 0; noise scores ~0.1.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor

from lamina.diffusion.data import digits, resize, split


@dataclass
class SampleQuality:
    """``accuracy``: share of samples classified as their intended class; ``frechet_distance``: between
    hidden features of the samples and of held-out real digits; ``classifier_accuracy``: the
    classifier's own accuracy on the held-out real digits (the ceiling)."""

    accuracy: float
    frechet_distance: float
    classifier_accuracy: float
    num_samples: int

    def line(self) -> str:
        return (f"intended-class accuracy {self.accuracy:.3f} ({self.num_samples} samples; classifier on real "
                f"held-out digits {self.classifier_accuracy:.3f}), Fréchet distance {self.frechet_distance:.2f}")  # fmt: skip


@functools.lru_cache(maxsize=4)
def digits_classifier(
    image_size: int = 16, held_out_fraction: float = 0.1, seed: int = 0
) -> tuple[Any, Tensor, float]:
    """(classifier, held-out real digits (N, 1, S, S), its accuracy on them), trained on the training
    split of ``lamina.diffusion.data.digits(image_size)`` (the split the diffusion runs use)."""
    from sklearn.neural_network import MLPClassifier

    train, held = split(digits(image_size), held_out_fraction, seed)
    clf = MLPClassifier(hidden_layer_sizes=(128,), max_iter=300, random_state=seed)
    clf.fit(_flat(train.images), train.labels.numpy())
    acc = float((clf.predict(_flat(held.images)) == held.labels.numpy()).mean())
    return clf, held.images, acc


def _flat(images: Tensor) -> np.ndarray:
    return images.reshape(len(images), -1).double().numpy()


def _features(clf: Any, images: Tensor) -> np.ndarray:
    """The classifier's hidden ReLU activations (N, 128)."""
    return np.maximum(_flat(images) @ clf.coefs_[0] + clf.intercepts_[0], 0.0)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of two feature sets (N, D) and (M, D)."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():  # few samples: a singular product, whose root is still the one FID takes
        warnings.simplefilter("ignore")
        root = linalg.sqrtm(s_a @ s_b)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * np.real(root)))


def digit_quality(images: Tensor, labels: Tensor, image_size: int = 16) -> SampleQuality:
    """Score digit samples ``images`` (N, 1, H, W) in [-1, 1] generated for ``labels`` (N,); they are
    resized to ``image_size`` (the classifier's) first."""
    clf, held, clf_acc = digits_classifier(image_size)
    x = resize(images.detach().float().cpu(), image_size)
    acc = float((clf.predict(_flat(x)) == labels.cpu().numpy()).mean())
    fd = frechet_distance(_features(clf, x), _features(clf, held))
    return SampleQuality(acc, fd, clf_acc, len(images))
