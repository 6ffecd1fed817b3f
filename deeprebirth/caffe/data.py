"""Labelled image data for fine-tuning and evaluation, prepared the way Caffe's ``transform_param`` does it.

In-process (fine-tuning, evaluation) data never goes through a Caffe data layer: it is read here, transformed with
numpy, and written into the net's ``Input`` blob; ``write_lmdb`` stores it as Caffe Datums for a ``Data`` layer
(``finetune --export``). Four sources are understood:

* an image folder with one subfolder per class (classes are the sorted subfolder names: label 0 is the first;
  files count as images by their suffix: .png, .jpg, .jpeg, .bmp, .tif(f), .webp, .pgm, .ppm);
* a Caffe list file (``path label`` per line, as ImageData reads it; relative paths are relative to the list file);
* a ``.npz`` file with ``x`` (images: N×H×W, N×H×W×C, or N×C×H×W when axis 1 is 1 or 3 and the last axis is not)
  and, optionally, ``y`` (integer labels);
* a Caffe LMDB (the folder holding ``data.mdb``) of ``Datum`` records, raw or encoded, read with the ``lmdb``
  package into memory.

LevelDB is refused with a message saying so: it would need a reader this project does not ship.

Everything that can be wrong with the data is found by ``open_data`` before any training starts (a missing folder,
an unreadable image, a label out of range, an image size that does not fit the net's input), each as one
``DeepRebirthError`` line, so that a long run never dies halfway on its first bad file.

The transform follows Caffe's DataTransformer: images are read as BGR (OpenCV's order, Caffe's convention) or
grayscale for a one-channel input; optionally resized; then ``(pixel - mean) * scale``; then a crop (random in
training, centred otherwise) and a mirror (random, training only).

Kept as one module: the four sources, the transform and ``Batches`` all build on ``DataSet`` and ``Transform`` and
together are the one description of Caffe's data path that fine-tuning, evaluation and the export share.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from google.protobuf.message import DecodeError

from deeprebirth import caffe_pb2 as pb
from deeprebirth.aliases import PathLike
from deeprebirth.errors import DeepRebirthError
from deeprebirth.io import caffe_io

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".jpe")


def image_files(paths: Sequence[PathLike]) -> list[str]:
    """Image files named directly, or found (by IMAGE_SUFFIXES, sorted) in the folders named."""
    files: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            files += sorted(os.path.join(path, f) for f in os.listdir(path)
                            if f.lower().endswith(IMAGE_SUFFIXES) and not f.startswith("."))
        else:
            files.append(os.fspath(path))
    return files


@dataclass(frozen=True)
class Transform:
    """Caffe's transform_param, plus the resize ImageData does (``new_height``/``new_width``)."""

    scale: float = 1.0
    mean: tuple[float, ...] = ()  # one value per channel, or one for all
    mean_file: str | None = None  # a binaryproto mean image (C×H×W of the image before cropping)
    crop: int = 0  # crop_size: square crop, random when training, centred otherwise
    mirror: bool = False  # random horizontal flips when training
    resize: tuple[int, int] | None = None  # (height, width) every image is resized to first
    rgb: bool = False  # feed image files as RGB instead of Caffe's BGR

    def for_evaluation(self) -> Transform:
        return replace(self, mirror=False)


def transform_from_prototxt(path: PathLike, phase: str = "TRAIN") -> Transform:
    """The transform of the data layer of ``phase`` in a train_val prototxt (the TRAIN one if only it exists)."""
    net = caffe_io.read_prototxt(path)
    if net.layers:
        net = caffe_io.normalize_net(net, phase=phase, source=str(path))
    layers = [layer for layer in net.layer if layer.type in caffe_io.DATA_LAYER_TYPES or layer.HasField("transform_param")]
    if not layers:
        raise DeepRebirthError("no data layer with a transform_param", file=str(path))
    wanted = pb.TRAIN if phase == "TRAIN" else pb.TEST

    def phase_of(layer: pb.LayerParameter) -> int | None:
        return next((rule.phase for rule in layer.include if rule.HasField("phase")), None)

    layer = next((layer for layer in layers if phase_of(layer) == wanted),
                 next((layer for layer in layers if phase_of(layer) is None), layers[0]))
    t = layer.transform_param
    resize = None
    if layer.type == "ImageData" and layer.image_data_param.new_height and layer.image_data_param.new_width:
        resize = (layer.image_data_param.new_height, layer.image_data_param.new_width)
    mean_file = None
    if t.HasField("mean_file"):
        mean_file = t.mean_file if os.path.isabs(t.mean_file) else str(Path(path).parent / t.mean_file)
    return Transform(scale=t.scale if t.HasField("scale") else 1.0, mean=tuple(t.mean_value), mean_file=mean_file,
                     crop=t.crop_size, mirror=bool(t.mirror) and phase == "TRAIN", resize=resize)


def read_mean_file(path: PathLike) -> np.ndarray:
    """A binaryproto mean image as C×H×W float32."""
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise DeepRebirthError(f"cannot read mean file: {err.strerror}", file=str(path)) from None
    blob = pb.BlobProto()
    try:
        blob.ParseFromString(raw)
    except Exception:  # noqa: BLE001 - protobuf raises several types
        raise DeepRebirthError("not a binaryproto mean file", file=str(path)) from None
    array = caffe_io.blob_to_array(blob).astype(np.float32)
    return array.reshape(array.shape[-3:]) if array.ndim >= 3 else array


@dataclass
class DataSet:
    """Images (in memory, or files read on demand) with optional labels; ``images`` returns N×C×H×W float32 of
    raw pixel values (resized, channel order as the net wants), before mean, scale, crop and mirror."""

    source: str
    channels: int
    size: tuple[int, int]  # (height, width) of every image as it comes out of ``images`` (after any resize)
    labels: np.ndarray | None  # int64, one per image
    array: np.ndarray | None = None  # N×C×H×W for in-memory data
    paths: list[str] = field(default_factory=list)  # image files for file data
    resize: tuple[int, int] | None = None
    rgb: bool = False
    classes: list[str] = field(default_factory=list)  # class names, when the source gives them

    def __len__(self) -> int:
        return len(self.array) if self.array is not None else len(self.paths)

    def images(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        if self.array is not None:
            return np.asarray(self.array[indices], dtype=np.float32)
        out = np.empty((len(indices), self.channels, *self.size), dtype=np.float32)
        for k, i in enumerate(indices):
            out[k] = read_image(self.paths[i], self.channels, self.resize, self.rgb)
        return out

    def subset(self, indices: Sequence[int] | np.ndarray) -> DataSet:
        indices = np.asarray(indices, dtype=np.int64)
        return replace(self, labels=None if self.labels is None else self.labels[indices],
                       array=None if self.array is None else self.array[indices],
                       paths=[self.paths[i] for i in indices] if self.paths else [])


def read_image(path: str, channels: int, resize: tuple[int, int] | None, rgb: bool) -> np.ndarray:
    """An image file as float32 C×H×W: BGR (``rgb``: RGB) or grayscale for one channel, resized to ``resize``
    (height, width) with bilinear interpolation, as Caffe's ImageData layer does (``ReadImageToCVMat``:
    ``cv::resize`` with its default INTER_LINEAR). The one image loader: fine-tuning, evaluation and the
    equivalence check on photos all read images here."""
    import cv2

    image = cv2.imread(path, cv2.IMREAD_GRAYSCALE if channels == 1 else cv2.IMREAD_COLOR)
    if image is None:
        raise DeepRebirthError("cannot read image", file=path)
    if resize is not None and image.shape[:2] != resize:
        image = cv2.resize(image, (resize[1], resize[0]), interpolation=cv2.INTER_LINEAR)
    if image.ndim == 2:
        return image[None].astype(np.float32)
    if rgb:
        image = image[..., ::-1]
    return image.transpose(2, 0, 1).astype(np.float32)


def open_data(path: PathLike, *, channels: int, input_size: tuple[int, int], transform: Transform | None = None,
              classes: int | None = None, need_labels: bool = False) -> DataSet:
    """Open and fully validate a data source for a net whose input is ``channels``×``input_size`` and whose
    output has ``classes`` classes (labels are checked against it when given)."""
    transform = transform or Transform()
    path = Path(path)
    text = str(path)
    if not path.exists():
        raise DeepRebirthError("no such file or folder", file=text)
    if (path.is_dir() and (path / "CURRENT").exists()) or path.suffix.lower() == ".leveldb":
        raise DeepRebirthError("LevelDB data cannot be read: deeprebirth does not ship a LevelDB reader; export the "
                               "images to an LMDB, a folder (one subfolder per class), a list file (path label) or "
                               "an .npz (x, y)", file=text)
    if path.is_dir() and (path / "data.mdb").exists():
        data = _open_lmdb(path, channels)
    elif path.is_dir():
        data = _open_folder(path, channels, transform)
    elif path.suffix.lower() == ".npz":
        data = _open_npz(path, channels)
    else:
        data = _open_list(path, channels, transform)
    if len(data) == 0:
        raise DeepRebirthError("no images found", file=text)
    if need_labels and data.labels is None:
        raise DeepRebirthError("the data has no labels (an .npz needs an array 'y')", file=text)
    if data.labels is not None and classes is not None:
        bad = np.flatnonzero((data.labels < 0) | (data.labels >= classes))
        if bad.size:
            i = int(bad[0])
            where = data.paths[i] if data.paths else f"{text}: image {i}"
            raise DeepRebirthError(f"label {int(data.labels[i])} is out of range: the net has {classes} classes "
                                   f"(0..{classes - 1}); {bad.size} image(s) affected", file=where)
    check_fits(data, input_size, transform)
    return data


def check_fits(data: DataSet, input_size: tuple[int, int], transform: Transform) -> None:
    h, w = data.size
    if transform.crop:
        if (transform.crop, transform.crop) != tuple(input_size):
            raise DeepRebirthError(f"crop size {transform.crop} does not give the net's input size "
                                   f"{input_size[0]}x{input_size[1]}", file=data.source)
        if h < transform.crop or w < transform.crop:
            raise DeepRebirthError(f"image size {h}x{w} is smaller than the crop size {transform.crop}",
                                   file=data.source)
    elif (h, w) != tuple(input_size):
        raise DeepRebirthError(f"image size {h}x{w} does not fit the net's input {input_size[0]}x{input_size[1]} "
                               "(resize them to HxW, or crop them to N)", file=data.source, options=("resize", "crop"))


def _image_size(path: str) -> tuple[int, int]:
    """(height, width) from the file header; an error naming the file when it is not a readable image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            width, height = image.size
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DeepRebirthError(f"cannot read image ({type(err).__name__})", file=path) from None
    return height, width


def _validate_files(paths: list[str], transform: Transform) -> tuple[int, int]:
    """Every file must be a readable image of one common size (or any size when resizing)."""
    first: tuple[int, int] | None = None
    for p in paths:
        if not os.path.isfile(p):
            raise DeepRebirthError("no such image file", file=p)
        size = _image_size(p)
        if transform.resize is None:
            if first is None:
                first = size
            elif size != first:
                raise DeepRebirthError(f"image size {size[0]}x{size[1]} differs from the first image's "
                                       f"{first[0]}x{first[1]} (resize them to HxW)", file=p, options=("resize",))
    return transform.resize or first or (0, 0)


def _open_folder(path: Path, channels: int, transform: Transform) -> DataSet:
    classes = sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DeepRebirthError("an image folder needs one subfolder per class", file=str(path))
    paths: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        files = sorted(f for f in (path / name).iterdir()
                       if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_SUFFIXES)
        paths += [str(f) for f in files]
        labels += [label] * len(files)
    size = _validate_files(paths, transform)
    return DataSet(str(path), channels, size, np.asarray(labels, dtype=np.int64), paths=paths,
                   resize=transform.resize, rgb=transform.rgb, classes=classes)


def _open_list(path: Path, channels: int, transform: Transform) -> DataSet:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise DeepRebirthError(f"cannot read list file ({type(err).__name__})", file=str(path)) from None
    paths, labels = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, label = line.strip().rpartition(" ")
        if not name:
            raise DeepRebirthError(f"line {number}: expected 'path label'", file=str(path))
        try:
            labels.append(int(label))
        except ValueError:
            raise DeepRebirthError(f"line {number}: label {label!r} is not an integer", file=str(path)) from None
        paths.append(name if os.path.isabs(name) else str(path.parent / name.strip()))
    size = _validate_files(paths, transform)
    return DataSet(str(path), channels, size, np.asarray(labels, dtype=np.int64), paths=paths,
                   resize=transform.resize, rgb=transform.rgb)


def _open_npz(path: Path, channels: int) -> DataSet:
    try:
        archive = np.load(path, allow_pickle=False)
        x = archive["x"] if "x" in archive.files else None
        y = archive["y"] if "y" in archive.files else None
    except (OSError, ValueError) as err:
        raise DeepRebirthError(f"cannot read .npz ({err})", file=str(path)) from None
    if x is None:
        raise DeepRebirthError("an .npz needs an array 'x' (and 'y' for labels)", file=str(path))
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and not (x.shape[1] in (1, 3) and x.shape[3] not in (1, 3)):
        x = x.transpose(0, 3, 1, 2)
    elif x.ndim != 4:
        raise DeepRebirthError(f"'x' has shape {x.shape}; expected N×H×W, N×H×W×C or N×C×H×W", file=str(path))
    if x.shape[1] != channels:
        raise DeepRebirthError(f"images have {x.shape[1]} channel(s) but the net's input has {channels}",
                               file=str(path))
    labels = None
    if y is not None:
        if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
            raise DeepRebirthError(f"'y' must hold one integer label per image, got {y.dtype} {y.shape}",
                                   file=str(path))
        labels = y.astype(np.int64)
    return DataSet(str(path), channels, (x.shape[2], x.shape[3]), labels, array=x)


def _open_lmdb(path: Path, channels: int) -> DataSet:
    """Every Datum of a Caffe LMDB, in key order, as an in-memory N×C×H×W array and labels."""
    import cv2
    import lmdb

    images: list[np.ndarray] = []
    labels: list[int] = []
    try:
        env = lmdb.open(str(path), readonly=True, lock=False, readahead=False)
    except lmdb.Error as err:
        raise DeepRebirthError(f"cannot open LMDB ({err})", file=str(path)) from None
    with env, env.begin() as txn:
        for key, value in txn.cursor():
            where = f"{path}: record {bytes(key).decode('utf-8', 'replace')}"
            datum = pb.Datum()
            try:
                datum.ParseFromString(value)
            except DecodeError:
                raise DeepRebirthError("not a Caffe Datum", file=where) from None
            if datum.encoded:
                flag = cv2.IMREAD_COLOR if channels == 3 else cv2.IMREAD_GRAYSCALE
                image = cv2.imdecode(np.frombuffer(datum.data, np.uint8), flag)
                if image is None:
                    raise DeepRebirthError("cannot decode the encoded image", file=where)
                chw = image.transpose(2, 0, 1) if image.ndim == 3 else image[None]
            else:
                shape = (datum.channels, datum.height, datum.width)
                values = np.frombuffer(datum.data, np.uint8) if datum.data else np.asarray(datum.float_data)
                if values.size != int(np.prod(shape)):
                    raise DeepRebirthError(f"{values.size} values for a {shape} image", file=where)
                chw = values.reshape(shape)
            if chw.shape[0] != channels:
                raise DeepRebirthError(f"image has {chw.shape[0]} channel(s) but the net's input has {channels}",
                                       file=where)
            if images and chw.shape != images[0].shape:
                raise DeepRebirthError(f"image shape {chw.shape} differs from the first one's {images[0].shape}",
                                       file=where)
            images.append(chw)
            labels.append(datum.label)
    if not images:
        raise DeepRebirthError("the LMDB holds no records", file=str(path))
    array = np.stack(images).astype(np.float32)
    return DataSet(str(path), channels, (array.shape[2], array.shape[3]), np.asarray(labels, np.int64), array=array)


LMDB_CHUNK = 256  # images read and written per transaction


def write_lmdb(data: DataSet, indices: Sequence[int] | np.ndarray, path: PathLike) -> int:
    """Store ``data``'s images ``indices``, in that order, as Caffe Datums (key order = that order) in a new LMDB
    folder ``path``: the raw pixels as ``images`` gives them (after any resize, before mean, scale, crop and mirror,
    which the Data layer's transform_param applies), as bytes when they are integers in 0..255, else as floats.
    Returns the number of records."""
    import lmdb

    indices = np.asarray(indices, dtype=np.int64)
    if not len(indices):
        raise DeepRebirthError("no images to write", file=str(path))
    per_image = data.channels * data.size[0] * data.size[1]
    map_size = int(len(indices) * (4 * per_image + 64) * 1.2) + (1 << 22)  # floats at worst, plus Datum overhead
    env = lmdb.open(str(path), map_size=map_size, subdir=True)
    with env:
        for start in range(0, len(indices), LMDB_CHUNK):
            chunk = indices[start:start + LMDB_CHUNK]
            images = data.images(chunk)
            with env.begin(write=True) as txn:
                for k, (i, image) in enumerate(zip(chunk, images)):
                    datum = pb.Datum(channels=image.shape[0], height=image.shape[1], width=image.shape[2])
                    if np.all((image >= 0) & (image <= 255) & (image == np.round(image))):
                        datum.data = image.astype(np.uint8).tobytes()
                    else:
                        datum.float_data.extend(image.reshape(-1).tolist())
                    if data.labels is not None:
                        datum.label = int(data.labels[i])
                    txn.put(f"{start + k:08d}".encode(), datum.SerializeToString())
    return len(indices)


CROP_BANK = 4  # random crops per image when views are fixed (``Batches.views``), unless a run asks for more


BANK_CHUNK = 4096  # images whose crop banks are drawn at once (bounds the memory: chunk x positions keys)


class Batches:
    """Turns raw images into the net's input: mean, scale, crop, mirror (Caffe's DataTransformer order).

    Two ways to draw training augmentations: ``batch(indices, rng)`` draws a fresh random crop and mirror per image
    (Caffe's way); ``view_batch(indices, views)`` picks one of a finite set of ``views`` per image: mirror or not,
    times a fixed bank of ``crop_bank`` distinct crop positions per image (``CROP_BANK`` unless set; drawn once,
    from ``bank_seed``) where the crop is random. With fixed views, anything computed from an augmented image (the
    original net's outputs) can be kept and reused. Decoded, resized image files are kept in memory up to
    ``cache_bytes``."""

    def __init__(self, data: DataSet, transform: Transform, input_size: tuple[int, int], cache_bytes: float = 0,
                 bank_seed: int = 0) -> None:
        self.data = data
        self.transform = transform
        self.input_size = input_size
        self.mean: np.ndarray | None = None
        if transform.mean_file:
            mean = read_mean_file(transform.mean_file)
            if mean.shape != (data.channels, *data.size):
                raise DeepRebirthError(f"mean image has shape {mean.shape}, the images "
                                       f"{(data.channels, *data.size)}", file=transform.mean_file)
            self.mean = mean
        elif transform.mean:
            values = transform.mean if len(transform.mean) > 1 else transform.mean * data.channels
            if len(values) != data.channels:
                raise DeepRebirthError(f"{len(transform.mean)} mean values for {data.channels} channels")
            self.mean = np.asarray(values, dtype=np.float32).reshape(-1, 1, 1)
        self.cache_bytes = cache_bytes if data.array is None else 0  # in-memory data needs no cache
        self.decoded: dict[int, np.ndarray] = {}
        self.decoded_bytes = 0
        self.bank_seed = bank_seed
        self.crop_bank = CROP_BANK
        self._bank: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def random_crop(self) -> bool:
        return bool(self.transform.crop and self.data.size != self.input_size)

    @property
    def random(self) -> bool:
        """True when training batches differ between passes (random crop or mirror)."""
        return bool(self.transform.mirror or self.random_crop)

    @property
    def crop_positions(self) -> int:
        """How many distinct crops an image has (1 without a random crop)."""
        if not self.random_crop:
            return 1
        (height, width), (h, w) = self.data.size, self.input_size
        return (height - h + 1) * (width - w + 1)

    def set_crop_bank(self, crops: int) -> int:
        """Draw ``view_batch``'s crops from a bank of ``crops`` per image (at most every position); returns the
        bank's size. Views already drawn from change: set it before anything is keyed by view."""
        self.crop_bank = max(1, min(int(crops), self.crop_positions))
        self._bank = None
        return self.crop_bank

    @property
    def views(self) -> int:
        """How many fixed augmentations ``view_batch`` draws from per image."""
        return (min(self.crop_bank, self.crop_positions) if self.random_crop else 1) * (2 if self.transform.mirror
                                                                                         else 1)

    def _images(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        if not self.cache_bytes:
            return self.data.images(indices)
        missing = [i for i in dict.fromkeys(indices.tolist()) if i not in self.decoded]
        read = dict(zip(missing, self.data.images(missing))) if missing else {}
        for i, image in read.items():
            if self.decoded_bytes + image.nbytes <= self.cache_bytes:
                self.decoded[i] = image
                self.decoded_bytes += image.nbytes
        return np.stack([self.decoded[i] if i in self.decoded else read[i] for i in indices.tolist()])

    def _normalised(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        x = self._images(indices)
        if self.mean is not None:
            x -= self.mean
        if self.transform.scale != 1.0:
            x *= np.float32(self.transform.scale)
        return x

    def batch(self, indices: Sequence[int] | np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """Inputs for ``indices``; ``rng`` given means training (random crop and mirror), else centred crop."""
        x = self._normalised(indices)
        h, w = self.input_size
        if x.shape[2:] != (h, w):
            if rng is not None:
                tops = rng.integers(0, x.shape[2] - h + 1, len(x))
                lefts = rng.integers(0, x.shape[3] - w + 1, len(x))
                x = _crop(x, tops, lefts, h, w)
            else:
                t, s = (x.shape[2] - h) // 2, (x.shape[3] - w) // 2
                x = x[:, :, t:t + h, s:s + w]
        if rng is not None and self.transform.mirror:
            flip = rng.random(len(x)) < 0.5
            x[flip] = x[flip][..., ::-1]
        return np.ascontiguousarray(x, dtype=np.float32)

    def view_batch(self, indices: Sequence[int] | np.ndarray, views: Sequence[int] | np.ndarray) -> np.ndarray:
        """Inputs for ``indices``, image k in its fixed augmentation ``views[k]`` (0 .. ``self.views`` - 1): view
        ``v`` is bank crop ``v // 2`` (or the whole image) mirrored when ``v`` is odd (with mirroring on)."""
        indices, views = np.asarray(indices, dtype=np.int64), np.asarray(views, dtype=np.int64)
        x = self._normalised(indices)
        mirrors = 2 if self.transform.mirror else 1
        h, w = self.input_size
        if x.shape[2:] != (h, w):
            if self.random_crop:
                tops, lefts = self._crop_bank()
                slot = views // mirrors
                x = _crop(x, tops[indices, slot], lefts[indices, slot], h, w)
            else:
                t, s = (x.shape[2] - h) // 2, (x.shape[3] - w) // 2
                x = x[:, :, t:t + h, s:s + w]
        if mirrors == 2:
            flip = views % 2 == 1
            x[flip] = x[flip][..., ::-1]
        return np.ascontiguousarray(x, dtype=np.float32)

    def _crop_bank(self) -> tuple[np.ndarray, np.ndarray]:
        if self._bank is None:
            rng = np.random.default_rng([self.bank_seed, 7])
            across = self.data.size[1] - self.input_size[1] + 1  # crop positions along a row
            positions, bank = self.crop_positions, min(self.crop_bank, self.crop_positions)
            chosen = np.empty((len(self.data), bank), dtype=np.int64)
            for first in range(0, len(self.data), BANK_CHUNK):  # distinct per image: argsort of random keys
                rows = min(BANK_CHUNK, len(self.data) - first)
                chosen[first:first + rows] = np.argsort(rng.random((rows, positions)), axis=1)[:, :bank]
            self._bank = chosen // across, chosen % across
        return self._bank

    def labels(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        assert self.data.labels is not None
        return self.data.labels[np.asarray(indices, dtype=np.int64)]


def _crop(x: np.ndarray, tops: np.ndarray, lefts: np.ndarray, h: int, w: int) -> np.ndarray:
    return np.stack([x[i, :, t:t + h, s:s + w] for i, (t, s) in enumerate(zip(tops, lefts))])


def split_holdout(count: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices: a fixed-seed random ``fraction`` held out (none when it would be empty)."""
    if not 0.0 <= fraction < 1.0:
        raise DeepRebirthError(f"held-out fraction must be in [0, 1), got {fraction}")
    order = np.random.default_rng(seed).permutation(count)
    held = round(count * fraction)
    return np.sort(order[held:]), np.sort(order[:held])
