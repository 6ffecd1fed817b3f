"""Pure weight math for merge_inception_branches: channel layout, widening, channel permutation. numpy only.

Channel positions are those of the block's Concat output. A block's Concat inputs have widths ``w_0 … w_{k-1}``
and input ``i`` covers the original channels ``[o_i, o_i + w_i)``. Removing some inputs and handing their
channels to kept ones gives each kept input a list of *sources*: the original channels its new output channels
stand for, ascending. The new Concat lists the kept inputs in their old order, so its channel ``c`` stands for the
original channel ``perm[c]``; ``perm`` is the identity exactly when every kept input's sources are one contiguous
range (for GoogLeNet's order 1x1, 3x3, 5x5, pool_proj: 1x1 -> 3x3 and pool_proj -> 5x5).

A layer that read original channel ``perm[c]`` must read channel ``c`` now: its input-channel weights become
``W[:, perm]`` (``permute_input_channels``), per-channel blobs ``b[perm]``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np

WIDEN_MODES = ("3x3", "5x5", "balanced")


def assign_freed(widths: Sequence[int], removed: Collection[int], candidates: Sequence[int],
                 kernels: Mapping[int, int], widen: str) -> dict[int, int]:
    """Which kept input (one of ``candidates``, Concat indices) receives each removed input's channels.

    ``kernels`` holds each candidate's kernel area. "3x3": all to the candidate with the smallest kernel, "5x5": all
    to the one with the largest (ties: the first in Concat order). "balanced": each removed input goes to the
    nearest candidate in Concat order, which keeps channel positions whenever the removed input sits next to a
    candidate (ties: the one with fewer channels so far, then the earlier one).
    """
    if widen not in WIDEN_MODES:
        raise ValueError(f"unknown widen mode {widen!r} (known: {', '.join(WIDEN_MODES)})")
    if not candidates:
        raise ValueError("no candidate to widen")
    if widen == "3x3":
        best = min(candidates, key=lambda i: (kernels[i], i))
        return {r: best for r in removed}
    if widen == "5x5":
        best = min(candidates, key=lambda i: (-kernels[i], i))
        return {r: best for r in removed}
    load = {i: widths[i] for i in candidates}
    target = {}
    for r in sorted(removed):
        best = min(candidates, key=lambda i: (abs(i - r), load[i], i))
        target[r] = best
        load[best] += widths[r]
    return target


def channel_layout(widths: Sequence[int], target: Mapping[int, int]) -> tuple[list[int], dict[int, np.ndarray],
                                                                              np.ndarray]:
    """``(kept, sources, perm)`` for Concat inputs of ``widths`` when each input ``r`` in ``target`` is removed and
    its channels go to input ``target[r]``: the kept inputs in order, each one's source channels (ascending), and
    the new Concat's channel -> original channel map."""
    offsets = np.cumsum([0, *widths])
    kept = [i for i in range(len(widths)) if i not in target]
    sources = {}
    for k in kept:
        parts = [np.arange(offsets[i], offsets[i + 1]) for i in range(len(widths)) if i == k or target.get(i) == k]
        sources[k] = np.sort(np.concatenate(parts))
    perm = np.concatenate([sources[k] for k in kept]) if kept else np.zeros(0, dtype=np.int64)
    return kept, sources, perm.astype(np.int64)


def own_channels(sources: np.ndarray, offset: int, width: int) -> np.ndarray:
    """For each source channel: the index of the input's own output channel it is (-1 for a freed channel)."""
    inside = (sources >= offset) & (sources < offset + width)
    return np.where(inside, sources - offset, -1).astype(np.int64)


def widen_output_channels(blobs: Sequence[np.ndarray], own: np.ndarray,
                          fresh: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Convolution blobs (weight (N, C, kh, kw), optional bias (N,)) widened to ``len(own)`` outputs: output ``i``
    is a copy of the old output ``own[i]``, or, where ``own[i] < 0``, output ``i`` of ``fresh`` (arrays of the new
    shapes)."""
    out = []
    keep = own >= 0
    for old, new in zip(blobs, fresh):
        if new.shape[0] != own.size or old.shape[1:] != new.shape[1:]:
            raise ValueError(f"fresh blob of shape {new.shape} does not widen {old.shape} to {own.size} outputs")
        widened = np.array(new, dtype=np.float32, copy=True)
        widened[keep] = old[own[keep]]
        out.append(widened)
    return out


def embed_permutation(perm: np.ndarray, offset: int, total: int) -> np.ndarray:
    """``perm`` of a Concat input at ``offset`` as a permutation of the whole Concat output of ``total`` channels."""
    full = np.arange(total, dtype=np.int64)
    full[offset:offset + perm.size] = offset + perm
    return full


def expand_permutation(perm: np.ndarray, inner: int) -> np.ndarray:
    """A channel permutation as a permutation of the flattened (channel, inner) features: channel-major, as Caffe
    lays out N x C x H x W."""
    return (perm[:, None] * inner + np.arange(inner, dtype=np.int64)).ravel()


def permute_input_channels(weight: np.ndarray, perm: np.ndarray, axis: int, inner: int = 1) -> np.ndarray:
    """A weight whose ``axis`` indexes input features (channel-major, ``inner`` features per channel) rearranged so
    that input channel ``c`` gets what channel ``perm[c]`` had."""
    index = expand_permutation(perm, inner)
    if weight.shape[axis] != index.size:
        raise ValueError(f"weight axis {axis} has {weight.shape[axis]} entries, the permutation {index.size}")
    return np.take(weight, index, axis=axis)
