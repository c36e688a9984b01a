"""Training / validation split of a token store: seeded and class-stratified, never "the last N images".

A store written from an image folder is sorted by class, so holding out its last N images would validate
on the last class or two only and take them out of training. :func:`holdout_split` instead draws every
class's share of the N held-out images at random (seeded), in proportion to the class's size. Every
trainer, the θ calibration (:func:`dpar.data.stats.store_threshold`) and the small-scale study use it.
"""
from __future__ import annotations

import numpy as np


def stratified_sample(labels: np.ndarray, count: int, seed: int, keep: int = 0) -> np.ndarray:
    """Sorted indices of ``count`` of the ``len(labels)`` items, drawn per class in proportion to its size.

    Class c with n_c items gives ``count * n_c / len(labels)`` of them, rounded by largest remainder (equal
    remainders: the smaller class id first), never more than ``n_c - keep``; which items within a class is a
    seeded draw (``numpy.random.default_rng(seed)``). With fewer items to draw than classes that can give
    one, the classes that each give one item are themselves a seeded draw weighted by size, so a small
    sample is not always the first classes. ``ValueError`` unless ``0 <= count <= sum(max(n_c - keep, 0))``.
    """
    labels = np.asarray(labels)
    classes, sizes = np.unique(labels, return_counts=True)
    room = np.maximum(sizes - keep, 0)
    if not 0 <= count <= room.sum():
        kept = f" (keeping {keep} of each class)" if keep else ""
        raise ValueError(f"cannot draw {count} of {len(labels)} items{kept}")
    rng = np.random.default_rng(seed)
    quota = np.zeros(len(classes), dtype=int)
    if count < np.count_nonzero(room):
        quota[rng.choice(len(classes), size=count, replace=False, p=room / room.sum())] = 1
    elif count:
        exact = count * sizes / len(labels)
        quota = np.minimum(np.floor(exact).astype(int), room)
        order = np.lexsort((classes, -(exact - np.floor(exact))))  # largest remainder first, then class id
        while quota.sum() < count:  # one pass unless a class is full (its share above n_c - keep)
            for c in order[quota[order] < room[order]][:count - quota.sum()]:
                quota[c] += 1
    chosen = [rng.choice(np.flatnonzero(labels == c), size=q, replace=False) for c, q in zip(classes, quota) if q]
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def holdout_problem(labels: np.ndarray, holdout: int) -> str | None:
    """Why ``holdout`` images cannot be held out of images labelled ``labels`` (every class keeps one training
    image), or None. A script states it as one line naming its key or flag, before any work."""
    if 0 <= holdout <= len(labels) - len(np.unique(labels)):
        return None
    return f"cannot hold out {holdout} of {len(labels)} images (every class keeps one for training)"


def holdout_split(labels: np.ndarray, holdout: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(training images, held-out images)``: sorted index arrays that partition ``range(len(labels))``.

    The ``holdout`` held-out images are :func:`stratified_sample` (seed ``seed``, the config's
    ``data.split_seed``), which leaves every class at least one training image; 0 holds out nothing.
    ``ValueError`` (:func:`holdout_problem`, which callers check first) when that many cannot be held out.
    """
    problem = holdout_problem(labels, holdout)
    if problem is not None:
        raise ValueError(problem)
    held_out = stratified_sample(labels, holdout, seed, keep=1)
    keep = np.ones(len(labels), dtype=bool)
    keep[held_out] = False
    return np.flatnonzero(keep), held_out
