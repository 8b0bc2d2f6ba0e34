"""pointwise_matmul: 1x1, stride-1 convolutions written as matrix products (finalize's default,
pointwise_matmul="auto": those of at most 3.5M multiply-adds per image; True: every one).

Every model here is run before and after finalize and compared numerically; the op counts say
what was rewritten and what was left alone."""

import subprocess

import numpy as np
import pytest
import tensorflow as tf

import graphprune
from graphprune.api import run_passes
from test_channels import _predicted_parameters  # what the masks leave
from test_fold_batch_norms import _close, _ops, _serve, exported  # op counts and outputs of a SavedModel

RNG = np.random.RandomState(0)


def _keras_model(path):
    """A MobileNet-like block: 1x1 convs with and without a bias, batch norms, a residual add, a
    grouped and a strided 1x1 conv (neither a plain matrix product) and a dilated one, a classifier."""
    import keras

    keras.utils.set_random_seed(0)
    x = keras.Input((12, 12, 3))
    y = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(x)  # 3x3: stays
    y = keras.layers.BatchNormalization()(y)
    y = keras.layers.ReLU(6.0)(y)
    z = keras.layers.Conv2D(16, 1)(y)  # bias, then a batch norm and ReLU6
    z = keras.layers.BatchNormalization()(z)
    z = keras.layers.ReLU(6.0)(z)
    z = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False)(z)
    z = keras.layers.Conv2D(8, 1, use_bias=False)(z)  # its output read by the residual add
    y = keras.layers.Add()([y, z])
    y = keras.layers.Conv2D(8, 1, groups=2)(y)  # grouped: each half of the channels on its own; stays
    y = keras.layers.Conv2D(12, 1, activation="relu")(y)  # bias and activation
    s = keras.layers.Conv2D(6, 1, strides=2)(y)  # strided: stays
    d = keras.layers.Conv2D(6, 1, dilation_rate=2)(y)  # dilated: a plain 1x1 conv between space-to-batch ops
    y = keras.layers.Concatenate()([keras.layers.GlobalAveragePooling2D()(s), keras.layers.GlobalAveragePooling2D()(d)])
    y = keras.layers.Dense(5)(y)
    return exported(keras.Model(x, y), path)


@pytest.mark.parametrize("freeze", ["all", True])
def test_keras_pointwise_convs_become_matmuls(tmp_path, freeze):
    model = _keras_model(str(tmp_path / "export"))
    x = RNG.rand(3, 12, 12, 3).astype(np.float32)
    want = model(x).numpy()
    before = _ops(str(tmp_path / "export"))
    assert before["Conv2D"] == 7 and before["MatMul"] == 1

    plain = graphprune.finalize(graphprune.prune(str(tmp_path / "export")), str(tmp_path / "plain"), freeze=freeze,
                                pointwise_matmul=False)
    assert _ops(plain)["Conv2D"] == 7
    # finalize's default ("auto"): every 1x1 conv here is far under 3.5M multiply-adds an image
    out = graphprune.finalize(graphprune.prune(str(tmp_path / "export")), str(tmp_path / "out"), freeze=freeze)
    ops, plain_ops = _ops(out), _ops(plain)
    # the 3x3, the grouped and the strided 1x1 stay; the dilated 1x1 is a plain one between
    # SpaceToBatchND and BatchToSpaceND (TensorFlow's dilated convolution), and goes with the other three
    assert ops["Conv2D"] == 3 and ops["SpaceToBatchND"] == 1
    assert ops["MatMul"] == 1 + 4
    assert ops["Shape"] == 0  # spatial sizes known: the Reshape back is to a constant shape
    assert ops["Reshape"] - plain_ops["Reshape"] == 3 * 4  # the input, the kernel, the output
    assert ops["Relu6"] == plain_ops["Relu6"] and ops["Relu"] == plain_ops["Relu"]  # moved, not copied twice
    _close(_serve(out, x), want)
    _close(_serve(out, x[:1]), want[:1])  # the batch is not fixed
    assert graphprune.cost(out).parameters == graphprune.cost(plain).parameters
    assert graphprune.cost(out).flops == graphprune.cost(plain).flops


def test_channel_pruned_shrunk_model_as_matmuls_and_tflite(tmp_path):
    model = _keras_model(str(tmp_path / "export"))
    x = RNG.rand(4, 12, 12, 3).astype(np.float32)
    pm = graphprune.prune(str(tmp_path / "export"), graphprune.ConstantSparsity(0.5, 0), structure="channel",
                          one_shot=True)
    masked = pm.serve(x).numpy()
    out = graphprune.finalize(pm, str(tmp_path / "small"), shrink=True, freeze="all", pointwise_matmul=True)
    plain = graphprune.finalize(pm, str(tmp_path / "plain"), shrink=True, freeze="all", pointwise_matmul=False)
    assert _ops(out)["Conv2D"] == 3 and _ops(out)["MatMul"] == 5
    _close(_serve(out, x), masked)
    assert graphprune.cost(out).parameters == graphprune.cost(plain).parameters < model.count_params()
    tflite = graphprune.export_tflite(out, str(tmp_path / "small.tflite"))
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=tflite).get_signature_runner("serving_default")
    got = next(iter(runner(**{next(iter(runner.get_input_details())): x[:1]}).values()))
    _close(got, masked[:1])


class Dynamic(tf.Module):
    """1x1 convs on an input of unknown height and width: one with a variable kernel, a BiasAdd
    and a Relu; one whose output is the model's (no chain moves); one inside a loop body."""

    def __init__(self):
        self.k1 = tf.Variable(RNG.randn(1, 1, 4, 6).astype(np.float32))
        self.b1 = tf.Variable(RNG.randn(6).astype(np.float32))
        self.k2 = tf.Variable(RNG.randn(1, 1, 6, 3).astype(np.float32))
        self.k3 = tf.Variable(RNG.randn(1, 1, 6, 6).astype(np.float32) * 0.3)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 4], tf.float32)])
    def __call__(self, x):
        y = tf.nn.relu(tf.nn.bias_add(tf.nn.conv2d(x, self.k1, 1, "VALID"), self.b1))

        def body(i, y):
            return i + 1, tf.nn.tanh(tf.nn.conv2d(y, self.k3, 1, "SAME"))

        y = tf.while_loop(lambda i, y: i < 2, body, (tf.constant(0), y))[1]
        return tf.nn.conv2d(y, self.k2, [1, 1, 1, 1], "SAME")


@pytest.mark.parametrize("freeze", [False, "all"])
def test_unknown_sizes_variable_kernels_and_loop_bodies(tmp_path, freeze):
    module = Dynamic()
    path = str(tmp_path / "dynamic")
    tf.saved_model.save(module, path)
    out = graphprune.finalize(graphprune.prune(path), str(tmp_path / "out"), freeze=freeze, pointwise_matmul=True)
    ops = _ops(out)
    assert ops["Conv2D"] == 0 and ops["MatMul"] == 3
    assert ops["Shape"] == 3  # sizes unknown: the shape back is computed at run time
    for shape in [(2, 5, 7, 4), (1, 3, 3, 4), (0, 4, 4, 4)]:
        x = RNG.rand(*shape).astype(np.float32)
        got = _serve(out, x)
        assert got.shape == shape[:3] + (3,)
        if x.size:
            _close(got, module(x).numpy())
    if freeze is False:
        loaded = tf.saved_model.load(out)  # held while its function's variables are read
        serve = loaded.signatures["serving_default"]
        kernels = sorted(tuple(v.shape.as_list()) for v in serve.variables if v.shape.rank == 4)
        assert kernels == [(1, 1, 4, 6), (1, 1, 6, 3), (1, 1, 6, 6)]  # the variables keep their shapes


def test_bad_value_and_cli_flag(tmp_path):
    model = _keras_model(str(tmp_path / "export"))
    for bad in ("yes", "Auto", 1, None):
        with pytest.raises(graphprune.GraphPruneError, match="pointwise_matmul must be 'auto', True or False"):
            graphprune.finalize(graphprune.prune(str(tmp_path / "export")), str(tmp_path / "bad"), pointwise_matmul=bad)
    assert not (tmp_path / "bad").exists()
    x = RNG.rand(2, 12, 12, 3).astype(np.float32)
    for flag, convs in (("--pointwise_matmul", 3), ("--nopointwise_matmul", 7)):
        out = str(tmp_path / flag[2:])
        result = subprocess.run(f"graphprune finalize --input={tmp_path / 'export'} --output={out} --freeze_all "
                                + flag, shell=True, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
        assert _ops(out)["Conv2D"] == convs
        _close(_serve(out, x), model(x).numpy())


class Unstacked(tf.Module):
    """A 1x1 conv whose output is read only by an op without a "T" attr (TensorListFromTensor)."""

    def __init__(self):
        self.k = tf.Variable(RNG.randn(1, 1, 4, 6).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec([3, 5, 5, 4], tf.float32)])
    def __call__(self, x):
        y = tf.nn.conv2d(x, self.k, 1, "SAME")
        return tf.TensorArray(tf.float32, size=3).unstack(y).stack() * 2.0


def test_a_reader_without_a_type_attr_is_left_as_it_is(tmp_path):
    # the chain after the conv is looked for by op first: reading a "T" the reader does not have
    # used to add one to it, and finalize refused the model ("Failed to bind all placeholders")
    module = Unstacked()
    path = str(tmp_path / "unstacked")
    tf.saved_model.save(module, path)
    out = graphprune.finalize(graphprune.prune(path), str(tmp_path / "out"), pointwise_matmul=True)
    assert _ops(out)["Conv2D"] == 0 and _ops(out)["MatMul"] == 1
    x = RNG.rand(3, 5, 5, 4).astype(np.float32)
    _close(_serve(out, x), module(x).numpy())


class Sizes(tf.Module):
    """Two 1x1 convs at 64x64: 64 -> 64 channels (16.8M multiply-adds an image, past "auto"'s 3.5M)
    and 64 -> 8 (2.1M); a third on an input of unknown height and width."""

    def __init__(self):
        self.large = tf.Variable(RNG.randn(1, 1, 64, 64).astype(np.float32) * 0.1)
        self.small = tf.Variable(RNG.randn(1, 1, 64, 8).astype(np.float32) * 0.1)
        self.other = tf.Variable(RNG.randn(1, 1, 3, 4).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec([None, 64, 64, 64], tf.float32),
                                  tf.TensorSpec([None, None, None, 3], tf.float32)])
    def __call__(self, x, z):
        y = tf.nn.relu(tf.nn.conv2d(x, self.large, 1, "SAME"))
        return tf.nn.conv2d(y, self.small, 1, "SAME"), tf.nn.conv2d(z, self.other, 1, "SAME")


def test_auto_rewrites_small_convs_of_known_size_only(tmp_path):
    module = Sizes()
    path = str(tmp_path / "sizes")
    tf.saved_model.save(module, path)
    x, z = RNG.rand(2, 64, 64, 64).astype(np.float32), RNG.rand(2, 5, 3, 3).astype(np.float32)
    want = [t.numpy() for t in module(x, z)]

    def outputs(out):
        serve = tf.saved_model.load(out).signatures["serving_default"]
        got = serve(x=tf.constant(x), z=tf.constant(z))
        return [got[key].numpy() for key in sorted(got)]

    auto = graphprune.finalize(graphprune.prune(path), str(tmp_path / "auto"))
    assert _ops(auto)["Conv2D"] == 2 and _ops(auto)["MatMul"] == 1  # the 64 -> 8 one only
    every = graphprune.finalize(graphprune.prune(path), str(tmp_path / "every"), pointwise_matmul=True)
    assert _ops(every)["Conv2D"] == 0 and _ops(every)["MatMul"] == 3
    for out in (auto, every):
        for got, expected in zip(outputs(out), want):
            _close(got, expected)
    # the pass's own option, as a pass list gives it: the limit is inclusive
    result = run_passes(path, "pointwise_matmul(max_macs=2097152) strip_unused", str(tmp_path / "run"))
    report = next(r.report for name, r, _ in result.reports if name == "pointwise_matmul")
    # the conv in order of tracing (large, small, other), in each entry the SavedModel gives
    assert {name.split("/")[-1] for name in report["rewritten"]} == {"Conv2D_1"}
    assert {name.split("/")[-1] for name in report["left"]} == {"Conv2D", "Conv2D_2"}
    assert _ops(str(tmp_path / "run"))["MatMul"] == 1
    with pytest.raises(graphprune.GraphPruneError, match="max_macs must be >= 0"):
        run_passes(path, "pointwise_matmul(max_macs=-1)", str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("pointwise_matmul", ["auto", False])
def test_a_shrunk_model_pruned_and_shrunk_again(tmp_path, pointwise_matmul):
    # prune -> finalize(shrink, weights kept as variables) -> prune that -> finalize(shrink): the
    # second shrink once wrote shape constants under names the first had taken ("duplicate node
    # names"), and a 1x1 kernel read as a matrix (Reshape [1, 1, Cin, Cout] -> [Cin, Cout]) kept
    # its groups whole ("does not keep this axis"); both ways remove the same channels now
    _keras_model(str(tmp_path / "export"))
    x = RNG.rand(4, 12, 12, 3).astype(np.float32)
    schedule = graphprune.ConstantSparsity(0.5, 0)
    pm = graphprune.prune(str(tmp_path / "export"), schedule, structure="channel", one_shot=True)
    first = graphprune.finalize(pm, str(tmp_path / "first"), shrink=True, freeze=False,
                                pointwise_matmul=pointwise_matmul)
    assert _ops(first)["MatMul"] == (5 if pointwise_matmul else 1)
    again = graphprune.prune(first, schedule, structure="channel", one_shot=True)
    kept_whole = [group.reason for group in graphprune.channel_groups(first) if not group.prunable]
    assert len(kept_whole) == 3 and not any("does not keep" in reason for reason in kept_whole), kept_whole
    masked = again.serve(x).numpy()
    # batch norms kept (not folded, as by default) so the masks predict every parameter
    second = graphprune.finalize(again, str(tmp_path / "second"), shrink=True, pointwise_matmul=pointwise_matmul,
                                 fold_batch_norms=False)
    _close(_serve(second, x), masked)
    assert graphprune.cost(first).parameters == _predicted_parameters(pm)
    assert graphprune.cost(second).parameters == _predicted_parameters(again) < graphprune.cost(first).parameters


class Square(tf.Module):
    """A 1x1 conv with as many output channels as input ones, then a 3x3 one."""

    def __init__(self):
        self.k1 = tf.Variable(RNG.randn(1, 1, 6, 6).astype(np.float32))
        self.k2 = tf.Variable(RNG.randn(3, 3, 6, 2).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec([None, 5, 5, 6], tf.float32)])
    def __call__(self, x):
        return tf.nn.conv2d(tf.nn.relu(tf.nn.conv2d(x, self.k1, 1, "SAME")), self.k2, 1, "SAME")


def test_auto_keeps_the_convs_where_the_matmuls_fail_the_check(tmp_path, monkeypatch):
    # "auto" takes the MatMuls only where finalize's check passes (a deep network summed in
    # another order can move past check_tolerance: EfficientNetV2B0 frozen, 4e-5 of the scale);
    # a fault put into the rewrite (the kernel matrix read transposed) stands in for that here
    from graphprune.passes import pointwise_matmul as pass_module

    rewrite = pass_module._rewrite

    def transposed(body, conv, *args):
        base = conv.name
        rewrite(body, conv, *args)
        next(n for n in body.nodes if n.op == "MatMul" and n.name.startswith(base + "/")).attr["transpose_b"].b = True

    monkeypatch.setattr(pass_module, "_rewrite", transposed)
    module = Square()
    path = str(tmp_path / "square")
    tf.saved_model.save(module, path)
    x = RNG.rand(2, 5, 5, 6).astype(np.float32)
    with pytest.raises(graphprune.PassError, match="differs from the masked model"):
        graphprune.finalize(graphprune.prune(path), str(tmp_path / "every"), pointwise_matmul=True)
    assert not (tmp_path / "every").exists()
    with pytest.warns(UserWarning, match="they stay convolutions"):
        out = graphprune.finalize(graphprune.prune(path), str(tmp_path / "auto"))
    assert _ops(out)["Conv2D"] == 2 and _ops(out)["MatMul"] == 0
    _close(_serve(out, x), module(x).numpy())


class ScaledPointwise(tf.Module):
    """A 1x1 conv times a per-channel scale, then ReLU6: folded, the scale leaves an Identity
    between the conv and its activation."""

    def __init__(self):
        self.kernel = tf.Variable(RNG.randn(1, 1, 4, 6).astype(np.float32))
        self.scale = tf.constant(RNG.uniform(0.5, 1.5, 6).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec([None, 5, 5, 4], tf.float32)])
    def __call__(self, x):
        return tf.nn.relu6(tf.nn.conv2d(x, self.kernel, 1, "SAME") * self.scale)


def test_the_activation_moves_through_an_identity(tmp_path):
    module = ScaledPointwise()
    path = str(tmp_path / "scaled")
    tf.saved_model.save(module, path)
    out = graphprune.finalize(graphprune.prune(path), str(tmp_path / "out"))
    graph = tf.saved_model.load(out).signatures["serving_default"].graph.as_graph_def()
    nodes = {node.name: node for function in graph.library.function for node in function.node_def}
    relu = [node for node in nodes.values() if node.op == "Relu6"]
    assert len(relu) == 1 and _ops(out)["Conv2D"] == 0 and _ops(out)["Mul"] == 0
    producer = nodes[relu[0].input[0].split(":")[0]]  # the Identity the fold left, on the flat tensor
    assert producer.op == "Identity" and nodes[producer.input[0].split(":")[0]].op == "MatMul"
    x = RNG.rand(3, 5, 5, 4).astype(np.float32)
    _close(_serve(out, x), module(x).numpy())
