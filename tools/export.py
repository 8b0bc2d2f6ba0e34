"""graphprune export: convert a finalized SavedModel to TFLite, without finalizing again.

    graphprune export --input=final --tflite=model.tflite --quantize=dynamic
    graphprune export --input=final --tflite=model.tflite --tflite_variants=float,dynamic,sparse
        (writes model.float.tflite, model.dynamic.tflite, model.sparse.tflite)

`graphprune finalize` takes the same TFLite flags.
"""

from __future__ import annotations

import os

import numpy as np
from absl import flags

from graphprune.tools import common

INPUT = flags.DEFINE_string("input", None, "SavedModel directory (for export: a finalized one; only read).")
OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace outputs that exist.")
_TFLITE = flags.DEFINE_string("tflite", None, "Write a .tflite file here (with --tflite_variants: the base name).")
_QUANTIZE = flags.DEFINE_enum("quantize", "none", ["none", "dynamic", "int8"], "TFLite quantization.")
_SPARSE = flags.DEFINE_bool("sparse_tflite", False, "Use TFLite's sparse tensor encoding.")
_VARIANTS = flags.DEFINE_list("tflite_variants", [], "Several TFLite files at once, each named after its variant: "
                              "any of float, dynamic, int8, sparse (e.g. float,dynamic,sparse).")
_REPRESENTATIVE = flags.DEFINE_string("representative_data", None, ".npz with 'x': inputs for int8 quantization.")
_TFLITE_BATCH = flags.DEFINE_integer("tflite_batch_size", None, "Convert with this fixed batch size (needed for "
                                     "Keras LSTM/GRU: static TensorList shapes).", lower_bound=1)


def tflite_plan(default_base: str | None):
    """(variant -> path) from the TFLite flags, checked before any work; {} when none asked."""
    from graphprune.finalization import VARIANTS, variant_path

    quantize = None if _QUANTIZE.value == "none" else _QUANTIZE.value
    variants = [v.strip() for v in _VARIANTS.value if v.strip()]
    if variants and (quantize or _SPARSE.value):
        common.fail("--tflite_variants names each file's quantization; drop --quantize/--sparse_tflite")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        common.fail(f"--tflite_variants: unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    if len(set(variants)) != len(variants):
        common.fail("--tflite_variants names a variant twice")
    base = _TFLITE.value or (default_base if variants else None)
    if (quantize or _SPARSE.value) and not base:
        common.fail("--quantize/--sparse_tflite need --tflite=PATH")
    if not base:
        return {}
    if not variants:
        return {("sparse" if _SPARSE.value and not quantize else quantize or "float"): os.path.abspath(base)}
    return {variant: variant_path(base, variant) for variant in variants}


def representative_data(plan):
    needs = "int8" in plan or _QUANTIZE.value == "int8"
    if needs and not _REPRESENTATIVE.value:
        common.fail("int8 quantization needs --representative_data=FILE.npz (array 'x' of real inputs)")
    if not _REPRESENTATIVE.value:
        return None
    try:
        with np.load(_REPRESENTATIVE.value) as data:
            return data["x"][:500]
    except (OSError, KeyError, ValueError) as error:
        common.fail(f"--representative_data={_REPRESENTATIVE.value}: needs an .npz with array 'x' ({error})")


def write_tflite(saved_model_dir, plan, representative):
    import graphprune

    for variant, path in plan.items():
        quantize = {"dynamic": "dynamic", "int8": "int8"}.get(variant)
        sparse = variant == "sparse" or (_SPARSE.value and not _VARIANTS.value)
        with common.stages("export")(f"TFLite ({variant})"):
            tflite = graphprune.export_tflite(saved_model_dir, path, quantize=quantize, sparse=sparse,
                                              representative_data=representative, overwrite=OVERWRITE.value,
                                              batch_size=_TFLITE_BATCH.value)
        print(graphprune.size_report(tflite).table())
        print(f"wrote {tflite} ({os.path.getsize(tflite)} bytes, {variant})")


def main(argv):
    del argv
    import graphprune

    if not INPUT.value:
        common.fail("--input is required: the finalized SavedModel directory")
    plan = tflite_plan(None)
    if not plan:
        common.fail("--tflite=PATH is required: where to write the .tflite file")
    graphprune.io.check_distinct_outputs(plan.values())
    for path in plan.values():
        graphprune.io.check_output(path, overwrite=OVERWRITE.value, inputs=[INPUT.value])
    write_tflite(INPUT.value, plan, representative_data(plan))
