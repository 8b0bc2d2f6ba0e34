"""graphprune train: fine-tune a prunable SavedModel on arrays, updating the masks every step.

    graphprune train --input=prunable --output=trained --data=train.npz --loss=softmax_cross_entropy

    graphprune train ... --log_dir=runs/prune      (TensorBoard: loss, sparsity, target, channels removed)

The loop is graphprune.training.fit; this program reads flags and files and writes the result.
"""

from __future__ import annotations

import sys

import numpy as np
from absl import flags

from graphprune.tools import common

_INPUT = flags.DEFINE_string("input", None, "Prunable SavedModel (written by `graphprune prune`).")
_OUTPUT = flags.DEFINE_string("output", None, "Directory for the trained prunable SavedModel.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace --output if it exists.")
_DATA = flags.DEFINE_string("data", None, ".npz with arrays 'x' (inputs) and 'y' (targets or integer labels).")
_LOSS = flags.DEFINE_enum("loss", "softmax_cross_entropy", ["softmax_cross_entropy", "mse"],
                          "softmax_cross_entropy: integer labels vs logits; mse: regression targets.")
_OPTIMIZER = flags.DEFINE_enum("optimizer", "adam", ["sgd", "momentum", "adam"], "Optimizer.")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 1e-3, "Learning rate.", lower_bound=0.0)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Batch size.", lower_bound=1)
_EPOCHS = flags.DEFINE_integer("epochs", 1, "Passes over the data.", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Shuffling seed.")
# --log_dir is absl's own flag (absl.logging defines it); train writes its TensorBoard summaries
# (loss, sparsity, target sparsity per step) there.
_LOG_DIR = flags.FLAGS["log_dir"]

flags.mark_flags_as_required(["input", "output", "data"])


def _load_arrays(path):
    try:
        with np.load(path, allow_pickle=False) as data:
            if "x" not in data or "y" not in data:
                common.fail(f"--data={path}: needs arrays named 'x' and 'y' (has {', '.join(data.files) or 'none'})")
            return data["x"], data["y"]
    except (OSError, ValueError, EOFError) as error:
        common.fail(f"--data={path}: cannot read it as .npz ({str(error).splitlines()[0][:200]})")


def main(argv):
    del argv
    import tensorflow as tf

    import graphprune
    from graphprune import training
    from graphprune.errors import DataError, GraphPruneError

    graphprune.io.check_output(_OUTPUT.value, overwrite=_OVERWRITE.value, inputs=[_INPUT.value])
    if (_LOG_DIR.value or None):
        graphprune.io.check_distinct_outputs([_OUTPUT.value, (_LOG_DIR.value or None)])
        graphprune.io.check_output((_LOG_DIR.value or None), overwrite=True, inputs=[_INPUT.value])
    x, y = _load_arrays(_DATA.value)
    stages = common.stages("train")
    try:
        with stages("load"):
            model = graphprune.load.load_saved_model(_INPUT.value)
    except GraphPruneError as error:
        common.fail(f"--input={error}")
    if not hasattr(model, "update_masks") or not hasattr(model, "original_variables"):
        common.fail(f"{_INPUT.value} is not a prunable SavedModel (no update_masks); run `graphprune prune` on it first")
    try:
        result = training.fit(model, x, y, loss=_LOSS.value, optimizer=_OPTIMIZER.value,
                              learning_rate=_LEARNING_RATE.value, batch_size=_BATCH_SIZE.value, epochs=_EPOCHS.value,
                              seed=_SEED.value, log_dir=(_LOG_DIR.value or None), progress=True)
    except DataError as error:
        common.fail(f"--data={_DATA.value}: {error}")
    signatures = dict(model.signatures)
    with stages("save"), graphprune.io.atomic_directory(_OUTPUT.value, overwrite=_OVERWRITE.value,
                                                        inputs=[_INPUT.value]) as temp:
        tf.saved_model.save(model, temp, signatures=signatures or None)
    sys.stderr.flush()
    removed = "" if result.channel_sparsity is None else f"channels removed {result.channel_sparsity:.4f}, weights "
    print(f"wrote {_OUTPUT.value}: {result.steps} steps, final loss {result.loss:.4f}, {removed}sparsity "
          f"{result.sparsity:.4f}, pruning step {result.pruning_step}")
