"""strip_unused: remove every node, argument, library function and variable no output needs.

Applied to every body at any depth, callees first. In each body, resource arguments that no
callee reads any more are dropped from the call (masks and weights after folding and freezing;
a loop's only where the body passes the resource through and nobody reads that output). Then
the live nodes are those the body's outputs need (networkx ancestors over data and control
edges): at the top, the entry's outputs, its inputs and its control outputs that have side
effects; in a function body, its returns and every node with a side effect. In every body,
control edges from side-effect-free nodes (variable reads, frozen weights, NoOps grouping only
reads) only order pure work and are dropped, so what they pinned can die (a loop body's NoOp
that waits for its reads would otherwise keep every frozen weight's unmasked copy). Then
resource placeholders without readers, variables no entry reads, and library functions no live
node calls are removed.
Postcondition: outputs are unchanged; nothing dead is left.
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType

from graphprune import body as b
from graphprune import graph as g
from graphprune.analysis import effectful_control_outputs, has_side_effect, live_roots
from graphprune.passbase import PassContext, PassResult, register_pass


def _drop_colocation_with_removed(node, live: set) -> None:
    """Colocation constraints ('_class': 'loc:@other') naming a removed node would make the graph
    unimportable; they only matter for placement, so drop those entries."""
    if "_class" not in node.attr:
        return
    kept = [v for v in node.attr["_class"].list.s if not v.startswith(b"loc:@") or v[5:].decode() in live]
    if kept:
        del node.attr["_class"].list.s[:]
        node.attr["_class"].list.s.extend(kept)
    else:
        del node.attr["_class"]


def _strip_body(body: b.Body, entry: g.Entry, kept: dict) -> None:
    """Strip one body (its callees are stripped already); for the top graph, record the entry's
    surviving control outputs in ``kept``."""
    for site in body.call_sites():
        site.open()
        site.drop_unused_resources()
        site.close()
    memo: dict = {}
    for node in body.nodes:
        inputs = [raw for raw in node.input if not raw.startswith("^")
                  or (body.producer(raw) is not None and has_side_effect(body, body.producer(raw), memo))]
        if len(inputs) != len(node.input):
            body.set_inputs(node, inputs)
    if body.is_function:
        _drop_pure_control_returns(body, memo)
    else:
        kept["control_outputs"] = effectful_control_outputs(body, entry, memo)
    live = b.live_nodes(body, live_roots(body, entry, memo))
    if not body.is_function:
        for node in body.nodes:
            if node.name in live:
                _drop_colocation_with_removed(node, live)
    body.delete(live)


def _drop_pure_control_returns(body: b.Body, memo: dict) -> None:
    """A function's control outputs that have no side effect: a tf.function lists its variable
    reads there, and a read frozen into a constant would keep the weight's unmasked copy."""
    pure = []
    for name, target in body.proto.control_ret.items():
        node = body.node(body.source(target))
        if node is None or not has_side_effect(body, node, memo):
            pure.append(name)
    if not pure:
        return
    for name in pure:
        del body.proto.control_ret[name]
    kept = [name for name in body.proto.signature.control_output if name not in pure]
    del body.proto.signature.control_output[:]
    body.proto.signature.control_output.extend(kept)
    body.mark_changed()


def _strip_entry(entry: g.Entry) -> g.Entry:
    kept: dict = {}
    stripped, _ = b.rewrite_entry(entry, lambda body: _strip_body(body, entry, kept), order="post")
    graph_def = stripped.graph_def
    library = {f.signature.name: f for f in graph_def.library.function}
    if len(b.referenced_functions(graph_def.node, library)) != len(library):
        if stripped is entry:
            graph_def = g.copy_graph(graph_def)
        b.drop_uncalled_functions(graph_def)
    present = {node.name for node in graph_def.node}
    resources = MappingProxyType({p: k for p, k in stripped.resources.items() if p in present})
    return dataclasses.replace(stripped, graph_def=graph_def, resources=resources,
                               control_outputs=kept.get("control_outputs", entry.control_outputs))


def strip_unused(model: g.TracedModel, context: PassContext) -> PassResult:
    """Drop dead nodes, unread resource placeholders, unused variables and library functions."""
    entries = tuple(_strip_entry(entry) for entry in model.entries)
    used = {key for entry in entries for key in entry.resources.values()}
    unused = [key for key in model.variables if key not in used]
    removed_nodes = sum(len(a.graph_def.node) - len(b_.graph_def.node) for a, b_ in zip(model.entries, entries))
    removed_functions = sum(len(a.graph_def.library.function) - len(b_.graph_def.library.function)
                            for a, b_ in zip(model.entries, entries))
    changed = bool(removed_nodes or removed_functions or unused) or any(
        a.control_outputs != b_.control_outputs or a.graph_def is not b_.graph_def
        for a, b_ in zip(model.entries, entries))
    if not changed:
        return PassResult(model, changed=False, report={"removed_nodes": 0, "removed_variables": []})
    new_model = dataclasses.replace(model, entries=entries).with_variables((), drop=unused)
    return PassResult(new_model, changed=True,
                      report={"removed_nodes": removed_nodes, "removed_functions": removed_functions,
                              "removed_variables": sorted(unused)})


register_pass("strip_unused", strip_unused, invalidates=("weights",))
