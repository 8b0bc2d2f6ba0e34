"""TFLite refusals lead with the converter's real reason and say what to do (issues #15, #16)."""

import numpy as np
import pytest
import tensorflow as tf

import graphprune
from graphprune.finalization import converter_reason

MLIR_FAILURE = (
    "Could not translate MLIR to FlatBuffer. UNKNOWN: <unknown>:0: error: loc(callsite(callsite(fused[\"StridedSlice\", "
    "\"t5/strided_slice@__inference_serve_123\"] at fused[...]))): 'tf.StridedSlice' op is neither a custom op nor a "
    "flex op\n<unknown>:0: note: loc(fused[...]): called from\n<unknown>:0: error: failed while converting: 'main'"
)


def test_the_real_reason_leads_and_says_what_to_do():
    line = converter_reason(Exception(MLIR_FAILURE))
    assert line.startswith("'tf.StridedSlice' op is neither a custom op nor a flex op")
    assert "SELECT_TF_OPS" in line and "\n" not in line


@pytest.mark.parametrize("text, expected", [
    ("Flatbuffer size exceeds 2GB limit", "2 GB flatbuffer limit"),
    ("error: TensorList shapes must be static", "batch_size=1"),
    ("something odd\nerror: the op is broken", "the op is broken"),
    ("", "Exception"),
])
def test_other_converter_failures_are_one_line(text, expected):
    line = converter_reason(Exception(text))
    assert expected in line and "\n" not in line


def test_a_failing_conversion_is_a_graphprune_error(tmp_path):
    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
    def unsupported(x):
        return tf.strings.length(tf.strings.as_string(x))  # string ops: no TFLite builtin

    module = tf.Module()
    module.f = unsupported
    tf.saved_model.save(module, str(tmp_path / "m"), signatures={"serving_default": unsupported})
    with pytest.raises(graphprune.GraphPruneError, match="TFLite conversion failed") as error:
        graphprune.export_tflite(str(tmp_path / "m"), str(tmp_path / "m.tflite"))
    assert "\n" not in str(error.value) and not (tmp_path / "m.tflite").exists()
    assert np.all([not p.name.startswith(".") for p in tmp_path.iterdir()])
