"""strip_unused: remove every node, library function and variable that no output needs.

Live nodes are those reachable (data or control edges) from the entry's outputs and from its
control outputs that have side effects. Control edges to side-effect-free nodes (variable reads,
NoOps grouping only reads) only order pure work and are dropped, so the reads they pinned can die.
Then resource placeholders without readers, variables no entry reads, and library functions no
live node calls are removed. Inside While/If bodies dead nodes go too, and a While drops resource
loop variables its body no longer reads (masks and weights after folding and freezing). Postcondition: outputs are unchanged; nothing dead is left.
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType

from graphprune import functions
from graphprune import graph as g
from graphprune.pipeline import PassContext, PassResult, register_pass

SIDE_EFFECT_PREFIXES = ("Assign", "ResourceApply", "ResourceScatter", "ResourceSparseApply", "Print", "Write",
                        "Save", "Restore", "Enqueue", "Stateful", "While", "If", "Case")


def has_side_effect(node, index: g.NodeIndex, memo: dict) -> bool:
    if node.name in memo:
        return memo[node.name]
    memo[node.name] = False  # breaks cycles
    if node.op in ("NoOp", "Identity"):
        result = any(
            has_side_effect(index.nodes[g.parse_input(raw)[0]], index, memo)
            for raw in node.input if g.parse_input(raw)[0] in index.nodes
        )
    else:
        result = node.op.startswith(SIDE_EFFECT_PREFIXES) or "Summary" in node.op
    memo[node.name] = result
    return result


def _called_functions(nodes, library) -> set[str]:
    """Names of library functions referenced (transitively) by attrs of ``nodes``."""
    by_name = {f.signature.name: f for f in library.function}
    pending = [n for n in nodes]
    called: set[str] = set()
    while pending:
        node = pending.pop()
        for attr in node.attr.values():
            names = [attr.func.name] if attr.HasField("func") else []
            names += [f.name for f in attr.list.func]
            for name in names:
                if name in by_name and name not in called:
                    called.add(name)
                    pending.extend(by_name[name].node_def)
    return called


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


def _strip_function(function) -> bool:
    """Remove body nodes no output, control output or side effect needs; True if any went."""
    nodes = {n.name: n for n in function.node_def}
    memo: dict = {}

    def effectful(node) -> bool:
        if node.name not in memo:
            memo[node.name] = False
            if node.op in ("NoOp", "Identity"):
                memo[node.name] = any(effectful(nodes[functions.producer_name(raw)]) for raw in node.input
                                      if functions.producer_name(raw) in nodes)
            else:
                memo[node.name] = node.op.startswith(SIDE_EFFECT_PREFIXES) or "Summary" in node.op
        return memo[node.name]

    roots = [functions.producer_name(v) for v in list(function.ret.values()) + list(function.control_ret.values())]
    roots += [n.name for n in function.node_def if effectful(n)]
    live, pending = set(), roots
    while pending:
        name = pending.pop()
        if name in live or name not in nodes:
            continue
        live.add(name)
        pending.extend(functions.producer_name(raw) for raw in nodes[name].input)
    if len(live) == len(nodes):
        return False
    kept = [n for n in function.node_def if n.name in live]
    del function.node_def[:]
    function.node_def.extend(kept)
    return True


def _strip_bodies(nodes, graph_def) -> None:
    """Strip dead nodes from the While/If bodies the live nodes call (renamed by content)."""
    library = functions.library_of(graph_def)
    for node in nodes:
        for attr, _ in functions.body_attrs(node):
            original = library.get(node.attr[attr].func.name)
            if original is None:
                continue
            function = functions.copy_function(original)
            if _strip_function(function):
                node.attr[attr].func.name = functions.rename_with_content_hash(function)
                graph_def.library.function.append(function)


def _strip_entry(entry: g.Entry) -> g.Entry:
    graph_def = g.copy_graph(entry.graph_def)
    index = g.NodeIndex(graph_def)
    for node in list(graph_def.node):
        if node.op in functions.LOOP_OPS:
            _strip_bodies([node], graph_def)  # first, so reads made dead by folding go
            functions.drop_unused_resource_loop_variables(graph_def, node, g.NodeIndex(graph_def))
    index = g.NodeIndex(graph_def)
    memo: dict = {}
    for node in graph_def.node:
        kept = [raw for raw in node.input
                if not raw.startswith("^") or (g.parse_input(raw)[0] in index.nodes
                                               and has_side_effect(index.nodes[raw[1:]], index, memo))]
        if len(kept) != len(node.input):
            del node.input[:]
            node.input.extend(kept)
    control_outputs = tuple(name for name in entry.control_outputs
                            if name in index.nodes and has_side_effect(index.nodes[name], index, memo))
    roots = [g.parse_input(name.split(":")[0])[0] for name in entry.outputs] + list(control_outputs)
    roots += [p.placeholder for p in entry.inputs]  # inputs stay, even if unused
    live, pending = set(), list(roots)
    while pending:
        name = pending.pop()
        if name in live or name not in index.nodes:
            continue
        live.add(name)
        pending.extend(g.parse_input(raw)[0] for raw in index.nodes[name].input)
    kept_nodes = [node for node in graph_def.node if node.name in live]
    for node in kept_nodes:
        _drop_colocation_with_removed(node, live)
    _strip_bodies(kept_nodes, graph_def)
    _delete_dead(graph_def.node, live)
    called = _called_functions(kept_nodes, graph_def.library)
    kept_functions = [f for f in graph_def.library.function if f.signature.name in called]
    del graph_def.library.function[:]
    graph_def.library.function.extend(kept_functions)
    gradients = [gr for gr in graph_def.library.gradient if gr.function_name in called]
    del graph_def.library.gradient[:]
    graph_def.library.gradient.extend(gradients)
    resources = MappingProxyType({p: k for p, k in entry.resources.items() if p in live})
    return dataclasses.replace(entry, graph_def=graph_def, resources=resources, control_outputs=control_outputs)


def _delete_dead(nodes, live: set) -> None:
    """Delete the nodes not in ``live`` in place, a run of neighbours at a time, from the end:
    rebuilding the list would copy every kept node (frozen weights included) once more."""
    end = len(nodes)
    while end > 0:
        if nodes[end - 1].name in live:
            end -= 1
            continue
        start = end - 1
        while start > 0 and nodes[start - 1].name not in live:
            start -= 1
        del nodes[start:end]
        end = start


def strip_unused(model: g.TracedModel, context: PassContext) -> PassResult:
    """Drop dead nodes, unread resource placeholders, unused variables and library functions."""
    entries = tuple(_strip_entry(entry) for entry in model.entries)
    used = {key for entry in entries for key in entry.resources.values()}
    unused = [key for key in model.variables if key not in used]
    removed_nodes = sum(len(a.graph_def.node) - len(b.graph_def.node) for a, b in zip(model.entries, entries))
    removed_functions = sum(len(a.graph_def.library.function) - len(b.graph_def.library.function)
                            for a, b in zip(model.entries, entries))
    changed = bool(removed_nodes or removed_functions or unused) or any(
        a.control_outputs != b.control_outputs or a.graph_def != b.graph_def for a, b in zip(model.entries, entries))
    if not changed:
        return PassResult(model, changed=False, report={"removed_nodes": 0, "removed_variables": []})
    new_model = dataclasses.replace(model, entries=entries).with_variables((), drop=unused)
    return PassResult(new_model, changed=True,
                      report={"removed_nodes": removed_nodes, "removed_functions": removed_functions,
                              "removed_variables": sorted(unused)})


register_pass("strip_unused", strip_unused)
