"""The least-squares start (``finetune.refit``): its rows are Caffe's convolution, and on the tiny GoogLeNet slimmed
by every rule it brings the slim net's held-out outputs closer to the original's, in real Caffe, in chunks as in one
pass. (The solves' own tests: tests/weights/test_ridge.py.)"""

from __future__ import annotations

import time
from dataclasses import replace
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from helpers import graph_from_text, save

from deeprebirth import caffe_pb2 as pb
from deeprebirth.caffe.data import Transform
from deeprebirth.caffe.runtime import forward, open_net
from deeprebirth.errors import DeepRebirthError
from deeprebirth.finetune import FinetuneOptions, finetune_files, refit_plan
from deeprebirth.finetune import refit as refit_module
from deeprebirth.finetune.budget import Budget
from deeprebirth.finetune.context import prepare
from deeprebirth.finetune.driver import resolve_refit
from deeprebirth.finetune.options import check_options
from deeprebirth.finetune.refit import (
    MAX_ROUNDS,
    MIN_ROUND_GAIN,
    RefitResult,
    chunk_size,
    refit_slim,
    sample_size,
    worth_another_round,
)
from deeprebirth.finetune.train import SolverOptions, relative_steps
from deeprebirth.pipeline import preset_options, rewrite_files
from deeprebirth.weights.ridge import conv_rows

CONV = """
name: "one_conv"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 5 dim: 9 dim: 11 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 4 kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0 } }
"""


def test_rows_times_weights_are_caffes_convolution(tmp_path: Path) -> None:
    """A non-square kernel, stride and pad: every output position's row, times the weights, plus the bias, is what
    Caffe computes there (float32 sums: 1e-5)."""
    graph = graph_from_text(CONV, seed=3)
    proto, model = save(graph, tmp_path, "conv")
    x = np.random.default_rng(0).standard_normal((2, 5, 9, 11)).astype(np.float32)
    out = forward(open_net(proto, model), {"data": x}, ["conv"])["conv"]
    w, b = graph.layer("conv").blobs  # type: ignore[misc]
    image, oy, ox = (a.ravel() for a in np.meshgrid(np.arange(2), np.arange(out.shape[2]), np.arange(out.shape[3]),
                                                   indexing="ij"))
    rows = conv_rows(x, (3, 2), (2, 1), (1, 0), image, oy, ox)  # kernel, stride, pad
    assert rows.shape == (len(image), 5 * 3 * 2)
    ours = rows @ w.reshape(4, -1).T.astype(np.float64) + b
    assert np.max(np.abs(ours - out[image, :, oy, ox])) < 1e-5


def test_auto_refits_where_the_pace_rule_comes_down_to_its_smallest_batch() -> None:
    """Seconds per image of the original's forward pass: 0.03 s (a ResNet-50 at 224 on a CPU core) buys about 200
    updates of 16 in 7 minutes; 0.3 ms (a 64x64 colour net) thousands."""
    seven = Budget.parse("7m")
    assert resolve_refit("auto", "whole", seven, 500, 0.03) == "on"
    assert resolve_refit("auto", "whole", seven, 500, 0.0003) == "off"
    assert resolve_refit("auto", "layerwise", seven, 500, 0.03) == "off"
    assert resolve_refit("auto", "whole", Budget.parse("7ep"), 1000, 0.03) == "off"  # 437 updates of 16 ...
    assert resolve_refit("auto", "whole", Budget.parse("6ep"), 1000, 0.03) == "on"  # ... 375: few
    assert resolve_refit("auto", "whole", Budget.parse("100it"), 1000, 0.03) == "off"
    assert resolve_refit("on", "whole", Budget.parse("100it"), 1000, 0.0) == "on"


def test_the_sample_and_its_chunks_fit_in_memory() -> None:
    assert sample_size(96, 25e3) == 96  # a small net: every image
    assert sample_size(5000, 25e3) == 256
    assert sample_size(500, 1.2e6) == 256  # open_nsfw's slim net at 224x224: 1.2 M live activations at most
    assert sample_size(500, 2e7) == 26
    assert sample_size(3, 2e7) == 3
    # under a time budget the two nets' passes over the sample take at most a third of the time to the deadline:
    # open_nsfw's original at 62.5 ms an image (1 thread)
    assert sample_size(500, 1.2e6, seconds=200.0, seconds_per_image=0.0625) == 256  # a 7-minute finetune
    assert sample_size(500, 1.2e6, seconds=12.5, seconds_per_image=0.0625) == 33  # a 30-second risk run
    assert sample_size(500, 1.2e6, seconds=1.0, seconds_per_image=0.0625) == 8
    assert chunk_size(256, 25e3) == 256
    assert chunk_size(256, 8.8e6) == 15  # open_nsfw at 224x224: both nets in about 2 GiB
    assert chunk_size(256, 1e9) == 1


def options(**changes: object) -> FinetuneOptions:
    base = FinetuneOptions(budget="40it", batch=16, transform=Transform(scale=1 / 255), holdout=0.25,
                           schedule="whole", solver=SolverOptions("adam", lr=1e-3), patience=0)
    return replace(base, **changes)  # type: ignore[arg-type]


def test_refit_brings_the_slim_nets_outputs_closer_in_caffe(finetune_nets: dict[str, str], tmp_path: Path) -> None:
    """Every rule's merges (a merged stem, widened inception branches): refit layer by layer, the held-out KL to the
    original falls; with ``only_relearned`` only the rewrite's new layers change."""
    nets = finetune_nets
    opts = options(work_dir=tmp_path / "work")
    ctx, store, _, _ = prepare(nets["original"], nets["original_weights"], nets["slim"], nets["slim_weights"],
                               nets["report"], nets["data"], tmp_path / "out.caffemodel", opts)
    start = {name: [b.copy() for b in blobs] for name, blobs in store.items()}
    result = refit_slim(ctx, store, nets["original_weights"], seed=0)
    assert result.kept and result.kl_before is not None and result.kl_after is not None
    assert result.kl_after < 0.2 * result.kl_before, (result.kl_before, result.kl_after)  # measured: 0.047 -> 0.0030
    changed = {name for name in store if not all(np.array_equal(a, b) for a, b in zip(store[name], start[name]))}
    assert set(result.refit) == changed and "conv2_reduce" in changed  # downstream of conv1_merge
    # a merged inception branch's blob is new: it is aimed at its channels of the module's Concat
    assert {f"inception_{i}/{b}_merge" for i in (1, 2, 3) for b in ("3x3", "5x5")} <= changed
    assert result.images == 72  # the training part of the 96 images: all of them
    assert "classifier" in changed and not result.skipped  # an InnerProduct on 44 pooled features: 72 rows suffice

    store = {name: [b.copy() for b in blobs] for name, blobs in start.items()}
    late = refit_slim(ctx, store, nets["original_weights"], seed=0, deadline=time.monotonic() - 1)
    assert not late.refit and not late.kept and set(late.skipped.values()) == {"out of time"}
    assert all(np.array_equal(store[n][0], start[n][0]) for n in store)  # a refit out of time changes nothing

    only = refit_slim(ctx, store, nets["original_weights"], seed=0, only_relearned=True)
    relearned = set(ctx.steps[-1].relearn)
    assert set(only.refit) | set(only.skipped) <= relearned
    assert all(np.array_equal(store[n][0], start[n][0]) for n in store if n not in relearned)


def test_a_tucker_chain_is_refit_as_one_map_at_its_ranks(finetune_nets: dict[str, str], tmp_path: Path) -> None:
    """The Tucker-decomposed net: each core and its expand are fit together onto the original's blob and split back
    at the core's rank (the shapes stay); the 1x1 reduces, whose blobs are new, stay as they were; the chains come
    closer to the original's blobs, and the held-out KL falls further, than with the expands alone."""
    nets = dict(finetune_nets)
    paths = {"slim": str(tmp_path / "tucker.prototxt"), "slim_weights": str(tmp_path / "tucker.caffemodel"),
             "report": str(tmp_path / "tucker.json")}
    rewrite_files(nets["original"], paths["slim"], nets["original_weights"], paths["slim_weights"], paths["report"],
                  options=preset_options("deeprebirth+tucker", rules="tucker", rank_method="speedup:3"))
    nets.update(paths)
    ctx, store, _, _ = prepare(nets["original"], nets["original_weights"], nets["slim"], nets["slim_weights"],
                               nets["report"], nets["data"], tmp_path / "out.caffemodel",
                               options(work_dir=tmp_path / "work"))
    start = {name: [b.copy() for b in blobs] for name, blobs in store.items()}
    cores = [n for n in store if n.endswith("_tucker_core")]
    assert cores
    chain = refit_slim(ctx, store, nets["original_weights"], seed=0)
    assert chain.kept and chain.kl_after is not None and chain.kl_before is not None
    for core in cores:
        expand = core.replace("_core", "_expand")
        assert {core, expand} <= set(chain.refit), (core, chain.skipped.get(core))
        assert [b.shape for b in store[core]] == [b.shape for b in start[core]]
        assert not np.array_equal(store[core][0], start[core][0])
    assert all(chain.skipped[n] == "no bias" for n in store if n.endswith("_tucker_reduce"))

    alone = {name: [b.copy() for b in blobs] for name, blobs in start.items()}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(refit_plan, "tucker_expand", lambda *args: None)  # the expands only, as before
        expands_only = refit_slim(ctx, alone, nets["original_weights"], seed=0)
    assert expands_only.kl_after is not None and "conv1_tucker_core" not in expands_only.refit
    # the first chain (conv1: nothing refit before it) on the held-out images, in Caffe: fit as one map
    # it comes closer to the original's blob than its expand refit alone
    x = np.load(nets["data"])["x"][ctx.val_indices].transpose(0, 3, 1, 2).astype(np.float32) / 255
    stem = "conv1_tucker_expand"
    blob = open_net(nets["slim"]).top_names[stem][0]
    target = forward(open_net(nets["original"], nets["original_weights"]), {"data": x}, [blob])[blob]
    errors = {}
    for label, weights in (("chain", store), ("expands", alone)):
        net = open_net(nets["slim"], nets["slim_weights"])
        for name, blobs in weights.items():
            for param, values in zip(net.params[name], blobs):
                param.data[...] = values.reshape(param.data.shape)
        errors[label] = float(np.mean((forward(net, {"data": x}, [blob])[blob] - target) ** 2) / np.var(target))
    assert errors["chain"] < 0.9 * errors["expands"], errors  # measured: 0.174 against 0.207
    assert chain.kl_after < expands_only.kl_after  # measured: 0.0495 -> 0.00283, against 0.00304


def test_the_refit_in_chunks_is_the_refit_in_one_pass(finetune_nets: dict[str, str], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The original once over the sample, the slim net layer by layer over chunks of it: the same fit as with the
    whole sample in one batch."""
    nets = finetune_nets
    ctx, store, _, _ = prepare(nets["original"], nets["original_weights"], nets["slim"], nets["slim_weights"],
                               nets["report"], nets["data"], tmp_path / "out.caffemodel",
                               options(work_dir=tmp_path / "work"))
    start = {name: [b.copy() for b in blobs] for name, blobs in store.items()}
    whole = refit_slim(ctx, store, nets["original_weights"], seed=0)
    monkeypatch.setattr(refit_module, "NET_BYTES", 1.0)  # chunks of one image
    chunked_store = {name: [b.copy() for b in blobs] for name, blobs in start.items()}
    chunked = refit_slim(ctx, chunked_store, nets["original_weights"], seed=0)
    assert chunked.refit == whole.refit and chunked.kept
    assert chunked.kl_after == pytest.approx(whole.kl_after, rel=1e-3)
    for name in whole.refit:
        for a, b in zip(store[name], chunked_store[name]):
            assert np.max(np.abs(a - b)) <= 1e-4 * max(1.0, float(np.max(np.abs(a)))), name


def test_finetune_reports_the_refit_and_refuses_it_with_the_layerwise_schedule(finetune_nets: dict[str, str],
                                                                                tmp_path: Path) -> None:
    result = finetune_files(finetune_nets["original"], finetune_nets["original_weights"], finetune_nets["slim"],
                            finetune_nets["slim_weights"], finetune_nets["report"], finetune_nets["data"],
                            tmp_path / "out.caffemodel", options(refit="on"))
    rounds = result.steps[-1].refit
    assert rounds is not None and 1 <= len(rounds) <= MAX_ROUNDS
    assert rounds[0]["layers"] > 0 and rounds[0]["kept"] and rounds[0]["kl_after"] < rounds[0]["kl_before"]
    for earlier, later in pairwise(rounds):  # each round goes on from where the last left the weights
        assert later["kl_before"] == pytest.approx(earlier["kl_after"], rel=1e-5)
        assert earlier["kl_after"] <= (1 - MIN_ROUND_GAIN) * earlier["kl_before"]  # ... only after a gain
    # auto: an iteration budget keeps the default batch, so the pace rule never comes down to 8: no refit
    auto = finetune_files(finetune_nets["original"], finetune_nets["original_weights"], finetune_nets["slim"],
                          finetune_nets["slim_weights"], finetune_nets["report"], finetune_nets["data"],
                          tmp_path / "auto.caffemodel", options(work_dir=tmp_path / "w2"))
    assert auto.steps[-1].refit is None
    with pytest.raises(DeepRebirthError, match="--refit on starts the whole schedule"):
        check_options(options(refit="on", schedule="layerwise"))


def test_per_weight_step_solvers_step_each_layer_by_the_same_share_of_its_weights() -> None:
    """Adam moves every weight by about the rate: a layer whose weights are 100x smaller gets a 100x smaller
    lr_mult (its weights' RMS over the median layer's), the bias with it."""
    net = pb.NetParameter()
    for name, mults in (("stem", (1.0, 2.0)), ("mid", (1.0, 2.0)), ("head", (1.0, 2.0)), ("frozen", (0.0, 0.0))):
        layer = net.layer.add(name=name, type="Convolution")
        for m in mults:
            layer.param.add(lr_mult=m)
    scale = {"stem": 5e-4, "mid": 0.05, "head": 0.5, "frozen": 1.0}
    rng = np.random.default_rng(0)
    weights = {n: [s * rng.choice([-1.0, 1.0], (8, 4)).astype(np.float32), np.zeros(8, np.float32)]
               for n, s in scale.items()}
    scaled = relative_steps(net, ["stem", "mid", "head"], lambda name: weights[name])
    mults = {layer.name: [p.lr_mult for p in layer.param] for layer in scaled.layer}
    assert mults["mid"] == pytest.approx([1.0, 2.0])
    assert mults["stem"] == pytest.approx([0.01, 0.02]) and mults["head"] == pytest.approx([10.0, 20.0])
    assert mults["frozen"] == [0.0, 0.0]
    assert [p.lr_mult for p in net.layer[0].param] == [1.0, 2.0]  # the spec's own net is left as it was


def test_another_round_only_after_a_real_cut_of_a_positive_kl() -> None:
    def result(before: float, after: float, kept: bool = True) -> RefitResult:
        return RefitResult(images=8, kl_before=before, kl_after=after, kept=kept)

    assert worth_another_round(result(1.0, 1 - MIN_ROUND_GAIN))
    assert not worth_another_round(result(1.0, 0.96))  # a cut under 5%
    assert not worth_another_round(result(1.0, 0.5, kept=False))
    assert worth_another_round(result(1.73e-8, -5.51e-17))  # the float sum a hair below 0 is 0: a real cut
    # an original that is all one class: the KL is 0 give or take rounding, nothing left to cut
    assert not worth_another_round(result(-5.51e-17, -5.52e-17))
    assert not worth_another_round(result(0.0, 0.0))


def test_without_a_search_a_refit_start_gets_a_tenth_of_the_rescue_rate(finetune_nets: dict[str, str],
                                                                         tmp_path: Path) -> None:
    """40 iterations fit no search: SGD's users get Adam at 1e-4, or 1e-5 from a kept least-squares refit, which
    starts close to the original (docs/decisions/adam-rescue.md)."""
    steps = {}
    for refit in ("on", "off"):
        result = finetune_files(finetune_nets["original"], finetune_nets["original_weights"], finetune_nets["slim"],
                                finetune_nets["slim_weights"], finetune_nets["report"], finetune_nets["data"],
                                tmp_path / f"{refit}.caffemodel",
                                options(refit=refit, solver=SolverOptions("sgd"), work_dir=tmp_path / refit))
        steps[refit] = result.steps[-1]
    assert steps["on"].refit is not None and steps["on"].refit[0]["kept"] and steps["off"].refit is None
    assert (steps["off"].solver, steps["off"].lr) == ("adam", pytest.approx(1e-4))
    assert (steps["on"].solver, steps["on"].lr) == ("adam", pytest.approx(1e-5))
    assert "least-squares refit" in steps["on"].search
    assert "refit" not in steps["off"].search and "no search" in steps["off"].search
