"""decompose_conv_tucker (lossy, opt-in group "tucker"): Tucker-2 decomposition of a KxK convolution (Kim et al.
2016), the step DeepRebirth combines with slimming for its fastest GoogLeNet.

Before:  X -> conv  KxK, C -> N, stride/pad/dilation, bias b                                  -> Y
After:   X -> conv_tucker_reduce 1x1, C -> R1, no bias
           -> conv_tucker_core   KxK, R1 -> R2, the same stride/pad/dilation, no bias
           -> conv_tucker_expand 1x1, R2 -> N, bias b                                         -> Y (same blob name)

Weights (``deeprebirth.weights.tucker.tucker2``): ``W ~= G x_C U_in x_N U_out`` (HOSVD, then HOOI); reduce = ``U_in^T``,
core = ``G``, expand = ``U_out``. With R1 = C and R2 = N the three convolutions compute the original exactly
(zero padding commutes with the bias-free reduce); with lower ranks they are its best Tucker-2 approximation, which
fine-tuning then improves. ``config.init == "filler"`` draws them from the conv's fillers instead.

Ranks, per layer, by ``config.rank_method`` (see ``deeprebirth.weights.tucker``): "vbmf:0.5" (default: Kim et al.'s
VBMF, raised to keep at least half of each unfolding's energy), "vbmf" (pure), "energy:F", "speedup:X",
"ranks:R1,R2", "full". A factor whose chosen rank is full (R1 = C, e.g. a conv that reads the net's input image of at
most 4 channels, whose channels vbmf and energy keep whole) is an orthogonal change of basis: it is folded into the
core and that 1x1 is not made (Tucker-1, as Kim et al. do for the first layer), except with "full", which always
builds all three so the decomposition itself can be verified.

MACs (P_in, P_out = input and output pixels): ``P_in*C*R1 + P_out*R1*R2*kh*kw + P_out*R2*N`` against
``P_out*C*N*kh*kw``.

Preconditions: a Convolution (not Deconvolution) with one bottom, group 1, channel axis 1, a kernel larger than 1x1,
known input shape, no shared (named) parameters; not itself a piece of an earlier decomposition (names
``*_tucker_reduce|core|expand``, so a second rewrite changes nothing); the decomposition saves MACs ("full" excepted),
and with ranks read off the kernel (vbmf, energy) at least ``MIN_SAVING`` of them: a kernel that keeps nearly full
ranks is not low-rank. In Caffe, pieces that save under a tenth of a conv's MACs gain under a tenth of its time, and
nothing on an RGB stem (Tucker-1 at 1.3% fewer MACs: 6% slower; benchmarks/tucker_breakeven.py), for an
approximation that must be re-learned. Explicit ranks and speedup targets are taken as given. vbmf and energy
need weights (they read the ranks off the kernel) and must find rank >= 1 on both modes: pure VBMF
finds none in an untrained, random kernel (the default's energy floor does). speedup, ranks and full also work without weights: then only the prototxt
changes, and the new layers start from their fillers whenever weights are later made.

Change: exact=False; ``relearn`` = the new layers; ``reproduces`` = the Caffe name of the conv's output.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator

import numpy as np

from deeprebirth.errors import DeepRebirthError
from deeprebirth.ir.graph import Graph, Layer
from deeprebirth.ir.initializers import layer_fillers
from deeprebirth.ir.shapes import conv_geometry, infer_shapes
from deeprebirth.rules.base import Change, Match, Rule, RuleConfig, Skip
from deeprebirth.weights.fillers import fill, layer_rng
from deeprebirth.weights.tucker import (
    ConvSize,
    RankMethod,
    choose_ranks,
    parse_rank_method,
    tucker2,
)

NAME = "decompose_conv_tucker"
PIECE = re.compile(r"_tucker_(reduce|core|expand)")  # in the name: a piece, or a layer later made from one
IMAGE_CHANNELS = 4  # grey, RGB, RGBA: a net input this narrow is an image, whose channels vbmf and energy keep
MIN_SAVING = 0.1  # of the conv's MACs, for ranks read off the kernel (see the module docstring)


def rank_method(config: RuleConfig) -> RankMethod:
    try:
        return parse_rank_method(config.rank_method)
    except ValueError as err:
        raise DeepRebirthError(str(err)) from None


def _precondition(conv: Layer) -> str:
    """Why ``conv`` cannot be decomposed, or ''."""
    p = conv.proto.convolution_param
    if PIECE.search(conv.name):
        return "a piece of an earlier Tucker decomposition"
    if len(conv.bottoms) != 1:
        return f"{len(conv.bottoms)} inputs (shared weights)"
    if p.group != 1:
        return f"group {p.group}: Tucker-2 here is for dense convolutions"
    if p.axis != 1:
        return f"channel axis {p.axis}"
    if any(param.name for param in conv.proto.param):
        return "its parameters are shared by name with another layer"
    if conv_geometry(p).kernel == (1, 1):
        return "1x1 kernel: nothing to gain from a Tucker-2 decomposition"
    return ""


def match(graph: Graph, config: RuleConfig) -> Iterator[Match | Skip]:
    method = rank_method(config)
    shapes = None
    for conv in graph.layers():
        if conv.type == "Deconvolution":
            yield Skip(conv.name, "Deconvolution is not decomposed")
            continue
        if conv.type != "Convolution":
            continue
        reason = _precondition(conv)
        if reason:
            yield Skip(conv.name, reason)
            continue
        shapes = infer_shapes(graph) if shapes is None else shapes
        bottom, top = shapes[conv.bottoms[0]], shapes[conv.tops[0]]
        if bottom is None or top is None:
            yield Skip(conv.name, "unknown input shape")
            continue
        if method.needs_weights and not conv.blobs:
            yield Skip(conv.name, f"no weights: rank method {method.kind} reads the ranks off the kernel "
                                  "(give the weights, or use speedup:X)")
            continue
        size = ConvSize(bottom[1], top[1], conv_geometry(conv.proto.convolution_param).kernel,
                        bottom[0] * bottom[2] * bottom[3], top[0] * top[2] * top[3])
        reads_image = size.c <= IMAGE_CHANNELS and graph.is_source(conv.bottoms[0])
        ranks = choose_ranks(method, conv.blobs[0] if conv.blobs else None, size, reads_image)
        if ranks is None:
            what = {"vbmf": "VBMF finds no component above the estimated noise (an untrained kernel?)",
                    "energy": "no energy in the kernel (all zero)"}.get(method.kind, "even ranks (1, 1) need more MACs")
            yield Skip(conv.name, f"{method.kind}: {what}")
            continue
        r1, r2 = ranks
        reduce, expand = (r1 < size.c, r2 < size.n) if method.kind != "full" else (True, True)
        if not (reduce or expand):
            yield Skip(conv.name, f"{method.kind} keeps full ranks ({r1}, {r2}): nothing to decompose")
            continue
        macs = size.tucker_macs(r1, r2, reduce, expand)
        if method.kind != "full" and macs >= size.macs():
            yield Skip(conv.name, f"ranks ({r1}, {r2}) would not save MACs ({macs:,} >= {size.macs():,})")
            continue
        if method.needs_weights and macs > (1 - MIN_SAVING) * size.macs():
            yield Skip(conv.name, f"{method.kind} ranks ({r1}, {r2}) would save {1 - macs / size.macs():.2%} of its "
                                  f"MACs: under {MIN_SAVING:.0%}, too little for the error and the extra layers")
            continue
        yield Match((conv.name,), {"ranks": (r1, r2), "c": size.c, "n": size.n, "reduce": reduce,
                                   "expand": expand, "macs": macs, "original_macs": size.macs()})


def _piece(conv: Layer, name: str, num_output: int, bias: bool, kernel: bool) -> Layer:
    """A new convolution made from ``conv``'s settings: its geometry when ``kernel``, else 1x1 stride 1 (fillers
    and engine kept); the lr/decay settings of its weights (and bias, if it has one)."""
    proto = copy.deepcopy(conv.proto)
    del proto.param[2 if bias else 1:]
    p = proto.convolution_param
    if not kernel:
        old = copy.deepcopy(p)
        p.Clear()
        p.kernel_size.append(1)
        for keep in ("weight_filler", "bias_filler"):
            if old.HasField(keep):
                getattr(p, keep).CopyFrom(getattr(old, keep))
        if old.HasField("engine"):
            p.engine = old.engine
    p.num_output = num_output
    p.bias_term = bias
    return Layer(name, "Convolution", [], [], proto)


def _weights(conv: Layer, pieces: list[Layer], found: Match, config: RuleConfig,
             shapes: list[list[tuple[int, ...]]]) -> None:
    """Give ``pieces`` their blobs: Tucker-2 of the conv's kernel, or fillers; none when the conv has none."""
    if not conv.blobs:
        return
    if config.init == "filler":
        weight_filler, bias_filler = layer_fillers(conv)
        for piece, blob_shapes in zip(pieces, shapes):
            rng = layer_rng(config.seed, piece.name)
            piece.blobs = [fill(weight_filler if i == 0 else bias_filler, s, rng) for i, s in enumerate(blob_shapes)]
        return
    if config.init != "inherit":
        raise DeepRebirthError(f"unknown init {config.init!r} (known: inherit, filler)")
    r1, r2 = found.data["ranks"]
    reduce, core, expand = tucker2(conv.blobs[0], r1, r2)
    f64 = np.float64
    if not found.data["reduce"]:  # fold the orthogonal full-rank factor into the core
        core = np.einsum("srhw,rc->schw", core.astype(f64), reduce[:, :, 0, 0].astype(f64), optimize=True)
    if not found.data["expand"]:
        core = np.einsum("schw,ns->nchw", core.astype(f64), expand[:, :, 0, 0].astype(f64), optimize=True)
    kernels = ([reduce] if found.data["reduce"] else []) + [core] + ([expand] if found.data["expand"] else [])
    for piece, kernel in zip(pieces, kernels):
        piece.blobs = [np.asarray(kernel, dtype=np.float32)]
    if len(conv.blobs) > 1:
        pieces[-1].blobs.append(np.asarray(conv.blobs[1], dtype=np.float32))  # type: ignore[union-attr]


def apply(graph: Graph, found: Match, config: RuleConfig) -> Change:
    conv = graph.layer(found.layers[0])
    d = found.data
    (r1, r2), c, n = d["ranks"], d["c"], d["n"]
    bias = conv.proto.convolution_param.bias_term
    kernel = conv_geometry(conv.proto.convolution_param).kernel
    pieces: list[Layer] = []
    shapes: list[list[tuple[int, ...]]] = []
    if d["reduce"]:
        pieces.append(_piece(conv, graph.fresh_layer_name(conv.name + "_tucker_reduce"), r1, False, False))
        shapes.append([(r1, c, 1, 1)])
    core_in, core_out, core_bias = (r1 if d["reduce"] else c), (r2 if d["expand"] else n), bias and not d["expand"]
    pieces.append(_piece(conv, graph.fresh_layer_name(conv.name + "_tucker_core"), core_out, core_bias, True))
    shapes.append([(core_out, core_in, *kernel)] + ([(n,)] if core_bias else []))
    if d["expand"]:
        pieces.append(_piece(conv, graph.fresh_layer_name(conv.name + "_tucker_expand"), n, bias, False))
        shapes.append([(n, r2, 1, 1)] + ([(n,)] if bias else []))
    _weights(conv, pieces, found, config, shapes)
    source, at = conv.bottoms[0], conv.name
    for piece in pieces[:-1]:
        piece.bottoms, piece.tops = [source], [graph.new_blob(piece.name)]
        graph.add_layer(piece, at=at)
        source, at = piece.tops[0], piece.name
    pieces[-1].bottoms, pieces[-1].tops = [source], list(conv.tops)
    graph.replace_layer(conv.name, pieces[-1])
    names = [piece.name for piece in pieces]
    return Change(NAME, False, removed=[conv.name], added=names, changed=[],
                  summary=f"decomposed '{conv.name}' (C={c}, N={n}) with ranks ({r1}, {r2}) into "
                          f"{' -> '.join(names)}: MACs {d['original_macs']:,} -> {d['macs']:,}",
                  relearn=names, reproduces=graph.caffe_name(conv.tops[0]))


RULE = Rule(NAME, exact=False, group="tucker", match=match, apply=apply)
