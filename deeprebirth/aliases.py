"""The type aliases every layer shares, defined once."""

from __future__ import annotations

import os

import numpy as np

PathLike = str | os.PathLike[str]
Shape = tuple[int, ...]
Weights = dict[str, list[np.ndarray]]  # layer name -> its parameter blobs, in Caffe's order
Feed = dict[str, np.ndarray]  # input blob (Caffe name) -> value
Outputs = dict[str, np.ndarray]  # blob (Caffe name) -> value after a forward pass
