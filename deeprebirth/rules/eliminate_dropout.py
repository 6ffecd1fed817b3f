"""eliminate_dropout (exact): remove Dropout layers, which are the identity at inference time.

Before:  x -> Dropout -> y -> ...
After:   x -> ...

Preconditions: the net is read in the TEST phase (deploy nets are). When the Dropout's output is a net output, its
input takes over that name, so the net keeps its outputs' names; that needs an input that nothing else reads and
that is not a net input (else Skip).
"""

from __future__ import annotations

from collections.abc import Iterator

from deeprebirth.ir.graph import Graph
from deeprebirth.rules._shared import passthrough_blocker, remove_passthrough
from deeprebirth.rules.base import Change, Match, Rule, RuleConfig, Skip

NAME = "eliminate_dropout"


def match(graph: Graph, config: RuleConfig) -> Iterator[Match | Skip]:
    for layer in graph.layers():
        if layer.type != "Dropout":
            continue
        blocker = passthrough_blocker(graph, layer)
        if blocker:
            yield Skip(layer.name, blocker)
            continue
        yield Match((layer.name,))


def apply(graph: Graph, found: Match, config: RuleConfig) -> Change:
    layer = graph.layer(found.layers[0])
    remove_passthrough(graph, layer)
    return Change(NAME, True, removed=[layer.name], added=[], changed=[], summary=f"removed Dropout '{layer.name}'")


RULE = Rule(NAME, exact=True, group="exact", match=match, apply=apply)
