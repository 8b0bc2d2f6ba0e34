"""Property-based: on random small MLP/CNN graphs with random schedules and structures, the
pipeline either succeeds with numeric equivalence (all-ones masks) and masks that follow the rule,
or raises a GraphPruneError, never another exception. Case counts appear in the test summary."""

import collections
import warnings

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import graphprune

OUTCOMES = collections.Counter()

def _mostly(valid, anything):
    """Mostly valid values, sometimes anything (including invalid ones)."""
    return st.one_of(valid, valid, valid, anything)


sparsities = _mostly(st.floats(0.0, 0.95), st.floats(-0.2, 1.1))
steps = _mostly(st.integers(0, 4), st.integers(-2, 4))
frequencies = _mostly(st.integers(1, 4), st.integers(-1, 4))
schedules = st.one_of(
    st.builds(lambda i, f, b, span, freq: ("poly", i, f, b, b + span, freq),
              sparsities, sparsities, steps, _mostly(st.integers(0, 8), st.integers(-3, 8)), frequencies),
    st.builds(lambda t, b, e, freq: ("const", t, b, e, freq),
              sparsities, steps, st.sampled_from([-1, 0, 3, 8]), frequencies),
)
structures = st.one_of(
    st.just({}),
    st.builds(lambda bh, bw, pooling: {"block_size": (bh, bw), "block_pooling": pooling},
              st.integers(1, 4), st.integers(1, 4), st.sampled_from(["AVG", "MAX", "avg"])),
    st.builds(lambda mn: {"m_by_n": mn}, st.sampled_from([(2, 4), (1, 2), (1, 4)])),
)


def _schedule(spec):
    if spec[0] == "poly":
        _, initial, final, begin, end, frequency = spec
        return graphprune.PolynomialDecay(initial, final, begin, end, frequency=frequency)
    _, target, begin, end, frequency = spec
    return graphprune.ConstantSparsity(target, begin, end, frequency)


def _mlp(widths, seed):
    rng = np.random.RandomState(seed)
    kernels = [tf.Variable(rng.standard_normal([a, b]).astype(np.float32), name=f"dense_{i}/kernel")
               for i, (a, b) in enumerate(zip(widths[:-1], widths[1:]))]

    @tf.function(input_signature=[tf.TensorSpec([None, widths[0]], tf.float32)])
    def f(x):
        for kernel in kernels:
            x = tf.nn.relu(tf.matmul(x, kernel))
        return x

    return f, [None, widths[0]]


def _cnn(size, channels, kernel, depthwise, seed):
    rng = np.random.RandomState(seed)
    conv = tf.Variable(rng.standard_normal([kernel, kernel, channels[0], channels[1]]).astype(np.float32), name="conv")
    dw = tf.Variable(rng.standard_normal([kernel, kernel, channels[1], 1]).astype(np.float32), name="depthwise")
    dense = tf.Variable(rng.standard_normal([size * size * channels[1], 3]).astype(np.float32), name="dense")

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, channels[0]], tf.float32)])
    def f(x):
        y = tf.nn.conv2d(x, conv, 1, "SAME")
        if depthwise:
            y = tf.nn.depthwise_conv2d(y, dw, [1, 1, 1, 1], "SAME")
        return tf.matmul(tf.reshape(y, [-1, size * size * channels[1]]), dense)

    return f, [None, size, size, channels[0]]


def _check(function, shape, schedule_spec, structure, scope, seed):
    x = tf.constant(np.random.RandomState(seed).standard_normal([2, *shape[1:]]).astype(np.float32))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            schedule = _schedule(schedule_spec)
        pm = graphprune.prune(function, schedule=schedule, scope=scope, **structure)
    except graphprune.GraphPruneError as error:
        OUTCOMES[f"refused: {type(error).__name__}"] += 1
        return
    np.testing.assert_array_equal(pm(x).numpy(), function(x).numpy())
    pruned_any = False
    for _ in range(6):
        state = pm.update_masks()
        pruned_any |= bool(state["should_prune"])
    for mask, weight in zip(pm.masks, pm.pruned_weights):
        values = mask.numpy()
        assert values.shape == tuple(weight.shape) and set(np.unique(values)) <= {0.0, 1.0}
        assert np.all(weight.numpy()[values == 0] == 0)
        assert values.sum() >= 1  # never everything pruned
    expected = function(x).numpy() if not pruned_any else None
    if expected is not None:
        np.testing.assert_array_equal(pm(x).numpy(), expected)
    OUTCOMES["pruned and verified"] += 1


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(widths=st.lists(st.integers(1, 12), min_size=2, max_size=4), schedule=schedules, structure=structures,
       scope=st.sampled_from(["layer", "global"]), seed=st.integers(0, 1000))
def test_random_mlps(widths, schedule, structure, scope, seed):
    OUTCOMES["cases"] += 1
    _check(*_mlp(widths, seed), schedule, structure, scope, seed)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(size=st.integers(2, 6), channels=st.tuples(st.integers(1, 4), st.integers(1, 8)),
       kernel=st.integers(1, 3), depthwise=st.booleans(), schedule=schedules, structure=structures,
       scope=st.sampled_from(["layer", "global"]), seed=st.integers(0, 1000))
def test_random_cnns(size, channels, kernel, depthwise, schedule, structure, scope, seed):
    OUTCOMES["cases"] += 1
    _check(*_cnn(size, channels, kernel, depthwise, seed), schedule, structure, scope, seed)


def test_schedules_are_refused_only_with_schedule_errors():
    """Every invalid setting the strategies above produce is a ScheduleError (sanity for them)."""
    with pytest.raises(graphprune.ScheduleError):
        _schedule(("poly", 0.0, 1.1, 0, 5, 1))
