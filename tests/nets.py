"""Small nets written as prototxt text, for tests that need a real architecture but must run in milliseconds."""

from __future__ import annotations

from collections.abc import Sequence

# (1x1, 3x3_reduce, 3x3, 5x5_reduce, 5x5, pool_proj) per inception module, GoogLeNet's order of branches
TINY_INCEPTION_BLOCKS = ((8, 8, 12, 4, 6, 6), (10, 10, 14, 4, 8, 8), (12, 10, 16, 4, 8, 8))


def _conv(name: str, bottom: str, out: int, kernel: int, stride: int = 1, pad: int = 0, relu: bool = True) -> str:
    text = f"""layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}"
  param {{ lr_mult: 1 decay_mult: 1 }} param {{ lr_mult: 2 decay_mult: 0 }}
  convolution_param {{ num_output: {out} kernel_size: {kernel} stride: {stride} pad: {pad}
    weight_filler {{ type: "xavier" }} bias_filler {{ type: "constant" value: 0.2 }} }} }}
"""
    if relu:
        text += f'layer {{ name: "{name}_relu" type: "ReLU" bottom: "{name}" top: "{name}" }}\n'
    return text


def _pool(name: str, bottom: str, kernel: int, stride: int, pad: int = 0, pool: str = "MAX") -> str:
    return (f'layer {{ name: "{name}" type: "Pooling" bottom: "{bottom}" top: "{name}"\n'
            f'  pooling_param {{ pool: {pool} kernel_size: {kernel} stride: {stride} pad: {pad} }} }}\n')


def _lrn(name: str, bottom: str) -> str:
    return (f'layer {{ name: "{name}" type: "LRN" bottom: "{bottom}" top: "{name}"\n'
            f'  lrn_param {{ local_size: 5 alpha: 0.0001 beta: 0.75 }} }}\n')


def inception_block(name: str, bottom: str, channels: Sequence[int]) -> str:
    """A GoogLeNet inception module ``<name>/1x1 … <name>/output``, branches in GoogLeNet's order."""
    c1, c3r, c3, c5r, c5, cp = channels
    return (_conv(f"{name}/1x1", bottom, c1, 1)
            + _conv(f"{name}/3x3_reduce", bottom, c3r, 1) + _conv(f"{name}/3x3", f"{name}/3x3_reduce", c3, 3, pad=1)
            + _conv(f"{name}/5x5_reduce", bottom, c5r, 1) + _conv(f"{name}/5x5", f"{name}/5x5_reduce", c5, 5, pad=2)
            + _pool(f"{name}/pool", bottom, 3, 1, pad=1) + _conv(f"{name}/pool_proj", f"{name}/pool", cp, 1)
            + f'layer {{ name: "{name}/output" type: "Concat" bottom: "{name}/1x1" bottom: "{name}/3x3" '
              f'bottom: "{name}/5x5" bottom: "{name}/pool_proj" top: "{name}/output" }}\n')


def tiny_inception(size: int = 32, blocks: Sequence[Sequence[int]] = TINY_INCEPTION_BLOCKS, classes: int = 10,
                   extra: str = "") -> str:
    """A GoogLeNet in miniature: conv -> pool -> LRN, conv 1x1 -> conv 3x3 -> LRN -> pool, then the inception
    modules in stages of two (stride-2 max pooling between stages), global average pooling, InnerProduct,
    Softmax. ``extra`` is appended before the classifier (layers that read the net's blobs)."""
    text = (f'name: "tiny_inception"\nlayer {{ name: "data" type: "Input" top: "data" '
            f'input_param {{ shape {{ dim: 1 dim: 3 dim: {size} dim: {size} }} }} }}\n'
            + _conv("conv1", "data", 8, 5, stride=2, pad=2) + _pool("pool1", "conv1", 3, 2) + _lrn("norm1", "pool1")
            + _conv("conv2_reduce", "norm1", 8, 1) + _conv("conv2", "conv2_reduce", 16, 3, pad=1)
            + _lrn("norm2", "conv2") + _pool("pool2", "norm2", 3, 2))
    bottom = "pool2"
    for i, channels in enumerate(blocks):
        if i and i % 2 == 0:
            text += _pool(f"pool{i // 2 + 2}", bottom, 3, 2)
            bottom = f"pool{i // 2 + 2}"
        text += inception_block(f"inception_{i + 1}", bottom, channels)
        bottom = f"inception_{i + 1}/output"
    return (text + extra
            + f'layer {{ name: "gap" type: "Pooling" bottom: "{bottom}" top: "gap" '
              f'pooling_param {{ pool: AVE global_pooling: true }} }}\n'
            + 'layer { name: "drop" type: "Dropout" bottom: "gap" top: "gap" dropout_param { dropout_ratio: 0.4 } }\n'
            + f'layer {{ name: "classifier" type: "InnerProduct" bottom: "gap" top: "classifier" '
              f'inner_product_param {{ num_output: {classes} weight_filler {{ type: "xavier" }} }} }}\n'
            + 'layer { name: "prob" type: "Softmax" bottom: "classifier" top: "prob" }\n')
