"""outer_einsums: an Einsum that sums over nothing (Gemma 4's rotary angles, "ab,c->abc") as a
broadcast Mul, which TFLite's converter takes where it refused the Einsum.

Rewritten models are saved, reloaded by TensorFlow alone and compared bit for bit."""

import numpy as np
import pytest
import tensorflow as tf

import testmodels

RNG = np.random.RandomState(0)


class Einsums(tf.Module):
    def __init__(self):
        self.frequencies = tf.Variable(RNG.randn(3).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.float32), tf.TensorSpec([None, 3], tf.float32)])
    def __call__(self, positions, rows):
        return {
            "angles": tf.einsum("ab,c->abc", positions, self.frequencies),  # Gemma 4's
            "outer": tf.einsum("a,b->ab", positions[0], self.frequencies),
            "reordered": tf.einsum("ba,c->cab", positions, self.frequencies),  # a Transpose first
            "scaled": tf.einsum("abc,c->abc", tf.einsum("ab,c->abc", positions, self.frequencies), self.frequencies),
            "elementwise": tf.einsum("ac,ac->ca", rows, rows),
            "contracted": tf.einsum("ab,b->a", rows, self.frequencies),  # a matrix product: left
            "ellipsis": tf.einsum("...c,c->...c", rows, self.frequencies),  # left
        }


def test_einsums_that_contract_nothing_become_a_mul_outputs_equal_bit_for_bit(tmp_path):
    module = Einsums()
    step, model, rewritten = testmodels.one_pass(tmp_path, module, "outer_einsums")
    left = [n.attr["equation"].s.decode() for e in model.entries
            for nodes in [e.graph_def.node] + [f.node_def for f in e.graph_def.library.function]
            for n in nodes if n.op == "Einsum"]
    assert sorted(set(left)) == ["...c,c->...c", "ab,b->a"], left
    assert len(step.report["rewritten"]) == 2 * 6  # the signature's and the method's
    for batch, length in ((2, 5), (1, 1)):
        positions = tf.constant(RNG.randn(batch, length).astype(np.float32))
        rows = tf.constant(RNG.randn(4, 3).astype(np.float32))
        want, got = module(positions, rows), rewritten(positions, rows)
        for name in want:
            assert got[name].shape == want[name].shape, name
            np.testing.assert_array_equal(got[name].numpy(), want[name].numpy(), err_msg=name)


class Rotary(tf.Module):
    def __init__(self):
        self.frequencies = tf.Variable(RNG.rand(4).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.float32)])
    def __call__(self, positions):
        angles = tf.einsum("ab,c->abc", positions, self.frequencies)
        return tf.concat([tf.sin(angles), tf.cos(angles)], axis=-1)


@pytest.mark.slow
def test_export_tflite_converts_rotary_angles_the_converter_refused(tmp_path):
    module = Rotary()
    runner = testmodels.refused_then_converted(tmp_path, module, "Einsum")
    positions = RNG.rand(2, 6).astype(np.float32) * 10
    got = next(iter(runner(positions=positions).values()))
    np.testing.assert_allclose(got, module(positions).numpy(), atol=1e-5, rtol=1e-5)
