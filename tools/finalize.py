"""graphprune finalize: fold masks, strip the pruning machinery, export SavedModel and TFLite.

    graphprune finalize --input=trained --output=final --tflite=model.tflite --quantize=dynamic
    graphprune finalize --input=trained --output=final --tflite_variants=float,dynamic,sparse
        (writes final.float.tflite, final.dynamic.tflite, final.sparse.tflite)
    graphprune finalize --input=trained --output=small --shrink     (after --structure=channel)
    graphprune finalize --input=trained --output=small --shrink --freeze_all   (for TF serving)
"""

from __future__ import annotations

import zipfile

import numpy as np
from absl import flags

from graphprune.errors import first_line
from graphprune.tools import common
from graphprune.tools import export

HELP_MODULES = (export,)  # the TFLite flags are export's

_OUTPUT = flags.DEFINE_string("output", None, "Directory for the final SavedModel.")
_FREEZE = flags.DEFINE_bool("freeze", True, "Pruned weights become constants (--nofreeze: variables holding the "
                            "pruned values); other variables stay variables.")
_FREEZE_ALL = flags.DEFINE_bool("freeze_all", False, "Every variable read becomes a constant (may change the "
                                "arithmetic: TensorFlow folds constant normalization parameters).")
_MAX_FROZEN = flags.DEFINE_integer("max_frozen_mb", 16, "Freeze pruned weights, smallest first, up to this many MiB "
                                   "in all; larger ones stay variables holding their pruned values (frozen "
                                   "constants are copied through GraphDefs, which protobuf caps at 2 GB).",
                                   lower_bound=0)
_VERIFY = flags.DEFINE_bool("verify", False, "Check outputs after every pass.")
_SHRINK = flags.DEFINE_bool("shrink", False, "Remove dead channels (structure=channel) from every coupled weight: a "
                            "smaller dense model; prints parameters and FLOPs before and after.")
_FOLD = flags.DEFINE_bool("fold_batch_norms", None, "Fold per-channel scales and shifts after a kernel (inference "
                          "batch norm, its parameters taken at their values) into the kernel and one BiasAdd, "
                          "which TensorFlow fuses with the activation. Default: on unless --nofreeze, kept off "
                          "(with a warning) where the folded model fails the check; --fold_batch_norms refuses "
                          "then instead.")
_POINTWISE = flags.DEFINE_bool("pointwise_matmul", None, "Write every 1x1, stride-1 convolution as a MatMul between "
                               "two Reshapes: faster in TensorFlow on several threads (oneDNN's small convolutions "
                               "cost more a call), the same in LiteRT. Default: only those of at most 3.5M "
                               "multiply-adds per image (larger ones gain little, and lose their fusion with a "
                               "residual Add); --nopointwise_matmul: none.")
_PADS = flags.DEFINE_bool("fold_pads", None, "Fold a zero Pad before a VALID convolution into the convolution where "
                          "it pads as SAME would (Keras's stride-2 depthwise convs): one op less each in "
                          "TensorFlow (TFLite's converter folds them itself). Default: on, kept off (with a "
                          "warning) where the folded model fails the check; --fold_pads refuses then instead; "
                          "--nofold_pads: never.")

_TOLERANCE = flags.DEFINE_float("check_tolerance", 1e-5, "Refuse (nothing written) a finalized model whose outputs "
                                "differ from the masked model's by more than this fraction of their scale.")

_CHECK_INPUTS = flags.DEFINE_string("check_inputs", None, "An .npz of the inputs the check runs both models on, for "
                                    "models whose inputs graphprune cannot make up (boxes that must lie on the "
                                    "image, indices): an array per input name (a signature's keys, a method's "
                                    "parameters), or per 'ENTRY/NAME' for entries that take different inputs.")

_UNKNOWN = flags.DEFINE_integer("unknown_size", None, "With --shrink, count FLOPs with every unknown input dimension "
                                "past the batch (a text model's sequence length) at this size.", lower_bound=1)

flags.mark_flags_as_required(["input", "output"])


def main(argv):
    del argv
    import graphprune

    plan = export.tflite_plan(f"{_OUTPUT.value}.tflite")
    representative = export.representative_data(plan)
    overwrite = export.OVERWRITE.value
    graphprune.io.check_distinct_outputs([_OUTPUT.value, *plan.values()])
    for path in [_OUTPUT.value, *plan.values()]:
        graphprune.io.check_output(path, overwrite=overwrite, inputs=[export.INPUT.value])
    check_inputs = _check_inputs(_CHECK_INPUTS.value)
    freeze = "all" if _FREEZE_ALL.value else _FREEZE.value
    path = graphprune.finalize(export.INPUT.value, _OUTPUT.value, freeze=freeze, overwrite=overwrite,
                               verify=_VERIFY.value, max_frozen_bytes=_MAX_FROZEN.value << 20,
                               progress=common.progress(), shrink=_SHRINK.value,
                               fold_batch_norms=_FOLD.value, check_tolerance=_TOLERANCE.value,
                               pointwise_matmul="auto" if _POINTWISE.value is None else _POINTWISE.value,
                               fold_pads=_PADS.value, check_inputs=check_inputs)
    if _SHRINK.value:
        size = _UNKNOWN.value
        before, after = (graphprune.cost(p, unknown_size=size) for p in (export.INPUT.value, path))
        print(f"shrink: parameters {before.parameters:,} -> {after.parameters:,}, {common.flops_at(size)} "
              f"{before.flops:,} -> {after.flops:,} ({after.ratios(before)}){common.uncounted(before)}")
    with common.stages("finalize")("size report"):
        print(graphprune.size_report(path).table())
    export.write_tflite(path, plan, representative)
    print(f"wrote {path}")


def _check_inputs(path):
    """--check_inputs's arrays: {name: array}, or {entry: {name: array}} where every key is
    'ENTRY/NAME'. common.fail (exit 2) where the file is not an .npz of arrays."""
    if path is None:
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, AttributeError) as error:
        common.fail(f"--check_inputs={path}: needs an .npz of arrays, one per input name ({first_line(error)})")
    if not arrays:
        common.fail(f"--check_inputs={path}: the .npz holds no arrays; save one per input name (np.savez)")
    if not all("/" in key for key in arrays):
        return arrays
    by_entry = {}
    for key, array in arrays.items():
        entry, name = key.split("/", 1)
        by_entry.setdefault(entry, {})[name] = array
    return by_entry
