"""Data sources and Caffe's transform_param, with no Caffe involved."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deeprebirth.caffe.data import (
    Batches,
    Transform,
    open_data,
    split_holdout,
    transform_from_prototxt,
)
from deeprebirth.errors import DeepRebirthError

TRAIN_VAL = """name: "x"
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  transform_param { scale: 0.5 mean_value: 104 mean_value: 117 mean_value: 123 crop_size: 4 mirror: true }
  data_param { source: "train_lmdb" batch_size: 8 backend: LMDB } }
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TEST }
  transform_param { scale: 0.5 mean_value: 104 mean_value: 117 mean_value: 123 crop_size: 4 }
  data_param { source: "val_lmdb" batch_size: 8 backend: LMDB } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 2 kernel_size: 1 } }
"""


def test_transform_from_train_val(tmp_path: Path) -> None:
    path = tmp_path / "train_val.prototxt"
    path.write_text(TRAIN_VAL)
    assert transform_from_prototxt(path) == Transform(scale=0.5, mean=(104.0, 117.0, 123.0), crop=4, mirror=True)
    assert transform_from_prototxt(path, "TEST").mirror is False


def test_batches_follow_caffes_order_mean_scale_crop_mirror(tmp_path: Path) -> None:
    x = np.arange(2 * 3 * 6 * 6, dtype=np.uint8).reshape(2, 3, 6, 6)  # N×C×H×W
    np.savez(tmp_path / "d.npz", x=x, y=np.array([0, 1]))
    transform = Transform(scale=0.5, mean=(1.0, 2.0, 3.0), crop=4, mirror=True)
    data = open_data(tmp_path / "d.npz", channels=3, input_size=(4, 4), transform=transform)
    batches = Batches(data, transform, (4, 4))
    expected = (x.astype(np.float32) - np.array([1, 2, 3], np.float32).reshape(3, 1, 1)) * 0.5
    assert np.array_equal(batches.batch([0, 1]), expected[:, :, 1:5, 1:5])  # centred, no mirror
    rng = np.random.default_rng(3)
    trained = batches.batch([0, 1], rng)
    windows = [expected[i, :, t:t + 4, s:s + 4] for i in range(2) for t in range(3) for s in range(3)]
    assert all(any(np.array_equal(b, w) or np.array_equal(b, w[..., ::-1]) for w in windows) for b in trained)
    assert batches.random


def test_npz_layouts_and_channel_check(tmp_path: Path) -> None:
    for shape in ((3, 5, 5), (3, 5, 5, 1), (3, 1, 5, 5)):
        np.savez(tmp_path / "d.npz", x=np.zeros(shape, np.uint8))
        assert open_data(tmp_path / "d.npz", channels=1, input_size=(5, 5)).images([0]).shape == (1, 1, 5, 5)
    np.savez(tmp_path / "d.npz", x=np.zeros((3, 5, 5, 3), np.uint8))
    with pytest.raises(DeepRebirthError, match="3 channel"):
        open_data(tmp_path / "d.npz", channels=1, input_size=(5, 5))


def test_resize_makes_any_size_fit(tmp_path: Path) -> None:
    import cv2

    (tmp_path / "a").mkdir()
    cv2.imwrite(str(tmp_path / "a" / "big.png"), np.full((30, 40, 3), 7, np.uint8))
    cv2.imwrite(str(tmp_path / "a" / "small.png"), np.full((10, 12, 3), 9, np.uint8))
    with pytest.raises(DeepRebirthError, match="differs from the first image's"):
        open_data(tmp_path, channels=3, input_size=(8, 8))
    data = open_data(tmp_path, channels=3, input_size=(8, 8), transform=Transform(resize=(8, 8)))
    assert data.images([0, 1]).shape == (2, 3, 8, 8)


def test_split_holdout_is_fixed_and_disjoint() -> None:
    train, held = split_holdout(100, 0.2, seed=5)
    assert len(held) == 20 and not set(train) & set(held) and len(train) + len(held) == 100
    assert np.array_equal(held, split_holdout(100, 0.2, seed=5)[1])


def test_caffe_lmdb_raw_and_encoded_datums(tmp_path: Path) -> None:
    import cv2
    import lmdb

    from deeprebirth import caffe_pb2 as pb
    from deeprebirth.caffe.data import open_data

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (6, 3, 5, 7), dtype=np.uint8)
    env = lmdb.open(str(tmp_path / "db"), map_size=1 << 22)
    with env.begin(write=True) as txn:
        for i, chw in enumerate(images):
            if i % 2:  # Caffe's convert_imageset --encoded: the image file's bytes (BGR as OpenCV writes it)
                datum = pb.Datum(channels=3, height=5, width=7, label=i, encoded=True,
                                 data=cv2.imencode(".png", chw.transpose(1, 2, 0))[1].tobytes())
            else:
                datum = pb.Datum(channels=3, height=5, width=7, label=i, data=chw.tobytes())
            txn.put(f"{i:04d}".encode(), datum.SerializeToString())
    env.close()
    data = open_data(tmp_path / "db", channels=3, input_size=(5, 7), classes=6)
    assert len(data) == 6 and data.labels is not None and list(data.labels) == list(range(6))
    assert np.array_equal(data.images(range(6)), images.astype(np.float32))
