"""The example's network: a GoogLeNet in miniature for 28x28 grayscale images, written as a deploy prototxt with
fillers (so Caffe can train it from scratch and the rewriter can start merged layers from them).

    data 1x28x28
    conv1 3x3 (16) -> ReLU -> pool1 3x3/2 (14x14) -> norm1 LRN            GoogLeNet's conv1 + pool1 + norm1
    conv2_reduce 1x1 (16) -> conv2 3x3 (48) -> norm2 LRN -> pool2 3x3/2    GoogLeNet's conv2 + norm2 + pool2 (7x7)
    inception_3a, inception_3b (7x7) -> pool3 3x3/2 (4x4) -> inception_4a   each with a 3x3/1 max-pooling branch
    global average pooling -> dropout -> fc 10 -> softmax
"""

from __future__ import annotations

# (1x1, 3x3_reduce, 3x3, 5x5_reduce, 5x5, pool_proj), GoogLeNet's proportions scaled down
INCEPTION = {"inception_3a": (16, 24, 32, 4, 8, 8), "inception_3b": (32, 32, 48, 8, 24, 16),
             "inception_4a": (48, 32, 64, 8, 24, 24)}


def _conv(name: str, bottom: str, out: int, kernel: int, pad: int = 0, stride: int = 1) -> str:
    return (f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}"\n'
            f'  param {{ lr_mult: 1 decay_mult: 1 }} param {{ lr_mult: 2 decay_mult: 0 }}\n'
            f'  convolution_param {{ num_output: {out} kernel_size: {kernel} pad: {pad} stride: {stride}\n'
            f'    weight_filler {{ type: "msra" }} bias_filler {{ type: "constant" value: 0.1 }} }} }}\n'
            f'layer {{ name: "{name}_relu" type: "ReLU" bottom: "{name}" top: "{name}" }}\n')


def _pool(name: str, bottom: str, kernel: int, stride: int, pad: int = 0) -> str:
    return (f'layer {{ name: "{name}" type: "Pooling" bottom: "{bottom}" top: "{name}"\n'
            f'  pooling_param {{ pool: MAX kernel_size: {kernel} stride: {stride} pad: {pad} }} }}\n')


def _lrn(name: str, bottom: str) -> str:
    return (f'layer {{ name: "{name}" type: "LRN" bottom: "{bottom}" top: "{name}"\n'
            f'  lrn_param {{ local_size: 5 alpha: 0.0001 beta: 0.75 }} }}\n')


def _inception(name: str, bottom: str, channels: tuple[int, ...]) -> str:
    c1, c3r, c3, c5r, c5, cp = channels
    return (_conv(f"{name}/1x1", bottom, c1, 1)
            + _conv(f"{name}/3x3_reduce", bottom, c3r, 1) + _conv(f"{name}/3x3", f"{name}/3x3_reduce", c3, 3, 1)
            + _conv(f"{name}/5x5_reduce", bottom, c5r, 1) + _conv(f"{name}/5x5", f"{name}/5x5_reduce", c5, 5, 2)
            + _pool(f"{name}/pool", bottom, 3, 1, 1) + _conv(f"{name}/pool_proj", f"{name}/pool", cp, 1)
            + f'layer {{ name: "{name}/output" type: "Concat" bottom: "{name}/1x1" bottom: "{name}/3x3" '
              f'bottom: "{name}/5x5" bottom: "{name}/pool_proj" top: "{name}/output" }}\n')


def prototxt(batch: int = 1) -> str:
    return ('name: "fashion_googlenet"\n'
            f'layer {{ name: "data" type: "Input" top: "data" '
            f'input_param {{ shape {{ dim: {batch} dim: 1 dim: 28 dim: 28 }} }} }}\n'
            + _conv("conv1", "data", 16, 3, 1) + _pool("pool1", "conv1", 3, 2) + _lrn("norm1", "pool1")
            + _conv("conv2_reduce", "norm1", 16, 1) + _conv("conv2", "conv2_reduce", 48, 3, 1)
            + _lrn("norm2", "conv2") + _pool("pool2", "norm2", 3, 2)
            + _inception("inception_3a", "pool2", INCEPTION["inception_3a"])
            + _inception("inception_3b", "inception_3a/output", INCEPTION["inception_3b"])
            + _pool("pool3", "inception_3b/output", 3, 2)
            + _inception("inception_4a", "pool3", INCEPTION["inception_4a"])
            + 'layer { name: "gap" type: "Pooling" bottom: "inception_4a/output" top: "gap" '
              'pooling_param { pool: AVE global_pooling: true } }\n'
            + 'layer { name: "drop" type: "Dropout" bottom: "gap" top: "gap" dropout_param { dropout_ratio: 0.2 } }\n'
            + 'layer { name: "fc" type: "InnerProduct" bottom: "gap" top: "fc" param { lr_mult: 1 decay_mult: 1 } '
              'param { lr_mult: 2 decay_mult: 0 } inner_product_param { num_output: 10 '
              'weight_filler { type: "xavier" } bias_filler { type: "constant" value: 0 } } }\n'
            + 'layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }\n')
