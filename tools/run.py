"""graphprune run: any registered pass list on a SavedModel, like TF's graph transform tool.

    graphprune run --input=model --output=out --passes='find_weights insert_masks(sparsity=0.8) fold_masks'
    graphprune run --list
"""

from __future__ import annotations

from absl import flags

from graphprune.tools import common

_INPUT = flags.DEFINE_string("input", None, "SavedModel directory (only read).")
_OUTPUT = flags.DEFINE_string("output", None, "Directory for the rewritten SavedModel.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace --output if it exists.")
_PASSES = flags.DEFINE_string("passes", None, "Pass list: 'name(key=value, ...) name2 ...'.")
_LIST = flags.DEFINE_bool("list", False, "Print the registered passes and exit.")
_VERIFY = flags.DEFINE_bool("verify", False, "Run and compare after every pass.")


def main(argv):
    del argv
    from graphprune import pipeline
    from graphprune.api import run_passes

    if _LIST.value:
        print("registered passes:")
        print(pipeline.describe_registry())
        return
    for name, flag in (("--input", _INPUT), ("--output", _OUTPUT), ("--passes", _PASSES)):
        if not flag.value:
            common.fail(f"{name} is required (or --list)")
    result = run_passes(_INPUT.value, _PASSES.value, _OUTPUT.value, overwrite=_OVERWRITE.value,
                                 verify=_VERIFY.value)
    print(result.summary())
    print(f"wrote {_OUTPUT.value}")
