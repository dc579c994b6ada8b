"""The part of a graph that depends on some tensors: downstream-only probes run just that part,
fed with the tensors that cross the cut (recorded once by the reference pass)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import onnx


def subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Outer-scope names that the node's subgraphs (If / Loop / Scan bodies, nested) read."""
    reads: set[str] = set()
    for attribute in node.attribute:
        graphs = list(attribute.graphs) + ([attribute.g] if attribute.HasField("g") else [])
        for graph in graphs:
            defined = {v.name for v in graph.input} | {t.name for t in graph.initializer} | \
                {t.name for t in graph.sparse_initializer}
            for inner in graph.node:
                defined.update(inner.output)
            for inner in graph.node:
                reads.update(n for n in inner.input if n and n not in defined)
                reads.update(n for n in subgraph_reads(inner) if n not in defined)
            reads.update(v.name for v in graph.output if v.name not in defined)
    return reads


def node_reads(node: onnx.NodeProto) -> set[str]:
    """Every tensor a node reads: its inputs and what its subgraphs read from outside."""
    return {n for n in node.input if n} | subgraph_reads(node)


@dataclass(frozen=True)
class Cut:
    """The nodes of a graph that depend on `sources`, and what they read from the rest."""

    nodes: tuple[int, ...]  # indices into graph.node, in graph order (input-free producers
    # such as Constant nodes that they read are included)
    tensors: tuple[str, ...]  # computed by the other nodes: the tensors crossing the cut
    inputs: tuple[str, ...]  # graph inputs read (sources included)
    initializers: tuple[str, ...]  # initializers read
    outputs: tuple[str, ...]  # graph outputs the nodes produce
    whole: bool  # every node depends on the sources: the cut saves nothing


def downstream(graph: onnx.GraphProto, sources: Iterable[str]) -> Cut:
    """The nodes whose results change when the `sources` tensors change (the main graph is
    topologically sorted, as ONNX requires)."""
    changed = set(sources)
    reads = [node_reads(node) for node in graph.node]
    chosen = []
    for index, node in enumerate(graph.node):
        if reads[index] & changed:
            chosen.append(index)
            changed.update(o for o in node.output if o)
    return _assemble(graph, reads, chosen, None, len(chosen) == len(graph.node))


def without(graph: onnx.GraphProto, cut: Cut, dropped: Iterable[int],
            outputs: Iterable[str]) -> Cut:
    """`cut` less the nodes `dropped`, producing `outputs` (graph outputs or intermediate
    tensors its remaining nodes compute) instead of its own."""
    dropped = set(dropped)
    reads = [node_reads(node) for node in graph.node]
    free = {i for i in cut.nodes if not reads[i]}
    chosen = [i for i in cut.nodes if i not in dropped and i not in free]
    return _assemble(graph, reads, chosen, tuple(outputs), cut.whole and not dropped)


def _assemble(graph: onnx.GraphProto, reads: list[set[str]], chosen: list[int],
              outputs: tuple[str, ...] | None, whole: bool) -> Cut:
    """The cut of the nodes `chosen` (graph order): what they read from the rest, with the
    input-free producers they read; `outputs` None: the graph outputs they produce."""
    produced = {o for i in chosen for o in graph.node[i].output}
    needed = set().union(*(reads[i] for i in chosen)) - produced if chosen else set()
    # input-free producers (Constant nodes): cheaper to run than to record
    free = [i for i, node in enumerate(graph.node) if not reads[i] and set(node.output) & needed]
    nodes = sorted(set(chosen) | set(free))
    needed -= {o for i in free for o in graph.node[i].output}
    graph_inputs = {v.name for v in graph.input}
    initializers = {t.name for t in graph.initializer}
    if outputs is None:
        outputs = tuple(v.name for v in graph.output if v.name in produced)
    return Cut(tuple(nodes),
               tuple(sorted(needed - graph_inputs - initializers)),
               tuple(sorted(needed & graph_inputs)),
               tuple(sorted(needed & initializers - graph_inputs)),
               outputs, whole)
