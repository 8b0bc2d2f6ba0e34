import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import testmodels  # noqa: E402


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
