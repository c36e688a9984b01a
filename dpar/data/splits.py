"""Training / validation split of a token store: seeded and class-stratified, never "the last N images".

A store written from an image folder is sorted by class, so holding out its last N images would validate
on the last class or two only and take them out of training. :func:`holdout_split` instead draws every
class's share of the N held-out images at random (seeded), in proportion to the class's size. Every
trainer, the θ calibration (:func:`dpar.data.stats.store_threshold`) and the small-scale study use it.
"""
from __future__ import annotations

import numpy as np


def stratified_sample(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Sorted indices of ``count`` of the ``len(labels)`` items, drawn per class in proportion to its size.

    Class c with n_c items gives ``count * n_c / len(labels)`` of them, rounded by largest remainder (ties
    to the smaller class id), so the quotas sum to ``count``; which items within a class is a seeded draw
    (``numpy.random.default_rng(seed)``). Raises ``ValueError`` unless ``0 <= count <= len(labels)``.
    """
    labels = np.asarray(labels)
    if not 0 <= count <= len(labels):
        raise ValueError(f"cannot draw {count} of {len(labels)} items")
    classes, sizes = np.unique(labels, return_counts=True)
    exact = count * sizes / max(len(labels), 1)
    quota = np.floor(exact).astype(int)
    remainder_order = np.lexsort((classes, -(exact - quota)))  # largest remainder first, then class id
    quota[remainder_order[:count - quota.sum()]] += 1
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(labels == c), size=q, replace=False) for c, q in zip(classes, quota)]
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def holdout_split(labels: np.ndarray, holdout: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(training images, held-out images)``: sorted index arrays that partition ``range(len(labels))``.

    The ``holdout`` held-out images are :func:`stratified_sample` (seed ``seed``, the config's
    ``data.split_seed``); 0 holds out nothing. Raises ``ValueError`` unless ``0 <= holdout < len(labels)``.
    """
    if not 0 <= holdout < len(labels):
        raise ValueError(f"cannot hold out {holdout} of {len(labels)} images (at least one must stay for training)")
    held_out = stratified_sample(labels, holdout, seed)
    keep = np.ones(len(labels), dtype=bool)
    keep[held_out] = False
    return np.flatnonzero(keep), held_out
