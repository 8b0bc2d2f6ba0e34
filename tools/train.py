"""graphprune train: fine-tune a prunable SavedModel on arrays, updating the masks every step.

    graphprune train --input=prunable --output=trained --data=train.npz --loss=softmax_cross_entropy
"""

from __future__ import annotations

import sys
import time

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

flags.mark_flags_as_required(["input", "output", "data"])


def _load_arrays(path):
    try:
        with np.load(path) as data:
            if "x" not in data or "y" not in data:
                common.fail(f"--data={path}: needs arrays named 'x' and 'y' (has {', '.join(data.files) or 'none'})")
            x, y = data["x"], data["y"]
    except (OSError, ValueError) as error:
        common.fail(f"--data={path}: cannot read it as .npz ({error})")
    if len(x) != len(y) or len(x) == 0:
        common.fail(f"--data={path}: 'x' has {len(x)} rows and 'y' {len(y)}; they must match and be non-empty")
    return x, y


def _optimizer(tf):
    if _OPTIMIZER.value == "sgd":
        return tf.keras.optimizers.SGD(_LEARNING_RATE.value)
    if _OPTIMIZER.value == "momentum":
        return tf.keras.optimizers.SGD(_LEARNING_RATE.value, momentum=0.9)
    return tf.keras.optimizers.Adam(_LEARNING_RATE.value)


def main(argv):
    del argv
    import tensorflow as tf

    import graphprune

    common.call_library(graphprune.io.check_output, _OUTPUT.value, overwrite=_OVERWRITE.value, inputs=[_INPUT.value])
    x, y = _load_arrays(_DATA.value)
    try:
        model = tf.saved_model.load(_INPUT.value)
    except Exception as error:  # TF raises many types for a bad directory
        common.fail(f"--input={_INPUT.value}: cannot load a SavedModel ({str(error).splitlines()[0][:200]})")
    if not hasattr(model, "update_masks") or not hasattr(model, "original_variables"):
        common.fail(f"{_INPUT.value} is not a prunable SavedModel (no update_masks); run `graphprune prune` on it first")
    forward = _forward(model)
    variables = [v for v in model.original_variables if v.trainable]
    masks = list(model.masks)
    optimizer = _optimizer(tf)
    labels = _LOSS.value == "softmax_cross_entropy"

    @tf.function
    def train_step(xb, yb):
        with tf.GradientTape() as tape:
            output = forward(xb)
            if labels:
                loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(tf.cast(yb, tf.int32), output))
            else:
                loss = tf.reduce_mean(tf.square(output - tf.cast(yb, output.dtype)))
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    rng = np.random.RandomState(_SEED.value)
    steps_per_epoch = int(np.ceil(len(x) / _BATCH_SIZE.value))
    total = steps_per_epoch * _EPOCHS.value
    started, step = time.time(), 0
    for _ in range(_EPOCHS.value):
        order = rng.permutation(len(x))
        for start in range(0, len(x), _BATCH_SIZE.value):
            batch = order[start:start + _BATCH_SIZE.value]
            state = model.update_masks()
            loss = float(train_step(tf.constant(x[batch]), tf.constant(y[batch])))
            step += 1
            if step % 10 == 0 or step == total:
                _progress(step, total, loss, _sparsity(masks), float(state["target_sparsity"]), time.time() - started)
    print(file=sys.stderr)
    signatures = dict(model.signatures)
    with graphprune.io.atomic_directory(_OUTPUT.value, overwrite=_OVERWRITE.value, inputs=[_INPUT.value]) as temp:
        tf.saved_model.save(model, temp, signatures=signatures or None)
    print(f"wrote {_OUTPUT.value}: {step} steps, final loss {loss:.4f}, sparsity {_sparsity(masks):.4f}, "
          f"pruning step {int(model.step.numpy())}")


def _forward(model):
    """The model's callable: its __call__, else its only (or serving_default) signature's single output."""
    if callable(model):
        return lambda xb: _single(model(xb))
    signatures = dict(model.signatures)
    signature = signatures.get("serving_default") or next(iter(signatures.values()))
    name = next(iter(signature.structured_input_signature[1]))
    return lambda xb: _single(signature(**{name: xb}))


def _single(output):
    if isinstance(output, dict):
        if len(output) != 1:
            common.fail(f"the model has {len(output)} outputs ({', '.join(output)}); train needs exactly one")
        return next(iter(output.values()))
    return output


def _sparsity(masks) -> float:
    total = sum(int(np.prod(m.shape)) for m in masks)
    zeros = sum(int(np.prod(m.shape)) - int(np.count_nonzero(m.numpy())) for m in masks)
    return zeros / total if total else 0.0


def _progress(step, total, loss, sparsity, target, elapsed):
    width = 30
    done = int(width * step / total)
    bar = "#" * done + "." * (width - done)
    sys.stderr.write(f"\r[{bar}] step {step}/{total}  loss {loss:.4f}  sparsity {sparsity:.3f} "
                     f"(target {target:.3f})  {elapsed:.0f}s")
    sys.stderr.flush()
