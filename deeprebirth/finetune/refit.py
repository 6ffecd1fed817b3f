"""Refit: a least-squares start for the layers downstream of the lossy merges, before the whole-net phase's updates
(``--refit``).

Before:  the slim net starts from the rewrite's weights. The merged layer's are a guess, and every layer after it
         still has the original's weights while its inputs have drifted, so each adds its own error to what it
         receives. Where an update costs a second, a 7-minute budget buys a few hundred of them: too few to undo it.
After:   layer by layer in network order, each Convolution and InnerProduct downstream of a relearned layer is
         refit on a sample of training images so that, fed the slim net's own (already refit) inputs, it
         reproduces the original's blob of the same name, by ``deeprebirth.weights.ridge`` (ridge regression
         towards its weights before, ReLU-aware where the slim net applies a ReLU in place on the output, the pull
         chosen on left-out images). A merged inception branch, whose blob is new, is aimed at its channels of
         the module's Concat. This is the layer-wise reconstruction of channel pruning (He et al. 2017; ThiNet, Luo
         et al. 2017) and of few-sample distillation (Li et al. 2020), applied to a merge's downstream layers; the
         updates that follow start from there.

Preconditions on a refit layer: group 1 and dilation 1 (Convolution), a bias, an output blob whose Caffe name and
shape are the same in both nets (or that is a part of a channel Concat's output that is), and at least as many
sample rows as X has columns (a fully connected layer over 1,024 features wants 1,025 images; with fewer it is left
as it is). A Tucker chain's bias-free core and its 1x1 expand, whose blob the original has, are fit as one map onto
that blob and split back at the core's rank (``reduced_rank``); the chain's 1x1 reduce, whose blob is new and
which feeds no blob of the original's directly, stays as it is. The run keeps the refit weights only if they bring
the slim net's held-out outputs closer to the original's (KL at T=1), and says so either way.

Memory: the original runs once over the sample in chunks (as many images as ``NET_BYTES`` of both nets hold),
keeping only each layer's target rows; the slim net runs one layer at a time over the chunks, its blobs that a later
layer reads kept as numpy (``LIVE_BYTES``). So the sample is not what the nets hold at once: 256 images on a
ResNet-50 at 224x224 (1.2 M live activations an image, chunks of 15), where a one-batch refit held 30.

The weight math is ``deeprebirth.weights.ridge``; which layers are fit, onto which blob, at which rows, is
``deeprebirth.finetune.refit_plan``; ``refit_layers`` runs the two nets in pycaffe, one layer at a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deeprebirth.caffe.data import Batches, PathLike
from deeprebirth.caffe.evaluate import NetIO, activations_per_image, images_within, predict, set_input
from deeprebirth.caffe.layer_by_layer import LayerByLayer, live_activations_per_image
from deeprebirth.caffe.runtime import import_caffe
from deeprebirth.finetune.context import Context
from deeprebirth.finetune.losses import distillation_losses
from deeprebirth.finetune.refit_plan import Plan, plan_layer
from deeprebirth.finetune.state import Weights
from deeprebirth.io import caffe_io
from deeprebirth.ir.shapes import ConvGeometry, conv_geometry
from deeprebirth.weights.ridge import choose_alpha, conv_rows, fit_layer, reduced_rank

MAX_IMAGES = 256
NET_BYTES = 2 * 2**30  # both pycaffe nets at a chunk's batch ...
LIVE_BYTES = 2 * 2**30  # ... and the slim net's live blobs over the whole sample: about the peak the refit adds
MAX_ROUNDS = 3  # refits, each on the next sample of images, from where the last left the weights ...
MIN_ROUND_GAIN = 0.05  # ... another only after one that cut the held-out KL by at least this share
TIME_SHARE = 0.5  # of a timed phase's allotment the refit may take; layers it has not reached then stay as they are
FORWARD_SHARE = 1 / 3  # of the time to that deadline, what the sample's forward passes (original and slim) may take


@dataclass
class RefitResult:
    """What a refit did: layers refit and skipped (with why), held-out KL to the original before and after,
    whether the refit weights were kept."""

    images: int
    refit: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    kl_before: float | None = None
    kl_after: float | None = None
    kept: bool = False
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"images": self.images, "layers": len(self.refit), "skipped": self.skipped,
                "kl_before": self.kl_before, "kl_after": self.kl_after, "kept": self.kept,
                "seconds": round(self.seconds, 1)}


LayerProgress = Callable[[int, int, str], None]  # (layers done, layers to refit, layer name)


def chunk_size(images: int, activations_per_image: float) -> int:
    """Images per pass of the two pycaffe nets: all up to ``MAX_IMAGES``, fewer where both nets would pass
    ``NET_BYTES`` (open_nsfw at 224x224, 8.8 M activations an image: 15); at least 1."""
    return max(1, min(images, MAX_IMAGES, images_within(NET_BYTES, 2.0 * activations_per_image)))


def sample_size(images: int, live_activations_per_image: float, seconds: float | None = None,
                seconds_per_image: float = 0.0) -> int:
    """Images to refit on: all up to ``MAX_IMAGES``, fewer where the slim net's live blobs over the sample (kept
    between its layer-by-layer passes) would pass ``LIVE_BYTES``, or where, with ``seconds`` to the refit's
    deadline, the two nets' passes over them (each about the original's ``seconds_per_image``) would take more
    than ``FORWARD_SHARE`` of it; at least 8 (or all there are)."""
    affordable = images_within(LIVE_BYTES, live_activations_per_image, bytes_per_activation=4.0)  # float32
    if seconds is not None and seconds_per_image > 0:
        affordable = min(affordable, int(FORWARD_SHARE * seconds / (2 * seconds_per_image)))
    return max(min(8, images), min(images, MAX_IMAGES, affordable))


def refit_layers(slim_net: Any, original_net: Any, input_name: str, logits: str, relearned: set[str],
                 weights: dict[str, list[np.ndarray]], geometry: dict[str, ConvGeometry], concats: set[str],
                 train: Batches, indices: np.ndarray, val: Batches | None, val_indices: np.ndarray, seed: int,
                 only_relearned: bool = False, progress: LayerProgress | None = None,
                 deadline: float | None = None, chunk: int | None = None,
                 reference: np.ndarray | None = None) -> RefitResult:
    """Refit ``weights`` (the slim net's, by layer name; updated in place when the result is kept) layer by layer
    on the training images ``indices``, judged on the held-out ``val_indices``.

    ``slim_net`` / ``original_net``: pycaffe TEST nets, reshaped here to ``chunk`` images (default: the whole
    sample). The original runs once over the sample, keeping only the target rows; the slim net runs one layer at a
    time over every chunk, its live blobs kept between layers, so the sample is not bounded by what the nets hold
    at once. ``geometry``: each refittable Convolution's (layers missing from it are not refit); ``concats``: the
    Concat layers along channels; ``relearned``: the layers the rewrite made anew (``only_relearned``: only those
    are refit, not the layers downstream); ``deadline`` (``time.monotonic``): the layers not reached by then are
    left as they are (and listed as skipped). ``reference``: the original's held-out logits, where a caller keeps
    them between rounds (else forwarded here)."""
    started = time.monotonic()
    rng = np.random.default_rng(seed)
    chunk = min(chunk or len(indices), len(indices))
    x = train.batch(indices, np.random.default_rng(seed))
    parts = [slice(start, min(start + chunk, len(indices))) for start in range(0, len(indices), chunk)]
    result = RefitResult(images=len(indices))
    names = list(slim_net._layer_names)
    for name in names:
        if name in weights:
            for blob, values in zip(slim_net.params[name], weights[name]):
                blob.data[...] = values.reshape(blob.data.shape)
    if reference is None:
        reference = _outputs(original_net, input_name, logits, val, val_indices, chunk)
    kl_before = _held_out_kl(slim_net, reference, input_name, logits, val, val_indices, chunk)
    set_input(original_net, input_name, x[parts[0]])  # every blob at a chunk's shape, for the plans
    set_input(slim_net, input_name, x[parts[0]])
    tops = {n: list(slim_net.top_names[n]) for n in names}
    bottoms = {n: list(slim_net.bottom_names[n]) for n in names}
    drifted: set[str] = set()
    for name in names:
        if name in relearned or any(b in drifted for b in bottoms[name]):
            drifted.update(tops[name])
    todo = [n for k, n in enumerate(names) if slim_net.layers[k].type in ("Convolution", "InnerProduct")
            and (n in relearned or (not only_relearned and any(b in drifted for b in bottoms[n])))]
    plans: dict[str, Plan] = {}
    expands: set[str] = set()
    for name in todo:
        if name in expands:
            continue
        plan = plan_layer(slim_net, original_net, name, names, tops, bottoms, geometry, concats, len(indices), rng)
        if isinstance(plan, str):
            result.skipped[name] = plan
        else:
            plans[name] = plan
            if plan.expand:
                expands.add(plan.expand)
    targets = _target_rows(original_net, input_name, x, parts, plans)
    new = dict(weights)
    live = LayerByLayer(slim_net, {input_name: [x[p] for p in parts]})
    del x
    for k, name in enumerate(names):
        if name in plans and deadline is not None and time.monotonic() > deadline:
            result.skipped[name] = "out of time"
        if name in plans and name not in result.skipped:
            if progress is not None:
                progress(todo.index(name) + 1, len(todo), name)
            rows = _input_rows(live.chunks[bottoms[name][0]], plans[name], geometry)
            why = _refit_one(slim_net, plans[name], targets.pop(name), rows, new)
            if why:
                result.skipped[name] = why
            else:
                result.refit.extend([name, *filter(None, [plans[name].expand])])
        live.forward(k)
    if result.refit:
        result.kl_before = kl_before
        result.kl_after = _held_out_kl(slim_net, reference, input_name, logits, val, val_indices, chunk)
        result.kept = result.kl_after is None or kl_before is None or result.kl_after < kl_before
        if result.kept:
            weights.update(new)
    result.seconds = time.monotonic() - started
    return result


def _target_rows(original_net: Any, input_name: str, x: np.ndarray, parts: list[slice],
                 plans: dict[str, Plan]) -> dict[str, np.ndarray]:
    """The original's values at each plan's sample rows (rows x output channels), one forward pass per chunk; kept
    as float32 until their layer is fit (every layer's are held at once)."""
    found: dict[str, list[np.ndarray]] = {name: [] for name in plans}
    for part in parts:
        set_input(original_net, input_name, x[part])
        original_net.forward()
        for name, plan in plans.items():
            mine = (plan.image >= part.start) & (plan.image < part.stop)
            data = original_net.blobs[plan.blob].data[:, plan.channels]
            image = plan.image[mine] - part.start
            rows = data[image] if plan.oy is None or plan.ox is None else data[image, :, plan.oy[mine], plan.ox[mine]]
            found[name].append(np.array(rows, dtype=np.float32).reshape(len(image), -1))  # Caffe's own precision
    return {name: np.concatenate(rows) for name, rows in found.items()}


def _input_rows(chunks: list[np.ndarray], plan: Plan, geometry: dict[str, ConvGeometry]) -> np.ndarray:
    """A layer's input rows at ``plan``'s sample rows, from its input blob's ``chunks``."""
    found, offset = [], 0
    for x in chunks:
        mine = (plan.image >= offset) & (plan.image < offset + len(x))
        image = plan.image[mine] - offset
        if plan.oy is None or plan.ox is None:
            found.append(x[image].reshape(len(image), -1).astype(np.float64))
        else:
            g = geometry[plan.name]
            found.append(conv_rows(x, g.kernel, g.stride, g.pad, image, plan.oy[mine], plan.ox[mine]))
        offset += len(x)
    return np.concatenate(found)


def _refit_one(slim_net: Any, plan: Plan, y: np.ndarray, x_rows: np.ndarray, new: dict[str, list[np.ndarray]]) -> str:
    """Refit layer ``plan.name`` (with a Tucker core, its expand too) in ``slim_net`` and ``new`` from
    its rows; returns why not, or ''."""
    core = slim_net.params[plan.name]
    last = slim_net.params[plan.expand] if plan.expand else core  # its output is what the target is of
    w0 = np.asarray(core[0].data, dtype=np.float64).reshape(len(core[0].data), -1)
    if plan.expand:
        w0 = np.asarray(last[0].data, dtype=np.float64).reshape(len(last[0].data), -1) @ w0
    b0 = np.asarray(last[1].data, dtype=np.float64).reshape(-1)
    y = y.astype(np.float64)
    alpha = choose_alpha(x_rows, y, plan.image, w0, b0, plan.relu)
    w, b = fit_layer(x_rows, y, w0, b0, plan.relu, alpha)
    if not (np.isfinite(w).all() and np.isfinite(b).all()):
        return "the fit was not finite"
    if plan.expand:
        w, expand_w, b = reduced_rank(x_rows, w, b, len(core[0].data))
        last[0].data[...] = expand_w.reshape(last[0].data.shape)
    core[0].data[...] = w.reshape(core[0].data.shape)
    last[1].data[...] = b.reshape(last[1].data.shape)
    for name in filter(None, (plan.name, plan.expand)):
        new[name] = [np.array(blob.data, dtype=np.float32) for blob in slim_net.params[name]]
    return ""


def _outputs(net: Any, input_name: str, logits: str, val: Batches | None, indices: np.ndarray,
             chunk: int) -> np.ndarray | None:
    """``net``'s logits on the held-out images, ``chunk`` at a time (None without them)."""
    if val is None or not len(indices):
        return None
    io = NetIO(input_name, 0, (0, 0), logits, int(np.prod(net.blobs[logits].data.shape[1:])))
    return predict(net, io, val, indices, chunk).astype(np.float64)


def _held_out_kl(slim_net: Any, reference: np.ndarray | None, input_name: str, logits: str, val: Batches | None,
                 indices: np.ndarray, chunk: int) -> float | None:
    """Mean KL(original ‖ slim) at T=1 over the held-out images, the original's logits given (None without)."""
    mine = _outputs(slim_net, input_name, logits, val, indices, chunk)
    if reference is None or mine is None:
        return None
    return float(np.mean(distillation_losses(mine, reference, 1.0)))


def refit_rounds(ctx: Context, store: Weights, original_weights: PathLike, seed: int, only_relearned: bool = False,
                 seconds: float | None = None, progress: LayerProgress | None = None,
                 seconds_per_image: float = 0.0) -> list[RefitResult]:
    """Up to ``MAX_ROUNDS`` rounds of ``refit_layers``, round k on the k-th sample of training images
    (``sample_size``: 256 on a ResNet-50 at 224x224): another round while the last was kept and cut the held-out
    KL by ``MIN_ROUND_GAIN`` or more, and, under a time budget of ``seconds`` for the phase, took at most a third of
    what is left of it. Under a time budget the rounds end at ``TIME_SHARE`` of it, mid-round if need be, and a
    round's sample is what fits the time to that end (``sample_size``; ``seconds_per_image``: the original's forward
    pass, measured by the caller). The two nets are opened once for all rounds."""
    started = time.monotonic()
    deadline = None if seconds is None else started + TIME_SHARE * seconds
    rounds: list[RefitResult] = []
    nets = _RefitNets(ctx, original_weights)
    for k in range(MAX_ROUNDS):
        result = nets.round(store, seed, only_relearned, progress, k, deadline, seconds_per_image)
        rounds.append(result)
        if not worth_another_round(result):
            break
        if seconds is not None and result.seconds > (seconds - (time.monotonic() - started)) / 3:
            break
    return rounds


def worth_another_round(result: RefitResult) -> bool:
    """A round that was kept and cut the held-out KL by ``MIN_ROUND_GAIN`` or more. A KL summed in floating point
    can end a hair below 0 where the slim net already matches (a degenerate original, all one class); it is 0
    there, else a "cut" from -5.51e-17 to -5.52e-17 would read as a gain and buy another round for nothing."""
    if not result.kept or result.kl_before is None or result.kl_after is None:
        return False
    return max(result.kl_after, 0.0) <= (1 - MIN_ROUND_GAIN) * max(result.kl_before, 0.0) and result.kl_before > 0


def refit_slim(ctx: Context, store: Weights, original_weights: PathLike, seed: int, only_relearned: bool = False,
               progress: LayerProgress | None = None, round_index: int = 0,
               deadline: float | None = None, seconds_per_image: float = 0.0) -> RefitResult:
    """One round of ``refit_layers`` for a fine-tuning run: the slim net as it stands in ``store`` (updated in place
    when kept), the original from its files; the sample: the ``round_index``-th run of ``sample_size`` training
    images in an order drawn with ``seed``; ``only_relearned`` (``--freeze-rest``): the layers the rewrite made
    anew, not those downstream; ``deadline`` (``time.monotonic``): layers not reached by then stay as they are."""
    return _RefitNets(ctx, original_weights).round(store, seed, only_relearned, progress, round_index, deadline,
                                                   seconds_per_image)


class _RefitNets:
    """The slim net (its prototxt from ``ctx``) and the original in pycaffe, what the refit reads of the slim net's
    layers, and the original's held-out logits once forwarded: what every round shares."""

    def __init__(self, ctx: Context, original_weights: PathLike) -> None:
        caffe = import_caffe()
        self.ctx = ctx
        self.geometry: dict[str, ConvGeometry] = {}
        self.concats: set[str] = set()
        for layer in ctx.slim.layers():
            if layer.type == "Convolution":
                param = layer.proto.convolution_param
                found = conv_geometry(param)
                if param.group in (0, 1) and found.dilation == (1, 1):
                    self.geometry[layer.name] = found
            elif layer.type == "Concat" and layer.proto.concat_param.axis == 1 and \
                    not layer.proto.concat_param.HasField("concat_dim"):
                self.concats.add(layer.name)
        path = ctx.work / "refit.prototxt"
        caffe_io.write_prototxt(path, ctx.slim.to_net())
        self.slim_net = caffe.Net(str(path), caffe.TEST)
        self.original_net = caffe.Net(str(ctx.original_proto), caffe.TEST, weights=str(original_weights))
        self.live = live_activations_per_image(self.slim_net)
        self.original_activations = activations_per_image(ctx.original)
        self.reference: np.ndarray | None = None

    def round(self, store: Weights, seed: int, only_relearned: bool, progress: LayerProgress | None,
              round_index: int, deadline: float | None, seconds_per_image: float) -> RefitResult:
        ctx = self.ctx
        to_deadline = None if deadline is None else max(0.0, deadline - time.monotonic())
        images = sample_size(len(ctx.train_indices), self.live, to_deadline, seconds_per_image)
        order = np.random.default_rng(seed).permutation(ctx.train_indices)
        indices = np.sort(np.roll(order, -(round_index * images) % max(len(order), 1))[:images])
        chunk = chunk_size(images, self.original_activations)
        if self.reference is None:
            self.reference = _outputs(self.original_net, ctx.io.input, ctx.logits, ctx.val, ctx.val_indices, chunk)
        return refit_layers(self.slim_net, self.original_net, ctx.io.input, ctx.logits, set(ctx.steps[-1].relearn),
                            store, self.geometry, self.concats, ctx.train, indices, ctx.val, ctx.val_indices,
                            seed + round_index, only_relearned, progress, deadline, chunk, self.reference)
