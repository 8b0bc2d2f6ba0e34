"""find_weights: record every variable read as a weight by a prunable op (analysis only).

Matches, in every entry and in every body it reaches at any depth (While/If/Case bodies,
functions the inliner kept, such as Keras' XLA-compiled grouped convolutions), a prunable op
whose weight operand comes from a variable read:

    Placeholder(resource) | body arg -> [Identity]* -> ReadVariableOp -> [Identity | Cast | view]* -> MatMul
                                                    \\-> Mul(., read(<w>/graphprune/mask))   (already masked)

Prunable ops and views: graphprune.analysis (PRUNABLE_OPS, RESHAPE_OPS). With include_gather,
embedding lookups count too (ResourceGather; GatherV2/Gather params); a lookup of an already
masked table always counts, so a reloaded prunable model reports it without the flag.

Postcondition: ``model.facts["weights"]`` is a tuple of WeightInfo, one per variable (a weight
used by several ops, bodies or entries appears once), ``model.facts["skipped_weights"]`` says
why each prunable-op operand left out is left out; the graphs are unchanged.
"""

from __future__ import annotations

from graphprune import graph as g
from graphprune.analysis import (FLOAT_DTYPES, GATHER_OPS, PASS_THROUGH_OPS, PRUNABLE_OPS, RESHAPE_OPS,  # noqa: F401
                                 Traced, Use, WeightInfo, find_prunable_weights, input_axis, is_mask_multiply,
                                 weight_operands, weights_of)
from graphprune.passbase import Option, PassContext, PassResult, register_pass


def find_weights(model: g.TracedModel, context: PassContext, include_gather: bool = False) -> PassResult:
    """Record every variable read by MatMul/Conv/Einsum ops as a prunable weight (analysis).

    include_gather: also embedding tables looked up with ResourceGather, or with GatherV2 from
    the table's read (opt-in)."""
    weights, skipped = find_prunable_weights(model, include_gather)
    report = {"weights": [w.key for w in weights], "skipped": skipped, "parameters": sum(w.size for w in weights)}
    # Analysis only: the graphs are untouched, so the model never counts as changed.
    return PassResult(model.with_facts(weights=weights, skipped_weights=dict(skipped)), changed=False, report=report)


register_pass("find_weights", find_weights, options=[
    Option("include_gather", "bool", False, "also prune embedding tables that are only looked up"),
])
