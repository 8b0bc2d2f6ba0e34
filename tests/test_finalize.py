"""Finalization: masks folded, machinery stripped, SavedModel and TFLite give the masked outputs."""

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import tensorflow as tf

import graphprune
import testmodels
from graphprune import graph as g
from graphprune.load import load
from graphprune.passes.fold_masks import fold_masks
from graphprune.passes.freeze_variables import freeze_variables
from graphprune.passes.read_handles_directly import read_handles_directly
from graphprune.passes.strip_unused import strip_unused
from graphprune.pipeline import PassContext, VariableValues
from graphprune.verify import run_entries

MACHINERY_OPS = {"AssignVariableOp", "AssignAddVariableOp", "VarHandleOp", "If", "StatelessIf", "TopKV2"}


@pytest.fixture
def pruned_cnn(cnn):
    pm = graphprune.prune(cnn, schedule=graphprune.ConstantSparsity(0.8, 0, frequency=1))
    pm.update_masks()
    return pm


def _context(pm):
    return PassContext(values=VariableValues(pm.variables_by_key))


def _same(before, after, values):
    expected = run_entries(before, values, ones_masks=False)
    actual = run_entries(after, values, ones_masks=False)
    assert expected.keys() == actual.keys()
    for name in expected:
        for want, got in zip(expected[name], actual[name]):
            np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def _all_ops(model):
    ops = set()
    for entry in model.entries:
        ops.update(g.op_counts(entry.graph_def))
    return ops


# the passes, four tests each -------------------------------------------------------------------


@pytest.mark.parametrize("freeze", [True, False])
def test_fold_masks_numeric(pruned_cnn, freeze):
    context = _context(pruned_cnn)
    result = fold_masks(pruned_cnn.traced, context, freeze=freeze)
    _same(pruned_cnn.traced, result.model, context.values)
    assert result.report["sparsity"]["conv2d/kernel"] == pytest.approx(0.8, abs=0.01)


def test_fold_masks_structure(pruned_cnn):
    model = fold_masks(pruned_cnn.traced, _context(pruned_cnn)).model
    for entry in model.entries:
        assert entry.kind != "update"
        for node in entry.graph_def.node:
            assert not (node.op == "Mul" and "graphprune/masked" in node.name)
        folded = [n for n in entry.graph_def.node if "graphprune/masked" in n.name]
        assert folded and all(n.op == "Const" for n in folded)


def test_fold_masks_no_match(mlp):
    loaded = load(mlp)
    result = fold_masks(loaded.model, PassContext(values=VariableValues(loaded.variables)))
    assert result.changed is False and result.model is loaded.model


def test_fold_masks_idempotent(pruned_cnn):
    context = _context(pruned_cnn)
    once = fold_masks(pruned_cnn.traced, context)
    twice = fold_masks(once.model, context)
    assert twice.changed is False
    assert [e.graph_def for e in twice.model.entries] == [e.graph_def for e in once.model.entries]


def test_strip_unused_numeric_structure_and_idempotence(pruned_cnn):
    context = _context(pruned_cnn)
    folded = fold_masks(pruned_cnn.traced, context).model
    stripped = strip_unused(folded, context)
    assert stripped.changed
    _same(folded, stripped.model, context.values)
    roles = {spec.role for spec in stripped.model.variables.values()}
    assert roles == {g.ROLE_OTHER}  # no mask, threshold or step left
    assert "graphprune/step" in stripped.report["removed_variables"]
    assert not any("/graphprune/mask/" in n.name for e in stripped.model.entries for n in e.graph_def.node)
    again = strip_unused(stripped.model, context)
    assert again.changed is False


def test_strip_unused_no_match(mlp):
    loaded = load(mlp)
    context = PassContext(values=VariableValues(loaded.variables))
    stripped = strip_unused(loaded.model, context)  # drops only the pure control outputs
    assert strip_unused(stripped.model, context).changed is False
    _same(loaded.model, stripped.model, context.values)


def test_freeze_variables_numeric_structure_no_match_idempotent(pruned_cnn):
    context = _context(pruned_cnn)
    folded = strip_unused(fold_masks(pruned_cnn.traced, context).model, context).model
    frozen = freeze_variables(folded, context)
    assert frozen.changed
    final = strip_unused(frozen.model, context).model
    _same(folded, final, context.values)
    assert "ReadVariableOp" not in _all_ops(final) and not final.variables
    assert freeze_variables(final, context).changed is False  # nothing left: no-match and idempotent


def _resource_identity_readers(model):
    """Names of nodes (any body) that read an Identity of a resource handle."""
    readers = []
    for entry in model.entries:
        bodies = [list(entry.graph_def.node)] + [list(f.node_def) for f in entry.graph_def.library.function]
        for nodes in bodies:
            identities = {n.name for n in nodes if n.op == "Identity" and n.attr["T"].type == tf.resource.as_datatype_enum}
            readers += [n.name for n in nodes for raw in n.input if raw.lstrip("^").split(":")[0] in identities]
    return readers


def test_read_handles_directly_numeric_structure_no_match_idempotent(tmp_path, pruned_cnn):
    graphprune.save(pruned_cnn, str(tmp_path / "prunable"))
    loaded = load(str(tmp_path / "prunable"))  # TensorFlow's inliner leaves Identity(handle) -> read
    context = PassContext(values=VariableValues(loaded.variables))
    assert _resource_identity_readers(loaded.model)
    result = read_handles_directly(loaded.model, context)
    assert result.changed and result.report["bypassed"]
    assert not _resource_identity_readers(result.model)
    _same(loaded.model, result.model, context.values)
    assert read_handles_directly(result.model, context).changed is False  # idempotent
    module = testmodels.MLP()
    mlp = load(module.__call__)  # traced directly: reads the handles already
    assert read_handles_directly(mlp.model, PassContext(values=VariableValues(mlp.variables))).changed is False


def test_an_identity_that_orders_a_write_is_kept():
    counter = tf.Variable(0.0, name="counter")
    weight = tf.Variable(np.ones([3, 2], np.float32), name="w")

    @tf.function
    def inner(x):
        return tf.matmul(x, weight)

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32)])
    def outer(x):
        with tf.control_dependencies([counter.assign_add(1.0)]):  # inlined: inner's inputs wait for it
            return inner(x) * counter.read_value()

    loaded = load(outer)
    context = PassContext(values=VariableValues(loaded.variables))
    ordered = [n.name for e in loaded.model.entries for n in e.graph_def.node
               if n.op == "Identity" and n.attr["T"].type == tf.resource.as_datatype_enum and len(n.input) > 1]
    result = read_handles_directly(loaded.model, context)
    still = {n.name for e in result.model.entries for n in e.graph_def.node}
    readers = _resource_identity_readers(result.model)
    assert ordered and all(name in still for name in ordered) and readers  # the write still comes first
    _same(loaded.model, result.model, context.values)


def test_finalized_weights_kept_as_variables_still_quantize_in_tflite(tmp_path, pruned_cnn):
    """The converter freezes and quantizes weights read straight from their handles; read through
    an Identity it kept them as resource variables, in float, whatever was asked."""
    from ai_edge_litert.interpreter import Interpreter

    sizes = {}
    for freeze, limit in ((True, 0), (False, 0), (True, 16 << 20)):
        final = graphprune.finalize(pruned_cnn, str(tmp_path / f"final-{freeze}-{limit}"), freeze=freeze,
                                    max_frozen_bytes=limit)
        for quantize in (None, "dynamic"):
            path = graphprune.export_tflite(final, str(tmp_path / f"m-{freeze}-{limit}-{quantize}.tflite"),
                                            quantize=quantize)
            details = Interpreter(model_path=path).get_tensor_details()
            assert not any(d["dtype"] == np.object_ or "RESOURCE" in str(d.get("dtype")) for d in details)
            assert (quantize == "dynamic") == any(d["dtype"] == np.int8 for d in details)
            sizes[freeze, limit, quantize] = os.path.getsize(path)
    assert len({size for key, size in sizes.items() if key[2] is None}) == 1  # one model, however finalized
    assert all(sizes[key[:2] + ("dynamic",)] < 0.7 * sizes[key[:2] + (None,)] for key in sizes)


# finalize ------------------------------------------------------------------------------------


@pytest.mark.parametrize("freeze", [True, False, "all"])
def test_finalize_saved_model_matches_masked_model(tmp_path, pruned_cnn, freeze):
    x = testmodels.batch([8, 8, 3])
    path = graphprune.finalize(pruned_cnn, str(tmp_path / "final"), freeze=freeze)
    loaded = tf.saved_model.load(path)
    np.testing.assert_allclose(loaded(x).numpy(), pruned_cnn(x).numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(loaded.signatures["serving_default"](x=x)["output_0"].numpy(),
                               pruned_cnn(x).numpy(), atol=1e-5, rtol=0)
    graph_def = loaded.signatures["serving_default"].graph.as_graph_def()
    ops = [n.op for f in graph_def.library.function for n in f.node_def] + [n.op for n in graph_def.node]
    assert not MACHINERY_OPS & set(ops)
    names = [n.name for f in graph_def.library.function for n in f.node_def]
    assert not any("/graphprune/mask/" in n or "graphprune/step" in n or "graphprune/update" in n for n in names)
    if freeze == "all":
        assert "ReadVariableOp" not in ops  # no variable at all
    elif freeze:  # the pruned weights are constants; biases stay variables (issue #16)
        names = {v.name.split(":")[0] for v in loaded.original_variables}
        assert names == {"conv2d/bias", "dense/bias"}
    else:
        values = {v.name.split(":")[0]: v.numpy() for v in loaded.original_variables}
        assert np.mean(values["dense/kernel"] == 0) == pytest.approx(0.8, abs=0.01)
        assert not any("graphprune" in name for name in values)


class WideMLP(tf.Module):
    """Weights of 1 MiB and 48 KiB: one above and one below rebuild.LARGE_CONSTANT_BYTES."""

    def __init__(self):
        rng = np.random.RandomState(3)
        self.w1 = tf.Variable(rng.standard_normal([64, 4096]).astype(np.float32), name="wide/kernel")
        self.w2 = tf.Variable(rng.standard_normal([4096, 3]).astype(np.float32) * 0.01, name="out/kernel")

    @tf.function(input_signature=[tf.TensorSpec([None, 64], tf.float32)])
    def __call__(self, x):
        return tf.matmul(tf.nn.relu(tf.matmul(x, self.w1)), self.w2)


def test_frozen_large_weights_are_stored_once_outside_the_function_bodies(tmp_path):
    """Large frozen weights are captured constants: stored once in the SavedModel's graph, fed
    to the functions, never copied into a function body (ResNet50's finalize time depends on it)."""
    from tensorflow.core.protobuf import saved_model_pb2

    x = tf.constant(np.random.RandomState(0).standard_normal([5, 64]).astype(np.float32))
    model = WideMLP()
    pm = graphprune.prune(model, schedule=graphprune.ConstantSparsity(0.7, 0), one_shot=True)
    path = graphprune.finalize(pm, str(tmp_path / "final"))
    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as handle:
        proto.ParseFromString(handle.read())
    meta = proto.meta_graphs[0]

    def large(nodes):
        return [n for n in nodes if n.op == "Const" and len(n.attr["value"].tensor.tensor_content) >= 1 << 16]

    assert not [n.name for f in meta.graph_def.library.function for n in large(f.node_def)]
    stored = large(meta.graph_def.node)
    assert len(stored) == 1 and len(stored[0].attr["value"].tensor.tensor_content) == 64 * 4096 * 4
    np.testing.assert_allclose(tf.make_ndarray(stored[0].attr["value"].tensor), pm.pruned_weights[0].numpy())
    small = [n for f in meta.graph_def.library.function for n in f.node_def if n.op == "Const"
             and len(n.attr["value"].tensor.tensor_content) == 4096 * 3 * 4]
    assert small, "the small weight stays a Const inside the function"
    loaded = tf.saved_model.load(path)
    assert list(loaded.original_variables) == []  # frozen: no variable left
    np.testing.assert_allclose(loaded(x).numpy(), pm(x).numpy(), atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(loaded.signatures["serving_default"](x=x)["output_0"].numpy(), pm(x).numpy(),
                               atol=1e-4, rtol=1e-5)
    tflite = graphprune.export_tflite(path, str(tmp_path / "m.tflite"))
    np.testing.assert_allclose(_litert(tflite, x.numpy()), pm(x).numpy(), atol=1e-4, rtol=1e-5)


def test_finalized_model_loads_without_graphprune(tmp_path, pruned_cnn):
    x = testmodels.batch([8, 8, 3])
    path = graphprune.finalize(pruned_cnn, str(tmp_path / "final"))
    np.save(tmp_path / "x.npy", x.numpy())
    script = (
        "import sys, numpy as np, tensorflow as tf\n"
        "assert 'graphprune' not in sys.modules\n"
        f"m = tf.saved_model.load({path!r})\n"
        f"np.save({str(tmp_path / 'y.npy')!r}, m.signatures['serving_default'](x=np.load({str(tmp_path / 'x.npy')!r}))['output_0'].numpy())\n"
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    subprocess.run([sys.executable, "-c", script], check=True, cwd=str(tmp_path), env=env)
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), pruned_cnn(x).numpy(), atol=1e-5, rtol=0)


def test_finalize_from_saved_prunable_dir(tmp_path, pruned_cnn):
    x = testmodels.batch([8, 8, 3])
    saved = graphprune.save(pruned_cnn, str(tmp_path / "prunable"))
    path = graphprune.finalize(saved, str(tmp_path / "final"), verify=True)
    np.testing.assert_allclose(tf.saved_model.load(path)(x).numpy(), pruned_cnn(x).numpy(), atol=1e-5, rtol=0)
    with pytest.raises(graphprune.OutputExistsError):
        graphprune.finalize(saved, str(tmp_path / "final"))
    with pytest.raises(graphprune.OutputExistsError, match="inside the input"):
        graphprune.finalize(saved, os.path.join(saved, "sub"))


# TFLite --------------------------------------------------------------------------------------


def _litert(path, x):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=path)
    runner = interpreter.get_signature_runner("serving_default")
    outputs = [runner(x=row[np.newaxis]) for row in x]
    return np.concatenate([next(iter(o.values())) for o in outputs])


@pytest.mark.parametrize("quantize, sparse, atol", [(None, False, 1e-5), (None, True, 1e-5), ("dynamic", False, 0.05),
                                                     ("int8", False, 0.15)])
def test_tflite_matches_masked_model(tmp_path, pruned_cnn, quantize, sparse, atol):
    x = testmodels.batch([8, 8, 3]).numpy()
    final = graphprune.finalize(pruned_cnn, str(tmp_path / "final"))
    tflite = graphprune.export_tflite(final, str(tmp_path / "m.tflite"), quantize=quantize, sparse=sparse,
                                      representative_data=testmodels.batch([8, 8, 3], seed=9, n=32).numpy())
    expected = pruned_cnn(x).numpy()
    actual = _litert(tflite, x)
    # quantized: tolerance relative to the output range
    assert np.max(np.abs(actual - expected)) <= atol * max(1.0, np.max(np.abs(expected)))
    report = graphprune.size_report(tflite)
    assert len(report.weights) == 3
    for weight in report.weights:
        assert weight.sparsity == pytest.approx(0.8, abs=0.02), weight
    if sparse:
        assert any(w.encoding == "tflite-sparse" for w in report.weights)


def test_int8_without_representative_data_is_refused(tmp_path, pruned_cnn):
    final = graphprune.finalize(pruned_cnn, str(tmp_path / "final"))
    with pytest.raises(graphprune.GraphPruneError, match="representative_data"):
        graphprune.export_tflite(final, str(tmp_path / "m.tflite"), quantize="int8")


class _EqualKernels(tf.Module):
    """Two layers whose kernels hold equal values (built from one seeded initializer, as keras-hub
    ESM's query and key kernels are), and a third that differs."""

    def __init__(self):
        rng = np.random.RandomState(0)
        same = rng.standard_normal([8, 8]).astype(np.float32)
        self.first = tf.Variable(same, name="first/kernel")
        self.second = tf.Variable(same.copy(), name="second/kernel")
        self.head = tf.Variable(rng.standard_normal([8, 3]).astype(np.float32), name="head/kernel")

    @tf.function(input_signature=[tf.TensorSpec([None, 8], tf.float32)])
    def __call__(self, x):
        return tf.matmul(tf.nn.relu(tf.matmul(x, self.first)) * tf.matmul(x, self.second), self.head)


def test_size_report_counts_frozen_weights_of_equal_values(tmp_path):
    """Frozen weights are recognized across entries by their content, but two weights of one entry
    with equal values are two weights (the report listed one of ESM's query and key kernels)."""
    tf.saved_model.save(_EqualKernels(), str(tmp_path / "model"))
    pm = graphprune.prune(str(tmp_path / "model"), graphprune.ConstantSparsity(0.5, 0), one_shot=True)
    final = graphprune.finalize(pm, str(tmp_path / "final"))  # every weight frozen: a Const per entry
    names = sorted(w.name for w in graphprune.size_report(final).weights)
    assert names == ["first/kernel", "head/kernel", "second/kernel"], names
    assert "total (3 weights)" in graphprune.size_report(final).table()


def test_size_report_saved_models_and_bound(tmp_path, pruned_cnn, cnn):
    final = graphprune.finalize(pruned_cnn, str(tmp_path / "final"))
    prunable = graphprune.save(pruned_cnn, str(tmp_path / "prunable"))
    for path in (final, prunable):
        report = graphprune.size_report(path)
        assert sorted(w.name for w in report.weights)[0].startswith("conv2d")
        assert report.sparsity == pytest.approx(0.8, abs=0.01)
        assert all(w.raw_bytes == w.elements * 4 for w in report.weights)
        assert report.bound_bytes < sum(w.raw_bytes for w in report.weights)
        json.dumps(report.to_dict())
        assert "total (3 weights)" in report.table()


@pytest.mark.parametrize("freeze", [True, False])
def test_pruned_elements_are_positive_zeros_everywhere(tmp_path, cnn, freeze):
    """w * mask leaves -0.0 for pruned negative weights, which compresses worse (its bytes break
    zero runs); storage after an update, after apply_masks and in the finalized model is +0.0."""
    pm = graphprune.prune(cnn, schedule=graphprune.ConstantSparsity(0.7, 0, frequency=1))
    pm.update_masks()
    for weight in pm.pruned_weights:
        values = weight.numpy()
        assert np.mean(values == 0) > 0.6 and not np.any((values == 0) & np.signbit(values))
    path = graphprune.finalize(pm, str(tmp_path / "final"), freeze=freeze)
    report = graphprune.size_report(path)
    assert report.sparsity == pytest.approx(0.7, abs=0.01)
    tflite = graphprune.export_tflite(path, str(tmp_path / "m.tflite"))
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=tflite)
    checked = 0
    for detail in interpreter.get_tensor_details():
        if len(detail["shape"]) < 2:
            continue
        try:
            values = interpreter.get_tensor(detail["index"])
        except ValueError:
            continue
        if values.dtype == np.float32 and np.mean(values == 0) > 0.6:
            assert not np.any((values == 0) & np.signbit(values)), detail["name"]
            checked += 1
    assert checked >= 1  # the pruned kernels (the converter may transpose or split them)


class Drifting(tf.Module):
    """Token ids [batch, length] embedded and projected; ``drift_from``: the outputs from that
    position on move by 1e-2 (a finalized model wrong only past the first tokens, as a removed
    query dim's bias turned by a rotary embedding was); ``positions``: a position table of that
    many rows is added (longer inputs fail in the gather); ``at_most``: the model also asserts
    that the length is at most that."""

    def __init__(self, drift_from=None, positions=64, at_most=None):
        rng = np.random.RandomState(3)
        self.drift_from, self.at_most = drift_from, at_most
        self.table = tf.Variable(rng.standard_normal([4, 8]).astype(np.float32), name="embeddings")
        self.positions = tf.Variable(rng.standard_normal([positions, 8]).astype(np.float32), name="positions")
        self.kernel = tf.Variable(rng.standard_normal([8, 8]).astype(np.float32), name="dense/kernel")

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32)])
    def __call__(self, ids):
        length = tf.shape(ids)[1]
        if self.at_most is not None:
            tf.debugging.assert_less_equal(length, self.at_most)
        hidden = tf.gather(self.table, ids) + tf.gather(self.positions, tf.range(length))
        out = tf.matmul(hidden, self.kernel)
        if self.drift_from is not None:
            out += 1e-2 * tf.cast(tf.range(length) >= self.drift_from, tf.float32)[None, :, None]
        return out


@pytest.mark.parametrize("positions, checked_at", [(64, 16), (12, 8)])
def test_the_shrink_check_runs_longer_inputs_too(positions, checked_at):
    """finalize(shrink=True)'s check ran token models on 2 tokens, where an error that grows with
    the position does not show (a shrunk Qwen2 off by 4.6e-2 of its output scale on 8 tokens
    passed it). With ``longer`` (what shrink=True asks) it runs them again on 16 tokens, or on the
    longest of 8 and 4 that the masked model runs on (a position table of 12 rows refuses 16)."""
    from graphprune.finalization import check_final

    schedule = graphprune.ConstantSparsity(0.5, 0)
    pm = graphprune.prune(Drifting(positions=positions), schedule, structure="channel", one_shot=True)
    values = VariableValues(pm.variables_by_key)
    check_final(pm.traced, pm.traced, values, longer=True)  # the same model passes at every length
    for drift_from in (2, checked_at - 1):
        drifting = graphprune.prune(Drifting(drift_from, positions), schedule, structure="channel", one_shot=True)
        check_final(pm.traced, drifting.traced, values)  # on 2 tokens alone: unseen
        with pytest.raises(graphprune.PassError, match=rf"differs from the masked model by 0\.01 .*output scale .*"
                                                       rf"size {checked_at} in floating-point inputs, {checked_at} in"):
            check_final(pm.traced, drifting.traced, values, longer=True)
    late = graphprune.prune(Drifting(checked_at, positions), schedule, structure="channel", one_shot=True)
    check_final(pm.traced, late.traced, values, longer=True)  # past the longest length checked: unseen
    # a finalized model that refuses the longer inputs the masked one runs on is refused
    short = graphprune.prune(Drifting(positions=positions, at_most=checked_at - 1), schedule, structure="channel", one_shot=True)
    with pytest.raises(graphprune.PassError, match=rf"does not run where the masked model does: '.*' fails on "
                                                   rf"inputs .* size {checked_at} in floating-point"):
        check_final(pm.traced, short.traced, values, longer=True)


class AudioStem(tf.Module):
    """Raw audio [batch, samples, 1] read by a convolution 64 samples wide (Moonshine's stem is 127
    wide, stride 64): inputs of 2 or 32 samples are too short for it. ``at_most``: the model also
    asserts the audio is shorter than that (a model that refuses some lengths)."""

    def __init__(self, at_most=None):
        rng = np.random.RandomState(5)
        self.at_most = at_most
        self.conv = tf.Variable(rng.standard_normal([64, 1, 8]).astype(np.float32), name="conv/kernel")
        self.out = tf.Variable(rng.standard_normal([8, 3]).astype(np.float32), name="out/kernel")

    @tf.function(input_signature=[tf.TensorSpec([None, None, 1], tf.float32)])
    def __call__(self, audio):
        if self.at_most is not None:
            tf.debugging.assert_less(tf.shape(audio)[1], self.at_most)
        features = tf.nn.relu(tf.nn.conv1d(audio, self.conv, stride=16, padding="VALID"))
        return tf.matmul(tf.reduce_mean(features, 1), self.out)


def test_finalize_checks_models_that_need_long_inputs(tmp_path, recwarn):
    """finalize's check ran every model on inputs whose unknown dimensions were 2, and a model that
    needs longer ones died with TensorFlow's traceback (keras-hub Moonshine). The check now tries
    longer inputs until the masked model runs, runs the finalized one on the same, and refuses,
    in one line, a finalized model that fails where the masked one ran."""
    from graphprune.finalization import check_final

    pm = graphprune.prune(AudioStem(), graphprune.ConstantSparsity(0.5, 0), structure="channel", one_shot=True)
    path = graphprune.finalize(pm, str(tmp_path / "final"), shrink=True)
    assert not [w for w in recwarn if "not checked" in str(w.message)]
    audio = tf.constant(np.random.RandomState(0).standard_normal([2, 1000, 1]).astype(np.float32))
    shrunk = tf.saved_model.load(path)
    assert graphprune.cost(path).parameters == 4 * (64 + 3)  # half the channels went
    np.testing.assert_allclose(shrunk(audio).numpy(), pm(audio).numpy(), atol=1e-5, rtol=0)
    # a "finalized" model that refuses the length the masked one ran on (512) is refused
    short = graphprune.prune(AudioStem(at_most=100), graphprune.ConstantSparsity(0.5, 0), structure="channel",
                             one_shot=True)
    values = VariableValues(pm.variables_by_key)
    with pytest.raises(graphprune.PassError, match=r"does not run where the masked model does: .*size 512"):
        check_final(pm.traced, short.traced, values)
    # a model that runs on no input graphprune makes is finalized with a warning that it is not checked
    with pytest.warns(UserWarning, match=r"not checked against the masked model \(cannot run .*4096 tried"):
        graphprune.finalize(short, str(tmp_path / "short"), shrink=True)


def test_finalize_check_stops_where_the_inputs_values_are_wrong(tmp_path, recwarn):
    """finalize's check tried every size up to 4,096 on a model whose gathers refuse the indices
    its random inputs make, at any size: keras-hub SAM 3 (boxes off the image) took over 12 GB at
    512 boxes (and 2 tokens) and its process was killed. Two index refusals now end the search, and
    the warning says what TensorFlow said, not only "Graph execution error:"."""
    module = testmodels.BoxesOffTheImage()
    pm = graphprune.prune(module, graphprune.ConstantSparsity(0.5, 0), one_shot=True)
    path = graphprune.finalize(pm, str(tmp_path / "final"))
    warned = [str(w.message) for w in recwarn if "not checked" in str(w.message)]
    assert len(warned) == 1, warned
    assert "(unknown dimensions of size 2, 32 tried)" in warned[0]  # not 512 or 4096
    assert "Graph execution error: indices" in warned[0] and "is not in [0, 8)" in warned[0]
    # the finalized model computes the masked one on boxes on the image
    x = tf.constant(np.random.RandomState(0).standard_normal([2, 4]).astype(np.float32))
    boxes = tf.constant(np.random.RandomState(1).uniform(0, 1, [2, 3]).astype(np.float32))
    np.testing.assert_allclose(tf.saved_model.load(path)(x, boxes).numpy(), pm(x, boxes).numpy(), atol=1e-5, rtol=0)
    # what counts as an index refusal
    from graphprune.verify import _bad_index

    with pytest.raises(tf.errors.InvalidArgumentError) as raised:
        tf.gather(tf.zeros([3]), [5])
    assert _bad_index(raised.value)
    assert not _bad_index(tf.errors.InvalidArgumentError(None, None, "Incompatible shapes: [2,3] vs. [2,2,3,3]"))


def test_finalize_checks_on_the_inputs_given(tmp_path, recwarn):
    """finalize's check makes random normal inputs, which some models cannot run on (keras-hub
    SAM 3's boxes must lie on the image): such a model was written unchecked, with a warning.
    check_inputs= gives the check the user's own inputs, in each form a call takes; inputs that
    fit no entry, or that the masked model fails on, are refused in one line, nothing written."""
    from graphprune.finalization import check_final
    from graphprune.verify import given_inputs

    module = testmodels.BoxesOffTheImage()
    pm = graphprune.prune(module, graphprune.ConstantSparsity(0.5, 0), one_shot=True)
    rng = np.random.RandomState(3)
    x = rng.standard_normal([3, 4])  # float64, any batch: cast for the check, never changed
    boxes = rng.uniform(0, 1, [3, 5]).astype(np.float32)
    kept = (x.copy(), boxes.copy())
    for number, given in enumerate([{"x": x, "boxes": boxes}, (x, boxes), {"__call__": (x, boxes)}]):
        path = graphprune.finalize(pm, str(tmp_path / f"final{number}"), check_inputs=given)
        inputs = (tf.constant(x, tf.float32), tf.constant(boxes))
        np.testing.assert_allclose(tf.saved_model.load(path)(*inputs).numpy(), pm(*inputs).numpy(), atol=1e-5, rtol=0)
    assert not [w for w in recwarn if "not checked" in str(w.message)]
    assert x.dtype == np.float64 and np.array_equal(x, kept[0]) and np.array_equal(boxes, kept[1])
    # the check runs on them: a model that reads the table otherwise differs there, and is refused
    other = graphprune.prune(testmodels.BoxesOffTheImage(cells=4.0), graphprune.ConstantSparsity(0.5, 0),
                             one_shot=True)
    values = VariableValues(pm.variables_by_key)
    given = given_inputs(pm.traced, (x, boxes))
    assert sorted(given) == ["method:__call__"] and [a.dtype for a in given["method:__call__"]] == [np.float32] * 2
    with pytest.raises(graphprune.PassError, match=r"differs from the masked model by .* on the check_inputs given"):
        check_final(pm.traced, other.traced, values, given=given)
    # refused, in one line, nothing written
    refusals = [({"x": x}, r"do not fit any entry .*no value for input 'boxes'"),
                ({"x": x[:, :3], "boxes": boxes}, r"input 'x' takes shape \[None, 4\], given \[3, 3\]"),
                ({"x": x, "boxes": boxes.astype(str)}, r"input 'boxes' takes float32, given <U"),
                ({"__call__": (x, boxes), "serve": (x,)}, r"serve is not an entry of the model"),
                ({"x": x, "boxes": boxes, "box": boxes}, r"it has no parameter 'box'; it takes \(x, boxes\)"),
                ({"x": x, "boxes": boxes + 1.0},
                 r"'method:__call__' fails on the check_inputs given: .*is not in \[0, 8\)"),
                ({"x": np.full_like(x, np.nan), "boxes": boxes},
                 r"'method:__call__' computes NaN or infinity everywhere on the check_inputs given"),
                ({"x": x[:0], "boxes": boxes[:0]}, r"'method:__call__' computes only empty outputs on the check_inputs")]
    for number, (given, message) in enumerate(refusals):
        stages = []
        with pytest.raises(graphprune.errors.DataError, match=message) as raised:
            graphprune.finalize(pm, str(tmp_path / f"refused{number}"), check_inputs=given, progress=stages.append)
        assert "\n" not in str(raised.value)
        assert not (tmp_path / f"refused{number}").exists()
        if number < 5:  # inputs that fit no entry: refused before any work
            assert not stages, stages
    with pytest.raises(graphprune.GraphPruneError, match=r"check_inputs are the inputs finalize's check \(and verify"):
        graphprune.finalize(pm, str(tmp_path / "unchecked"), check=False, check_inputs=(x, boxes))
    assert not (tmp_path / "unchecked").exists()
    # verify=True (each pass checked) runs on them too: on the inputs graphprune makes it cannot run
    with pytest.raises(graphprune.PassError, match=r"cannot run 'method:__call__' on the inputs graphprune makes"):
        graphprune.finalize(pm, str(tmp_path / "verify_made"), verify=True)
    for check in (True, False):
        path = graphprune.finalize(pm, str(tmp_path / f"verified{check}"), verify=True, check=check,
                                   check_inputs=(x, boxes))
        np.testing.assert_allclose(tf.saved_model.load(path)(*inputs).numpy(), pm(*inputs).numpy(), atol=1e-5, rtol=0)


class UnnamedVariables(tf.Module):
    """Two layers whose variables have no names (tf.Variable(...)): graphprune keys them by
    attribute path ('hidden', 'out', 'bias')."""

    def __init__(self):
        rng = np.random.RandomState(8)
        self.hidden = tf.Variable(rng.standard_normal([6, 16]).astype(np.float32))
        self.bias = tf.Variable(rng.standard_normal([16]).astype(np.float32))
        self.out = tf.Variable(rng.standard_normal([16, 3]).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec([None, 6], tf.float32)])
    def __call__(self, x):
        return tf.matmul(tf.nn.relu(tf.matmul(x, self.hidden) + self.bias), self.out)


@pytest.mark.parametrize("structure", ["element", "channel"])
def test_finalize_a_saved_module_whose_variables_have_no_names(tmp_path, structure):
    """Saved by graphprune, a tf.Module's unnamed variables are found at 'original_variables/0',
    not at the attribute paths their masks were keyed by ('hidden/graphprune/mask'), and finalize
    from the directory died with "internal error: KeyError: 'kernel'". Each weight now takes the
    key of the mask that multiplies it in the graph."""
    pm = graphprune.prune(UnnamedVariables(), graphprune.ConstantSparsity(0.5, 0), structure=structure,
                          one_shot=True)
    saved = graphprune.save(pm, str(tmp_path / "prunable"))
    loaded = graphprune.load.load(saved)
    masks = {key: spec.weight for key, spec in loaded.model.variables.items() if spec.weight}
    assert masks == {"hidden/graphprune/mask": "hidden", "out/graphprune/mask": "out"}
    assert set(masks.values()) <= set(loaded.model.variables)
    path = graphprune.finalize(saved, str(tmp_path / "final"), shrink=structure == "channel")
    x = tf.constant(np.random.RandomState(0).standard_normal([4, 6]).astype(np.float32))
    np.testing.assert_allclose(tf.saved_model.load(path)(x).numpy(), pm(x).numpy(), atol=1e-5, rtol=0)
    if structure == "channel":  # half the 16 neurons went
        assert graphprune.cost(path).parameters == 6 * 8 + 8 + 8 * 3


class BoxesAndProjection(testmodels.BoxesOffTheImage):
    """BoxesOffTheImage, plus a method any input runs."""

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
    def project(self, x):
        return tf.matmul(x, self.kernel) * self.cells


def test_finalize_checks_the_entries_it_can_run(tmp_path):
    """One entry that runs on no input graphprune makes left the whole model unchecked. The
    entries that run are checked now (a finalized model that differs there is refused), and the
    warning names the one that was not."""
    from graphprune.finalization import check_final

    pm = graphprune.prune(BoxesAndProjection(), graphprune.ConstantSparsity(0.5, 0), one_shot=True)
    with pytest.warns(UserWarning, match=r"not checked against the masked model \(cannot run 'method:__call__' "
                                         r".*\); method:project checked; give it inputs with check_inputs="):
        path = graphprune.finalize(pm, str(tmp_path / "final"))
    x = tf.constant(np.random.RandomState(0).standard_normal([2, 4]).astype(np.float32))
    np.testing.assert_allclose(tf.saved_model.load(path).project(x).numpy(), pm.project(x).numpy(), atol=1e-5, rtol=0)
    other = graphprune.prune(BoxesAndProjection(cells=4.0), graphprune.ConstantSparsity(0.5, 0), one_shot=True)
    with pytest.warns(UserWarning, match="not checked"):
        with pytest.raises(graphprune.PassError, match=r"differs from the masked model by .*'method:project'"):
            check_final(pm.traced, other.traced, VariableValues(pm.variables_by_key))


class TrainingFlag(tf.Module):
    """A method traced three times: training False and True, and a longer input."""

    def __init__(self):
        self.kernel = tf.Variable(np.random.RandomState(9).standard_normal([3, 4]).astype(np.float32))

    @tf.function
    def __call__(self, x, training=False):
        y = tf.matmul(x, self.kernel)
        return y * 2.0 if training else y


def test_check_inputs_go_to_the_traces_they_fit():
    """check_inputs fit a polymorphic method's traces by shape and by the Python values they were
    traced with; an omitted argument takes the callable's default (training=False), so only its
    trace gets the inputs."""
    from graphprune.verify import given_inputs

    module = TrainingFlag()
    x, long = np.ones([2, 3], np.float32), np.ones([2, 5, 3], np.float32)
    module(x)
    module(x, training=True)
    module(long)
    pm = graphprune.prune(module, graphprune.ConstantSparsity(0.5, 0), one_shot=True)
    fits = {"x alone": (x, ["method:__call__"]), "as a tuple": ((x,), ["method:__call__"]),
            "by name": ({"x": x}, ["method:__call__"]), "training": ((x, True), ["method:__call__#1"]),
            "training by name": ({"x": x, "training": True}, ["method:__call__#1"]),
            "longer": (long.astype(np.float64), ["method:__call__#2"]),
            "by entry": ({"__call__": (x, False)}, ["method:__call__"])}
    for what, (given, labels) in fits.items():
        assert sorted(given_inputs(pm.traced, given)) == labels, what
    with pytest.raises(graphprune.errors.DataError, match=r"__call__#1: was traced with True, given False"):
        given_inputs(pm.traced, {"x": np.ones([2, 4]), "training": False})


class FixedPositions(tf.Module):
    """Token ids of unknown length plus a learned position table of 8 rows added whole (keras-hub
    SigLIP's text tower adds its table so): the model runs on exactly 8 tokens."""

    def __init__(self):
        rng = np.random.RandomState(6)
        self.tokens = tf.Variable(rng.standard_normal([50, 4]).astype(np.float32), name="tokens/embeddings")
        self.positions = tf.Variable(rng.standard_normal([8, 4]).astype(np.float32), name="positions/embeddings")
        self.hidden = tf.Variable(rng.standard_normal([4, 6]).astype(np.float32), name="hidden/kernel")
        self.out = tf.Variable(rng.standard_normal([6, 3]).astype(np.float32), name="out/kernel")

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32)])
    def __call__(self, ids):
        x = tf.gather(self.tokens, ids) + self.positions
        return tf.matmul(tf.reduce_mean(tf.nn.relu(tf.matmul(x, self.hidden)), 1), self.out)


def test_finalize_checks_models_that_need_the_length_of_their_tables(tmp_path, recwarn):
    """None of the lengths finalize's check tries (2 to 4096) runs a model that adds a whole
    8-row position table, so it was finalized unchecked, with a warning (keras-hub SigLIP with its
    text tower). The check now also tries the lengths the model's own 2-D weights have."""
    pm = graphprune.prune(FixedPositions(), graphprune.ConstantSparsity(0.5, 0), structure="channel", one_shot=True)
    path = graphprune.finalize(pm, str(tmp_path / "final"), shrink=True)
    assert not [w for w in recwarn if "not checked" in str(w.message)]
    ids = tf.constant(np.random.RandomState(0).randint(0, 50, [3, 8]), tf.int32)
    np.testing.assert_allclose(tf.saved_model.load(path)(ids).numpy(), pm(ids).numpy(), atol=1e-5, rtol=0)
    assert graphprune.cost(path).parameters < graphprune.cost(pm).parameters  # hidden neurons went


class RaggedWords(tf.Module):
    """Word ids in a ragged batch (a tf.function over a RaggedTensorSpec: its values and row splits
    are two plain inputs of the SavedModel's signature), embedded and averaged per row."""

    def __init__(self, total: bool = False):
        self.total = total  # another model on the same variables: sums the words instead
        rng = np.random.RandomState(3)
        self.embeddings = tf.Variable(rng.standard_normal([10, 8]).astype(np.float32))
        self.kernel = tf.Variable(rng.standard_normal([8, 16]).astype(np.float32), name="hidden/kernel")
        self.head = tf.Variable(rng.standard_normal([16, 3]).astype(np.float32), name="head/kernel")

    @tf.function(input_signature=[tf.RaggedTensorSpec([None, None], tf.int64)])
    def __call__(self, ids):
        words = tf.gather(self.embeddings, ids)
        pooled = tf.reduce_sum(words, 1) if self.total else tf.reduce_mean(words, 1)
        return tf.nn.relu(pooled @ self.kernel) @ self.head


def test_finalize_checks_ragged_inputs(tmp_path, recwarn):
    """Random components of a ragged input are no ragged tensor (the check could not run and
    said so); the check makes valid ones, for the method and, through the alias, for the
    signature that takes them as plain inputs. check_inputs take a tf.RaggedTensor."""
    tf.saved_model.save(RaggedWords(), str(tmp_path / "model"))
    ids = tf.ragged.constant([[1, 2, 3], [4], [5, 6, 9, 0]], tf.int64)
    for number, source in enumerate([RaggedWords(), str(tmp_path / "model")]):
        for structure in ("element", "channel"):
            pm = graphprune.prune(source, graphprune.ConstantSparsity(0.5, 0), one_shot=True, structure=structure)
            path = graphprune.finalize(pm, str(tmp_path / f"final{number}{structure}"), shrink=structure == "channel")
            np.testing.assert_allclose(tf.saved_model.load(path)(ids).numpy(), pm(ids).numpy(), atol=1e-5, rtol=0)
    assert not [w for w in recwarn if "not checked" in str(w.message)], [str(w.message) for w in recwarn]
    # the check compares: a model that sums the words is refused, on made inputs and on given ones
    pm = graphprune.prune(str(tmp_path / "model"), graphprune.ConstantSparsity(0.5, 0), one_shot=True)
    tf.saved_model.save(RaggedWords(total=True), str(tmp_path / "other"))
    other = graphprune.prune(str(tmp_path / "other"), graphprune.ConstantSparsity(0.5, 0), one_shot=True)
    _refused_on_made_and_given_inputs(pm, other, ids)
    path = graphprune.finalize(pm, str(tmp_path / "given"), check_inputs=ids)
    np.testing.assert_allclose(tf.saved_model.load(path)(ids).numpy(), pm(ids).numpy(), atol=1e-5, rtol=0)
    with pytest.raises(graphprune.errors.DataError, match=r"takes a RaggedTensorSpec, which check_inputs cannot give "
                                                          r"\(give a tf.RaggedTensor\)"):
        graphprune.finalize(pm, str(tmp_path / "refused"), check_inputs={"__call__": ids.to_tensor().numpy()})


class SparseFeatures(tf.Module):
    """Sparse features (a tf.function over a SparseTensorSpec: indices, values and dense shape),
    made dense, then two dense layers."""

    def __init__(self, scale: float = 1.0):
        self.scale = scale  # another model on the same variables: scales the features
        rng = np.random.RandomState(4)
        self.kernel = tf.Variable(rng.standard_normal([10, 16]).astype(np.float32), name="hidden/kernel")
        self.head = tf.Variable(rng.standard_normal([16, 3]).astype(np.float32), name="head/kernel")

    @tf.function(input_signature=[tf.SparseTensorSpec([None, 10], tf.float32)])
    def __call__(self, features):
        return tf.nn.relu(tf.sparse.to_dense(features) * self.scale @ self.kernel) @ self.head


def test_finalize_checks_sparse_inputs(tmp_path, recwarn):
    """As ragged inputs: random indices are no sparse tensor's (unsorted, outside the shape), so
    the check could not run; it makes valid ones, and check_inputs take a tf.SparseTensor."""
    tf.saved_model.save(SparseFeatures(), str(tmp_path / "model"))
    features = tf.sparse.from_dense(np.where(np.arange(30).reshape(3, 10) % 4 == 0, 1.5, 0.0).astype(np.float32))
    pm = graphprune.prune(str(tmp_path / "model"), graphprune.ConstantSparsity(0.5, 0), one_shot=True,
                          structure="channel")
    path = graphprune.finalize(pm, str(tmp_path / "final"), shrink=True)
    np.testing.assert_allclose(tf.saved_model.load(path)(features).numpy(), pm(features).numpy(), atol=1e-5, rtol=0)
    assert not [w for w in recwarn if "not checked" in str(w.message)], [str(w.message) for w in recwarn]
    tf.saved_model.save(SparseFeatures(scale=2.0), str(tmp_path / "other"))
    other = graphprune.prune(str(tmp_path / "other"), graphprune.ConstantSparsity(0.5, 0), one_shot=True,
                             structure="channel")
    _refused_on_made_and_given_inputs(pm, other, features)
    with pytest.raises(graphprune.errors.DataError, match=r"\(give a tf.SparseTensor\)"):
        graphprune.finalize(pm, str(tmp_path / "refused"), check_inputs={"__call__": tf.sparse.to_dense(features)})


def _refused_on_made_and_given_inputs(pm, other, inputs) -> None:
    """finalize's check refuses ``other`` (a model computing something else on pm's variables) on
    the inputs it makes and on ``inputs`` given as check_inputs (to the method and, through the
    alias, to the signature)."""
    from graphprune.finalization import check_final
    from graphprune.verify import given_inputs

    values = VariableValues(pm.variables_by_key)
    with pytest.raises(graphprune.PassError, match=r"differs from the masked model"):
        check_final(pm.traced, other.traced, values)
    given = given_inputs(pm.traced, inputs)
    assert sorted(given) == ["method:__call__", "signature:serving_default"], sorted(given)
    with pytest.raises(graphprune.PassError, match=r"differs from the masked model by .* on the check_inputs given"):
        check_final(pm.traced, other.traced, values, given=given)


def test_a_shrink_that_removes_nothing_says_why(tmp_path, mlp):
    """shrink=True after pruning element by element removes no channel (none has all its kernels'
    slices zero): the model is written as it is, and a warning says how to remove channels. After
    channel pruning it says nothing."""
    x = np.random.RandomState(0).standard_normal([4, 8]).astype(np.float32)
    pm = graphprune.prune(mlp, graphprune.ConstantSparsity(0.25, 0), one_shot=True)
    assert np.count_nonzero(pm.variables_by_key["dense_1/kernel"].numpy(), axis=1).all()  # every neuron still read
    with pytest.warns(UserWarning, match=r"shrink removed no channel.*structure='channel'"):
        out = graphprune.finalize(pm, str(tmp_path / "element"), shrink=True)
    np.testing.assert_allclose(tf.saved_model.load(out)(x).numpy(), pm(x).numpy(), atol=1e-6)
    assert graphprune.cost(out).parameters == graphprune.cost(mlp).parameters
    pm = graphprune.prune(mlp, graphprune.ConstantSparsity(0.25, 0), one_shot=True, structure="channel")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graphprune.finalize(pm, str(tmp_path / "channel"), shrink=True)
    assert not [w for w in caught if "shrink removed" in str(w.message)]
