"""What the pipeline checks after every pass (issue #14): cycles, stale and mistyped facts, and
options read against each pass's declaration."""

import dataclasses

import pytest

import graphprune
from graphprune import graph as g
from graphprune.load import load
from graphprune.pipeline import PassContext, PassResult, VariableValues, describe_registry, parse_pipeline, \
    run_pipeline, specs


def _traced(module):
    loaded = load(module)
    return loaded, PassContext(values=VariableValues(loaded.variables))


def test_a_pass_that_wires_a_cycle_is_named(mlp):
    loaded, context = _traced(mlp)

    def make_cycle(model, context):
        entry = model.entries[0]
        graph_def = g.copy_graph(entry.graph_def)
        matmul = next(n for n in graph_def.node if n.op == "MatMul")
        consumer = next(n for n in graph_def.node if matmul.name in [i.split(":")[0] for i in n.input])
        matmul.input.append("^" + consumer.name)  # the MatMul now waits for its own reader
        return PassResult(dataclasses.replace(model, entries=(dataclasses.replace(entry, graph_def=graph_def),)
                                              + model.entries[1:]), True)

    with pytest.raises(graphprune.PassError, match=r"pass 'make_cycle' \(after find_weights\).*has a cycle"):
        run_pipeline(loaded.model, [("find_weights", {}), (make_cycle, {})], context)


def test_facts_a_pass_makes_stale_are_dropped(mlp):
    loaded, context = _traced(mlp)
    masked = run_pipeline(loaded.model, "find_weights insert_masks", context).model
    assert all(w.mask for w in masked.facts["weights"])  # insert_masks updated the fact
    folded = run_pipeline(masked, "fold_masks", context).model
    assert "weights" not in folded.facts  # the weights are constants now: the fact is gone
    assert "fold_masks" in [name for name, spec in specs().items() if "weights" in spec.invalidates]


def test_a_fact_of_the_wrong_type_is_a_bug_in_the_pass(mlp):
    loaded, context = _traced(mlp)

    def bad_fact(model, context):
        return PassResult(model.with_facts(weights=["not", "a", "tuple"]), False)

    with pytest.raises(graphprune.PassError, match="pass 'bad_fact' recorded fact 'weights' as list"):
        run_pipeline(loaded.model, [(bad_fact, {})], context)


def test_options_are_read_as_declared_and_listed():
    assert parse_pipeline("static_batch(batch_size=4) fold_masks(freeze=false)") == [
        ("static_batch", {"batch_size": 4}), ("fold_masks", {"freeze": False})]
    assert parse_pipeline("insert_masks(sparsity=1, block_size=2x2)") == [
        ("insert_masks", {"sparsity": 1, "block_size": "2x2"})]
    with pytest.raises(graphprune.PassError, match=r"option batch_size=1.5 must be int"):
        parse_pipeline("static_batch(batch_size=1.5)")
    with pytest.raises(graphprune.PassError, match=r"option config='x' must be object \(Python callers only\)"):
        parse_pipeline("insert_masks(config=x)")
    with pytest.raises(graphprune.PassError, match=r"no option 'freez' \(its options: freeze, keep, stored\)"):
        parse_pipeline("fold_masks(freez=true)")
    listing = describe_registry()
    for name, spec in specs().items():
        assert name in listing
        for option in spec.options:
            assert option.describe() in listing
    assert "freeze: bool = True" in listing and "batch_size: int = 1" in listing


def test_every_registered_pass_declares_every_parameter_it_takes():
    import inspect

    for name, spec in specs().items():
        parameters = [p for p in list(inspect.signature(spec.fn).parameters.values())[2:]
                      if p.kind is not inspect.Parameter.VAR_KEYWORD]
        declared = {option.name for option in spec.options}
        assert {p.name for p in parameters} <= declared, name
