import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import testmodels  # noqa: E402

# Two logical CPUs, so MirroredStrategy has two replicas; must happen before TF initialises.
try:
    _cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
except RuntimeError:
    pass


@pytest.fixture(scope="session")
def mirrored():
    """One MirroredStrategy over the two logical CPUs for every test that needs one: a second
    strategy in the same process starts its collective keys where the first did, and the two
    tests' all-reduces then collide ('Shape mismatch in the collective instance')."""
    devices = tf.config.list_logical_devices("CPU")
    assert len(devices) >= 2, "two logical CPUs are configured above"
    return tf.distribute.MirroredStrategy([d.name for d in devices[:2]])


@pytest.fixture
def mlp():
    return testmodels.MLP()


@pytest.fixture
def cnn():
    return testmodels.CNN()


@pytest.fixture
def mlp_saved_model(tmp_path, mlp):
    path = str(tmp_path / "mlp_saved_model")
    tf.saved_model.save(mlp, path, signatures={"serving_default": mlp.__call__})
    return path


@pytest.fixture
def keras_saved_model(tmp_path):
    return testmodels.keras_functional_export(str(tmp_path / "keras_export"))


@pytest.fixture
def rng():
    return np.random.RandomState(0)


def pytest_terminal_summary(terminalreporter):
    """Report how many property-based cases ran and how they ended (issue #8)."""
    import sys

    module = sys.modules.get("test_properties")
    if module is not None and module.OUTCOMES:
        terminalreporter.write_line(
            "property-based cases: " + ", ".join(f"{k} {v}" for k, v in sorted(module.OUTCOMES.items()))
        )
