"""Subclassed Keras 2 (tf-keras) transformers with a ``training`` argument (issue #16): BERT-,
GPT-2- and ViT-style models whose LayerNormalization betas are not zero (the case where a frozen
normalization changed outputs by up to 1.3). Each goes through the whole chain: every kernel
found, all-ones equivalence, one-shot 50%, a GradientTape step in training mode, save/reload and
finalize equal to the masked model."""

import re

import numpy as np
import pytest
import tensorflow as tf

import graphprune
import testmodels

keras2 = pytest.importorskip("tf_keras")  # the test extra installs it; without it, say so

DIM, HEADS, LENGTH, VOCAB = 16, 2, 8, 40


class Block(keras2.layers.Layer):
    def __init__(self, pre_norm: bool, causal: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.pre_norm, self.causal = pre_norm, causal
        self.attention = keras2.layers.MultiHeadAttention(HEADS, DIM // HEADS, name="attention")
        # Non-zero betas: frozen, TensorFlow's oneDNN path folded them wrongly (#16).
        self.norm1 = keras2.layers.LayerNormalization(beta_initializer="random_normal", name="norm1")
        self.norm2 = keras2.layers.LayerNormalization(beta_initializer="random_normal", name="norm2")
        self.up = keras2.layers.Dense(2 * DIM, activation="gelu", name="up")
        self.down = keras2.layers.Dense(DIM, name="down")
        self.dropout = keras2.layers.Dropout(0.1)

    def call(self, x, training=False):
        if self.pre_norm:
            h = self.norm1(x)
            x = x + self.dropout(self.attention(h, h, use_causal_mask=self.causal, training=training),
                                 training=training)
            return x + self.dropout(self.down(self.up(self.norm2(x))), training=training)
        x = self.norm1(x + self.dropout(self.attention(x, x, training=training), training=training))
        return self.norm2(x + self.dropout(self.down(self.up(x)), training=training))


class BertStyle(keras2.Model):
    def __init__(self):
        super().__init__()
        self.tokens = keras2.layers.Embedding(VOCAB, DIM, name="tokens")
        self.positions = self.add_weight(name="positions", shape=(LENGTH, DIM), initializer="random_normal")
        self.blocks = [Block(pre_norm=False, name=f"block{i}") for i in range(2)]
        self.pooler = keras2.layers.Dense(DIM, activation="tanh", name="pooler")

    def call(self, token_ids, training=False):
        x = self.tokens(token_ids) + self.positions
        for block in self.blocks:
            x = block(x, training=training)
        return self.pooler(x[:, 0])


class GPT2Style(keras2.Model):
    """Pre-norm causal blocks and an output projection tied to the token embedding."""

    def __init__(self):
        super().__init__()
        self.tokens = keras2.layers.Embedding(VOCAB, DIM, name="tokens")
        self.positions = self.add_weight(name="positions", shape=(LENGTH, DIM), initializer="random_normal")
        self.blocks = [Block(pre_norm=True, causal=True, name=f"block{i}") for i in range(2)]
        self.final_norm = keras2.layers.LayerNormalization(beta_initializer="random_normal", name="final_norm")

    def call(self, token_ids, training=False):
        x = self.tokens(token_ids) + self.positions
        for block in self.blocks:
            x = block(x, training=training)
        return tf.matmul(self.final_norm(x), self.tokens.embeddings, transpose_b=True)


class ViTStyle(keras2.Model):
    def __init__(self):
        super().__init__()
        self.patches = keras2.layers.Conv2D(DIM, 4, strides=4, name="patches")
        self.cls = self.add_weight(name="cls", shape=(1, 1, DIM), initializer="random_normal")
        self.positions = self.add_weight(name="positions", shape=(17, DIM), initializer="random_normal")
        self.blocks = [Block(pre_norm=True, name=f"block{i}") for i in range(2)]
        self.head = keras2.layers.Dense(5, name="head")

    def call(self, images, training=False):
        x = self.patches(images)
        x = tf.reshape(x, [-1, 16, DIM])
        x = tf.concat([tf.tile(self.cls, [tf.shape(x)[0], 1, 1]), x], axis=1) + self.positions
        for block in self.blocks:
            x = block(x, training=training)
        return self.head(x[:, 0])


CASES = {
    "bert_style": (BertStyle, tf.TensorSpec([None, LENGTH], tf.int32)),
    "gpt2_style": (GPT2Style, tf.TensorSpec([None, LENGTH], tf.int32)),
    "vit_style": (ViTStyle, tf.TensorSpec([None, 16, 16, 3], tf.float32)),
}


def _input(spec, rng):
    if spec.dtype == tf.int32:
        return tf.constant(rng.randint(0, VOCAB, [3, LENGTH]), tf.int32)
    return tf.constant(rng.standard_normal([3, 16, 16, 3]).astype(np.float32))


def _kernels(model):
    kernels = [v.name.split(":")[0] for v in model.trainable_variables if "kernel" in v.name and v.shape.rank >= 2]
    if isinstance(model, GPT2Style):
        kernels.append(model.tokens.embeddings.name.split(":")[0])  # the tied output projection
    return kernels


def _saved(name, tmp_path):
    build, spec = CASES[name]
    model = build()
    x = _input(spec, np.random.RandomState(0))
    model(x, training=False)

    @tf.function(input_signature=[spec])
    def serve(inputs):
        return model(inputs, training=False)

    model(x, training=True)  # traces __call__ for both modes (dropout in training): both are kept
    tf.saved_model.save(model, str(tmp_path / "export"), signatures={"serving_default": serve})
    return str(tmp_path / "export"), x, model


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_keras2_subclassed_transformer_full_chain(name, tmp_path):
    _, x, model = _saved(name, tmp_path)
    original = tf.saved_model.load(str(tmp_path / "export"))
    reference = original.signatures["serving_default"](x)["output_0"].numpy()
    scale = float(np.abs(reference).max())
    assert scale > 0.1, scale  # random weights, but outputs that mean something

    pm = graphprune.prune(str(tmp_path / "export"), schedule=graphprune.ConstantSparsity(0.5, 0))
    found = sorted(row["name"] for row in pm.weights())
    assert len(found) == len(_kernels(model)), (found, _kernels(model))
    np.testing.assert_allclose(pm.signatures["serving_default"](x)["output_0"].numpy(), reference, atol=1e-6 * scale,
                               rtol=0)  # all-ones masks

    pm.prune_now()
    assert all(row["sparsity"] == pytest.approx(0.5, abs=0.02) for row in pm.weights())
    masked = pm.signatures["serving_default"](x)["output_0"].numpy()
    assert np.abs(masked - reference).max() > 1e-3 * scale  # the pruning shows
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.square(pm(x, training=True)))
    gradients = tape.gradient(loss, pm.trainable_variables)
    assert len(gradients) == len(model.trainable_variables) and all(g is not None for g in gradients)

    graphprune.save(pm, str(tmp_path / "prunable"))
    reloaded = tf.saved_model.load(str(tmp_path / "prunable"))
    np.testing.assert_allclose(reloaded.signatures["serving_default"](x)["output_0"].numpy(), masked,
                               atol=1e-5 * scale, rtol=0)
    final = tf.saved_model.load(graphprune.finalize(pm, str(tmp_path / "final")))
    np.testing.assert_allclose(final.signatures["serving_default"](x)["output_0"].numpy(), masked,
                               atol=1e-5 * scale, rtol=0)
    np.testing.assert_allclose(final(x, training=False).numpy(), masked, atol=1e-5 * scale, rtol=0)
    assert testmodels.check_tflite(str(tmp_path / "final"), str(tmp_path / "m.tflite"), x.numpy(), masked,
                                   scale) == "ok"


def _stream(groups):
    return next(group for group in groups if group.size == DIM and any(m.name.endswith("norm1/gamma")
                                                                       for m in group.members))


@pytest.mark.parametrize("name", sorted(CASES))
def test_keras2_hidden_size_through_fused_layer_norms(name, tmp_path):
    """residual_stream=True on tf-keras transformers: their LayerNormalization runs fused (a
    FusedBatchNormV3 on the stream reshaped to [1, N, D, 1]), which the unfuse_layer_norms pass
    writes as means the kept-channel rewrite follows; the training trace's dropout on the stream
    goes too. The hidden size shrinks 16 -> 8 and the shrunk model computes the masked one."""
    from graphprune.load import load

    export, x, _ = _saved(name, tmp_path)
    assert not _stream(graphprune.channel_groups(export)).prunable  # without the flag: whole
    reference = tf.saved_model.load(export).signatures["serving_default"](x)["output_0"].numpy()
    scale = float(np.abs(reference).max())
    pm = graphprune.prune(export, graphprune.ConstantSparsity(0.5, 0), structure="channel", residual_stream=True)
    stream = _stream(graphprune.channel_groups(pm))
    assert stream.prunable, graphprune.channels.describe([stream])
    np.testing.assert_allclose(pm.signatures["serving_default"](x)["output_0"].numpy(), reference,
                               atol=1e-5 * scale, rtol=0)  # all-ones masks: the unfused norms compute the fused ones
    pm.prune_now()
    masked = pm.signatures["serving_default"](x)["output_0"].numpy()
    assert np.abs(masked - reference).max() > 1e-2 * scale
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.square(pm(x, training=True)))
    gradients = tape.gradient(loss, pm.trainable_variables)
    assert all(g is not None for g in gradients)

    out = graphprune.finalize(pm, str(tmp_path / "small"), shrink=True)
    shrunk = tf.saved_model.load(out)
    np.testing.assert_allclose(shrunk.signatures["serving_default"](x)["output_0"].numpy(), masked,
                               atol=1e-5 * scale, rtol=0)
    np.testing.assert_allclose(shrunk(x, training=False).numpy(), masked, atol=1e-5 * scale, rtol=0)
    assert shrunk(x, training=True).shape == masked.shape  # dropout draws over the kept channels
    loaded = load(out).model
    norms = [key for key in loaded.variables if re.search(r"norm\d?/(gamma|beta)$", key)]
    assert norms and all(loaded.variables[key].shape == (DIM // 2,) for key in norms)
    ops = {node.op for entry in loaded.entries for node in entry.graph_def.node}
    assert "FusedBatchNormV3" not in ops and "Mean" in ops  # the norms are means now
    assert graphprune.cost(out).parameters < 0.4 * graphprune.cost(export).parameters
    assert testmodels.check_tflite(out, str(tmp_path / "small.tflite"), x.numpy(), masked, scale) == "ok"


def test_unfuse_layer_norms_only_rewrites_a_norm_over_the_last_axis(tmp_path):
    """The pass alone: a fused norm over the last axis (of a feature map, non-zero beta, odd
    epsilon) becomes Mean / Square / Rsqrt ops with the same outputs, in every trace; a fused batch
    norm beside it and a norm over the last two axes are left as they are."""
    from graphprune.load import load
    from graphprune.passbase import PassContext
    from graphprune.pipeline import run_pipeline
    from graphprune.verify import run_entries

    def unfused(model, path):
        model.save(str(path), save_format="tf")
        loaded = load(str(path))
        result = run_pipeline(loaded.model, [("unfuse_layer_norms", {})], PassContext(values=loaded.variables))
        ops = [{node.name: node.op for node in entry.graph_def.node} for entry in result.model.entries]
        return loaded, result, ops

    inputs = keras2.Input([5, 5, 3])
    x = keras2.layers.BatchNormalization(name="batch")(keras2.layers.Conv2D(6, 3, name="conv")(inputs))
    x = keras2.layers.LayerNormalization(epsilon=0.3, beta_initializer="random_normal", name="last")(x)
    loaded, result, ops = unfused(keras2.Model(inputs, keras2.layers.Dense(2)(x)), tmp_path / "last")
    assert result.reports[0][1].report["unfused"] == len(ops)  # the norm in every trace
    before = run_entries(loaded.model, loaded.variables)
    after = run_entries(result.model, loaded.variables)
    for label, outputs in before.items():
        for want, got in zip(outputs, after[label]):
            np.testing.assert_allclose(got, want, atol=1e-5 * max(1.0, np.abs(want).max()), rtol=0)
    for nodes in ops:
        layer = lambda name: [op for node, op in nodes.items() if name in node.split("/")]  # noqa: E731
        assert "Mean" in layer("last") and not any(op.startswith("FusedBatchNorm") for op in layer("last"))
        assert "FusedBatchNormV3" in layer("batch")

    inputs = keras2.Input([4, 6])
    x = keras2.layers.LayerNormalization(axis=[1, 2], name="both")(inputs)  # rows of 4 x 6, not of 6
    _, result, ops = unfused(keras2.Model(inputs, x), tmp_path / "both")
    assert result.reports[0][1].report["unfused"] == 0 and all(op != "Mean" for nodes in ops for op in nodes.values())
    assert all("FusedBatchNormV3" in nodes.values() for nodes in ops)  # fused, and left so
