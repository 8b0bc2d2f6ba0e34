"""Channel pruning of transformers: MLP neurons and attention heads, and the hidden size.

    python benchmarks/channels_transformer.py [--models=bert,gpt2 --ratio=0.5 --length=128]

Each keras-hub task model is built from its config with random weights (nothing downloaded):
"bert" a BertTextClassifier on a BERT-small-sized backbone (4 layers, hidden 512, 8 heads, MLP
2048, BERT's 30522-token vocabulary), "gpt2" a GPT2CausalLM of the same size (its logits are the
stream times the tied token embedding), "llama" a LlamaCausalLM of the same size with grouped-query
attention (8 query heads sharing 2 key/value heads, rotary embeddings, a gated MLP; a key/value head
goes with its 4 query heads), "vitdet" a ViTDetBackbone, SAM's image encoder, of the same size
(256x256 images in 16x16 patches: 256 tokens whatever --length says; windows of 8x8 patches, every
second layer global; attention run as [3, batch * heads, tokens, head_dim], its heads merged with
the batch, with relative position embeddings; a neck of hidden/2 channels), "vit" a ViTBackbone of
the same size (224x224 images in 16x16 patches and a class token: 197 tokens whatever --length
says; Keras's MultiHeadAttention without dropout, which runs dot_product_attention: it reads the
key's head-dim size and never uses it). Each is exported,
pruned one-shot with
structure='channel' at --ratio of every group's channels (kept counts rounded up to a multiple
of 8), and finalized with shrink=True, two ways:

    heads+mlp      the default: MLP neurons and whole attention heads; the residual stream (the
                   hidden size) is left whole, since layer norms average over it
    +hidden        residual_stream=True: the hidden size too (embeddings, every layer norm,
                   residual and kernel on the stream, the pooler or the tied output projection)

For the dense export and both shrunk models, on this machine:

    parameters     graphprune.cost
    flops          graphprune.cost at batch 1 with the sequence length given (unknown_size=--length):
                   2 x multiply-adds of every matmul and einsum, attention's included
    tf_b1, tf_b32  median latency of the SavedModel's serving function (TensorFlow, all cores) at
                   batch 1 and 32, --length tokens
    litert         median latency of the float .tflite under LiteRT, 1 thread, batch 1 (none where
                   the converter refuses the dense export: Llama's attention mask)
    max_diff       largest |masked - shrunk| output difference over the output scale

Latencies of one model's three variants are taken in turn, in five rounds of blocks of calls
(channels.py's _median_ms_in_rounds). Results: benchmarks/results/channels_transformer.json.
There is no target in issue #17 for transformers: this measures what the hidden size adds.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from channels import _median_ms_in_rounds  # noqa: E402

_MODELS = flags.DEFINE_list("models", ["bert", "gpt2"], "Which models: bert, gpt2, llama, vitdet, vit.")
_RATIO = flags.DEFINE_float("ratio", 0.5, "Fraction of each group's channels removed.")
_LENGTH = flags.DEFINE_integer("length", 128, "Tokens per sequence.")
_LAYERS = flags.DEFINE_integer("layers", 4, "Transformer layers.")
_HIDDEN = flags.DEFINE_integer("hidden", 512, "Hidden size (heads of 64).")
_VOCABULARY = flags.DEFINE_integer("vocabulary", 30522, "Vocabulary size.")
_REPEATS = flags.DEFINE_integer("repeats", 50, "Timed calls per model at batch 1 (a quarter at batch 32).")
_NAME = flags.DEFINE_string("name", "channels_transformer", "Results file: results/<name>.json.")


def _model(name: str):
    import keras
    import keras_hub

    keras.utils.set_random_seed(0)
    models = keras_hub.models
    size = dict(vocabulary_size=_VOCABULARY.value, num_layers=_LAYERS.value, num_heads=_HIDDEN.value // 64,
                hidden_dim=_HIDDEN.value, intermediate_dim=4 * _HIDDEN.value, max_sequence_length=_LENGTH.value)
    if name == "bert":
        return models.BertTextClassifier(models.BertBackbone(**size), num_classes=2, preprocessor=None)
    if name == "gpt2":
        return models.GPT2CausalLM(models.GPT2Backbone(**size), preprocessor=None)
    if name == "llama":
        size.pop("max_sequence_length")
        heads = size.pop("num_heads")
        return models.LlamaCausalLM(models.LlamaBackbone(num_query_heads=heads, num_key_value_heads=heads // 4, **size),
                                    preprocessor=None)
    if name == "vitdet":
        return models.ViTDetBackbone(
            hidden_size=_HIDDEN.value, num_layers=_LAYERS.value, intermediate_dim=4 * _HIDDEN.value,
            num_heads=_HIDDEN.value // 64, global_attention_layer_indices=list(range(1, _LAYERS.value, 2)),
            image_shape=(256, 256, 3), patch_size=16, num_output_channels=_HIDDEN.value // 2, window_size=8)
    if name == "vit":
        return models.ViTBackbone(image_shape=(224, 224, 3), patch_size=16, num_layers=_LAYERS.value,
                                  num_heads=_HIDDEN.value // 64, hidden_dim=_HIDDEN.value, mlp_dim=4 * _HIDDEN.value)
    raise app.UsageError(f"unknown model {name!r}: bert, gpt2, llama, vitdet or vit")


def _inputs(signature, batch: int, length: int) -> dict:
    import numpy as np
    import tensorflow as tf

    rng = np.random.RandomState(0)
    values = {}
    for key, spec in signature.structured_input_signature[1].items():
        if spec.dtype.is_floating:  # images
            values[key] = tf.constant(rng.uniform(size=[batch, *spec.shape[1:]]), spec.dtype)
        elif "padding_mask" in key:
            values[key] = tf.ones([batch, length], spec.dtype)
        elif "segment" in key:
            values[key] = tf.zeros([batch, length], spec.dtype)
        else:
            values[key] = tf.constant(rng.randint(0, _VOCABULARY.value, [batch, length]), spec.dtype)
    return values


def _latencies(paths: list[tuple[str, str]], length: int, repeats: int) -> list[dict]:
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    loaded, calls_b1, calls_b32, lite = [], [], [], []
    for saved_model, tflite in paths:
        loaded.append(tf.saved_model.load(saved_model))  # held: its variables live as long as it does
        serve = loaded[-1].signatures["serving_default"]
        one, many = _inputs(serve, 1, length), _inputs(serve, 32, length)
        calls_b1.append(lambda s=serve, x=one: s(**x))
        calls_b32.append(lambda s=serve, x=many: s(**x))
        if tflite is not None:
            runner = Interpreter(model_path=tflite, num_threads=1).get_signature_runner("serving_default")
            arrays = {key: value.numpy() for key, value in one.items()}
            lite.append(lambda r=runner, x=arrays: r(**x))
    b1 = _median_ms_in_rounds(calls_b1, repeats)
    b32 = _median_ms_in_rounds(calls_b32, max(5, repeats // 4))
    litert = _median_ms_in_rounds(lite, repeats) if lite else [None] * len(paths)
    return [{"tf_b1_ms": a, "tf_b32_ms": b, "litert_ms": c} for a, b, c in zip(b1, b32, litert)]


def measure(name: str, scratch: str) -> list[dict]:
    import numpy as np
    import tensorflow as tf

    import graphprune

    dense = os.path.join(scratch, f"{name}_dense")
    _model(name).export(dense, verbose=False)
    try:
        graphprune.export_tflite(dense, dense + ".tflite", overwrite=True)
        lite = True
    except graphprune.GraphPruneError as error:  # the converter refuses the dense model itself
        print(f"{name}: no LiteRT timing: {error}", flush=True)
        lite = False
    base = graphprune.cost(dense, unknown_size=_LENGTH.value)
    rows = [{"model": name, "variant": "dense", "parameters": base.parameters, "flops": base.flops, "max_diff": 0.0}]
    paths = [(dense, dense + ".tflite" if lite else None)]
    for variant, stream in (("heads+mlp", False), ("+hidden", True)):
        start = time.perf_counter()
        pm = graphprune.prune(dense, graphprune.ConstantSparsity(_RATIO.value, 0), structure="channel",
                              one_shot=True, round_to=8, residual_stream=stream)
        x = _inputs(pm.signatures["serving_default"], 2, _LENGTH.value)
        masked = next(iter(pm.signatures["serving_default"](**x).values())).numpy()
        out = os.path.join(scratch, f"{name}_{variant}")
        graphprune.finalize(pm, out, shrink=True, overwrite=True)
        seconds = time.perf_counter() - start
        del pm
        loaded = tf.saved_model.load(out)
        shrunk = next(iter(loaded.signatures["serving_default"](**x).values())).numpy()
        del loaded
        if lite:
            graphprune.export_tflite(out, out + ".tflite", overwrite=True)
        cost = graphprune.cost(out, unknown_size=_LENGTH.value)
        rows.append({"model": name, "variant": variant, "parameters": cost.parameters, "flops": cost.flops,
                     "max_diff": float(np.max(np.abs(shrunk - masked)) / np.max(np.abs(masked))),
                     "prune_finalize_s": seconds})
        paths.append((out, out + ".tflite" if lite else None))
    for row, latencies in zip(rows, _latencies(paths, _LENGTH.value, _REPEATS.value)):
        row.update(latencies, ratio=_RATIO.value, length=_LENGTH.value)
        print(json.dumps(row), flush=True)
    return rows


def table(rows) -> str:
    lines = ["| model | variant | parameters | FLOPs | TF batch 1 | TF batch 32 | LiteRT 1 thread | max diff |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        base = next(r for r in rows if r["model"] == row["model"] and r["variant"] == "dense")

        def cell(key, digits=1):
            if row[key] is None:
                return "-"
            return f"{row[key]:.{digits}f} ms ({row[key] / base[key]:.2f}x)"

        lines.append(f"| {row['model']} | {row['variant']} | {row['parameters']:,} "
                     f"({row['parameters'] / base['parameters']:.2f}x) | {row['flops'] / 1e9:.2f} G "
                     f"({row['flops'] / base['flops']:.2f}x) | {cell('tf_b1_ms')} | {cell('tf_b32_ms', 0)} | "
                     f"{cell('litert_ms')} | {row['max_diff']:.1e} |")
    return "\n".join(lines)


def main(argv) -> None:
    del argv
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in _MODELS.value:
            rows.extend(measure(name, scratch))
    path = os.path.join(HERE, "results", f"{_NAME.value}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as file:
        json.dump(rows, file, indent=1)
    os.replace(path + ".tmp", path)
    print(table(rows))


if __name__ == "__main__":
    app.run(main)
