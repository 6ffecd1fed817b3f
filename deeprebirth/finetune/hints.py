"""Hints: the intermediate blobs a whole-net phase matches beside the logits (``--hints``).

Before:  the whole-net phase's only signal is the logits (KD or regression). After a merged stem, every layer
         between it and the logits has to learn back what it lost from one 1000-number target per image, and where
         an iteration costs a second a budget buys a few hundred updates: too few.
After:   a few *cut* blobs between the first relearned layer and the logits (every path from the input to the
         logits passes through them: a ResNet stage's output, an inception or fire module's Concat) are matched
         too, each by a relative mean squared error to the original's blob (``losses.add_mimic_loss``):

             loss = logits loss + Σ_h ‖s_h - t_h‖² / (elements_h · var(t_h))

         so each block gets its own target, as FitNets (Romero et al. 2015) and few-sample distillation
         (Li et al. 2020) match blocks.

Preconditions on a hint blob h: its Caffe name and final shape are the same in both nets (a lossy rewrite keeps
every external blob's shape), it lies downstream of a relearned layer (elsewhere its error is zero) and upstream
of the logits, and it is a cut of the slim net. At most ``MAX_HINTS``, spread evenly over the candidates in layer
order, the last candidate always among them.

Pure graph queries: no Caffe, no weights.
"""

from __future__ import annotations

from collections.abc import Iterable

import networkx as nx

from deeprebirth.ir.graph import Graph
from deeprebirth.ir.shapes import infer_shapes

MAX_HINTS = 4


def _final_versions(graph: Graph) -> dict[str, str]:
    """Caffe blob name -> the SSA blob that holds its final value (after in-place layers)."""
    names = graph.caffe_blob_names()
    return {names[blob]: blob for blob in graph.blobs()}


def hint_blobs(original: Graph, slim: Graph, relearn: Iterable[str], logits: str,
               limit: int = MAX_HINTS) -> list[str]:
    """Caffe names of the blobs to match beside ``logits`` (see the module docstring), in layer order."""
    final = _final_versions(slim)
    original_final = _final_versions(original)
    if logits not in final:
        return []
    shapes, original_shapes = infer_shapes(slim), infer_shapes(original)
    flow = nx.DiGraph()
    for layer in slim.layers():
        for bottom in layer.bottoms:
            for top in layer.tops:
                flow.add_edge(bottom, top)
    sources = [blob for blob in slim.inputs() if blob in flow]
    end = final[logits]
    downstream: set[str] = set()
    for name in relearn:
        if name in slim:
            for top in slim.layer(name).tops:
                downstream |= {top} | nx.descendants(flow, top)
    upstream = nx.ancestors(flow, end)

    def is_cut(blob: str) -> bool:
        rest = flow.subgraph(node for node in flow if node != blob)
        return not any(nx.has_path(rest, source, end) for source in sources if source in rest)

    inputs = {slim.caffe_name(blob) for blob in slim.inputs()}
    candidates = [name for name, blob in final.items()
                  if name != logits and name not in inputs and blob in downstream and blob in upstream
                  and name in original_final and shapes.get(blob) is not None
                  and shapes.get(blob) == original_shapes.get(original_final[name]) and is_cut(blob)]
    order = {blob: i for i, blob in enumerate(slim.blobs())}
    candidates.sort(key=lambda name: order[final[name]])
    if len(candidates) <= limit:
        return candidates
    return [candidates[round((i + 1) * len(candidates) / limit) - 1] for i in range(limit)]
