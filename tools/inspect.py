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

flags.mark_flag_as_required("input")


def main(argv):
    del argv
    import graphprune

    report = graphprune.size_report(_INPUT.value)
    if _JSON.value:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.table())
