"""The ``digits`` data: scikit-learn's 8x8 handwritten digits, split once into train and held-out sets.

Pixels (0..16) map to [-1, 1]. The split is stratified and seeded, so every command and test sees the
same 1,297 training and 500 held-out images.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

NUM_CLASSES = 10
IMAGE_SIZE = 8
HELD_OUT = 500
SPLIT_SEED = 0


@dataclass(frozen=True)
class DigitsSplit:
    x_train: np.ndarray  # [N, 1, 8, 8] float32 in [-1, 1]
    y_train: np.ndarray  # [N] int64
    x_test: np.ndarray
    y_test: np.ndarray


def to_model_range(pixels: np.ndarray) -> np.ndarray:
    """0..16 grey levels -> [-1, 1]."""
    return (np.asarray(pixels, np.float32) / 8.0 - 1.0).astype(np.float32)


def to_unit_range(x: np.ndarray) -> np.ndarray:
    """Model range [-1, 1] -> [0, 1], clipped."""
    return np.clip((np.asarray(x, np.float32) + 1.0) / 2.0, 0.0, 1.0)


@lru_cache(maxsize=1)
def load_split() -> DigitsSplit:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = to_model_range(data.images).reshape(-1, 1, IMAGE_SIZE, IMAGE_SIZE)
    y = data.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=HELD_OUT, stratify=y, random_state=SPLIT_SEED)
    for a in (x_tr, x_te, y_tr, y_te):
        a.setflags(write=False)
    return DigitsSplit(x_tr, y_tr, x_te, y_te)

