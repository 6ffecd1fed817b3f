"""Pure weight math: numpy arrays in, numpy arrays out. No graph, no protobuf, no Caffe; the rules in
``deeprebirth.rules`` decide where it applies and do the graph surgery.

    affine     BatchNorm / Scale as per-channel affine maps, folded into a Convolution / InnerProduct
    pooling    a pooling layer folded into the convolution before it (a wider kernel)
    branches   inception branch merging: which branch gets freed channels, widening, channel permutations
    tucker     Tucker-2 (HOSVD + HOOI) of conv kernels and its ranks (VBMF, energy, a MAC budget)
    fillers    Caffe's fillers and plausible random blobs for a layer type
    ridge      one layer's weights refit onto target outputs (ridge regression, ReLU-aware), for ``finetune.refit``
"""
