"""The real console script, in subprocesses, on SavedModels built here."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import testmodels

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="-1")


def graphprune(*args, check=True):
    executable = shutil.which("graphprune")
    command = [executable] if executable else [sys.executable, "-m", "graphprune.tools.main"]
    result = subprocess.run(command + list(args), capture_output=True, text=True, env=ENV, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"graphprune {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


def _digest(path):
    return testmodels.directory_digest(path)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = testmodels.CNN()
    tf.saved_model.save(model, str(root / "model"), signatures={"serving_default": model.__call__})
    rng = np.random.RandomState(0)
    x = rng.standard_normal([48, 8, 8, 3]).astype(np.float32)
    np.savez(root / "train.npz", x=x, y=rng.randint(0, 10, 48).astype(np.int32))
    np.savez(root / "regression.npz", x=x, y=rng.standard_normal([48, 10]).astype(np.float32))
    return root


def _run_chain(workspace, prefix, prune_flags, train_flags=(), finalize_flags=()):
    model = str(workspace / "model")
    before = _digest(model)
    graphprune("prune", f"--input={model}", f"--output={workspace / (prefix + '_prunable')}", *prune_flags)
    assert _digest(model) == before
    prunable = str(workspace / (prefix + "_prunable"))
    before = _digest(prunable)
    graphprune("train", f"--input={prunable}", f"--output={workspace / (prefix + '_trained')}",
               f"--data={workspace / 'train.npz'}", *train_flags)
    assert _digest(prunable) == before
    trained = str(workspace / (prefix + "_trained"))
    before = _digest(trained)
    graphprune("finalize", f"--input={trained}", f"--output={workspace / (prefix + '_final')}", *finalize_flags)
    assert _digest(trained) == before
    for path in (model, prunable, trained):
        assert os.path.isdir(path)
    report = json.loads(graphprune("inspect", f"--input={workspace / (prefix + '_final')}", "--json").stdout)
    return report


def test_prune_train_finalize_inspect_reaches_target(workspace):
    report = _run_chain(workspace, "poly", ["--final_sparsity=0.75", "--end_step=4", "--frequency=2"],
                        ["--epochs=2", "--batch_size=16", "--optimizer=sgd", "--learning_rate=0.01"])
    assert len(report["weights"]) == 3
    for weight in report["weights"]:
        assert weight["sparsity"] == pytest.approx(0.75, abs=1.0 / weight["elements"]), weight
    assert report["totals"]["sparsity"] == pytest.approx(0.75, abs=0.01)


def test_channel_training_reports_channels_removed(tmp_path):
    """train on a channel-pruned model says how many channels are gone, against the target (a
    fraction of channels), not only the weights' zeros: half of the MLP's 16 neurons take their
    kernel columns, biases and the next kernel's rows with them, 0.5 of the kernels' weights here."""
    model = testmodels.MLP()
    tf.saved_model.save(model, str(tmp_path / "model"))
    rng = np.random.RandomState(0)
    np.savez(tmp_path / "data.npz", x=rng.standard_normal([32, 8]).astype(np.float32), y=rng.randint(0, 4, 32))
    graphprune("prune", f"--input={tmp_path / 'model'}", f"--output={tmp_path / 'prunable'}", "--structure=channel",
               "--final_sparsity=0.5", "--end_step=2", "--frequency=1")
    done = graphprune("train", f"--input={tmp_path / 'prunable'}", f"--output={tmp_path / 'trained'}",
                      f"--data={tmp_path / 'data.npz'}", "--batch_size=8")
    assert "channels removed 0.500 (target 0.500), weights 0.500 zero" in done.stderr.splitlines()[-1], done.stderr
    report = json.loads(graphprune("inspect", f"--input={tmp_path / 'trained'}", "--json").stdout)
    kernels = {weight["name"]: weight for weight in report["weights"]}
    assert kernels["dense/kernel"]["sparsity"] == kernels["dense_1/kernel"]["sparsity"] == 0.5
    assert f"channels removed 0.5000, weights sparsity {report['totals']['sparsity']:.4f}" in done.stdout, done.stdout


def test_every_prune_flag(workspace, tmp_path):
    report = _run_chain(
        workspace, "flags",
        ["--schedule=constant", "--final_sparsity=0.5", "--begin_step=1", "--end_step=-1", "--frequency=1",
         "--block_size=1x2", "--block_pooling=max", "--scope=global", "--exclude=Depthwise",
         "--sparsity_for=conv2d/kernel=0.25", "--power=2", "--initial_sparsity=0.0", "--verify"],
        ["--loss=softmax_cross_entropy", "--optimizer=momentum", "--batch_size=24", "--seed=3"],
        ["--nofreeze", "--verify"],
    )
    by_name = {w["name"]: w for w in report["weights"]}
    assert by_name["conv2d/kernel"]["sparsity"] == pytest.approx(0.25, abs=2.0 / 216)
    assert by_name["depthwise_conv2d/depthwise_kernel"]["sparsity"] == 0.0  # excluded


def test_m_by_n_one_shot_and_mse(workspace):
    model = str(workspace / "model")
    out = workspace / "two_four"
    graphprune("prune", f"--input={model}", f"--output={out}", "--final_sparsity=0.5", "--m_by_n=2:4",
               "--exclude=conv2d/|Depthwise", "--one_shot")
    graphprune("train", f"--input={out}", f"--output={workspace / 'two_four_trained'}",
               f"--data={workspace / 'regression.npz'}", "--loss=mse", "--optimizer=adam")
    report = json.loads(graphprune("inspect", f"--input={workspace / 'two_four_trained'}", "--json").stdout)
    dense = next(w for w in report["weights"] if w["name"] == "dense/kernel")
    assert dense["sparsity"] == pytest.approx(0.5, abs=1e-9)  # exactly 2 of every 4


class _Embedding(tf.Module):
    def __init__(self):
        super().__init__()
        rng = np.random.RandomState(0)
        self.table = tf.Variable(rng.standard_normal([12, 4]).astype(np.float32), name="embedding/table")
        self.kernel = tf.Variable(rng.standard_normal([4, 3]).astype(np.float32), name="dense/kernel")

    @tf.function(input_signature=[tf.TensorSpec([None, 5], tf.int32)])
    def __call__(self, ids):
        return tf.matmul(tf.reduce_mean(tf.gather(tf.convert_to_tensor(self.table), ids), axis=1), self.kernel)


def test_include_gather_prunes_an_embedding_table(tmp_path):
    module = _Embedding()
    model = str(tmp_path / "model")
    tf.saved_model.save(module, model, signatures={"serving_default": module.__call__})
    sparsities = {}
    for flag in ("--noinclude_gather", "--include_gather"):
        out = tmp_path / flag.strip("-")
        graphprune("prune", f"--input={model}", f"--output={out}", "--final_sparsity=0.5", "--one_shot", flag)
        report = json.loads(graphprune("inspect", f"--input={out}", "--json").stdout)
        sparsities[flag] = {w["name"]: w["sparsity"] for w in report["weights"]}
    assert sparsities["--noinclude_gather"] == {"dense/kernel": 0.5}
    assert sparsities["--include_gather"] == {"dense/kernel": 0.5, "embedding/table": 0.5}


def test_finalize_tflite_flags_and_inspect_table(workspace):
    trained = str(workspace / "poly_trained")
    if not os.path.isdir(trained):
        pytest.skip("needs test_prune_train_finalize_inspect_reaches_target")
    np.savez(workspace / "rep.npz", x=np.random.RandomState(1).standard_normal([16, 8, 8, 3]).astype(np.float32))
    for quantize, extra in (("none", ["--sparse_tflite"]), ("dynamic", []),
                            ("int8", [f"--representative_data={workspace / 'rep.npz'}"])):
        tflite = workspace / f"m_{quantize}.tflite"
        graphprune("finalize", f"--input={trained}", f"--output={workspace / ('final_' + quantize)}",
                   f"--tflite={tflite}", f"--quantize={quantize}", *extra)
        table = graphprune("inspect", f"--input={tflite}").stdout
        assert "total (3 weights)" in table
        report = json.loads(graphprune("inspect", f"--input={tflite}", "--json").stdout)
        assert report["totals"]["sparsity"] == pytest.approx(0.75, abs=0.01)
    from ai_edge_litert.interpreter import Interpreter

    tflite = workspace / "m_batch1.tflite"
    graphprune("finalize", f"--input={trained}", f"--output={workspace / 'final_batch1'}", f"--tflite={tflite}",
               "--tflite_batch_size=1")
    assert list(Interpreter(model_path=str(tflite)).get_input_details()[0]["shape"]) == [1, 8, 8, 3]


def test_finalize_check_inputs(tmp_path):
    """--check_inputs: the check runs on the user's arrays (an .npz by input name, or by
    'ENTRY/NAME'), where the inputs graphprune makes put a model's boxes off the image; a file
    that fits no entry, or is no .npz, exits 2 in one line with nothing written."""
    module = testmodels.BoxesOffTheImage()
    tf.saved_model.save(module, str(tmp_path / "model"), signatures={"serving_default": module.__call__})
    graphprune("prune", f"--input={tmp_path / 'model'}", f"--output={tmp_path / 'prunable'}", "--final_sparsity=0.5",
               "--one_shot")
    rng = np.random.RandomState(0)
    x, boxes = rng.standard_normal([2, 4]).astype(np.float32), rng.uniform(0, 1, [2, 3]).astype(np.float32)
    np.savez(tmp_path / "by_name.npz", x=x, boxes=boxes)
    np.savez(tmp_path / "by_entry.npz", **{"serving_default/x": x, "serving_default/boxes": boxes})
    np.savez(tmp_path / "short.npz", x=x)
    (tmp_path / "text.npz").write_text("x,boxes\n")
    for name in ("by_name", "by_entry"):
        result = graphprune("finalize", f"--input={tmp_path / 'prunable'}", f"--output={tmp_path / name}",
                            f"--check_inputs={tmp_path / (name + '.npz')}")
        if name == "by_name":  # both entries, the signature and the method, take x and boxes
            assert "not checked" not in result.stderr, result.stderr
        else:  # the method, not named, runs on inputs graphprune makes: it alone is not checked
            warned = [line for line in result.stderr.splitlines() if "not checked" in line]
            assert len(warned) == 1 and "cannot run 'method:__call__'" in warned[0], result.stderr
            assert "signature:serving_default checked" in warned[0], result.stderr
        loaded = tf.saved_model.load(str(tmp_path / name)).signatures["serving_default"]
        assert np.isfinite(loaded(x=tf.constant(x), boxes=tf.constant(boxes))["output_0"].numpy()).all()
    for name, message in (("short", "check_inputs do not fit any entry"), ("text", "needs an .npz of arrays")):
        result = graphprune("finalize", f"--input={tmp_path / 'prunable'}", f"--output={tmp_path / (name + '_out')}",
                            f"--check_inputs={tmp_path / (name + '.npz')}", check=False)
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr
        assert not (tmp_path / (name + "_out")).exists()


def test_run_pass_list_and_registry(workspace):
    listing = graphprune("run", "--list").stdout
    for name in ("find_weights", "insert_masks", "insert_mask_updates", "fold_masks", "strip_unused",
                 "freeze_variables"):
        assert name in listing
    out = workspace / "run_out"
    result = graphprune("run", f"--input={workspace / 'model'}", f"--output={out}",
                        "--passes=find_weights insert_masks(final_sparsity=0.8) fold_masks strip_unused")
    assert "insert_masks: changed" in result.stdout
    report = json.loads(graphprune("inspect", f"--input={out}", "--json").stdout)
    assert all(w["sparsity"] == pytest.approx(0.8, abs=1.0 / w["elements"]) for w in report["weights"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["prune", "--input=X", "--output=Y", "--final_sparsity=1.5"], "final_sparsity"),
        (["prune", "--input=X", "--output=Y", "--final_sparsity=0.5", "--schedule=cubic"], "schedule"),
        (["prune", "--input=X", "--output=Y", "--final_sparsity=0.5", "--frequency=0"], "frequency"),
        (["prune", "--input=X", "--output=Y", "--final_sparsity=0.5", "--block_pooling=sum"], "block_pooling"),
        (["prune", "--input=X", "--output=Y"], "final_sparsity"),
        (["prune", "--output=Y", "--final_sparsity=0.5"], "input"),
        (["train", "--input=X", "--output=Y", "--data=Z", "--loss=hinge"], "loss"),
        (["finalize", "--input=X", "--output=Y", "--quantize=int4"], "quantize"),
        (["prune", "--input=X", "--output=Y", "--final_sparsity=0.5", "--bogus=1"], "bogus"),
    ],
)
def test_bad_flags_exit_2_with_one_line(args, message):
    result = graphprune(*args, check=False)
    assert result.returncode == 2
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr, result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["prune", "--input={root}/missing", "--output={root}/o1", "--final_sparsity=0.5", "--end_step=1"],
         "no such directory"),
        (["prune", "--input={root}/model", "--output={root}/o2", "--final_sparsity=0.5", "--end_step=1",
          "--block_size=3x"], "block_size"),
        (["prune", "--input={root}/model", "--output={root}/o3", "--final_sparsity=0.5", "--end_step=1",
          "--m_by_n=2:4"], "not a multiple of N=4"),
        (["prune", "--input={root}/model", "--output={root}/o4", "--final_sparsity=0.5", "--end_step=1",
          "--exclude=("], "regular expression"),
        (["prune", "--input={root}/model", "--output={root}/o5", "--final_sparsity=0.5"], "--end_step is required"),
        (["prune", "--input={root}/model", "--output={root}/model", "--final_sparsity=0.5", "--end_step=1"],
         "input"),
        (["train", "--input={root}/model", "--output={root}/o6", "--data={root}/train.npz"], "not a prunable"),
        (["train", "--input={root}/poly_prunable", "--output={root}/o7", "--data={root}/missing.npz"], "--data"),
        (["inspect", "--input={root}/nothing_here"], "no such"),
        (["run", "--input={root}/model", "--output={root}/o8", "--passes=find_weights frob"], "unknown pass"),
        (["frobnicate"], "unknown command"),
    ],
)
def test_bad_input_exit_2_and_nothing_written(workspace, args, message):
    before = _digest(str(workspace / "model"))
    result = graphprune(*[a.format(root=workspace) for a in args], check=False)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert _digest(str(workspace / "model")) == before
    for name in ("o1", "o2", "o3", "o4", "o5", "o6", "o7", "o8"):
        assert not (workspace / name).exists()
    assert not [p for p in os.listdir(workspace) if p.startswith(".")]


def test_existing_output_refused_without_overwrite(workspace):
    model, out = str(workspace / "model"), str(workspace / "exists")
    graphprune("prune", f"--input={model}", f"--output={out}", "--final_sparsity=0.5", "--end_step=2")
    stamp = _digest(out)
    result = graphprune("prune", f"--input={model}", f"--output={out}", "--final_sparsity=0.7", "--end_step=2",
                        check=False)
    assert result.returncode == 2 and "--overwrite" in result.stderr
    assert _digest(out) == stamp
    graphprune("prune", f"--input={model}", f"--output={out}", "--final_sparsity=0.7", "--end_step=2",
               "--overwrite")
    assert _digest(out) != stamp


def test_overwrite_verify_and_verbose_on_every_writing_command(workspace):
    model, trained = str(workspace / "model"), str(workspace / "poly_trained")
    if not os.path.isdir(trained):
        pytest.skip("needs test_prune_train_finalize_inspect_reaches_target")
    commands = {
        "train": ["train", f"--input={workspace / 'poly_prunable'}", f"--data={workspace / 'train.npz'}"],
        "finalize": ["finalize", f"--input={trained}"],
        "run": ["run", f"--input={model}", "--passes=find_weights insert_masks(sparsity=0.5)"],
    }
    for name, args in commands.items():
        out = workspace / f"again_{name}"
        graphprune(*args, f"--output={out}")
        refused = graphprune(*args, f"--output={out}", check=False)
        assert refused.returncode == 2 and "--overwrite" in refused.stderr
        graphprune(*args, f"--output={out}", "--overwrite")
    verified = graphprune("run", f"--input={model}", f"--output={workspace / 'run_verified'}", "--verify",
                          "--passes=find_weights insert_masks strip_unused")
    assert "insert_masks: changed" in verified.stdout
    pruned = graphprune("prune", f"--input={model}", f"--output={workspace / 'pruned_verified'}",
                        "--final_sparsity=0.5", "--one_shot", "--verify")
    assert "max |diff| = 0" in pruned.stdout
    verbose = graphprune("prune", f"--input={workspace / 'missing'}", f"--output={workspace / 'o_verbose'}",
                         "--final_sparsity=0.5", "--one_shot", "--verbose", check=False)
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr and "no such directory" in verbose.stderr


@pytest.mark.slow
def test_demo_runs_on_the_shipped_sample(tmp_path):
    result = graphprune("demo", f"--data_dir={tmp_path / 'no_data_here'}", f"--output_dir={tmp_path / 'demo'}",
                        "--train_steps=3", "--finetune_steps=5", "--batch_size=8", "--final_sparsity=0.8",
                        "--eval_examples=20")
    assert "fashion_mnist_sample.npz" in result.stdout
    assert "sparsity 0.8000" in result.stdout
    for label in ("dense .tflite float", "pruned .tflite float, sparse encoding", "pruned .tflite full int8",
                  "lower bound, float32 values + mask"):
        assert label in result.stdout
    refused = graphprune("demo", f"--output_dir={tmp_path / 'demo'}", check=False)
    assert refused.returncode == 2 and "already holds" in refused.stderr


def test_flagfile(workspace):
    flagfile = workspace / "flags.txt"
    flagfile.write_text(f"--input={workspace / 'model'}\n--output={workspace / 'from_flagfile'}\n"
                        "--final_sparsity=0.6\n--one_shot\n")
    graphprune("prune", f"--flagfile={flagfile}")
    report = json.loads(graphprune("inspect", f"--input={workspace / 'from_flagfile'}", "--json").stdout)
    assert report["totals"]["sparsity"] == pytest.approx(0.6, abs=0.01)


def test_usage_lists_commands():
    result = graphprune("--help")
    for command in ("prune", "train", "finalize", "inspect", "run", "demo"):
        assert command in result.stdout
