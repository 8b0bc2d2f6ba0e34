"""graphprune inspect: the prunable weights of any SavedModel or .tflite, with sizes.

    graphprune inspect --input=final              # table
    graphprune inspect --input=model.tflite --json
"""

from __future__ import annotations

import json

from absl import flags

from graphprune.tools import common

_INPUT = flags.DEFINE_string("input", None, "SavedModel directory or .tflite file.")
_JSON = flags.DEFINE_bool("json", False, "Print JSON (per weight and totals) instead of a table.")
_BASELINE = flags.DEFINE_string("baseline", None, "A SavedModel to compare parameters and FLOPs with (the model "
                                "before finalize --shrink).")
_GROUPS = flags.DEFINE_bool("channel_groups", False, "List the channel groups (structure=channel) and why a group "
                            "is left whole.")

_UNKNOWN = flags.DEFINE_integer("unknown_size", None, "Count FLOPs with every unknown input dimension past the batch "
                                "(a text model's sequence length) at this size.", lower_bound=1)

flags.mark_flag_as_required("input")


def main(argv):
    del argv
    import graphprune

    report = graphprune.size_report(_INPUT.value)
    if report.kind != "saved_model" and (_BASELINE.value or _GROUPS.value):
        common.fail("--baseline and --channel_groups read a SavedModel's graph; --input is a .tflite file")
    size = _UNKNOWN.value
    cost = graphprune.cost(_INPUT.value, unknown_size=size) if report.kind == "saved_model" else None
    baseline = graphprune.cost(_BASELINE.value, unknown_size=size) if _BASELINE.value and cost is not None else None
    groups = graphprune.channel_groups(_INPUT.value) if _GROUPS.value and cost is not None else ()
    if _JSON.value:
        data = report.to_dict()
        if cost is not None:
            data["cost"] = cost.to_dict()
        if baseline is not None:
            data["baseline_cost"] = baseline.to_dict()
        if groups:
            data["channel_groups"] = [{"name": g.name, "channels": g.size, "prunable": g.prunable,
                                       "reason": g.reason} for g in groups]
        print(json.dumps(data, indent=2))
        return
    print(report.table())
    if cost is not None:
        line = f"parameters {cost.parameters:,}, {common.flops_at(size)} {cost.flops:,} ({cost.entry})"
        line += common.uncounted(cost)
        if cost.non_trainable:
            line += f"; {cost.non_trainable:,} of the parameters not trained (batch-norm statistics, state)"
        if baseline is not None:
            line += f"; against {_BASELINE.value}: {cost.ratios(baseline)}"
        print(line)
    if groups:
        from graphprune.channels import describe

        print(describe(groups))
