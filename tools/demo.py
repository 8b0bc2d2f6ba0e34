"""graphprune demo: the whole story on the classic MNIST CNN, as a plain tf.Module (no Keras).

Trains the dense model briefly on Fashion-MNIST, prunes it to 90% with a polynomial schedule while
fine-tuning, finalizes, exports TFLite (float, sparse, dynamic-range int8, full int8), and prints
accuracy dense vs pruned and the size table next to the information-theoretic bound.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
from absl import flags

from graphprune.tools import common

_DATA_DIR = flags.DEFINE_string("data_dir", "/usr/share/datasets/fashion-mnist",
                                "Fashion-MNIST idx .gz files; the shipped sample is used if absent.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Keep the artifacts in this directory (default: a temporary "
                                  "directory, removed at the end).")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 400, "Dense training steps.", lower_bound=1)
_FINETUNE_STEPS = flags.DEFINE_integer("finetune_steps", 400, "Pruning + fine-tuning steps.", lower_bound=1)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Batch size.", lower_bound=1)
_FINAL_SPARSITY = flags.DEFINE_float("final_sparsity", 0.9, "Target sparsity.", lower_bound=0.0,
                                     upper_bound=0.999999)
_EVAL_EXAMPLES = flags.DEFINE_integer("eval_examples", 1000, "Test images used for every accuracy in the table.",
                                      lower_bound=1)


def _train(model, variables, data, steps, batch_size, seed, before_step=None):
    import tensorflow as tf

    optimizer = tf.keras.optimizers.Adam(1e-3)

    @tf.function
    def step_fn(images, labels):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, model(images)))
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    rng = np.random.RandomState(seed)
    x, y = data["x_train"], data["y_train"]
    loss = None
    for _ in range(steps):
        batch = rng.randint(0, len(x), batch_size)
        if before_step is not None:
            before_step()
        loss = step_fn(tf.constant(x[batch]), tf.constant(y[batch]))
    return float(loss)


def _tflite_accuracy(path, images, labels):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        return None
    interpreter = Interpreter(model_path=path)
    runner = interpreter.get_signature_runner("serving_default")
    name = next(iter(runner.get_input_details()))
    correct = 0
    for image, label in zip(images, labels):
        logits = next(iter(runner(**{name: image[np.newaxis]}).values()))
        correct += int(np.argmax(logits) == label)
    return correct / len(images)


def main(argv):
    del argv
    if _OUTPUT_DIR.value is not None:
        if not _OUTPUT_DIR.value.strip():
            common.fail("--output_dir is empty; name a directory (or leave the flag out for a temporary one)")
        out = os.path.abspath(_OUTPUT_DIR.value)
        existing = [p for p in ("dense", "pruned", "final") if os.path.exists(os.path.join(out, p))]
        if existing:
            common.fail(f"--output_dir={out} already holds {', '.join(existing)}; choose an empty directory")
        os.makedirs(out, exist_ok=True)
        _demo(out)
        print(f"artifacts kept in {out}")
        return
    with tempfile.TemporaryDirectory(prefix="graphprune-demo-") as out:
        _demo(out)
    print("temporary files removed (--output_dir=DIR keeps the artifacts)")


def _demo(out):
    import tensorflow as tf

    import graphprune
    from graphprune.tools import mnist
    from graphprune.report import directory_bytes, gzip_size

    started = time.time()
    data, source = mnist.load_fashion_mnist(_DATA_DIR.value)
    eval_x, eval_y = data["x_test"][:_EVAL_EXAMPLES.value], data["y_test"][:_EVAL_EXAMPLES.value]
    print(f"data: {source}: {len(data['x_train'])} training, {len(eval_x)} evaluation images")

    dense = mnist.MnistCNN(seed=0)
    loss = _train(dense, dense.trainable_variables, data, _TRAIN_STEPS.value, _BATCH_SIZE.value, seed=1)
    dense_accuracy = mnist.accuracy(dense, eval_x, eval_y)
    print(f"dense: {_TRAIN_STEPS.value} steps, loss {loss:.3f}, accuracy {dense_accuracy:.4f} "
          f"({time.time() - started:.0f}s)")
    dense_dir = os.path.join(out, "dense")
    tf.saved_model.save(dense, dense_dir, signatures={"serving_default": dense.__call__})

    steps = _FINETUNE_STEPS.value
    end_step = max(int(steps * 0.6), 1)
    schedule = graphprune.PolynomialDecay(0.0, _FINAL_SPARSITY.value, begin_step=0, end_step=end_step,
                                          frequency=max(end_step // 10, 1))
    pm = graphprune.prune(dense_dir, schedule=schedule)
    loss = _train(pm, pm.trainable_variables, data, steps, _BATCH_SIZE.value, seed=2, before_step=pm.update_masks)
    pruned_accuracy = mnist.accuracy(pm, eval_x, eval_y)
    print(f"pruned: {steps} steps ({schedule!r}), loss {loss:.3f}, sparsity {pm.sparsity():.4f}, "
          f"accuracy {pruned_accuracy:.4f} ({time.time() - started:.0f}s)")
    graphprune.save(pm, os.path.join(out, "pruned"))
    final_dir = graphprune.finalize(pm, os.path.join(out, "final"))

    representative = data["x_train"][:200]
    artifacts = [("dense SavedModel", dense_dir), ("pruned SavedModel (final)", final_dir)]
    for label, source_dir, quantize, sparse, name in (
        ("dense .tflite float", dense_dir, None, False, "dense_float.tflite"),
        ("dense .tflite dynamic int8", dense_dir, "dynamic", False, "dense_dynamic.tflite"),
        ("pruned .tflite float", final_dir, None, False, "pruned_float.tflite"),
        ("pruned .tflite float, sparse encoding", final_dir, None, True, "pruned_float_sparse.tflite"),
        ("pruned .tflite dynamic int8", final_dir, "dynamic", False, "pruned_dynamic.tflite"),
        ("pruned .tflite full int8", final_dir, "int8", False, "pruned_int8.tflite"),
    ):
        path = graphprune.export_tflite(source_dir, os.path.join(out, name), quantize=quantize,
                                   sparse=sparse, representative_data=representative)
        artifacts.append((label, path))

    report = graphprune.size_report(final_dir)
    bound_float = report.bound_bytes
    bound_int8 = sum(graphprune.report.lower_bound_bytes(w.elements, w.nonzeros, 8) for w in report.weights)
    print()
    print(f"{'artifact':40s} {'bytes':>12s} {'gzip bytes':>12s} {'accuracy':>9s}")
    for label, path in artifacts:
        if os.path.isdir(path):
            raw, zipped = directory_bytes(path)
        else:
            with open(path, "rb") as handle:
                content = handle.read()
            raw, zipped = len(content), gzip_size(content)
        accuracy = _tflite_accuracy(path, eval_x, eval_y) if path.endswith(".tflite") else (
            dense_accuracy if path == dense_dir else pruned_accuracy)
        shown = f"{accuracy:9.4f}" if accuracy is not None else f"{'-':>9s}"
        print(f"{label:40s} {raw:12d} {zipped:12d} {shown}")
    print(f"{'lower bound, float32 values + mask':40s} {bound_float:12.0f}")
    print(f"{'lower bound, int8 values + mask':40s} {bound_int8:12.0f}")
    print(f"\nweights: {report.elements} elements, sparsity {report.sparsity:.4f} ({time.time() - started:.0f}s)")
