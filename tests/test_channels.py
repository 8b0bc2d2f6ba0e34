"""Channel pruning (structure='channel') and finalize(shrink=True): dependency groups, channel
masks, and a shrunk dense model that computes what the masked one does."""

import math
import os
import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import tensorflow as tf

import graphprune
from graphprune import channels, graph, names
from graphprune.errors import StructureError

from test_zoo_applications import _calibrated
from testmodels import ChannelNet, StreamNet, check_tflite, train_mirrored

KERNEL_OPS = ("Conv2D", "Conv3D", "DepthwiseConv2dNative", "Conv2DBackpropInput", "Conv3DBackpropInputV2", "MatMul",
              "BatchMatMulV2", "Einsum")


def _group(groups, name):
    return next(group for group in groups if group.name == name)


def _members(group):
    return {(m.name, m.axis, m.role, m.start, m.stop, m.period) for m in group.members}


def _saved(tmp_path_factory, module) -> str:
    path = str(tmp_path_factory.mktemp(module.name) / "model")
    tf.saved_model.save(module, path)
    return path


@pytest.fixture(scope="module")
def channel_net(tmp_path_factory):
    return _saved(tmp_path_factory, ChannelNet())


def _cli(*args) -> str:
    done = subprocess.run([sys.executable, "-m", "graphprune.tools.main", *args], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_groups_follow_every_coupling(channel_net):
    groups = graphprune.channel_groups(channel_net)
    # The residual stream: both producers (stem, project), the bias, batch norm, and all three
    # consumers (expand, and the two branches after pooling) are one group.
    stream = _group(groups, "block/project/kernel:3")
    assert stream.prunable and stream.size == 16
    assert {(m.name, m.axis, m.role) for m in stream.members} == {
        ("stem/kernel", 3, "out"), ("stem/bias", 0, "param"), ("bn/gamma", 0, "param"), ("bn/beta", 0, "param"),
        ("bn/moving_mean", 0, "param"), ("bn/moving_variance", 0, "param"), ("block/expand/kernel", 2, "in"),
        ("block/project/kernel", 3, "out"), ("block/project/bias", 0, "param"), ("left/kernel", 2, "in"),
        ("right/kernel", 2, "in")}
    # Expanded channels pass through the depthwise kernel.
    assert _members(_group(groups, "block/expand/kernel:3")) == {
        ("block/expand/kernel", 3, "out", 0, 32, None), ("block/depthwise/kernel", 2, "through", 0, 32, None),
        ("block/project/kernel", 2, "in", 0, 32, None)}
    # Concat: each branch is its own slice of the consumer's input channels.
    assert ("mix/kernel", 2, "in", 0, 8, None) in _members(_group(groups, "left/kernel:3"))
    assert ("mix/kernel", 2, "in", 8, 20, None) in _members(_group(groups, "right/kernel:3"))
    # Flatten: channel c of the 4x4x24 map is every 24th row of the dense kernel.
    assert ("hidden/kernel", 0, "in", 0, 24, 24) in _members(_group(groups, "mix/kernel:3"))
    # Input and output channels cannot change: left whole, with the reason.
    assert "input" in _group(groups, "stem/kernel:2").reason
    assert "output" in _group(groups, "head/kernel:1").reason


def test_one_shot_masks_are_the_group_norm_ranking(channel_net):
    pm = graphprune.prune(channel_net, graphprune.ConstantSparsity(0.5, 0), structure="channel", one_shot=True)
    live = pm.variables_by_key
    w1, w2 = live["hidden/kernel"].numpy(), live["head/kernel"].numpy()
    # hidden's neurons: L2 norm over the group's kernels (hidden's column and head's row), 16 of 32 kept.
    original = tf.saved_model.load(channel_net)
    score = np.sqrt(np.sum(np.square(original.hidden.numpy()), 0) + np.sum(np.square(original.head.numpy()), 1))
    kept = np.zeros(32, bool)
    kept[np.argsort(-score, kind="stable")[:16]] = True
    assert np.array_equal(np.any(w1 != 0, axis=0), kept)
    assert np.array_equal(np.any(w2 != 0, axis=1), kept)
    # A channel removed from the residual stream is removed from all five kernels at once.
    stream = {k: live[k].numpy() for k in ("stem/kernel", "block/project/kernel")}
    dead = ~np.any(stream["stem/kernel"] != 0, axis=(0, 1, 2))
    assert dead.sum() == 8
    assert not np.any(stream["block/project/kernel"][..., dead])
    for key in ("block/expand/kernel", "left/kernel", "right/kernel"):
        assert not np.any(live[key].numpy()[:, :, dead, :]), key


def _kernel_shapes(path):
    """Shapes of every kernel operand in a SavedModel's default entry (variables or constants); a
    1x1 conv's kernel that finalize's pointwise_matmul reads as a matrix (a MatMul of a Reshape of
    [1, 1, Cin, Cout]) counts as the kernel it reshapes."""
    from graphprune.load import load

    model = load(path).model
    entry = next(e for e in model.entries if e.kind == "signature")
    shapes = channels._static_shapes(entry, model)
    nodes = {node.name: node for node in entry.graph_def.node}

    def shape(ref):
        name, _, index = ref.partition(":")
        return tuple(shapes[(name, int(index or 0))])

    found = []
    for node in entry.graph_def.node:
        if node.op in KERNEL_OPS:
            kernel = shape(node.input[1])
            producer = nodes.get(node.input[1].split(":")[0])
            if node.op == "MatMul" and producer is not None and producer.op == "Reshape":
                stored = shape(producer.input[0])
                kernel = stored if stored[:2] == (1, 1) and stored[2:] == kernel else kernel
            found.append(kernel)
    return Counter(found)


def _predicted_shapes(pm):
    """Each masked kernel's shape once every all-zero slice of its mask is removed."""
    shapes = []
    for row in pm.weights():
        mask = pm.variables_by_key[names.mask_key(row["name"])].numpy()
        shapes.append(tuple(int(np.any(np.moveaxis(mask, axis, 0).reshape(mask.shape[axis], -1) != 0, 1).sum())
                            for axis in range(mask.ndim)))
    return Counter(shapes)


def test_shrunk_model_equals_masked_and_has_the_predicted_shapes(channel_net, tmp_path):
    pm = graphprune.prune(channel_net, graphprune.ConstantSparsity(0.5, 0), structure="channel", one_shot=True)
    x = np.random.RandomState(0).standard_normal([4, 8, 8, 3]).astype(np.float32)
    masked = pm(x).numpy()
    out = graphprune.finalize(pm, str(tmp_path / "small"), shrink=True)
    small = tf.saved_model.load(out)
    np.testing.assert_allclose(small(x).numpy(), masked, atol=1e-5 * np.abs(masked).max(), rtol=0)
    # hidden/kernel's rows are 4x4 positions of the 12 kept 'mix' channels: 192 rows.
    assert _kernel_shapes(out) == _predicted_shapes(pm)
    before, after = graphprune.cost(channel_net), graphprune.cost(out)
    assert after.parameters < 0.4 * before.parameters and after.flops < 0.4 * before.flops
    assert check_tflite(out, str(tmp_path / "small.tflite"), x, masked, float(np.abs(masked).max())) == "ok"


def test_shrunk_model_loads_without_graphprune(channel_net, tmp_path):
    pm = graphprune.prune(channel_net, graphprune.ConstantSparsity(0.75, 0), structure="channel", one_shot=True,
                          round_to=4)
    x = np.random.RandomState(0).standard_normal([4, 8, 8, 3]).astype(np.float32)
    out = graphprune.finalize(pm, str(tmp_path / "small"), shrink=True, freeze=False)  # kernels stay variables
    small = tf.saved_model.load(out)
    from graphprune.load import load

    assert {spec.shape for spec in load(out).model.variables.values()} >= {(1, 1, 8, 4), (3, 3, 8, 1), (4,)}
    np.testing.assert_allclose(small(x).numpy(), pm(x).numpy(), atol=1e-5 * np.abs(pm(x).numpy()).max(), rtol=0)
    del small
    code = ("import sys, numpy as np, tensorflow as tf; assert 'graphprune' not in sys.modules; "
            f"m = tf.saved_model.load({out!r}); print(m(np.ones([2, 8, 8, 3], np.float32)).shape)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": ""}, cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().endswith("(2, 10)")
    # round_to=4: every group keeps a multiple of 4 channels (32 -> 8, 16 -> 4, 12 -> 4, 8 -> 4)
    shapes = _kernel_shapes(out)
    assert (1, 1, 8, 4) in shapes and (3, 3, 8, 1) in shapes  # project: 8 expanded -> 4 stream; depthwise 8


def _sgd_step(pm, x, rate: float = 0.01) -> None:
    """One plain gradient step on the mean squared output (every trainable variable gets a
    gradient), then the mask update."""
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(pm(x)))
    gradients = tape.gradient(loss, pm.trainable_variables)
    assert all(g is not None for g in gradients)
    for variable, gradient in zip(pm.trainable_variables, gradients):
        variable.assign_sub(rate * tf.convert_to_tensor(gradient))
    pm.update_masks()


def test_training_removes_channels_gradually_and_gradients_flow(channel_net):
    schedule = graphprune.PolynomialDecay(0.0, 0.5, begin_step=0, end_step=4, frequency=1)
    pm = graphprune.prune(channel_net, schedule, structure="channel", importance="l1")
    x = np.random.RandomState(1).standard_normal([8, 8, 8, 3]).astype(np.float32)
    alive = []
    for _ in range(5):
        _sgd_step(pm, x)
        alive.append(int(np.any(pm.variables_by_key["hidden/kernel"].numpy() != 0, axis=0).sum()))
    assert alive == sorted(alive, reverse=True) and alive[0] > alive[-1] == 16


def _numpy_scores(group, live):
    """The group's per-channel L2 norm over its kernels, from the weights' values (NumPy)."""
    total = np.zeros(group.size)
    for m in group.members:
        if m.kind != "variable" or m.role == "param":
            continue
        array = np.asarray(live[m.name], np.float64)
        per = np.square(np.moveaxis(array, m.axis, 0)).reshape(array.shape[m.axis], -1).sum(1)
        if m.period is not None:
            per = per.reshape(-1, m.period).sum(0)
        total += per[m.start:m.stop]
    return np.sqrt(total)


def _kept_channels(group, pruned):
    """Which of the group's channels the pruned weights still use (any consumer row non-zero)."""
    used = np.zeros(group.size, bool)
    for m in group.members:
        if m.role == "in":
            array = pruned[m.name]
            per = np.any(np.moveaxis(array, m.axis, 0).reshape(array.shape[m.axis], -1) != 0, 1)
            if m.period is not None:
                per = per.reshape(-1, m.period).any(0)
            used |= per[m.start:m.stop]
    return used


def test_global_ranking_is_one_threshold_over_normalized_group_scores(channel_net, tmp_path):
    pm = graphprune.prune(channel_net, graphprune.ConstantSparsity(0.5, 0), structure="channel", scope="global",
                          one_shot=True)
    original = {v.name.split(":")[0]: v.numpy() for v in ChannelNet().variables}  # the fixture's weights
    pruned = {key: variable.numpy() for key, variable in pm.variables_by_key.items()}
    groups = [group for group in graphprune.channel_groups(channel_net) if group.prunable]
    normalized, kept = [], []
    for group in groups:
        score = _numpy_scores(group, original)
        normalized.append(score / score.mean())
        kept.append(_kept_channels(group, pruned))
    normalized, kept = np.concatenate(normalized), np.concatenate(kept)
    # One ranking over every prunable channel: half of them kept, and they are the best-scored.
    assert kept.sum() == round(0.5 * kept.size)
    assert normalized[kept].min() > normalized[~kept].max()
    # The widths differ from layer-wise pruning's even halves, and the shrunk model is exact.
    per_group = [int(_kept_channels(group, pruned).sum()) for group in groups]
    assert per_group != [max(1, round(group.size / 2)) for group in groups]
    x = np.random.RandomState(0).standard_normal([4, 8, 8, 3]).astype(np.float32)
    masked = pm(x).numpy()
    small = tf.saved_model.load(graphprune.finalize(pm, str(tmp_path / "small"), shrink=True))
    np.testing.assert_allclose(small(x).numpy(), masked, atol=1e-5 * np.abs(masked).max(), rtol=0)


def test_per_weight_channel_sparsity_while_training(channel_net):
    """A rule's sparsity is its group's (the group of hidden's neurons: 25% instead of 50%), the
    update removes it at the config schedule's steps, and the other groups follow the schedule."""
    schedule = graphprune.PolynomialDecay(0.0, 0.5, begin_step=0, end_step=3, frequency=1)
    for scope in ("layer", "global"):
        pm = graphprune.prune(channel_net, schedule, structure="channel", scope=scope,
                              rules=[graphprune.Rule("hidden/kernel", sparsity=0.25)])
        hidden = []
        for _ in range(4):
            pm.update_masks()
            hidden.append(int(np.any(pm.variables_by_key["hidden/kernel"].numpy() != 0, axis=0).sum()))
        assert hidden == sorted(hidden, reverse=True) and hidden[0] > hidden[-1] == 24, (scope, hidden)
        pruned = {key: variable.numpy() for key, variable in pm.variables_by_key.items()}
        groups = [group for group in graphprune.channel_groups(channel_net) if group.prunable]
        others = [_kept_channels(group, pruned) for group in groups if group.name != "hidden/kernel:1"]
        if scope == "layer":
            assert [int(k.sum()) for k in others] == [max(1, round(k.size / 2)) for k in others]
        else:
            assert sum(int(k.sum()) for k in others) == round(0.5 * sum(k.size for k in others))


def test_a_skipped_kernel_keeps_its_groups_whole(channel_net, tmp_path):
    """exclude= a producer (left) or a consumer (hidden): no channel of their groups goes, in
    the masks or in the shrunk model; the other groups are pruned."""
    pm = graphprune.prune(channel_net, graphprune.ConstantSparsity(0.5, 0), structure="channel", one_shot=True,
                          exclude="left/kernel|hidden/kernel")
    live = {key: variable.numpy() for key, variable in pm.variables_by_key.items()}
    original = {v.name.split(":")[0]: v.numpy() for v in ChannelNet().variables}
    np.testing.assert_array_equal(live["left/kernel"], original["left/kernel"])
    assert np.all(np.any(live["mix/kernel"][:, :, :8, :] != 0, axis=(0, 1, 3)))  # left's slice of mix's rows
    assert np.all(np.any(live["mix/kernel"] != 0, axis=(0, 1, 2)))  # mix's outputs feed the skipped hidden
    assert not np.all(np.any(live["right/kernel"] != 0, axis=(0, 1, 2)))  # right is still pruned
    out = graphprune.finalize(pm, str(tmp_path / "small"), shrink=True)
    shapes = _kernel_shapes(out)
    assert (3, 3, 16, 8) in shapes and (1, 1, 14, 24) in shapes, shapes  # left whole; right 12 -> 6


class FlowNet(tf.Module):
    """Channels through control flow: a tf.cond whose branches read different kernels (their
    output channels meet at the If's output), then a tf.while_loop whose body runs a residual
    MLP on the carried state (carried channels: the loop's input, argument, return and output).
    ``leak`` adds a Sum over the carried channels inside the loop, so they must stay whole."""

    def __init__(self, leak: bool = False):
        super().__init__()
        rng = np.random.RandomState(0)

        def kernel(rows, columns, name):
            return tf.Variable((rng.standard_normal([rows, columns]) / np.sqrt(rows)).astype(np.float32), name=name)

        self.leak = leak
        self.w_in, self.w_a, self.w_b = (kernel(6, 16, "in/kernel"), kernel(16, 12, "a/kernel"),
                                         kernel(16, 12, "b/kernel"))
        self.w1, self.w2, self.w_out = (kernel(12, 20, "loop1/kernel"), kernel(20, 12, "loop2/kernel"),
                                        kernel(12, 4, "out/kernel"))
        self.b1 = tf.Variable(rng.standard_normal(20).astype(np.float32) * 0.1, name="loop1/bias")

    @tf.function(input_signature=[tf.TensorSpec([None, 6], tf.float32), tf.TensorSpec([], tf.bool)])
    def __call__(self, x, flag):
        h = tf.nn.relu(x @ self.w_in)
        y = tf.cond(flag, lambda: tf.nn.relu(h @ self.w_a), lambda: tf.tanh(h @ self.w_b))

        def body(i, y):
            y = y + tf.nn.relu(y @ self.w1 + self.b1) @ self.w2
            if self.leak:
                y = y + tf.reduce_sum(y, axis=-1, keepdims=True)
            return i + 1, y

        _, y = tf.while_loop(lambda i, y: i < 3, body, [tf.constant(0), y])
        return y @ self.w_out


@pytest.mark.parametrize("leak", [False, True])
def test_groups_through_loops_and_branches(tmp_path, leak):
    path = str(tmp_path / "flow")
    tf.saved_model.save(FlowNet(leak), path)
    groups = {group.name: group for group in graphprune.channel_groups(path)}
    members = {name: {(m.name, m.axis, m.role) for m in group.members} for name, group in groups.items()}
    assert members["in/kernel:1"] == {("in/kernel", 1, "out"), ("a/kernel", 0, "in"), ("b/kernel", 0, "in")}
    assert members["loop1/kernel:1"] == {("loop1/kernel", 1, "out"), ("loop1/bias", 0, "param"),
                                         ("loop2/kernel", 0, "in")}
    assert members["a/kernel:1"] == {("a/kernel", 1, "out"), ("b/kernel", 1, "out"), ("loop1/kernel", 0, "in"),
                                     ("loop2/kernel", 1, "out"), ("out/kernel", 0, "in")}
    assert groups["in/kernel:1"].prunable and groups["loop1/kernel:1"].prunable
    assert groups["a/kernel:1"].prunable != leak
    if leak:
        assert "Sum" in groups["a/kernel:1"].reason

    pm = graphprune.prune(path, graphprune.ConstantSparsity(0.5, 0), structure="channel", one_shot=True)
    x = np.random.RandomState(1).standard_normal([5, 6]).astype(np.float32)
    masked = {flag: pm(x, tf.constant(flag)).numpy() for flag in (True, False)}
    out = graphprune.finalize(pm, str(tmp_path / "small"), shrink=True)
    small = tf.saved_model.load(out)
    for flag, expected in masked.items():
        np.testing.assert_allclose(small(x, tf.constant(flag)).numpy(), expected,
                                   atol=1e-5 * np.abs(expected).max(), rtol=0)
    # Parameters and FLOPs count the kernels inside the branches and the loop body.
    shapes = _predicted_shapes(pm)
    kept_bias = int(np.any(pm.variables_by_key["loop1/kernel"].numpy() != 0, axis=0).sum())  # loop1's neurons
    before, after = graphprune.cost(path), graphprune.cost(out)
    assert before.parameters == 6 * 16 + 2 * 16 * 12 + 2 * 12 * 20 + 20 + 12 * 4
    assert after.parameters == sum(int(np.prod(shape)) * count for shape, count in shapes.items()) + kept_bias
    assert before.flops == 2 * (6 * 16 + 2 * 16 * 12 + 2 * 12 * 20 + 12 * 4)
    assert after.flops < (0.5 if not leak else 0.7) * before.flops
    for flag, expected in masked.items():  # LiteRT runs the shrunk loop and branches alike
        inputs = {"x": x, "flag": np.array(flag)}
        outcome = check_tflite(out, str(tmp_path / f"small_{flag}.tflite"), inputs, {"output_0": expected},
                               float(np.abs(expected).max()))
        assert outcome == "ok", outcome


class ReshapedHeads(tf.Module):
    """Attention-style projections as Keras's EinsumDense runs them on TensorFlow: kernels
    [D, heads, head_dim] reshaped for a BatchMatMul, the result split into heads and merged
    back before the output projection. ``leak`` also reads the merged tensor with an op that
    mixes its heads (a Sum over the merged axis), so the heads must be left whole."""

    def __init__(self, leak: bool = False):
        super().__init__()
        rng = np.random.RandomState(0)
        self.leak = leak
        self.wq = tf.Variable(rng.randn(8, 4, 3).astype(np.float32), name="q/kernel")
        self.bq = tf.Variable(rng.randn(4, 3).astype(np.float32), name="q/bias")
        self.wo = tf.Variable(rng.randn(4, 3, 8).astype(np.float32), name="o/kernel")
        self.w2 = tf.Variable(rng.randn(8, 5).astype(np.float32), name="out/kernel")

    @tf.function(input_signature=[tf.TensorSpec([None, 6, 8], tf.float32)])
    def __call__(self, x):
        q = tf.matmul(x, tf.reshape(self.wq, [8, -1]))  # [b, 6, heads * head_dim]
        q = tf.nn.relu(tf.reshape(q, [-1, 6, 4, 3]) + self.bq)
        merged = tf.reshape(q, [-1, 6, 12])
        y = tf.nn.relu(tf.matmul(merged, tf.reshape(self.wo, [-1, 8])))
        if self.leak:
            y = y + tf.reduce_sum(merged, axis=-1, keepdims=True)
        return tf.matmul(y, self.w2)


@pytest.mark.parametrize("leak", [False, True])
def test_heads_through_reshaped_kernels_are_removed_or_left_whole(tmp_path, leak):
    from graphprune.load import load

    module = ReshapedHeads(leak)
    pm = graphprune.prune(module, graphprune.ConstantSparsity(0.5, 0), structure="channel", one_shot=True)
    groups = {g.name: g for g in graphprune.channel_groups(pm)}
    assert groups["q/kernel:1"].prunable is not leak and groups["q/kernel:1"].size == 4
    assert {(m.name, m.axis, m.role) for m in groups["q/kernel:1"].members} == {
        ("q/kernel", 1, "out"), ("q/bias", 0, "param"), ("o/kernel", 0, "in")}
    assert groups["q/kernel:2"].prunable is not leak and groups["q/kernel:2"].size == 3
    if leak:  # the merged axis is followed as one axis of heads x head dims, up to the Sum over it
        assert "Sum 'Sum' reduces over the channels" in groups["q/kernel:1"].reason
    x = tf.constant(np.random.RandomState(1).randn(2, 6, 8).astype(np.float32))
    masked = pm(x).numpy()
    out = graphprune.finalize(pm, str(tmp_path / "small"), shrink=True, freeze=False)
    np.testing.assert_allclose(tf.saved_model.load(out)(x).numpy(), masked, atol=1e-5 * np.abs(masked).max())
    shapes = {key: tuple(spec.shape) for key, spec in load(out).model.variables.items()}
    heads, head_dim = (4, 3) if leak else (2, 2)
    assert shapes["q/kernel"] == (8, heads, head_dim) and shapes["q/bias"] == (heads, head_dim)
    assert shapes["o/kernel"] == (heads, head_dim, 4) and shapes["out/kernel"] == (4, 5)


class SplitHeads(tf.Module):
    """Attention over plain 2-D dense kernels, as TF tutorials and Hugging Face's TF models write
    it: q, k, v = x @ W, split into [batch, tokens, heads, head_dim] by tf.reshape (a shape packed
    from tf.shape), transposed, attended, merged back and projected by a 2-D kernel. ``concat``
    also concatenates the query projection with x (a slice of its channels), so its split cannot
    be followed: the heads stay whole."""

    heads, head_dim, width = 4, 6, 16

    def __init__(self, concat: bool = False):
        super().__init__()
        rng = np.random.RandomState(0)
        inner = self.heads * self.head_dim

        def kernel(rows, columns, name):
            return tf.Variable((rng.standard_normal([rows, columns]) / np.sqrt(rows)).astype(np.float32), name=name)

        self.concat = concat
        self.wq, self.wk, self.wv = (kernel(self.width, inner, f"{n}/kernel") for n in "qkv")
        self.bq = tf.Variable(rng.standard_normal(inner).astype(np.float32), name="q/bias")
        self.wo = kernel(inner, self.width, "o/kernel")
        self.head = kernel(self.width + (inner + self.width if concat else 0), 3, "head/kernel")

    @tf.function(input_signature=[tf.TensorSpec([None, None, 16], tf.float32)])
    def __call__(self, x):
        batch = tf.shape(x)[0]

        def split(t):
            return tf.transpose(tf.reshape(t, [batch, -1, self.heads, self.head_dim]), [0, 2, 1, 3])

        query = tf.matmul(x, self.wq) + self.bq
        q, k, v = split(query), split(tf.matmul(x, self.wk)), split(tf.matmul(x, self.wv))
        attention = tf.nn.softmax(tf.matmul(q, k, transpose_b=True) / np.sqrt(self.head_dim), axis=-1)
        context = tf.transpose(tf.matmul(attention, v), [0, 2, 1, 3])
        y = x + tf.matmul(tf.reshape(context, [batch, -1, self.heads * self.head_dim]), self.wo)
        if self.concat:
            y = tf.concat([y, query, x], axis=-1)
        return tf.matmul(tf.reduce_mean(y, 1), self.head)


@pytest.mark.parametrize("concat", [False, True])
def test_heads_split_from_dense_kernels(tmp_path, concat):
    """Heads split out of a 2-D kernel's columns: whole heads go from q, k, v (blocks of
    head_dim columns), the q bias and the output projection's rows; v's head dims (every
    head_dim-th column) with the output rows they feed; q's and k's head dims (their scores end in
    a softmax). Masked == shrunk, the predicted shapes,
    gradients while training, TFLite; with the split query also concatenated, all stay whole."""
    path = str(tmp_path / "split")
    tf.saved_model.save(SplitHeads(concat), path)
    x = tf.constant(np.random.RandomState(1).standard_normal([2, 5, 16]).astype(np.float32))
    pm = graphprune.prune(path, graphprune.PolynomialDecay(0.0, 0.5, 0, 2, frequency=1), structure="channel")
    groups = graphprune.channel_groups(pm)
    heads = next(g for g in groups if g.size == 4)
    expected = {("k/kernel", 1, "out", 6), ("v/kernel", 1, "out", 6), ("o/kernel", 0, "in", 6)}
    if not concat:  # the query's split is followed too
        expected |= {("q/kernel", 1, "out", 6), ("q/bias", 0, "param", 6)}
    assert {(m.name, m.axis, m.role, m.block) for m in heads.members} == expected
    dims = next(g for g in groups if g.size == 6 and any(m.name == "v/kernel" for m in g.members))
    assert {(m.name, m.role, m.period) for m in dims.members} == {("v/kernel", "out", 6), ("o/kernel", "in", 6)}
    assert heads.prunable is not concat and dims.prunable
    if concat:
        assert "split into heads and sliced" in heads.reason
    for _ in range(3):
        _sgd_step(pm, x)
    q_mask = pm.variables_by_key[names.mask_key("q/kernel")].numpy()
    q_columns = q_mask.reshape(16, 4, 6).any(axis=0)  # head x head dim
    if not concat:  # whole heads go, and the same 3 of 6 query/key head dims from every head left
        kept = q_columns.any(axis=1)
        assert kept.sum() == 2 and (q_columns[kept] == q_columns[kept][0]).all() and q_columns[kept][0].sum() == 3
    masked = pm(x).numpy()
    out = graphprune.finalize(pm, str(tmp_path / "small"), shrink=True)
    np.testing.assert_allclose(tf.saved_model.load(out)(x).numpy(), masked, atol=1e-5 * np.abs(masked).max(), rtol=0)
    heads_kept, v_dims, qk_dims = (4, 3, 6) if concat else (2, 3, 3)
    assert _weight_shape(out, "q/kernel") == _weight_shape(out, "k/kernel") == (16, heads_kept * qk_dims)
    assert _weight_shape(out, "v/kernel") == (16, heads_kept * v_dims)
    assert _weight_shape(out, "o/kernel") == (heads_kept * v_dims, 16)
    assert check_tflite(out, str(tmp_path / "small.tflite"), x.numpy(), masked, float(np.abs(masked).max())) == "ok"


def test_what_cannot_be_shrunk_is_left_whole_and_reported(tmp_path):
    class Normalized(tf.Module):
        def __init__(self):
            rng = np.random.RandomState(0)
            self.a = tf.Variable(rng.standard_normal([6, 16]).astype(np.float32), name="a/kernel")
            self.b = tf.Variable(rng.standard_normal([16, 16]).astype(np.float32), name="b/kernel")
            self.c = tf.Variable(rng.standard_normal([16, 4]).astype(np.float32), name="c/kernel")
            self.d = tf.Variable(rng.standard_normal([6, 16]).astype(np.float32), name="d/kernel")

        @tf.function(input_signature=[tf.TensorSpec([None, 6], tf.float32)])
        def __call__(self, x):
            h = tf.nn.softmax(tf.matmul(x, self.a))  # softmax over the channels: all of them count
            g = tf.matmul(h, self.b) + tf.matmul(x, self.d)  # a stream: two kernels write it
            g = g - tf.reduce_mean(g, axis=-1, keepdims=True)  # layer-norm style mean over channels
            return tf.matmul(g, self.c)

    tf.saved_model.save(Normalized(), str(tmp_path / "m"))
    groups = graphprune.channel_groups(str(tmp_path / "m"))
    assert not any(group.prunable for group in groups)
    assert "Softmax" in _group(groups, "a/kernel:1").reason
    assert "reduces over the channels" in _group(groups, "b/kernel:1").reason
    assert "residual_stream=True" in _group(groups, "b/kernel:1").reason
    with pytest.warns(UserWarning, match="no channel group can be removed safely"):
        pm = graphprune.prune(str(tmp_path / "m"), graphprune.ConstantSparsity(0.5, 0), structure="channel",
                              one_shot=True)
    assert pm.sparsity() == 0.0  # nothing safe to remove, nothing masked
    out = graphprune.finalize(pm, str(tmp_path / "f"), shrink=True)
    assert graphprune.cost(out).parameters == graphprune.cost(str(tmp_path / "m")).parameters


def test_keras_functional_flatten_into_dense(tmp_path):
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3), name="image")
    x = keras.layers.Conv2D(16, 3, activation="relu", name="conv")(inputs)  # named: Keras numbers repeats
    x = keras.layers.BatchNormalization(name="norm")(x)
    x = keras.layers.DepthwiseConv2D(3, activation="relu", name="depthwise")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(32, activation="swish", name="hidden")(x)
    model = keras.Model(inputs, keras.layers.Dense(4, name="head")(x))
    model.export(str(tmp_path / "export"), verbose=False)
    pm = graphprune.prune(str(tmp_path / "export"), graphprune.ConstantSparsity(0.5, 0), structure="channel",
                          one_shot=True)
    groups = {group.name: group for group in graphprune.channel_groups(pm)}
    conv = groups["conv/kernel:3"]
    assert conv.prunable and ("hidden/kernel", 0, "in", 0, 16, 16) in _members(conv)  # 4x4 positions x 16
    x = np.random.RandomState(0).standard_normal([3, 8, 8, 3]).astype(np.float32)
    masked = pm.serve(x).numpy()
    out = graphprune.finalize(pm, str(tmp_path / "small"), shrink=True)
    small = tf.saved_model.load(out)  # held: its variables live as long as it does
    np.testing.assert_allclose(small.serve(x).numpy(), masked, atol=1e-5 * np.abs(masked).max(), rtol=0)
    assert _kernel_shapes(out) == _predicted_shapes(pm)


def test_keras_conv1d_channels_into_a_flatten(tmp_path):
    """Keras's Conv1D runs as a Conv2D on ExpandDims of its input and of its kernel [k, in, out]: the
    kernel's axes are followed through the view, and a [N, steps, C] flatten into a dense kernel
    makes each channel every C-th row."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((12, 3), name="signal")
    x = keras.layers.Conv1D(8, 3, activation="relu", name="conv1")(inputs)
    x = keras.layers.Conv1D(6, 3, padding="causal", dilation_rate=2, activation="relu", name="conv2")(x)
    x = keras.layers.Dense(10, activation="relu", name="hidden")(keras.layers.Flatten(name="flatten")(x))
    model = keras.Model(inputs, keras.layers.Dense(4, name="head")(x))
    model.export(str(tmp_path / "export"), verbose=False)
    pm = graphprune.prune(str(tmp_path / "export"), graphprune.ConstantSparsity(0.5, 0), structure="channel",
                          one_shot=True)
    groups = {group.name: group for group in graphprune.channel_groups(pm)}
    assert groups["conv1/kernel:2"].prunable and ("conv2/kernel", 1, "in", 0, 8, None) in _members(groups["conv1/kernel:2"])
    conv2 = groups["conv2/kernel:2"]
    assert conv2.prunable and ("hidden/kernel", 0, "in", 0, 6, 6) in _members(conv2), graphprune.channels.describe([conv2])
    x = np.random.RandomState(0).standard_normal([3, 12, 3]).astype(np.float32)
    masked = pm.serve(x).numpy()
    out = graphprune.finalize(pm, str(tmp_path / "small"), shrink=True)
    small = tf.saved_model.load(out)
    np.testing.assert_allclose(small.serve(x).numpy(), masked, atol=1e-5 * np.abs(masked).max(), rtol=0)
    assert _weight_shape(out, "conv1/kernel") == (3, 3, 4) and _weight_shape(out, "conv2/kernel") == (3, 4, 3)
    assert _weight_shape(out, "hidden/kernel") == (10 * 3, 5)
    assert graphprune.cost(out).parameters == _predicted_parameters(pm)


def test_pixel_shuffle_channels(tmp_path):
    """DepthToSpace (a sub-pixel convolution's pixel shuffle) and SpaceToDepth: the deep side's
    channel i is block position i // C and channel i % C of the shallow side. A channel of the
    shuffled image goes with its 4 copies in the conv before it (every 6th output), and the next
    conv's input; a stem channel moved into depth goes with its 4 rows of the next kernel; the
    block positions stay, and the input image's channels, moved into depth first, stay whole."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 3), name="image")
    x = keras.layers.Lambda(lambda t: tf.nn.space_to_depth(t, 2), name="to_depth")(inputs)  # 8 x 8 x 12
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="stem")(x)
    x = keras.layers.Lambda(lambda t: tf.nn.space_to_depth(t, 2), name="deeper")(x)  # 4 x 4 x (4 x 16)
    x = keras.layers.Conv2D(24, 3, padding="same", name="subpixel")(x)  # 4 positions x 6 channels
    x = keras.layers.Lambda(lambda t: tf.nn.depth_to_space(t, 2), name="shuffle")(x)  # 8 x 8 x 6
    x = keras.layers.Conv2D(8, 3, activation="relu", name="after")(x)
    x = keras.layers.Dense(3, name="head")(keras.layers.GlobalAveragePooling2D()(x))
    keras.Model(inputs, x).export(str(tmp_path / "export"), verbose=False)
    pm = graphprune.prune(str(tmp_path / "export"), graphprune.ConstantSparsity(0.5, 0), structure="channel",
                          one_shot=True)
    groups = graphprune.channel_groups(pm)
    assert sorted(group.size for group in groups if group.prunable) == [6, 8, 16], channels.describe(groups)
    shuffled = next(group for group in groups if group.prunable and group.size == 6)
    assert ("after/kernel", 2, "in", 0, 6, None) in _members(shuffled), channels.describe([shuffled])
    stem = next(group for group in groups if group.prunable and group.size == 16)
    assert ("subpixel/kernel", 2, "in", 0, 16, 16) in _members(stem), channels.describe([stem])
    assert any(not group.prunable and "moves them into space" in group.reason for group in groups)
    x = np.random.RandomState(0).rand(3, 16, 16, 3).astype(np.float32)
    masked = pm.serve(x).numpy()
    out = graphprune.finalize(pm, str(tmp_path / "small"), shrink=True)
    small = tf.saved_model.load(out)
    np.testing.assert_allclose(small.serve(x).numpy(), masked, atol=1e-5 * np.abs(masked).max(), rtol=0)
    assert _weight_shape(out, "subpixel/kernel") == (3, 3, 32, 12) and _weight_shape(out, "after/kernel") == (3, 3, 3, 4)
    assert graphprune.cost(out).parameters == _predicted_parameters(pm)
    assert check_tflite(out, str(tmp_path / "small.tflite"), x, masked, float(np.abs(masked).max())) == "ok"


class DeadBranch(tf.Module):
    """A product computed for nothing beside the one returned."""

    def __init__(self):
        self.w = tf.Variable(np.ones([6, 5], np.float32))
        self.unused = tf.Variable(np.ones([6, 7], np.float32))

    @tf.function(input_signature=[tf.TensorSpec([None, 6], tf.float32)])
    def __call__(self, x):
        tf.matmul(x, self.unused)  # traced into the graph, never run
        return tf.matmul(x, self.w)


def test_cost_counts_what_runs(tmp_path):
    module = DeadBranch()
    tf.saved_model.save(module, str(tmp_path / "dead"))
    cost = graphprune.cost(str(tmp_path / "dead"))
    assert (cost.parameters, cost.flops, cost.non_trainable) == (30, 2 * 30, 0)

    import keras  # Keras 3 on TensorFlow runs one cell step outside the loop to probe the RNN's shapes

    keras.utils.set_random_seed(0)
    inputs = keras.Input((5, 3))
    x = keras.layers.LSTM(4)(inputs)
    keras.Model(inputs, keras.layers.Dense(2)(x)).export(str(tmp_path / "lstm"), verbose=False)
    export = graphprune.cost(str(tmp_path / "lstm"))
    finalized = graphprune.cost(graphprune.finalize(graphprune.prune(str(tmp_path / "lstm")), str(tmp_path / "f")))
    assert export.flops == finalized.flops == 2 * (3 * 16 + 4 * 16 + 4 * 2)  # one step in the loop, and the head
    assert export.parameters == finalized.parameters == (3 + 4 + 1) * 16 + (4 + 1) * 2


@pytest.mark.parametrize("kwargs, message", [
    ({"structure": "channel", "block_size": (1, 2)}, "leave block_size"),
    ({"structure": "rows"}, "structure must be"),
    ({"structure": "channel", "importance": "l3"}, "importance must be"),
    ({"structure": "channel", "round_to": 0}, "round_to"),
    ({"residual_stream": True}, "needs structure='channel'"),
    ({"structure": "channel", "residual_stream": "yes"}, "residual_stream must be True or False"),
    ({"structure": "channel", "rules": [graphprune.Rule("hidden", structure=graphprune.Structure(block_size=(1, 2)))]},
     "cannot change the structure"),
    ({"structure": "channel", "rules": [graphprune.Rule("hidden", sparsity=graphprune.ConstantSparsity(0.2, 0))]},
     "must be a number"),
])
def test_bad_channel_settings_are_one_line_errors(channel_net, kwargs, message):
    with pytest.raises(StructureError, match=message):
        graphprune.prune(channel_net, graphprune.ConstantSparsity(0.5, 0), **kwargs)


def test_cli_prune_channels_finalize_shrink_inspect(channel_net, tmp_path):
    _cli("prune", f"--input={channel_net}", f"--output={tmp_path / 'p'}", "--structure=channel",
         "--final_sparsity=0.5", "--one_shot", "--round_to=2", "--scope=global", "--sparsity_for=hidden=0.25")
    printed = _cli("finalize", f"--input={tmp_path / 'p'}", f"--output={tmp_path / 'f'}", "--shrink")
    assert "shrink: parameters" in printed
    printed = _cli("inspect", f"--input={tmp_path / 'f'}", f"--baseline={channel_net}", "--channel_groups")
    assert "x parameters" in printed and "left whole" in printed
    # the finalized model's kernels are constants: shown by the weights they were made from
    listed = printed[printed.index("channels, "):]
    assert "left/kernel[3] out" in listed and "stem/kernel:2: 3 channels, left whole" in printed, printed
    assert "graphprune" not in listed and "PartitionedCall" not in listed, printed
    graphprune.export_tflite(str(tmp_path / "f"), str(tmp_path / "f.tflite"))
    refused = subprocess.run([sys.executable, "-m", "graphprune.tools.main", "inspect", f"--input={tmp_path / 'f.tflite'}",
                              f"--baseline={channel_net}"], capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and refused.stderr.strip().count("\n") == 0, refused.stderr[-2000:]
    assert "SavedModel" in refused.stderr


ZOO = {  # name: (builder, input size)
    "ResNet50": ("ResNet50", 32),
    "MobileNetV2": ("MobileNetV2", 32),
    "MobileNetV3Small": ("MobileNetV3Small", 32),
    "EfficientNetB0": ("EfficientNetB0", 32),
    "DenseNet121": ("DenseNet121", 32),
    "ConvNeXtTiny": ("ConvNeXtTiny", 32),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ZOO))
def test_keras_applications_shrink(tmp_path, name):
    import keras

    keras.utils.set_random_seed(0)
    model, x = _calibrated(*ZOO[name])
    model.export(str(tmp_path / "export"), verbose=False)
    scope = "global" if name in ("ResNet50", "DenseNet121") else "layer"  # both rankings on real models
    pm = graphprune.prune(str(tmp_path / "export"), graphprune.ConstantSparsity(0.5, 0), structure="channel",
                          one_shot=True, round_to=8, scope=scope)
    masked = pm.serve(x).numpy()
    scale = float(np.abs(masked).max())
    assert scale > 1e-2, scale  # outputs that mean something
    out = graphprune.finalize(pm, str(tmp_path / "small"), shrink=True)
    small = tf.saved_model.load(out)
    np.testing.assert_allclose(small.serve(x).numpy(), masked, atol=1e-4 * scale, rtol=0)
    assert _kernel_shapes(out) == _predicted_shapes(pm)
    before, after = graphprune.cost(str(tmp_path / "export")), graphprune.cost(out)
    assert after.parameters < before.parameters and after.flops < before.flops
    if name not in ("EfficientNetB0", "ConvNeXtTiny"):  # whose preprocessing constants Keras counts otherwise
        assert before.parameters == model.count_params()
        assert before.non_trainable == sum(int(np.prod(w.shape)) for w in model.non_trainable_weights) > 0
        # the kept channels' batch-norm statistics, or none: those after a kernel are folded into
        # it (finalize's default); DenseNet's, after a concatenation, stay
        assert after.non_trainable < before.non_trainable
    # TFLite float against TF on deep random-weight CNNs: 1e-2 of the scale (see test_zoo_applications)
    outcome = check_tflite(out, str(tmp_path / "small.tflite"), x[:1], masked[:1], scale, tolerance=1e-2)
    assert outcome == "ok", outcome


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bert", "vit"])
def test_keras_hub_transformer_mlp_neurons(tmp_path, name):
    """The MLP's hidden neurons (intermediate kernel's columns, its bias, the output kernel's rows)
    and whole attention heads (query, key and value kernels' head axis, their biases, the output
    projection's head axis; also through ViT's reshaped kernels) are removed; the residual stream (layer norms over it, and an
    output) is left whole. The query/key head dims (contracted between two activations, the
    scores ending in a softmax) go in both: ViT's attention (Keras 3's dot_product_attention)
    also reads the key's head-dim size, and never uses it (it is given the scale)."""
    from test_real_models import _hub_backbones, _hub_vision_backbones, _inputs

    model = (_hub_backbones() if name == "bert" else _hub_vision_backbones())[name]()
    model.export(str(tmp_path / "export"), verbose=False)
    pm = graphprune.prune(str(tmp_path / "export"), graphprune.ConstantSparsity(0.5, 0), structure="channel",
                          one_shot=True)
    groups = graphprune.channel_groups(pm)
    heads = [group for group in groups if {(m.name.split("/")[-2], m.axis, m.role) for m in group.members} >= {
        ("query", 1, "out"), ("key", 1, "out"), ("value", 1, "out"), ("attention_output", 0, "in")}]
    mlp = [group for group in groups if group.prunable and group not in heads
           and not any("attention" in m.name or "mha" in m.name for m in group.members)]
    assert len(mlp) >= 1 and all(group.size == 32 for group in mlp)
    assert not any(group.prunable and any(m.name.endswith("norm/gamma") for m in group.members) for group in groups)
    # BERT runs its projections as Einsum ops; ViT's run as BatchMatMuls on reshaped kernels
    # ([hidden, heads, head_dim] -> [hidden, heads * head_dim]), the heads merged and split again
    layers = 1 if name == "bert" else 2
    assert len(heads) == layers and all(group.prunable and group.size == 2 for group in heads)
    query_key = [group for group in groups if {(m.name.split("/")[-2], m.role) for m in group.members} >= {
        ("query", "out"), ("key", "out")} and group not in heads]
    assert len(query_key) == layers and all(group.size == 8 for group in query_key)
    assert all(group.prunable for group in query_key), graphprune.channels.describe(query_key)
    queries = [v for k, v in pm.variables_by_key.items() if k.endswith("query/kernel")]
    assert len(queries) == layers
    for query in queries:
        assert sorted(np.any(query.numpy() != 0, axis=(0, 2)).tolist()) == [False, True]  # 1 of 2 heads removed
    signature = pm.signatures["serving_default"]
    if name == "bert":
        inputs = _inputs(signature.structured_input_signature[1], np.random.RandomState(0))
    else:
        key = next(iter(signature.structured_input_signature[1]))
        inputs = {key: tf.constant(np.random.RandomState(0).uniform(size=[2, 32, 32, 3]).astype(np.float32))}
    masked = signature(**inputs)
    scale = max(float(np.max(np.abs(v.numpy()))) for v in masked.values())
    small = tf.saved_model.load(graphprune.finalize(pm, str(tmp_path / "small"), shrink=True))
    shrunk = small.signatures["serving_default"](**inputs)
    for key, value in masked.items():
        np.testing.assert_allclose(shrunk[key].numpy(), value.numpy(), atol=1e-5 * scale, rtol=0)
    assert graphprune.cost(str(tmp_path / "small")).parameters < graphprune.cost(str(tmp_path / "export")).parameters
    # a backbone returns its stream: even when asked, its width stays (the output keeps its shape)
    asked = graphprune.prune(str(tmp_path / "export"), graphprune.ConstantSparsity(0.5, 0), structure="channel",
                             residual_stream=True)
    stream = [group for group in graphprune.channel_groups(asked) if any(_norm_parameter(m.name) for m in group.members)]
    assert stream and not any(group.prunable for group in stream)
    assert any("output" in group.reason for group in stream), [group.reason for group in stream]


def _hub_attention_models():
    """keras-hub decoders whose heads reach the attention through what real LLMs use: grouped-query
    attention (Llama: the key/value heads repeated by tf.repeat; Gemma: the query heads split into
    key/value groups), rotary embeddings (split, stacked, reshaped back), GPT-NeoX's fused
    query-key-value kernel sliced three ways with a partial rotary dimension; Qwen3's RMS norm of
    each query and key head over its head dims (a Mean over the last axis, which the heads pass)."""
    import keras_hub

    models = keras_hub.models
    small = dict(vocabulary_size=50, num_layers=1, hidden_dim=16, intermediate_dim=32)
    return {
        "llama": lambda: models.LlamaBackbone(num_query_heads=4, num_key_value_heads=2, **small),
        "gemma": lambda: models.GemmaBackbone(num_query_heads=4, num_key_value_heads=2, head_dim=4, **small),
        "gptneox": lambda: models.GPTNeoXBackbone(num_heads=2, max_sequence_length=8, **small),
        "qwen3": lambda: models.Qwen3Backbone(num_query_heads=4, num_key_value_heads=2, head_dim=4, **small),
    }


def _hub_shrunk_as_masked(pm, tmp_path, inputs=None, check_inputs=None) -> str:
    """Finalize a pruned keras-hub export with shrink=True and check its serving signature computes
    the masked one's outputs (on ``inputs``, by default random token inputs); the shrunk model's
    path. ``check_inputs``: finalize's, for a model its check cannot make inputs for."""
    from test_real_models import _inputs

    signature = pm.signatures["serving_default"]
    if inputs is None:
        inputs = _inputs(signature.structured_input_signature[1], np.random.RandomState(0))
    masked = signature(**inputs)
    # batch norms kept: the masks predict the parameters of the model as it is (folding them is
    # finalize's default, checked on keras.applications in test_keras_applications_shrink)
    out = graphprune.finalize(pm, str(tmp_path / "small"), shrink=True, fold_batch_norms=False,
                              check_inputs=check_inputs)
    shrunk = tf.saved_model.load(out).signatures["serving_default"](**inputs)
    for key, value in masked.items():
        scale = float(np.max(np.abs(value.numpy())))
        np.testing.assert_allclose(shrunk[key].numpy(), value.numpy(), atol=1e-5 * scale, rtol=0)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "gemma", "gptneox", "qwen3"])
def test_keras_hub_grouped_query_and_rotary_heads(tmp_path, name):
    """Whole heads of keras-hub LLM decoders: a key/value head goes with the query heads that share
    it (blocks of the query kernel's head axis and the output projection's); Gemma's query heads
    within each group go too; GPT-NeoX's heads pass its three-way slices and rotary embedding. The
    shrunk model computes what the masked one does, with the kernel shapes the masks predict."""
    _hub_attention_models()[name]().export(str(tmp_path / "export"), verbose=False)
    # round_to counts values: a head of 4 values needs no rounding for 4 (a neuron is rounded)
    pm = graphprune.prune(str(tmp_path / "export"), graphprune.ConstantSparsity(0.5, 0), structure="channel",
                          one_shot=True, round_to=4)
    groups = graphprune.channel_groups(pm)
    key = "self_attention/query_key_value/kernel" if name == "gptneox" else \
        ("attention" if name == "gemma" else "self_attention") + "/key/kernel"
    prefix = "decoder_block_0/" if name == "gemma" else "transformer_layer_0/"
    head_axis = {"llama": 1, "gemma": 0, "gptneox": 1, "qwen3": 1}[name]
    heads = next(group for group in groups if any(m.name == prefix + key and m.axis == head_axis and m.period is None
                                                  for m in group.members))
    assert heads.prunable and heads.size == 2, graphprune.channels.describe([heads])
    if name != "gptneox":
        query = next(m for m in heads.members if m.name.endswith("/query/kernel"))
        assert query.block == 2  # each key/value head's two query heads
    if name == "gemma":  # the query heads within a group, removed from every group alike
        within = [group for group in groups if group.prunable and group.size == 2 and group is not heads and
                  any(m.name.endswith("/query/kernel") and m.period == 2 for m in group.members)]
        assert within, graphprune.channels.describe(groups)
    out = _hub_shrunk_as_masked(pm, tmp_path)
    before = _weight_shape(str(tmp_path / "export"), prefix + key)
    after = _weight_shape(out, prefix + key)
    assert after[head_axis] == before[head_axis] // 2  # one of two key/value heads
    assert graphprune.cost(out).parameters == _predicted_parameters(pm)


class _FixedShapes(tf.Module):
    """A keras-hub backbone called by a tf.function of fixed shapes: how a user hands graphprune a
    model whose Keras export fails (Qwen3.5's gated delta net and RWKV-7's recurrence test a
    symbolic sequence length in Python), and the static signature TFLite users write."""

    def __init__(self, backbone, length=8):
        super().__init__()
        self.backbone = backbone
        specs = {i.name: tf.TensorSpec([1, length], i.dtype) for i in backbone.inputs}
        self.serve = tf.function(lambda inputs: self.backbone(inputs), input_signature=[specs])


def _fixed_shape_models():
    import keras_hub

    models = keras_hub.models
    small = dict(vocabulary_size=64, hidden_dim=32, intermediate_dim=64, num_query_heads=4, num_key_value_heads=2,
                 head_dim=8)
    return {"qwen3": lambda: models.Qwen3Backbone(num_layers=1, **small),
            "qwen3_5": lambda: models.Qwen3_5Backbone(
                num_layers=2, layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
                linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8, **small),
            "qwen3_5_moe": lambda: models.Qwen3_5MoeBackbone(
                num_layers=2, layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
                linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8, moe_intermediate_dim=16,
                shared_expert_intermediate_size=32, num_experts=4, top_k=2,
                **{k: v for k, v in small.items() if k != "intermediate_dim"}),
            "rwkv7": lambda: models.RWKV7Backbone(hidden_size=32, head_size=8, num_layers=2, vocabulary_size=64,
                                                  intermediate_dim=64, gate_lora=8, mv_lora=8, aaa_lora=8,
                                                  decay_lora=8)}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen3", "qwen3_5", "qwen3_5_moe", "rwkv7"])
def test_keras_hub_under_a_static_signature(tmp_path, name):
    """keras-hub decoders in a tf.Module with a fixed [1, 8] signature. Under it tf.shape folds to a
    Const, so tf.repeat (grouped-query attention's key/value heads) reshapes to a shape computed
    from constants: Qwen3's and Qwen3.5's heads were left whole ("Reshape 'Repeat/Reshape_1' uses
    it"), and shrink_channels now writes the shrunk shape as a Const. Qwen3.5 and RWKV-7 cannot be
    exported by Keras at all (nor Qwen3.5-MoE); through the module their MLP and experts' neurons,
    heads, gated query dims and low-rank (LoRA) projections go, and the parts graphprune does not model (the gated delta net's
    chunked recurrence, RWKV's time mix) stay whole with their reasons. The shrunk model computes
    the masked one, with the parameters the masks predict."""
    import keras

    keras.utils.set_random_seed(0)
    module = _FixedShapes(_fixed_shape_models()[name]())
    pm = graphprune.prune(module, graphprune.ConstantSparsity(0.5, 0), structure="channel", one_shot=True)
    groups = graphprune.channel_groups(pm)
    expected = {"qwen3": [2, 2, 4, 8, 64],  # key/value heads, query heads within, rotary pairs, value dims, MLP
                # + the unrotated query/key dims (6 of 8; the 2 rotated stay whole) and the gated query's
                # value dims, and the linear-attention layer's MLP (its gated delta net stays whole)
                "qwen3_5": [2, 2, 6, 8, 64, 64],
                # + the experts' neurons (one index in every expert) and the shared expert's; whole experts
                # stay (the router's softmax over them)
                "qwen3_5_moe": [2, 2, 6, 8, 16, 16, 32, 32],
                # the time mix's low-rank projections (a, g, w; v in the second layer) and the channel
                # mix's neurons; the heads, read by the recurrence's BatchMatMuls, stay whole
                "rwkv7": [8] * 7 + [64] * 2}[name]
    assert sorted(group.size for group in groups if group.prunable) == expected, channels.describe(groups)
    assert all(group.reason for group in groups if not group.prunable)
    inputs = {"token_ids": tf.constant(np.arange(8).reshape(1, 8) * 7 % 64, tf.int32),
              "padding_mask": tf.ones([1, 8], tf.int32)}
    masked = pm.serve(inputs).numpy()
    out = graphprune.finalize(pm, str(tmp_path / "small"), shrink=True)
    loaded = tf.saved_model.load(out)
    shrunk = loaded.serve(inputs).numpy()
    scale = float(np.max(np.abs(masked)))
    assert scale > 1e-2
    np.testing.assert_allclose(shrunk, masked, atol=1e-5 * scale, rtol=0)
    # cost also counts float constants on no channel axis (RWKV's zero states, Qwen3.5's chunk
    # masks), before and after alike
    constants = _constant_parameters(pm, graphprune.cost(module).parameters)
    assert constants == {"qwen3": 0, "qwen3_5": 320, "qwen3_5_moe": 320, "rwkv7": 512}[name]
    assert graphprune.cost(out).parameters == _predicted_parameters(pm) + constants


class _DetectionModule(tf.Module):
    """keras-hub's D-FINE detector called by a tf.function of fixed image shape, returning its tensor
    outputs (Keras's export refuses the model: some outputs are tuples of tensors)."""

    def __init__(self, backbone, size):
        super().__init__()
        self.backbone = backbone
        self.serve = tf.function(self._serve, input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])

    def _serve(self, images):
        outputs = self.backbone(images, training=False)
        return {key: value for key, value in outputs.items() if tf.is_tensor(value)}


def _d_fine():
    """A small D-FINE (keras-hub's docstring example at a quarter of its widths, one decoder layer,
    10 queries, 64x64 images) on an HGNetV2 backbone with learnable affine blocks."""
    import keras_hub

    models = keras_hub.models
    hgnet = models.HGNetV2Backbone(
        stem_channels=[3, 16, 16], stackwise_stage_filters=[[16, 16, 64, 1, 3, 3], [64, 32, 128, 1, 3, 3],
                                                            [128, 32, 128, 1, 3, 5], [128, 32, 128, 1, 3, 5]],
        apply_downsample=[False, True, True, True], use_lightweight_conv_block=[False, False, True, True],
        depths=[1, 1, 1, 1], hidden_sizes=[64, 128, 128, 128], embedding_size=16, use_learnable_affine_block=True,
        hidden_act="relu", image_shape=(64, 64, 3), out_features=["stage3", "stage4"])
    return models.DFineBackbone(
        backbone=hgnet, decoder_in_channels=[32, 32], encoder_hidden_dim=32, num_denoising=0, num_labels=8,
        hidden_dim=32, learn_initial_query=False, num_queries=10, anchor_image_size=(64, 64), feat_strides=[16, 32],
        num_feature_levels=2, encoder_in_channels=[128, 128], encode_proj_layers=[1], num_attention_heads=2,
        encoder_ffn_dim=64, num_encoder_layers=1, hidden_expansion=0.34, depth_multiplier=0.5, eval_idx=-1,
        num_decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64, decoder_n_points=[2, 2],
        lqe_hidden_dim=16, num_lqe_layers=1, out_features=["stage3", "stage4"], image_shape=(64, 64, 3), seed=0)


@pytest.mark.slow
def test_keras_hub_d_fine_detector_shrinks(tmp_path):
    """keras-hub's D-FINE, a detection transformer nobody here wrote: an HGNetV2 backbone, a hybrid
    encoder (CSP blocks, a transformer layer on the last feature map), top-k query selection and a
    decoder with deformable attention (sampling offsets and weights per head and point, a softmax
    over the points, grid sampling as gathers). Its convolutions', MLPs' and heads' channels go; the
    deformable attention's points and the top-k's inputs stay whole, with their reasons. Every
    output of the shrunk model equals the masked one's, with the parameters the masks predict."""
    import keras

    keras.utils.set_random_seed(0)
    module = _DetectionModule(_d_fine(), 64)
    rng = np.random.RandomState(1)
    for weight in module.backbone.weights:  # the box heads' last kernels start at zeros: their outputs
        # would be zeros, and shrink_channels removes every channel only zeros read (keeping one)
        if weight.path.endswith("kernel") and not np.any(weight.numpy()):
            weight.assign(rng.standard_normal(weight.shape).astype(np.float32) * 0.1)
    pm = graphprune.prune(module, graphprune.ConstantSparsity(0.5, 0), structure="channel", one_shot=True)
    groups = graphprune.channel_groups(pm)
    prunable = [group for group in groups if group.prunable]
    assert len(prunable) >= 50, channels.describe(groups)
    assert all(group.reason for group in groups if not group.prunable)
    reasons = " ".join(group.reason for group in groups if not group.prunable)
    assert "Softmax" in reasons and "TopKV2" in reasons, reasons  # the points' weights, the query selection
    images = tf.constant(np.random.RandomState(0).rand(2, 64, 64, 3).astype(np.float32))
    masked = {key: value.numpy() for key, value in pm.serve(images).items()}
    # batch norms kept: the masks predict the parameters of the model as it is
    out = graphprune.finalize(pm, str(tmp_path / "small"), shrink=True, fold_batch_norms=False)
    loaded = tf.saved_model.load(out)  # held: its variables live as long as it does
    shrunk = loaded.serve(images)
    assert sorted(shrunk) == sorted(masked)
    scale = max(float(np.max(np.abs(value))) for value in masked.values())
    assert scale > 1e-2
    for key, value in masked.items():
        np.testing.assert_allclose(shrunk[key].numpy(), value, atol=1e-5 * scale, rtol=0, err_msg=key)
    before = graphprune.cost(module).parameters
    after = graphprune.cost(out).parameters
    assert after == _predicted_parameters(pm) + _constant_parameters(pm, before)
    assert after < 0.35 * before


class _ChannelsFirstPad(tf.Module):
    """A dense layer's channels moved first and the time axis, now last, padded on the left (a
    causal conv over [batch, channels, time], as Qwen3.5's gated delta net pads it), then averaged."""

    def __init__(self):
        super().__init__()
        rng = np.random.RandomState(0)
        self.w1 = tf.Variable(rng.standard_normal([8, 6]).astype(np.float32), name="first/kernel")
        self.w2 = tf.Variable(rng.standard_normal([6, 3]).astype(np.float32), name="second/kernel")

    @tf.function(input_signature=[tf.TensorSpec([5, 8], tf.float32)])
    def __call__(self, x):
        h = tf.nn.relu(tf.matmul(x, self.w1))[:, :, None] * tf.linspace(0.5, 1.5, 4)  # [5, 6 channels, 4 times]
        h = tf.pad(h, [[0, 0], [0, 0], [2, 0]])
        return tf.matmul(tf.reduce_mean(h, axis=-1), self.w2)


def test_a_pad_of_the_last_axis_keeps_the_channels_of_the_others(tmp_path):
    """A Pad of the last axis was "an op graphprune does not model", whatever that axis held: the
    channels before it stayed whole. Now the axes it pads are the ones that stay whole (_settle),
    and channels on the others go through it."""
    pm = graphprune.prune(_ChannelsFirstPad(), graphprune.ConstantSparsity(0.5, 0), structure="channel",
                          one_shot=True)
    group = next(group for group in graphprune.channel_groups(pm)
                 if any(m.name == "first/kernel" and m.axis == 1 for m in group.members))
    assert group.prunable and group.size == 6, channels.describe([group])
    out = _shrunk_as_masked(pm, tmp_path)
    assert _weight_shape(out, "first/kernel") == (8, 3) and _weight_shape(out, "second/kernel") == (3, 3)


class _DeadCache(tf.Module):
    """Keys and values stacked into a cache that nothing returns (a Keras attention layer's
    key/value cache outside generation), then each read by its own projection."""

    def __init__(self):
        super().__init__()
        rng = np.random.RandomState(0)
        self.k = tf.Variable(rng.standard_normal([8, 6]).astype(np.float32), name="key/kernel")
        self.v = tf.Variable(rng.standard_normal([8, 6]).astype(np.float32), name="value/kernel")
        self.ko = tf.Variable(rng.standard_normal([6, 3]).astype(np.float32), name="key_out/kernel")
        self.vo = tf.Variable(rng.standard_normal([6, 3]).astype(np.float32), name="value_out/kernel")

    @tf.function(input_signature=[tf.TensorSpec([None, 8], tf.float32)])
    def __call__(self, x):
        k, v = tf.nn.relu(tf.matmul(x, self.k)), tf.nn.relu(tf.matmul(x, self.v))
        tf.stack([k, v], axis=1)  # the cache, dropped
        return tf.matmul(k, self.ko) + tf.matmul(v, self.vo)


def test_an_op_no_output_needs_couples_no_channels(tmp_path):
    """An op whose result nothing uses never runs, and finalize strips it: the channel analysis
    skips it. A dropped Pack of keys and values tied their channels into one group (keras-hub's
    T5Gemma2 stacks its key/value cache so); now each is its own group, pruned at its own
    sparsity, and the shrunk model keeps a different number of each. shrink_channels strips such ops itself, so a pass list
    without strip_unused writes a model that loads and computes the masked one too."""
    from graphprune.api import run_passes

    pm = graphprune.prune(_DeadCache(), graphprune.ConstantSparsity(0.5, 0), structure="channel", one_shot=True,
                          rules=[graphprune.Rule("value/kernel", sparsity=5 / 6)])
    groups = [group for group in graphprune.channel_groups(pm) if group.prunable]
    assert sorted(sorted(m.name for m in group.members) for group in groups) == [
        ["key/kernel", "key_out/kernel"], ["value/kernel", "value_out/kernel"]], channels.describe(groups)
    out = _shrunk_as_masked(pm, tmp_path)
    assert _weight_shape(out, "key/kernel") == (8, 3) and _weight_shape(out, "value/kernel") == (8, 1)
    graphprune.save(pm, str(tmp_path / "pruned"))
    run_passes(str(tmp_path / "pruned"), "find_weights,fold_masks,shrink_channels", str(tmp_path / "passes"))
    x = np.random.RandomState(1).standard_normal([5, 8]).astype(np.float32)
    masked = pm(x).numpy()
    np.testing.assert_allclose(tf.saved_model.load(str(tmp_path / "passes"))(x).numpy(), masked,
                               atol=1e-5 * np.abs(masked).max(), rtol=0)
    assert _weight_shape(str(tmp_path / "passes"), "value/kernel") == (8, 1)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "gemma", "qwen3"])
def test_keras_hub_rotary_query_key_head_dims(tmp_path, name):
    """Query/key head dims through rotary embeddings: dims i and i + d/2 are rotated together (split
    in halves, stacked, reshaped back), so a pair goes from both projections, and with it its
    inverse frequency (a tf.range of constant bounds, which the shrunk graph gathers the kept
    values of); the scores end in a softmax. Qwen3's RMS norms of each query and key head over its
    dims go with them: each Mean becomes a mean over the kept dims, read off the kernel's mask
    (the kernel's head dims hold the same channels in the same order: channels.channel_ids)."""
    import keras_hub

    models = keras_hub.models
    small = dict(vocabulary_size=50, num_layers=1, hidden_dim=32, intermediate_dim=32)
    model = {"llama": lambda: models.LlamaBackbone(num_query_heads=4, num_key_value_heads=2, **small),
             "gemma": lambda: models.GemmaBackbone(num_query_heads=4, num_key_value_heads=2, head_dim=8, **small),
             "qwen3": lambda: models.Qwen3Backbone(num_query_heads=4, num_key_value_heads=2, head_dim=8, **small),
             }[name]()
    model.export(str(tmp_path / "export"), verbose=False)
    pm = graphprune.prune(str(tmp_path / "export"), graphprune.ConstantSparsity(0.5, 0), structure="channel",
                          one_shot=True)
    key = ("decoder_block_0/attention" if name == "gemma" else "transformer_layer_0/self_attention") + "/key/kernel"
    pairs = next(group for group in graphprune.channel_groups(pm)
                 if any(m.name == key and m.axis == 2 and m.period == 4 for m in group.members))
    assert pairs.size == 4 and any(m.kind == "const" and m.name.endswith("range") for m in pairs.members)
    assert pairs.prunable and pairs.contracted, graphprune.channels.describe([pairs])
    out = _hub_shrunk_as_masked(pm, tmp_path)
    assert _weight_shape(out, key)[2] == 4  # two of four pairs of 8 dims
    assert _weight_shape(out, key.replace("/key/", "/query/"))[2] == 4
    if name == "qwen3":
        norms = [m.name for m in pairs.members if m.kind == "variable" and "layernorm" in m.name]
        assert len(norms) == 2 and all(_weight_shape(out, norm) == (4,) for norm in norms), norms
    assert graphprune.cost(out).parameters == _predicted_parameters(pm)


class _RotaryByHand(tf.Module):
    """Rotary attention as TensorFlow code writes it by hand: tf.range of Cast constant bounds for
    the inverse frequencies, tf.concat (not a stack) for the rotated halves and for the cos/sin
    tables, a single head of 8 dims, and a value path."""

    def __init__(self):
        super().__init__()
        rng = np.random.RandomState(0)
        for name in ("query", "key", "value"):
            setattr(self, name, tf.Variable(rng.standard_normal([8, 8]).astype(np.float32) / 2, name=f"rope/{name}"))
        self.out = tf.Variable(rng.standard_normal([8, 3]).astype(np.float32), name="rope/out")

    @tf.function(input_signature=[tf.TensorSpec([None, 5, 8], tf.float32)])
    def __call__(self, x):
        start, limit = tf.cast(tf.constant(0), tf.float32), tf.cast(tf.constant(8), tf.float32)
        inverse = 1.0 / tf.pow(10000.0, tf.range(start, limit, 2.0) / 8.0)
        angles = tf.range(5, dtype=tf.float32)[:, None] * inverse[None, :]
        return self._attend(x, tf.cos(tf.concat([angles, angles], -1)), tf.sin(tf.concat([angles, angles], -1)))

    def _attend(self, x, cos, sin, bias=0.0):
        def rotate(t):
            first, second = tf.split(t, 2, axis=-1)
            return t * cos + tf.concat([-second, first], -1) * sin

        q = rotate(tf.einsum("btc,cd->btd", x, self.query) + bias)
        k = rotate(tf.einsum("btc,cd->btd", x, self.key) + bias)
        weights = tf.nn.softmax(tf.matmul(q, k, transpose_b=True))
        return tf.einsum("btd,do->bto", tf.matmul(weights, tf.einsum("btc,cd->btd", x, self.value)), self.out)


class _TiledRotary(_RotaryByHand):
    """DINOv3's rotary table: the angles of two coordinates times two frequencies, merged into the
    4 pairs ([N, 2, 2] -> [N, 4]) and tiled twice over the 8 dims, computed from the length at run
    time; the queries and keys have a bias. ``from_values``: the angles are also scaled by a number
    the inputs' values make (no longer a table of constants)."""

    def __init__(self, from_values=False):
        super().__init__()
        self.from_values = from_values
        self.bias = tf.Variable(np.random.RandomState(2).standard_normal([8]).astype(np.float32), name="rope/bias")

    @tf.function(input_signature=[tf.TensorSpec([None, None, 8], tf.float32)])
    def __call__(self, x):
        length = tf.shape(x)[1]
        coordinates = tf.stack([tf.range(length, dtype=tf.float32), tf.cast(tf.range(length) % 3, tf.float32)], -1)
        inverse = 1.0 / tf.pow(100.0, tf.range(2, dtype=tf.float32) / 2.0)
        angles = tf.reshape(coordinates[:, :, None] * inverse[None, None, :], [length, 4])
        if self.from_values:
            angles *= tf.reduce_mean(x)
        table = tf.tile(angles, [1, 2])
        return self._attend(x, tf.cos(table), tf.sin(table), self.bias)


def test_rotary_pairs_by_hand(tmp_path):
    path = str(tmp_path / "model")
    tf.saved_model.save(_RotaryByHand(), path)
    pm = graphprune.prune(path, graphprune.ConstantSparsity(0.5, 0), structure="channel", one_shot=True)
    pairs = next(group for group in graphprune.channel_groups(pm)
                 if any(m.name == "rope/query" and m.axis == 1 for m in group.members))
    assert pairs.prunable and pairs.size == 4, graphprune.channels.describe([pairs])
    # pair i is dims i and i + 4 of both kernels: each kernel's two halves are members
    assert {(m.name, m.start, m.stop) for m in pairs.members if m.kind == "variable"} == {
        (name, start, start + 4) for name in ("rope/query", "rope/key") for start in (0, 4)}
    x = np.random.RandomState(1).standard_normal([2, 5, 8]).astype(np.float32)
    masked = pm(x).numpy()
    out = graphprune.finalize(pm, str(tmp_path / "small"), shrink=True)
    np.testing.assert_allclose(tf.saved_model.load(out)(x).numpy(), masked, atol=1e-5 * np.abs(masked).max(), rtol=0)
    assert _weight_shape(out, "rope/query") == _weight_shape(out, "rope/key") == (8, 4)  # 2 of 4 pairs
    assert graphprune.cost(out).parameters == _predicted_parameters(pm)


@pytest.mark.parametrize("from_values", [False, True])
def test_rotary_pairs_of_a_tiled_table(tmp_path, from_values):
    """A rotary table tiled over the head dims from angles no slice can cut a pair out of (DINOv3's:
    two coordinates times the frequencies, merged) kept the pairs whole ("Tile ... does not keep
    this axis"). A table made from constants and shapes alone is now gathered (channels.TableSite):
    the pairs go, the shrunk model computes the masked one at every length, and the biased,
    rotated queries' removed dims are zeroed first. Hostile: a table the inputs' values reach is
    not a table, and the pairs stay whole."""
    path = str(tmp_path / "model")
    tf.saved_model.save(_TiledRotary(from_values), path)
    pm = graphprune.prune(path, graphprune.ConstantSparsity(0.5, 0), structure="channel", one_shot=True)
    pairs = next(group for group in graphprune.channel_groups(pm)
                 if any(m.name == "rope/query" and m.axis == 1 and m.start == 4 for m in group.members))
    if from_values:
        assert not pairs.prunable and "Tile" in pairs.reason, graphprune.channels.describe([pairs])
        return
    assert pairs.prunable and pairs.size == 4, graphprune.channels.describe([pairs])
    assert {(m.name, m.start, m.stop) for m in pairs.members if m.kind == "variable"} >= {
        (name, start, start + 4) for name in ("rope/query", "rope/key", "rope/bias") for start in (0, 4)}
    rng = np.random.RandomState(1)
    inputs = [rng.standard_normal([2, length, 8]).astype(np.float32) for length in (3, 11)]
    masked = [pm(x).numpy() for x in inputs]
    out = graphprune.finalize(pm, str(tmp_path / "small"), shrink=True)
    shrunk = tf.saved_model.load(out)
    for x, want in zip(inputs, masked):
        np.testing.assert_allclose(shrunk(x).numpy(), want, atol=1e-5 * np.abs(want).max(), rtol=0)
    assert _weight_shape(out, "rope/query") == _weight_shape(out, "rope/key") == (8, 4)  # 2 of 4 pairs
    assert _weight_shape(out, "rope/bias") == (4,)
    from graphprune.load import load

    nodes = load(out).model.entries[0].graph_def.node
    gathered = [n for n in nodes if n.op == "GatherV2" and {"Tile"} == {m.op for m in nodes if m.name == n.input[0].split(":")[0]}]
    assert len(gathered) == 1, "the tiled table is gathered once"
    assert graphprune.cost(out).parameters == _predicted_parameters(pm)


@pytest.mark.slow
def test_keras_hub_mixture_of_experts_neurons(tmp_path):
    """Mixtral's experts are one batched kernel per projection (Einsum abc,acd->abd, the experts on
    'a'): an MLP neuron is removed from every expert alike (its group holds the gate, up and down
    kernels of all experts); the experts themselves stay whole (the router's Softmax and the sum
    over experts read them)."""
    import keras_hub

    keras_hub.models.MixtralBackbone(vocabulary_size=50, num_layers=1, hidden_dim=16, intermediate_dim=32,
                                     num_query_heads=4, num_key_value_heads=2, num_experts=2,
                                     top_k=1).export(str(tmp_path / "export"), verbose=False)
    pm = graphprune.prune(str(tmp_path / "export"), graphprune.ConstantSparsity(0.5, 0), structure="channel",
                          one_shot=True)
    groups = graphprune.channel_groups(pm)
    experts = "transformer_layer_0/mixtral_sparse_moe_block/experts/expert_feedforward_"
    neurons = next(group for group in groups if any(m.name == experts + "gate_dense" and m.axis == 2
                                                    for m in group.members))
    assert neurons.prunable and neurons.size == 32, graphprune.channels.describe([neurons])
    assert {(m.name, m.axis) for m in neurons.members} >= {
        (experts + "gate_dense", 2), (experts + "intermediate_dense", 2), (experts + "output_dense", 1)}
    whole = [group for group in groups if any(m.name == experts + "gate_dense" and m.axis == 0
                                              for m in group.members)]
    assert whole and not any(group.prunable for group in whole)
    out = _hub_shrunk_as_masked(pm, tmp_path)
    for name, axis in (("gate_dense", 2), ("intermediate_dense", 2), ("output_dense", 1)):
        before, after = _weight_shape(str(tmp_path / "export"), experts + name), _weight_shape(out, experts + name)
        assert after[0] == before[0] == 2 and after[axis] == before[axis] // 2
    assert graphprune.cost(out).parameters == _predicted_parameters(pm)


@pytest.fixture(scope="module")
def stream_net(tmp_path_factory):
    return _saved(tmp_path_factory, StreamNet())


def _weight_shape(saved_model: str, key: str) -> tuple:
    """The shape of weight ``key`` in a finalized model: its variable's, or its frozen Const's."""
    from graphprune.load import load

    model = load(saved_model).model
    if key in model.variables:
        return tuple(model.variables[key].shape)
    for node in model.entries[0].graph_def.node:
        if node.op == "Const" and names.display_name(node.name) == key:
            return tuple(d.size for d in node.attr["value"].tensor.tensor_shape.dim)
    raise KeyError(key)


def _predicted_parameters(pm) -> int:
    """The parameters left once every prunable group loses the channels its consumers' masks
    zero: each member axis of a variable loses the indices of its group's removed channels (a
    head's block of values, every period-th value of a head dimension)."""
    kept = {}
    for group in graphprune.channel_groups(pm):
        if not group.prunable:
            continue
        used = _used_channels(pm, group)
        for m in group.members:
            if m.kind == "variable":
                dim = pm.traced.variables[m.name].shape[m.axis]
                axis = kept.setdefault((m.name, m.axis), np.ones(dim, bool))
                axis[m.indices(dim, np.flatnonzero(~used))] = False
    total = 0
    for key, spec in pm.traced.variables.items():
        if spec.role == names.ROLE_OTHER and len(spec.shape) >= 1 and "float" in spec.dtype:  # as cost counts
            total += int(np.prod([int(kept[(key, axis)].sum()) if (key, axis) in kept else size
                                  for axis, size in enumerate(spec.shape)]))
    return total


def _constant_parameters(pm, counted: int) -> int:
    """What graphprune.cost counted (``counted``, of the model pm was pruned from) beyond the
    model's float variables of at least one axis, the ones _predicted_parameters counts: its float
    constants (kept as they are by a shrink)."""
    return counted - sum(int(np.prod(spec.shape)) for spec in pm.traced.variables.values()
                         if spec.role == names.ROLE_OTHER and len(spec.shape) >= 1 and "float" in spec.dtype)


def _used_channels(pm, group) -> np.ndarray:
    """Which of a prunable group's channels its kernels' masks keep (the kernels that read them, or
    make them, for query/key head dims)."""
    used = np.zeros(group.size, bool)
    for m in group.members:
        if m.role == "in" or (group.contracted and m.role in ("out", "through")):
            mask = pm.variables_by_key[names.mask_key(m.name)].numpy()
            per = np.any(np.moveaxis(mask, m.axis, 0).reshape(mask.shape[m.axis], -1) != 0, 1)
            if m.block is not None:  # a head of ``block`` values
                per = per.reshape(-1, m.block).any(1)
            used |= per[m.start:m.stop] if m.period is None else per.reshape(-1, m.period).any(0)[m.start:m.stop]
    return used


def _stream_group(groups):
    return next(group for group in groups if any(m.name == "tokens" and m.axis == 1 for m in group.members))


class _NormThenSort(tf.Module):
    """A layer norm over a stream (two kernels write it, one reads it) that is also sorted along
    its channels (an op graphprune does not model): the stream must stay whole whatever
    residual_stream says. ``stream=False``: one kernel writes it."""

    def __init__(self, stream=True):
        super().__init__()
        rng = np.random.RandomState(0)
        self.stream = stream
        self.up = tf.Variable(rng.standard_normal([4, 8]).astype(np.float32), name="up/kernel")
        self.side = tf.Variable(rng.standard_normal([4, 8]).astype(np.float32), name="side/kernel")
        self.down = tf.Variable(rng.standard_normal([8, 3]).astype(np.float32), name="down/kernel")

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
    def __call__(self, x):
        h = tf.matmul(x, self.up) + tf.matmul(x, self.side) if self.stream else tf.matmul(x, self.up)
        mean = tf.reduce_mean(h, axis=-1, keepdims=True)
        variance = tf.reduce_mean(tf.square(h - mean), axis=-1, keepdims=True)
        h = (h - mean) * tf.math.rsqrt(variance + 1e-5)
        return tf.matmul(tf.sort(h, axis=-1), self.down)


def test_residual_stream_names_what_else_keeps_the_stream_whole(tmp_path):
    """A stream that a layer norm and a sort keep whole is reported with the sort, asked for
    residual_stream=True or not: never with a hint to ask for what would not remove it. So is a
    group one kernel writes (not a stream), before pruning and after."""
    path = str(tmp_path / "sorted")
    tf.saved_model.save(_NormThenSort(), path)
    reasons = {}
    for asked in (False, True):
        with pytest.warns(UserWarning, match="no channel group can be removed"):
            pm = graphprune.prune(path, graphprune.ConstantSparsity(0.5, 0), structure="channel",
                                  residual_stream=asked)
        stream = next(group for group in graphprune.channel_groups(pm)
                      if any(m.name == "up/kernel" and m.axis == 1 for m in group.members))
        assert not stream.prunable
        reasons[asked] = stream.reason
    for asked in (False, True):
        assert "residual_stream=True" not in reasons[asked] and "TopKV2" in reasons[asked], reasons[asked]
    # not a stream: its layer norm is let through by default, so the sort is what keeps it whole
    path = str(tmp_path / "sorted_alone")
    tf.saved_model.save(_NormThenSort(stream=False), path)
    for found in (graphprune.channel_groups(path), graphprune.channel_groups(graphprune.prune(
            path, graphprune.ConstantSparsity(0.5, 0), structure="channel"))):
        alone = next(group for group in found if any(m.name == "up/kernel" and m.axis == 1 for m in group.members))
        assert not alone.prunable and "residual_stream=True" not in alone.reason and "TopKV2" in alone.reason, \
            alone.reason


class _LocallyNormed(tf.Module):
    """Convolutions whose own outputs are normalized over their channels before the activation (an
    RMS norm, then a layer norm: MobileNetV5's and ConvNeXt-style blocks), then a residual stream
    that a layer norm reads (two convolutions write it, one reads it)."""

    def __init__(self):
        super().__init__()
        rng = np.random.RandomState(3)
        weight = lambda shape, name: tf.Variable(rng.standard_normal(shape).astype(np.float32) * 0.5,  # noqa: E731
                                                 name=name)
        self.stem, self.rms = weight([3, 3, 3, 8], "stem/kernel"), weight([8], "rms/scale")
        self.conv, self.gamma, self.beta = weight([3, 3, 8, 12], "conv/kernel"), weight([12], "ln/gamma"), \
            weight([12], "ln/beta")
        self.into, self.up, self.down = weight([1, 1, 12, 6], "into/kernel"), weight([1, 1, 6, 10], "up/kernel"), \
            weight([1, 1, 10, 6], "down/kernel")
        self.head = weight([6, 3], "head/kernel")

    @staticmethod
    def _layer_norm(x, gamma=None, beta=None):
        mean = tf.reduce_mean(x, axis=-1, keepdims=True)
        variance = tf.reduce_mean(tf.square(x - mean), axis=-1, keepdims=True)
        x = (x - mean) * tf.math.rsqrt(variance + 1e-5)
        return x if gamma is None else x * gamma + beta

    @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 3], tf.float32)])
    def __call__(self, images):
        x = tf.nn.conv2d(images, self.stem, 1, "SAME")
        x = tf.nn.relu(x * tf.math.rsqrt(tf.reduce_mean(tf.square(x), axis=-1, keepdims=True) + 1e-6) * self.rms)
        x = tf.nn.gelu(self._layer_norm(tf.nn.conv2d(x, self.conv, 2, "SAME"), self.gamma, self.beta))
        stream = tf.nn.conv2d(x, self.into, 1, "SAME")
        stream = stream + tf.nn.conv2d(tf.nn.relu(tf.nn.conv2d(self._layer_norm(stream), self.up, 1, "SAME")),
                                       self.down, 1, "SAME")
        return tf.matmul(tf.reduce_mean(stream, [1, 2]), self.head)


def test_channels_a_layer_norm_reads_alone(tmp_path):
    """A layer or RMS norm over one convolution's own output channels does not keep them whole by
    default: each of its Means becomes a mean over the kept channels, and the channels go with
    the norm's parameters (keras-hub MobileNetV5 had no prunable group). A residual stream's norm
    (the stream written by two convolutions) still needs residual_stream=True, and says so."""
    path = str(tmp_path / "model")
    module = _LocallyNormed()
    tf.saved_model.save(module, path)
    images = np.random.RandomState(0).uniform(size=[2, 8, 8, 3]).astype(np.float32)
    pm = graphprune.prune(path, graphprune.ConstantSparsity(0.5, 0), structure="channel")
    np.testing.assert_allclose(pm(images).numpy(), module(images).numpy(), rtol=1e-5, atol=1e-5)  # all ones
    groups = graphprune.channel_groups(pm)
    assert sorted(group.size for group in groups if group.prunable) == [8, 10, 12], channels.describe(groups)
    normed = {m.name for group in groups if group.prunable for m in group.members}
    assert {"rms/scale", "ln/gamma", "ln/beta"} <= normed
    stream = next(group for group in groups if any(m.name == "into/kernel" and m.axis == 3 for m in group.members))
    assert not stream.prunable and "residual_stream=True" in stream.reason and "Mean" in stream.reason
    rewritten = [n for n in pm.traced.entries[0].graph_def.node if names.kept_mean_part(n.name) == "sum"]
    assert len(rewritten) == 3  # the RMS norm's Mean and the layer norm's two; not the stream's
    before = graphprune.channel_groups(path)  # the model as it is: what prune will find
    assert sorted(group.size for group in before if group.prunable) == [8, 10, 12], channels.describe(before)

    pm = graphprune.prune(path, graphprune.ConstantSparsity(0.5, 0), structure="channel", one_shot=True)
    masked = pm(images).numpy()
    out = graphprune.finalize(pm, str(tmp_path / "small"), shrink=True)
    np.testing.assert_allclose(tf.saved_model.load(out)(images).numpy(), masked,
                               atol=1e-5 * np.abs(masked).max(), rtol=0)
    assert _kernel_shapes(out) == _predicted_shapes(pm)
    assert _weight_shape(out, "rms/scale") == (4,) and _weight_shape(out, "ln/gamma") == (6,)
    assert graphprune.cost(out).parameters == _predicted_parameters(pm)
    assert check_tflite(out, str(tmp_path / "small.tflite"), images, masked, np.abs(masked).max()) == "ok"

    pm = graphprune.prune(path, graphprune.ConstantSparsity(0.5, 0), structure="channel", residual_stream=True)
    assert sorted(group.size for group in graphprune.channel_groups(pm) if group.prunable) == [6, 8, 10, 12]


class _ChannelsFirstAttention(tf.Module):
    """Multi-query attention over an image written channels-first, as MobileNetV5's is: each
    projection's output is transposed to [B, C, H, W] and reshaped in one go into [B, heads, key
    dims, H * W] (a split and a merge), and the heads' outputs are merged back while the positions
    are split again ([B, H * W, heads, values] -> [B, H, W, heads * values])."""

    def __init__(self):
        super().__init__()
        rng = np.random.RandomState(5)
        weight = lambda shape, name: tf.Variable(rng.standard_normal(shape).astype(np.float32) * 0.5,  # noqa: E731
                                                 name=name)
        self.query, self.key = weight([1, 1, 6, 2 * 4], "query/kernel"), weight([1, 1, 6, 4], "key/kernel")
        self.value, self.out = weight([1, 1, 6, 3], "value/kernel"), weight([1, 1, 2 * 3, 6], "out/kernel")
        self.head = weight([6, 2], "head/kernel")

    @tf.function(input_signature=[tf.TensorSpec([None, 4, 4, 6], tf.float32)])
    def __call__(self, x):
        batch = tf.shape(x)[0]
        channels_first = lambda kernel: tf.transpose(tf.nn.conv2d(x, kernel, 1, "SAME"), (0, 3, 1, 2))  # noqa: E731
        q = tf.transpose(tf.reshape(channels_first(self.query), (batch, 2, 4, -1)), (0, 1, 3, 2))  # [B, 2, 16, 4]
        k = tf.transpose(tf.reshape(channels_first(self.key), (batch, 4, -1)), (0, 2, 1))[:, None]  # [B, 1, 16, 4]
        v = tf.expand_dims(tf.transpose(tf.reshape(channels_first(self.value), (batch, 3, -1)), (0, 2, 1)), 1)
        scores = tf.nn.softmax(tf.matmul(q * 0.5, tf.transpose(k, (0, 1, 3, 2))))
        heads = tf.reshape(tf.transpose(tf.matmul(scores, v), (0, 2, 1, 3)), (batch, 4, 4, 2 * 3))
        y = tf.nn.relu(tf.nn.conv2d(heads, self.out, 1, "SAME"))
        return tf.matmul(tf.reduce_mean(y, [1, 2]), self.head)


def test_reshapes_that_split_and_merge_at_once(tmp_path):
    """A Reshape that splits the channels into heads x key dims while it merges the positions (and
    one that merges heads x values while it splits the positions) is read block by block: the
    heads, the query/key dims and the value dims go (they were whole: 'Reshape ... an op
    graphprune does not model'); the shrunk model's reshape shapes follow."""
    path = str(tmp_path / "model")
    tf.saved_model.save(_ChannelsFirstAttention(), path)
    pm = graphprune.prune(path, graphprune.ConstantSparsity(0.5, 0), structure="channel", one_shot=True)
    groups = graphprune.channel_groups(pm)
    assert sorted(group.size for group in groups if group.prunable) == [2, 3, 4, 6], channels.describe(groups)
    heads = next(group for group in groups if any(m.name == "out/kernel" and m.axis == 2 and m.block
                                                  for m in group.members))
    assert {(m.name, m.block) for m in heads.members} == {("query/kernel", 4), ("out/kernel", 3)}
    x = np.random.RandomState(0).standard_normal([3, 4, 4, 6]).astype(np.float32)
    masked = pm(x).numpy()
    out = graphprune.finalize(pm, str(tmp_path / "small"), shrink=True)
    np.testing.assert_allclose(tf.saved_model.load(out)(x).numpy(), masked, atol=1e-5 * np.abs(masked).max(), rtol=0)
    assert not _predicted_shapes(pm) - _kernel_shapes(out)  # (the products of activations count there too)
    assert _weight_shape(out, "query/kernel") == (1, 1, 6, 2) and _weight_shape(out, "out/kernel") == (1, 1, 2, 3)
    assert graphprune.cost(out).parameters == _predicted_parameters(pm)


class _BatchHeadsAttention(tf.Module):
    """ViTDet's and SAM's attention (keras-hub's MultiHeadAttentionWithRelativePE), written out: a
    fused query-key-value projection split in 3 x heads x head dims, the heads merged with the
    batch ([3, B * heads, N, d]), decomposed relative positions added to the scores (their
    tables read the query dims), and [B * heads, N, d] split back into [B, heads, H, W, d].
    ``hostile`` breaks what makes that safe, one way at a time."""

    def __init__(self, hostile=None, heads=4, dim=4, size=4):
        rng = np.random.RandomState(0)
        self.heads, self.dim, self.size, self.hostile = heads, dim, size, hostile
        width = heads * dim
        self.embed = tf.Variable(rng.standard_normal([3, width]).astype(np.float32), name="embed/kernel")
        self.qkv = tf.Variable(rng.standard_normal([width, 3 * width]).astype(np.float32) * 0.3, name="qkv/kernel")
        self.qkv_bias = tf.Variable(rng.standard_normal([3 * width]).astype(np.float32) * 0.1, name="qkv/bias")
        self.rel_h = tf.Variable(rng.standard_normal([2 * size - 1, dim]).astype(np.float32) * 0.3, name="rel_h")
        self.rel_w = tf.Variable(rng.standard_normal([2 * size - 1, dim]).astype(np.float32) * 0.3, name="rel_w")
        self.proj = tf.Variable(rng.standard_normal([width, width]).astype(np.float32) * 0.3, name="proj/kernel")
        self.head = tf.Variable(rng.standard_normal([width, 5]).astype(np.float32), name="head/kernel")
        coords = np.arange(size)[:, None] - np.arange(size)[None, :] + size - 1
        self.coords = tf.constant(coords.astype(np.int32))

    @tf.function(input_signature=[tf.TensorSpec([None, 4, 4, 3], tf.float32)])
    def __call__(self, x):
        heads, dim, size, hostile = self.heads, self.dim, self.size, self.hostile
        batch = tf.shape(x)[0]
        qkv = tf.matmul(tf.nn.relu(tf.matmul(x, self.embed)), self.qkv) + self.qkv_bias
        qkv = tf.transpose(tf.reshape(qkv, [batch, size * size, 3, heads, dim]), (2, 0, 3, 1, 4))
        q, k, v = tf.unstack(tf.reshape(qkv, [3, batch * heads, size * size, dim]), axis=0)
        scores = tf.matmul(q * dim ** -0.5, tf.transpose(k, (0, 2, 1)))
        n = tf.shape(q)[0]  # batch * heads, read back as ViTDet's relative positions do
        rows = tf.reshape(q, [n, size, size, dim])
        rel_h = tf.einsum("bhwc,hkc->bhwk", rows, tf.gather(self.rel_h, self.coords))
        rel_w = tf.einsum("bhwc,wkc->bhwk", rows, tf.gather(self.rel_w, self.coords))
        scores = tf.reshape(scores, [n, size, size, size, size]) + rel_h[..., :, None] + rel_w[..., None, :]
        scores = tf.nn.softmax(tf.reshape(scores, [n, size * size, size * size]))
        values = tf.matmul(scores, v)
        if hostile == "sum over the batch":  # the merged axis reduced: heads of every batch element mixed
            values += tf.reduce_sum(values, 0, keepdims=True)
        if hostile == "batch read back":  # the batch worked out from the merged size: n // heads
            out = tf.reshape(values, [n // heads, heads, size, size, dim])
        elif hostile == "other heads":  # split back into twice the batch and half the heads
            out = tf.reshape(values, [batch * 2, heads // 2, size, size, dim])
            out = tf.reshape(out, [batch, heads, size, size, dim])
        else:
            out = tf.reshape(values, [batch, heads, size, size, dim])
        out = tf.reshape(tf.transpose(out, (0, 2, 3, 1, 4)), [batch, size, size, heads * dim])
        y = tf.nn.relu(tf.matmul(out, self.proj))
        return tf.matmul(tf.reduce_mean(y, [1, 2]), self.head)


def _heads_group(groups, kernel, block=4):
    return next(group for group in groups if any(m.name == kernel and m.block == block for m in group.members))


def test_heads_merged_with_the_batch(tmp_path):
    """Heads merged with the batch ([3, B * heads, N, d], ViTDet's and SAM's attention) are
    followed through the ops that keep that axis: the heads go, with the query-key-value kernel's
    blocks and the projection's rows; the shrunk model's Mul(batch, heads) and reshapes follow
    (they were whole: 'Reshape ... does not keep this axis'). Where the merged axis is reduced,
    its size is read into anything but a shape that keeps it, or it is split into heads of
    another count, the heads stay whole with the reason."""
    x = np.random.RandomState(1).standard_normal([3, 4, 4, 3]).astype(np.float32)
    path, module = str(tmp_path / "model"), _BatchHeadsAttention()
    tf.saved_model.save(module, path)
    pm = graphprune.prune(path, graphprune.ConstantSparsity(0.5, 0), structure="channel", one_shot=True)
    groups = graphprune.channel_groups(pm)
    heads = _heads_group(groups, "proj/kernel")
    assert heads.prunable and heads.size == 4, channels.describe(groups)
    assert {(m.name, m.axis, m.block) for m in heads.members} == {("qkv/kernel", 1, 4), ("qkv/bias", 0, 4),
                                                                  ("proj/kernel", 0, 4)}
    masked = pm(x).numpy()
    out = graphprune.finalize(pm, str(tmp_path / "small"), shrink=True)
    np.testing.assert_allclose(tf.saved_model.load(out)(x).numpy(), masked, atol=1e-5 * np.abs(masked).max(), rtol=0)
    # every variable counts, the relative position tables too (looked up by ResourceGather)
    assert graphprune.cost(path).parameters == sum(int(np.prod(v.shape)) for v in module.trainable_variables)
    assert graphprune.cost(out).parameters == _predicted_parameters(pm)
    # the query/key/value head dims go too: the relative position tables read the queries, whose
    # removed dims insert_masks zeroes (names.kept_product)
    dims = next(group for group in groups if group is not heads and
                any(m.name == "proj/kernel" and m.axis == 0 for m in group.members))
    assert dims.prunable and dims.size == 4, channels.describe([dims])
    assert _weight_shape(out, "proj/kernel")[0] == \
        int(_used_channels(pm, heads).sum()) * int(_used_channels(pm, dims).sum()) == 4
    one = np.random.RandomState(2).standard_normal([1, 4, 4, 3]).astype(np.float32)  # any batch size
    np.testing.assert_allclose(tf.saved_model.load(out)(one).numpy(), pm(one).numpy(), atol=1e-5 * np.abs(masked).max(),
                               rtol=0)

    for hostile, why in (("sum over the batch", "does not keep this axis"),
                         ("batch read back", "reads the size of an axis that holds heads merged with the batch"),
                         ("other heads", "splits off heads of another count")):
        path = str(tmp_path / hostile.replace(" ", "_"))
        tf.saved_model.save(_BatchHeadsAttention(hostile), path)
        pm = graphprune.prune(path, graphprune.ConstantSparsity(0.5, 0), structure="channel", one_shot=True)
        groups = graphprune.channel_groups(pm)
        heads = _heads_group(groups, "qkv/kernel")  # (the projection's rows too, but for "other heads")
        assert not heads.prunable and why in heads.reason, (hostile, channels.describe(groups))
        assert not _heads_group(groups, "proj/kernel").prunable
        masked = pm(x).numpy()
        out = graphprune.finalize(pm, str(tmp_path / (hostile.replace(" ", "_") + "_small")), shrink=True)
        np.testing.assert_allclose(tf.saved_model.load(out)(x).numpy(), masked, atol=1e-5 * np.abs(masked).max(),
                                   rtol=0)


class _ScaledAttention(tf.Module):
    """Attention whose scale reads the query's head dims at run time (ESM's and RoFormer's
    1 / sqrt(tf.shape(q)[-1])), beside a read of the key's that nothing uses (Keras 3's
    dot_product_attention given a scale) and a table over the head dims cut to a sequence
    length the graph computes (ESM's ``cos[:, :seq_len]``). ``hostile`` makes the size a shape
    again, one way at a time."""

    def __init__(self, hostile=None, heads=2, dim=8):
        rng = np.random.RandomState(0)
        self.hostile, width = hostile, heads * dim
        self.embed = tf.Variable(rng.standard_normal([6, width]).astype(np.float32), name="embed/kernel")
        for name in ("query", "key", "value"):
            setattr(self, name, tf.Variable(rng.standard_normal([width, heads, dim]).astype(np.float32) * 0.3,
                                            name=f"{name}/kernel"))
        self.out = tf.Variable(rng.standard_normal([heads, dim, width]).astype(np.float32) * 0.3, name="out/kernel")
        self.table = tf.constant(np.cos(np.outer(np.arange(12), np.arange(1, dim + 1) / dim))[None, :, None, :]
                                 .astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec([None, None, 6], tf.float32)])
    def __call__(self, x):
        seq = tf.shape(x)[1]
        h = tf.nn.relu(tf.einsum("bnc,cd->bnd", x, self.embed))
        q, k, v = (tf.einsum("bnd,dhe->bnhe", h, w) for w in (self.query, self.key, self.value))
        q, k = q * self.table[:, :seq], k * self.table[:, :seq]
        dims = tf.shape(q)[-1]
        tf.shape(k)[-1]  # read, and never used
        if self.hostile == "a shape":  # the size read makes a tensor of that many elements
            q = q * tf.ones(tf.stack([dims]))
        elif self.hostile == "a shape through floats":  # made a float vector, then a shape again
            count = tf.cast(tf.cast(dims, tf.float32) * tf.ones([1]), tf.int32)
            q = tf.reshape(q, tf.concat([tf.shape(q)[:3], count], 0))
        scale = 1.0 / tf.sqrt(tf.cast(dims, tf.float32))
        scores = tf.nn.softmax(tf.einsum("bqhe,bkhe->bhqk", q, k) * scale)
        y = tf.einsum("bqhe,hed->bqd", tf.einsum("bhqk,bkhe->bqhe", scores, v), self.out)
        return tf.reduce_mean(tf.nn.relu(y), 1)


def test_a_size_read_as_a_number(tmp_path):
    """A head-dim count read at run time only to scale the scores (1 / sqrt(d)), or read and never
    used, no longer keeps the query/key head dims whole: shrink_channels writes the size it had
    as a constant, so the shrunk model scales as the masked one did. Where the size becomes a
    shape again (a Fill of that many ones; a float vector cast back into a Reshape's shape), they
    stay whole with the reason."""
    x = np.random.RandomState(1).standard_normal([3, 5, 6]).astype(np.float32)
    path = str(tmp_path / "model")
    tf.saved_model.save(_ScaledAttention(), path)
    pm = graphprune.prune(path, graphprune.ConstantSparsity(0.5, 0), structure="channel", one_shot=True)
    groups = graphprune.channel_groups(pm)
    dims = next(group for group in groups if ("query/kernel", 2) in {(m.name, m.axis) for m in group.members})
    assert dims.prunable and dims.size == 8, channels.describe(groups)
    assert {(m.name, m.axis) for m in dims.members} >= {("query/kernel", 2), ("key/kernel", 2)}
    from graphprune.load import load
    numbers = channels.analyze(load(path).model).numbers  # the query's size, in the signature and the method
    assert len(numbers) == len({entry for entry, _, _ in numbers}) == 2, numbers  # the key's read is dead
    masked = pm(x).numpy()
    out = graphprune.finalize(pm, str(tmp_path / "small"), shrink=True)
    np.testing.assert_allclose(tf.saved_model.load(out)(x).numpy(), masked, atol=1e-5 * np.abs(masked).max(), rtol=0)
    assert _weight_shape(out, "query/kernel")[2] == _weight_shape(out, "key/kernel")[2] == \
        int(_used_channels(pm, dims).sum()) == 4
    # cost counts the table too, a float constant: its head dims shrink with the kernels'
    assert graphprune.cost(out).parameters == _predicted_parameters(pm) + 12 * 4
    assert graphprune.cost(path).parameters == 6 * 16 + 4 * 16 * 16 + 12 * 8
    longer = np.random.RandomState(2).standard_normal([1, 11, 6]).astype(np.float32)  # another sequence length
    np.testing.assert_allclose(tf.saved_model.load(out)(longer).numpy(), pm(longer).numpy(),
                               atol=1e-5 * np.abs(masked).max(), rtol=0)

    for hostile in ("a shape", "a shape through floats"):
        path = str(tmp_path / hostile.replace(" ", "_"))
        tf.saved_model.save(_ScaledAttention(hostile), path)
        pm = graphprune.prune(path, graphprune.ConstantSparsity(0.5, 0), structure="channel", one_shot=True)
        groups = graphprune.channel_groups(pm)
        dims = next(group for group in groups if ("query/kernel", 2) in {(m.name, m.axis) for m in group.members})
        assert not dims.prunable and "reads its size into" in dims.reason, (hostile, dims.reason)
        masked = pm(x).numpy()
        out = graphprune.finalize(pm, str(tmp_path / (hostile.replace(" ", "_") + "_small")), shrink=True)
        np.testing.assert_allclose(tf.saved_model.load(out)(x).numpy(), masked, atol=1e-5 * np.abs(masked).max(),
                                   rtol=0)


def test_blocks_of_a_reshape():
    """How _blockwise reads a Reshape: blocks of equal size, the batch unknown on both sides, one -1
    worked out; None for what it cannot follow (an empty or size-1 axis, sizes that do not divide),
    never an error."""
    blocks = channels._blocks
    assert blocks([None, 16, 4, 4], [None, 2, 8, -1]) == [((0,), (0,)), ((1,), (1, 2)), ((2, 3), (3,))]
    assert blocks([None, 16, 2, 4], [None, 4, 4, 8]) == [((0,), (0,)), ((1,), (1, 2)), ((2, 3), (3,))]
    # unknown sizes elsewhere pair up in order, the static axes between them in blocks
    assert blocks([3, None, 2, 5], [3, None, 10]) == [((0,), (0,)), ((1,), (1,)), ((2, 3), (2,))]
    for xs, ys in (([None, 0, 4], [None, -1, 2]), ([None, 4], [None, 0, -1]), ([None, 4, 4], [None, 1, 16]),
                   ([None, 6], [None, 4, -1]), ([3, None, 2, 5], [3, None, 5, 3]), ([None, 4, 4], [None, -1, -1]),
                   ([3, None, 2, 5], [None, 3, 10])):
        assert blocks(xs, ys) is None, (xs, ys)
    # the batch merged with the heads after it, and split back (_batch_blocks)
    batch = channels._batch_blocks
    assert batch([3, None, 4, 16, 8], [3, None, 16, 8]) == ([((0,), (0,)), ((3,), (2,)), ((4,), (3,))],
                                                             ("merge", 1, 2, 1))
    assert batch([None, 16, 8], [None, 4, 4, 4, 8]) == ([((1,), (2, 3)), ((2,), (4,))], ("split", 0, 0, 1))
    for xs, ys in (([4, None, 16], [None, 16]), ([None, 16], [4, None, 16]), ([None, 4, 8], [None, 4, 8]),
                   ([None, 4, 8], [None, 8, 8])):
        assert batch(xs, ys) is None, (xs, ys)


def test_residual_stream_through_layer_norms(stream_net, tmp_path):
    """residual_stream=True removes channels of the stream that layer norms, an RMS norm and
    every block's residual add share: each Mean over them becomes a mean over the kept channels,
    so the masked model trains as the shrunk one computes; embeddings (looked up, sliced and
    broadcast), norm parameters and biases shrink with the kernels."""
    ids = tf.constant(np.random.RandomState(2).randint(0, 20, [4, 6]).astype(np.int32))
    whole = _stream_group(graphprune.channel_groups(
        graphprune.prune(stream_net, graphprune.ConstantSparsity(0.5, 0), structure="channel")))
    assert not whole.prunable and "residual_stream=True" in whole.reason  # off by default, and said how

    schedule = graphprune.PolynomialDecay(0.0, 0.5, begin_step=0, end_step=3, frequency=1)
    pm = graphprune.prune(stream_net, schedule, structure="channel", residual_stream=True)
    stream = _stream_group(graphprune.channel_groups(pm))
    assert stream.prunable and stream.size == 16
    assert {m.name for m in stream.members} >= {"tokens", "positions", "norm0/gamma", "norm1/beta", "rms/scale",
                                                 "mlp/down/bias", "mlp/up/kernel", "attention/q/kernel"}
    assert ("tokens", 1, "in") in {(m.name, m.axis, m.role) for m in stream.members}  # the tied logits
    rewritten = [n for n in pm.traced.entries[0].graph_def.node if names.kept_mean_part(n.name) == "sum"]
    assert len(rewritten) == 5  # two per layer norm, one for the RMS norm
    for _ in range(4):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(pm(ids)))
        gradients = tape.gradient(loss, pm.trainable_variables)
        assert all(g is not None and np.all(np.isfinite(tf.convert_to_tensor(g))) for g in gradients)
        for variable, gradient in zip(pm.trainable_variables, gradients):
            variable.assign_sub(0.05 * tf.convert_to_tensor(gradient))
        pm.update_masks()
    kept = np.any(pm.variables_by_key["tokens"].numpy() != 0, axis=0)
    assert kept.sum() == 8
    masked = pm(ids).numpy()

    # the masked model is the network on the kept channels alone (NumPy, float64)
    v = {key: np.asarray(var.numpy(), np.float64) for key, var in pm.variables_by_key.items()}

    def norm(x, gamma, beta):
        mean = x.mean(-1, keepdims=True)
        return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-3) * gamma[kept] + beta[kept]

    x = v["tokens"][ids.numpy()][..., kept] + v["positions"][:6, kept]
    hidden = norm(x, v["norm0/gamma"], v["norm0/beta"]) @ v["mlp/up/kernel"][kept] + v["mlp/up/bias"]
    gelu = 0.5 * hidden * (1 + np.vectorize(math.erf)(hidden / np.sqrt(2)))
    x = x + gelu @ v["mlp/down/kernel"][:, kept] + v["mlp/down/bias"][kept]
    h = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-3) * v["rms/scale"][kept]
    q, k, w = (h @ v[f"attention/{n}/kernel"][kept] for n in "qkv")
    scores = np.einsum("bte,bse->bts", q, k) / np.sqrt(8.0)
    attention = np.exp(scores - scores.max(-1, keepdims=True))
    attention /= attention.sum(-1, keepdims=True)
    x = x + np.einsum("bts,bse->bte", attention, w) @ v["attention/out/kernel"][:, kept]
    reference = norm(x, v["norm1/gamma"], v["norm1/beta"]).mean(1) @ v["tokens"][:, kept].T
    scale = np.max(np.abs(masked))
    np.testing.assert_allclose(masked, reference, atol=1e-5 * scale, rtol=0)

    folded = graphprune.finalize(pm, str(tmp_path / "folded"))
    np.testing.assert_allclose(tf.saved_model.load(folded)(ids).numpy(), masked, atol=1e-5 * scale, rtol=0)
    # the tied table is read twice (lookup, logits) and frozen once; the 5 means keep their 0/1 vectors
    assert graphprune.cost(folded).parameters == graphprune.cost(stream_net).parameters + 5 * 16
    out = graphprune.finalize(pm, str(tmp_path / "small"), shrink=True)
    small = tf.saved_model.load(out)
    np.testing.assert_allclose(small(ids).numpy(), masked, atol=1e-5 * scale, rtol=0)
    from graphprune.load import load

    loaded = load(out).model
    assert [_weight_shape(out, key) for key in ("tokens", "positions", "norm0/gamma")] == [(20, 8), (6, 8), (8,)]
    before, after = graphprune.cost(stream_net), graphprune.cost(out)
    assert after.parameters == _predicted_parameters(pm) < before.parameters / 2
    # FLOPs with the sequence length given (6 tokens): MLP 6*2*16*32, q/k/v 6*3*16*8, scores and
    # context 2*6*6*8, output projection 6*8*16, logits 16*20 multiply-adds; the length unknown,
    # only the logits count
    assert before.flops == 2 * 16 * 20 and before.uncounted == 8  # MLP 2, q, k, v, scores, context, output
    given = graphprune.cost(stream_net, unknown_size=6)
    assert given.flops == 2 * (6144 + 2304 + 576 + 768 + 320) and given.uncounted == 0
    assert graphprune.cost(out, unknown_size=6).flops < graphprune.cost(stream_net, unknown_size=6).flops / 2
    with pytest.raises(graphprune.GraphPruneError, match="unknown_size must be"):
        graphprune.cost(stream_net, unknown_size=0)
    nodes = loaded.entries[0].graph_def.node
    assert not any(names.kept_mean_part(n.name) for n in nodes)  # the kept-channel means are plain means again
    assert sum(n.op == "Mean" for n in nodes) == 6  # and the mean over tokens
    outcome = check_tflite(out, str(tmp_path / "small.tflite"), ids, masked, scale, tolerance=1e-4)
    assert outcome == "ok", outcome

    # saved while training, finalized later from the directory
    reloaded = tf.saved_model.load(graphprune.finalize(graphprune.save(pm, str(tmp_path / "saved")),
                                                       str(tmp_path / "later"), shrink=True))
    np.testing.assert_allclose(reloaded(ids).numpy(), masked, atol=1e-5 * scale, rtol=0)


def test_cli_residual_stream(stream_net, tmp_path):
    _cli("prune", f"--input={stream_net}", f"--output={tmp_path / 'p'}", "--structure=channel", "--residual_stream",
         "--final_sparsity=0.5", "--one_shot")
    printed = _cli("finalize", f"--input={tmp_path / 'p'}", f"--output={tmp_path / 'f'}", "--shrink",
                   "--check_tolerance=1e-4")
    assert "count no FLOPs (--unknown_size=N counts them)" in printed  # the sequence length is unknown
    printed = _cli("inspect", f"--input={tmp_path / 'f'}", f"--baseline={stream_net}", "--unknown_size=6")
    assert "x parameters" in printed and "unknown dimensions 6" in printed and "count no FLOPs" not in printed
    printed = _cli("finalize", f"--input={tmp_path / 'p'}", f"--output={tmp_path / 'g'}", "--shrink",
                   "--check_tolerance=1e-4", "--unknown_size=6")
    assert "unknown dimensions 6" in printed and "count no FLOPs" not in printed
    assert _weight_shape(str(tmp_path / "f"), "tokens") == (20, 8)


def test_residual_stream_with_round_to_and_global_ranking(stream_net, tmp_path):
    """The stream's kept count is rounded like any group's (8 -> 9 with round_to=3), and ranked
    with the others under scope='global'; the shrunk model still computes the masked one."""
    ids = tf.constant(np.random.RandomState(3).randint(0, 20, [3, 6]).astype(np.int32))
    for scope, width in (("layer", 9), ("global", None)):
        pm = graphprune.prune(stream_net, graphprune.ConstantSparsity(0.5, 0), structure="channel", one_shot=True,
                              residual_stream=True, round_to=3, scope=scope)
        masked = pm(ids).numpy()
        out = graphprune.finalize(pm, str(tmp_path / scope), shrink=True)
        np.testing.assert_allclose(tf.saved_model.load(out)(ids).numpy(), masked,
                                   atol=1e-5 * np.max(np.abs(masked)), rtol=0)
        kept = int(np.any(pm.variables_by_key["tokens"].numpy() != 0, axis=0).sum())
        assert _weight_shape(out, "tokens") == (20, kept) and kept % 3 == 0 and kept < 16
        if width is not None:
            assert kept == width


def _norm_parameter(key: str) -> bool:
    """A layer or RMS norm's gamma, beta or scale (keras-hub names: ..._layer_norm/gamma, ln_1/beta,
    pre_attention_norm/scale, ...)."""
    return re.search(r"(norm|ln)[^/]*/(gamma|beta|scale)$", key) is not None


def _hub_task_models():
    import keras_hub

    models = keras_hub.models
    small = dict(vocabulary_size=50, num_layers=2, hidden_dim=16, intermediate_dim=32)
    return {
        "bert": lambda: models.BertTextClassifier(models.BertBackbone(num_heads=2, max_sequence_length=8, **small),
                                                  num_classes=3, preprocessor=None),
        "vit": lambda: models.ViTImageClassifier(models.ViTBackbone(
            image_shape=(32, 32, 3), patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32),
            num_classes=3, preprocessor=None),
        # causal LMs: the logits are the stream times the tied token embedding, transposed
        "gpt2": lambda: models.GPT2CausalLM(models.GPT2Backbone(num_heads=2, max_sequence_length=8, **small),
                                            preprocessor=None),
        "llama": lambda: models.LlamaCausalLM(models.LlamaBackbone(num_query_heads=2, num_key_value_heads=1, **small),
                                              preprocessor=None),
        "gemma": lambda: models.GemmaCausalLM(models.GemmaBackbone(num_query_heads=2, num_key_value_heads=1, head_dim=8,
                                                                   **small), preprocessor=None),
        # attention from one fused query-key-value kernel, its context merged from heads and read as one axis
        "falcon": lambda: models.FalconCausalLM(models.FalconBackbone(
            vocabulary_size=50, num_layers=2, num_attention_heads=2, hidden_dim=16, intermediate_dim=32),
            preprocessor=None),
        # encoder and decoder streams, cross-attention, one tied embedding for both
        "bart": lambda: models.BartSeq2SeqLM(models.BartBackbone(num_heads=2, max_sequence_length=8, **small),
                                             preprocessor=None),
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bert", "vit", "gpt2", "llama", "gemma", "falcon", "bart"])
def test_keras_hub_hidden_size(tmp_path, name):
    """residual_stream=True on keras-hub task models built from their configs: the hidden size
    (token, segment and position embeddings, or ViT's patch embedding, class token and positions;
    every layer or RMS norm, residual, attention and MLP kernel on the stream, the pooler, a
    causal LM's tied output projection) shrinks, and the shrunk model computes what the masked
    one does, in TensorFlow and in LiteRT."""
    from test_real_models import _inputs

    _hub_task_models()[name]().export(str(tmp_path / "export"), verbose=False)
    pm = graphprune.prune(str(tmp_path / "export"), graphprune.ConstantSparsity(0.5, 0), structure="channel",
                          one_shot=True, residual_stream=True)
    stream = next(group for group in graphprune.channel_groups(pm)
                  if group.size == 16 and any(_norm_parameter(m.name) for m in group.members))
    assert stream.prunable, graphprune.channels.describe([stream])
    signature = pm.signatures["serving_default"]
    rng = np.random.RandomState(0)
    if name == "vit":
        key = next(iter(signature.structured_input_signature[1]))
        inputs = {key: tf.constant(rng.uniform(size=[2, 32, 32, 3]).astype(np.float32))}
    else:
        inputs = _inputs(signature.structured_input_signature[1], rng)
    masked = signature(**inputs)
    out = graphprune.finalize(pm, str(tmp_path / "small"), shrink=True)
    shrunk = tf.saved_model.load(out).signatures["serving_default"](**inputs)
    (key, value), = masked.items()
    scale = float(np.max(np.abs(value.numpy())))
    np.testing.assert_allclose(shrunk[key].numpy(), value.numpy(), atol=1e-5 * scale, rtol=0)
    from graphprune.load import load

    loaded = load(out).model
    spec = loaded.variables
    tables = [n for n in loaded.entries[0].graph_def.node
              if n.op == "Const" and names.display_name(n.name) == "token_embedding/embeddings"]
    assert len(tables) <= 1  # a tied embedding, read by the lookup and the logits, is stored once
    norms = [key for key in spec if _norm_parameter(key)]
    assert norms and all(spec[key].shape == (8,) for key in norms)  # every norm on the stream: 16 -> 8
    before, after = graphprune.cost(str(tmp_path / "export")), graphprune.cost(out)
    assert after.parameters < 0.55 * before.parameters
    x = inputs if name != "vit" else next(iter(inputs.values()))
    expected = {key: value.numpy()} if name != "vit" else value.numpy()
    outcome = check_tflite(out, str(tmp_path / "small.tflite"), x, expected, scale, tolerance=1e-4)
    if outcome != "ok":  # Llama's attention mask: the converter refuses the dense export alike
        with pytest.raises(graphprune.GraphPruneError) as dense:
            graphprune.export_tflite(str(tmp_path / "export"), str(tmp_path / "dense.tflite"))
        assert str(dense.value) == outcome


class _Views(tf.Module):
    """Hidden layers read through views that pick channels by place (an index, a repeat, a gather
    along it) or keep them (a broadcast, a whole slice); and part of the axis, summed over: each
    part is a group (its bounds rewritten), and the Sum loses nothing by a removed channel (zero
    after a ReLU of a product without a bias)."""

    def __init__(self):
        super().__init__()
        rng = np.random.RandomState(0)
        self.kernels = {name: tf.Variable(rng.standard_normal([8, 16]).astype(np.float32), name=f"{name}/kernel")
                        for name in ("index", "part", "tile", "gather", "broadcast", "whole")}
        self.heads = {name: tf.Variable(rng.standard_normal([16, 4]).astype(np.float32), name=f"{name}/head")
                      for name in self.kernels}

    @tf.function(input_signature=[tf.TensorSpec([None, 8], tf.float32)])
    def __call__(self, x):
        h = {name: tf.nn.relu(tf.matmul(x, kernel)) for name, kernel in self.kernels.items()}
        out = sum(tf.matmul(h[name], self.heads[name]) for name in h)
        batch = tf.shape(x)[0]
        out += tf.expand_dims(h["index"][:, 3], -1)
        out += tf.reduce_sum(tf.slice(h["part"], [0, 0], [-1, 8]), -1, keepdims=True)
        out += tf.reduce_sum(tf.tile(h["tile"], [1, 2])[:, 15:17], -1, keepdims=True)
        out += tf.reduce_sum(tf.gather(h["gather"], [1, 2], axis=1), -1, keepdims=True)
        wide = tf.broadcast_to(tf.expand_dims(h["broadcast"], 1), tf.stack([batch, 3, 16]))
        out += tf.reduce_mean(tf.matmul(wide, self.heads["broadcast"]), 1)
        return out + tf.matmul(h["whole"][:, :], self.heads["whole"])


def _views_pruned(tmp_path, module):
    """The saved module pruned one-shot by channels, and its hidden layers' groups by layer name."""
    path = str(tmp_path / "model")
    tf.saved_model.save(module, path)
    pm = graphprune.prune(path, graphprune.ConstantSparsity(0.5, 0), structure="channel", one_shot=True)
    return pm, {group.name.split("/")[0]: group for group in graphprune.channel_groups(pm)
                if group.name.endswith("kernel:1")}


def _shrunk_as_masked(pm, tmp_path, name="small") -> str:
    """Finalize with shrink=True (into tmp_path / name) and check the shrunk model computes the
    masked one; its path."""
    x = np.random.RandomState(1).standard_normal([5, 8]).astype(np.float32)
    masked = pm(x).numpy()
    out = graphprune.finalize(pm, str(tmp_path / name), shrink=True)
    np.testing.assert_allclose(tf.saved_model.load(out)(x).numpy(), masked, atol=1e-5 * np.abs(masked).max(), rtol=0)
    return out


def test_views_that_pick_channels_by_place_keep_their_group_whole(tmp_path):
    pm, groups = _views_pruned(tmp_path, _Views())
    assert {name for name, group in groups.items() if group.prunable} == {"broadcast", "whole", "part"}, \
        graphprune.channels.describe(groups.values())
    out = _shrunk_as_masked(pm, tmp_path)
    assert _weight_shape(out, "broadcast/kernel") == (8, 8) and _weight_shape(out, "index/kernel") == (8, 16)
    assert _weight_shape(out, "part/kernel") == (8, 8)  # 4 of the 8 summed, 4 of the other 8


class _Regroups(tf.Module):
    """Hidden layers through the views LLM attention uses: tf.repeat along the channels (each
    channel read twice), a stack and its unstack or split along a new axis, x[..., :], a reshape
    regrouping static trailing axes next to a channel axis, tf.split along the channels (its
    halves concatenated swapped: each half a group); and x[..., :8] beside x[..., 8:], parts of the
    channels (StridedSlice: each part a group, its bounds rewritten)."""

    def __init__(self):
        super().__init__()
        rng = np.random.RandomState(0)
        names_ = ("repeat", "stack", "ellipsis", "cut", "part")
        self.kernels = {name: tf.Variable(rng.standard_normal([8, 16]).astype(np.float32), name=f"{name}/kernel")
                        for name in names_}
        self.heads = {name: tf.Variable(rng.standard_normal([32 if name == "repeat" else 16, 4]).astype(np.float32),
                                        name=f"{name}/head") for name in names_}
        self.regroup = tf.Variable(rng.standard_normal([8, 4, 6]).astype(np.float32), name="regroup/kernel")
        self.regroup_head = tf.Variable(rng.standard_normal([4, 6, 4]).astype(np.float32), name="regroup/head")

    @tf.function(input_signature=[tf.TensorSpec([None, 8], tf.float32)])
    def __call__(self, x):
        h = {name: tf.nn.relu(tf.matmul(x, kernel)) for name, kernel in self.kernels.items()}
        out = tf.matmul(tf.repeat(h["repeat"], 2, axis=1), self.heads["repeat"])
        stacked = tf.stack([h["stack"], 2.0 * h["stack"]], axis=1)
        first, _ = tf.unstack(stacked, axis=1)
        _, second = tf.split(stacked, 2, axis=1)
        out += tf.matmul(first + tf.squeeze(second, 1), self.heads["stack"])
        out += tf.matmul(h["ellipsis"][..., :], self.heads["ellipsis"])
        left, right = tf.split(h["cut"], 2, axis=1)
        out += tf.matmul(tf.concat([right, left], 1), self.heads["cut"])
        out += tf.matmul(tf.concat([h["part"][..., :8], h["part"][..., 8:] * 0.5], 1), self.heads["part"])
        grouped = tf.nn.relu(tf.einsum("nc,chd->nhd", x, self.regroup))
        regrouped = tf.reshape(tf.reverse(tf.reshape(grouped, [-1, 4, 2, 3]), [2]), [-1, 4, 6])  # rotary's halves
        regrouped += tf.reshape(0.5 * tf.reshape(grouped, [-1, 4, 6, 1]), [-1, 4, 6])  # a trailing size-1 axis
        return out + tf.einsum("nhd,hdk->nk", regrouped, self.regroup_head)


def test_repeat_stack_split_and_regrouping_views(tmp_path):
    pm, groups = _views_pruned(tmp_path, _Regroups())
    assert {name for name, group in groups.items() if group.prunable} == {"repeat", "stack", "ellipsis", "cut",
                                                                          "part", "regroup"}, \
        graphprune.channels.describe(groups.values())
    repeated = next(m for m in groups["repeat"].members if m.name == "repeat/head")
    assert repeated.block == 2  # channel c is rows 2c and 2c + 1
    # and the copies are a group of their own: copy r of every channel is rows 2c + r (tf.repeat's count)
    copies = [group for group in graphprune.channel_groups(pm)
              if [(m.name, m.period) for m in group.members] == [("repeat/head", 2)]]
    assert len(copies) == 1 and copies[0].prunable and copies[0].size == 2, graphprune.channels.describe(copies)
    out = _shrunk_as_masked(pm, tmp_path)
    assert _weight_shape(out, "repeat/head") == (8, 4) and _weight_shape(out, "repeat/kernel") == (8, 8)
    # the regrouped heads go 4 -> 2; the halves' dims too (dim j of both halves: the reverse only swaps halves)
    assert _weight_shape(out, "regroup/kernel")[:2] == (8, 2) and _weight_shape(out, "cut/kernel") == (8, 8)
    assert _weight_shape(out, "part/kernel") == (8, 8) and _weight_shape(out, "part/head") == (8, 4)
    assert graphprune.cost(out).parameters == _predicted_parameters(pm)


class _HiddenLayers(tf.Module):
    """Named hidden layers x @ <name>/kernel [8, 16], each read by its own <name>/head [16, 4]."""

    def __init__(self, names):
        super().__init__()
        rng = np.random.RandomState(0)
        self.kernels = {name: tf.Variable(rng.standard_normal([8, 16]).astype(np.float32), name=f"{name}/kernel")
                        for name in names}
        self.heads = {name: tf.Variable(rng.standard_normal([16, 4]).astype(np.float32), name=f"{name}/head")
                      for name in self.kernels}


class _ChannelSplits(_HiddenLayers):
    """tf.split along the channels: into unequal parts read by two kernels (a SplitV), and into
    halves multiplied together (a gated linear unit on one fused kernel, as DINOv2's SwiGLU)."""

    def __init__(self):
        super().__init__(("uneven", "glu"))
        rng = np.random.RandomState(1)
        self.parts = [tf.Variable(rng.standard_normal([size, 4]).astype(np.float32), name=f"uneven/part{size}")
                      for size in (4, 12)]
        self.glu_out = tf.Variable(rng.standard_normal([8, 4]).astype(np.float32), name="glu/out")

    @tf.function(input_signature=[tf.TensorSpec([None, 8], tf.float32)])
    def __call__(self, x):
        h = {name: tf.nn.relu(tf.matmul(x, kernel)) for name, kernel in self.kernels.items()}
        small, large = tf.split(h["uneven"], [4, -1], axis=1)
        gate, value = tf.split(h["glu"], 2, axis=1)
        return tf.matmul(small, self.parts[0]) + tf.matmul(large, self.parts[1]) + \
            tf.matmul(tf.nn.silu(gate) * value, self.glu_out)


def test_a_split_along_the_channels_cuts_their_group(tmp_path):
    """Each part of a split is a slice of the channels: its own group where it goes its own way
    (4 + 12 channels, halved: 2 + 6), one group where the parts meet (channel c of the gate and
    of the value: 16 fused channels, 8 pairs, halved: 4 pairs); the split's part sizes follow."""
    path = str(tmp_path / "model")
    tf.saved_model.save(_ChannelSplits(), path)
    pm = graphprune.prune(path, graphprune.ConstantSparsity(0.5, 0), structure="channel", one_shot=True)
    groups = graphprune.channel_groups(pm)
    fused = [group for group in groups if any(m.name == "uneven/kernel" and m.axis == 1 for m in group.members)]
    assert sorted(group.size for group in fused) == [4, 12] and all(group.prunable for group in fused), \
        graphprune.channels.describe(groups)
    glu = [group for group in groups if any(m.name == "glu/kernel" and m.axis == 1 for m in group.members)]
    assert len(glu) == 1 and glu[0].prunable and glu[0].size == 8, graphprune.channels.describe(groups)
    assert sorted(m.start for m in glu[0].members if m.name == "glu/kernel") == [0, 8]
    out = _shrunk_as_masked(pm, tmp_path)
    assert _weight_shape(out, "uneven/kernel") == (8, 8) and _weight_shape(out, "uneven/part12") == (6, 4)
    assert _weight_shape(out, "glu/kernel") == (8, 8) and _weight_shape(out, "glu/out") == (4, 4)
    assert graphprune.cost(out).parameters == _predicted_parameters(pm)


class _RepeatedHeads(tf.Module):
    """Grouped-query attention as TensorFlow code writes it: 2 key/value heads of 4 dims, each shared
    by 2 query heads through tf.repeat (Tile of ExpandDims, reshaped); ``tiled``: by tf.tile with a
    constant count and a constant shape. ``scaled``: the copies are made by hand with a count the
    output is also scaled by (read as a number, it cannot change)."""

    def __init__(self, scaled=False, tiled=False):
        super().__init__()
        rng = np.random.RandomState(0)
        self.scaled, self.tiled = scaled, tiled
        for name, shape in (("query", [8, 16]), ("key", [8, 8]), ("value", [8, 8]), ("out", [16, 8])):
            setattr(self, name, tf.Variable(rng.standard_normal(shape).astype(np.float32) / 2, name=f"gqa/{name}"))

    def _copies(self, heads, count):
        if self.tiled:
            return tf.reshape(tf.tile(tf.expand_dims(heads, 2), [1, 1, 2, 1]), [-1, 4, 4])
        if not self.scaled:
            return tf.repeat(heads, 2, axis=1)
        tiled = tf.tile(tf.expand_dims(heads, 2), tf.stack([1, 1, count, 1]))
        shape = tf.shape(heads)
        return tf.reshape(tiled, tf.concat([shape[:1], [shape[1] * count], shape[2:]], 0))

    @tf.function(input_signature=[tf.TensorSpec([None, 8], tf.float32)])
    def __call__(self, x):
        count = tf.reshape(tf.constant(2), [])
        query = tf.reshape(tf.matmul(x, self.query), [-1, 4, 4])
        key = self._copies(tf.reshape(tf.matmul(x, self.key), [-1, 2, 4]), count)
        value = self._copies(tf.reshape(tf.matmul(x, self.value), [-1, 2, 4]), count)
        weights = tf.nn.softmax(tf.einsum("qhd,khd->hqk", query, key) / 2.0)
        context = tf.reshape(tf.einsum("hqk,khd->qhd", weights, value), [-1, 16])
        out = tf.matmul(context, self.out)
        return out * tf.cast(count, tf.float32) if self.scaled else out


@pytest.mark.parametrize("scaled, tiled", [(False, False), (False, True), (True, False)])
def test_repeated_key_value_heads_and_their_query_heads(tmp_path, scaled, tiled):
    """A key/value head goes with the 2 query heads that share it; the query heads within every
    pair are a group of their own (the copies tf.repeat or tf.tile makes: its count becomes the kept
    count), unless the count is read for anything but sizing the copies."""
    pm, _ = _views_pruned(tmp_path, _RepeatedHeads(scaled, tiled))
    groups = graphprune.channel_groups(pm)
    shared = next(group for group in groups if any(m.name == "gqa/key" and m.axis == 1 and m.block == 4
                                                   for m in group.members))
    assert shared.prunable and shared.size == 2, graphprune.channels.describe(groups)
    within = [group for group in groups if any(m.name == "gqa/query" and (m.period, m.block) == (2, 4)
                                               for m in group.members)]
    assert len(within) == 1 and within[0].size == 2, graphprune.channels.describe(groups)
    assert within[0].prunable != scaled, graphprune.channels.describe(within)
    if scaled:
        assert "Tile" in within[0].reason
    out = _shrunk_as_masked(pm, tmp_path)  # the query/key head dims go too (4 -> 2): scores end in a softmax
    assert _weight_shape(out, "gqa/key") == (8, 1 * 2)
    assert _weight_shape(out, "gqa/query") == (8, (2 if scaled else 1) * 2)
    assert graphprune.cost(out).parameters == _predicted_parameters(pm)


class _FusedHeads(tf.Module):
    """Attention over one fused query-key-value kernel [8, 3 * 2 heads * 4], its output reshaped to
    [.., 3, heads, head_dim] with head_dim computed (C // heads, as Swin writes it) and unstacked."""

    def __init__(self):
        super().__init__()
        rng = np.random.RandomState(0)
        self.qkv = tf.Variable(rng.standard_normal([8, 24]).astype(np.float32) / 2, name="fused/qkv")
        self.out = tf.Variable(rng.standard_normal([8, 8]).astype(np.float32) / 2, name="fused/out")

    @tf.function(input_signature=[tf.TensorSpec([None, 8], tf.float32)])
    def __call__(self, x):
        head_dim = tf.shape(x)[-1] // 2
        qkv = tf.reshape(tf.matmul(x, self.qkv), tf.stack([tf.shape(x)[0], 3, 2, head_dim]))
        query, key, value = tf.unstack(tf.transpose(qkv, [1, 2, 0, 3]))
        weights = tf.nn.softmax(tf.matmul(query, key, transpose_b=True) / 2.0)
        context = tf.reshape(tf.transpose(tf.matmul(weights, value), [1, 0, 2]), [-1, 8])
        return tf.matmul(context, self.out)


def test_fused_query_key_value_heads(tmp_path):
    """A head of a fused kernel is three blocks of its columns (its query, key and value); a head dim
    is one column of each head of each; the selector of query, key or value stays whole."""
    pm, _ = _views_pruned(tmp_path, _FusedHeads())
    groups = graphprune.channel_groups(pm)
    heads = [group for group in groups if ("fused/qkv", 2, 4) in {(m.name, m.period, m.block) for m in group.members}]
    dims = [group for group in groups if ("fused/qkv", 4, None) in {(m.name, m.period, m.block) for m in group.members}]
    assert len(heads) == 1 and heads[0].prunable and heads[0].size == 2, graphprune.channels.describe(groups)
    assert len(dims) == 1 and dims[0].prunable and dims[0].size == 4, graphprune.channels.describe(groups)
    selector = [group for group in groups if ("fused/qkv", None, 8) in {(m.name, m.period, m.block) for m in group.members}]
    assert selector and not any(group.prunable for group in selector)
    out = _shrunk_as_masked(pm, tmp_path)
    assert _weight_shape(out, "fused/qkv") == (8, 3 * 1 * 2) and _weight_shape(out, "fused/out") == (2, 8)
    assert graphprune.cost(out).parameters == _predicted_parameters(pm)


class _OtherBatch(tf.Module):
    """A reshape to [B, -1] whose B is read off the input while the reshaped tensor's batch is 2B:
    the size graphprune would work out by matching unknown batches (6) is not the true one (12)."""

    def __init__(self):
        super().__init__()
        rng = np.random.RandomState(0)
        self.a = tf.Variable(rng.standard_normal([3, 6]).astype(np.float32), name="other/a")
        self.b = tf.Variable(rng.standard_normal([12, 4]).astype(np.float32), name="other/b")

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32)])
    def __call__(self, t):
        x = tf.nn.relu(tf.matmul(tf.concat([t, t * 2.0], 0), self.a))
        return tf.matmul(tf.reshape(x, tf.stack([tf.shape(t)[0], -1])), self.b)


def test_a_size_worked_out_wrongly_is_not_trusted(tmp_path):
    """Sizes worked out from reshapes' shape operands are checked by TensorFlow's own inference;
    where they do not hold, the sizes it inferred stay and the channels stay whole."""
    path = str(tmp_path / "model")
    tf.saved_model.save(_OtherBatch(), path)
    with pytest.warns(UserWarning, match="no channel group can be removed"):
        pm = graphprune.prune(path, graphprune.ConstantSparsity(0.5, 0), structure="channel", one_shot=True)
    assert not any(group.prunable for group in graphprune.channel_groups(pm))
    x = np.random.RandomState(1).standard_normal([5, 3]).astype(np.float32)
    np.testing.assert_allclose(pm(x).numpy(), tf.saved_model.load(path)(x).numpy(), rtol=1e-6)


class _ScoredHeads(tf.Module):
    """Attention with biased query and key projections (2 heads of 4 dims): ``scores`` is what reads
    q.k: "softmax" (scaled, a causal mask added), "sigmoid" (which a shift changes), or "sized"
    (a softmax of scores scaled by the head dim read off the query's shape). Its variables are
    named under ``prefix``."""

    def __init__(self, scores="softmax", prefix="scored"):
        super().__init__()
        rng = np.random.RandomState(0)
        self.scores = scores
        for name, shape in (("query", [8, 2, 4]), ("key", [8, 2, 4]), ("value", [8, 2, 4]), ("out", [2, 4, 8])):
            setattr(self, name, tf.Variable(rng.standard_normal(shape).astype(np.float32) / 2, name=f"{prefix}/{name}"))
        for name in ("query", "key", "value"):
            setattr(self, f"{name}_bias", tf.Variable(rng.standard_normal([2, 4]).astype(np.float32),
                                                      name=f"{prefix}/{name}_bias"))

    @tf.function(input_signature=[tf.TensorSpec([None, 8], tf.float32)])
    def __call__(self, x):
        return self._attend(x)

    def _attend(self, x):
        q, k, v = (tf.einsum("nc,chd->nhd", x, getattr(self, name)) + getattr(self, f"{name}_bias")
                   for name in ("query", "key", "value"))
        scores = tf.einsum("qhd,khd->hqk", q, k)
        if self.scores == "sigmoid":
            weights = tf.sigmoid(scores)
        else:
            scale = tf.math.rsqrt(tf.cast(tf.shape(q)[-1], tf.float32)) if self.scores == "sized" else 0.5
            causal = tf.linalg.band_part(tf.ones_like(scores), -1, 0)
            weights = tf.nn.softmax(tf.where(causal > 0, scores * scale, -1e9))
        return tf.einsum("qhd,hdo->qo", tf.einsum("hqk,khd->qhd", weights, v), self.out)


@pytest.mark.parametrize("scores", ["softmax", "sigmoid", "sized"])
def test_query_key_head_dims_read_by_a_softmax(tmp_path, scores):
    """The query's and the key's head dim j are contracted with each other, consumed by no kernel:
    removed from both projections (their biases too), q.k loses the same constant bq_j * bk_j in
    every score, which no softmax sees. So they go where every use of q.k ends in softmaxes through
    shifts, selects and scales (a scale read off the head dim's size too: the shrunk model scales
    by the size it had). A sigmoid of the scores would see that constant: there insert_masks
    zeroes the removed dims of the queries (names.kept_product), bias and all, so they go too.
    The shrunk model computes the masked one, biases and causal mask included."""
    pm, _ = _views_pruned(tmp_path, _ScoredHeads(scores))
    groups = graphprune.channel_groups(pm)
    dims = next(group for group in groups if any(m.name == "scored/query" and m.axis == 2 for m in group.members))
    assert {m.name for m in dims.members} >= {"scored/query", "scored/key", "scored/query_bias", "scored/key_bias"}
    assert dims.prunable, graphprune.channels.describe([dims])
    zeroed = [n.name for n in pm.traced.entries[0].graph_def.node if names.kept_product_part(n.name) == "apply"]
    assert len(zeroed) == (scores == "sigmoid")  # only where a shift would show
    out = _shrunk_as_masked(pm, tmp_path)
    assert _weight_shape(out, "scored/key")[2] == 2
    assert graphprune.cost(out).parameters == _predicted_parameters(pm)


class _PositionedHeads(_ScoredHeads):
    """_ScoredHeads whose query and key "biases" are tables of a row per position ([5, 2, 4]:
    learned positions added after the projections): a removed dim holds another value at every
    position, so its part of q.k changes from key to key, and the softmax sees it."""

    def __init__(self):
        super().__init__()
        rng = np.random.RandomState(3)
        for name in ("query", "key"):
            setattr(self, f"{name}_bias", tf.Variable(rng.standard_normal([5, 2, 4]).astype(np.float32),
                                                      name=f"scored/{name}_bias"))

    @tf.function(input_signature=[tf.TensorSpec([5, 8], tf.float32)])
    def __call__(self, x):
        return self._attend(x)


class _NullKeyAttention(tf.Module):
    """One head of 4 dims over 2-D tokens [n, 8] with biased projections, and a learned null key
    and value concatenated before the tokens' (one more key every query may attend to)."""

    def __init__(self):
        super().__init__()
        rng = np.random.RandomState(4)
        for name, shape in (("query", [8, 4]), ("key", [8, 4]), ("value", [8, 4]), ("out", [4, 8]),
                            ("query_bias", [4]), ("key_bias", [4]), ("value_bias", [4]),
                            ("null_key", [1, 4]), ("null_value", [1, 4])):
            setattr(self, name, tf.Variable(rng.standard_normal(shape).astype(np.float32), name=f"null/{name}"))

    @tf.function(input_signature=[tf.TensorSpec([None, 8], tf.float32)])
    def __call__(self, x):
        q, k, v = (tf.matmul(x, getattr(self, name)) + getattr(self, f"{name}_bias") for name in ("query", "key", "value"))
        k, v = tf.concat([self.null_key, k], 0), tf.concat([self.null_value, v], 0)
        return tf.matmul(tf.matmul(tf.nn.softmax(tf.matmul(q, k, transpose_b=True)), v), self.out)


@pytest.mark.parametrize("kind", ["table", "null_key"])
def test_query_key_dims_whose_removed_values_change_by_position(tmp_path, kind):
    """A removed query/key dim was taken to hold one value (its bias) wherever any variable was
    added or concatenated, which a softmax ignores. Two that are not one value: a table of a row
    per position added after the projections ("table", [5, heads, dims]), and a learned null key
    concatenated before the keys ("null_key"). The scores then changed from key to key, and
    finalize refused the shrunk model (0.235 and 0.208 of output scales 3.77 and 3.85). Only a
    weight of one value per channel is a bias now, and parts side by side are one value only where
    all are zero; otherwise insert_masks zeroes the removed dims of the queries, and they go exactly."""
    module, prefix, axis, bias = {"table": (_PositionedHeads(), "scored", 2, "scored/key_bias"),
                                  "null_key": (_NullKeyAttention(), "null", 1, "null/null_key")}[kind]
    pm, _ = _views_pruned(tmp_path, module)
    dims = next(group for group in graphprune.channel_groups(pm)
                if any(m.name == f"{prefix}/query" and m.axis == axis for m in group.members))
    assert dims.prunable, graphprune.channels.describe([dims])
    zeroed = [n.name for n in pm.traced.entries[0].graph_def.node if names.kept_product_part(n.name) == "apply"]
    assert len(zeroed) == 1
    out = _shrunk_as_masked(pm, tmp_path)
    assert _weight_shape(out, f"{prefix}/key")[axis] == _weight_shape(out, bias)[-1] == 2
    # the table's static length makes the causal mask's ones a float constant of the scores' shape [2, 5, 5]
    assert graphprune.cost(out).parameters == _predicted_parameters(pm) + (2 * 5 * 5 if kind == "table" else 0)


class _ScoredAndReadHeads(_ScoredHeads):
    """The query's head dims also read by a kernel, whose rows for dim 1 hold zeros."""

    def __init__(self, scores="softmax"):
        super().__init__(scores)
        reader = np.random.RandomState(1).standard_normal([2, 4, 8]).astype(np.float32)
        reader[:, 1, :] = 0.0
        self.reader = tf.Variable(reader, name="scored/reader")

    @tf.function(input_signature=[tf.TensorSpec([None, 8], tf.float32)])
    def __call__(self, x):
        q = tf.einsum("nc,chd->nhd", x, self.query) + self.query_bias
        return super().__call__(x) + tf.einsum("qhd,hdo->qo", q, self.reader)


@pytest.mark.parametrize("scores", ["softmax", "sigmoid"])
def test_query_key_head_dims_read_by_a_kernel_too_stay_where_their_projections_make_them(tmp_path, scores):
    """Dim 1 of the query heads is read by no kernel (zero rows), but q.k still sums over it: it
    is alive while the query and key kernels make it, so the shrunk model keeps it. Under a
    sigmoid (which a bias's constant would shift) the dims stay whole, a kernel reading them or not:
    unstructured pruning does not zero the removed dims of a product (only the channel structure does)."""
    path = str(tmp_path / "model")
    tf.saved_model.save(_ScoredAndReadHeads(scores), path)
    pm = graphprune.prune(path, graphprune.ConstantSparsity(0.25, 0), one_shot=True)  # unstructured
    dims = next(group for group in graphprune.channel_groups(pm)
                if any(m.name == "scored/query" and m.axis == 2 for m in group.members))
    assert ("scored/reader", 1, "in") in {(m.name, m.axis, m.role) for m in dims.members}
    assert dims.contracted and dims.prunable == (scores == "softmax"), graphprune.channels.describe([dims])
    x = np.random.RandomState(2).standard_normal([5, 8]).astype(np.float32)
    masked = pm(x).numpy()
    out = graphprune.finalize(pm, str(tmp_path / "small"), shrink=True)
    np.testing.assert_allclose(tf.saved_model.load(out)(x).numpy(), masked, atol=1e-5 * np.abs(masked).max(), rtol=0)
    assert _weight_shape(out, "scored/query")[2] == 4 and _weight_shape(out, "scored/reader")[1] == 4


class _RelativeHeads(_ScoredHeads):
    """ViTDet's attention in small: _ScoredHeads' biased projections (under "rel/"), scores plus
    relative positions (the queries times a table gathered by each key's offset, a table no kernel
    reads: an activation), a softmax. ``layout`` "last": the head dims are the last axis of both
    operands of the table product; "first": their first axis."""

    def __init__(self, layout="last"):
        super().__init__(prefix="rel")
        self.layout = layout
        self.table = tf.Variable(np.random.RandomState(1).standard_normal([15, 4]).astype(np.float32) / 2,
                                 name="rel/table")

    @tf.function(input_signature=[tf.TensorSpec([None, 8], tf.float32)])
    def __call__(self, x):
        q, k, v = (tf.einsum("nc,chd->nhd", x, getattr(self, name)) + getattr(self, f"{name}_bias")
                   for name in ("query", "key", "value"))
        steps = tf.range(tf.shape(x)[0])
        table = tf.gather(self.table, steps[:, None] - steps[None, :] + 7)  # [queries, keys, head dims]
        if self.layout == "last":
            relative = tf.einsum("qhd,qkd->hqk", q, table)
        else:
            relative = tf.einsum("dhq,dqk->hqk", tf.transpose(q, [2, 1, 0]), tf.transpose(table, [2, 0, 1]))
        weights = tf.nn.softmax(tf.einsum("qhd,khd->hqk", q, k) * 0.5 + relative)
        return tf.einsum("qhd,hdo->qo", tf.einsum("hqk,khd->qhd", weights, v), self.out)


def test_a_product_read_by_more_than_a_softmax(tmp_path):
    """The relative positions multiply the queries by a table: a removed query dim whose bias is
    left would add bq_j * table[.., j], which differs from key to key, so no softmax absorbs it.
    insert_masks zeroes the removed dims of the queries that product reads (names.kept_product:
    the head dims' 0/1 vector, read off the query kernel's mask), so the head dims go, with the
    table's column; all-ones masks change nothing; shrink_channels drops that Mul once every kept
    dim is whole and keeps it where round_to keeps removed dims back. The head dims first in both
    operands (no last axis to zero) stay whole, with the reason; each shrunk model computes the masked one."""
    path = str(tmp_path / "model")
    module = _RelativeHeads()
    tf.saved_model.save(module, path)
    x = np.random.RandomState(1).standard_normal([5, 8]).astype(np.float32)
    untouched = graphprune.prune(path, graphprune.PolynomialDecay(0.0, 0.5, 0, 10), structure="channel")
    np.testing.assert_allclose(untouched(x).numpy(), module(x).numpy(), rtol=1e-6, atol=1e-6)

    pm, _ = _views_pruned(tmp_path, module)
    dims = next(group for group in graphprune.channel_groups(pm)
                if any(m.name == "rel/query" and m.axis == 2 for m in group.members))
    assert dims.prunable and ("rel/table", 1) in {(m.name, m.axis) for m in dims.members}, channels.describe([dims])
    zeroed = [n for n in pm.traced.entries[0].graph_def.node if names.kept_product_part(n.name) == "apply"]
    product = next(n for n in pm.traced.entries[0].graph_def.node if zeroed and zeroed[0].name.startswith(n.name + "/"))
    assert len(zeroed) == 1 and product.attr["equation"].s == b"qhd,qkd->hqk"  # the table's, not q.k
    out = _shrunk_as_masked(pm, tmp_path)
    assert _weight_shape(out, "rel/key")[2] == 2 and _weight_shape(out, "rel/table") == (15, 2)
    assert graphprune.cost(out).parameters == _predicted_parameters(pm)
    shrunk = tf.saved_model.load(out)
    graph_nodes = shrunk.__call__.get_concrete_function().graph.as_graph_def()
    assert not any(names.kept_product_part(n.name) for n in graph_nodes.node)  # the Mul went with the dims

    # round_to=8 keeps 4 of 4 dims (8 values of the two heads): the removed two are kept back, still zeroed
    rounded = graphprune.prune(path, graphprune.ConstantSparsity(0.5, 0), structure="channel", one_shot=True,
                               round_to=8)
    kept_back = _shrunk_as_masked(rounded, tmp_path, "rounded")
    assert _weight_shape(kept_back, "rel/key")[2] == 4

    first = str(tmp_path / "first")
    tf.saved_model.save(_RelativeHeads("first"), first)
    pm = graphprune.prune(first, graphprune.ConstantSparsity(0.5, 0), structure="channel", one_shot=True)
    dims = next(group for group in graphprune.channel_groups(pm)
                if any(m.name == "rel/query" and m.axis == 2 for m in group.members))
    assert not dims.prunable and "more than a softmax" in dims.reason, channels.describe([dims])
    whole = _shrunk_as_masked(pm, tmp_path, "whole")
    assert _weight_shape(whole, "rel/key")[2] == 4


class _SqueezedBias(tf.Module):
    """A layer of 2 neurons whose bias is stored [1, 2] and read through tf.squeeze with no axis
    (keras-hub EfficientNet's squeeze-and-excite convs): once 1 neuron is left, a plain Squeeze
    would drop the channel axis too."""

    def __init__(self):
        super().__init__()
        rng = np.random.RandomState(0)
        self.kernel = tf.Variable(rng.standard_normal([8, 2]).astype(np.float32), name="squeezed/kernel")
        self.bias = tf.Variable(rng.standard_normal([1, 2]).astype(np.float32), name="squeezed/bias")
        self.head = tf.Variable(rng.standard_normal([2, 4]).astype(np.float32), name="squeezed/head")

    @tf.function(input_signature=[tf.TensorSpec([None, 8], tf.float32)])
    def __call__(self, x):
        return tf.matmul(tf.nn.relu(tf.nn.bias_add(tf.matmul(x, self.kernel), tf.squeeze(self.bias))), self.head)


def test_a_squeeze_of_every_size_1_axis_keeps_a_channel_axis_of_1(tmp_path):
    pm, groups = _views_pruned(tmp_path, _SqueezedBias())
    assert groups["squeezed"].prunable, graphprune.channels.describe(groups.values())
    out = _shrunk_as_masked(pm, tmp_path)
    assert _weight_shape(out, "squeezed/kernel") == (8, 1) and _weight_shape(out, "squeezed/bias") == (1, 1)


class _CosineTowers(tf.Module):
    """Two towers projected to 4 channels, L2-normalized (tf.math.l2_normalize: a Sum of squares
    over the channels) and compared by a product over them, as CLIP's and SigLIP's heads do.
    ``kind``: "plain" (projections without biases), "biased" (a bias after each projection) or
    "max" (the largest projected value is an output too)."""

    def __init__(self, kind: str):
        super().__init__()
        rng = np.random.RandomState(0)
        self.kind = kind
        self.hidden = [tf.Variable(rng.standard_normal([8, 6]).astype(np.float32), name=f"tower{i}/kernel")
                       for i in range(2)]
        self.project = [tf.Variable(rng.standard_normal([6, 4]).astype(np.float32), name=f"project{i}/kernel")
                        for i in range(2)]
        self.bias = [tf.Variable(rng.standard_normal([4]).astype(np.float32), name=f"project{i}/bias")
                     for i in range(2)]

    @tf.function(input_signature=[tf.TensorSpec([None, 8], tf.float32)])
    def __call__(self, x):
        towers = []
        for hidden, project, bias in zip(self.hidden, self.project, self.bias):
            e = tf.matmul(tf.nn.relu(tf.matmul(x, hidden)), project)
            towers.append(e + bias if self.kind == "biased" else e)
        a, b_ = (tf.math.l2_normalize(e, -1) for e in towers)
        logits = tf.matmul(a, b_, transpose_b=True) * 3.0
        if self.kind == "max":
            return logits + tf.reduce_max(towers[0], -1, keepdims=True)
        return logits


@pytest.mark.parametrize("kind", ["plain", "biased", "max"])
def test_channels_summed_over(tmp_path, kind):
    """A Sum over the channels was "an op graphprune does not model": an L2 norm's kept the
    projections' channels whole (keras-hub CLIP's and MetaCLIP 2's projection_dim). A removed
    channel adds what it holds to a Sum: nothing where it is zero (a projection without a bias,
    squared), so the Sum is read as a product of two activations is (channels._contracted): the
    projections' channels go. With biases, insert_masks zeroes the removed channels in what the
    Sum and the product read (names.kept_product); a Max over them still keeps them whole."""
    pm, _ = _views_pruned(tmp_path, _CosineTowers(kind))
    group = next(group for group in graphprune.channel_groups(pm)
                 if any(m.name == "project0/kernel" and m.axis == 1 for m in group.members))
    assert {(m.name, m.axis, m.role) for m in group.members} >= {("project0/kernel", 1, "out"),
                                                                 ("project1/kernel", 1, "out")}
    out = _shrunk_as_masked(pm, tmp_path)
    if kind == "max":
        assert not group.prunable and "Max" in group.reason, channels.describe([group])
        assert _weight_shape(out, "project0/kernel")[1] == 4
        return
    assert group.prunable and group.size == 4, channels.describe([group])
    zeroed = [n for n in pm.traced.entries[0].graph_def.node if names.kept_product_part(n.name) == "apply"]
    assert len(zeroed) == (3 if kind == "biased" else 0)  # both Sums, and one operand of the product
    assert _weight_shape(out, "project0/kernel") == (_weight_shape(out, "project0/kernel")[0], 2)
    assert _weight_shape(out, "project1/kernel")[1] == 2
    assert graphprune.cost(out).parameters == _predicted_parameters(pm)


@pytest.mark.slow
def test_keras_hub_clip_projections(tmp_path):
    """keras-hub CLIP from its config: the head L2-normalizes both projections (a Sum of squares
    over projection_dim) and multiplies them. The projections' channels were left whole ("Sum
    'clip_head/Sum' reduces over the channels"); now they go, with both towers' heads and MLP
    neurons, and the shrunk model computes the masked one's logits."""
    import keras_hub

    models = keras_hub.models
    model = models.CLIPBackbone(
        models.CLIPVisionEncoder(patch_size=8, hidden_dim=16, num_layers=1, num_heads=2, intermediate_dim=32,
                                 image_shape=(32, 32, 3)),
        models.CLIPTextEncoder(vocabulary_size=50, embedding_dim=16, hidden_dim=16, num_layers=1, num_heads=2,
                               intermediate_dim=32, max_sequence_length=8),
        projection_dim=16)
    model.export(str(tmp_path / "export"), verbose=False)
    pm = graphprune.prune(str(tmp_path / "export"), graphprune.ConstantSparsity(0.5, 0), structure="channel",
                          one_shot=True)
    groups = graphprune.channel_groups(pm)
    projections = next(group for group in groups
                       if any(m.name == "text_projection/kernel" and m.axis == 1 for m in group.members))
    assert projections.prunable and projections.size == 16, channels.describe([projections])
    assert ("vision_projection/kernel", 1) in {(m.name, m.axis) for m in projections.members}
    # heads and their query/key and value dims, MLP neurons, of both towers; the projections
    assert sorted(group.size for group in groups if group.prunable) == [2, 2, 8, 8, 8, 8, 16, 32, 32]
    rng = np.random.RandomState(0)
    inputs = {"images": tf.constant(rng.standard_normal([2, 32, 32, 3]).astype(np.float32)),
              "token_ids": tf.constant(rng.randint(0, 50, size=(2, 8)), tf.int32)}
    out = _hub_shrunk_as_masked(pm, tmp_path, inputs)
    assert _weight_shape(out, "text_projection/kernel")[1] == 8
    assert graphprune.cost(out).parameters == _predicted_parameters(pm)


class _GroupedConvs(tf.Module):
    """Conv2D with groups: one channel per group (Keras's Conv2D(groups=C), a depthwise conv as
    HGNetV2 writes it) follows its channels; two groups of 4 inputs and 4 outputs split x's and the
    output's channels into groups x channels within a group; the grouped output is concatenated."""

    def __init__(self):
        super().__init__()
        rng = np.random.RandomState(0)

        def variable(name, *shape):
            return tf.Variable(rng.standard_normal(shape).astype(np.float32), name=name)

        self.expand = variable("expand/kernel", 1, 1, 3, 8)
        self.depthwise = variable("depthwise/kernel", 3, 3, 1, 8)
        self.project = variable("project/kernel", 1, 1, 8, 4)
        self.wide = variable("wide/kernel", 1, 1, 3, 8)
        self.wide_bias = variable("wide/bias", 8)
        self.grouped = variable("grouped/kernel", 3, 3, 4, 8)
        self.head = variable("head/kernel", 12, 4)

    @tf.function(input_signature=[tf.TensorSpec([None, 6, 6, 3], tf.float32)])
    def __call__(self, x):
        y = tf.nn.relu(tf.nn.conv2d(x, self.expand, 1, "SAME"))
        y = tf.nn.relu(tf.nn.conv2d(y, self.depthwise, 1, "SAME"))
        y = tf.nn.conv2d(y, self.project, 1, "SAME")
        z = tf.nn.conv2d(tf.nn.relu(tf.nn.conv2d(x, self.wide, 1, "SAME") + self.wide_bias), self.grouped, 1, "SAME")
        return tf.matmul(tf.reduce_mean(tf.concat([y, z], -1), [1, 2]), self.head)


def test_grouped_convs_one_channel_per_group_and_several(tmp_path):
    path = str(tmp_path / "model")
    tf.saved_model.save(_GroupedConvs(), path)
    pm = graphprune.prune(path, graphprune.ConstantSparsity(0.5, 0), structure="channel", one_shot=True)
    groups = {group.name: group for group in graphprune.channel_groups(pm)}
    described = graphprune.channels.describe(groups.values())
    assert groups["expand/kernel:3"].prunable, described
    assert {(m.name, m.axis, m.role) for m in groups["expand/kernel:3"].members} >= {
        ("expand/kernel", 3, "out"), ("depthwise/kernel", 3, "through"), ("project/kernel", 2, "in")}
    # input i of each group: wide's columns i and 4 + i, its bias, the grouped kernel's row i
    within = groups["wide/kernel:3[0:4] every 4"]
    assert within.prunable, described
    assert {(m.name, m.axis, m.role, m.period) for m in within.members} == {
        ("wide/kernel", 3, "out", 4), ("wide/bias", 0, "param", 4), ("grouped/kernel", 2, "in", None)}
    kept = groups["wide/kernel:3[0:2] heads of 4"]  # the two groups themselves
    assert not kept.prunable and "2 groups of grouped Conv2D" in kept.reason
    # the grouped output is a slice of a concatenation: left whole; the other slice is not
    assert not groups["grouped/kernel:3"].prunable and "concatenation" in groups["grouped/kernel:3"].reason
    assert groups["project/kernel:3"].prunable, described
    x = np.random.RandomState(1).standard_normal([2, 6, 6, 3]).astype(np.float32)
    masked = pm(x).numpy()
    out = graphprune.finalize(pm, str(tmp_path / "small"), shrink=True)
    np.testing.assert_allclose(tf.saved_model.load(out)(x).numpy(), masked, atol=1e-5 * np.abs(masked).max(), rtol=0)
    assert _weight_shape(out, "depthwise/kernel") == (3, 3, 1, 4)
    assert _weight_shape(out, "grouped/kernel") == (3, 3, 2, 8)  # two inputs of each group went
    assert _weight_shape(out, "wide/kernel") == (1, 1, 3, 4) and _weight_shape(out, "wide/bias") == (4,)
    assert graphprune.cost(out).parameters == _predicted_parameters(pm)


class _GroupedConvsOfTwoSizes(tf.Module):
    """Channels read by grouped convs of 4 groups of 2 and 2 groups of 4 (one channel, two group
    shapes: whole, whichever is refined first), the input of one a concatenation of one group each."""

    def __init__(self):
        super().__init__()
        rng = np.random.RandomState(0)

        def variable(name, *shape):
            return tf.Variable(rng.standard_normal(shape).astype(np.float32), name=name)

        self.a, self.b = variable("a/kernel", 1, 1, 3, 4), variable("b/kernel", 1, 1, 3, 4)
        self.g1 = variable("g1/kernel", 3, 3, 4, 8)  # on concat([a, b]): 2 groups of 4
        self.skip = variable("skip/kernel", 1, 1, 3, 8)
        self.g2 = variable("g2/kernel", 3, 3, 2, 8)  # 4 groups of 2 on g1 + skip ...
        self.g3 = variable("g3/kernel", 3, 3, 4, 8)  # ... and 2 groups of 4
        self.head = variable("head/kernel", 1, 1, 16, 5)

    @tf.function(input_signature=[tf.TensorSpec([None, 6, 6, 3], tf.float32)])
    def __call__(self, x):
        ab = tf.nn.relu(tf.concat([tf.nn.conv2d(x, self.a, 1, "SAME"), tf.nn.conv2d(x, self.b, 1, "SAME")], -1))
        y = tf.nn.relu(tf.nn.conv2d(ab, self.g1, 1, "SAME") + tf.nn.conv2d(x, self.skip, 1, "SAME"))
        z = tf.concat([tf.nn.conv2d(y, self.g2, 1, "SAME"), tf.nn.conv2d(y, self.g3, 1, "SAME")], -1)
        return tf.reduce_mean(tf.nn.conv2d(tf.nn.relu(z), self.head, 1, "SAME"), [1, 2])


class _GroupedConvsInBodies(tf.Module):
    """A grouped conv in a loop body (the state it carries) and one in a tf.cond branch."""

    def __init__(self):
        super().__init__()
        rng = np.random.RandomState(0)

        def variable(name, *shape):
            return tf.Variable(0.3 * rng.standard_normal(shape).astype(np.float32), name=name)

        self.expand, self.looped = variable("expand/kernel", 1, 1, 3, 8), variable("looped/kernel", 3, 3, 4, 8)
        self.branch, self.head = variable("branch/kernel", 3, 3, 4, 8), variable("head/kernel", 1, 1, 8, 5)

    @tf.function(input_signature=[tf.TensorSpec([None, 6, 6, 3], tf.float32)])
    def __call__(self, x):
        y = tf.nn.relu(tf.nn.conv2d(x, self.expand, 1, "SAME"))
        y = tf.while_loop(lambda i, y: i < 2,
                          lambda i, y: (i + 1, tf.nn.relu(tf.nn.conv2d(y, self.looped, 1, "SAME"))), (0, y))[1]
        y = tf.cond(tf.reduce_sum(x) > 0, lambda: tf.nn.conv2d(y, self.branch, 1, "SAME"), lambda: y)
        return tf.reduce_mean(tf.nn.conv2d(y, self.head, 1, "SAME"), [1, 2])


@pytest.mark.parametrize("module", [_GroupedConvsOfTwoSizes, _GroupedConvsInBodies])
def test_grouped_convs_of_two_sizes_and_in_bodies(tmp_path, module):
    path = str(tmp_path / "model")
    tf.saved_model.save(module(), path)
    pm = graphprune.prune(path, graphprune.ConstantSparsity(0.5, 0), structure="channel", one_shot=True)
    groups = {group.name: group for group in graphprune.channel_groups(pm)}
    described = graphprune.channels.describe(groups.values())
    if module is _GroupedConvsOfTwoSizes:
        assert "two different sizes" in groups["g1/kernel:3[0:4] every 4"].reason
        # g1's groups are a's and b's channels: input i of each group is channel i of a and of b
        assert [name for name, group in groups.items() if group.prunable] == ["a/kernel:3"], described
        assert {(m.name, m.axis, m.role) for m in groups["a/kernel:3"].members} == {
            ("a/kernel", 3, "out"), ("b/kernel", 3, "out"), ("g1/kernel", 2, "in")}
    else:
        within = next(group for group in groups.values() if group.name.endswith(":3[0:4] every 4"))
        assert within.prunable, described
        assert {(m.name, m.axis, m.role) for m in within.members} >= {
            ("looped/kernel", 2, "in"), ("looped/kernel", 3, "out"), ("branch/kernel", 2, "in")}
    x = np.random.RandomState(1).standard_normal([2, 6, 6, 3]).astype(np.float32)
    masked = pm(x).numpy()
    out = graphprune.finalize(pm, str(tmp_path / "small"), shrink=True)
    np.testing.assert_allclose(tf.saved_model.load(out)(x).numpy(), masked, atol=1e-5 * np.abs(masked).max(), rtol=0)
    assert graphprune.cost(out).parameters == _predicted_parameters(pm)
    if module is _GroupedConvsOfTwoSizes:
        assert _weight_shape(out, "a/kernel") == _weight_shape(out, "b/kernel") == (1, 1, 3, 2)
        assert _weight_shape(out, "g1/kernel") == (3, 3, 2, 8)
    else:
        assert _weight_shape(out, "expand/kernel") == (1, 1, 3, 4) and _weight_shape(out, "head/kernel") == (1, 1, 4, 5)


def _grouped_conv_models():
    """Public models with grouped convolutions of several channels per group: tf-keras's RegNetY
    (group width 8, squeeze-and-excitation; Keras 2 runs groups as a plain Conv2D) and a keras-hub
    CSPResNeXt-style CSPNet (4 groups, cross_linear; Keras 3 runs groups in an XLA function)."""
    def regnet():
        import tf_keras

        tf_keras.utils.set_random_seed(0)
        model = tf_keras.applications.RegNetY002(weights=None, input_shape=(64, 64, 3))
        return model, lambda path: tf.saved_model.save(model, path), \
            lambda loaded, x: next(iter(loaded.signatures["serving_default"](tf.constant(x)).values()))

    def cspnet():
        import keras
        import keras_hub

        keras.utils.set_random_seed(0)
        model = keras_hub.models.CSPNetBackbone(
            stem_filters=16, stem_kernel_size=3, stem_strides=4, stem_pooling="max", stackwise_depth=[1, 2],
            stackwise_strides=[1, 2], stackwise_num_filters=[64, 128], block_type="bottleneck_block", groups=4,
            stage_type="csp", cross_linear=True, expand_ratio=[2.0], image_shape=(64, 64, 3))
        return model, lambda path: model.export(path, verbose=False), lambda loaded, x: loaded.serve(x)

    return {"regnety": regnet, "cspnet": cspnet}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["regnety", "cspnet"])
def test_public_grouped_convs_shrink(tmp_path, name):
    model, export, call = _grouped_conv_models()[name]()
    x = np.random.RandomState(0).uniform(0, 255, [4, 64, 64, 3]).astype(np.float32)
    model(x, training=True)  # batch-norm statistics from the inputs
    export(str(tmp_path / "export"))
    pm = graphprune.prune(str(tmp_path / "export"), graphprune.ConstantSparsity(0.5, 0), structure="channel",
                          one_shot=True)
    groups = graphprune.channel_groups(pm)
    grouped = [group for group in groups if "groups of grouped Conv2D" in (group.reason or "")]
    assert len(grouped) >= 3  # every block's grouped conv: its group count kept ...
    within = [group for group in groups if group.prunable and any(
        m.role == "in" and m.name.endswith(("conv_3x3/kernel", "block_conv_2/kernel")) for m in group.members)]
    assert len(within) >= 3  # ... its inputs within each group prunable
    masked = call(pm, x).numpy()
    scale = float(np.abs(masked).max())
    assert scale > 1e-2, scale  # outputs that mean something
    # batch norms kept, as the masks predict the parameters (as _hub_shrunk_as_masked)
    out = graphprune.finalize(pm, str(tmp_path / "small"), shrink=True, fold_batch_norms=False)
    np.testing.assert_allclose(call(tf.saved_model.load(out), x).numpy(), masked, atol=1e-5 * scale, rtol=0)
    assert _kernel_shapes(out) == _predicted_shapes(pm)
    before, after = graphprune.cost(str(tmp_path / "export")), graphprune.cost(out)
    assert after.parameters == _predicted_parameters(pm) and after.flops < 0.5 * before.flops
    outcome = check_tflite(out, str(tmp_path / "small.tflite"), x[:1], masked[:1], scale, tolerance=1e-2)
    assert outcome == "ok", outcome


class _SizeRead(_HiddenLayers):
    """A fixed-width tensor reshaped to tf.shape(hidden layer): once the layer lost channels, the
    reshape would ask for the new size; the layer must stay whole. A zeros tensor of another
    layer's shape follows that layer instead."""

    def __init__(self):
        super().__init__(("read", "zeros"))

    @tf.function(input_signature=[tf.TensorSpec([None, 8], tf.float32)])
    def __call__(self, x):
        h = {name: tf.nn.relu(tf.matmul(x, kernel)) for name, kernel in self.kernels.items()}
        fixed = tf.reduce_sum(tf.reshape(tf.concat([x, x], 1), tf.shape(h["read"])), -1, keepdims=True)
        zeros = tf.zeros(tf.shape(h["zeros"]))
        return tf.matmul(h["read"], self.heads["read"]) + fixed + tf.matmul(h["zeros"] + zeros, self.heads["zeros"])


def test_a_size_read_into_another_tensor_keeps_its_channels_whole(tmp_path):
    pm, groups = _views_pruned(tmp_path, _SizeRead())
    assert not groups["read"].prunable and "reads its size into Reshape" in groups["read"].reason
    assert groups["zeros"].prunable, graphprune.channels.describe(groups.values())
    out = _shrunk_as_masked(pm, tmp_path)
    assert _weight_shape(out, "read/kernel") == (8, 16) and _weight_shape(out, "zeros/kernel") == (8, 8)


class _ConstantFills(_HiddenLayers):
    """Hidden layers meeting tensors filled with one value: of a constant shape (tf.fill) and of a
    shape packed from the batch size and a constant width (tf.ones(tf.stack(...)), as T5 builds
    its zero position bias); each follows the channels it meets."""

    def __init__(self):
        super().__init__(("fill", "packed"))

    @tf.function(input_signature=[tf.TensorSpec([None, 8], tf.float32)])
    def __call__(self, x):
        h = {name: tf.nn.relu(tf.matmul(x, kernel)) for name, kernel in self.kernels.items()}
        filled = h["fill"] + tf.fill([1, 16], 0.5)
        packed = h["packed"] * tf.ones(tf.stack([tf.shape(x)[0], 16]))
        return tf.matmul(filled, self.heads["fill"]) + tf.matmul(packed, self.heads["packed"])


def test_a_constant_fill_follows_the_channels_it_meets(tmp_path):
    pm, groups = _views_pruned(tmp_path, _ConstantFills())
    assert all(group.prunable for group in groups.values()), graphprune.channels.describe(groups.values())
    out = _shrunk_as_masked(pm, tmp_path)
    assert _weight_shape(out, "fill/kernel") == (8, 8) and _weight_shape(out, "packed/kernel") == (8, 8)


@pytest.mark.slow
def test_keras_hub_t5_cross_attention_heads(tmp_path):
    """T5's attention (encoder, decoder and the decoder's cross-attention) adds a position bias; in
    cross-attention it is a zeros tensor [1, heads, query, key] whose head count is a constant of
    its packed shape. Every layer's heads are prunable, and the shrunk model computes the masked one."""
    import keras_hub

    keras_hub.models.T5Backbone(vocabulary_size=50, num_layers=1, num_heads=2, hidden_dim=16, intermediate_dim=32,
                                key_value_dim=8).export(str(tmp_path / "export"), verbose=False)
    pm = graphprune.prune(str(tmp_path / "export"), graphprune.ConstantSparsity(0.5, 0), structure="channel",
                          one_shot=True)
    groups = graphprune.channel_groups(pm)
    heads = {m.name.rpartition("/query_projector")[0]: group for group in groups for m in group.members
             if m.name.endswith("query_projector/kernel") and m.axis == 1 and m.block == 8}
    assert set(heads) == {"transformer_encoder_layer_0/self_attention", "transformer_decoder_layer_0/self_attention",
                          "transformer_decoder_layer_0/cross_attention"}, graphprune.channels.describe(groups)
    assert all(group.prunable and group.size == 2 for group in heads.values()), graphprune.channels.describe(groups)
    out = _hub_shrunk_as_masked(pm, tmp_path)
    key = "transformer_decoder_layer_0/cross_attention/query_projector/kernel"  # half the heads, half their dims
    assert _weight_shape(out, key)[1] == _weight_shape(str(tmp_path / "export"), key)[1] // 4
    assert graphprune.cost(out).parameters == _predicted_parameters(pm)


_HGNET_LIGHT = "encoder/encoder_stage_1/encoder_stage_1_block_0/encoder_stage_1_block_0_light_block_0/" \
    "encoder_stage_1_block_0_light_block_0_"


def test_group_norms_lose_whole_groups(tmp_path):
    """Keras's GroupNormalization splits the channels into [groups, C / groups], averages over each
    group and scales by gamma and beta reshaped the same way: a channel cannot go alone, a whole
    group can (the other groups' statistics do not change). Nonzero gamma and beta, two group
    norms (4 groups of 4, 8 of 2); the keras-hub VAE (Stable Diffusion 3's) shrinks exactly."""
    import keras

    keras.utils.set_random_seed(0)
    images = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(16, 3, padding="same", name="first")(images)
    x = keras.layers.GroupNormalization(groups=4, name="norm_a")(x)
    x = keras.layers.Activation("swish")(x)
    x = keras.layers.Conv2D(16, 3, padding="same", name="second")(x)
    x = keras.layers.GroupNormalization(groups=8, name="norm_b")(x)
    x = keras.layers.Conv2D(8, 1, name="last")(keras.layers.ReLU()(x))
    model = keras.Model(images, x)
    rng = np.random.RandomState(0)
    for layer in model.layers:
        if isinstance(layer, keras.layers.GroupNormalization):
            layer.gamma.assign(rng.uniform(0.5, 1.5, layer.gamma.shape))
            layer.beta.assign(rng.standard_normal(layer.beta.shape))
    model.export(str(tmp_path / "export"), verbose=False)
    pm = graphprune.prune(str(tmp_path / "export"), graphprune.ConstantSparsity(0.5, 0), structure="channel",
                          one_shot=True)
    groups = {group.name: group for group in graphprune.channel_groups(pm) if group.prunable}
    assert sorted((group.size, group.members[0].block) for group in groups.values()) == [(4, 4), (8, 2)], \
        graphprune.channels.describe(groups.values())
    for group in groups.values():  # the conv's outputs, its bias, gamma and beta, the next conv's inputs
        assert {m.name.split("/")[-1] for m in group.members} == {"kernel", "bias", "gamma", "beta"}
    name = next(iter(pm.signatures["serving_default"].structured_input_signature[1]))
    inputs = {name: tf.constant(rng.standard_normal([2, 8, 8, 3]).astype(np.float32))}
    out = _hub_shrunk_as_masked(pm, tmp_path, inputs=inputs)
    assert _weight_shape(out, "norm_a/gamma") == (8,) and _weight_shape(out, "norm_b/beta") == (8,)
    assert graphprune.cost(out).parameters == _predicted_parameters(pm)
    # keras-hub's VAE (Stable Diffusion 3's; not exported by keras_hub.models): 32 groups per norm
    from keras_hub.src.models.vae.vae_backbone import VAEBackbone

    VAEBackbone(encoder_num_filters=[32, 64], encoder_num_blocks=[1, 1], decoder_num_filters=[64, 32],
                decoder_num_blocks=[1, 1], sampler_method="mode", input_channels=3, sample_channels=4,
                output_channels=3).export(str(tmp_path / "vae"), verbose=False)
    pm = graphprune.prune(str(tmp_path / "vae"), graphprune.ConstantSparsity(0.5, 0), structure="channel",
                          one_shot=True)
    blocks = [group.members[0].block for group in graphprune.channel_groups(pm) if group.prunable]
    assert len(blocks) >= 18 and blocks.count(None) < len(blocks), blocks  # whole groups of 1 or 2 channels
    name = next(iter(pm.signatures["serving_default"].structured_input_signature[1]))
    out = _hub_shrunk_as_masked(pm, tmp_path / "vae_small", inputs={
        name: tf.constant(rng.uniform(size=[2, 32, 32, 3]).astype(np.float32))})
    assert graphprune.cost(out).parameters < 0.45 * graphprune.cost(str(tmp_path / "vae")).parameters


def _biased_and_pruned(model, tmp_path, also: str | None = None):
    """A keras-hub model with its biases (and weights whose path holds ``also``) made nonzero, as
    training leaves them (keras-hub builds biases as zeros), exported and pruned by channels, 50%
    one-shot: (the PrunableModel, the random state that made the biases, for the inputs)."""
    rng = np.random.RandomState(0)
    for weight in model.weights:
        if weight.path.endswith("bias") or (also is not None and also in weight.path):
            weight.assign(rng.standard_normal(weight.shape).astype(np.float32) / 2)
    model.export(str(tmp_path / "export"), verbose=False)
    return graphprune.prune(str(tmp_path / "export"), graphprune.ConstantSparsity(0.5, 0), structure="channel",
                            one_shot=True), rng


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2", "gptneox"])
def test_keras_hub_biased_rotary_query_key_dims(tmp_path, name):
    """Query and key projections with biases, rotated (Qwen2's, GPT-NeoX's fused and partly rotated
    ones), their biases nonzero as training leaves them. A removed pair's bias, rotated by position,
    changed the scores from key to key: the shrunk Qwen2 was off by 4.6e-2 of its output scale, and
    finalize's check (at two tokens) let it through. insert_masks now zeroes the removed pairs in
    the rotated queries (names.kept_product: for GPT-NeoX the query's part of its fused kernel's
    mask), so the pairs go and the shrunk model computes the masked one; GPT-NeoX's 12 of 16 dims
    its rotary embedding passes through go too (a bias there only shifts the scores)."""
    import keras_hub

    models = keras_hub.models
    small = dict(vocabulary_size=50, num_layers=1, hidden_dim=32, intermediate_dim=32)
    model = {"qwen2": lambda: models.QwenBackbone(num_query_heads=4, num_key_value_heads=2, **small),
             "gptneox": lambda: models.GPTNeoXBackbone(num_heads=2, max_sequence_length=8, **small)}[name]()
    pm, rng = _biased_and_pruned(model, tmp_path)
    groups = graphprune.channel_groups(pm)
    # key/value heads, query heads within a group, rotary pairs, value dims, MLP; GPT-NeoX: heads, the
    # dims its rotary embedding passes through, value dims, MLP (its rotated dims: "split into heads and sliced")
    expected = {"qwen2": [2, 2, 4, 8, 32], "gptneox": [2, 12, 16, 32]}[name]
    assert sorted(group.size for group in groups if group.prunable) == expected, channels.describe(groups)
    zeroed = [n for n in pm.traced.entries[0].graph_def.node if names.kept_product_part(n.name) == "apply"]
    assert zeroed, "no product zeroes the removed query dims"
    inputs = {"token_ids": tf.constant(rng.randint(0, 50, size=(2, 8)), tf.int32),
              "padding_mask": tf.ones((2, 8), tf.int32)}
    _hub_shrunk_as_masked(pm, tmp_path, inputs)
    assert graphprune.cost(str(tmp_path / "small")).parameters == _predicted_parameters(pm)


@pytest.mark.slow
def test_keras_hub_dinov3_rotary_pairs(tmp_path):
    """DINOv3's rotary table is the angles of two patch coordinates times head_dim / 4 frequencies,
    merged and tiled twice over the head dims: no slice of its constants removes a pair, so its
    query/key dims were left whole ("Tile ... does not keep this axis"; 0.62x the parameters at
    50% in this config). The table is made from constants and the image's shape alone, so the
    shrunk model gathers its kept pairs (channels.TableSite); the register and class tokens, not
    rotated, are concatenated in front, and the biases are made nonzero."""
    import keras_hub

    model = keras_hub.models.DINOV3Backbone(patch_size=8, num_layers=1, hidden_dim=32, num_heads=2,
                                            intermediate_dim=32, image_shape=(32, 32, 3), num_register_tokens=2)
    pm, rng = _biased_and_pruned(model, tmp_path, also="token")
    query = "encoder/layers_0/attention/q_proj/kernel"
    pairs = [group for group in graphprune.channel_groups(pm)
             if any(m.name == query and m.axis == 1 and m.period == 16 for m in group.members)]
    assert len(pairs) == 1 and pairs[0].prunable and pairs[0].size == 8, channels.describe(pairs)
    inputs = {"pixel_values": tf.constant(rng.standard_normal([2, 32, 32, 3]).astype(np.float32))}
    out = _hub_shrunk_as_masked(pm, tmp_path, inputs)
    assert _weight_shape(out, query) == (32, 8)  # 1 of 2 heads, 4 of the 8 pairs of its 16 dims
    # and the inverse frequencies, a float constant of head_dim / 4 that the gather leaves whole
    assert graphprune.cost(out).parameters == _predicted_parameters(pm) + 16 // 4


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "qwen"])
def test_keras_hub_multi_query_attention(tmp_path, name):
    """One key/value head shared by every query head (multi-query attention, as Falcon's and
    Gemma 2B's; keras-hub Llama, Mistral and Qwen with num_key_value_heads=1): tf.repeat copies it
    over an axis of size 1, whose merge with its copies the analysis did not take for a merge, so
    every attention group was left whole (Llama at 50%: 0.756x the parameters). Now the query
    heads that share it, the rotary pairs and the value dims go; the one key/value head stays
    (a group of one channel). Qwen's query/key biases are made nonzero, as training leaves them."""
    from test_real_models import _hub_backbones

    model = _hub_backbones()[name]()
    pm, rng = _biased_and_pruned(model, tmp_path)
    groups = graphprune.channel_groups(pm)
    # the query heads sharing the key/value head, rotary pairs, value dims, MLP neurons
    assert sorted(group.size for group in groups if group.prunable) == [2, 4, 8, 32], channels.describe(groups)
    out = _hub_shrunk_as_masked(pm, tmp_path)
    assert _weight_shape(out, "transformer_layer_0/self_attention/query/kernel") == (16, 1, 4)  # 1 of 2 heads, 4 of 8 dims
    assert graphprune.cost(out).parameters == _predicted_parameters(pm)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["roformer", "esm", "smollm3"])
def test_keras_hub_rotary_pairs_and_unknown_widths(tmp_path, name):
    """RoFormer V2 and ESM: the rotary embedding splits the head dims into pairs again (the analysis
    died with a KeyError), and the output projection reads a reshape to [B, S, -1] whose width
    shape inference leaves unknown (a group of that kernel's rows alone was found prunable, and
    finalize crashed). The width is now worked out (B and S cancel): whole heads and the value head
    dims go, the query/key head dims RoFormer's rotary pairs slice stay. ESM's go in rotary pairs:
    its scale reads the head-dim size (the shrunk model keeps the size it had), and its cos and sin
    tables are cut to a sequence length the graph computes. SmolLM3 splits the heads of a 2-D
    query kernel into key/value groups again (the same KeyError; now followed: its key/value heads
    and the query heads within each group go too). Its rotary halves are StridedSlices of the
    head dims (parts of the axis): dims i and i + d/2 go in pairs with their inverse frequency.
    The shrunk model computes the masked one. ESM's biases are made nonzero, as training leaves
    them: a removed pair's bias, rotated by position, changed the scores from key to key (1.7e-4
    of the output scale), so insert_masks now zeroes the removed pairs of the rotated queries."""
    import keras_hub

    models = keras_hub.models
    small = dict(vocabulary_size=50, num_layers=1, num_heads=2, hidden_dim=16, intermediate_dim=32)
    build = {"roformer": lambda: models.RoformerV2Backbone(head_size=8, **small),
             "esm": lambda: models.ESMBackbone(**small),
             "smollm3": lambda: models.SmolLM3Backbone(
                 vocabulary_size=50, hidden_dim=16, intermediate_dim=32, num_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, attention_bias=False, attention_dropout=0.0, rope_layer_enabled_list=[True],
                 layer_types=["attention"], mlp_bias=False, layer_norm_epsilon=1e-6, max_position_embeddings=64,
                 rope_theta=10000.0, partial_rotary_factor=1.0)}[name]
    model = build()
    rng = np.random.RandomState(0)
    for weight in model.weights:
        if name == "esm" and weight.path.endswith("bias"):
            weight.assign(rng.standard_normal(weight.shape).astype(np.float32))
    model.export(str(tmp_path / "export"), verbose=False)
    pm = graphprune.prune(str(tmp_path / "export"), graphprune.ConstantSparsity(0.5, 0), structure="channel",
                          one_shot=True)
    groups = graphprune.channel_groups(pm)
    # heads, (rotary pairs,) value dims, MLP
    expected = {"smollm3": [2, 2, 2, 4, 32], "esm": [2, 4, 8, 32]}.get(name, [2, 8, 32])
    assert sorted(group.size for group in groups if group.prunable) == expected, graphprune.channels.describe(groups)
    out = _hub_shrunk_as_masked(pm, tmp_path)
    assert graphprune.cost(out).parameters == _predicted_parameters(pm)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["deberta", "xlnet"])
def test_keras_hub_relative_position_heads(tmp_path, name):
    """Heads of attention with relative positions: DeBERTa's disentangled attention takes its
    position scores along the last axis (GatherV2 with batch dims, the indices broadcast to every
    head); XLNet's two streams with per-head content, position and segment biases and segment
    encodings. Whole heads go with all of it; the shrunk model computes the masked one."""
    import keras_hub

    models = keras_hub.models
    small = dict(num_layers=1, num_heads=2, hidden_dim=16, intermediate_dim=32)
    build = {"deberta": lambda: models.DebertaV3Backbone(vocabulary_size=50, max_sequence_length=8, **small),
             "xlnet": lambda: models.XLNetBackbone(vocabulary_size=50, **small)}[name]
    build().export(str(tmp_path / "export"), verbose=False)
    pm = graphprune.prune(str(tmp_path / "export"), graphprune.ConstantSparsity(0.5, 0), structure="channel",
                          one_shot=True)
    groups = graphprune.channel_groups(pm)
    key = {"deberta": "disentangled_attention_encoder_layer_0/self_attention_layer/key/kernel",
           "xlnet": "xlnet_encoder_0/rel_attn/key/kernel"}[name]
    heads = next(group for group in groups if any(m.name == key and m.axis == 1 for m in group.members))
    assert heads.prunable and heads.size == 2, graphprune.channels.describe(groups)
    if name == "xlnet":
        assert {"xlnet_encoder_0/positional_attention_bias", "xlnet_encoder_0/segment_encoding"} <= \
            {m.name for m in heads.members}
    out = _hub_shrunk_as_masked(pm, tmp_path)
    assert _weight_shape(out, key)[1] == 1
    assert graphprune.cost(out).parameters == _predicted_parameters(pm)


def _hub_split_models():
    import keras_hub

    models = keras_hub.models
    return {  # (builder, image shape)
        "cspnet": (lambda: models.CSPNetBackbone(
            stem_filters=8, stem_kernel_size=3, stem_strides=2, stackwise_depth=[1, 1], stackwise_strides=[1, 2],
            stackwise_num_filters=[16, 32], block_type="bottleneck_block", stage_type="csp", expand_ratio=2.0,
            bottle_ratio=0.5, block_ratio=1.0, cross_linear=True, image_shape=(32, 32, 3)), (32, 32, 3)),
        "hgnetv2": (lambda: models.HGNetV2Backbone(  # light blocks: a depthwise conv as Conv2D(groups=C)
            depths=[1, 1], embedding_size=16, hidden_sizes=[32, 64], stem_channels=[3, 8, 16], hidden_act="relu",
            use_learnable_affine_block=False, stackwise_stage_filters=[(16, 8, 32, 1, 1, 3), (32, 16, 64, 1, 1, 3)],
            apply_downsample=[False, True], use_lightweight_conv_block=[False, True], image_shape=(32, 32, 3)),
            (32, 32, 3)),
        "dinov2": (lambda: models.DINOV2Backbone(
            patch_size=4, num_layers=1, hidden_dim=16, num_heads=2, intermediate_dim=48, use_swiglu_ffn=True,
            image_shape=(16, 16, 3), position_embedding_shape=(16, 16, 3)), (16, 16, 3)),
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cspnet", "dinov2", "hgnetv2"])
def test_keras_hub_channel_splits(tmp_path, name):
    """Channels cut by a split: CSPNet splits each stage's expanded channels in two (one half
    through the blocks, both concatenated again), DINOv2's SwiGLU splits one fused kernel into gate
    and value. Both halves are prunable (CSPNet's as two groups, DINOv2's as one: gate c with
    value c), and the shrunk model computes the masked one with the shapes the masks predict.
    HGNetV2's light blocks run a depthwise conv as a Conv2D with one channel per group."""
    build, image_shape = _hub_split_models()[name]
    build().export(str(tmp_path / "export"), verbose=False)
    pm = graphprune.prune(str(tmp_path / "export"), graphprune.ConstantSparsity(0.5, 0), structure="channel",
                          one_shot=True)
    groups = graphprune.channel_groups(pm)
    kernel, axis = {"cspnet": ("stage_0_csp_conv_exp/kernel", 3),
                    "dinov2": ("encoder/layers_0/mlp/weights_in/kernel", 1),
                    "hgnetv2": (_HGNET_LIGHT + "conv2/encoder_stage_1_block_0_light_block_0_conv2_conv/kernel", 3)}[name]
    split = [group for group in groups if any(m.name == kernel and m.axis == axis for m in group.members)]
    assert len(split) == (2 if name == "cspnet" else 1), graphprune.channels.describe(groups)
    assert all(group.prunable for group in split), graphprune.channels.describe(split)
    key = next(iter(pm.signatures["serving_default"].structured_input_signature[1]))
    images = tf.constant(np.random.RandomState(0).uniform(size=[2, *image_shape]).astype(np.float32))
    out = _hub_shrunk_as_masked(pm, tmp_path, {key: images})
    assert _weight_shape(out, kernel)[axis] == _weight_shape(str(tmp_path / "export"), kernel)[axis] // 2
    assert graphprune.cost(out).parameters == _predicted_parameters(pm)


def _hub_vision_models():
    import keras_hub

    models = keras_hub.models
    return {
        # SegFormer's encoder: heads split by reshapes of a tensor whose sequence length shape
        # inference lost (through tf.tensordot); 1 head in stage 0, 2 in stage 1
        "mit": lambda: models.MiTBackbone(
            layerwise_depths=[1, 1], num_layers=2, layerwise_num_heads=[1, 2], layerwise_sr_ratios=[2, 1],
            max_drop_path_rate=0.0, layerwise_patch_sizes=[7, 3], layerwise_strides=[4, 2], hidden_dims=[16, 32],
            image_shape=(32, 32, 3)),
        # squeeze-and-excite convs of 2 channels whose biases are read through a Squeeze of every size-1 axis
        "efficientnet": lambda: models.EfficientNetBackbone(
            width_coefficient=0.25, depth_coefficient=0.25, stackwise_kernel_sizes=[3, 3], stackwise_num_repeats=[1, 1],
            stackwise_input_filters=[32, 16], stackwise_output_filters=[16, 24], stackwise_expansion_ratios=[1, 6],
            stackwise_squeeze_and_excite_ratios=[0.25, 0.25], stackwise_strides=[1, 2],
            stackwise_block_types=["v1", "v1"], image_shape=(32, 32, 3)),
        # a fused query-key-value kernel reshaped to [.., 3, heads, head_dim] (sizes that shape inference
        # leaves unknown: C // heads), relative position biases per head, shifted windows' masks added
        # to the scores reshaped to [B, windows, heads, N, N]
        "swin": lambda: models.SwinTransformerBackbone(
            image_shape=(32, 32, 3), patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4),
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mit", "efficientnet", "swin"])
def test_keras_hub_vision_backbones_shrink(tmp_path, name):
    """keras-hub vision backbones built from their configs: MiT's and Swin's attention heads are
    prunable (Swin's in every block, shifted or not, with their relative position biases),
    EfficientNet's squeeze-and-excite channels go down to 1; the shrunk model computes the masked
    one with the parameters the masks predict."""
    _hub_vision_models()[name]().export(str(tmp_path / "export"), verbose=False)
    pm = graphprune.prune(str(tmp_path / "export"), graphprune.ConstantSparsity(0.5, 0), structure="channel",
                          one_shot=True)
    groups = graphprune.channel_groups(pm)
    if name == "mit":
        heads = [group for group in groups if group.prunable and any(
            "multihead_attention" in m.name and m.block == 16 for m in group.members)]
        assert len(heads) == 1 and heads[0].size == 2, graphprune.channels.describe(groups)
    elif name == "swin":
        for block, count in (("stage_0/blocks_0", 2), ("stage_0/blocks_1", 2), ("stage_1/blocks_1", 4)):
            heads = [group for group in groups if any(
                m.name == f"{block}/attn/attention_qkv/kernel" and (m.period, m.block) == (count, 8)
                for m in group.members)]
            assert len(heads) == 1 and heads[0].prunable and heads[0].size == count, graphprune.channels.describe(groups)
            assert f"{block}/attn/relative_position_bias_table" in {m.name for m in heads[0].members}
    else:
        excite = [group for group in groups if group.prunable and group.size == 2]
        assert excite, graphprune.channels.describe(groups)
    key = next(iter(pm.signatures["serving_default"].structured_input_signature[1]))
    images = tf.constant(np.random.RandomState(0).uniform(size=[2, 32, 32, 3]).astype(np.float32))
    out = _hub_shrunk_as_masked(pm, tmp_path, {key: images})
    dense = graphprune.cost(str(tmp_path / "export")).parameters
    assert graphprune.cost(out).parameters == _predicted_parameters(pm) < dense
    if name == "swin":  # q, k and v: half the heads, half their dims
        assert _weight_shape(out, "stage_0/blocks_1/attn/attention_qkv/kernel") == (16, 3 * 1 * 4)


def test_rounding_counts_the_values_a_channel_spans():
    """round_to applies to values: a conv channel spans one, an attention head its head_dim (and a
    key/value head its query heads' too)."""
    def group(*members):
        return channels.ChannelGroup("g", 8, tuple(channels.Member("variable", f"k{i}", axis, 0, 8, None, role, block)
                                                   for i, (axis, role, block) in enumerate(members)))

    shapes = {"k0": (3, 3, 4, 8), "k1": (512, 8, 64)}
    assert channels.rounding(group((3, "out", None)), 8, lambda m: shapes[m.name]) == 8  # conv channels
    assert channels.rounding(group((3, "out", None), (1, "out", None)), 8, lambda m: shapes[m.name]) == 8
    shapes = {"k0": (512, 8, 64), "k1": (512, 32, 64), "k2": (8, 64, 512)}
    heads = group((1, "out", None), (1, "out", 4), (0, "in", 4))  # key/value heads, their query heads, o
    assert channels.rounding(heads, 8, lambda m: shapes[m.name]) == 1
    shapes = {"k0": (16, 8, 2), "k1": (16, 32, 2), "k2": (8, 2, 16)}
    assert channels.rounding(heads, 8, lambda m: shapes[m.name]) == 4  # heads of 2 values: 4 heads give 8
    assert channels.rounding(group((0, "in", None)), 8, lambda m: (8, 4)) == 8  # no producer: as asked
    # a transposed dense kernel [out, in] (tf.matmul(x, w, transpose_b=True)): its rows span one value
    assert channels.rounding(group((0, "out", None)), 8, lambda m: (16, 512), {("k0", 1)}) == 8
    # Gemma's query kernel [heads, hidden, head_dim]: a head spans head_dim, not hidden x head_dim
    assert channels.rounding(group((0, "out", None)), 8, lambda m: (8, 512, 4), {("k0", 1)}) == 2


def test_round_to_on_a_transposed_kernel_keeps_a_multiple(tmp_path):
    """tf.matmul(x, w, transpose_b=True) with w [out, in]: round_to=8 keeps 8 or 16 of 24 neurons."""

    class Transposed(tf.Module):
        def __init__(self):
            super().__init__()
            rng = np.random.RandomState(0)
            self.w = tf.Variable(rng.standard_normal([24, 8]).astype(np.float32), name="hidden/kernel")
            self.head = tf.Variable(rng.standard_normal([24, 4]).astype(np.float32), name="head/kernel")

        @tf.function(input_signature=[tf.TensorSpec([None, 8], tf.float32)])
        def __call__(self, x):
            return tf.matmul(tf.nn.relu(tf.matmul(x, self.w, transpose_b=True)), self.head)

    path = str(tmp_path / "model")
    tf.saved_model.save(Transposed(), path)
    pm = graphprune.prune(path, graphprune.ConstantSparsity(0.6, 0), structure="channel", one_shot=True, round_to=8)
    kept = int(np.any(pm.variables_by_key["hidden/kernel"].numpy() != 0, axis=1).sum())
    assert kept == 16  # 40% of 24 is 9.6, rounded up to 16
    out = _shrunk_as_masked(pm, tmp_path)
    assert _weight_shape(out, "hidden/kernel") == (16, 8)


def test_residual_stream_under_mirrored_strategy(tmp_path, mirrored):
    """Two replicas train a transformer whose hidden size is pruned: its kept-channel means and
    the in-graph mask update agree on both, and the shrunk model computes the masked one."""
    strategy = mirrored
    with strategy.scope():
        pm = graphprune.prune(StreamNet(), graphprune.PolynomialDecay(0.0, 0.5, 0, 6, frequency=2),
                              structure="channel", residual_stream=True)
        optimizer = tf.keras.optimizers.SGD(0.05)
    rng = np.random.RandomState(0)
    data = (rng.randint(0, 20, [32, 6]).astype(np.int32), rng.standard_normal([32, 20]).astype(np.float32))
    train_mirrored(strategy, pm, optimizer, data, batch_size=8, steps=8)
    for variable in pm.masks:
        replicas = [component.numpy() for component in variable.values]
        np.testing.assert_array_equal(replicas[0], replicas[1])
    tokens = pm.variables_by_key["tokens"].values[0].numpy()
    assert np.any(tokens != 0, axis=0).sum() == 8
    ids = tf.constant(rng.randint(0, 20, [3, 6]).astype(np.int32))
    masked = pm(ids).numpy()
    out = graphprune.finalize(pm, str(tmp_path / "small"), shrink=True)
    np.testing.assert_allclose(tf.saved_model.load(out)(ids).numpy(), masked, atol=1e-5 * np.abs(masked).max(), rtol=0)
    assert _weight_shape(out, "tokens") == (20, 8)


def _hub_more_models():
    import keras_hub

    models = keras_hub.models
    small = dict(num_layers=1, hidden_dim=16, intermediate_dim=32)
    return {
        # ALiBi: a slope per head, a constant that goes with its head
        "bloom": lambda: models.BloomBackbone(vocabulary_size=50, num_heads=2, **small),
        # AltUp's 2 x 2 coefficient matrices, Laurel's low-rank residual, per-layer inputs: a 2 x 2
        # split refined a second time into 1 x 2 crashed the analysis (KeyError in _atoms)
        "gemma3n": lambda: models.Gemma3nBackbone(
            text_vocab_size=50, text_hidden_size=16, num_hidden_layers=2, pad_token_id=0, num_attention_heads=4,
            num_key_value_heads=2, head_dim=4, intermediate_size=[32, 32], hidden_activation="gelu_approximate",
            layer_types=["sliding_attention", "full_attention"], sliding_window=8, rope_theta=10000.0,
            max_position_embeddings=32, vocab_size_per_layer_input=50, hidden_size_per_layer_input=4,
            altup_num_inputs=2, laurel_rank=4),
        # one layer's weights shared by two layers (a group of weights read twice)
        "albert": lambda: models.AlbertBackbone(vocabulary_size=50, num_layers=2, num_heads=2, embedding_dim=8,
                                                hidden_dim=16, intermediate_dim=32, max_sequence_length=8),
        # raw audio through Conv1Ds of width 127 and stride 64, a group norm, partial rotary embeddings
        "moonshine": lambda: models.MoonshineBackbone(
            vocabulary_size=50, filter_dim=16, encoder_num_layers=1, decoder_num_layers=1, hidden_dim=16,
            intermediate_dim=32, encoder_num_heads=2, decoder_num_heads=2),
        # encoder-decoder with grouped-query attention, rotary embeddings and cross attention
        "t5gemma": lambda: models.T5GemmaBackbone(
            vocabulary_size=50, encoder_hidden_dim=16, encoder_intermediate_dim=32, encoder_num_layers=1,
            encoder_num_attention_heads=4, encoder_num_key_value_heads=2, encoder_head_dim=8,
            encoder_layer_types=["full_attention"], decoder_hidden_dim=16, decoder_intermediate_dim=32,
            decoder_num_layers=1, decoder_num_attention_heads=4, decoder_num_key_value_heads=2, decoder_head_dim=8,
            decoder_layer_types=["full_attention"]),
        # its successor: query/key RMS norms, the decoder's self and cross attention merged into one
        "t5gemma2": lambda: models.T5Gemma2Backbone(
            vocabulary_size=50, encoder_hidden_dim=16, encoder_intermediate_dim=32, encoder_num_layers=1,
            encoder_num_attention_heads=4, encoder_num_key_value_heads=2, encoder_head_dim=8,
            encoder_layer_types=["full_attention"], decoder_hidden_dim=16, decoder_intermediate_dim=32,
            decoder_num_layers=1, decoder_num_attention_heads=4, decoder_num_key_value_heads=2, decoder_head_dim=8,
            decoder_layer_types=["full_attention"]),
        # Flux: double-stream blocks (image and text, attention over both), a single-stream block whose one
        # kernel makes queries, keys, values and MLP neurons at once, 3-axis rotary positions
        "flux": lambda: models.FluxBackbone(
            input_channels=8, hidden_size=32, mlp_ratio=2.0, num_heads=2, depth=1, depth_single_blocks=1,
            axes_dim=[4, 6, 6], theta=10000, use_bias=True, guidance_embed=False, image_shape=(16, 8),
            text_shape=(8, 12), image_ids_shape=(16, 3), text_ids_shape=(8, 3), y_shape=(12,)),
        # keras-hub's Xception: separable convs, strided 1x1 residual projections, max pooling
        "xception": lambda: models.XceptionBackbone(
            stackwise_conv_filters=[[8, 16], [32, 32], [32, 32], [64, 64]], stackwise_pooling=[False, True, False, False],
            image_shape=(32, 32, 3)),
        # atrous spatial pyramid pooling on a ResNet, its pooled branch and the decoder resized (ResizeBilinear)
        "deeplab": lambda: models.DeepLabV3Backbone(
            image_encoder=models.ResNetBackbone(
                input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64, 32, 32, 32],
                stackwise_num_blocks=[1, 1, 1, 1], stackwise_num_strides=[1, 2, 2, 2], block_type="basic_block",
                image_shape=(64, 64, 3)),
            spatial_pyramid_pooling_key="P4", upsampling_size=4, dilation_rates=[2, 4], low_level_feature_key="P2",
            projection_filters=8, image_shape=(64, 64, 3)),
        # SAM's image encoder: heads merged with the batch ([3, B * heads, N, d]), relative positions,
        # windowed and global attention
        "vitdet": lambda: models.ViTDetBackbone(
            hidden_size=16, num_layers=2, intermediate_dim=32, num_heads=2, global_attention_layer_indices=[1],
            image_shape=(32, 32, 3), patch_size=8, num_output_channels=8, window_size=2),
        # a DINOv2 encoder's stages reassembled by Conv2DTranspose (up) and strided convs, fused, resized
        "depthanything": lambda: models.DepthAnythingBackbone(
            image_encoder=models.DINOV2Backbone(
                patch_size=4, num_layers=4, hidden_dim=16, num_heads=2, intermediate_dim=32, image_shape=(32, 32, 3),
                position_embedding_shape=(32, 32, 3)),
            reassemble_factors=[4, 2, 1, 0.5], neck_hidden_dims=[8, 16, 16, 16], fusion_hidden_dim=16,
            head_hidden_dim=8, head_in_index=-1, feature_keys=["stage1", "stage2", "stage3", "stage4"]),
        # keras-hub's MobileNetV3: hard-swish, squeeze-and-excite, a depthwise stem
        "mobilenet": lambda: models.MobileNetBackbone(
            stackwise_expansion=[[1], [4, 6]], stackwise_num_blocks=[1, 2], stackwise_num_filters=[[16], [24, 24]],
            stackwise_kernel_size=[[3], [3, 5]], stackwise_num_strides=[[2], [2, 1]],
            stackwise_se_ratio=[[0.25], [None, 0.25]], stackwise_activation=[["relu"], ["relu", "hard_swish"]],
            stackwise_padding=[[1], [1, 2]], output_num_filters=32, depthwise_filters=8, depthwise_stride=2,
            depthwise_residual=False, last_layer_filter=48, squeeze_and_excite=0.5, image_shape=(32, 32, 3)),
        # a mixture of experts whose fused gate/up kernel interleaves its halves (x[..., ::2], x[..., 1::2])
        "gptoss": lambda: models.GptOssBackbone(
            vocabulary_size=50, num_layers=1, num_query_heads=4, num_key_value_heads=2, hidden_dim=16,
            intermediate_dim=32, num_experts=4, head_dim=8),
        # RMS norms over every convolution's channels, edge and universal inverted residuals, multi-query
        # attention, a multi-scale fusion adapter (Gemma 3n's vision encoder)
        "mobilenetv5": _mobilenetv5,
        # SAM 3 (its docstring's config, smaller): a ViT with windowed and global attention, a feature
        # pyramid, a text encoder, boxes encoded by ROI-aligning features at their coordinates, a DETR
        # encoder and decoder, a mask decoder
        "sam3": _sam3,
    }


SAM3_IMAGE = 112


def _sam3():
    from keras_hub import layers
    from keras_hub.models import SAM3PromptableConceptBackbone

    size, small = SAM3_IMAGE, dict(hidden_dim=32, intermediate_dim=64, num_heads=2)
    return SAM3PromptableConceptBackbone(
        vision_encoder=layers.SAM3VisionEncoder(
            image_shape=(size, size, 3), patch_size=14, num_layers=2, fpn_hidden_dim=32,
            fpn_scale_factors=[4.0, 2.0, 1.0, 0.5], pretrain_image_shape=(56, 56, 3), window_size=2,
            global_attn_indexes=[1, 2], **small),
        text_encoder=layers.SAM3TextEncoder(vocabulary_size=64, embedding_dim=32, num_layers=1, **small),
        geometry_encoder=layers.SAM3GeometryEncoder(num_layers=1, roi_size=7, **small),
        detr_encoder=layers.SAM3DetrEncoder(num_layers=1, **small),
        detr_decoder=layers.SAM3DetrDecoder(image_shape=(size, size, 3), patch_size=14, num_layers=1, num_queries=10,
                                            **small),
        mask_decoder=layers.SAM3MaskDecoder(num_upsampling_stages=3, hidden_dim=32, num_heads=2))


def _mobilenetv5():
    from keras_hub.models import MobileNetV5Backbone
    from keras_hub.src.models.mobilenetv5.mobilenetv5_builder import convert_arch_def_to_stackwise

    stacks = convert_arch_def_to_stackwise([
        ["er_r1_k3_s2_e4_c16", "er_r1_k3_s1_e4_c16"],
        ["uir_r1_a3_k5_s2_e4_c32", "uir_r1_a5_k0_s1_e4_c32", "uir_r1_a0_k0_s1_e2_c32"],
        ["uir_r1_a5_k5_s2_e4_c48", "mqa_r1_k3_h2_v2_s1_d8_c48", "uir_r1_a0_k0_s1_e2_c48"]])
    return MobileNetV5Backbone(**stacks, stem_size=8, num_features=64, use_msfa=True, msfa_indices=(-2, -1),
                               msfa_output_resolution=4, layer_scale_init_value=1e-5, image_shape=(64, 64, 3))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bloom", "albert", "moonshine", "t5gemma", "t5gemma2", "xception", "deeplab",
                                  "depthanything", "mobilenet", "gptoss", "mobilenetv5", "vitdet", "gemma3n", "flux",
                                  "sam3"])
def test_keras_hub_more_families_shrink(tmp_path, recwarn, name):
    """keras-hub models of families the other tests do not build, pruned as a user would and
    shrunk: the groups found are the ones the architecture has, the shrunk model computes the
    masked one and has the parameters the masks predict. Moonshine needs audio longer than the
    inputs finalize's check used to make (it died with TensorFlow's traceback). SAM 3 runs on no
    input finalize's check makes (its boxes must lie on the image): it is checked on the test's."""
    from test_real_models import _inputs

    _hub_more_models()[name]().export(str(tmp_path / "export"), verbose=False)
    pm = graphprune.prune(str(tmp_path / "export"), graphprune.ConstantSparsity(0.5, 0), structure="channel",
                          one_shot=True)
    groups = graphprune.channel_groups(pm)
    expected = {"bloom": [2, 8, 8, 32],  # heads, value and query/key head dims, MLP neurons
                # + the query/key head dims (their size is read by a Shape nothing uses: Keras's
                # dot_product_attention, given the scale); the factorized embedding's dims, normalized
                # before their projection (not a stream), go with its tables
                "albert": [2, 8, 8, 8, 32],
                # + the stem's second conv (the group norm keeps the first); the query/key head dims of the
                # cross-attention, and those the partial rotary embeddings pass through (4 of 8; its
                # rotated half is sliced apart and concatenated again: whole)
                "moonshine": [2, 2, 2, 4, 4, 8, 8, 8, 8, 32, 64, 64],
                # + query heads within key/value groups; the value head dims of each attention (self and
                # cross) a group of their own: the key/value cache each layer stacks and drops tied them
                # to the keys' dims (the rotary pairs, the cross attention's query/key dims)
                "t5gemma": [2, 2, 2, 2, 2, 2, 4, 4, 8, 8, 8, 8, 32, 32],
                # key/value heads, query heads within them, rotary pairs (normed over the head dims: the
                # Means follow the kept dims), value dims, MLP neurons; which half of a pair stays whole
                "t5gemma2": [2, 2, 2, 2, 4, 4, 8, 8, 32, 32],
                # each separable conv's pointwise channels (through its depthwise conv), the residual
                # stream of the middle blocks with their 1x1 projection; the input and output stay whole
                "xception": [8, 16, 32, 32, 32, 64],
                # two resized; the encoder's last stage, which nothing reads, is in no group (it never
                # runs: finalize strips it)
                "deeplab": [8, 32, 32, 32, 32, 64, 64, 256, 256, 256, 256, 256],
                # heads, head dims (query/key and value), MLP neurons of 4 layers; the neck's channels
                "depthanything": [2] * 4 + [8] * 12 + [16] * 17 + [32] * 4,
                "mobilenet": [8] * 7 + [16, 16, 24],
                # key/value heads with their query heads (and attention sinks, concatenated after the scores
                # along keys of unknown count), the query heads within each group, value head dims, the
                # experts' neurons (one index in every expert: gate 2j and up 2j + 1); the query/key rotary
                # pairs (biased, rotated, read by more than a softmax: zeroed in the rotated queries)
                "gptoss": [2, 2, 4, 8, 32],
                # the channels each RMS norm normalizes alone (the stem's, every expansion's and depthwise
                # conv's, the adapter's), the attention's heads, key dims and value dims (reshaped
                # channels-first with the positions merged); the residual streams stay whole
                "mobilenetv5": [2, 8, 8, 8, 32, 64, 64, 64, 96, 128, 128, 160],
                # the heads of both layers (merged with the batch), MLP neurons, the neck's first conv; the
                # query, key and value dims (one axis, which the relative position tables read as well:
                # insert_masks zeroes the removed ones in the queries those tables multiply)
                "vitdet": [2, 2, 8, 8, 8, 32, 32],
                # per layer: AltUp's router outputs, key/value heads, the query heads within each group,
                # Laurel's low rank, MLP neurons (the head dims, normed over them, the AltUp coefficients,
                # the per-layer inputs' channels and the residual stream stay whole, with their reasons)
                "gemma3n": [2, 2, 2, 2, 2, 2, 4, 4, 32, 32],
                "flux": [2, 32, 32, 32, 64, 64, 64, 128],
                # heads, query/key and value head dims, MLP neurons of each encoder and decoder, the
                # feature pyramid's and the mask decoder's convolution channels, and the pixel decoder's
                # group norms' 8 groups (of 4 channels) each
                "sam3": [2] * 11 + [8] * 5 + [16] * 22 + [32] * 14 + [64] * 7}[name]
    assert sorted(group.size for group in groups if group.prunable) == expected, channels.describe(groups)
    spec = pm.signatures["serving_default"].structured_input_signature[1]
    rng = np.random.RandomState(0)
    inputs = _inputs(spec, rng)
    for key, tensor_spec in spec.items():
        if tensor_spec.dtype.is_floating:  # images, or 4000 samples of audio
            shape = [2] + [size or 4000 for size in tensor_spec.shape.as_list()[1:]]
            inputs[key] = tf.constant(rng.uniform(size=shape).astype(np.float32))
    if name == "sam3":  # one box (it runs on no more), its coordinates on the image
        inputs = {"pixel_values": rng.uniform(size=[2, SAM3_IMAGE, SAM3_IMAGE, 3]),
                  "boxes": rng.uniform(size=[2, 1, 5]), "token_ids": rng.randint(1, 64, [2, 8]),
                  "padding_mask": np.ones([2, 8]), "box_labels": np.ones([2, 1])}
        inputs = {key: tf.constant(value, spec[key].dtype) for key, value in inputs.items()}
    out = _hub_shrunk_as_masked(pm, tmp_path, inputs, check_inputs=inputs if name == "sam3" else None)
    assert not [w for w in recwarn if "not checked" in str(w.message)]
    predicted = _predicted_parameters(pm)
    if name == "bloom":  # and the constant ALiBi slope of each head kept
        heads = next(group for group in groups if any(m.name.endswith("alibi_bias_1/Const") for m in group.members))
        predicted += int(_used_channels(pm, heads).sum())
    if name in ("flux", "vitdet", "sam3"):  # and the float constants cost counts, which a shrink keeps as they
        # are; SAM 3's variables no output needs (cost leaves them out, and a shrink strips them) outweigh its
        constants = _constant_parameters(pm, graphprune.cost(str(tmp_path / "export")).parameters)
        assert constants == {"flux": 1152, "vitdet": 6, "sam3": -10236}[name]
        predicted += constants
    if name == "deeplab":  # the encoder's last stage is not used (the prediction counts its weights): fewer
        assert graphprune.cost(out).parameters < min(predicted, 0.3 * graphprune.cost(str(tmp_path / "export")).parameters)
        assert not _kernel_shapes(out) - _predicted_shapes(pm)  # every kernel as its mask predicts
    else:
        assert graphprune.cost(out).parameters == predicted


class Upsampler(tf.Module):
    """A segmentation decoder's resizing, as tf.image.resize writes it: bilinear up (ResizeBilinear),
    nearest (ResizeNearestNeighbor, Keras's UpSampling2D), bicubic, area and antialiased down
    (ScaleAndTranslate), each between two convolutions."""

    def __init__(self, methods=(("bilinear", False), ("nearest", False), ("bicubic", False), ("area", False),
                                ("bilinear", True))):
        rng = np.random.RandomState(7)
        self.methods = methods
        self.stem = tf.Variable(rng.standard_normal([3, 3, 3, 8]).astype(np.float32), name="stem/kernel")
        self.convs = [tf.Variable(rng.standard_normal([3, 3, 8, 8]).astype(np.float32) * 0.3, name=f"conv{i}/kernel")
                      for i in range(len(methods))]
        self.head = tf.Variable(rng.standard_normal([8, 3]).astype(np.float32), name="head/kernel")

    @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 3], tf.float32)])
    def __call__(self, images):
        x = tf.nn.relu(tf.nn.conv2d(images, self.stem, 1, "SAME"))
        for kernel, (method, antialias) in zip(self.convs, self.methods):
            size = 16 if not antialias else 4  # up, then down with antialiasing
            x = tf.image.resize(x, [size, size], method=method, antialias=antialias)
            x = tf.nn.relu(tf.nn.conv2d(x, kernel, 1, "SAME"))
        return tf.matmul(tf.reduce_mean(x, [1, 2]), self.head)


def test_channels_go_through_resizing(tmp_path):
    """Resizing ops keep the batch and the channels: a conv's channels resized (any method) are the
    next conv's inputs, prunable (ResizeBilinear left them whole: keras-hub DeepLabV3 and
    SegFormer decoders). The shrunk model computes the masked one with the predicted shapes."""
    pm = graphprune.prune(Upsampler(), graphprune.ConstantSparsity(0.5, 0), structure="channel", one_shot=True)
    groups = graphprune.channel_groups(pm)
    ops = {op for entry in pm.traced.entries for op in graph.op_counts(entry.graph_def)}
    assert {"ResizeBilinear", "ResizeNearestNeighbor", "ResizeBicubic", "ResizeArea", "ScaleAndTranslate"} <= ops
    assert sorted(group.size for group in groups if group.prunable) == [8] * 6, channels.describe(groups)
    images = np.random.RandomState(0).uniform(size=[2, 8, 8, 3]).astype(np.float32)
    masked = pm(images).numpy()
    out = graphprune.finalize(pm, str(tmp_path / "small"), shrink=True)
    np.testing.assert_allclose(tf.saved_model.load(out)(images).numpy(), masked,
                               atol=1e-5 * np.abs(masked).max(), rtol=0)
    assert _kernel_shapes(out) == _predicted_shapes(pm)  # (ScaleAndTranslate's scale is a float constant)
    # LiteRT resizes bilinear and nearest only
    pm = graphprune.prune(Upsampler((("bilinear", False), ("nearest", False))), graphprune.ConstantSparsity(0.5, 0),
                          structure="channel", one_shot=True)
    masked = pm(images).numpy()
    out = graphprune.finalize(pm, str(tmp_path / "lite"), shrink=True)
    assert _kernel_shapes(out) == _predicted_shapes(pm)
    assert check_tflite(out, str(tmp_path / "small.tflite"), images, masked, float(np.abs(masked).max())) == "ok"


class Attention2D(tf.Module):
    """Single-sequence attention on 2-D tensors ([T, D]: tf.matmul(q, k, transpose_b=True), no
    batch axis), then an MLP."""

    def __init__(self):
        rng = np.random.RandomState(0)
        shapes = {"q": [8, 6], "k": [8, 6], "v": [8, 6], "o": [6, 8], "up": [8, 16], "down": [16, 3]}
        self.w = {name: tf.Variable(rng.standard_normal(shape).astype(np.float32), name=f"{name}/kernel")
                  for name, shape in shapes.items()}

    @tf.function(input_signature=[tf.TensorSpec([None, 8], tf.float32)])
    def __call__(self, x):
        w = self.w
        q, k, v = x @ w["q"], x @ w["k"], x @ w["v"]
        scores = tf.nn.softmax(tf.matmul(q, k, transpose_b=True) / 2.0)
        h = x + tf.matmul(scores, v) @ w["o"]
        return tf.nn.relu(h @ w["up"]) @ w["down"]


def test_two_dimensional_products_of_activations(tmp_path):
    """A MatMul of two 2-D activations (attention over one sequence) poisoned both operands' channels;
    it is a batch matmul without batch axes: the value dims (through scores @ v into the output
    kernel's rows) and the query/key dims (contracted, ending in a softmax) are prunable, beside the MLP."""
    pm = graphprune.prune(Attention2D(), graphprune.ConstantSparsity(0.5, 0), structure="channel", one_shot=True)
    groups = graphprune.channel_groups(pm)
    found = {frozenset((m.name, m.axis, m.role) for m in group.members): group.prunable for group in groups}
    assert found[frozenset({("v/kernel", 1, "out"), ("o/kernel", 0, "in")})]
    assert found[frozenset({("q/kernel", 1, "out"), ("k/kernel", 1, "out")})]
    assert found[frozenset({("up/kernel", 1, "out"), ("down/kernel", 0, "in")})]
    x = np.random.RandomState(1).standard_normal([5, 8]).astype(np.float32)
    masked = pm(x).numpy()
    out = graphprune.finalize(pm, str(tmp_path / "small"), shrink=True)
    np.testing.assert_allclose(tf.saved_model.load(out)(x).numpy(), masked, atol=1e-5 * np.abs(masked).max(), rtol=0)
    kernels = Counter({shape: n for shape, n in _kernel_shapes(out).items() if None not in shape})  # not k, v
    assert kernels == _predicted_shapes(pm)
    assert graphprune.cost(out).parameters == _predicted_parameters(pm)


class Gates(tf.Module):
    """Parts of channel axes, as recurrent cells and fused kernels take them: a product cut in
    three by a StridedSlice, a Slice and a StridedSlice from the end, a kernel read in two
    parts (a StridedSlice and a Slice of the variable itself), and a gated unit whose gate and
    value columns interleave (x[:, ::2], x[:, 1::2])."""

    def __init__(self):
        rng = np.random.RandomState(0)
        shapes = {"fused": [8, 24], "a": [8, 3], "b": [12, 3], "c": [4, 3], "split": [8, 16], "d": [10, 3], "e": [6, 3],
                  "interleaved": [8, 12], "f": [6, 3]}
        self.w = {name: tf.Variable(rng.standard_normal(shape).astype(np.float32), name=f"{name}/kernel")
                  for name, shape in shapes.items()}

    @tf.function(input_signature=[tf.TensorSpec([None, 8], tf.float32)])
    def __call__(self, x):
        w = self.w
        h = x @ w["fused"]
        y = tf.nn.relu(h[:, :8]) @ w["a"] + tf.nn.relu(tf.slice(h, [0, 8], [-1, 12])) @ w["b"]
        y += tf.tanh(h[..., -4:]) @ w["c"]
        y += tf.nn.relu(x @ w["split"][:, :10]) @ w["d"]
        y += tf.nn.relu(x @ tf.slice(w["split"], [0, 10], [-1, -1])) @ w["e"]
        gated = x @ w["interleaved"]
        return y + (tf.sigmoid(gated[:, ::2]) * gated[:, 1::2]) @ w["f"]


def test_parts_of_channel_axes(tmp_path):
    """A StridedSlice or Slice that takes a part of a channel axis (stride 1, every other axis
    whole) poisoned the whole axis: each part is a group of its own, linked at its offset, and
    shrink_channels rewrites the bounds (begin, end or size) to the kept counts before them; a
    part of a kernel read by a MatMul is that kernel (masked whole). Every s-th channel (stride s)
    is a unit of s interleaved parts: units go with all their parts."""
    pm = graphprune.prune(Gates(), graphprune.ConstantSparsity(0.5, 0), structure="channel", one_shot=True)
    groups = graphprune.channel_groups(pm)
    prunable = {(m.name, m.start, m.stop) for group in groups if group.prunable for m in group.members
                if m.role == "out"}
    assert prunable == {("fused/kernel", 0, 8), ("fused/kernel", 8, 20), ("fused/kernel", 20, 24),
                        ("split/kernel", 0, 10), ("split/kernel", 10, 16), ("interleaved/kernel", 0, 6)}, \
        channels.describe(groups)
    units = next(m for group in groups if group.prunable for m in group.members
                 if (m.name, m.axis) == ("interleaved/kernel", 1))
    assert units.block == 2  # unit j is columns 2j and 2j + 1
    x = np.random.RandomState(1).standard_normal([5, 8]).astype(np.float32)
    masked = pm(x).numpy()
    out = graphprune.finalize(pm, str(tmp_path / "small"), shrink=True)
    np.testing.assert_allclose(tf.saved_model.load(out)(x).numpy(), masked, atol=1e-5 * np.abs(masked).max(), rtol=0)
    # (the frozen kernel read in parts is folded into one constant a part: no shape check)
    assert graphprune.cost(out).parameters == _predicted_parameters(pm) < 0.6 * graphprune.cost(pm).parameters
    assert check_tflite(out, str(tmp_path / "small.tflite"), x, masked, float(np.abs(masked).max())) == "ok"


class Sinks(tf.Module):
    """Attention with a learned sink logit per head (GPT-OSS's): the sinks, reshaped [heads] ->
    [1, heads, 1, 1] and broadcast, are concatenated after the scores along the keys, whose count
    is unknown; the softmax's sink column is dropped."""

    def __init__(self):
        rng = np.random.RandomState(0)
        shapes = {"q": [8, 4, 4], "k": [8, 4, 4], "v": [8, 4, 4], "o": [4, 4, 8], "sinks": [4]}
        self.w = {name: tf.Variable(rng.standard_normal(shape).astype(np.float32), name=name)
                  for name, shape in shapes.items()}

    @tf.function(input_signature=[tf.TensorSpec([None, None, 8], tf.float32)])
    def __call__(self, x):
        w = self.w
        q, k, v = (tf.einsum("btd,dhe->bhte", x, w[name]) for name in "qkv")
        batch, steps = tf.shape(x)[0], tf.shape(x)[1]
        sinks = tf.broadcast_to(tf.reshape(w["sinks"], [1, 4, 1, 1]), tf.stack([batch, 4, steps, 1]))
        weights = tf.nn.softmax(tf.concat([tf.einsum("bhte,bhse->bhts", q, k), sinks], -1))[..., :-1]
        return x + tf.einsum("bhte,hed->btd", tf.einsum("bhts,bhse->bhte", weights, v), w["o"])


def test_attention_sinks_go_with_their_heads(tmp_path):
    """A concatenation along an axis of unknown size poisoned every axis, and a reshape that only
    adds size-1 axes poisoned its input: now only the concatenated axis is kept whole and the
    other axes go through in order, so heads go with their sinks (and the value head dims)."""
    pm = graphprune.prune(Sinks(), graphprune.ConstantSparsity(0.5, 0), structure="channel", one_shot=True)
    groups = graphprune.channel_groups(pm)
    heads = next((group for group in groups if ("sinks", 0) in {(m.name, m.axis) for m in group.members}), None)
    assert heads is not None and heads.prunable, channels.describe(groups)
    assert {("q", 1), ("k", 1), ("v", 1), ("o", 0)} <= {(m.name, m.axis) for m in heads.members}
    x = np.random.RandomState(1).standard_normal([2, 5, 8]).astype(np.float32)
    masked = pm(x).numpy()
    out = graphprune.finalize(pm, str(tmp_path / "small"), shrink=True)
    np.testing.assert_allclose(tf.saved_model.load(out)(x).numpy(), masked, atol=1e-5 * np.abs(masked).max(), rtol=0)
    assert _weight_shape(out, "sinks") == (2,)
    assert graphprune.cost(out).parameters == _predicted_parameters(pm) < 0.5 * graphprune.cost(pm).parameters


def _transposed_conv_decoder():
    """A decoder upsampling with Keras's Conv2DTranspose (Conv2DBackpropInput, its output shape a
    Pack whose channel count is a Const), strides 2 with and without overlap, a batch norm between."""
    import keras

    keras.utils.set_random_seed(0)
    images = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv")(images)  # names: see below
    x = keras.layers.Conv2DTranspose(8, 3, strides=2, padding="same", activation="relu", name="up")(x)
    x = keras.layers.BatchNormalization(name="norm")(x)
    x = keras.layers.Conv2DTranspose(8, 2, strides=2, padding="valid", use_bias=False, name="up_again")(x)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv_again")(x)
    # Keras numbers unnamed layers by what the process built before (other tests' layers)
    return keras.Model(images, keras.layers.Dense(3, name="head")(keras.layers.GlobalAveragePooling2D()(x)))


def test_transposed_convolutions(tmp_path):
    """A transposed conv's kernel [h, w, out, in] reads its input's channels on axis 3 and makes
    its output's on axis 2 (it poisoned both): every conv's channels are prunable, the shrunk
    model (whose output shape operands say the kept counts) computes the masked one with the
    predicted shapes and FLOPs counted for the transposed convs, and converts to TFLite."""
    _transposed_conv_decoder().export(str(tmp_path / "export"), verbose=False)
    pm = graphprune.prune(str(tmp_path / "export"), graphprune.ConstantSparsity(0.5, 0), structure="channel",
                          one_shot=True)
    groups = graphprune.channel_groups(pm)
    assert sorted(group.size for group in groups if group.prunable) == [8] * 4, channels.describe(groups)
    transposed = next(group for group in groups if ("up/kernel", 2, "out") in
                      {(m.name, m.axis, m.role) for m in group.members})
    assert {("up_again/kernel", 3, "in"), ("norm/gamma", 0, "param")} <= \
        {(m.name, m.axis, m.role) for m in transposed.members}
    images = np.random.RandomState(0).uniform(size=[2, 8, 8, 3]).astype(np.float32)
    masked = pm.serve(images).numpy()
    out = graphprune.finalize(pm, str(tmp_path / "small"), shrink=True)
    shrunk = tf.saved_model.load(out)
    np.testing.assert_allclose(shrunk.serve(images).numpy(), masked, atol=1e-5 * np.abs(masked).max(), rtol=0)
    assert _kernel_shapes(out) == _predicted_shapes(pm)
    assert graphprune.cost(out).parameters == _predicted_parameters(pm)
    before, after = graphprune.cost(str(tmp_path / "export")), graphprune.cost(out)
    # 2 x multiply-adds: conv 8x8x8 outputs of 3x3x3, transposed convs 8x8x8 inputs to 3x3x8 and 16x16x8
    # to 2x2x8 each, conv 32x32x8 of 3x3x8, dense 8 x 3
    assert before.flops == 2 * (8 * 8 * 8 * 27 + 8 * 8 * 8 * 72 + 16 * 16 * 8 * 32 + 32 * 32 * 8 * 72 + 8 * 3)
    assert after.flops < 0.3 * before.flops
    assert check_tflite(out, str(tmp_path / "small.tflite"), images, masked, float(np.abs(masked).max())) == "ok"


def _recurrent_model(library: str):
    """Recurrent layers built by hand from their library's layers: Keras 3 (Dense, LSTM and
    SimpleRNN returning sequences, Dense, GRUs without and with reset_after, Dense; exported) or tf-keras (Dense, LSTM, GRU,
    Dense; tf.saved_model.save, whose loops take their kernels as arguments)."""
    if library == "keras":
        import keras

        keras.utils.set_random_seed(0)
        steps = keras.Input((6, 4))
        x = keras.layers.Dense(16, activation="relu")(steps)
        x = keras.layers.LSTM(12, return_sequences=True, name="lstm")(x)  # names: other tests make LSTMs too
        x = keras.layers.SimpleRNN(8, return_sequences=True, name="rnn")(x)
        x = keras.layers.GRU(8, reset_after=False, return_sequences=True, name="gru_plain")(
            keras.layers.Dense(8, activation="relu")(x))
        x = keras.layers.GRU(8, name="gru")(x)
        return keras.Model(steps, keras.layers.Dense(3)(x)), lambda model, path: model.export(path, verbose=False)
    import tf_keras

    tf_keras.utils.set_random_seed(0)
    steps = tf_keras.Input((6, 4))
    x = tf_keras.layers.Dense(16, activation="relu")(steps)
    x = tf_keras.layers.GRU(8, name="gru")(tf_keras.layers.LSTM(12, return_sequences=True, name="lstm")(x))
    return tf_keras.Model(steps, tf_keras.layers.Dense(3)(x)), tf.saved_model.save


@pytest.mark.parametrize("library", ["keras", "tf_keras"])
def test_recurrent_layers_shrink(tmp_path, library):
    """RNN loops read their steps from a TensorList and write their outputs to one (TensorList ops
    left every channel they touched whole): the channels fed to an LSTM, GRU or SimpleRNN and the
    units of each (their kernels' columns, four or three gates alike, the recurrent kernel's rows
    and columns, the bias, the state the loop carries, the outputs written step by step) are
    prunable, and the shrunk model (its lists' element shapes rewritten) computes the masked one.
    tf-keras hands its kernels to the loop as arguments. Keras 3's GRU slices its gates apart with
    StridedSlices (of the recurrent kernel's product, or without reset_after of the kernel itself):
    each slice is a part of the units' axis, its bounds rewritten by shrink_channels."""
    model, save = _recurrent_model(library)
    save(model, str(tmp_path / "export"))
    pm = graphprune.prune(str(tmp_path / "export"), graphprune.ConstantSparsity(0.5, 0), structure="channel",
                          one_shot=True)
    groups = graphprune.channel_groups(pm)
    prunable = sorted(group.size for group in groups if group.prunable)
    assert prunable == ([8, 8, 8, 8, 12, 16] if library == "keras" else [8, 12, 16]), channels.describe(groups)
    units = {m.name.split("/")[0]: group for group in groups for m in group.members
             if m.name.endswith("recurrent_kernel") and m.axis == 0}
    assert all(group.prunable for group in units.values()) and len(units) == (4 if library == "keras" else 2)
    steps = np.random.RandomState(1).standard_normal([3, 6, 4]).astype(np.float32)
    signature = pm.signatures["serving_default"]
    name = next(iter(signature.structured_input_signature[1]))
    masked = next(iter(signature(**{name: steps}).values())).numpy()
    out = graphprune.finalize(pm, str(tmp_path / "small"), shrink=True)
    shrunk = tf.saved_model.load(out).signatures["serving_default"]
    np.testing.assert_allclose(next(iter(shrunk(**{name: steps}).values())).numpy(), masked,
                               atol=1e-5 * np.abs(masked).max(), rtol=0)
    assert graphprune.cost(out).parameters == _predicted_parameters(pm) < 0.5 * graphprune.cost(pm).parameters
    if library == "keras":  # LiteRT needs a static batch for Keras 3's recurrent loops
        from ai_edge_litert.interpreter import Interpreter

        lite = graphprune.export_tflite(out, str(tmp_path / "small.tflite"), batch_size=1)
        runner = Interpreter(model_path=lite).get_signature_runner("serving_default")
        rows = [next(iter(runner(**{name: row[np.newaxis]}).values())) for row in steps]
        np.testing.assert_allclose(np.concatenate(rows), masked, atol=1e-5 * np.abs(masked).max(), rtol=1e-5)


class _SparseFeatures(tf.Module):
    """A wide model over sparse features: two kernels read by tf.sparse.sparse_dense_matmul (one
    [features, units], one [units, features] read transposed: adjoint_b), concatenated, a head."""

    def __init__(self):
        super().__init__()
        rng = np.random.RandomState(0)
        self.wide = tf.Variable(rng.standard_normal([40, 16]).astype(np.float32) * 0.3, name="wide/kernel")
        self.wide_t = tf.Variable(rng.standard_normal([8, 40]).astype(np.float32) * 0.3, name="wide_t/kernel")
        self.head = tf.Variable(rng.standard_normal([24, 3]).astype(np.float32) * 0.3, name="head/kernel")

    @tf.function(input_signature=[tf.SparseTensorSpec([None, 40], tf.float32)])
    def __call__(self, features):
        wide = tf.sparse.sparse_dense_matmul(features, self.wide)
        wide_t = tf.sparse.sparse_dense_matmul(features, self.wide_t, adjoint_b=True)
        return tf.nn.relu(tf.concat([wide, wide_t], 1)) @ self.head


def test_kernels_read_by_sparse_features_are_pruned_and_shrink(tmp_path):
    """tf.sparse.sparse_dense_matmul's kernel is a weight like a MatMul's (it was missed without a
    word: the largest weight of a wide model left dense). Unstructured: masked, finalized, equal;
    channels: its output units go (concatenated), its rows, the sparse features' columns, stay."""
    tf.saved_model.save(_SparseFeatures(), str(tmp_path / "model"))
    rng = np.random.RandomState(1)
    features = tf.sparse.from_dense(np.where(rng.rand(5, 40) < 0.2, rng.rand(5, 40), 0).astype(np.float32))
    pm = graphprune.prune(str(tmp_path / "model"), graphprune.ConstantSparsity(0.5, 0), one_shot=True)
    assert {(row["name"], row["op"], row["sparsity"]) for row in pm.weights()} == {
        ("wide/kernel", "SparseTensorDenseMatMul", 0.5), ("wide_t/kernel", "SparseTensorDenseMatMul", 0.5),
        ("head/kernel", "MatMul", 0.5)}
    masked = pm(features).numpy()
    out = graphprune.finalize(pm, str(tmp_path / "final"))
    np.testing.assert_allclose(tf.saved_model.load(out)(features).numpy(), masked, atol=1e-6 * np.abs(masked).max())

    pm = graphprune.prune(str(tmp_path / "model"), graphprune.ConstantSparsity(0.5, 0), one_shot=True,
                          structure="channel")
    groups = {(m.name, m.axis): group for group in graphprune.channel_groups(pm) for m in group.members}
    assert groups[("wide/kernel", 1)].prunable and groups[("wide_t/kernel", 0)].prunable
    # each with its slice of the head's rows (the concat's)
    assert [(m.start, m.stop) for m in groups[("wide/kernel", 1)].members if m.name == "head/kernel"] == [(0, 16)]
    assert [(m.start, m.stop) for m in groups[("wide_t/kernel", 0)].members if m.name == "head/kernel"] == [(16, 24)]
    for key in (("wide/kernel", 0), ("wide_t/kernel", 1)):
        assert "reads it against a sparse tensor's columns" in groups[key].reason, groups[key].reason
    masked = pm(features).numpy()
    out = graphprune.finalize(pm, str(tmp_path / "small"), shrink=True)
    np.testing.assert_allclose(tf.saved_model.load(out)(features).numpy(), masked, atol=1e-5 * np.abs(masked).max(),
                               rtol=0)
    assert graphprune.cost(out).parameters == _predicted_parameters(pm) == 40 * 8 + 4 * 40 + 12 * 3


def test_transposed_3d_convolutions(tmp_path):
    """Keras's Conv3DTranspose (Conv3DBackpropInputV2, kernel [d, h, w, out, in]) was no target at
    all: a video or volume decoder kept its upsampling kernels dense without a word (a model of them
    alone: "no weight ... nothing to prune"). Pruned, finalized and shrunk as the 2-D ones are."""
    import keras

    keras.utils.set_random_seed(0)
    volumes = keras.Input((4, 4, 4, 2))
    x = keras.layers.Conv3D(8, 3, padding="same", name="enc")(volumes)
    x = keras.layers.Conv3DTranspose(8, 3, strides=2, padding="same", activation="relu", name="up")(x)
    x = keras.layers.BatchNormalization(name="norm")(x)
    x = keras.layers.Conv3DTranspose(6, 3, padding="valid", activation="relu", name="up_again")(x)
    keras.Model(volumes, keras.layers.Conv3D(2, 1, name="head")(x)).export(str(tmp_path / "export"), verbose=False)
    x = tf.constant(np.random.RandomState(0).uniform(size=[2, 4, 4, 4, 2]).astype(np.float32))
    pm = graphprune.prune(str(tmp_path / "export"), graphprune.ConstantSparsity(0.5, 0), one_shot=True)
    assert {(row["name"], row["op"], row["sparsity"]) for row in pm.weights()} == {
        ("enc/kernel", "Conv3D", 0.5), ("up/kernel", "Conv3DBackpropInputV2", 0.5),
        ("up_again/kernel", "Conv3DBackpropInputV2", 0.5), ("head/kernel", "Conv3D", 0.5)}
    masked = pm.serve(x).numpy()
    final = tf.saved_model.load(graphprune.finalize(pm, str(tmp_path / "final")))  # held: serve reads its variables
    np.testing.assert_allclose(final.serve(x).numpy(), masked, atol=1e-6 * np.abs(masked).max())

    pm = graphprune.prune(str(tmp_path / "export"), graphprune.ConstantSparsity(0.5, 0), structure="channel",
                          one_shot=True)
    groups = graphprune.channel_groups(pm)
    assert sorted(group.size for group in groups if group.prunable) == [6, 8, 8], channels.describe(groups)
    up = next(group for group in groups if ("up/kernel", 3, "out") in {(m.name, m.axis, m.role) for m in group.members})
    assert {("up_again/kernel", 4, "in"), ("norm/gamma", 0, "param")} <= {(m.name, m.axis, m.role) for m in up.members}
    masked = pm.serve(x).numpy()
    out = graphprune.finalize(pm, str(tmp_path / "small"), shrink=True, fold_batch_norms=False)
    shrunk = tf.saved_model.load(out)
    np.testing.assert_allclose(shrunk.serve(x).numpy(), masked, atol=1e-5 * np.abs(masked).max(), rtol=0)
    assert _kernel_shapes(out) == _predicted_shapes(pm)
    assert graphprune.cost(out).parameters == _predicted_parameters(pm)
    before, after = graphprune.cost(str(tmp_path / "export")), graphprune.cost(out)
    # 2 x multiply-adds: the conv's 4x4x4x8 outputs of 3x3x3x2; each transposed conv's inputs (4x4x4x8,
    # 8x8x8x8) to 3x3x3x8 and 3x3x3x6; the head's 10x10x10x2 outputs of 6
    assert before.flops == 2 * (512 * 54 + 512 * 216 + 4096 * 162 + 2000 * 6) and not before.uncounted
    assert after.flops < 0.3 * before.flops


class _HintedMatMuls(tf.Module):
    """tf.matmul with a_is_sparse / b_is_sparse (SparseMatMul, a MatMul with hints), one transposed."""

    def __init__(self):
        super().__init__()
        rng = np.random.RandomState(0)
        self.hidden = tf.Variable(rng.standard_normal([8, 16]).astype(np.float32), name="hidden/kernel")
        self.head = tf.Variable(rng.standard_normal([3, 16]).astype(np.float32), name="head/kernel")

    @tf.function(input_signature=[tf.TensorSpec([None, 8], tf.float32)])
    def __call__(self, x):
        hidden = tf.nn.relu(tf.matmul(x, self.hidden, b_is_sparse=True))
        return tf.matmul(hidden, self.head, transpose_b=True, a_is_sparse=True)


def test_matmuls_with_sparsity_hints_are_pruned_and_shrink(tmp_path):
    """tf.matmul(..., b_is_sparse=True) makes a SparseMatMul, whose kernels were no target (the
    model: "nothing to prune"); a hint a pruned model's user may well give. Unstructured and
    channels, finalized and shrunk, equal to the masked model."""
    tf.saved_model.save(_HintedMatMuls(), str(tmp_path / "model"))
    x = np.random.RandomState(1).standard_normal([4, 8]).astype(np.float32)
    pm = graphprune.prune(str(tmp_path / "model"), graphprune.ConstantSparsity(0.5, 0), one_shot=True)
    assert {(row["name"], row["op"], row["sparsity"]) for row in pm.weights()} == {
        ("hidden/kernel", "SparseMatMul", 0.5), ("head/kernel", "SparseMatMul", 0.5)}
    final = tf.saved_model.load(graphprune.finalize(pm, str(tmp_path / "final")))
    np.testing.assert_allclose(final(x).numpy(), pm(x).numpy(), atol=1e-6 * np.abs(pm(x).numpy()).max())
    pm = graphprune.prune(str(tmp_path / "model"), graphprune.ConstantSparsity(0.5, 0), one_shot=True,
                          structure="channel")
    assert [group.size for group in graphprune.channel_groups(pm) if group.prunable] == [16]
    out = _shrunk_as_masked(pm, tmp_path)
    assert _weight_shape(out, "hidden/kernel") == (8, 8) and _weight_shape(out, "head/kernel") == (3, 8)
    assert graphprune.cost(out).flops == 2 * (8 * 8 + 8 * 3)
