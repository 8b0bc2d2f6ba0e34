"""graphprune finalize: fold masks, strip the pruning machinery, export SavedModel and TFLite.

    graphprune finalize --input=trained --output=final --tflite=model.tflite --quantize=dynamic
"""

from __future__ import annotations

import os

import numpy as np
from absl import flags

from graphprune.tools import common

_INPUT = flags.DEFINE_string("input", None, "Prunable SavedModel (from `graphprune prune` or `train`).")
_OUTPUT = flags.DEFINE_string("output", None, "Directory for the final SavedModel.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace outputs that exist.")
_FREEZE = flags.DEFINE_bool("freeze", True, "Weights become constants (--nofreeze: variables holding pruned values).")
_TFLITE = flags.DEFINE_string("tflite", None, "Also write a .tflite file here.")
_QUANTIZE = flags.DEFINE_enum("quantize", "none", ["none", "dynamic", "int8"], "TFLite quantization.")
_SPARSE = flags.DEFINE_bool("sparse_tflite", False, "Use TFLite's sparse tensor encoding.")
_REPRESENTATIVE = flags.DEFINE_string("representative_data", None, ".npz with 'x': inputs for --quantize=int8.")
_TFLITE_BATCH = flags.DEFINE_integer("tflite_batch_size", None, "Convert with this fixed batch size (needed for "
                                     "Keras LSTM/GRU: static TensorList shapes).", lower_bound=1)
_VERIFY = flags.DEFINE_bool("verify", False, "Check outputs after every pass.")

flags.mark_flags_as_required(["input", "output"])


def main(argv):
    del argv
    import graphprune

    quantize = None if _QUANTIZE.value == "none" else _QUANTIZE.value
    if (quantize or _SPARSE.value) and not _TFLITE.value:
        common.fail("--quantize/--sparse_tflite need --tflite=PATH")
    if quantize == "int8" and not _REPRESENTATIVE.value:
        common.fail("--quantize=int8 needs --representative_data=FILE.npz (array 'x' of real inputs)")
    representative = None
    if _REPRESENTATIVE.value:
        try:
            with np.load(_REPRESENTATIVE.value) as data:
                representative = data["x"][:500]
        except (OSError, KeyError, ValueError) as error:
            common.fail(f"--representative_data={_REPRESENTATIVE.value}: needs an .npz with array 'x' ({error})")
    if _TFLITE.value:
        common.call_library(graphprune.io.check_output, _TFLITE.value, overwrite=_OVERWRITE.value,
                            inputs=[_INPUT.value])
    common.call_library(graphprune.io.check_output, _OUTPUT.value, overwrite=_OVERWRITE.value, inputs=[_INPUT.value])
    path = common.call_library(graphprune.finalize, _INPUT.value, _OUTPUT.value, freeze=_FREEZE.value,
                               overwrite=_OVERWRITE.value, verify=_VERIFY.value)
    report = common.call_library(graphprune.size_report, path)
    print(report.table())
    if _TFLITE.value:
        tflite = common.call_library(graphprune.export_tflite, path, _TFLITE.value, quantize=quantize,
                                     sparse=_SPARSE.value, representative_data=representative,
                                     overwrite=_OVERWRITE.value, batch_size=_TFLITE_BATCH.value)
        print(common.call_library(graphprune.size_report, tflite).table())
        print(f"wrote {tflite} ({os.path.getsize(tflite)} bytes)")
    print(f"wrote {path}")
