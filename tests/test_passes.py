"""Every pass: numeric equivalence, structure, no-match and idempotence (STYLE.md, point 7)."""

import numpy as np
import pytest
import tensorflow as tf

import graphprune
import testmodels
from graphprune import graph as g
from graphprune.load import load
from graphprune.pipeline import PassContext, VariableValues, parse_pipeline, run_pipeline, validate
from graphprune.passes.find_weights import find_weights
from graphprune.passes.insert_mask_updates import insert_mask_updates
from graphprune.passes.insert_masks import insert_masks
from graphprune.verify import run_entries


def _traced(module):
    loaded = load(module)
    return loaded, PassContext(values=VariableValues(loaded.variables))


def _ops(model):
    counts = {}
    for entry in model.entries:
        for op, n in g.op_counts(entry.graph_def).items():
            counts[op] = counts.get(op, 0) + n
    return counts


def _assert_same_outputs(before, after, variables):
    expected, actual = run_entries(before, variables), run_entries(after, variables)
    assert expected.keys() == actual.keys()
    for name in expected:
        for want, got in zip(expected[name], actual[name]):
            np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


# find_weights --------------------------------------------------------------------------------


def test_find_weights_numeric_graphs_untouched(cnn):
    loaded, context = _traced(cnn)
    result = find_weights(loaded.model, context)
    assert result.changed is False
    assert [e.graph_def for e in result.model.entries] == [e.graph_def for e in loaded.model.entries]
    _assert_same_outputs(loaded.model, result.model, loaded.variables)


def test_find_weights_structure_records_ops_axes_and_uses(cnn):
    loaded, context = _traced(cnn)
    weights = {w.key: w for w in find_weights(loaded.model, context).model.facts["weights"]}
    assert set(weights) == {"conv2d/kernel", "depthwise_conv2d/depthwise_kernel", "dense/kernel"}
    assert weights["conv2d/kernel"].ops == ("Conv2D",) and weights["conv2d/kernel"].input_axis == 2
    assert weights["dense/kernel"].input_axis == 0
    assert weights["depthwise_conv2d/depthwise_kernel"].input_axis is None
    assert all(w.mask is None for w in weights.values())


def test_find_weights_transposed_matmul_and_einsum_axes():
    weight = tf.Variable(tf.ones([4, 6]), name="proj")
    einsum_weight = tf.Variable(tf.ones([6, 3]), name="einsum_w")

    @tf.function(input_signature=[tf.TensorSpec([2, 6], tf.float32)])
    def f(x):
        y = tf.matmul(x, weight, transpose_b=True)  # [2, 4]; weight reduced along axis 1
        return tf.einsum("bi,ij->bj", tf.matmul(y, weight), einsum_weight)

    loaded, context = _traced(f)
    weights = {w.key: w for w in find_weights(loaded.model, context).model.facts["weights"]}
    assert weights["proj"].input_axis == 1  # first use decides: transpose_b
    assert len(weights["proj"].uses) == 2
    assert weights["einsum_w"].ops == ("Einsum",) and weights["einsum_w"].input_axis == 0


def test_find_weights_no_match():
    loaded, context = _traced(testmodels.NoPrunable())
    result = find_weights(loaded.model, context)
    assert result.model.facts["weights"] == () and result.changed is False


def test_find_weights_idempotent(mlp):
    loaded, context = _traced(mlp)
    once = find_weights(loaded.model, context)
    twice = find_weights(once.model, context)
    assert twice.model.facts["weights"] == once.model.facts["weights"] and twice.changed is False


# insert_masks --------------------------------------------------------------------------------


def test_insert_masks_numeric_equivalence_with_ones(cnn):
    loaded, context = _traced(cnn)
    result = insert_masks(loaded.model, context)
    validate(result.model)
    _assert_same_outputs(loaded.model, result.model, loaded.variables)


def test_insert_masks_structure(cnn):
    loaded, context = _traced(cnn)
    model = insert_masks(loaded.model, context).model
    # __call__ uses all three weights; the nested `features` tf.function (an entry of its own,
    # having one trace) uses the conv and depthwise kernels.
    assert [e.name for e in model.entries] == ["__call__", "features"]
    for entry_name, uses in (("__call__", 3), ("features", 2)):
        before = g.op_counts(loaded.model.entry(entry_name).graph_def)
        after = g.op_counts(model.entry(entry_name).graph_def)
        assert after["Mul"] - before.get("Mul", 0) == uses
        assert after["ReadVariableOp"] - before["ReadVariableOp"] == uses
    masks = [s for s in model.variables.values() if s.role == g.ROLE_MASK]
    assert sorted(s.key for s in masks) == [
        "conv2d/kernel/graphprune/mask",
        "dense/kernel/graphprune/mask",
        "depthwise_conv2d/depthwise_kernel/graphprune/mask",
    ]
    entry = model.entries[0]
    index = g.NodeIndex(entry.graph_def)
    conv = next(n for n in entry.graph_def.node if n.op == "Conv2D")
    assert index.producer(conv.input[1]).name == "conv2d/kernel/graphprune/masked"
    assert all(np.all(s.initial == 1) for s in masks)


def test_insert_masks_shares_one_mask_across_uses():
    weight = tf.Variable(tf.random.normal([4, 4], seed=1), name="tied")

    @tf.function(input_signature=[tf.TensorSpec([2, 4], tf.float32)])
    def f(x):
        return tf.matmul(tf.matmul(x, weight), weight, transpose_b=True)

    loaded, context = _traced(f)
    model = insert_masks(loaded.model, context).model
    assert [s.key for s in model.variables.values() if s.role == g.ROLE_MASK] == ["tied/graphprune/mask"]
    _assert_same_outputs(loaded.model, model, loaded.variables)


def test_insert_masks_one_shot_sparsity(mlp):
    loaded, context = _traced(mlp)
    model = insert_masks(loaded.model, context, sparsity=0.75).model
    for spec in model.variables.values():
        if spec.role == g.ROLE_MASK:
            assert np.mean(spec.initial == 0) == pytest.approx(0.75)


def test_insert_masks_no_match():
    loaded, context = _traced(testmodels.NoPrunable())
    result = insert_masks(loaded.model, context)
    assert result.changed is False and result.model.entries == loaded.model.entries


def test_insert_masks_idempotent(mlp):
    loaded, context = _traced(mlp)
    once = insert_masks(loaded.model, context)
    twice = insert_masks(once.model, context)
    assert twice.changed is False
    assert [e.graph_def for e in twice.model.entries] == [e.graph_def for e in once.model.entries]


def test_insert_masks_on_reloaded_prunable_model_is_a_no_op(tmp_path, mlp):
    pm = graphprune.prune(mlp, schedule=graphprune.ConstantSparsity(0.5, 0))
    graphprune.save(pm, str(tmp_path / "pm"))
    loaded, context = _traced(str(tmp_path / "pm"))
    weights = find_weights(loaded.model, context).model.facts["weights"]
    assert {w.key: w.mask for w in weights} == {
        "dense/kernel": "dense/kernel/graphprune/mask",
        "dense_1/kernel": "dense_1/kernel/graphprune/mask",
    }
    assert insert_masks(loaded.model, context).changed is False


def test_insert_masks_exclude_rule(cnn):
    loaded, context = _traced(cnn)
    result = insert_masks(loaded.model, context, exclude="Depthwise")
    assert result.report["masked"] == ["conv2d/kernel", "dense/kernel"]
    assert "depthwise_conv2d/depthwise_kernel" in result.report["skipped"]


# insert_mask_updates -------------------------------------------------------------------------


def _with_updates(module, **schedule):
    loaded, context = _traced(module)
    masked = insert_masks(loaded.model, context).model
    config = graphprune.PruningConfig(graphprune.ConstantSparsity(0.5, 0, frequency=1))
    return loaded, context, masked, insert_mask_updates(masked, context, config=config), config


def test_insert_mask_updates_numeric_forward_unchanged(mlp):
    loaded, _, masked, result, _ = _with_updates(mlp)
    _assert_same_outputs(masked, result.model, loaded.variables)


def test_insert_mask_updates_structure(mlp):
    _, _, masked, result, _ = _with_updates(mlp)
    entry = result.model.entry("update_masks")
    assert entry.kind == "update" and entry.inputs == ()
    ops = g.op_counts(entry.graph_def)
    # one threshold search per weight: a histogram of the high and of the low 16 bits
    assert ops["If"] == 1 and ops["Bincount"] == 4 and ops["StatelessWhile"] == 0
    roles = sorted(s.role for s in result.model.variables.values() if s.initial is not None)
    assert roles == ["mask", "mask", "step", "threshold", "threshold"]
    assert result.model.variables["graphprune/step"].initial == 0  # first update: step 1


def test_insert_mask_updates_no_match_refused():
    loaded, context = _traced(testmodels.NoPrunable())
    config = graphprune.PruningConfig(graphprune.ConstantSparsity(0.5, 0))
    with pytest.raises(graphprune.PassError, match="insert_masks first"):
        insert_mask_updates(loaded.model, context, config=config)


def test_insert_mask_updates_idempotent(mlp):
    _, context, _, result, config = _with_updates(mlp)
    again = insert_mask_updates(result.model, context, config=config)
    assert again.changed is False and again.model is result.model


# pipeline ------------------------------------------------------------------------------------


def test_pipeline_text_parses_and_runs(mlp):
    loaded, context = _traced(mlp)
    steps = parse_pipeline("find_weights insert_masks(sparsity=0.5, block_size=1x2)")
    assert steps == [("find_weights", {}), ("insert_masks", {"sparsity": 0.5, "block_size": "1x2"})]
    result = run_pipeline(loaded.model, steps, context)
    assert [name for name, _, _ in result.reports] == ["find_weights", "insert_masks"]
    assert "Mul +2" in result.summary()


def test_pipeline_names_unknown_pass_and_registry():
    with pytest.raises(graphprune.PassError, match="registered passes: .*find_weights"):
        parse_pipeline("find_weights frobnicate")


def test_pipeline_names_the_pass_that_broke_the_graph(mlp):
    loaded, context = _traced(mlp)

    def break_graph(model, context):
        import dataclasses

        entry = model.entries[0]
        broken = g.copy_graph(entry.graph_def)
        broken.node[-1].input.append("does_not_exist")
        from graphprune.pipeline import PassResult

        return PassResult(dataclasses.replace(model, entries=(dataclasses.replace(entry, graph_def=broken),)), True)

    with pytest.raises(graphprune.PassError, match=r"pass 'break_graph' \(after find_weights\).*does_not_exist"):
        run_pipeline(loaded.model, [("find_weights", {}), (break_graph, {})], context)


def _break_entry(entry_name, breakage):
    def break_graph(model, context):
        import dataclasses

        from graphprune.pipeline import PassResult

        entries = []
        for entry in model.entries:
            if entry.name == entry_name and (entry.alias is not None) == (breakage == "dangling"):
                graph_def = g.copy_graph(entry.graph_def)
                node = next(n for n in graph_def.node if n.op == "MatMul")
                if breakage == "dangling":
                    node.input.append("does_not_exist")
                else:
                    node.attr["T"].type = tf.int32.as_datatype_enum
                entry = dataclasses.replace(entry, graph_def=graph_def)
            entries.append(entry)
        return PassResult(dataclasses.replace(model, entries=tuple(entries)), True)

    return break_graph


def test_validation_imports_method_graphs_and_checks_aliasing_signatures_structurally(keras_saved_model):
    loaded = load(keras_saved_model)
    context = PassContext(values=VariableValues(loaded.variables))
    aliases = [e.name for e in loaded.model.entries if e.alias is not None]
    methods = [e.name for e in loaded.model.entries if e.kind == "method"]
    assert aliases and methods, [(e.name, e.kind, e.alias) for e in loaded.model.entries]
    # A type error only TensorFlow's importer sees, in the method every signature calls:
    with pytest.raises(graphprune.PassError, match=r"pass 'break_graph'.*entry 'serve'"):
        run_pipeline(loaded.model, [(_break_entry(methods[0], "type"), {})], context)
    # An aliasing signature is rebuilt as a call of that method, but its graph still gets the
    # structural checks:
    with pytest.raises(graphprune.PassError, match="does_not_exist"):
        run_pipeline(loaded.model, [(_break_entry(aliases[0], "dangling"), {})], context)
