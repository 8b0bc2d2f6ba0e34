"""Every refusal is one line (issue #13): values refused not wrapped, CLI failures, Ctrl-C, and the
newcomer's path (--help, flag names in errors, sparse checkpoints, TFLite variants, progress)."""

import json
import os
import random
import signal
import subprocess
import time

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import graphprune
import testmodels
from test_cli import ENV
from test_cli import graphprune as cli
from test_nothing_lost import _one_error_line


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("refusals")
    model = testmodels.CNN()
    tf.saved_model.save(model, str(root / "model"), signatures={"serving_default": model.__call__})
    cli("prune", f"--input={root / 'model'}", f"--output={root / 'prunable'}", "--final_sparsity=0.8",
        "--end_step=6", "--frequency=2")
    cli("prune", f"--input={root / 'model'}", f"--output={root / 'oneshot'}", "--final_sparsity=0.7", "--one_shot")
    cli("finalize", f"--input={root / 'oneshot'}", f"--output={root / 'final'}")
    rng = np.random.RandomState(0)
    x = rng.standard_normal([24, 8, 8, 3]).astype(np.float32)
    y = rng.randint(0, 10, 24).astype(np.int32)
    np.savez(root / "train.npz", x=x, y=y)
    bad = {
        "shape": dict(x=x[:, :4], y=y), "uint8": dict(x=(x * 10).astype(np.uint8), y=y),
        "scalar": dict(x=np.float32(1), y=np.int32(1)), "labels": dict(x=x, y=y + 10),
        "mse_int": dict(x=x, y=y), "rows": dict(x=x, y=y[:5]), "float_labels": dict(x=x, y=y.astype(np.float32)),
    }
    for name, arrays in bad.items():
        np.savez(root / f"{name}.npz", **arrays)
    (root / "garbage.npz").write_bytes(b"not a zip at all")
    return root


# values refused, not wrapped or truncated ----------------------------------------------------


def _weight():
    return np.random.RandomState(0).randn(8, 4).astype(np.float32)


@pytest.mark.parametrize("make, error, message", [
    (lambda: graphprune.PolynomialDecay(0.0, 0.5, 0, 10, power=-1), graphprune.ScheduleError, "power"),
    (lambda: graphprune.PolynomialDecay(0.0, 0.5, 0, 10, power=float("nan")), graphprune.ScheduleError, "power"),
    (lambda: graphprune.PolynomialDecay(0.0, 0.5, 0, 10, power="3"), graphprune.ScheduleError, "power"),
    (lambda: graphprune.ConstantSparsity(0.5, 2**63), graphprune.ScheduleError, "int64"),
    (lambda: graphprune.ConstantSparsity(0.5, 2**64), graphprune.ScheduleError, "int64"),
    (lambda: graphprune.ConstantSparsity(0.5, 0, 2**64), graphprune.ScheduleError, "int64"),
    (lambda: graphprune.ConstantSparsity(0.5, 0, frequency=2**64), graphprune.ScheduleError, "int64"),
    (lambda: graphprune.ConstantSparsity(0.5, True), graphprune.ScheduleError, "integer"),
    (lambda: graphprune.ConstantSparsity(0.5, 1.5), graphprune.ScheduleError, "integer"),
    (lambda: graphprune.Structure(block_size=(1.5, 2)), graphprune.StructureError, "whole numbers"),
    (lambda: graphprune.Structure(m_by_n=(2.7, 4)), graphprune.StructureError, "whole numbers"),
    (lambda: graphprune.Structure(block_size="0x2"), graphprune.StructureError, "block_size"),
    (lambda: graphprune.magnitude_mask(_weight(), float("nan")), graphprune.ScheduleError, "sparsity"),
    (lambda: graphprune.magnitude_mask(_weight(), 0.5, block_size=(1.5, 2)), graphprune.StructureError, "whole"),
    (lambda: graphprune.magnitude_mask(np.ones(8, np.float32), 0.5, m_by_n=(2, 4)), graphprune.StructureError,
     "rank >= 2"),
    (lambda: graphprune.Rule(None), graphprune.ScheduleError, "pattern"),
    (lambda: graphprune.Rule("dense", sparsity=1.5), graphprune.ScheduleError, "sparsity"),
    (lambda: graphprune.Rule("dense", skip="yes"), graphprune.ScheduleError, "skip"),
    (lambda: graphprune.PruningConfig(graphprune.ConstantSparsity(0.5, 0), rules=["dense"]),
     graphprune.ScheduleError, "Rule"),
    (lambda: graphprune.PruningConfig(graphprune.ConstantSparsity(0.5, 0), rules="dense"),
     graphprune.ScheduleError, "list"),
])
def test_bad_values_are_refused_as_value_errors(make, error, message):
    with pytest.raises(error, match=message) as raised:
        make()
    assert isinstance(raised.value, ValueError) and isinstance(raised.value, graphprune.GraphPruneError)


def test_rules_list_of_strings_through_prune(mlp):
    with pytest.raises(graphprune.ScheduleError, match="graphprune.Rule"):
        graphprune.prune(mlp, schedule=graphprune.ConstantSparsity(0.5, 0), rules=["dense"])


def test_a_pattern_that_matches_no_weight_lists_the_weights(mlp):
    for kwargs in ({"exclude": "dense_9"}, {"rules": [graphprune.Rule("conv", sparsity=0.5)]}):
        with pytest.raises(graphprune.ScheduleError, match=r"matches no weight.*dense/kernel, dense_1/kernel"):
            graphprune.prune(mlp, schedule=graphprune.ConstantSparsity(0.5, 0), **kwargs)


@pytest.mark.parametrize("passes, message", [
    ("find_weights insert_masks(block_size=0x2)", "block_size"),
    ("find_weights insert_masks fold_masks(freeze=maybe)", "freeze='maybe' must be bool"),
    ("find_weights insert_masks fold_masks(freeze=1)", "must be bool"),
    ("find_weights insert_masks(frobnicate=1)", "no option 'frobnicate'"),
    ("find_weights(include_gather=2)", "must be bool"),
])
def test_pass_options_are_typed(models, tmp_path, passes, message):
    result = cli("run", f"--input={models / 'model'}", f"--output={tmp_path / 'out'}", f"--passes={passes}",
                 check=False)
    assert message in _one_error_line(result)
    assert not (tmp_path / "out").exists()


def test_pass_values_are_not_evaluated():
    from graphprune.pipeline import parse_value

    assert [parse_value(v) for v in ("0x2", "1e3", "True", "'a b'", "-3", "[1]")] == ["0x2", 1000.0, True, "a b", -3,
                                                                                   "[1]"]


# every CLI failure is one line ---------------------------------------------------------------


@pytest.mark.parametrize("data, loss, message", [
    ("shape", "softmax_cross_entropy", "shape (24, 4, 8, 3); the model takes (N, 8, 8, 3)"),
    ("uint8", "softmax_cross_entropy", "dtype uint8; the model takes float32"),
    ("scalar", "softmax_cross_entropy", "'x' is a scalar"),
    ("labels", "softmax_cross_entropy", "labels from 10 to 19; the model has 10 classes"),
    ("mse_int", "mse", "--loss=mse takes float targets"),
    ("float_labels", "softmax_cross_entropy", "integer class labels"),
    ("rows", "softmax_cross_entropy", "they must match"),
    ("garbage", "softmax_cross_entropy", "cannot read it as .npz"),
])
def test_train_data_that_does_not_fit_is_one_line(models, tmp_path, data, loss, message):
    result = cli("train", f"--input={models / 'prunable'}", f"--output={tmp_path / 'out'}",
                 f"--data={models / (data + '.npz')}", f"--loss={loss}", check=False)
    assert message in _one_error_line(result)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [b"", b"TFL3" + os.urandom(200), os.urandom(3000)])
def test_inspect_garbage_tflite_is_one_line(tmp_path, content):
    path = tmp_path / "model.tflite"
    path.write_bytes(content)
    assert "not a readable .tflite" in _one_error_line(cli("inspect", f"--input={path}", check=False))


def test_inspect_an_npz_and_a_truncated_tflite(models, tmp_path):
    assert "zip archive" in _one_error_line(cli("inspect", f"--input={models / 'train.npz'}", check=False))
    cli("export", f"--input={models / 'final'}", f"--tflite={tmp_path / 'ok.tflite'}")
    data = (tmp_path / "ok.tflite").read_bytes()
    (tmp_path / "cut.tflite").write_bytes(data[: len(data) // 3])
    assert "not a readable" in _one_error_line(cli("inspect", f"--input={tmp_path / 'cut.tflite'}", check=False))


def test_tensorflow_chatter_stays_hidden_without_verbose(models, tmp_path):
    broken = tmp_path / "fingerprint"
    subprocess.run(["cp", "-r", str(models / "final"), str(broken)], check=True)
    # wire type 7 does not exist: never a valid FingerprintDef (random bytes parsed as one 31 times in 20,000)
    (broken / "fingerprint.pb").write_bytes(b"\xff" * 40)
    result = cli("inspect", f"--input={broken}")
    assert result.stderr.strip() == "", result.stderr
    loud = cli("inspect", f"--input={broken}", "--verbose")
    assert "ingerprint" in loud.stderr


@pytest.mark.parametrize("command", ["prune", "train", "finalize", "export", "inspect", "run", "demo"])
def test_every_command_has_help(command):
    result = cli(command, "--help")
    assert result.returncode == 0 and f"graphprune {command}" in result.stdout
    assert "--input" in result.stdout or command == "demo"
    assert "verbose" in result.stdout and "absl" not in result.stdout
    assert len(result.stdout.splitlines()) < 120


def test_sparsity_for_errors_name_the_flag(models, tmp_path):
    result = cli("prune", f"--input={models / 'model'}", f"--output={tmp_path / 'o'}", "--final_sparsity=0.5",
                 "--one_shot", "--sparsity_for=dense=1.2", check=False)
    line = _one_error_line(result)
    assert "--sparsity_for" in line and "final_sparsity" not in line
    result = cli("prune", f"--input={models / 'model'}", f"--output={tmp_path / 'o'}", "--final_sparsity=0.5",
                 "--one_shot", "--exclude=dense_typo", check=False)
    assert "matches no weight; the weights are: conv2d/kernel" in _one_error_line(result)


def test_finalize_of_a_model_with_nothing_pruned_says_so(models, tmp_path):
    result = cli("finalize", f"--input={models / 'prunable'}", f"--output={tmp_path / 'f1'}")
    assert "warning: finalize: nothing is pruned yet" in result.stderr
    result = cli("finalize", f"--input={models / 'model'}", f"--output={tmp_path / 'f2'}")
    assert "warning: finalize: the model has no masks" in result.stderr
    assert "Traceback" not in result.stderr and "warnings.warn" not in result.stderr


# Ctrl-C and kill at any moment ---------------------------------------------------------------


def _command(models, tmp_path, name):
    out = tmp_path / "out"
    return out, {
        "prune": ["prune", f"--input={models / 'model'}", f"--output={out}", "--final_sparsity=0.5", "--one_shot"],
        "train": ["train", f"--input={models / 'prunable'}", f"--output={out}", f"--data={models / 'train.npz'}",
                  "--epochs=3", "--batch_size=4"],
        "finalize": ["finalize", f"--input={models / 'oneshot'}", f"--output={out}",
                     f"--tflite={tmp_path / 'out.tflite'}"],
    }[name]


def test_a_ctrl_c_that_tensorflow_turns_into_another_error_reads_as_the_interrupt(capsys):
    """Seen in a full run: Ctrl-C inside TensorFlow's gradient tracing came out as 'RuntimeError:
    ... MISMATCH of original and normalized active exception types: ORIGINAL InvalidArgumentError
    REPLACED BY KeyboardInterrupt' and was reported as an internal error (exit 1)."""
    from graphprune.tools import common

    def main(argv):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        except KeyboardInterrupt:
            raise RuntimeError("pybind11::error_already_set: MISMATCH ... REPLACED BY KeyboardInterrupt") from None

    def bug(argv):
        raise RuntimeError("a bug")

    before = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(SystemExit) as plain:  # no Ctrl-C seen yet: an internal error
            common.run_main(bug)([])
        assert plain.value.code == 1 and "internal error" in capsys.readouterr().err
        common.record_interrupts()
        with pytest.raises(SystemExit) as interrupted:
            common.run_main(main)([])
        assert interrupted.value.code == 130
        # "nothing was written", or the outputs this process published before (earlier tests)
        assert capsys.readouterr().err.strip().endswith("error: " + common.interrupted_message())
    finally:
        signal.signal(signal.SIGINT, before)
        common._INTERRUPTED.clear()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["prune", "train", "finalize"])
def test_interrupts_at_random_moments_lose_nothing(models, tmp_path, name):
    import shutil

    executable = shutil.which("graphprune")
    inputs = {p: testmodels.directory_digest(str(models / p)) for p in ("model", "prunable", "oneshot")}
    rng = random.Random(hash(name) % 1000)
    for attempt, sig in enumerate([signal.SIGINT, signal.SIGINT, signal.SIGKILL, signal.SIGINT, signal.SIGKILL]):
        out, args = _command(models, tmp_path, name)
        process = subprocess.Popen([executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env=ENV)
        try:
            process.wait(timeout=rng.uniform(0.5, 9.0))
        except subprocess.TimeoutExpired:
            process.send_signal(sig)
        _, stderr = process.communicate(timeout=120)
        finished = process.returncode == 0
        if not finished and sig == signal.SIGINT:
            # a run after a SIGKILL first says which leftover partial output it removed
            lines = [line for line in stderr.strip().splitlines() if line.strip() and not line.startswith("step ")
                     and not (line.startswith("graphprune: removed ") and line.endswith("left by an interrupted run"))]
            assert process.returncode == 130 and len(lines) == 1, (attempt, process.returncode, stderr)
            if out.exists():
                assert lines[0].startswith(f"graphprune {name}: error: interrupted after writing {out}"), lines
            else:
                assert lines == [f"graphprune {name}: error: interrupted; nothing was written"], lines
        if finished:
            assert os.path.exists(out / "saved_model.pb")
        if out.exists():  # published before the signal landed: then whole
            tf.saved_model.load(str(out))
        for path, digest in inputs.items():
            assert testmodels.directory_digest(str(models / path)) == digest
        subprocess.run(["rm", "-rf", str(out), str(tmp_path / "out.tflite")], check=True)
    # whatever SIGKILL left behind, the next run repairs and finishes
    out, args = _command(models, tmp_path, name)
    cli(*args)
    assert os.path.exists(out / "saved_model.pb")
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


# the newcomer's path -------------------------------------------------------------------------


def test_train_with_adam_writes_exactly_the_masked_weights(models, tmp_path):
    cli("train", f"--input={models / 'prunable'}", f"--output={tmp_path / 'trained'}",
        f"--data={models / 'train.npz'}", "--optimizer=adam", "--batch_size=4", "--learning_rate=0.01")
    trained = tf.saved_model.load(str(tmp_path / "trained"))
    assert float(np.mean([np.mean(m.numpy() == 0) for m in trained.masks])) > 0.5
    for mask, weight in zip(trained.masks, trained.pruned_weights):
        stored = weight.numpy()
        np.testing.assert_array_equal(stored == 0, mask.numpy() == 0)
        assert not np.signbit(stored[mask.numpy() == 0]).any()  # +0.0


def test_graphprune_save_stores_exactly_the_masked_weights(mlp, tmp_path):
    pm = graphprune.prune(mlp, schedule=graphprune.ConstantSparsity(0.5, 0, frequency=1))
    pm.update_masks()
    for weight in pm.pruned_weights:  # what momentum does between mask updates
        weight.assign_add(tf.fill(weight.shape, 0.25))
    x = tf.constant(np.random.RandomState(0).randn(2, 8).astype(np.float32))
    before = pm(x).numpy()
    graphprune.save(pm, str(tmp_path / "saved"))
    loaded = tf.saved_model.load(str(tmp_path / "saved"))
    for mask, weight in zip(loaded.masks, loaded.pruned_weights):
        np.testing.assert_array_equal(weight.numpy() == 0, mask.numpy() == 0)
    np.testing.assert_allclose(loaded(x).numpy(), before, rtol=1e-6)


def test_tflite_variants_and_export_without_finalizing_again(models, tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    result = cli("finalize", f"--input={models / 'oneshot'}", f"--output={tmp_path / 'final'}",
                 "--tflite_variants=float,dynamic,sparse")
    names = sorted(p for p in os.listdir(tmp_path) if p.endswith(".tflite"))
    assert names == ["final.dynamic.tflite", "final.float.tflite", "final.sparse.tflite"], result.stdout
    np.savez(tmp_path / "rep.npz", x=np.random.RandomState(0).standard_normal([20, 8, 8, 3]).astype(np.float32))
    before = testmodels.directory_digest(str(tmp_path / "final"))
    cli("export", f"--input={tmp_path / 'final'}", f"--tflite={tmp_path / 'again.tflite'}",
        "--tflite_variants=int8,float", f"--representative_data={tmp_path / 'rep.npz'}")
    assert testmodels.directory_digest(str(tmp_path / "final")) == before
    x = np.random.RandomState(1).standard_normal([1, 8, 8, 3]).astype(np.float32)
    reference = tf.saved_model.load(str(tmp_path / "final")).signatures["serving_default"]
    expected = next(iter(reference(tf.constant(x)).values())).numpy()
    for name, atol in (("final.float.tflite", 1e-5), ("final.sparse.tflite", 1e-5), ("again.float.tflite", 1e-5),
                       ("final.dynamic.tflite", 0.2)):
        runner = Interpreter(model_path=str(tmp_path / name)).get_signature_runner("serving_default")
        got = next(iter(runner(**{next(iter(runner.get_input_details())): x}).values()))
        np.testing.assert_allclose(got, expected, atol=atol * max(1.0, float(np.abs(expected).max())))
    assert os.path.getsize(tmp_path / "again.int8.tflite") < os.path.getsize(tmp_path / "again.float.tflite")
    for args, message in ((["--tflite_variants=float,fp4"], "unknown variant 'fp4'"),
                          (["--tflite_variants=float", "--quantize=dynamic"], "drop --quantize"),
                          (["--tflite_variants=int8"], "--representative_data")):
        result = cli("export", f"--input={tmp_path / 'final'}", f"--tflite={tmp_path / 'x.tflite'}", *args,
                     check=False)
        assert message in _one_error_line(result)


def test_progress_lines_when_not_a_terminal_and_tensorboard_logs(models, tmp_path):
    result = cli("train", f"--input={models / 'prunable'}", f"--output={tmp_path / 'out'}",
                 f"--data={models / 'train.npz'}", "--batch_size=4", "--epochs=2", f"--log_dir={tmp_path / 'logs'}")
    lines = [line for line in result.stderr.splitlines() if line.startswith("step ")]
    assert len(lines) >= 2 and "\r" not in result.stderr and "[#" not in result.stderr
    assert lines[-1].startswith("step 12/12") and "sparsity 0.800" in lines[-1]
    events = [f for _, _, files in os.walk(tmp_path / "logs") for f in files if "tfevents" in f]
    assert events
    tags = set()
    for event in tf.compat.v1.train.summary_iterator(os.path.join(tmp_path / "logs", events[0])):
        tags |= {v.tag for v in event.summary.value}
    assert {"train/loss", "pruning/sparsity", "pruning/target_sparsity"} <= tags


def test_printing_a_size_report_prints_the_table(models):
    text = str(graphprune.size_report(str(models / "final")))
    assert text.splitlines()[0].startswith("saved_model:") and "conv2d/kernel" in text and "total" in text


def test_a_keras_export_stores_each_frozen_weight_once_under_its_name(tmp_path):
    import keras

    inputs = keras.Input((800,))
    outputs = keras.layers.Dense(10, name="head")(keras.layers.Dense(64, activation="relu", name="body")(inputs))
    keras.Model(inputs, outputs).export(str(tmp_path / "export"), verbose=False)
    pm = graphprune.prune(str(tmp_path / "export"), schedule=graphprune.ConstantSparsity(0.5, 0), one_shot=True)
    final = graphprune.finalize(pm, str(tmp_path / "final"))
    kernel_bytes = 800 * 64 * 4
    assert os.path.getsize(os.path.join(final, "saved_model.pb")) < 1.3 * kernel_bytes
    report = graphprune.size_report(final)
    assert sorted(w.name for w in report.weights) == ["body/kernel", "head/kernel"]
    assert "unknown" not in report.table()


@pytest.mark.slow
def test_the_demo_removes_its_temporary_files(tmp_path):
    env = dict(ENV, TMPDIR=str(tmp_path))
    import shutil

    result = subprocess.run([shutil.which("graphprune"), "demo", f"--data_dir={tmp_path / 'none'}",
                             "--train_steps=2", "--finetune_steps=3", "--batch_size=8", "--eval_examples=10"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "temporary files removed" in result.stdout
    assert [p for p in os.listdir(tmp_path) if p != "none"] == []


# property-based: anything either works or is one refusal -------------------------------------

_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 2**65), st.floats(allow_nan=True),
                    st.text(max_size=6), st.tuples(st.floats(-2, 6), st.integers(-1, 6)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sparsity=_VALUES, begin=_VALUES, frequency=_VALUES, power=_VALUES, block=_VALUES, m_by_n=_VALUES,
       pattern=_VALUES)
def test_api_values_work_or_raise_a_graphprune_error(mlp, sparsity, begin, frequency, power, block, m_by_n, pattern):
    try:
        schedule = graphprune.PolynomialDecay(0.0, sparsity, begin, 10**6, power=power, frequency=frequency)
        rules = [graphprune.Rule(pattern, sparsity=0.5)] if pattern is not None else []
        pm = graphprune.prune(mlp, schedule, block_size=block, m_by_n=m_by_n, rules=rules)
        pm.prune_now()
    except graphprune.GraphPruneError:
        pass


_FLAG_VALUES = st.sampled_from(["", "0", "-1", "1.5", "nan", "inf", "2x", "0x2", "1e400", "9223372036854775808",
                                "2:4", "1x2", "dense", "(", "0.5", "yes"])


@pytest.mark.slow
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flag=st.sampled_from(["final_sparsity", "begin_step", "end_step", "frequency", "power", "block_size",
                             "m_by_n", "exclude", "sparsity_for", "initial_sparsity"]), value=_FLAG_VALUES)
def test_cli_values_work_or_exit_2_with_one_line(models, tmp_path_factory, flag, value):
    out = tmp_path_factory.mktemp("property") / "out"
    args = {"final_sparsity": "0.5", "end_step": "10", flag: value}
    result = cli("prune", f"--input={models / 'model'}", f"--output={out}",
                 *[f"--{k}={v}" for k, v in args.items()], check=False)
    if result.returncode == 0:
        assert os.path.exists(out / "saved_model.pb")
    else:
        _one_error_line(result)
        assert not out.exists()


def test_report_json_after_variants(models):
    report = json.loads(cli("inspect", f"--input={models / 'final'}", "--json").stdout)
    assert report["totals"]["sparsity"] == pytest.approx(0.7, abs=0.01)
