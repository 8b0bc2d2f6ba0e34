"""The core promise: any tf.function / tf.Module / SavedModel becomes a masked, trainable,
saveable model that computes exactly what the original computed while its masks are ones."""

import numpy as np
import pytest
import tensorflow as tf

import graphprune
import testmodels


def _assert_close(actual, expected, atol=1e-6):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), atol=atol, rtol=0)


def test_mlp_module_all_ones_masks_are_exact(mlp):
    x = testmodels.batch([8])
    pm = graphprune.prune(mlp)
    _assert_close(pm(x), mlp(x))
    assert sorted(r["name"] for r in pm.weights()) == ["dense/kernel", "dense_1/kernel"]
    assert all(not m.trainable for m in pm.masks)


def test_cnn_module_finds_conv_depthwise_and_dense_through_nested_function(cnn):
    x = testmodels.batch([8, 8, 3])
    pm = graphprune.prune(cnn)
    _assert_close(pm(x), cnn(x))
    ops = {r["name"]: r["op"] for r in pm.weights()}
    assert ops == {
        "conv2d/kernel": "Conv2D",
        "depthwise_conv2d/depthwise_kernel": "DepthwiseConv2dNative",
        "dense/kernel": "MatMul",
    }


def test_keras3_export_is_just_a_saved_model(keras_saved_model):
    x = testmodels.batch([8, 8, 3])
    original = tf.saved_model.load(keras_saved_model)
    pm = graphprune.prune(keras_saved_model)
    expected = original.serve(x)
    _assert_close(pm.serve(x), expected)
    _assert_close(pm.signatures["serving_default"](image=x)["output_0"], expected)
    assert len(pm.weights()) == 4  # conv, depthwise, two dense kernels


def test_saved_model_from_disk(mlp, mlp_saved_model):
    x = testmodels.batch([8])
    pm = graphprune.prune(mlp_saved_model)
    _assert_close(pm(x), mlp(x))  # the restored __call__
    _assert_close(pm.signatures["serving_default"](x=x)["output_0"], mlp(x))


def test_concrete_function_and_tf_function_targets(mlp):
    x = testmodels.batch([8])
    for target in (mlp.__call__, mlp.__call__.get_concrete_function()):
        pm = graphprune.prune(target)
        _assert_close(pm(x), mlp(x))


def test_zero_mask_removes_exactly_that_weights_contribution(mlp):
    x = testmodels.batch([8])
    pm = graphprune.prune(mlp)
    mask = next(m for m in pm.masks if m.name.startswith("dense_1/kernel"))
    values = np.ones(mask.shape, np.uint8)  # masks are 0/1 in one byte
    values[3, 2] = 0
    mask.assign(values)
    hidden = tf.nn.relu(tf.matmul(x, mlp.w1) + mlp.b1)
    expected = tf.matmul(hidden, mlp.w2 * values.astype(np.float32)) + mlp.b2
    _assert_close(pm(x), expected, atol=1e-5)
    # the difference to the dense model is exactly hidden[:, 3] * w2[3, 2] in output column 2
    delta = (mlp(x) - pm(x)).numpy()
    _assert_close(delta[:, 2], (hidden[:, 3] * mlp.w2[3, 2]).numpy(), atol=1e-5)
    _assert_close(np.delete(delta, 2, axis=1), 0.0)


def test_gradients_of_masked_elements_are_exactly_zero(cnn):
    x = testmodels.batch([8, 8, 3])
    pm = graphprune.prune(cnn)
    rng = np.random.RandomState(3)
    for mask in pm.masks:
        mask.assign((rng.uniform(size=mask.shape) > 0.5).astype(np.uint8))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(pm(x) ** 2)
    grads = tape.gradient(loss, pm.pruned_weights)
    for grad, mask in zip(grads, pm.masks):
        assert grad is not None
        assert np.all(grad.numpy()[mask.numpy() == 0] == 0.0)
        assert np.any(grad.numpy()[mask.numpy() == 1] != 0.0)


def test_trainable_variables_are_the_original_weights(mlp):
    pm = graphprune.prune(mlp, schedule=graphprune.ConstantSparsity(0.5, 0))
    names = sorted(v.name for v in pm.trainable_variables)
    assert names == sorted(v.name for v in mlp.trainable_variables)


def test_gradient_tape_training_loop_reduces_loss(mlp):
    rng = np.random.RandomState(0)
    x = tf.constant(rng.standard_normal([64, 8]).astype(np.float32))
    y = tf.constant(rng.standard_normal([64, 4]).astype(np.float32))
    pm = graphprune.prune(mlp, schedule=graphprune.ConstantSparsity(0.5, begin_step=0, frequency=10))
    optimizer = tf.keras.optimizers.SGD(0.05)
    first = None
    for _ in range(60):
        pm.update_masks()
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((pm(x) - y) ** 2)
        grads = tape.gradient(loss, pm.trainable_variables)
        optimizer.apply_gradients(zip(grads, pm.trainable_variables))
        first = float(loss) if first is None else first
    assert float(loss) < 0.8 * first
    assert all(abs(r["sparsity"] - 0.5) < 1e-6 for r in pm.weights())


def test_save_load_call_keeps_masks_and_outputs(tmp_path, cnn):
    x = testmodels.batch([8, 8, 3])
    pm = graphprune.prune(cnn, schedule=graphprune.ConstantSparsity(0.6, 0, frequency=1))
    pm.update_masks()
    expected = pm(x)
    path = graphprune.save(pm, str(tmp_path / "pruned"))
    loaded = tf.saved_model.load(path)
    _assert_close(loaded(x), expected)
    _assert_close(loaded.signatures["serving_default"](x=x)["output_0"], expected)
    masks = {m.name: m.numpy() for m in loaded.masks}
    assert masks.keys() == {m.name for m in pm.masks}
    for m in pm.masks:
        np.testing.assert_array_equal(masks[m.name], m.numpy())
    assert int(loaded.step.numpy()) == 1
    out = loaded.update_masks()  # still prunes after reload
    assert int(out["step"]) == 2
    resaved = tf.saved_model.load(graphprune.save(loaded, str(tmp_path / "resaved")))  # saved as reloaded
    _assert_close(resaved.signatures["serving_default"](x=x)["output_0"], loaded(x))
    assert int(resaved.step.numpy()) == 2
    with pytest.raises(graphprune.BadModelError, match="reloaded prunable SavedModel"):
        graphprune.save(cnn, str(tmp_path / "not_prunable"))


def test_masks_are_one_byte_and_the_forward_reads_them_as_the_weights_dtype(tmp_path, cnn):
    x = testmodels.batch([8, 8, 3])
    pm = graphprune.prune(cnn, schedule=graphprune.ConstantSparsity(0.6, 0, frequency=1))
    pm.update_masks()
    assert {m.dtype for m in pm.masks} == {tf.uint8}
    for mask, weight in zip(pm.masks, pm.pruned_weights):
        np.testing.assert_array_equal(mask.numpy(), np.abs(weight.numpy()) > 0)
        assert 0.55 < 1 - np.mean(mask.numpy()) < 0.65
    loaded = tf.saved_model.load(graphprune.save(pm, str(tmp_path / "pruned")))
    assert {m.dtype for m in loaded.masks} == {tf.uint8}
    _assert_close(loaded(x), pm(x))


def test_prunable_models_saved_with_float_masks_still_update_prune_and_finalize(tmp_path, cnn, monkeypatch):
    """What graphprune wrote before masks were bool: masks of the weight's dtype, multiplied in
    without a Cast. Such a model still updates, prunes one-shot and finalizes (from its directory)."""
    from graphprune import masks

    x = testmodels.batch([8, 8, 3])
    with monkeypatch.context() as patch:
        patch.setattr(masks, "MASK_DTYPE", "float32")
        pm = graphprune.prune(cnn, schedule=graphprune.ConstantSparsity(0.6, 0, frequency=1))
    assert {m.dtype for m in pm.masks} == {tf.float32}
    ops = {n.op for n in pm.traced.entry("__call__").graph_def.node if "graphprune/mask" in n.name}
    assert "Cast" not in ops
    path = graphprune.save(pm, str(tmp_path / "old"))
    old = tf.saved_model.load(path)
    old.update_masks()
    for mask, weight in zip(old.masks, old.pruned_weights):
        assert mask.dtype == tf.float32 and 0.55 < 1 - np.mean(mask.numpy()) < 0.65
        np.testing.assert_array_equal(mask.numpy() != 0, weight.numpy() != 0)
    expected = old(x).numpy()
    graphprune.save(old, str(tmp_path / "updated"))
    final = tf.saved_model.load(graphprune.finalize(str(tmp_path / "updated"), str(tmp_path / "final")))
    _assert_close(final(x), expected, atol=1e-5)
    reloaded = graphprune.prune(str(tmp_path / "updated"), schedule=graphprune.ConstantSparsity(0.8, 0, frequency=1))
    reloaded.prune_now()
    assert all(m.dtype == tf.float32 and abs(np.mean(m.numpy() == 0) - 0.8) < 0.02 for m in reloaded.masks)


def test_saving_refuses_to_clobber(tmp_path, mlp):
    pm = graphprune.prune(mlp)
    path = tmp_path / "out"
    graphprune.save(pm, str(path))
    with pytest.raises(graphprune.OutputExistsError, match="overwrite"):
        graphprune.save(pm, str(path))
    graphprune.save(pm, str(path), overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_input_saved_model_is_not_modified(mlp_saved_model):
    before = testmodels.directory_digest(mlp_saved_model)
    pm = graphprune.prune(mlp_saved_model, schedule=graphprune.ConstantSparsity(0.9, 0, frequency=1))
    pm.update_masks()
    assert testmodels.directory_digest(mlp_saved_model) == before


def test_verify_mode_reports_every_pass(mlp):
    pm = graphprune.prune(mlp, schedule=graphprune.ConstantSparsity(0.5, 0), verify=True)
    assert pm(testmodels.batch([8])).shape == (5, 4)


def test_one_shot_reaches_what_the_next_update_reaches_when_magnitudes_tie():
    """Issue #16: one-shot left weights 1-2 entries short when float32 magnitudes tied at the
    threshold, and the first update then pruned them. Here thousands of entries tie."""
    rng = np.random.RandomState(0)
    levels = tf.Variable((rng.randint(-3, 4, size=(64, 32)) * 0.25).astype(np.float32), name="levels")
    flat = tf.Variable(np.full((32, 8), 0.1, np.float32), name="flat")  # every magnitude equal

    @tf.function(input_signature=[tf.TensorSpec([None, 64], tf.float32)])
    def f(x):
        return tf.matmul(tf.nn.relu(tf.matmul(x, levels)), flat)

    pm = graphprune.prune(f, schedule=graphprune.ConstantSparsity(0.5, 0, frequency=1), one_shot=True)
    one_shot = [mask.numpy() for mask in pm.masks]
    sparsity = {mask.name.split("/")[0]: float(np.mean(mask.numpy() == 0)) for mask in pm.masks}
    assert 0.3 < sparsity["levels"] <= 0.5 and sparsity["flat"] == 0.0  # ties at the threshold are kept
    x = testmodels.batch([64])
    before = pm(x).numpy()
    pm.update_masks()  # step 1 prunes at the same sparsity
    for mask, after in zip(one_shot, pm.masks):
        np.testing.assert_array_equal(mask, after.numpy())
    np.testing.assert_array_equal(pm(x).numpy(), before)
