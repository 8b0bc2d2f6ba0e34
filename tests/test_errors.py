"""Bad input gets a GraphPruneError subclass with a message that says what to do."""

import numpy as np
import pytest
import tensorflow as tf

import graphprune
import testmodels


def test_missing_directory(tmp_path):
    with pytest.raises(graphprune.BadModelError, match="no such directory"):
        graphprune.prune(str(tmp_path / "nope"))


def test_directory_that_is_not_a_saved_model(tmp_path):
    (tmp_path / "file.txt").write_text("hello")
    with pytest.raises(graphprune.BadModelError, match="not a SavedModel"):
        graphprune.prune(str(tmp_path))


def test_garbage_saved_model_pb(tmp_path):
    (tmp_path / "saved_model.pb").write_bytes(b"\x00garbage\xff" * 10)
    with pytest.raises(graphprune.BadModelError, match="cannot load"):
        graphprune.prune(str(tmp_path))


def test_model_without_prunable_op():
    with pytest.raises(graphprune.NoPrunableWeightsError, match="nothing to prune"):
        graphprune.prune(testmodels.NoPrunable())


def test_pruning_a_frozen_model_says_to_finalize_with_freeze_false(tmp_path, mlp_saved_model):
    pm = graphprune.prune(mlp_saved_model, schedule=graphprune.ConstantSparsity(0.5, 0, frequency=1))
    pm.prune_now()
    frozen = graphprune.finalize(pm, str(tmp_path / "frozen"))  # freeze=True: the kernels are constants
    with pytest.raises(graphprune.NoPrunableWeightsError, match=r"its 2 kernels are constants.*freeze=False"):
        graphprune.prune(frozen)
    kept = graphprune.finalize(pm, str(tmp_path / "kept"), freeze=False)
    assert len(graphprune.prune(kept).weights()) == 2


def test_function_without_input_signature():
    weight = tf.Variable(tf.ones([3, 3]))

    @tf.function
    def f(x):
        return tf.matmul(x, weight)

    with pytest.raises(graphprune.BadModelError, match="input_signature"):
        graphprune.prune(f)


def test_a_tf_keras_model_after_fit_is_told_to_export():
    """tf-keras keeps its fit loop as a traced tf.function on the model (train_function): it is not
    an entry, and the model is refused with the export hint, as before fit."""
    import tf_keras

    model = tf_keras.Sequential([tf_keras.layers.Dense(3, input_shape=(4,))])
    model.compile("sgd", "mse")
    model.fit(np.ones((8, 4)), np.ones((8, 3)), verbose=0)
    with pytest.raises(graphprune.BadModelError, match="input_signature"):
        graphprune.prune(model)


def test_not_a_model():
    with pytest.raises(graphprune.BadModelError, match="model.export"):
        graphprune.prune(42)


def test_errors_are_graphprune_errors():
    for error in (graphprune.BadModelError, graphprune.NoPrunableWeightsError, graphprune.ScheduleError,
                  graphprune.StructureError, graphprune.OutputExistsError, graphprune.UnsupportedError):
        assert issubclass(error, graphprune.GraphPruneError)
