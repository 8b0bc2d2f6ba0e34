"""freeze_variables: every variable read becomes a Const holding the variable's current value.

Matches ReadVariableOp nodes of a variable, in every body at any depth (through placeholders at
the top, resource arguments in bodies), and replaces each with a Const of the same name
(consumers need no rewiring; a variable read twice in one body is one Const, its other reads
Identity nodes of it). A variable that any op writes (a counter, a running statistic:
AssignVariableOp, AssignAdd..., in any body) is state, not a weight: none of its reads is
frozen, or the model would read a constant while it keeps assigning. Variables used other than
by ReadVariableOp (ResourceGather) stay variables. Postcondition: outputs are unchanged;
placeholders and arguments left without readers are dead (strip_unused removes them).
"""

from __future__ import annotations

import dataclasses

from graphprune import body as b
from graphprune import graph as g
from graphprune.analysis import written_variables
from graphprune.passbase import Option, PassContext, PassResult, register_pass


def freeze_variables(model: g.TracedModel, context: PassContext, only: tuple = ()) -> PassResult:
    """Replace every variable read (or, with ``only``, the reads of those variable keys) by a Const
    of the variable's current value."""
    frozen = set()
    state = written_variables(model)
    if only:  # every other variable is left as it is, as if it were state
        state = state | (set(model.variables) - set(only))

    def freeze(body: b.Body) -> None:
        constants: dict[str, str] = {}
        for node in list(body.nodes):
            key = body.read_key(node)
            if key is None or key in state:
                continue
            value = context.value(model, key) if key not in constants else None
            body.replace(node, b.const_once(body, constants, node.name, key, value, model.variables[key].dtype))
            frozen.add(key)

    entries = tuple(b.rewrite_entry(entry, freeze)[0] for entry in model.entries)
    if not frozen:
        return PassResult(model, changed=False, report={"frozen": [], "kept": sorted(state)})
    return PassResult(dataclasses.replace(model, entries=entries), changed=True,
                      report={"frozen": sorted(frozen), "kept": sorted(state)})


register_pass("freeze_variables", freeze_variables, options=[
    Option("only", "object", (), "freeze only these variable keys (Python callers)"),
], invalidates=("weights",))
