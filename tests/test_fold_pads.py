"""fold_pads: a zero Pad before a VALID convolution that pads as SAME would, folded into the
convolution (finalize's default, fold_pads=None; False: never).

Every model is run before and after finalize and compared; the op counts say what was folded and
what was left alone."""

import subprocess

import numpy as np
import pytest
import tensorflow as tf

import graphprune
from test_fold_batch_norms import _close, _ops, _serve

RNG = np.random.RandomState(0)
pytestmark = pytest.mark.filterwarnings("ignore:graphprune. finalize. nothing is pruned yet")


class Pads(tf.Module):
    """Convolutions after pads, at 8x8 (and 7x7): those SAME pads alike are folded, the rest not."""

    def __init__(self):
        def kernel(*shape):
            return tf.Variable(RNG.randn(*shape).astype(np.float32) * 0.3)

        self.depthwise = kernel(3, 3, 4, 1)
        self.conv = kernel(3, 3, 4, 4)
        self.wide = kernel(5, 5, 4, 4)
        self.five = kernel(3, 3, 5, 1)

    @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 4], tf.float32),
                                  tf.TensorSpec([None, 7, 7, 4], tf.float32)])
    def __call__(self, x, odd):
        def pad(t, top, bottom, left=None, right=None, channels=0):
            left, right = (top, bottom) if left is None else (left, right)
            return tf.pad(t, [[0, 0], [top, bottom], [left, right], [0, channels]])

        def depthwise(t, stride=1):
            return tf.nn.depthwise_conv2d(t, self.depthwise, [1, stride, stride, 1], "VALID")

        folded = [
            depthwise(pad(x, 0, 1), 2),  # Keras's correct_pad at an even size, stride 2: SAME's
            depthwise(pad(odd, 1, 1), 2),  # at an odd size: SAME pads 1 and 1
            tf.nn.conv2d(pad(x, 1, 1), self.conv, 1, "VALID"),  # a 3x3 conv, stride 1
            tf.nn.conv2d(pad(x, 2, 2), self.conv, 1, "VALID", dilations=2),  # dilated: (3 - 1) * 2 rows in all
            tf.nn.conv2d(pad(x, 1, 2, 2, 2), self.wide, [1, 2, 1, 1], "VALID"),  # 5x5, stride 2 down, 1 across
            depthwise(tf.raw_ops.PadV2(input=x, paddings=[[0, 0], [1, 1], [1, 1], [0, 0]], constant_values=0.0)),
        ]
        shared = pad(x, 1, 1)  # read by a Mean too: the conv stops reading it, the Pad stays
        folded.append(depthwise(shared) + tf.reduce_mean(shared))
        left = [
            depthwise(pad(x, 1, 1), 2),  # SAME would pad 0 and 1
            depthwise(pad(x, 1, 0)),  # 1 and 0: SAME puts the odd row after
            # a channel padded too (a depthwise conv: oneDNN's fused Pad + Conv2D drops it, TensorFlow 2.21)
            tf.nn.depthwise_conv2d(pad(x, 1, 1, channels=1), self.five, [1, 1, 1, 1], "VALID"),
            depthwise(tf.raw_ops.PadV2(input=x, paddings=[[0, 0], [1, 1], [1, 1], [0, 0]], constant_values=1.0)),
            depthwise(tf.raw_ops.MirrorPad(input=x, paddings=[[0, 0], [1, 1], [1, 1], [0, 0]], mode="REFLECT")),
            depthwise(x),  # no pad at all
        ]
        return {"folded": tf.concat([tf.reshape(t, [tf.shape(t)[0], -1]) for t in folded], 1),
                "left": tf.concat([tf.reshape(t, [tf.shape(t)[0], -1]) for t in left], 1)}


def _outputs(path, x, odd):
    serve = tf.saved_model.load(path).signatures["serving_default"]
    return {key: value.numpy() for key, value in serve(x=tf.constant(x), odd=tf.constant(odd)).items()}


def _padded_convolutions(path) -> int:
    """How many convolutions read a Pad, PadV2 or MirrorPad in the serving function and its bodies."""
    fn = tf.saved_model.load(path).signatures["serving_default"]
    graph_def = fn.graph.as_graph_def()
    count = 0
    for nodes in [graph_def.node] + [f.node_def for f in graph_def.library.function]:
        by_name = {node.name: node for node in nodes}
        for node in nodes:
            if node.op in ("Conv2D", "DepthwiseConv2dNative"):
                source = by_name.get(node.input[0].split(":")[0])
                count += source is not None and source.op in ("Pad", "PadV2", "MirrorPad")
    return count


@pytest.mark.parametrize("freeze", [True, False])
def test_pads_that_same_padding_adds_are_folded(tmp_path, freeze):
    module = Pads()
    path = str(tmp_path / "pads")
    tf.saved_model.save(module, path)
    x, odd = RNG.rand(3, 8, 8, 4).astype(np.float32), RNG.rand(3, 7, 7, 4).astype(np.float32)
    want = {key: value.numpy() for key, value in module(x, odd).items()}
    assert _padded_convolutions(path) == 12

    out = graphprune.finalize(graphprune.prune(path), str(tmp_path / "out"), freeze=freeze)
    assert _padded_convolutions(out) == 5  # the 7 of "folded" read their inputs with SAME padding
    ops = _ops(out)
    assert ops["Pad"] == 1 + 3 and ops["PadV2"] == 1 and ops["MirrorPad"] == 1  # the shared one, and "left"'s
    got = _outputs(out, x, odd)
    for key in want:
        _close(got[key], want[key])

    kept = graphprune.finalize(graphprune.prune(path), str(tmp_path / "kept"), freeze=freeze,
                               fold_pads=np.bool_(False))  # as a NumPy flag may come
    assert _padded_convolutions(kept) == 12
    for key in want:
        _close(_outputs(kept, x, odd)[key], want[key])


def test_keras_mobilenet_v2_pads_fold_and_tflite(tmp_path):
    """keras.applications MobileNetV2 (from its config): the four ZeroPadding2D before its stride-2
    depthwise convs go, in the channel-pruned and shrunk model too, which computes the masked
    model in TensorFlow and in LiteRT."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None)
    model.export(str(tmp_path / "export"), verbose=False)
    assert _padded_convolutions(str(tmp_path / "export")) == 4
    pm = graphprune.prune(str(tmp_path / "export"), graphprune.ConstantSparsity(0.5, 0), structure="channel",
                          one_shot=True)
    x = RNG.rand(2, 32, 32, 3).astype(np.float32)
    masked = pm.serve(x).numpy()
    out = graphprune.finalize(pm, str(tmp_path / "small"), shrink=True)
    assert _padded_convolutions(out) == 0 and _ops(out)["Pad"] == 0
    _close(_serve(out, x), masked)
    tflite = graphprune.export_tflite(out, str(tmp_path / "small.tflite"))
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=tflite).get_signature_runner("serving_default")
    got = next(iter(runner(**{next(iter(runner.get_input_details())): x[:1]}).values()))
    _close(got, masked[:1])


def test_bad_value_and_cli_flag(tmp_path):
    module = Pads()
    path = str(tmp_path / "pads")
    tf.saved_model.save(module, path)
    for bad in ("yes", 1, "auto"):
        with pytest.raises(graphprune.GraphPruneError, match="fold_pads must be True, False or None"):
            graphprune.finalize(graphprune.prune(path), str(tmp_path / "bad"), fold_pads=bad)
    assert not (tmp_path / "bad").exists()
    for flag, padded in (("", 5), ("--fold_pads", 5), ("--nofold_pads", 12)):
        out = str(tmp_path / (flag[2:] or "default"))
        result = subprocess.run(f"graphprune finalize --input={path} --output={out} {flag}", shell=True,
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
        assert _padded_convolutions(out) == padded


class UnknownSize(tf.Module):
    """Keras's pad before a stride-2 depthwise conv on an image of unknown height and width: SAME
    would pad an odd size (1, 1), an even one (0, 1), so the Pad stays."""

    def __init__(self):
        self.depthwise = tf.Variable(RNG.randn(3, 3, 4, 1).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 4], tf.float32)])
    def __call__(self, x):
        padded = tf.pad(x, [[0, 0], [0, 1], [0, 1], [0, 0]])
        return tf.nn.depthwise_conv2d(padded, self.depthwise, [1, 2, 2, 1], "VALID")


def test_unknown_sizes_keep_their_pads(tmp_path):
    module = UnknownSize()
    path = str(tmp_path / "unknown")
    tf.saved_model.save(module, path)
    out = graphprune.finalize(graphprune.prune(path), str(tmp_path / "out"))
    assert _padded_convolutions(out) == 1
    for shape in [(1, 8, 8, 4), (2, 7, 9, 4)]:
        x = RNG.rand(*shape).astype(np.float32)
        _close(_serve(out, x), module(x).numpy())
