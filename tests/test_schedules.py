"""Schedules give the reference toolkit's numbers (shared/REFERENCE.md)."""

import numpy as np
import pytest
import tensorflow as tf

import graphprune


@pytest.mark.parametrize(
    "step, should_prune, sparsity",
    [(100, True, 0.0), (150, False, 0.141821), (200, True, 0.267901), (500, True, 0.745679),
     (900, True, 0.898765), (1000, True, 0.9), (1100, False, 0.9)],
)
def test_polynomial_decay_reference_values(step, should_prune, sparsity):
    schedule = graphprune.PolynomialDecay(0.0, 0.9, begin_step=100, end_step=1000, power=3, frequency=100)
    prune, value = schedule(tf.constant(step, tf.int64))
    assert bool(prune) is should_prune
    assert float(value) == pytest.approx(sparsity, abs=1e-6)


def test_polynomial_decay_before_begin_is_initial():
    schedule = graphprune.PolynomialDecay(0.2, 0.9, begin_step=100, end_step=1000)
    prune, value = schedule(50)
    assert not bool(prune) and float(value) == pytest.approx(0.2)


def test_constant_sparsity_open_end_and_frequency():
    schedule = graphprune.ConstantSparsity(0.5, begin_step=10, frequency=5)
    results = [(int(s), bool(schedule(s)[0])) for s in (9, 10, 12, 15, 1_000_000)]
    assert results == [(9, False), (10, True), (12, False), (15, True), (1_000_000, True)]
    assert float(schedule(10)[1]) == 0.5
    closed = graphprune.ConstantSparsity(0.5, begin_step=0, end_step=20, frequency=10)
    assert [bool(closed(s)[0]) for s in (0, 10, 20, 30)] == [True, True, True, False]


def test_schedule_runs_inside_a_graph_from_a_variable():
    step = tf.Variable(tf.constant(0, tf.int64))
    schedule = graphprune.PolynomialDecay(0.0, 0.9, 0, 1000, frequency=100)

    @tf.function
    def at():
        return schedule(step)

    step.assign(500)
    assert float(at()[1]) == pytest.approx(0.9 * (1 - 0.5**3), abs=1e-6)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: graphprune.ConstantSparsity(1.0, 0), r"\[0, 1\)"),
        (lambda: graphprune.ConstantSparsity(-0.1, 0), r"\[0, 1\)"),
        (lambda: graphprune.PolynomialDecay(0.0, 0.9, 100, 50), "end_step .* >= begin_step"),
        (lambda: graphprune.PolynomialDecay(0.0, 0.9, 0, -1), "only allowed for ConstantSparsity"),
        (lambda: graphprune.ConstantSparsity(0.5, -1), "begin_step"),
        (lambda: graphprune.ConstantSparsity(0.5, 0, frequency=0), "frequency"),
        (lambda: graphprune.PolynomialDecay("a lot", 0.9, 0, 10), "number"),
    ],
)
def test_validation_errors(make, message):
    with pytest.raises(graphprune.ScheduleError, match=message):
        make()


def test_warns_when_final_sparsity_is_never_applied():
    with pytest.warns(UserWarning, match=r"last update is at step 900 with sparsity 0\.8991"):
        schedule = graphprune.PolynomialDecay(0.0, 0.9, 0, 1000, frequency=300)
    assert schedule.last_update_step() == 900
    assert bool(schedule(1000)[0]) is False  # the reference's trap, kept


def test_power_and_float32_arithmetic():
    schedule = graphprune.PolynomialDecay(0.1, 0.8, 0, 3, power=2, frequency=1)
    p = np.float32(1) / np.float32(3)
    expected = np.float32(0.1 - 0.8) * (np.float32(1) - p) ** np.float32(2) + np.float32(0.8)
    assert float(schedule(1)[1]) == pytest.approx(float(expected), abs=1e-7)


def test_power_past_64_bits_is_a_number_or_a_one_line_refusal():
    huge = graphprune.PolynomialDecay(0.0, 0.5, 0, 100, power=2**64, frequency=10)  # found by the property test
    assert float(huge(tf.constant(50, tf.int64))[1]) == pytest.approx(0.5)
    assert float(huge(tf.constant(0, tf.int64))[1]) == 0.0
    with pytest.raises(graphprune.ScheduleError, match=r"power must be a finite number >= 0, got 1000.*\.\.\.$"):
        graphprune.PolynomialDecay(0.0, 0.5, 0, 100, power=10**400)
