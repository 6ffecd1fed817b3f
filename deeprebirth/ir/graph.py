"""The graph IR: layers as nodes of a networkx DAG, blobs in single-assignment form.

Caffe lets a layer write its output over its input (``top == bottom``: ReLU, BatchNorm, Scale, Dropout in place), so
a Caffe blob name may have several producers over time. Here every in-place output gets a fresh internal name
(``conv1`` -> ``conv1@1`` -> ``conv1@2``) so each blob has exactly one producer and rules can ask "who reads this
value?" without thinking about order. When the graph is written back, each blob's Caffe name is restored, so
in-place layers stay in place.

Edges run producer -> consumer, keyed by ``(blob, bottom index)``. Layer order is kept stable: layers sort
topologically with their original position as tie-break, and a new layer takes the position of the layer it replaces.

A train_val net is seen in one phase: the layers of the other phase (its data layer, a TRAIN-only loss ...) are held
aside, outside the DAG, so rules never see them. Each remembers its place and the blobs it reads; a blob read by one
has an extra reader (``only_consumer`` says so, and ``replace_uses`` moves the read), and ``to_net(all_phases=True)``
writes them back where they were.

Kept as one module: it is the IR itself, a ``Graph`` class whose methods together keep these invariants
(single-assignment names, stable order, held-aside layers), so splitting it would split the invariants.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import networkx as nx
import numpy as np

from deeprebirth import caffe_pb2 as pb
from deeprebirth.errors import DeepRebirthError
from deeprebirth.io import caffe_io
from deeprebirth.io.caffe_io import Weights, blob_to_array


class GraphError(Exception):
    """An IR invariant broken by a rewrite: a bug in a rule, never a user error."""


@dataclass
class Layer:
    """One Caffe layer. ``proto`` carries every setting except names of blobs and the weights themselves."""

    name: str
    type: str
    bottoms: list[str]
    tops: list[str]
    proto: pb.LayerParameter = field(default_factory=pb.LayerParameter)
    blobs: list[np.ndarray] | None = None  # None: no weights known (prototxt only)
    top_shapes: list[tuple[int, ...]] | None = None  # a data layer's output shapes, found when the net was loaded

    def clone(self, **changes: object) -> Layer:
        layer = Layer(self.name, self.type, list(self.bottoms), list(self.tops), copy.deepcopy(self.proto),
                      None if self.blobs is None else list(self.blobs), self.top_shapes)
        for key, value in changes.items():
            setattr(layer, key, value)
        return layer


@dataclass
class AsideLayer:
    """A layer of another phase than the one rewritten, as written in the prototxt, with where it goes back."""

    param: pb.LayerParameter
    rank: float  # its place among the layers' ranks
    reads: list[str | None]  # per bottom: the blob of this graph it reads (None: one only other-phase layers make)


class Graph:
    """A Caffe net as a DAG of layers. All mutation goes through the methods below, which keep edges in step."""

    def __init__(self, name: str = "", source: str | None = None) -> None:
        self.name = name
        self.source = source
        self.net_settings = pb.NetParameter()  # net-level fields other than layers (state, force_backward ...)
        self._dag = nx.MultiDiGraph()
        self._producer: dict[str, str] = {}
        self._caffe_name: dict[str, str] = {}
        self._rank: dict[str, float] = {}
        self.aside: list[AsideLayer] = []  # the other phase's layers (train_val nets)
        self.warnings: list[str] = []  # what loading found worth saying (e.g. a data layer of unknown shape)

    # ------------------------------------------------------------------ building

    @classmethod
    def from_net(cls, net: pb.NetParameter, source: str | None = None,
                 aside: Sequence[caffe_io.FilteredLayer] = ()) -> Graph:
        """Build from a normalised NetParameter (see ``caffe_io.normalize_net``); prototxt blobs become weights.
        ``aside``: the layers the phase filter left out (``caffe_io.normalize_net_phases``), kept for writing."""
        graph = cls(net.name, source)
        graph.net_settings.CopyFrom(net)
        del graph.net_settings.layer[:]
        current: dict[str, str] = {}  # Caffe blob name -> its latest SSA version
        by_slot: dict[int, list[pb.LayerParameter]] = {}
        for item in aside:
            by_slot.setdefault(item.slot, []).append(item.param)

        def set_aside(slot: int) -> None:
            params = by_slot.get(slot, [])
            for j, param in enumerate(params):
                reads = [current.get(blob) for blob in param.bottom]
                graph.aside.append(AsideLayer(param, slot - 1 + (j + 1) / (len(params) + 1), reads))

        for index, param in enumerate(net.layer):
            set_aside(index)
            if not param.name:
                raise DeepRebirthError(f"layer #{index} has no name", file=source)
            if param.name in graph._rank:
                raise DeepRebirthError("duplicate layer name", file=source, layer=param.name)
            bottoms = []
            for blob in param.bottom:
                if blob not in current:
                    raise DeepRebirthError(f"bottom blob '{blob}' is not produced by any earlier layer",
                                           file=source, layer=param.name)
                bottoms.append(current[blob])
            tops = []
            for i, blob in enumerate(param.top):
                in_place = i < len(param.bottom) and param.bottom[i] == blob
                if blob in param.top[:i]:  # first: an earlier top of this layer has no producer entry yet
                    raise DeepRebirthError(f"top blob '{blob}' listed twice", file=source, layer=param.name)
                if blob in current and not in_place:
                    raise DeepRebirthError(f"top blob '{blob}' is already produced by layer "
                                           f"'{graph._producer[current[blob]]}'", file=source, layer=param.name)
                ssa = graph.fresh_blob_name(blob) if blob in current else blob
                graph._caffe_name[ssa] = blob
                current[blob] = ssa
                tops.append(ssa)
            proto = pb.LayerParameter()
            proto.CopyFrom(param)
            del proto.bottom[:]
            del proto.top[:]
            try:
                blobs = [blob_to_array(b) for b in proto.blobs] or None
            except DeepRebirthError as err:
                raise DeepRebirthError(f"weights inside the prototxt: {err.message}", file=source,
                                       layer=param.name) from None
            del proto.blobs[:]
            layer = Layer(param.name, param.type, bottoms, tops, proto, blobs)
            graph._insert(layer, float(index))
        set_aside(len(net.layer))
        return graph

    def to_net(self, all_phases: bool = False) -> pb.NetParameter:
        """Back to a NetParameter (no weights) with Caffe blob names restored, in place where it is safe; with
        ``all_phases`` the other phase's layers go back where they were (after the layers making what they read)."""
        net = pb.NetParameter()
        net.CopyFrom(self.net_settings)
        net.name = self.name
        names = self.caffe_blob_names()
        params: list[pb.LayerParameter] = []
        ranks: list[float] = []
        made_at: dict[str, int] = {}  # blob -> index in params of its producer
        for layer in self.layers():
            param = pb.LayerParameter()
            param.CopyFrom(layer.proto)
            param.name = layer.name
            param.type = layer.type
            param.bottom.extend(names[b] for b in layer.bottoms)
            param.top.extend(names[t] for t in layer.tops)
            made_at.update((t, len(params)) for t in layer.tops)
            params.append(param)
            ranks.append(self._rank[layer.name])
        if all_phases:
            earliest = 0
            for item in sorted(self.aside, key=lambda a: a.rank):
                param = self._aside_param(item, names)
                at = next((i for i, r in enumerate(ranks) if r > item.rank), len(params))
                at = max([at, earliest] + [made_at[b] + 1 for b in item.reads if b is not None])
                params.insert(at, param)
                ranks.insert(at, item.rank)
                made_at = {b: i + (i >= at) for b, i in made_at.items()}
                earliest = at + 1
        net.layer.extend(params)
        return net

    def _aside_param(self, item: AsideLayer, names: dict[str, str]) -> pb.LayerParameter:
        param = pb.LayerParameter()
        param.CopyFrom(item.param)
        renamed = {}
        for i, blob in enumerate(item.reads):
            if blob is None:
                continue
            if blob not in self._producer:
                raise DeepRebirthError(f"the rewrite removed blob '{item.param.bottom[i]}', which this layer of the "
                                       "other phase reads", file=self.source, layer=item.param.name)
            renamed[item.param.bottom[i]] = names[blob]
            param.bottom[i] = names[blob]
        for i, top in enumerate(param.top):  # in place on a blob that got another name: follow it
            if i < len(item.param.bottom) and item.param.bottom[i] == top and top in renamed:
                param.top[i] = renamed[top]
        return param

    def weights(self) -> Weights:
        return {layer.name: list(layer.blobs) for layer in self.layers() if layer.blobs}

    def caffe_blob_names(self) -> dict[str, str]:
        """SSA blob -> the name to write. A blob gets its wanted Caffe name unless that name was already written,
        in which case it may reuse it only as Caffe's in-place form (same name as the bottom at the same index,
        whose value nothing reads any more); otherwise it gets a fresh unique name."""
        names: dict[str, str] = {}
        written: set[str] = set()
        all_wanted = set(self._caffe_name.values())
        pending = {blob: len(self.consumers(blob)) for blob in self._producer}
        for layer in self.layers():
            for blob in layer.bottoms:
                pending[blob] -= 1
            for i, blob in enumerate(layer.tops):
                wanted = self._caffe_name.get(blob, blob)
                if wanted in written:
                    bottom = layer.bottoms[i] if i < len(layer.bottoms) else None
                    in_place = bottom is not None and names[bottom] == wanted and pending[bottom] == 0
                    if not in_place:
                        k = 1
                        while f"{wanted}_{k}" in written or f"{wanted}_{k}" in all_wanted:
                            k += 1
                        wanted = f"{wanted}_{k}"
                names[blob] = wanted
                written.add(wanted)
        return names

    # ------------------------------------------------------------------ queries

    def layers(self) -> list[Layer]:
        """All layers in a stable topological order."""
        order = nx.lexicographical_topological_sort(self._dag, key=lambda name: (self._rank[name], name))
        return [self._dag.nodes[name]["layer"] for name in order]

    def layer(self, name: str) -> Layer:
        try:
            return self._dag.nodes[name]["layer"]  # type: ignore[no-any-return]
        except KeyError:
            raise GraphError(f"no layer named {name!r}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._dag

    def __len__(self) -> int:
        return self._dag.number_of_nodes()

    def producer(self, blob: str) -> Layer:
        return self.layer(self._producer[blob])

    def consumers(self, blob: str) -> list[Layer]:
        """Layers that read ``blob`` (each once, in layer order)."""
        producer = self._producer[blob]
        names = {v for _, v, key in self._dag.out_edges(producer, keys=True) if key[0] == blob}
        return sorted((self.layer(n) for n in names), key=lambda layer: self._rank[layer.name])

    def only_consumer(self, blob: str) -> Layer | None:
        """The single layer reading ``blob`` exactly once, if that is the case and ``blob`` is not a net output
        (nor read by a layer of the other phase)."""
        readers = self.consumers(blob)
        if len(readers) != 1 or readers[0].bottoms.count(blob) != 1:
            return None
        if any(blob in item.reads for item in self.aside):
            return None
        return readers[0]

    def caffe_name(self, blob: str) -> str:
        return self._caffe_name.get(blob, blob)

    def blobs(self) -> list[str]:
        return [top for layer in self.layers() for top in layer.tops]

    def outputs(self) -> list[str]:
        """Blobs no layer reads: the net's outputs."""
        return [blob for blob in self.blobs() if not self.consumers(blob)]

    def inputs(self) -> list[str]:
        return [top for layer in self.layers() if layer.type == "Input" for top in layer.tops]

    def is_source(self, blob: str) -> bool:
        """Is ``blob`` fed from outside the net: an Input's top, or a data layer's (Data, ImageData, ... read
        files, not blobs)? ``inputs()`` lists only the Input form, the one a deploy net has."""
        return not self.producer(blob).bottoms

    def layer_types(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for layer in self.layers():
            counts[layer.type] = counts.get(layer.type, 0) + 1
        return counts

    def dag(self) -> nx.MultiDiGraph:
        """A read-only view of the networkx graph (nodes carry ``layer``)."""
        return self._dag.copy(as_view=True)

    # ------------------------------------------------------------------ naming

    def fresh_blob_name(self, base: str) -> str:
        taken = set(self._producer) | set(self._caffe_name) | set(self._caffe_name.values())
        k = 1
        while f"{base}@{k}" in taken:
            k += 1
        return f"{base}@{k}"

    def fresh_layer_name(self, base: str) -> str:
        if base not in self._dag:
            return base
        k = 1
        while f"{base}_{k}" in self._dag:
            k += 1
        return f"{base}_{k}"

    # ------------------------------------------------------------------ mutation

    def _insert(self, layer: Layer, rank: float) -> None:
        if layer.name in self._dag:
            raise GraphError(f"layer {layer.name!r} already exists")
        for blob in layer.tops:
            if blob in self._producer:
                raise GraphError(f"blob {blob!r} already produced by {self._producer[blob]!r}")
        for blob in layer.bottoms:
            if blob not in self._producer:
                raise GraphError(f"layer {layer.name!r} reads unknown blob {blob!r}")
        self._dag.add_node(layer.name, layer=layer)
        self._rank[layer.name] = rank
        for blob in layer.tops:
            self._producer[blob] = layer.name
            self._caffe_name.setdefault(blob, blob)
        for index, blob in enumerate(layer.bottoms):
            self._dag.add_edge(self._producer[blob], layer.name, key=(blob, index))

    def add_layer(self, layer: Layer, at: str | None = None) -> Layer:
        """Add ``layer`` (its tops must be new blobs, see ``new_blob``); it sorts right after layer ``at``, or last."""
        if at is None:
            rank = max(self._rank.values(), default=0.0) + 1.0
        else:
            later = [r for r in self._rank.values() if r > self._rank[at]]
            rank = (self._rank[at] + min(later)) / 2 if later else self._rank[at] + 1.0
        self._insert(layer, rank)
        return layer

    def new_blob(self, caffe_name: str) -> str:
        """A fresh SSA name for a new blob that should be written as ``caffe_name`` where Caffe allows it."""
        ssa = caffe_name if caffe_name not in self._caffe_name else self.fresh_blob_name(caffe_name)
        self._caffe_name[ssa] = caffe_name
        return ssa

    def rename_layer(self, old_name: str, new_name: str) -> Layer:
        """Give a layer another name, keeping its place, inputs and readers."""
        return self.replace_layer(old_name, self.layer(old_name).clone(name=new_name))

    def rename_blob(self, blob: str, caffe_name: str) -> None:
        """Write ``blob`` under another Caffe name (e.g. to keep a net output's name when its producer goes)."""
        self._caffe_name[blob] = caffe_name

    def remove_layer(self, name: str) -> Layer:
        """Remove a layer whose tops nobody reads any more."""
        layer = self.layer(name)
        for blob in layer.tops:
            if self.consumers(blob):
                raise GraphError(f"cannot remove {name!r}: its top {blob!r} is still read")
        self._dag.remove_node(name)
        del self._rank[name]
        for blob in layer.tops:
            del self._producer[blob]
        return layer

    def replace_uses(self, old: str, new: str) -> None:
        """Make every reader of blob ``old`` read ``new`` instead."""
        if new not in self._producer:
            raise GraphError(f"unknown blob {new!r}")
        for reader in self.consumers(old):
            for index, blob in enumerate(reader.bottoms):
                if blob == old:
                    self._dag.remove_edge(self._producer[old], reader.name, key=(old, index))
                    reader.bottoms[index] = new
                    self._dag.add_edge(self._producer[new], reader.name, key=(new, index))
        for item in self.aside:
            item.reads = [new if blob == old else blob for blob in item.reads]

    def replace_layer(self, old_name: str, new: Layer) -> Layer:
        """Put ``new`` where ``old_name`` was: same position; ``new`` must produce the same tops (or a subset that
        covers every top still read)."""
        old = self.layer(old_name)
        readers = {blob: [(r.name, i) for r in self.consumers(blob) for i, b in enumerate(r.bottoms) if b == blob]
                   for blob in old.tops}
        rank = self._rank[old_name]
        for blob in old.tops:
            for reader, index in readers[blob]:
                self._dag.remove_edge(old_name, reader, key=(blob, index))
        self._dag.remove_node(old_name)
        del self._rank[old_name]
        for blob in old.tops:
            del self._producer[blob]
        self._insert(new, rank)
        for blob, uses in readers.items():
            if uses and blob not in new.tops:
                raise GraphError(f"{new.name!r} does not produce {blob!r}, which is still read")
            for reader, index in uses:
                self._dag.add_edge(new.name, reader, key=(blob, index))
        return new

    # ------------------------------------------------------------------ invariants

    def check(self) -> None:
        """Raise GraphError unless: acyclic; every blob has one producer; edges match bottoms; names unique."""
        if not nx.is_directed_acyclic_graph(self._dag):
            raise GraphError(f"cycle: {nx.find_cycle(self._dag)}")
        produced: dict[str, str] = {}
        for name, data in self._dag.nodes(data=True):
            layer: Layer = data["layer"]
            if layer.name != name:
                raise GraphError(f"node {name!r} holds layer {layer.name!r}")
            for blob in layer.tops:
                if blob in produced:
                    raise GraphError(f"blob {blob!r} produced by {produced[blob]!r} and {name!r}")
                produced[blob] = name
        if produced != self._producer:
            raise GraphError("producer map out of step with the layers")
        for item in self.aside:
            lost = [b for b in item.reads if b is not None and b not in produced]
            if lost:
                raise GraphError(f"blob {lost[0]!r}, read by the other phase's layer {item.param.name!r}, is gone")
        expected = sorted((self._producer[b], name, (b, i)) for name, data in self._dag.nodes(data=True)
                          for i, b in enumerate(data["layer"].bottoms))
        actual = sorted(self._dag.edges(keys=True))
        if expected != actual:
            raise GraphError("edges out of step with the layers' bottoms")
        self.caffe_blob_names()


def attach_weights(graph: Graph, weights: Weights, expected_shapes: dict[str, list[tuple[int, ...]]],
                   source: str | None = None) -> None:
    """Give each layer its blobs from ``weights`` (matched by layer name, as Caffe does).

    ``expected_shapes`` holds each learnable layer's blob shapes (from shape inference). Legacy 4-D shapes are
    reshaped when the element count agrees; a missing layer, a wrong blob count or a wrong shape is an error that
    names the layer, the expectation and what was found. Weights of layers the net does not have are ignored.
    """
    for layer in graph.layers():
        expected = expected_shapes.get(layer.name)
        found = weights.get(layer.name)
        if expected is None:
            if found:
                layer.blobs = list(found)  # a type whose blobs we do not model: carry them as they are
            continue
        if not expected:
            continue
        if found is None:
            raise DeepRebirthError(f"no weights for this {layer.type} layer in the caffemodel", file=source,
                                   layer=layer.name)
        if len(found) != len(expected):
            raise DeepRebirthError(f"expected {len(expected)} weight blobs, found {len(found)}", file=source,
                                   layer=layer.name)
        blobs = []
        for i, (array, shape) in enumerate(zip(found, expected)):
            if tuple(array.shape) != tuple(shape):
                if array.size != int(np.prod(shape, dtype=np.int64)):
                    raise DeepRebirthError(f"weight blob {i} has shape {tuple(array.shape)}, expected {tuple(shape)}",
                                           file=source, layer=layer.name)
                array = array.reshape(shape)
            blobs.append(array)
        layer.blobs = blobs

