"""freeze_variables: every variable read becomes a Const holding the variable's current value.

Matches ReadVariableOp nodes whose resource is one of the entry's variable placeholders and
replaces each with a Const of the same name (consumers need no rewiring); reads of resource
arguments inside While/If bodies likewise. A variable that any op writes (a counter, a running
statistic: AssignVariableOp, AssignAdd..., in any body) is state, not a weight: none of its reads
is frozen, or the model would read a constant while it keeps assigning. Variables used other
than by ReadVariableOp (ResourceGather) stay variables. Postcondition: outputs are unchanged;
placeholders left without readers are dead (strip_unused removes them).
"""

from __future__ import annotations

import dataclasses

from graphprune import functions
from graphprune import graph as g
from graphprune.passes.find_weights import resource_of
from graphprune.pipeline import PassContext, PassResult, register_pass


def freeze_variables(model: g.TracedModel, context: PassContext, only: tuple = ()) -> PassResult:
    """Replace every variable read (or, with ``only``, the reads of those variable keys) by a Const
    of the variable's current value."""
    entries, frozen = [], set()
    state = functions.written_variables(model)
    if only:  # every other variable is left as it is, as if it were state
        state = state | (set(model.variables) - set(only))
    for entry in model.entries:
        graph_def = g.copy_graph(entry.graph_def)
        index = g.NodeIndex(graph_def)
        for position, node in enumerate(graph_def.node):
            if node.op != "ReadVariableOp":
                continue
            key = resource_of(index, entry, node)
            if key is None or key in state:
                continue
            value = context.value(model, key)
            graph_def.node[position].CopyFrom(g.const_node(node.name, value, model.variables[key].dtype))
            frozen.add(key)
        touched = functions.rewrite_bodies(graph_def, entry,
                                           lambda function, arguments: _freeze_in_body(function, arguments, model,
                                                                                       context, frozen, state))
        entries.append(dataclasses.replace(entry, graph_def=graph_def) if frozen or touched else entry)
    if not frozen:
        return PassResult(model, changed=False, report={"frozen": [], "kept": sorted(state)})
    return PassResult(dataclasses.replace(model, entries=tuple(entries)), changed=True,
                      report={"frozen": sorted(frozen), "kept": sorted(state)})


def _freeze_in_body(function, arguments, model, context, frozen, state) -> list:
    touched = []
    for position, node in enumerate(function.node_def):
        key = arguments.get(functions.producer_name(node.input[0])) if node.op == "ReadVariableOp" else None
        if key is None or key in state:
            continue
        value = context.value(model, key)
        functions.replace_body_node(function, position, g.const_node(node.name, value, model.variables[key].dtype),
                                    "value")
        frozen.add(key)
        touched.append(node.name)
    return touched


register_pass("freeze_variables", freeze_variables)
