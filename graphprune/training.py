"""Fine-tune a prunable model on arrays, updating its masks every step (what `graphprune train` runs).

    stats = graphprune.training.fit(model, x, y, loss="softmax_cross_entropy", epochs=2)

``model`` is a PrunableModel or a reloaded prunable SavedModel (it has ``update_masks``). The data
is checked against the model before the first step: shape, dtype, finite values, labels inside
the model's classes; a NaN loss stops training with a DataError (nothing is left half-trained in
the caller's files: writing is the caller's business). At the end the stored weights are exactly
the masked weights, whatever the optimizer did between mask updates.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import numpy as np
import tensorflow as tf

from graphprune.errors import BadModelError, DataError
from graphprune.masks import store_pruned
from graphprune.update import diverged_error

LOSSES = ("softmax_cross_entropy", "mse")
OPTIMIZERS = ("sgd", "momentum", "adam")


@dataclasses.dataclass
class FitResult:
    steps: int
    loss: float
    sparsity: float
    pruning_step: int
    # channel structure: the fraction of the pruned groups' channels removed (what the schedule's
    # target measures; ``sparsity`` counts the weights' zeros, a kernel's rows and columns both)
    channel_sparsity: float | None = None


def make_optimizer(name: str, learning_rate: float):
    if name not in OPTIMIZERS:
        raise DataError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    if name == "sgd":
        return tf.keras.optimizers.SGD(learning_rate)
    if name == "momentum":
        return tf.keras.optimizers.SGD(learning_rate, momentum=0.9)
    return tf.keras.optimizers.Adam(learning_rate)


def forward_of(model):
    """(callable taking a batch of x and returning one output tensor, the input's TensorSpec)."""
    if callable(model) and getattr(model, "__call__", None) is not None:
        call = model.__call__
        concrete = list(getattr(call, "concrete_functions", None) or [])
        if not concrete and hasattr(call, "get_concrete_function"):
            try:
                concrete = [call.get_concrete_function()]
            except (TypeError, ValueError):
                concrete = []
        specs = [s for s in tf.nest.flatten(concrete[0].structured_input_signature) if isinstance(s, tf.TensorSpec)] \
            if concrete else []
        if len(specs) == 1:
            return (lambda xb: _single(model(xb))), specs[0]
    signatures = dict(getattr(model, "signatures", {}) or {})
    if not signatures:
        raise BadModelError("the model has neither a one-input __call__ nor a signature; train needs one input")
    signature = signatures.get("serving_default") or next(iter(signatures.values()))
    inputs = signature.structured_input_signature[1]
    if len(inputs) != 1:
        raise BadModelError(f"the model's signature takes {len(inputs)} inputs ({', '.join(inputs)}); train needs one")
    name, spec = next(iter(inputs.items()))
    return (lambda xb: _single(signature(**{name: xb}))), spec


def _single(output):
    if isinstance(output, dict):
        if len(output) != 1:
            raise BadModelError(f"the model has {len(output)} outputs ({', '.join(output)}); train needs exactly one")
        return next(iter(output.values()))
    return output


def check_data(x, y, spec: tf.TensorSpec, loss: str):
    """(x, y) converted to what the model takes, or a DataError naming the array, what it found and
    what the model expects."""
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim == 0 or y.ndim == 0:
        which = "x" if x.ndim == 0 else "y"
        raise DataError(f"'{which}' is a scalar; it must hold one row per example")
    if len(x) != len(y) or len(x) == 0:
        raise DataError(f"'x' has {len(x)} rows and 'y' {len(y)}; they must match and be non-empty")
    expected = [None if d is None else int(d) for d in spec.shape.as_list()] if spec.shape.rank is not None else None
    if expected is not None:
        shown = "(" + ", ".join("N" if d is None else str(d) for d in expected) + ")"
        fits = x.ndim == len(expected) and all(e is None or e == f for e, f in zip(expected[1:], x.shape[1:]))
        if not fits:
            raise DataError(f"'x' has shape {x.shape}; the model takes {shown}")
    dtype = spec.dtype
    if dtype.is_floating:
        if x.dtype.kind != "f":
            raise DataError(f"'x' has dtype {x.dtype}; the model takes {dtype.name} (convert it, e.g. "
                            f"x.astype('float32') / 255 for images)")
        if not np.all(np.isfinite(x)):
            raise DataError(f"'x' has {int(x.size - np.count_nonzero(np.isfinite(x)))} NaN/Inf values; clean the "
                            "data first")
        x = x.astype(dtype.as_numpy_dtype, copy=False)
    elif dtype == tf.string and x.dtype.kind in "US":  # text: numpy's unicode strings become UTF-8 bytes
        x = np.char.encode(x, "utf-8") if x.dtype.kind == "U" else x
    elif dtype.is_integer and x.dtype.kind in "iu" and x.dtype != dtype.as_numpy_dtype:
        low, high = (int(x.min()), int(x.max())) if x.size else (0, 0)
        if low < dtype.min or high > dtype.max:
            raise DataError(f"'x' has values from {low} to {high}; the model takes {dtype.name} "
                            f"({dtype.min} to {dtype.max})")
        x = x.astype(dtype.as_numpy_dtype)  # token ids saved as int64 for an int32 input
    elif x.dtype != dtype.as_numpy_dtype:
        raise DataError(f"'x' has dtype {x.dtype}; the model takes {dtype.name}")
    if loss == "softmax_cross_entropy":
        if y.dtype.kind not in "iu":
            raise DataError(f"'y' has dtype {y.dtype}; --loss=softmax_cross_entropy takes integer class labels "
                            "(use --loss=mse for regression targets)")
        if y.ndim != 1:
            raise DataError(f"'y' has shape {y.shape}; --loss=softmax_cross_entropy takes one integer label per row")
    elif loss == "mse":
        if y.dtype.kind != "f":
            raise DataError(f"'y' has dtype {y.dtype}; --loss=mse takes float targets shaped like the model's output "
                            "(integer class labels: use --loss=softmax_cross_entropy)")
        if not np.all(np.isfinite(y)):
            raise DataError("'y' has NaN/Inf values; clean the data first")
    else:
        raise DataError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    return x, y


def _check_outputs(output, y, loss):
    if loss == "softmax_cross_entropy":
        if output.shape.rank != 2:
            raise DataError(f"the model's output has shape {output.shape}; softmax_cross_entropy needs (N, classes)")
        classes = int(output.shape[-1])
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= classes:
            raise DataError(f"'y' has labels from {low} to {high}; the model has {classes} classes (0 to {classes - 1})")
    elif tuple(output.shape[1:]) != tuple(y.shape[1:]):
        raise DataError(f"'y' rows have shape {tuple(y.shape[1:])}; the model's output rows have "
                        f"{tuple(output.shape[1:])}")


def masks_and_weights(model):
    """(masks, the weights they mask) of a PrunableModel or a reloaded prunable SavedModel."""
    if not hasattr(model, "update_masks") or not hasattr(model, "masks"):
        raise BadModelError("not a prunable model (no update_masks); run graphprune.prune / `graphprune prune` first")
    return list(model.masks), list(model.pruned_weights)


def apply_masks(model) -> None:
    """Store exactly the masked weights (pruned elements +0.0), whatever the optimizer did since
    the last mask update."""
    for mask, weight in zip(*masks_and_weights(model)):
        store_pruned(weight, mask)


def sparsity(masks) -> float:
    total = sum(int(np.prod(m.shape)) for m in masks)
    zeros = sum(int(np.prod(m.shape)) - int(np.count_nonzero(m.numpy())) for m in masks)
    return zeros / total if total else 0.0


class Progress:
    """A redrawn bar on a terminal; plain lines every ``every`` steps when stderr is a file or pipe."""

    def __init__(self, total: int, stream=None, every: int = 10):
        self.total, self.stream = total, stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every = every if self.tty else max(every, total // 20 or 1)
        self.started = time.time()

    def __call__(self, step: int, loss: float, current: float, target: float, channels: float | None = None):
        if step % self.every and step != self.total:
            return
        elapsed = time.time() - self.started
        if channels is None:
            measure = f"sparsity {current:.3f} (target {target:.3f})"
        else:  # the target is a fraction of channels; the weights lose more (rows and columns)
            measure = f"channels removed {channels:.3f} (target {target:.3f}), weights {current:.3f} zero"
        text = f"step {step}/{self.total}  loss {loss:.4f}  {measure}  {elapsed:.0f}s"
        if self.tty:
            done = int(30 * step / self.total)
            self.stream.write(f"\r[{'#' * done}{'.' * (30 - done)}] {text}")
            if step == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


def fit(model, x, y, *, loss: str = "softmax_cross_entropy", optimizer="adam", learning_rate: float = 1e-3,
        batch_size: int = 32, epochs: int = 1, seed: int = 0, log_dir: str | None = None,
        progress: bool | Progress = False) -> FitResult:
    """Train ``model`` on (x, y), calling ``update_masks()`` before every step (see module doc)."""
    masks, _ = masks_and_weights(model)
    forward, spec = forward_of(model)
    x, y = check_data(x, y, spec, loss)
    if isinstance(optimizer, str):
        optimizer = make_optimizer(optimizer, learning_rate)
    variables = [v for v in model.original_variables if v.trainable]
    _check_outputs(forward(tf.constant(x[:1])), y, loss)
    labels = loss == "softmax_cross_entropy"

    @tf.function
    def train_step(xb, yb):
        with tf.GradientTape() as tape:
            output = forward(xb)
            if labels:
                value = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(tf.cast(yb, tf.int32), output))
            else:
                value = tf.reduce_mean(tf.square(output - tf.cast(yb, output.dtype)))
        optimizer.apply_gradients(zip(tape.gradient(value, variables), variables))
        return value

    rng = np.random.RandomState(seed)
    total = int(np.ceil(len(x) / batch_size)) * epochs
    report = progress if isinstance(progress, Progress) else Progress(total) if progress else None
    writer = tf.summary.create_file_writer(log_dir) if log_dir else None
    step, value, channels = 0, float("nan"), None
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for start in range(0, len(x), batch_size):
            batch = order[start:start + batch_size]
            try:
                state = model.update_masks()
            except tf.errors.InvalidArgumentError as error:
                raise (diverged_error(error) or error) from None
            value = float(train_step(tf.constant(x[batch]), tf.constant(y[batch])))
            step += 1
            if not np.isfinite(value):
                raise DataError(f"the loss became {value} at step {step}: training diverged (lower the learning rate "
                                "or check the data); nothing was written")
            # a model pruned by an earlier graphprune reports no channel_sparsity
            channels = float(state["channel_sparsity"]) if "channel_sparsity" in state else None
            if report is not None or writer is not None:
                current, target = sparsity(masks), float(state["target_sparsity"])
                if report is not None:
                    report(step, value, current, target, channels)
                if writer is not None:
                    _summaries(writer, int(state["step"]), value, current, target, channels)
    apply_masks(model)
    if writer is not None:
        writer.flush()
    return FitResult(steps=step, loss=value, sparsity=sparsity(masks), pruning_step=int(model.step.numpy()),
                     channel_sparsity=channels)


def _summaries(writer, step, loss, current, target, channels=None):
    from graphprune.model import _scalar  # TensorBoard scalars without TensorBoard installed

    with writer.as_default():
        _scalar("train/loss", loss, step)
        _scalar("pruning/sparsity", current, step)
        _scalar("pruning/target_sparsity", target, step)
        if channels is not None:
            _scalar("pruning/channel_sparsity", channels, step)
