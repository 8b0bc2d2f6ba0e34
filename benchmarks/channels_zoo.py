"""Channel pruning across public models nobody here wrote: every keras.applications family and
keras-hub backbones, pruned at 50% of each group's channels and shrunk.

    python benchmarks/channels_zoo.py [--only=Xception,phi3]      (about 22 minutes on 2 cores; --only
                                                                  measures those alone and replaces
                                                                  their rows in the saved results)

Each model is built from its config with random weights (keras.applications' batch norms
calibrated on 32 random images, as tests/test_zoo_applications.py does; keras-hub backbones at
one or two layers of width 16), exported, pruned one-shot with structure='channel' (L2 group
norms, kept counts rounded up to a multiple of 8 for the CNNs, none for the small transformers)
and finalized with shrink=True (finalize's defaults otherwise: batch norms folded). Each model
runs in a fresh process. Columns:

    diff           largest |masked - shrunk| over the largest |masked|, on random inputs (images of
                   the model's size; 2 x 8 tokens, 2 x 16 x 8 audio features)
    params, flops  the shrunk model's over the Keras export's (graphprune.cost; FLOPs where the
                   sizes are known: 0 when a sequence length is not)
    groups         prunable groups, and groups left whole (the residual stream, inputs and
                   outputs, and what graphprune does not model: channels.describe says why)
    litert         the shrunk model converted to TFLite and run under LiteRT, its largest
                   difference from the masked model over the output scale (keras.applications)

Results: benchmarks/results/channels_zoo.json; the table in benchmarks/README.md. The test suite
runs the same chain on the families it names (tests/test_channels.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "channels_zoo.json")

APPLICATIONS = [("ResNet50", 32), ("ResNet101", 32), ("ResNet50V2", 32), ("MobileNet", 32), ("MobileNetV2", 32),
                ("MobileNetV3Small", 32), ("MobileNetV3Large", 32), ("EfficientNetB0", 32), ("EfficientNetB3", 32),
                ("EfficientNetV2B0", 32), ("DenseNet121", 32), ("DenseNet169", 32), ("InceptionV3", 75),
                ("InceptionResNetV2", 75), ("Xception", 71), ("NASNetMobile", 32), ("VGG16", 32),
                ("ConvNeXtTiny", 32)]


def _hub_builders():
    import keras_hub

    models = keras_hub.models
    small = dict(vocabulary_size=50, num_layers=1, hidden_dim=16, intermediate_dim=32)
    text = dict(max_sequence_length=16, **small)
    return {
        "bert": lambda: models.BertBackbone(num_heads=2, **text),
        "distilbert": lambda: models.DistilBertBackbone(num_heads=2, **text),
        "xlmroberta": lambda: models.XLMRobertaBackbone(num_heads=2, **text),
        "electra": lambda: models.ElectraBackbone(vocab_size=50, num_layers=1, num_heads=2, hidden_dim=16,
                                                  embedding_dim=8, intermediate_dim=32, max_sequence_length=16),
        "fnet": lambda: models.FNetBackbone(**text),
        "opt": lambda: models.OPTBackbone(num_heads=2, **text),
        "gpt2": lambda: models.GPT2Backbone(num_heads=2, **text),
        "gptneox": lambda: models.GPTNeoXBackbone(num_heads=2, **text),
        "llama3": lambda: models.Llama3Backbone(num_query_heads=4, num_key_value_heads=2, **small),
        "mistral": lambda: models.MistralBackbone(num_query_heads=4, num_key_value_heads=2, **small),
        "phi3": lambda: models.Phi3Backbone(num_query_heads=4, num_key_value_heads=2, max_sequence_length=16,
                                            **small),
        "gemma3": lambda: models.Gemma3Backbone(image_size=16, num_query_heads=4, num_key_value_heads=2, head_dim=4,
                                                use_query_key_norm=True, **small),
        "qwen3": lambda: models.Qwen3Backbone(num_query_heads=4, num_key_value_heads=2, head_dim=4, **small),
        "qwenmoe": lambda: models.QwenMoeBackbone(num_query_heads=4, num_key_value_heads=2, moe_intermediate_dim=16,
                                                  shared_expert_intermediate_dim=16, num_experts=4, top_k=2, **small),
        "qwen3moe": lambda: models.Qwen3MoeBackbone(num_query_heads=4, num_key_value_heads=2, moe_intermediate_dim=16,
                                                    num_experts=4, top_k=2, head_dim=4, **small),
        "edrec": lambda: models.EdRecBackbone(vocab_size=50, num_layers_enc=1, num_layers_dec=1, hidden_dim=16,
                                              intermediate_dim=32, num_heads=2),
        "whisper": lambda: models.WhisperBackbone(num_heads=2, num_mels=8, max_encoder_sequence_length=32,
                                                  max_decoder_sequence_length=16, **small),
        "vit": lambda: models.ViTBackbone(image_shape=(32, 32, 3), patch_size=8, num_layers=1, num_heads=2,
                                          hidden_dim=16, mlp_dim=32),
        "deit": lambda: models.DeiTBackbone(image_shape=(32, 32, 3), patch_size=8, num_layers=1, num_heads=2,
                                            hidden_dim=16, intermediate_dim=32),
        "siglip": lambda: keras_hub.models.SigLIPVisionEncoder(patch_size=8, hidden_dim=16, num_layers=1, num_heads=2,
                                                               intermediate_dim=32, image_shape=(32, 32, 3)),
        "clip": lambda: models.CLIPBackbone(
            models.CLIPVisionEncoder(patch_size=8, hidden_dim=16, num_layers=1, num_heads=2, intermediate_dim=32,
                                     image_shape=(32, 32, 3)),
            models.CLIPTextEncoder(vocabulary_size=50, embedding_dim=16, hidden_dim=16, num_layers=1, num_heads=2,
                                   intermediate_dim=32, max_sequence_length=8), projection_dim=16),
        "metaclip2": lambda: models.MetaCLIP2Backbone(
            models.MetaCLIP2VisionEncoder(patch_size=8, hidden_dim=16, num_layers=1, num_heads=2, intermediate_dim=32,
                                          image_shape=(32, 32, 3)),
            models.MetaCLIP2TextEncoder(vocabulary_size=50, embedding_dim=16, hidden_dim=16, num_layers=1,
                                        num_heads=2, intermediate_dim=32, max_sequence_length=8), projection_dim=16),
        "paligemma": lambda: models.PaliGemmaBackbone(
            vocabulary_size=50, image_size=16, num_layers=1, num_query_heads=2, num_key_value_heads=1, hidden_dim=16,
            intermediate_dim=32, head_dim=8, vit_patch_size=8, vit_num_heads=2, vit_hidden_dim=16, vit_num_layers=1,
            vit_intermediate_dim=32),
        "gemma4": lambda: models.Gemma4Backbone(vocabulary_size=50, image_size=16, num_layers=2, num_query_heads=4,
                                                num_key_value_heads=2, hidden_dim=16, intermediate_dim=32, head_dim=4,
                                                sliding_window_size=8, sliding_window_pattern=2),
        "smollm3": lambda: models.SmolLM3Backbone(
            vocabulary_size=50, hidden_dim=16, intermediate_dim=32, num_layers=2, num_attention_heads=4,
            num_key_value_heads=2, attention_bias=False, attention_dropout=0.0, rope_layer_enabled_list=[True, False],
            layer_types=["full_attention", "full_attention"], mlp_bias=False, layer_norm_epsilon=1e-6,
            max_position_embeddings=32, rope_theta=10000.0, partial_rotary_factor=1.0),
        "esm2": lambda: models.ESM2Backbone(vocabulary_size=50, num_layers=1, num_heads=2, hidden_dim=16,
                                            intermediate_dim=32, max_sequence_length=16),
        "segformer": lambda: models.SegFormerBackbone(
            image_encoder=models.MiTBackbone(layerwise_depths=[1, 1], num_layers=2, layerwise_num_heads=[1, 2],
                                             layerwise_sr_ratios=[2, 1], max_drop_path_rate=0.0,
                                             layerwise_patch_sizes=[7, 3], layerwise_strides=[4, 2],
                                             image_shape=(32, 32, 3), hidden_dims=[8, 16]), projection_filters=16),
        "videoprism": lambda: models.VideoPrismBackbone(num_frames=2, patch_size=8, hidden_dim=16, intermediate_dim=32,
                                                        num_heads=2, num_spatial_layers=1, num_temporal_layers=1,
                                                        num_auxiliary_layers=0, image_shape=(16, 16, 3)),
        "vgg": lambda: models.VGGBackbone(stackwise_num_repeats=[1, 2], stackwise_num_filters=[8, 16],
                                          image_shape=(32, 32, 3)),
        "densenet": lambda: models.DenseNetBackbone(stackwise_num_repeats=[2, 2], image_shape=(32, 32, 3),
                                                    growth_rate=8),
        # a ResNet encoder, a bridge and a decoder of 512-channel convs, a refinement head: the encoder
        # must start at 64 channels and the decoder's widths are fixed (92.5M parameters)
        "basnet": lambda: models.BASNetBackbone(
            image_encoder=models.ResNetBackbone(input_conv_filters=[64], input_conv_kernel_sizes=[7],
                                                stackwise_num_filters=[64, 128, 256, 512],
                                                stackwise_num_blocks=[1, 1, 1, 1], stackwise_num_strides=[1, 2, 2, 2],
                                                block_type="basic_block"),
            num_classes=1, image_shape=(64, 64, 3), projection_filters=64),
        # keras-hub's Xception and T5Gemma 2, as tests/test_channels.py builds them
        **{name: _tested(name) for name in ("xception", "t5gemma2")},
        # not exported by keras_hub.models (0.32): a residual-quantized VAE (MLP encoder and
        # decoder around four codebooks of the latent width) and Stable Diffusion 3's VAE (group norms)
        "rqvae": lambda: _private("rqvae.rqvae_backbone", "RQVAEBackbone")(
            input_dim=10, encoder_layer_dims=[32, 16], output_dim=8, decoder_layer_dims=[16, 32], num_embeddings=64,
            num_quantizers=4),
        "vae": lambda: _private("vae.vae_backbone", "VAEBackbone")(
            encoder_num_filters=[32, 64], encoder_num_blocks=[1, 1], decoder_num_filters=[64, 32],
            decoder_num_blocks=[1, 1], sampler_method="mode", input_channels=3, sample_channels=4, output_channels=3,
            image_shape=(32, 32, 3)),
    }


def _private(module: str, name: str):
    """A keras-hub class its public API does not export (keras_hub.src.models.<module>)."""
    import importlib

    return getattr(importlib.import_module(f"keras_hub.src.models.{module}"), name)


def _tested(name: str):
    """The builder of a keras-hub model tests/test_channels.py builds too (measure puts tests/ on
    the path before it builds)."""
    def build():
        from test_channels import _hub_more_models

        return _hub_more_models()[name]()

    return build


def _inputs(spec: dict, rng) -> dict:
    """Random inputs for a keras-hub serving signature: the test suite's (2 x 8 tokens, all
    attended), with audio features of 2 x 16 x 8 and images of the model's size."""
    import numpy as np
    import tensorflow as tf
    from test_real_models import _inputs as token_inputs

    values = token_inputs(spec, rng)
    for name, tensor_spec in spec.items():
        if tensor_spec.dtype.is_floating:
            shape = [2] + [size or 16 for size in tensor_spec.shape.as_list()[1:]]
            values[name] = tf.constant(rng.uniform(size=shape).astype(np.float32))
    return values


def measure(name: str, scratch: str) -> dict:
    """Build, export, prune and shrink one model; its row."""
    import keras
    import numpy as np
    import tensorflow as tf

    import graphprune

    started = time.perf_counter()
    keras.utils.set_random_seed(0)
    export = os.path.join(scratch, "export")
    sizes = dict(APPLICATIONS)
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
    if name in sizes:
        from test_zoo_applications import _calibrated

        model, x = _calibrated(name, sizes[name], 32)
        library, round_to = "keras.applications", 8
    else:
        model, x = _hub_builders()[name](), None
        library, round_to = "keras-hub", 1
    model.export(export, verbose=False)
    parameters = model.count_params()
    del model
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = graphprune.prune(export, graphprune.ConstantSparsity(0.5, 0), structure="channel", one_shot=True,
                              round_to=round_to)
        groups = graphprune.channel_groups(pm)
        signature = pm.signatures["serving_default"]
        inputs = {next(iter(signature.structured_input_signature[1])): tf.constant(x)} if x is not None else \
            _inputs(signature.structured_input_signature[1], np.random.RandomState(0))
        masked = {key: value.numpy() for key, value in signature(**inputs).items()}
        out = graphprune.finalize(pm, os.path.join(scratch, "small"), shrink=True)
    loaded = tf.saved_model.load(out)  # held: its variables live as long as it does
    shrunk = loaded.signatures["serving_default"](**inputs)
    scale = max(float(np.max(np.abs(value))) for value in masked.values())
    diff = max(float(np.max(np.abs(shrunk[key].numpy() - value))) for key, value in masked.items()) / scale
    before, after = graphprune.cost(export), graphprune.cost(out)
    row = {"model": name, "library": library, "parameters": parameters, "scale": scale, "diff": diff,
           "params": after.parameters / before.parameters, "flops": after.flops / before.flops if before.flops else 0.0,
           "prunable": sorted(group.size for group in groups if group.prunable),
           "whole": len([group for group in groups if not group.prunable]),
           "warnings": sorted({str(w.message).splitlines()[0][:160] for w in caught})}
    if x is not None:
        from ai_edge_litert.interpreter import Interpreter

        tflite = os.path.join(scratch, "small.tflite")
        graphprune.export_tflite(out, tflite)
        runner = Interpreter(model_path=tflite, num_threads=1).get_signature_runner("serving_default")
        lite = next(iter(runner(**{next(iter(runner.get_input_details())): x}).values()))
        row["litert"] = float(np.max(np.abs(lite - next(iter(masked.values()))))) / scale
    row["seconds"] = time.perf_counter() - started
    return row


def table(rows) -> str:
    lines = ["| model | library | parameters | masked vs shrunk | parameters kept | FLOPs kept | groups prunable "
             "/ whole | LiteRT vs masked | seconds |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['model']} | {row.get('library', '')} | | failed: {row['error'][:120]} | | | | | |")
            continue
        litert = f"{row['litert']:.1e}" if "litert" in row else ""
        flops = f"{row['flops']:.3f}x" if row["flops"] else "(unknown sizes)"
        lines.append(f"| {row['model']} | {row['library']} | {row['parameters']:,} | {row['diff']:.1e} | "
                     f"{row['params']:.3f}x | {flops} | {len(row['prunable'])} / {row['whole']} | {litert} | "
                     f"{row['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv) -> None:
    from absl import flags

    values = flags.FLAGS
    if values.one:
        with tempfile.TemporaryDirectory() as scratch:
            print(json.dumps(measure(values.one, scratch)), flush=True)
        return
    names = names_all = [name for name, _ in APPLICATIONS] + list(_hub_builders())
    if values.only:
        unknown = sorted(set(values.only) - set(names))
        if unknown:
            raise SystemExit(f"channels_zoo: unknown model(s) {', '.join(unknown)}; choose from {', '.join(names)}")
        names = [name for name in names if name in values.only]
    rows = []
    for name in names:
        run = subprocess.run([sys.executable, os.path.abspath(__file__), f"--one={name}"], capture_output=True,
                             text=True)
        found = [line for line in run.stdout.splitlines() if line.startswith("{")]
        if run.returncode or not found:
            rows.append({"model": name, "error": (run.stderr.strip().splitlines() or ["no output"])[-1]})
        else:
            rows.append(json.loads(found[-1]))
        print(json.dumps(rows[-1]), flush=True)
    if values.only and os.path.exists(RESULTS):  # the other models' rows stay as they were
        with open(RESULTS) as f:
            kept = [row for row in json.load(f)["rows"] if row["model"] not in values.only]
        order = {name: number for number, name in enumerate(names_all)}
        rows = sorted(kept + rows, key=lambda row: order.get(row["model"], len(order)))
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump({"ratio": 0.5, "rows": rows}, f, indent=1)
    print(table(rows))


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("one", None, "Measure this model alone and print its row as JSON (used per model).")
    flags.DEFINE_list("only", [], "Measure only these models (names as in the table); their rows replace those of "
                                  "the saved results, the others' stay.")
    app.run(main)
