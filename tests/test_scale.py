"""Scale (issue #15), without timing anything: exact thresholds by radix select, global thresholds
without concatenation, finalize past a frozen-bytes limit the test lowers (weights kept as
variables, outputs equal to the masked model's), no weight copied or changed where it must not be,
TFLite past the 2 GB of a plain flatbuffer written with a one-line warning, a corrupt SavedModel refused
in one line, and the CLI's per-stage lines under --verbose."""

import os

import numpy as np
import pytest
import tensorflow as tf

import graphprune
import testmodels
from graphprune import finalization
from graphprune.masks import global_threshold, kth_largest
from test_cli import graphprune as run_cli


def _kth(values, sparsity):
    """The rule in NumPy: the k-th largest, k = max(round(n * (1 - s)), 1) in float32."""
    flat = np.sort(np.asarray(values, np.float64).ravel())[::-1]
    k = max(int(np.round(np.float32(flat.size) * (np.float32(1) - np.float32(sparsity)))), 1)
    return flat[k - 1]


HARD_VALUES = {
    "normal": np.abs(np.random.RandomState(0).standard_normal(5000)).astype(np.float32),
    "ties": np.repeat(np.float32([0.5, 0.25, 3.0, 0.0]), [1000, 7, 3, 400]),
    "one bin": (1.0 + np.arange(3000, dtype=np.float32) * np.float32(2 ** -23)),  # same high 16 bits
    "subnormal and huge": np.float32([1e-45, 3e-42, 1e-38, 0.0, 3.4e38, 1e30, 7.0] * 50),
    "zeros": np.zeros(100, np.float32),
}


@pytest.mark.parametrize("case", sorted(HARD_VALUES))
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 0.999])
def test_radix_select_is_exact(case, sparsity):
    values = HARD_VALUES[case]
    assert float(kth_largest(values, sparsity)) == _kth(values, sparsity)
    graph_result = tf.function(lambda v: kth_largest(v, sparsity))(tf.constant(values))
    assert float(graph_result) == _kth(values, sparsity)


@pytest.mark.parametrize("dtype", [np.float16, tf.bfloat16.as_numpy_dtype, np.float64])
def test_radix_select_in_other_float_types(dtype):
    values = np.abs(np.random.RandomState(1).standard_normal(999)).astype(dtype)
    result = kth_largest(tf.constant(values), 0.7)
    assert result.dtype == tf.as_dtype(dtype)
    assert float(result) == _kth(values.astype(np.float64), 0.7)


def test_global_threshold_equals_the_threshold_of_the_concatenation():
    rng = np.random.RandomState(2)
    parts = [np.abs(rng.standard_normal(shape)).astype(np.float32) for shape in [(30, 20), (7,), (3, 3, 4, 5)]]
    parts[1][:] = parts[0][0, 0]  # ties across weights
    whole = np.concatenate([p.ravel() for p in parts])
    for sparsity in (0.1, 0.5, 0.95):
        assert float(global_threshold(parts, sparsity)) == _kth(whole, sparsity)
        as_sources = [lambda p=p: tf.constant(p) for p in parts]  # recomputed per pass
        assert float(global_threshold(as_sources, sparsity)) == _kth(whole, sparsity)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_in_graph_update_reaches_the_rule_weight_by_weight(scope):
    model = testmodels.MLP()
    pm = graphprune.prune(model.__call__, graphprune.ConstantSparsity(0.6, 0, frequency=1), scope=scope)
    weights = {v.name: v.numpy() for v in pm.pruned_weights}
    pm.update_masks()
    if scope == "layer":
        for variable, mask in zip(pm.pruned_weights, pm.masks):
            expected = np.abs(weights[variable.name]) >= _kth(np.abs(weights[variable.name]), 0.6)
            np.testing.assert_array_equal(mask.numpy() != 0, expected)
    else:
        threshold = _kth(np.concatenate([np.abs(w).ravel() for w in weights.values()]), 0.6)
        for variable, mask in zip(pm.pruned_weights, pm.masks):
            np.testing.assert_array_equal(mask.numpy() != 0, np.abs(weights[variable.name]) >= threshold)


class Wide(tf.Module):
    """Three MatMul weights of 12, 48 and 96 KiB (float32), and biases."""

    def __init__(self):
        super().__init__()
        rng = np.random.RandomState(3)
        self.kernels = [tf.Variable(rng.standard_normal(shape).astype(np.float32) / 8, name=f"dense_{i}/kernel")
                        for i, shape in enumerate([(16, 192), (192, 64), (64, 384)])]
        self.biases = [tf.Variable(rng.standard_normal([shape]).astype(np.float32), name=f"dense_{i}/bias")
                       for i, shape in enumerate([192, 64, 384])]

    @tf.function(input_signature=[tf.TensorSpec([None, 16], tf.float32)])
    def __call__(self, x):
        for kernel, bias in zip(self.kernels, self.biases):
            x = tf.nn.relu(tf.matmul(x, kernel) + bias)
        return x


@pytest.fixture
def wide_prunable(tmp_path):
    model = Wide()
    tf.saved_model.save(model, str(tmp_path / "model"))
    pm = graphprune.prune(str(tmp_path / "model"), graphprune.ConstantSparsity(0.5, 0, frequency=1), one_shot=True)
    graphprune.save(pm, str(tmp_path / "prunable"))
    return pm, str(tmp_path / "prunable")


def _saved_variables(path):
    reader = tf.train.load_checkpoint(os.path.join(path, "variables", "variables"))
    return {name.split("/.ATTRIBUTES")[0]: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if name.endswith(".ATTRIBUTES/VARIABLE_VALUE")}


@pytest.mark.parametrize("limit, frozen", [(0, 0), (13 * 1024, 1), (59 * 1024, 1), (60 * 1024, 2), (200 * 1024, 3)])
def test_finalize_past_a_lowered_frozen_limit_keeps_weights_as_variables(tmp_path, wide_prunable, limit, frozen):
    pm, prunable = wide_prunable
    before = testmodels.directory_digest(prunable)
    x = np.random.RandomState(4).standard_normal([5, 16]).astype(np.float32)
    expected = pm(x).numpy()
    path = graphprune.finalize(prunable, str(tmp_path / "final"), max_frozen_bytes=limit)
    assert testmodels.directory_digest(prunable) == before  # the input is only read
    loaded = tf.saved_model.load(path)
    np.testing.assert_allclose(loaded(x).numpy(), expected, atol=1e-5 * max(1.0, np.abs(expected).max()), rtol=0)
    sizes = sorted(np.prod(v.shape) for v in loaded.original_variables if "kernel" in v.name)
    assert len(sizes) == 3 - frozen  # the smallest are frozen first, within the limit
    for variable in loaded.original_variables:
        if "kernel" in variable.name:  # kept as a variable, holding exactly the pruned values
            value = variable.numpy()
            assert np.mean(value == 0) == pytest.approx(0.5, abs=1e-3)
            assert not np.any(np.signbit(value[value == 0]))  # +0.0
    assert not any("graphprune" in v.name for v in loaded.original_variables)


def test_finalize_of_an_in_memory_model_leaves_its_variables_alone(tmp_path):
    model = Wide()
    pm = graphprune.prune(model.__call__, graphprune.ConstantSparsity(0.5, 0, frequency=1))
    pm.update_masks()
    pm.pruned_weights[0].assign_add(tf.ones_like(pm.pruned_weights[0]))  # an optimizer moved pruned weights
    stored = [w.numpy().copy() for w in pm.pruned_weights]
    x = np.random.RandomState(5).standard_normal([3, 16]).astype(np.float32)
    path = graphprune.finalize(pm, str(tmp_path / "final"), max_frozen_bytes=0)
    for weight, value in zip(pm.pruned_weights, stored):
        np.testing.assert_array_equal(weight.numpy(), value)
    np.testing.assert_allclose(tf.saved_model.load(path)(x).numpy(), pm(x).numpy(), atol=1e-5, rtol=0)
    saved = _saved_variables(path)
    assert sum(np.count_nonzero(v == 0) for v in saved.values()) >= 0.5 * sum(w.size for w in stored) - 3


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_finalize_checks_with_products_read_as_folded_weights_bit_for_bit(scope):
    """finalize's check runs the masked model with each w * mask read as the folded weight (so
    TensorFlow does not make every product at once): the outputs are the masked model's exactly,
    tied embeddings (a lookup and an output projection of one masked table) included."""
    from graphprune.finalization import finalize_model, products_as_folded_weights
    from graphprune.verify import run_entries

    class Tied(tf.Module):
        def __init__(self):
            super().__init__()
            rng = np.random.RandomState(6)
            self.table = tf.Variable(rng.standard_normal([50, 16]).astype(np.float32), name="embedding/table")
            self.kernel = tf.Variable(rng.standard_normal([16, 16]).astype(np.float32), name="dense/kernel")

        @tf.function(input_signature=[tf.TensorSpec([None, 7], tf.int32)])
        def __call__(self, ids):
            hidden = tf.nn.relu(tf.matmul(tf.reshape(tf.gather(self.table, ids), [-1, 16]), self.kernel))
            return tf.matmul(hidden, self.table, transpose_b=True)

    model = Tied()
    pm = graphprune.prune(model.__call__, graphprune.ConstantSparsity(0.6, 0, frequency=1), scope=scope,
                          include_gather=True)
    pm.update_masks()
    pm.pruned_weights[0].assign_add(tf.ones_like(pm.pruned_weights[0]))  # moved by an optimizer
    _, values, result = finalize_model(pm)
    masked = result.reports[0][1].model
    expected = run_entries(masked, values, ones_masks=False)
    actual = run_entries(products_as_folded_weights(masked), values, ones_masks=False)
    assert expected.keys() == actual.keys()
    for name in expected:
        for want, got in zip(expected[name], actual[name]):
            np.testing.assert_array_equal(got, want)
    for entry in products_as_folded_weights(masked).entries:
        products = {n.name for n in entry.graph_def.node if n.name.endswith("/graphprune/masked")}
        readers = [n.name for n in entry.graph_def.node for raw in n.input
                   if raw.lstrip("^").split(":")[0] in products]
        assert entry.kind == "update" or (products and not readers)  # still there, read by nothing


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_store_pruned_rewrites_only_weights_that_need_it(dtype):
    from graphprune.masks import store_pruned

    mask = tf.constant([1, 0, 1, 0], dtype)
    weight = tf.Variable(np.array([1.5, 0.0, -2.0, 0.0], dtype))
    store_pruned(weight, mask)  # already pruned: left alone
    np.testing.assert_array_equal(weight.numpy(), [1.5, 0.0, -2.0, 0.0])
    for stray in (3.0, -0.0):  # a moved pruned weight, and a negative zero (bad for compression)
        weight.assign(np.array([1.5, stray, -2.0, 0.0], dtype))
        store_pruned(weight, mask)
        value = weight.numpy()
        np.testing.assert_array_equal(value, [1.5, 0.0, -2.0, 0.0])
        assert not np.signbit(value[1])


def test_max_frozen_bytes_is_checked():
    with pytest.raises(graphprune.GraphPruneError, match="max_frozen_bytes"):
        graphprune.finalize(Wide(), "/nonexistent/never", max_frozen_bytes=-1)


def test_tflite_past_the_plain_flatbuffer_size_is_written_with_a_warning(tmp_path, wide_prunable, monkeypatch):
    """TensorFlow 2.21's converter writes models past 2 GB (a 604M-parameter model: 2.4 GB, run by
    LiteRT; benchmarks/README.md), so graphprune converts and says what such a file means."""
    _, prunable = wide_prunable
    final = graphprune.finalize(prunable, str(tmp_path / "final"))
    float_bytes = (16 * 192 + 192 * 64 + 64 * 384) * 4
    monkeypatch.setattr(finalization, "TFLITE_MAX_BYTES", float_bytes // 2)  # the test lowers the 2 GB
    with pytest.warns(UserWarning, match="past the 2 GB of a plain flatbuffer: LiteRT reads it") as caught:
        path = graphprune.export_tflite(final, str(tmp_path / "m.tflite"))
    assert os.path.getsize(path) > float_bytes // 2 and len(caught) == 1
    assert "\n" not in str(caught[0].message)
    graphprune.export_tflite(final, str(tmp_path / "q.tflite"), quantize="dynamic")  # a quarter: no warning
    assert os.path.getsize(tmp_path / "q.tflite") < float_bytes // 2


def test_a_corrupt_checkpoint_is_refused_in_one_line(tmp_path, wide_prunable):
    _, prunable = wide_prunable
    final = graphprune.finalize(prunable, str(tmp_path / "final"))
    with open(os.path.join(final, "variables", "variables.index"), "wb") as handle:
        handle.write(b"garbage")
    with pytest.raises(graphprune.BadModelError, match="cannot load the SavedModel") as error:
        graphprune.export_tflite(final, str(tmp_path / "m.tflite"))
    assert "\n" not in str(error.value)
    result = run_cli("export", f"--input={final}", f"--tflite={tmp_path / 'm.tflite'}", check=False)
    assert result.returncode == 2 and "cannot load the SavedModel" in result.stderr
    assert not os.path.exists(tmp_path / "m.tflite")


def test_cli_verbose_prints_each_stage_with_time_and_peak_memory(tmp_path):
    model = Wide()
    tf.saved_model.save(model, str(tmp_path / "model"))
    result = run_cli("prune", f"--input={tmp_path / 'model'}", f"--output={tmp_path / 'prunable'}",
                     "--final_sparsity=0.5", "--one_shot", "--verbose")
    assert "prune: save:" in result.stderr and "peak memory" in result.stderr
    result = run_cli("finalize", f"--input={tmp_path / 'prunable'}", f"--output={tmp_path / 'final'}",
                     f"--tflite={tmp_path / 'm.tflite'}", "--max_frozen_mb=0", "--verbose")
    for stage in ("fold masks and strip the pruning ops", "check against the masked model", "save",
                  "size report", "TFLite (float)"):
        assert f"{stage}:" in result.stderr, stage
    quiet = run_cli("finalize", f"--input={tmp_path / 'prunable'}", f"--output={tmp_path / 'final2'}")
    assert "peak memory" not in quiet.stderr
