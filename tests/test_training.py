"""Gradual pruning while training in the user's own loop: schedules, structures, rules,
distribution, checkpoints and summaries."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import graphprune
import testmodels


def _images(n=64, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.standard_normal([n, 8, 8, 3]).astype(np.float32)
    labels = (x[:, :4, :4, 0].mean(axis=(1, 2)) > 0).astype(np.int32) + 2 * (x[:, 4:, 4:, 1].mean(axis=(1, 2)) > 0)
    return tf.constant(x), tf.constant(labels)


def _loss(pm, x, labels):
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, pm(x)))


def _train(pm, steps, x, labels, lr=0.05, on_step=None, optimizer=None):
    optimizer = optimizer or tf.keras.optimizers.SGD(lr)
    for step in range(steps):
        pm.update_masks()
        with tf.GradientTape() as tape:
            loss = _loss(pm, x, labels)
        grads = tape.gradient(loss, pm.trainable_variables)
        optimizer.apply_gradients(zip(grads, pm.trainable_variables))
        if on_step is not None:
            on_step(step)
    return float(loss)


def _within_one_element(weight_row, target):
    return abs(weight_row["sparsity"] - target) <= 1.0 / weight_row["elements"] + 1e-9


def test_cnn_polynomial_decay_reaches_target_and_learns(cnn):
    x, labels = _images()
    pm = graphprune.prune(cnn, schedule=graphprune.PolynomialDecay(0.0, 0.9, begin_step=0, end_step=60,
                                                                   frequency=10))
    untrained = float(_loss(pm, x, labels))
    final_loss = _train(pm, 80, x, labels)
    for row in pm.weights():
        assert _within_one_element(row, 0.9), row
        # stored weights are zero too, not only masked in the forward pass
        assert row["nonzeros"] == round((1 - row["sparsity"]) * row["elements"])
    assert final_loss < untrained


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_masks_never_revive_and_checkpoints_are_sparse_at_every_step(tmp_path, cnn, optimizer):
    x, labels = _images()
    pm = graphprune.prune(cnn, schedule=graphprune.PolynomialDecay(0.2, 0.8, 0, 20, frequency=5))
    checkpoint = tf.train.Checkpoint(model=pm)
    previous = [m.numpy() for m in pm.masks]

    def check(step):
        nonlocal previous
        current = [m.numpy() for m in pm.masks]
        for before, after in zip(previous, current):
            assert not np.any((before == 0) & (after == 1)), f"a pruned weight revived at step {step}"
        previous = current
        path = checkpoint.write(str(tmp_path / f"ckpt-{step}"))
        reader = tf.train.load_checkpoint(path)
        for weight, mask in zip(pm.pruned_weights, pm.masks):
            key = next(k for k in reader.get_variable_to_shape_map()
                       if k.endswith("VARIABLE_VALUE") and reader.get_tensor(k).shape == weight.shape
                       and np.array_equal(reader.get_tensor(k), weight.numpy()))
            stored = reader.get_tensor(key)
            assert np.all(stored[mask.numpy() == 0] == 0), f"checkpoint at step {step} is not sparse"

    # With SGD stored pruned weights stay zero through the optimizer step. Adam's momentum moves
    # weights whose gradient is zero: update_masks() re-zeroes them on every call, apply_masks()
    # between an optimizer step and a checkpoint.
    adam = tf.keras.optimizers.Adam(0.01) if optimizer == "adam" else None
    _train(pm, 25, x, labels, on_step=lambda step: (pm.apply_masks() if adam else None, check(step)), optimizer=adam)


def test_global_scope_shares_one_threshold(cnn):
    pm = graphprune.prune(cnn, schedule=graphprune.ConstantSparsity(0.7, 0, frequency=1), scope="global")
    pm.update_masks()
    thresholds = {float(t.numpy()) for t in pm.thresholds}
    assert len(thresholds) == 1
    rows = pm.weights()
    total = sum(r["elements"] for r in rows)
    zeros = sum(r["sparsity"] * r["elements"] for r in rows)
    assert zeros / total == pytest.approx(0.7, abs=1.0 / total)
    assert len({round(r["sparsity"], 3) for r in rows}) > 1  # layers end at different sparsities
    # the threshold is the k-th largest |w| over all weights
    magnitudes = np.concatenate([np.abs(w.numpy()).ravel() for w in cnn.trainable_variables if w.shape.rank >= 2])
    assert thresholds.pop() == pytest.approx(np.sort(magnitudes)[::-1][round(total * 0.3) - 1], abs=0)


def test_rules_skip_own_sparsity_and_own_structure(cnn):
    rules = [
        graphprune.Rule("Depthwise", skip=True),
        graphprune.Rule("conv2d/kernel", sparsity=0.5),
        graphprune.Rule("dense/kernel", structure=graphprune.Structure(block_size=(4, 1))),
    ]
    pm = graphprune.prune(cnn, schedule=graphprune.ConstantSparsity(0.75, 0, frequency=1), rules=rules)
    pm.update_masks()
    rows = {r["name"]: r for r in pm.weights()}
    assert set(rows) == {"conv2d/kernel", "dense/kernel"}
    assert _within_one_element(rows["conv2d/kernel"], 0.5)
    assert rows["dense/kernel"]["sparsity"] == pytest.approx(0.75, abs=4 / 1280)
    dense_mask = next(m for m in pm.masks if m.name.startswith("dense/kernel")).numpy()
    blocks = dense_mask.reshape(32, 4, 10)
    assert np.all(blocks.min(axis=1) == blocks.max(axis=1))


def test_two_four_structure_through_update(mlp):
    pm = graphprune.prune(mlp, schedule=graphprune.ConstantSparsity(0.5, 0, frequency=1), m_by_n=(2, 4))
    pm.update_masks()
    for mask in pm.masks:
        assert np.all(mask.numpy().T.reshape(-1, 4).sum(axis=-1) == 2)


def test_two_four_refuses_weights_that_do_not_fit():
    weight = tf.Variable(tf.ones([6, 4]), name="odd")

    @tf.function(input_signature=[tf.TensorSpec([1, 6], tf.float32)])
    def f(x):
        return tf.matmul(x, weight)

    with pytest.raises(graphprune.StructureError, match="odd.*not a multiple of N=4.*exclude"):
        graphprune.prune(f, schedule=graphprune.ConstantSparsity(0.5, 0), m_by_n=(2, 4))


def test_one_shot_prunes_now(cnn):
    x = testmodels.batch([8, 8, 3])
    pm = graphprune.prune(cnn, schedule=graphprune.ConstantSparsity(0.6, 0), one_shot=True)
    for row in pm.weights():
        assert _within_one_element(row, 0.6)
    # outputs are those of the model with the pruned weights
    for weight, mask in zip(pm.pruned_weights, pm.masks):
        np.testing.assert_array_equal(weight.numpy() * mask.numpy(), weight.numpy())
    assert pm(x).shape == (5, 10)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_update_masks_traced_into_the_train_step_prunes_like_eager(cnn, scope):
    """update_masks() inside the user's tf.function, its outputs unused: the inlined update must
    still assign masks (it once only advanced the step), exactly as the eager calls do."""
    x, labels = _images()
    schedule = graphprune.PolynomialDecay(0.0, 0.8, begin_step=0, end_step=12, frequency=3)
    eager = graphprune.prune(cnn, schedule=schedule, scope=scope)
    traced = graphprune.prune(cnn, schedule=schedule, scope=scope)
    optimizers = {id(eager): tf.keras.optimizers.SGD(0.05), id(traced): tf.keras.optimizers.SGD(0.05)}

    def train_step(pm, with_update):
        if with_update:
            pm.update_masks()  # result ignored, as in a typical loop
        with tf.GradientTape() as tape:
            loss = _loss(pm, x, labels)
        optimizers[id(pm)].apply_gradients(zip(tape.gradient(loss, pm.trainable_variables), pm.trainable_variables))

    traced_step = tf.function(lambda: train_step(traced, True))
    for _ in range(15):
        eager.update_masks()
        train_step(eager, False)
        traced_step()
    assert int(traced.step.numpy()) == int(eager.step.numpy()) == 15
    assert traced.sparsity() == pytest.approx(0.8, abs=0.01)
    for a, b in zip(eager.masks + eager.pruned_weights, traced.masks + traced.pruned_weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)


def test_step_numbering_matches_the_reference_toolkit(mlp):
    """The reference's wrapper increments its step before the mask update, so a model's first
    training batch is step 1 there: with begin_step=0 and frequency 4 it prunes at batches 4 and
    8, never at the first. update_masks() numbers batches the same way."""
    pm = graphprune.prune(mlp, schedule=graphprune.ConstantSparsity(0.5, begin_step=0, frequency=4))
    outputs = [pm.update_masks() for _ in range(8)]
    assert [int(o["step"]) for o in outputs] == list(range(1, 9))
    assert [bool(o["should_prune"]) for o in outputs] == [False, False, False, True, False, False, False, True]
    assert pm.sparsity() == pytest.approx(0.5, abs=0.01)


def test_schedule_gates_updates_and_step_is_one_variable(mlp):
    pm = graphprune.prune(mlp, schedule=graphprune.ConstantSparsity(0.5, begin_step=3, frequency=2))
    outputs = [pm.update_masks() for _ in range(8)]
    assert [bool(o["should_prune"]) for o in outputs] == [False, False, True, False, True, False, True, False]
    assert [int(o["step"]) for o in outputs] == list(range(1, 9))
    assert int(pm.step.numpy()) == 8
    assert len([v for v in pm.variables if v.dtype == tf.int64]) == 1


def test_mirrored_strategy_two_replicas_identical_masks(mirrored):
    strategy = mirrored
    with strategy.scope():
        model = testmodels.MLP()
        pm = graphprune.prune(model, schedule=graphprune.PolynomialDecay(0.0, 0.8, 0, 20, frequency=5))
        optimizer = tf.keras.optimizers.SGD(0.05)
    rng = np.random.RandomState(0)
    data = (rng.standard_normal([64, 8]).astype(np.float32), rng.standard_normal([64, 4]).astype(np.float32))
    testmodels.train_mirrored(strategy, pm, optimizer, data, batch_size=16, steps=25)
    for variable in pm.masks + pm.pruned_weights:
        replicas = [component.numpy() for component in variable.values]
        assert len(replicas) == 2
        np.testing.assert_array_equal(replicas[0], replicas[1])
        assert np.mean(replicas[0] == 0) == pytest.approx(0.8, abs=1.0 / replicas[0].size)


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.slow
def test_multi_worker_mirrored_two_processes(tmp_path):
    worker = os.path.join(os.path.dirname(__file__), "multiworker_worker.py")
    ports = [str(p) for p in _free_ports(2)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="-1")
    processes = [subprocess.Popen([sys.executable, worker, str(i), *ports, str(tmp_path)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    for process in processes:
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, output.decode()[-2000:]
    first, second = np.load(tmp_path / "worker0.npz"), np.load(tmp_path / "worker1.npz")
    assert sorted(first.files) == sorted(second.files) and len(first.files) == 4
    # collective broadcasts have no uint8 kernel: masks made under this strategy are int32
    assert {first[name].dtype for name in first.files if "graphprune" in name} == {np.dtype(np.int32)}
    for name in first.files:
        np.testing.assert_array_equal(first[name], second[name])
        assert np.mean(first[name] == 0) == pytest.approx(0.75, abs=1.0 / first[name].size)


def _tags(log_dir):
    from tensorflow.core.util import event_pb2

    tags = {}
    for name in os.listdir(log_dir):
        for record in tf.data.TFRecordDataset(os.path.join(log_dir, name)):
            event = event_pb2.Event.FromString(record.numpy())
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append((event.step, float(tf.make_ndarray(value.tensor))))
    return tags


def test_tensorboard_summaries(tmp_path, mlp):
    pm = graphprune.prune(mlp, schedule=graphprune.PolynomialDecay(0.0, 0.5, 0, 10, frequency=5))
    writer = tf.summary.create_file_writer(str(tmp_path))
    for _ in range(6):
        pm.update_masks()
        pm.write_summaries(writer=writer)
    writer.flush()
    tags = _tags(tmp_path)
    assert {"pruning/sparsity", "pruning/target_sparsity", "pruning/dense/kernel/sparsity",
            "pruning/dense/kernel/threshold"} <= set(tags)
    # the fifth update is step 5 (the first is step 1, as the reference's first batch)
    assert tags["pruning/target_sparsity"][4] == (5, pytest.approx(0.5 * (1 - 0.5 ** 3), abs=1e-6))


def test_keras_fit_callback_updates_masks_every_batch(tmp_path, mlp):
    import keras

    pm = graphprune.prune(mlp, schedule=graphprune.PolynomialDecay(0.0, 0.5, 0, 8, frequency=2))

    class Trainer(keras.Model):
        """Keras 3 tracks only its own variables: train the pruned model's in train_step."""

        def __init__(self, prunable):
            super().__init__()
            self.prunable = prunable

        def call(self, x):
            return self.prunable(x)

        def train_step(self, data):
            x, y = data
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean((self.prunable(x) - y) ** 2)
            variables = self.prunable.trainable_variables
            for variable, grad in zip(variables, tape.gradient(loss, variables)):
                variable.assign_sub(0.05 * grad)
            return {"loss": loss}

    rng = np.random.RandomState(0)
    x = rng.standard_normal([40, 8]).astype(np.float32)
    y = rng.standard_normal([40, 4]).astype(np.float32)
    trainer = Trainer(pm)
    trainer.compile()
    callback = graphprune.PruningCallback(pm, log_dir=str(tmp_path))
    trainer.fit(x, y, batch_size=4, epochs=1, callbacks=[callback], verbose=0)
    assert int(pm.step.numpy()) == 10  # ten batches: steps 1..10
    for row in pm.weights():
        assert _within_one_element(row, 0.5)
    assert os.listdir(tmp_path)


def test_global_scope_never_prunes_a_whole_weight():
    large = tf.Variable((10.0 + np.random.RandomState(0).rand(8, 8)).astype(np.float32), name="large")
    small = tf.Variable(np.random.RandomState(1).rand(8, 8).astype(np.float32) * 0.01, name="small")

    @tf.function(input_signature=[tf.TensorSpec([1, 8], tf.float32)])
    def f(x):
        return tf.matmul(tf.matmul(x, large), small)

    pm = graphprune.prune(f, schedule=graphprune.ConstantSparsity(0.5, 0, frequency=1), scope="global")
    pm.update_masks()
    masks = {m.name.split("/")[0]: m.numpy() for m in pm.masks}
    assert masks["large"].sum() == 64  # every large weight outranks every small one...
    assert masks["small"].sum() == 1  # ...but the small layer keeps its largest element


class _TwoHidden(tf.Module):
    """8 -> 32 -> 16 -> 3: two groups of neurons, of different widths and fan-ins."""

    def __init__(self):
        super().__init__()
        rng = np.random.RandomState(0)
        self.kernels = [tf.Variable(rng.standard_normal(shape).astype(np.float32) * 0.3, name=name)
                        for name, shape in (("a/kernel", [8, 32]), ("b/kernel", [32, 16]), ("h/kernel", [16, 3]))]

    @tf.function(input_signature=[tf.TensorSpec([None, 8], tf.float32)])
    def __call__(self, x):
        a, b, h = self.kernels
        return tf.nn.relu(tf.nn.relu(x @ a) @ b) @ h


def test_channel_training_reports_the_fraction_of_channels_removed(tmp_path):
    """The schedule's target is a fraction of channels; the weights lose more (a kernel's rows and
    columns both). fit reports the channels removed against the target (progress, TensorBoard, the
    result), also for a reloaded prunable SavedModel, as counted from the trained kernels; the weights'
    sparsity stays in the report for what it is."""
    import io

    from graphprune import training

    tf.saved_model.save(_TwoHidden(), str(tmp_path / "model"))
    pm = graphprune.prune(str(tmp_path / "model"), graphprune.PolynomialDecay(0.0, 0.75, 0, 8, frequency=2),
                          structure="channel")
    rng = np.random.RandomState(1)
    x, y = rng.standard_normal([64, 8]).astype(np.float32), np.arange(64) % 3
    stream = io.StringIO()
    result = training.fit(pm, x, y, batch_size=4, log_dir=str(tmp_path / "logs"),
                          progress=training.Progress(16, stream=stream, every=1))
    kernels = {key.split("/")[0]: value.numpy() for key, value in pm.variables_by_key.items()
               if key.endswith("kernel")}
    removed = int((~kernels["a"].any(axis=0)).sum()) + int((~kernels["b"].any(axis=0)).sum())
    assert removed == 24 + 12 and (~kernels["b"].any(axis=1)).sum() == 24  # b's rows went with a's columns
    assert result.channel_sparsity == removed / 48 == 0.75 == pm.channel_sparsity()  # and Keras's callback's
    zeros = sum(int((value == 0).sum()) for value in kernels.values()) / sum(value.size for value in kernels.values())
    assert result.sparsity == pytest.approx(zeros) and zeros > 0.85  # 1 - (8 * 8 + 8 * 4 + 4 * 3) / 816
    lines = stream.getvalue().splitlines()
    assert len(lines) == 16 and "channels removed 0.750 (target 0.750), weights 0.868 zero" in lines[-1], lines
    # step 4: the target 0.75 * (1 - 0.5 ** 3); kept counts rounded up: 11 of 32, 6 of 16 (31 of 48 removed)
    assert "channels removed 0.646 (target 0.656)" in lines[3], lines
    tags = _tags(tmp_path / "logs")
    assert tags["pruning/channel_sparsity"][-1] == (16, 0.75) and tags["pruning/sparsity"][-1][1] == pytest.approx(zeros)
    # a reloaded prunable SavedModel (the CLI's train) reports the same
    graphprune.save(pm, str(tmp_path / "prunable"))
    again = training.fit(tf.saved_model.load(str(tmp_path / "prunable")), x, y, batch_size=32)
    assert again.channel_sparsity == 0.75
    # unstructured pruning: the weights' sparsity against the target, as before
    stream = io.StringIO()
    pm = graphprune.prune(str(tmp_path / "model"), graphprune.ConstantSparsity(0.5, 0, frequency=1))
    plain = training.fit(pm, x, y, batch_size=32, progress=training.Progress(2, stream=stream, every=1))
    assert plain.channel_sparsity is None is pm.channel_sparsity()
    assert "sparsity 0.500 (target 0.500)" in stream.getvalue()
