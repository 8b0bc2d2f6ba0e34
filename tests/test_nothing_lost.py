"""Nothing lost, nothing silently wrong (issue #13): dangerous outputs, publishing races,
interrupted overwrites, permissions, state variables, assets and tables, non-finite weights."""

import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
import tensorflow as tf

import graphprune
import graphprune.io as gio
import testmodels
from test_cli import graphprune as cli


def _digest(path):
    return testmodels.directory_digest(path)


def _one_error_line(result, code=2):
    """The single stderr line of a refusal (train's progress lines and warnings aside)."""
    lines = [line for line in result.stderr.strip().splitlines()
             if line.strip() and not line.startswith("step ") and ": warning: " not in line]
    assert result.returncode == code, result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def _dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# dangerous output paths ----------------------------------------------------------------------


def test_blank_output_with_overwrite_deletes_nothing(tmp_path, mlp_saved_model):
    work = tmp_path / "work"
    work.mkdir()
    (work / "precious.txt").write_text("user data")
    before = _digest(str(work))
    for blank in ("", "   "):
        result = subprocess.run(
            [shutil.which("graphprune") or "graphprune", "prune", f"--input={mlp_saved_model}", f"--output={blank}",
             "--overwrite", "--final_sparsity=0.5", "--one_shot"],
            cwd=work, capture_output=True, text=True, timeout=300)
        assert "output path is empty" in _one_error_line(result)
    assert _digest(str(work)) == before and sorted(os.listdir(work)) == ["precious.txt"]


@pytest.mark.parametrize("where", ["", " ", ".", "/", "~", "cwd_parent", "input_parent", "input"])
def test_dangerous_outputs_are_refused(tmp_path, monkeypatch, mlp_saved_model, where):
    work = tmp_path / "work" / "deeper"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    path = {"cwd_parent": str(tmp_path / "work"), "input_parent": os.path.dirname(mlp_saved_model),
            "input": mlp_saved_model, "~": os.path.expanduser("~")}.get(where, where)
    pm = graphprune.prune(mlp_saved_model, schedule=graphprune.ConstantSparsity(0.5, 0))
    before = _digest(str(tmp_path))
    with pytest.raises(graphprune.OutputExistsError) as error:
        graphprune.save(pm, path, overwrite=True, inputs=[mlp_saved_model])
    assert isinstance(error.value, ValueError)
    assert _digest(str(tmp_path)) == before


def test_outputs_under_a_file_or_a_dangling_link_are_one_line(tmp_path, mlp_saved_model):
    (tmp_path / "a_file").write_text("x")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    for output, message in ((tmp_path / "a_file" / "out", "is a file"),
                            (tmp_path / "dangling" / "out", "dangling symbolic link"),
                            (tmp_path / "dangling", "dangling symbolic link")):
        result = cli("prune", f"--input={mlp_saved_model}", f"--output={output}", "--final_sparsity=0.5",
                     "--one_shot", "--overwrite", check=False)
        assert message in _one_error_line(result)
    assert (tmp_path / "a_file").read_text() == "x" and os.path.islink(tmp_path / "dangling")


def test_finalize_outputs_that_collide_or_nest_are_refused_before_work(tmp_path, mlp_saved_model):
    prunable = str(tmp_path / "prunable")
    cli("prune", f"--input={mlp_saved_model}", f"--output={prunable}", "--final_sparsity=0.5", "--one_shot")
    final = tmp_path / "final"
    cli("finalize", f"--input={prunable}", f"--output={final}")
    before = _digest(str(final))
    for tflite in (final, final / "model.tflite"):
        result = cli("finalize", f"--input={prunable}", f"--output={final}", f"--tflite={tflite}", "--overwrite",
                     check=False)
        assert "give each output its own path" in _one_error_line(result)
        assert os.path.isdir(final) and _digest(str(final)) == before


# publishing races ----------------------------------------------------------------------------


def test_a_directory_that_appears_while_working_is_kept_and_so_is_the_result(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(graphprune.OutputExistsError, match="appeared while graphprune was working") as error:
        with gio.atomic_directory(target) as temp:
            (open(os.path.join(temp, "ours.txt"), "w")).write("ours")
            target.mkdir()
            (target / "theirs.txt").write_text("theirs")
    assert sorted(os.listdir(target)) == ["theirs.txt"]
    kept = str(error.value).split("kept at ")[1].split(" (")[0]
    assert open(os.path.join(kept, "ours.txt")).read() == "ours"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_a_file_that_appears_while_working_is_kept(tmp_path):
    target = tmp_path / "model.tflite"
    with pytest.raises(graphprune.OutputExistsError, match="kept at"):
        with gio.atomic_file(target) as temp:
            open(temp, "w").write("ours")
            target.write_text("theirs")
    assert target.read_text() == "theirs"


def test_overwrite_replaces_what_appeared(tmp_path):
    target = tmp_path / "out"
    with gio.atomic_directory(target, overwrite=True) as temp:
        open(os.path.join(temp, "ours.txt"), "w").write("ours")
        target.mkdir()
        (target / "theirs.txt").write_text("theirs")
    assert sorted(os.listdir(target)) == ["ours.txt"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


@pytest.mark.parametrize("use_renameat2", [True, False])
def test_exclusive_rename_with_and_without_renameat2(tmp_path, monkeypatch, use_renameat2):
    if not use_renameat2:
        monkeypatch.setattr(gio, "_RENAMEAT2", None)
    for is_dir in (True, False):
        source, target = tmp_path / f"source{is_dir}", tmp_path / f"target{is_dir}"
        if is_dir:
            source.mkdir()
            target.mkdir()
            (target / "x").write_text("theirs")
        else:
            source.write_text("ours")
            target.write_text("theirs")
        assert gio.rename_noreplace(str(source), str(target), is_dir=is_dir) is False
        assert source.exists()
        shutil.rmtree(target) if is_dir else target.unlink()
        assert gio.rename_noreplace(str(source), str(target), is_dir=is_dir) is True
        assert target.exists() and not source.exists()


@pytest.mark.slow
def test_two_concurrent_writers_to_one_output(tmp_path, mlp_saved_model):
    out = tmp_path / "out"
    results = [None, None]

    def run(slot, sparsity):
        results[slot] = cli("prune", f"--input={mlp_saved_model}", f"--output={out}", f"--final_sparsity={sparsity}",
                            "--one_shot", check=False)

    threads = [threading.Thread(target=run, args=(i, s)) for i, s in enumerate((0.5, 0.75))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    codes = sorted(r.returncode for r in results)
    assert codes == [0, 2], [r.stderr for r in results]
    loser = next(r for r in results if r.returncode == 2)
    line = _one_error_line(loser)
    assert "exists" in line or "kept at" in line
    winner_sparsity = 0.5 if results[0].returncode == 0 else 0.75
    report = graphprune.size_report(str(out))
    assert report.sparsity == pytest.approx(winner_sparsity, abs=0.02)  # one run's output, whole
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


# interrupted overwrites ----------------------------------------------------------------------


def test_a_crash_between_the_two_renames_is_repaired_by_the_next_run(tmp_path, capsys):
    target = tmp_path / "out"
    old = tmp_path / f".out.old-{_dead_pid()}-abc"
    old.mkdir()
    (old / "saved.txt").write_text("the user's output")
    messages = gio.recover_stale(str(target))  # the new output never arrived: restore the old one
    assert (target / "saved.txt").read_text() == "the user's output" and not old.exists()
    assert "restored" in messages[0] and "restored" in capsys.readouterr().err
    old.mkdir()
    (old / "saved.txt").write_text("stale")
    messages = gio.recover_stale(str(target))  # the new output is complete: the leftover goes
    assert (target / "saved.txt").read_text() == "the user's output" and not old.exists()
    assert "removed" in messages[0] and "removed" in capsys.readouterr().err


def test_the_next_command_says_what_it_repaired(tmp_path, mlp_saved_model):
    out = tmp_path / "out"
    old = tmp_path / f".out.old-{_dead_pid()}-xyz"
    shutil.copytree(mlp_saved_model, old)
    result = cli("prune", f"--input={mlp_saved_model}", f"--output={out}", "--final_sparsity=0.5", "--one_shot",
                 check=False)
    assert "restored" in result.stderr and os.path.isdir(out)
    assert _digest(str(out)) == _digest(mlp_saved_model)  # the old output is back, nothing replaced it
    assert result.returncode == 2 and "exists" in result.stderr


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_outputs_get_the_permissions_the_umask_gives(tmp_path, umask):
    previous = os.umask(umask)
    try:
        with gio.atomic_directory(tmp_path / "dir") as temp:
            open(os.path.join(temp, "f"), "w").write("x")
        with gio.atomic_file(tmp_path / "file") as temp:
            open(temp, "w").write("x")
    finally:
        os.umask(previous)
    assert os.stat(tmp_path / "dir").st_mode & 0o777 == 0o777 & ~umask
    assert os.stat(tmp_path / "file").st_mode & 0o777 == 0o666 & ~umask


def test_a_saved_model_output_is_readable_by_others_under_umask_022(tmp_path, mlp):
    previous = os.umask(0o022)
    try:
        pm = graphprune.prune(mlp, schedule=graphprune.ConstantSparsity(0.5, 0))
        out = graphprune.save(pm, str(tmp_path / "out"))
    finally:
        os.umask(previous)
    assert os.stat(out).st_mode & 0o777 == 0o755
    assert os.stat(os.path.join(out, "saved_model.pb")).st_mode & 0o777 == 0o644


# a full disk ---------------------------------------------------------------------------------


@pytest.fixture
def tiny_filesystem(tmp_path):
    mount = tmp_path / "tiny"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({result.stderr.decode().strip()[:80]})")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.parametrize("command", ["prune", "finalize", "train"])
def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, tiny_filesystem, command):
    model = testmodels.CNN()
    source = str(tmp_path / "model")
    tf.saved_model.save(model, source, signatures={"serving_default": model.__call__})
    prunable = str(tmp_path / "prunable")
    cli("prune", f"--input={source}", f"--output={prunable}", "--final_sparsity=0.5", "--one_shot")
    rng = np.random.RandomState(0)
    np.savez(tmp_path / "data.npz", x=rng.standard_normal([8, 8, 8, 3]).astype(np.float32),
             y=rng.randint(0, 10, 8).astype(np.int32))
    out = tiny_filesystem / "out"
    args = {"prune": ["prune", f"--input={source}", "--final_sparsity=0.5", "--one_shot"],
            "finalize": ["finalize", f"--input={prunable}"],
            "train": ["train", f"--input={prunable}", f"--data={tmp_path / 'data.npz'}"]}[command]
    result = cli(*args, f"--output={out}", check=False)
    assert "No space left on device" in _one_error_line(result)
    assert os.listdir(tiny_filesystem) == []


def test_a_read_only_filesystem_is_one_line(tmp_path, mlp_saved_model):
    mount = tmp_path / "readonly"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here ({result.stderr.decode().strip()[:80]})")
    try:
        result = cli("prune", f"--input={mlp_saved_model}", f"--output={mount / 'out'}", "--final_sparsity=0.5",
                     "--one_shot", check=False)
        line = _one_error_line(result)
        assert "Read-only file system" in line or "no permission to write" in line, line
    finally:
        subprocess.run(["umount", str(mount)], check=False)


# silently wrong results ----------------------------------------------------------------------


class Stateful(tf.Module):
    """A forward pass that writes variables: a call counter and a running mean."""

    def __init__(self):
        super().__init__()
        self.w = tf.Variable(np.random.RandomState(0).randn(8, 4).astype(np.float32), name="dense/kernel")
        self.count = tf.Variable(0.0, name="count")
        self.mean = tf.Variable(tf.zeros([8]), name="running_mean")

    @tf.function(input_signature=[tf.TensorSpec([None, 8], tf.float32)])
    def __call__(self, x):
        self.count.assign_add(1.0)
        self.mean.assign(0.9 * self.mean + 0.1 * tf.reduce_mean(x, 0))
        return tf.matmul(x - self.mean, self.w) * self.count


@pytest.mark.parametrize("freeze", [True, "all"])
def test_variables_written_in_the_forward_pass_are_never_frozen(tmp_path, freeze):
    tf.saved_model.save(Stateful(), str(tmp_path / "m"))
    pm = graphprune.prune(str(tmp_path / "m"), schedule=graphprune.ConstantSparsity(0.5, 0), one_shot=True)
    final = tf.saved_model.load(graphprune.finalize(pm, str(tmp_path / "f"), freeze=freeze))
    x = np.random.RandomState(1).randn(3, 8).astype(np.float32)
    for _ in range(3):  # both models advance their state identically, call after call
        np.testing.assert_allclose(final(x).numpy(), pm(x).numpy(), rtol=1e-6)
    frozen = {n.op for n in pm.traced.entry("__call__").graph_def.node}
    assert "AssignAddVariableOp" in frozen


class Vocabulary(tf.Module):
    """A vocabulary file (an Asset) behind a StaticHashTable, an embedding and a Dense kernel."""

    def __init__(self, vocab_path):
        super().__init__()
        self.vocab = tf.saved_model.Asset(vocab_path)
        initializer = tf.lookup.TextFileInitializer(self.vocab, tf.string, tf.lookup.TextFileIndex.WHOLE_LINE,
                                                    tf.int64, tf.lookup.TextFileIndex.LINE_NUMBER)
        self.table = tf.lookup.StaticHashTable(initializer, -1)
        rng = np.random.RandomState(0)
        self.embedding = tf.Variable(rng.randn(5, 8).astype(np.float32), name="embedding")
        self.kernel = tf.Variable(rng.randn(8, 4).astype(np.float32), name="dense/kernel")

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def __call__(self, words):
        return tf.matmul(tf.gather(self.embedding, self.table.lookup(words) + 1), self.kernel)

    @tf.function(input_signature=[])
    def vocabulary_text(self):
        return tf.io.read_file(self.vocab.asset_path)


def test_tables_and_assets_survive_prune_save_finalize_and_a_move(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("red\ngreen\nblue\n")
    tf.saved_model.save(Vocabulary(str(vocab)), str(tmp_path / "m"))
    vocab.unlink()  # the model's own copy is what counts
    words = tf.constant(["blue", "red", "unknown"])
    expected_text = b"red\ngreen\nblue\n"
    pm = graphprune.prune(str(tmp_path / "m"), schedule=graphprune.ConstantSparsity(0.5, 0), one_shot=True)
    masked = pm(words).numpy()
    graphprune.save(pm, str(tmp_path / "p"))
    graphprune.finalize(str(tmp_path / "p"), str(tmp_path / "f"))
    for name in ("p", "f"):
        shutil.move(tmp_path / name, tmp_path / f"moved_{name}")
        moved = tmp_path / f"moved_{name}"
        assert os.listdir(moved / "assets") == ["vocab.txt"]
        loaded = tf.saved_model.load(str(moved))
        np.testing.assert_allclose(loaded(words).numpy(), masked, rtol=1e-6)
        assert loaded.vocabulary_text().numpy() == expected_text


def test_a_keras_string_lookup_model_is_pruned_and_finalized(tmp_path):
    import keras

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("cat\ndog\nbird\n")
    words = keras.Input(shape=(), dtype="string")
    ids = keras.layers.StringLookup(vocabulary=str(vocab))(words)
    hidden = keras.layers.Embedding(5, 8)(ids)
    model = keras.Model(words, keras.layers.Dense(3)(hidden))
    model.export(str(tmp_path / "export"), verbose=False)
    vocab.unlink()
    x = tf.constant(["dog", "fish", "cat"])
    original = tf.saved_model.load(str(tmp_path / "export"))
    reference = original.serve(x).numpy()
    pm = graphprune.prune(str(tmp_path / "export"), schedule=graphprune.ConstantSparsity(0.5, 0))
    np.testing.assert_allclose(pm.serve(x).numpy(), reference, rtol=1e-6)
    pm.prune_now()
    final = tf.saved_model.load(graphprune.finalize(pm, str(tmp_path / "final")))
    np.testing.assert_allclose(final.serve(x).numpy(), pm.serve(x).numpy(), rtol=1e-6)


def test_non_finite_weights_are_refused_at_one_shot_and_at_a_mask_update():
    weight = tf.Variable(np.random.RandomState(0).randn(8, 4).astype(np.float32), name="dense/kernel")

    @tf.function(input_signature=[tf.TensorSpec([None, 8], tf.float32)])
    def f(x):
        return tf.matmul(x, weight)

    pm = graphprune.prune(f, schedule=graphprune.ConstantSparsity(0.5, 0, frequency=1))
    weight.assign(tf.where(tf.range(32)[:, None] % 7 == 0, np.nan, tf.reshape(weight, [32, 1]))[:, 0:1]
                  .numpy().reshape(8, 4))
    with pytest.raises(graphprune.GraphPruneError, match=r"dense/kernel.*NaN/Inf.*diverged"):
        pm.prune_now()
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"dense/kernel.*NaN or Inf.*step\W+1\b"):
        pm.update_masks()
    assert np.all(pm.masks[0].numpy() == 1)  # the meaningless mask was never written


def test_train_refuses_non_finite_data_and_stops_on_divergence(tmp_path):
    model = testmodels.CNN()
    source = str(tmp_path / "model")
    tf.saved_model.save(model, source, signatures={"serving_default": model.__call__})
    prunable = str(tmp_path / "prunable")
    cli("prune", f"--input={source}", f"--output={prunable}", "--final_sparsity=0.8", "--end_step=4",
        "--frequency=1")
    rng = np.random.RandomState(0)
    x = rng.standard_normal([16, 8, 8, 3]).astype(np.float32)
    y = rng.randint(0, 10, 16).astype(np.int32)
    np.savez(tmp_path / "nan.npz", x=np.where(x > 1.5, np.nan, x), y=y)
    np.savez(tmp_path / "huge.npz", x=x * 1e30, y=y)
    line = _one_error_line(cli("train", f"--input={prunable}", f"--output={tmp_path / 'o1'}",
                               f"--data={tmp_path / 'nan.npz'}", check=False))
    assert "NaN/Inf" in line and "'x'" in line
    line = _one_error_line(cli("train", f"--input={prunable}", f"--output={tmp_path / 'o2'}",
                               f"--data={tmp_path / 'huge.npz'}", "--optimizer=sgd", "--learning_rate=1e30",
                               "--batch_size=4", check=False))
    assert "diverged" in line and ("step" in line)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_verify_treats_nan_as_equal_and_uses_inputs_in_the_valid_domain():
    weight = tf.Variable(np.abs(np.random.RandomState(0).randn(8, 4)).astype(np.float32), name="w")

    @tf.function(input_signature=[tf.TensorSpec([None, 8], tf.float32)])
    def f(x):
        return tf.math.log(tf.matmul(x, weight))  # NaN on normal inputs, finite on positive ones

    pm = graphprune.prune(f, schedule=graphprune.ConstantSparsity(0.5, 0), verify=True)
    differences = [d for _, _, _, d in pm._graphprune.verify_report]
    assert differences and all(np.isfinite(d) and d == 0 for d in differences)


def test_verify_fails_a_pass_that_drops_a_signature_or_an_output(mlp_saved_model):
    from graphprune import verify
    from graphprune.load import load
    from graphprune.pipeline import PassContext, PassResult, VariableValues, run_pipeline

    loaded = load(mlp_saved_model)
    values = VariableValues(loaded.variables)

    def drop_entry(model, context):
        return PassResult(model.__class__(entries=model.entries[:0], variables=model.variables), changed=True)

    def drop_output(model, context):
        import dataclasses

        entries = tuple(dataclasses.replace(e, outputs=e.outputs[:0], output_structure=()) for e in model.entries)
        return PassResult(dataclasses.replace(model, entries=entries), changed=True)

    for bad, message in ((drop_entry, "dropped"), (drop_output, "changed the outputs")):
        with pytest.raises(graphprune.PassError, match=message):
            run_pipeline(loaded.model, [(bad, {})], PassContext(values=values), check=False,
                         after_pass=verify.Verifier(values))
