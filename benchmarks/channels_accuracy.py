"""Channel pruning on Fashion-MNIST: accuracy at a lower latency, against two baselines.

    python benchmarks/channels_accuracy.py --lr=cosine --finetune_epochs=6     (the table in benchmarks/README.md)
    python benchmarks/channels_accuracy.py --lr=cosine --finetune_epochs=6 --models=resnet --nobaselines --seed=1
                                                 (dense and channel arms only, another seed)
    ... --prune_from=dense --nobaselines --dense_from=DIR   (another channel recipe on a previous run's
                                                 dense arms: DIR is the "saved models" directory it printed)

Two models written as tf.Modules (no Keras): the classic MNIST CNN (graphprune.tools.mnist.MnistCNN:
conv 32, conv 64, dense 1024, dense 10) and a small ResNet (stem conv, three stages of one residual block each, 16/32/64
channels, global average pooling, dense 10). For each, in one run:

    dense          trained --pretrain_epochs, then fine-tuned --finetune_epochs (the reference)
    channel        the pretrained weights, graphprune.prune(structure='channel') with a
                   PolynomialDecay from 0 to --ratio of each group's channels over the first
                   --prune_fraction of the fine-tuning steps (--scope, --sparsity_for: the ranking and
                   per-kernel sparsities), fine-tuned (--distill: from the dense arm), then
                   finalize(shrink=True): a dense model with fewer channels
    narrow         the same architecture at the shrunk model's widths, trained from scratch for
                   pretrain + finetune epochs (what the channels cost if you knew the widths)
    unstructured   the pretrained weights pruned element-wise (layer-wise magnitude) to the
                   shrunk model's parameter count, fine-tuned the same way

Accuracy is on the 10,000 test images; latency is TensorFlow's median time for one batch of 256
(and of 1) through each model's SavedModel on this machine; parameters and FLOPs from
graphprune.cost. The target (issue #17): within 1 point of the dense accuracy at 2x the speed.
Results: results/channels_accuracy.json.
"""

import os
import sys
import tempfile
import time

import bench_common as bc  # sets the environment before TensorFlow is imported

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

import graphprune  # noqa: E402
from graphprune.tools.mnist import MnistCNN, glorot  # noqa: E402

_DATA_DIR = flags.DEFINE_string("data_dir", "/usr/share/datasets/fashion-mnist", "Fashion-MNIST idx .gz files.")
_RATIO = flags.DEFINE_float("ratio", 0.5, "Fraction of each group's channels removed (of all channels, global).")
_DISTILL = flags.DEFINE_bool("distill", False, "Fine-tune the pruned arms (channel, unstructured) with "
                             "distillation from the dense arm's final model (half cross-entropy, half KL at T=4).")
_SPARSITY_FOR = flags.DEFINE_list("sparsity_for", [], "Per-kernel channel sparsities of the channel arm, "
                                   "REGEX=SPARSITY (graphprune.Rule): e.g. block.*/a/kernel=0.7 for the blocks' "
                                   "inner widths.")
_SCOPE = flags.DEFINE_enum("scope", "layer", ["layer", "global"], "Channel ranking: per group, or one across groups.")
_PRETRAIN = flags.DEFINE_integer("pretrain_epochs", 2, "Dense epochs before pruning.")
_FINETUNE = flags.DEFINE_integer("finetune_epochs", 3, "Fine-tuning epochs of every arm.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Batch size.")
_PRUNE_FRACTION = flags.DEFINE_float("prune_fraction", 0.6, "The pruned arms reach their sparsity after this "
                                     "fraction of the fine-tuning steps (PolynomialDecay's end_step).")
_LR = flags.DEFINE_enum("lr", "constant", ["constant", "cosine"],
                        "Adam's learning rate in every fit: 1e-3, or 1e-3 decayed to 0 along a cosine over the fit.")
_MODELS = flags.DEFINE_list("models", ["cnn", "resnet"], "Which models.")
_EXAMPLES = flags.DEFINE_integer("train_examples", None, "Use only the first N training images (quick checks).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the initial weights and of the batches' order (every arm).")
_BASELINES = flags.DEFINE_bool("baselines", True, "Also run the narrow and unstructured arms (--nobaselines: "
                               "dense and channel only, e.g. for more seeds).")
_PRUNE_FROM = flags.DEFINE_enum("prune_from", "pretrained", ["pretrained", "dense"],
                                "Start of the pruned arms: the pretrained weights (every arm then trains as long), or "
                                "the dense arm's final model (prune a converged model, then fine-tune --finetune_epochs "
                                "more; a 'dense longer' arm trains the dense model as many epochs more).")
_NAME = flags.DEFINE_string("name", "channels_accuracy", "Results file: results/<name>.json.")
_DENSE_FROM = flags.DEFINE_string("dense_from", None, "With --prune_from=dense --nobaselines: a previous run's work "
                                  "directory (it prints it) of the same seed and epochs; its <model>_dense and "
                                  "<model>_dense_longer are loaded and evaluated instead of trained again.")
SPEC = tf.TensorSpec([None, 28, 28, 1], tf.float32, name="image")


class ResNet(tf.Module):
    """stem conv 3x3 -> 3 stages (stride-2 conv between them) of a residual block (conv 3x3, relu,
    conv 3x3, + input, relu) -> global average pool -> dense 10. Widths: per stage, and the
    inner width of each block."""

    def __init__(self, widths=(16, 32, 64, 16, 32, 64), seed=0):
        super().__init__(name="resnet")
        rng = np.random.RandomState(seed)
        self.widths = tuple(widths)
        stages, inner = widths[:3], widths[3:]
        self.stem = tf.Variable(glorot(rng, 3, 3, 1, stages[0]), name="stem/kernel")
        self.stem_bias = tf.Variable(np.zeros(stages[0], np.float32), name="stem/bias")
        self.blocks = []
        for index, (width, middle) in enumerate(zip(stages, inner)):
            block = {
                "a": tf.Variable(glorot(rng, 3, 3, width, middle), name=f"block{index}/a/kernel"),
                "a_bias": tf.Variable(np.zeros(middle, np.float32), name=f"block{index}/a/bias"),
                "b": tf.Variable(glorot(rng, 3, 3, middle, width) * 0.5, name=f"block{index}/b/kernel"),
                "b_bias": tf.Variable(np.zeros(width, np.float32), name=f"block{index}/b/bias"),
            }
            if index + 1 < len(stages):
                block["down"] = tf.Variable(glorot(rng, 3, 3, width, stages[index + 1]), name=f"down{index}/kernel")
                block["down_bias"] = tf.Variable(np.zeros(stages[index + 1], np.float32), name=f"down{index}/bias")
            self.blocks.append(block)
        self.head = tf.Variable(glorot(rng, stages[-1], 10), name="head/kernel")
        self.head_bias = tf.Variable(np.zeros(10, np.float32), name="head/bias")

    @tf.function(input_signature=[SPEC])
    def __call__(self, image):
        x = tf.nn.relu(tf.nn.conv2d(image, self.stem, 1, "SAME") + self.stem_bias)
        for block in self.blocks:
            y = tf.nn.relu(tf.nn.conv2d(x, block["a"], 1, "SAME") + block["a_bias"])
            x = tf.nn.relu(x + tf.nn.conv2d(y, block["b"], 1, "SAME") + block["b_bias"])
            if "down" in block:
                x = tf.nn.relu(tf.nn.conv2d(x, block["down"], 2, "SAME") + block["down_bias"])
        return tf.matmul(tf.reduce_mean(x, axis=[1, 2]), self.head) + self.head_bias


BUILDERS = {"cnn": MnistCNN, "resnet": ResNet}


def _fit(forward, variables, data, epochs, seed, before=None, teacher=None):
    rate = 1e-3
    if _LR.value == "cosine":
        rate = tf.keras.optimizers.schedules.CosineDecay(1e-3, bc.steps_per_epoch(data, _BATCH.value) * epochs)
    step = bc.make_train_step(forward, variables, before=before, learning_rate=rate, teacher=teacher)
    _, seconds, _ = bc.train(step, data, _BATCH.value, epochs, seed)
    return seconds


def _latency(path: str, batch: int) -> float:
    model = tf.saved_model.load(path)
    x = tf.constant(np.random.RandomState(0).rand(batch, 28, 28, 1).astype(np.float32))
    call = model.signatures["serving_default"]
    for _ in range(3):
        call(image=x)
    times = []
    for _ in range(30 if batch == 1 else 10):
        start = time.perf_counter()
        call(image=x)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


def _save(module, path):
    tf.saved_model.save(module, path, signatures={"serving_default": module.__call__})
    return path


def _row(name, path, accuracy, base=None):
    cost = graphprune.cost(path)
    row = {"arm": name, "accuracy": accuracy, "parameters": cost.parameters, "flops": cost.flops,
           "latency_b256_ms": _latency(path, 256), "latency_b1_ms": _latency(path, 1)}
    print(f"  {name:13s} accuracy {accuracy:.4f}  parameters {cost.parameters:>9,}  FLOPs {cost.flops:>11,}  "
          f"batch 256 {row['latency_b256_ms']:.1f} ms  batch 1 {row['latency_b1_ms']:.2f} ms", flush=True)
    return row


def _widths(name, shrunk_dir):
    """The shrunk model's widths, read from its kernels' shapes (by kernel name)."""
    from graphprune.channels import _static_shapes
    from graphprune.load import load

    loaded = load(shrunk_dir)
    entry = next(e for e in loaded.model.entries if e.kind == "signature")
    static = _static_shapes(entry, loaded.model)
    convs = [tuple(static[(n.input[1].split(":")[0], 0)]) for n in entry.graph_def.node  # in graph order
             if n.op in ("Conv2D", "MatMul")]
    if name == "cnn":
        return (convs[0][-1], convs[1][-1], convs[2][-1])
    stages = (convs[0][-1], convs[3][-1], convs[6][-1])
    inner = (convs[1][-1], convs[4][-1], convs[7][-1])
    return stages + inner


def _dense_arms(name, data):
    """--dense_from: the dense arms' rows from a previous run's saved models, and the dense one's path."""
    paths = [os.path.join(_DENSE_FROM.value, f"{name}_{arm}") for arm in ("dense", "dense_longer")]
    rows = [_row(arm, path, bc.accuracy(tf.saved_model.load(path), data))
            for arm, path in zip(("dense", "dense longer"), paths)]
    return rows, paths[0]


def _end_step(data) -> int:
    """The pruned arms' schedules end after --prune_fraction of the fine-tuning steps (in hundreds)."""
    steps = bc.steps_per_epoch(data, _BATCH.value) * _FINETUNE.value
    return int(steps * _PRUNE_FRACTION.value) // 100 * 100


def _channel_arm(name, data, work, rows, start, order, teacher) -> str:
    """Prune ``start`` by channels while fine-tuning (batches in order ``order``), finalize with
    shrink; its row appended to ``rows``; the shrunk model's path returned."""
    schedule = graphprune.PolynomialDecay(0.0, _RATIO.value, 0, _end_step(data), power=3, frequency=100)
    rules = [graphprune.Rule(item.rpartition("=")[0], sparsity=float(item.rpartition("=")[2]))
             for item in _SPARSITY_FOR.value]
    pm = graphprune.prune(start, schedule, structure="channel", scope=_SCOPE.value, rules=rules)
    _fit(pm, pm.trainable_variables, data, _FINETUNE.value, order, before=pm.update_masks, teacher=teacher)
    shrunk = graphprune.finalize(pm, os.path.join(work, f"{name}_channel"), shrink=True)
    rows.append(_row("channel", shrunk, bc.accuracy(tf.saved_model.load(shrunk), data)))
    return shrunk


def run_model(name, data, work, seed=0):
    if _DENSE_FROM.value:
        if _PRUNE_FROM.value != "dense" or _BASELINES.value or _DISTILL.value:
            raise app.UsageError("--dense_from needs --prune_from=dense --nobaselines (and no --distill)")
        rows, start = _dense_arms(name, data)
        _channel_arm(name, data, work, rows, start, seed + 2, None)
    else:
        rows = _train_model(name, data, work, seed)
    for row in rows:
        row["model"] = name
    return rows


def _train_model(name, data, work, seed):
    build = BUILDERS[name]
    dense = build(seed=seed)
    started = time.time()
    _fit(dense, dense.trainable_variables, data, _PRETRAIN.value, seed)
    pretrained = _save(dense, os.path.join(work, f"{name}_pretrained"))
    print(f"{name}: pretrained {_PRETRAIN.value} epochs ({time.time() - started:.0f} s)", flush=True)
    rows = []

    _fit(dense, dense.trainable_variables, data, _FINETUNE.value, seed + 1)
    path = _save(dense, os.path.join(work, f"{name}_dense"))
    rows.append(_row("dense", path, bc.accuracy(dense, data)))
    start, order, epochs = pretrained, seed + 1, _PRETRAIN.value + _FINETUNE.value
    if _PRUNE_FROM.value == "dense":  # prune the converged model; fine-tuning is extra training
        start, order, epochs = path, seed + 2, _PRETRAIN.value + 2 * _FINETUNE.value
        longer = build(seed=seed)
        for target, source in zip(longer.trainable_variables, dense.trainable_variables):
            target.assign(source)
        _fit(longer, longer.trainable_variables, data, _FINETUNE.value, order)
        rows.append(_row("dense longer", _save(longer, os.path.join(work, f"{name}_dense_longer")),
                         bc.accuracy(longer, data)))

    teacher = dense if _DISTILL.value else None
    shrunk = _channel_arm(name, data, work, rows, start, order, teacher)

    if _BASELINES.value:
        widths = _widths(name, shrunk)
        narrow = build(widths=widths, seed=seed)
        _fit(narrow, narrow.trainable_variables, data, epochs, seed)  # as long as the channel arm in all
        rows.append(_row("narrow", _save(narrow, os.path.join(work, f"{name}_narrow")), bc.accuracy(narrow, data)))
        rows[-1]["widths"] = [int(w) for w in widths]

        kernels = sum(int(np.prod(v.shape)) for v in dense.trainable_variables if len(v.shape) >= 2)
        channel = next(r for r in rows if r["arm"] == "channel")
        removed = rows[0]["parameters"] - channel["parameters"]
        sparsity = min(0.99, removed / kernels)
        schedule = graphprune.PolynomialDecay(0.0, sparsity, 0, _end_step(data), power=3, frequency=100)
        pm = graphprune.prune(start, schedule)
        _fit(pm, pm.trainable_variables, data, _FINETUNE.value, order, before=pm.update_masks, teacher=teacher)
        final = graphprune.finalize(pm, os.path.join(work, f"{name}_unstructured"))
        rows.append(_row("unstructured", final, bc.accuracy(tf.saved_model.load(final), data)))
        rows[-1]["sparsity"] = pm.sparsity()
    return rows


def table(rows) -> str:
    lines = ["| model | arm | test accuracy | parameters | FLOPs | latency, batch 256 | latency, batch 1 |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        base = next(r for r in rows if r["model"] == row["model"] and r["arm"] == "dense")
        extra = "" if row["arm"] == "dense" else (
            f" ({row['accuracy'] - base['accuracy']:+.2%})".replace("%", " pt"))
        lines.append(
            f"| {row['model']} | {row['arm']}{' ' + str(row['widths']) if 'widths' in row else ''}"
            f"{' (%.0f%% sparse)' % (100 * row['sparsity']) if 'sparsity' in row else ''} | {row['accuracy']:.4f}{extra} | "
            f"{row['parameters']:,} ({row['parameters'] / base['parameters']:.2f}x) | "
            f"{row['flops'] / base['flops']:.2f}x | {row['latency_b256_ms']:.1f} ms "
            f"({row['latency_b256_ms'] / base['latency_b256_ms']:.2f}x) | {row['latency_b1_ms']:.2f} ms "
            f"({row['latency_b1_ms'] / base['latency_b1_ms']:.2f}x) |")
    return "\n".join(lines)


def main(argv):
    del argv
    bc.quiet()
    data = bc.require_full_data(_DATA_DIR.value)
    if _EXAMPLES.value:
        data["x_train"], data["y_train"] = data["x_train"][:_EXAMPLES.value], data["y_train"][:_EXAMPLES.value]
    work = tempfile.mkdtemp(prefix="gp-channels-acc-")
    print(f"saved models: {work}", flush=True)
    rows = []
    for name in _MODELS.value:
        rows += run_model(name, data, work, seed=_SEED.value)
    print(table(rows))
    settings = {"ratio": _RATIO.value, "scope": _SCOPE.value, "lr": _LR.value, "distill": _DISTILL.value,
                "prune_fraction": _PRUNE_FRACTION.value, "sparsity_for": _SPARSITY_FOR.value,
                "pretrain_epochs": _PRETRAIN.value, "finetune_epochs": _FINETUNE.value, "seed": _SEED.value,
                "prune_from": _PRUNE_FROM.value, "dense_from": _DENSE_FROM.value}
    bc.write_json(_NAME.value, {**settings, "machine": bc.machine(), "rows": rows})


if __name__ == "__main__":
    sys.exit(app.run(main))
