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


# SqueezeNet v1.0 (Iandola et al. 2016): (squeeze, expand) channels of fire2 ... fire9
SQUEEZENET_V10_FIRES = ((16, 64), (16, 64), (32, 128), (32, 128), (48, 192), (48, 192), (64, 256), (64, 256))


def fire_module(name: str, bottom: str, squeeze: int, expand: int) -> str:
    """A SqueezeNet fire module ``<name>/squeeze1x1 … <name>/concat``: 1x1 squeeze, then 1x1 and 3x3 expands."""
    return (_conv(f"{name}/squeeze1x1", bottom, squeeze, 1)
            + _conv(f"{name}/expand1x1", f"{name}/squeeze1x1", expand, 1)
            + _conv(f"{name}/expand3x3", f"{name}/squeeze1x1", expand, 3, pad=1)
            + f'layer {{ name: "{name}/concat" type: "Concat" bottom: "{name}/expand1x1" '
              f'bottom: "{name}/expand3x3" top: "{name}/concat" }}\n')


def squeezenet_v10(size: int = 227, classes: int = 1000, fires: Sequence[Sequence[int]] = SQUEEZENET_V10_FIRES,
                   conv1: int = 96, batch: int = 1, train_val: str | None = None) -> str:
    """SqueezeNet v1.0's layout (conv1 7x7/2, pool1, fire2-4, pool4, fire5-8, pool8, fire9, conv10, global
    average pooling), with Input of ``batch`` images; ``train_val``: the LMDB folder prefix of a train_val net
    instead (TRAIN and TEST Data layers reading ``<prefix>_train`` / ``<prefix>_val`` with crop_size = ``size``,
    a TRAIN-only SoftmaxWithLoss, TEST-only top-1 and top-5 Accuracy), as SqueezeNet's own train_val.prototxt."""
    if train_val is None:
        text = (f'name: "squeezenet_v1.0"\nlayer {{ name: "data" type: "Input" top: "data" '
                f'input_param {{ shape {{ dim: {batch} dim: 3 dim: {size} dim: {size} }} }} }}\n')
    else:
        text = 'name: "squeezenet_v1.0"\n'
        for phase, suffix, mirror, batch_size in (("TRAIN", "train", "true", 4), ("TEST", "val", "false", 2)):
            text += (f'layer {{ name: "data" type: "Data" top: "data" top: "label" include {{ phase: {phase} }}\n'
                     f'  transform_param {{ crop_size: {size} mirror: {mirror} mean_value: 104 mean_value: 117 '
                     f'mean_value: 123 }}\n'
                     f'  data_param {{ source: "{train_val}_{suffix}" batch_size: {batch_size} backend: LMDB }} }}\n')
    text += _conv("conv1", "data", conv1, 7, stride=2) + _pool("pool1", "conv1", 3, 2)
    bottom = "pool1"
    for i, (squeeze, expand) in enumerate(fires):
        name = f"fire{i + 2}"
        text += fire_module(name, bottom, squeeze, expand)
        bottom = f"{name}/concat"
        if name in ("fire4", "fire8"):
            text += _pool(f"pool{i + 2}", bottom, 3, 2)
            bottom = f"pool{i + 2}"
    text += (f'layer {{ name: "drop9" type: "Dropout" bottom: "{bottom}" top: "{bottom}" '
             'dropout_param { dropout_ratio: 0.5 } }\n')
    text += _conv("conv10", bottom, classes, 1)
    text += ('layer { name: "pool10" type: "Pooling" bottom: "conv10" top: "pool10" '
             'pooling_param { pool: AVE global_pooling: true } }\n')
    if train_val is None:
        return text + 'layer { name: "prob" type: "Softmax" bottom: "pool10" top: "prob" }\n'
    return text + (
        'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "pool10" bottom: "label" top: "loss" '
        'include { phase: TRAIN } }\n'
        'layer { name: "accuracy" type: "Accuracy" bottom: "pool10" bottom: "label" top: "accuracy" '
        'include { phase: TEST } }\n'
        'layer { name: "accuracy_top5" type: "Accuracy" bottom: "pool10" bottom: "label" top: "accuracy_top5" '
        'include { phase: TEST } accuracy_param { top_k: 5 } }\n')
