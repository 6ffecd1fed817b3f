"""Layer classes: the paper's split of a net's time into tensor layers (convolution and inner product, where the
MACs are) and non-tensor layers (everything else, what slimming removes)."""

from __future__ import annotations

TENSOR_TYPES = frozenset({"Convolution", "Deconvolution", "InnerProduct"})
UNCOUNTED_TYPES = frozenset({"Input"})  # neither tensor nor non-tensor: they do no work at forward time
RUNTIME_OP = "runtime:"  # type prefix of ops a runtime adds on its own (layout reorders): no Caffe layer's work


def type_class(layer_type: str) -> str:
    """'tensor', 'non-tensor' or 'other' (the paper's split; Input layers do no work and count as neither)."""
    if layer_type in TENSOR_TYPES:
        return "tensor"
    return "other" if layer_type in UNCOUNTED_TYPES or layer_type.startswith(RUNTIME_OP) else "non-tensor"
