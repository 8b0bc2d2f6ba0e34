"""Weights in bodies at any depth (issue #14): While in While, If in While, While in If, a
function the inliner keeps (XLA-compiled) called from a loop body, three levels deep. Each is
found, masked, pruned to the target, trained through, folded, frozen and stripped, and the Body
view itself is checked on both spellings of a tensor."""

import warnings

import numpy as np
import pytest
import tensorflow as tf

import graphprune
from graphprune import body as b
from graphprune.load import load


def _kernel(seed, name):
    return tf.Variable(np.random.RandomState(seed).standard_normal([4, 4]).astype(np.float32) * 0.5, name=name)


class WhileInWhileInWhile(tf.Module):
    def __init__(self):
        super().__init__()
        self.k1, self.k2, self.k3 = _kernel(1, "level1"), _kernel(2, "level2"), _kernel(3, "level3")

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
    def __call__(self, x):
        def level1(t, h):
            def level2(u, h2):
                def level3(v, h3):
                    return v + 1, tf.tanh(tf.matmul(h3, self.k3))

                _, h2 = tf.while_loop(lambda v, _: v < 2, level3, (0, h2))
                return u + 1, tf.tanh(tf.matmul(h2, self.k2))

            _, h = tf.while_loop(lambda u, _: u < 2, level2, (0, h))
            return t + 1, tf.tanh(tf.matmul(h, self.k1))

        return tf.while_loop(lambda t, _: t < 2, level1, (0, x))[1]


class IfInWhile(tf.Module):
    def __init__(self):
        super().__init__()
        self.k1, self.k_then, self.k_else = _kernel(4, "loop"), _kernel(5, "then"), _kernel(6, "else")

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
    def __call__(self, x):
        def body(t, h):
            h = tf.cond(t % 2 == 0, lambda: tf.matmul(h, self.k_then), lambda: tf.matmul(h, self.k_else))
            return t + 1, tf.tanh(tf.matmul(h, self.k1))

        return tf.while_loop(lambda t, _: t < 3, body, (0, x))[1]


class WhileInIf(tf.Module):
    def __init__(self):
        super().__init__()
        self.k_loop, self.k_else, self.k_deep = _kernel(7, "loop"), _kernel(8, "else"), _kernel(9, "deep")

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
    def __call__(self, x):
        def looped():
            def body(t, h):
                inner = tf.cond(t > 0, lambda: tf.matmul(h, self.k_deep), lambda: h)  # If in While in If
                return t + 1, tf.tanh(tf.matmul(inner, self.k_loop))

            return tf.while_loop(lambda t, _: t < 2, body, (0, x))[1]

        return tf.cond(tf.reduce_sum(x) > 0, looped, lambda: tf.matmul(x, self.k_else))


class KeptFunctionInLoop(tf.Module):
    """An XLA-compiled function (which the inliner keeps, as Keras' grouped Conv2D on CPU) called
    at the top and from a loop body."""

    def __init__(self):
        super().__init__()
        self.k_cell, self.k_top = _kernel(10, "cell"), _kernel(11, "top")
        self.cell = tf.function(lambda h: tf.tanh(tf.matmul(h, self.k_cell)), jit_compile=True)
        self.project = tf.function(lambda h: tf.matmul(h, self.k_top), jit_compile=True)

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
    def __call__(self, x):
        h = tf.while_loop(lambda t, _: t < 3, lambda t, h: (t + 1, self.cell(h)), (0, x))[1]
        return self.project(h)


MODELS = {"while_in_while_in_while": WhileInWhileInWhile, "if_in_while": IfInWhile, "while_in_if": WhileInIf,
          "kept_function_in_loop": KeptFunctionInLoop}


def _kernels(model):
    return sorted(v.name.split(":")[0] for v in model.trainable_variables)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_weights_at_any_depth_are_pruned_trained_folded_frozen_and_stripped(name, tmp_path):
    model = MODELS[name]()
    x = tf.constant(np.random.RandomState(0).standard_normal([3, 4]).astype(np.float32))
    dense = model(x).numpy()
    assert np.abs(dense).max() > 1e-2  # outputs that mean something
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing skipped, so nothing warned about
        pm = graphprune.prune(model, schedule=graphprune.ConstantSparsity(0.5, 0, frequency=1), verify=True)
    assert sorted(row["name"] for row in pm.weights()) == _kernels(model)
    np.testing.assert_allclose(pm(x).numpy(), dense, atol=1e-6, rtol=0)  # all-ones masks: unchanged

    pm.update_masks()
    assert [row["sparsity"] for row in pm.weights()] == [pytest.approx(0.5)] * len(_kernels(model))
    masked = pm(x).numpy()
    assert np.abs(masked - dense).max() > 1e-4  # every level really is pruned (checked per weight below)
    live = {v.name.split(":")[0]: v for v in pm.trainable_variables}
    both = [pm(x).numpy(), pm(-x).numpy()]  # -x takes the other branch where there is one
    for key in _kernels(model):  # each kernel alone at its level: zeroing its mask moves an output
        mask = next(m for m in pm.masks if m.name.startswith(f"{key}/graphprune/mask"))
        saved = mask.numpy()
        mask.assign(np.zeros_like(saved))
        assert max(np.abs(pm(v).numpy() - out).max() for v, out in zip((x, -x), both)) > 1e-6, key
        mask.assign(saved)

    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(pm(x) ** 2)
    grads = tape.gradient(loss, [live[k] for k in _kernels(model)])
    assert all(grad is not None for grad in grads)
    for key, grad in zip(_kernels(model), grads):
        mask = next(m for m in pm.masks if m.name.startswith(f"{key}/graphprune/mask")).numpy()
        assert np.all(np.asarray(grad)[mask == 0] == 0), key  # pruned weights get no gradient

    for freeze in (True, False):
        final = graphprune.finalize(pm, str(tmp_path / f"final_{freeze}"), freeze=freeze)
        loaded = tf.saved_model.load(final)
        for value, expected in zip((x, -x), both):
            np.testing.assert_allclose(loaded(value).numpy(), expected, atol=1e-5, rtol=0)
        traced = load(final).model
        nodes = []
        for entry in traced.entries:
            b.visit_entry(entry, lambda body: nodes.extend(body.nodes))
        assert not [n.name for n in nodes if "graphprune/mask/" in n.name]  # no mask read left, at any depth
        folded = {n.op for n in nodes if "graphprune/masked" in n.name}  # the Mul, under its own name
        assert folded == ({"Const"} if freeze else {"Identity"}), folded
        assert not [k for k in traced.variables if "graphprune" in k]  # no mask, threshold or step
        if freeze:
            assert not set(_kernels(model)) & set(traced.variables)  # every pruned weight is a constant
            # ... and only its pruned copy is left: a loop body's frozen read, pinned by the
            # function's control outputs, used to keep the unmasked weight too.
            for entry in traced.entries:
                kernels = []
                b.visit_entry(entry, lambda body: kernels.extend(
                    n.name for n in body.nodes
                    if n.op == "Const" and [d.size for d in n.attr["value"].tensor.tensor_shape.dim] == [4, 4]))
                assert len(kernels) == len(_kernels(model)), (entry.name, kernels)


def test_a_rerun_of_insert_masks_on_nested_bodies_is_a_no_op():
    from graphprune.pipeline import PassContext, VariableValues, run_pipeline

    loaded = load(WhileInWhileInWhile())
    context = PassContext(values=VariableValues(loaded.variables))
    once = run_pipeline(loaded.model, "find_weights insert_masks", context).model
    again = run_pipeline(once, "find_weights insert_masks", context)
    assert not again.reports[-1][1].changed and again.model.entries == once.entries


def test_the_body_view_spells_tensors_for_either_body():
    loaded = load(IfInWhile())
    entry = next(e for e in loaded.model.entries if e.kind == "method")
    seen = []

    def visit(body):
        for node in body.nodes:
            if node.op == "ReadVariableOp":
                ref = body.ref(node.name)
                assert body.producer(ref) is node
                assert body.parse(ref) == (node.name, 0, False)
                assert body.read_key(node) in {"loop", "then", "else"}
                seen.append((body.depth, ref))

    b.visit_entry(entry, visit)
    depths = {depth for depth, _ in seen}
    assert depths == {1, 2}  # the loop body, and the branches inside it
    assert all(ref.endswith(":value:0") for _, ref in seen)  # function-body spelling


def test_a_resource_asked_for_three_levels_down_is_threaded_through_every_caller():
    from graphprune import rebuild

    loaded = load(WhileInWhileInWhile())
    entry = next(e for e in loaded.model.entries if e.kind == "method")
    key = "level1"  # read at depth 1 only, so bodies 2 and 3 do not receive it
    before = []
    b.visit_entry(entry, lambda body: before.append((body.depth, key in body.resources.values()))
                  if body.depth and body.attr[0] == "body" else None)
    assert sorted(before) == [(1, True), (2, False), (3, False)]

    def ask(body):
        if body.depth == 3:
            body.resource(key, "unused/resource")

    rewritten, changed = b.rewrite_entry(entry, ask, variables=loaded.model.variables)
    assert changed
    after = []
    b.visit_entry(rewritten, lambda body: after.append((body.depth, key in body.resources.values()))
                  if body.depth and body.attr[0] == "body" else None)
    assert sorted(after) == [(1, True), (2, True), (3, True)]
    assert sorted(rewritten.resources.values()) == sorted(entry.resources.values())  # no new placeholder
    x = tf.constant(np.random.RandomState(0).standard_normal([3, 4]).astype(np.float32))
    run = []
    for traced in (entry, rewritten):
        run.append(tf.function(lambda v: rebuild.import_entry(traced, [v], loaded.variables)[0])(x).numpy())
    np.testing.assert_array_equal(run[0], run[1])  # one more loop variable computes the same
