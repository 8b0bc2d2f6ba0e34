"""Hostile and broken inputs: every refusal is a GraphPruneError, nothing is lost or half-written."""

import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import graphprune
import testmodels


def _digest(path):
    return testmodels.directory_digest(path)


def _schedule():
    return graphprune.ConstantSparsity(0.5, 0)


# the bad-input suite -------------------------------------------------------------------------


def test_empty_directory(tmp_path):
    with pytest.raises(graphprune.BadModelError, match="not a SavedModel"):
        graphprune.prune(str(tmp_path), schedule=_schedule())


def test_truncated_saved_model_pb(tmp_path, mlp_saved_model):
    broken = tmp_path / "broken"
    shutil.copytree(mlp_saved_model, broken)
    data = (broken / "saved_model.pb").read_bytes()
    (broken / "saved_model.pb").write_bytes(data[: len(data) // 3])
    with pytest.raises(graphprune.BadModelError, match="cannot load"):
        graphprune.prune(str(broken), schedule=_schedule())


def test_variables_missing(tmp_path, mlp_saved_model):
    broken = tmp_path / "novars"
    shutil.copytree(mlp_saved_model, broken)
    shutil.rmtree(broken / "variables")
    with pytest.raises(graphprune.BadModelError, match="cannot load"):
        graphprune.prune(str(broken), schedule=_schedule())


def test_no_signatures_or_functions(tmp_path):
    module = tf.Module()
    module.weight = tf.Variable(tf.ones([2, 2]))
    tf.saved_model.save(module, str(tmp_path / "bare"))
    with pytest.raises(graphprune.BadModelError, match="no signature"):
        graphprune.prune(str(tmp_path / "bare"), schedule=_schedule())


@pytest.mark.parametrize("make, error, message", [
    (lambda: graphprune.ConstantSparsity(1.0, 0), graphprune.ScheduleError, r"\[0, 1\)"),
    (lambda: graphprune.PolynomialDecay(0.0, 0.5, 10, 5), graphprune.ScheduleError, "end_step"),
    (lambda: graphprune.ConstantSparsity(0.5, 0, frequency=0), graphprune.ScheduleError, "frequency"),
    (lambda: graphprune.Structure(block_size="0x2"), graphprune.StructureError, "block_size"),
    (lambda: graphprune.Structure(m_by_n="4:2"), graphprune.StructureError, "M:N"),
    (lambda: graphprune.Rule("(unclosed"), graphprune.ScheduleError, "regular expression"),
])
def test_bad_settings(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_block_larger_than_weight(mlp):
    with pytest.raises(graphprune.StructureError, match="larger than the weight"):
        graphprune.prune(mlp, schedule=_schedule(), block_size=(64, 1))


def test_output_inside_input_and_existing_output(tmp_path, mlp_saved_model):
    pm = graphprune.prune(mlp_saved_model, schedule=_schedule())
    with pytest.raises(graphprune.OutputExistsError, match="inside the input"):
        graphprune.save(pm, os.path.join(mlp_saved_model, "out"), inputs=[mlp_saved_model])
    with pytest.raises(graphprune.OutputExistsError, match="exists"):
        graphprune.save(pm, mlp_saved_model)


def test_read_only_input_directory(tmp_path, mlp_saved_model):
    source = tmp_path / "readonly"
    shutil.copytree(mlp_saved_model, source)
    for root, dirs, files in os.walk(source):
        for name in files + dirs:
            os.chmod(os.path.join(root, name), 0o555 if name in dirs else 0o444)
    os.chmod(source, 0o555)
    before, listing = _digest(source), sorted(os.listdir(tmp_path))
    try:
        pm = graphprune.prune(str(source), schedule=_schedule(), one_shot=True)
        graphprune.finalize(pm, str(tmp_path / "final"))
    finally:
        os.chmod(source, 0o755)
    assert _digest(source) == before
    assert sorted(os.listdir(tmp_path)) == sorted(listing + ["final"])  # nothing written next to it


# dtypes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16, tf.float64])
def test_other_float_weight_dtypes(dtype):
    weight = tf.Variable(tf.cast(np.random.RandomState(0).randn(16, 8), dtype), name="w")

    @tf.function(input_signature=[tf.TensorSpec([None, 16], dtype)])
    def f(x):
        return tf.matmul(x, weight)

    x = tf.cast(np.random.RandomState(1).randn(3, 16), dtype)
    pm = graphprune.prune(f, schedule=graphprune.ConstantSparsity(0.75, 0, frequency=1))
    np.testing.assert_array_equal(pm(x).numpy(), f(x).numpy())
    pm.update_masks()
    assert pm.masks[0].dtype == tf.uint8  # one byte per element, whatever the weight's dtype
    assert pm.weights()[0]["sparsity"] == pytest.approx(0.75)
    expected = tf.matmul(x, weight * tf.cast(pm.masks[0], dtype))
    np.testing.assert_array_equal(pm(x).numpy(), expected.numpy())


def test_integer_weights_are_skipped_with_a_warning():
    quantized = tf.Variable(np.ones([4, 4], np.int8), name="quantized")
    floating = tf.Variable(np.ones([4, 4], np.float32), name="floating")

    @tf.function(input_signature=[tf.TensorSpec([1, 4], tf.float32)])
    def f(x):
        return tf.matmul(tf.matmul(x, tf.cast(quantized, tf.float32)), floating)

    with pytest.warns(UserWarning, match="not pruning 'quantized': dtype int8"):
        pm = graphprune.prune(f, schedule=_schedule())
    assert [r["name"] for r in pm.weights()] == ["floating"]


def test_tied_weight_is_masked_once():
    shared = tf.Variable(np.random.RandomState(0).randn(6, 6).astype(np.float32), name="tied")

    @tf.function(input_signature=[tf.TensorSpec([2, 6], tf.float32)])
    def f(x):
        return tf.matmul(tf.nn.relu(tf.matmul(x, shared)), shared, transpose_b=True)

    pm = graphprune.prune(f, schedule=graphprune.ConstantSparsity(0.5, 0, frequency=1))
    assert len(pm.masks) == 1
    pm.update_masks()
    x = tf.constant(np.random.RandomState(1).randn(2, 6).astype(np.float32))
    masked = shared * tf.cast(pm.masks[0], tf.float32)
    np.testing.assert_allclose(pm(x).numpy(), tf.matmul(tf.nn.relu(tf.matmul(x, masked)), masked,
                                                         transpose_b=True).numpy(), atol=1e-6)


# interrupted runs ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_save_leaves_nothing(tmp_path, sig):
    model = testmodels.CNN()
    source = str(tmp_path / "model")
    tf.saved_model.save(model, source, signatures={"serving_default": model.__call__})
    before = _digest(source)
    out = tmp_path / "out"
    script = (
        "import sys, graphprune, graphprune.io as io\n"
        "import signal, time\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even run from a background job\n"
        "pm = graphprune.prune(sys.argv[1], schedule=graphprune.ConstantSparsity(0.5, 0))\n"
        "original = io._publish\n"
        "def slow(temp, path, **options):\n"
        "    print('READY', flush=True); time.sleep(60); original(temp, path, **options)\n"
        "io._publish = slow\n"
        "graphprune.save(pm, sys.argv[2])\n"
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    process = subprocess.Popen([sys.executable, "-c", script, source, str(out)], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, env=env, text=True)
    assert process.stdout.readline().strip() == "READY"  # the SavedModel is written, not yet renamed
    partials = [p for p in os.listdir(tmp_path) if p.startswith(".out.partial-")]
    assert len(partials) == 1
    process.send_signal(sig)
    process.wait(timeout=60)
    assert process.returncode != 0
    assert not out.exists()
    assert _digest(source) == before
    left = [p for p in os.listdir(tmp_path) if p.startswith(".out.partial-")]
    assert left == ([] if sig == signal.SIGINT else partials)  # SIGKILL cannot clean up...
    graphprune.save(graphprune.prune(source, schedule=_schedule()), str(out))
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out.partial-")]  # ...the next run does
    assert os.path.exists(out / "saved_model.pb")


class TiedEmbedding(tf.Module):
    """A language-model head tied to its embedding: lookup (ResourceGather) and output MatMul."""

    def __init__(self):
        super().__init__()
        rng = np.random.RandomState(0)
        self.table = tf.Variable(rng.standard_normal([12, 6]).astype(np.float32), name="embedding/table")
        self.hidden = tf.Variable(rng.standard_normal([6, 6]).astype(np.float32), name="hidden/kernel")

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.int32)])
    def __call__(self, ids):
        vectors = tf.reduce_mean(tf.nn.embedding_lookup(self.table, ids), axis=1)
        return tf.matmul(tf.tanh(tf.matmul(vectors, self.hidden)), self.table, transpose_b=True)


def test_tied_embedding_masked_once_for_lookup_and_projection():
    module = TiedEmbedding()
    ids = tf.constant([[0, 3, 5], [7, 7, 11]])
    pm = graphprune.prune(module, schedule=graphprune.ConstantSparsity(0.5, 0, frequency=1))
    np.testing.assert_array_equal(pm(ids).numpy(), module(ids).numpy())
    names = sorted(m.name.split("/graphprune")[0] for m in pm.masks)
    assert names == ["embedding/table", "hidden/kernel"]
    ops = {n.op for n in pm.traced.entry("__call__").graph_def.node}
    assert "ResourceGather" not in ops and "GatherV2" in ops
    pm.update_masks()
    mask = {m.name.split("/graphprune")[0]: m.numpy().astype(np.float32) for m in pm.masks}
    table, hidden = module.table * mask["embedding/table"], module.hidden * mask["hidden/kernel"]
    vectors = tf.reduce_mean(tf.gather(table, ids), axis=1)
    expected = tf.matmul(tf.tanh(tf.matmul(vectors, hidden)), table, transpose_b=True)
    np.testing.assert_allclose(pm(ids).numpy(), expected.numpy(), atol=1e-5)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(pm(ids) ** 2)
    grad = tf.convert_to_tensor(tape.gradient(loss, module.table))
    assert np.all(grad.numpy()[mask["embedding/table"] == 0] == 0)  # both paths masked


def test_embedding_only_is_an_opt_in_target(tmp_path):
    table = tf.Variable(np.random.RandomState(0).standard_normal([10, 4]).astype(np.float32), name="embedding")

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int32)])
    def lookup(ids):
        return tf.nn.embedding_lookup(table, ids)

    with pytest.raises(graphprune.NoPrunableWeightsError):
        graphprune.prune(lookup, schedule=_schedule())
    pm = graphprune.prune(lookup, schedule=graphprune.ConstantSparsity(0.5, 0, frequency=1), include_gather=True)
    pm.update_masks()
    assert pm.weights()[0]["sparsity"] == 0.5
    ids = tf.constant([1, 4, 9])
    np.testing.assert_array_equal(pm(ids).numpy(), tf.gather(table * tf.cast(pm.masks[0], tf.float32), ids).numpy())
    final = graphprune.finalize(pm, str(tmp_path / "final"))
    np.testing.assert_array_equal(tf.saved_model.load(final)(ids).numpy(), pm(ids).numpy())
