"""graphprune prune: rewrite a SavedModel into a prunable SavedModel.

    graphprune prune --input=model --output=prunable --final_sparsity=0.9 --end_step=1000
    graphprune prune --input=model --output=prunable --structure=channel --final_sparsity=0.5 --one_shot
"""

from __future__ import annotations

from absl import flags

from graphprune.tools import common

_INPUT = flags.DEFINE_string("input", None, "SavedModel directory to prune (only read).")
_OUTPUT = flags.DEFINE_string("output", None, "Directory for the prunable SavedModel.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace --output if it exists (after the new one is complete).")
_SCHEDULE = flags.DEFINE_enum("schedule", "polynomial", ["polynomial", "constant"], "Pruning schedule.")
_FINAL = flags.DEFINE_float("final_sparsity", None, "Target sparsity in [0, 1).", lower_bound=0.0, upper_bound=0.999999)
_INITIAL = flags.DEFINE_float("initial_sparsity", 0.0, "Sparsity at begin_step (polynomial).", lower_bound=0.0,
                              upper_bound=0.999999)
_BEGIN = flags.DEFINE_integer("begin_step", 0, "First step that prunes.", lower_bound=0)
_END = flags.DEFINE_integer("end_step", None, "Last step that prunes (polynomial: required; constant: -1 = never end).",
                            lower_bound=-1)
_FREQUENCY = flags.DEFINE_integer("frequency", 100, "Prune every N steps.", lower_bound=1)
_POWER = flags.DEFINE_float("power", 3.0, "Polynomial exponent.", lower_bound=0.0)
_BLOCK = flags.DEFINE_string("block_size", "1x1", "Block structure HxW, e.g. 1x2 or 4x1.")
_POOLING = flags.DEFINE_enum("block_pooling", "avg", ["avg", "max"], "How blocks are scored.")
_M_BY_N = flags.DEFINE_string("m_by_n", None, "M:N structure, e.g. 2:4 (M pruned of every N input channels).")
_STRUCTURE = flags.DEFINE_enum("structure", "element", ["element", "channel"],
                               "element: unstructured, blocks or M:N; channel: whole output channels and neurons "
                               "with their dependency groups (finalize --shrink removes them).")
_IMPORTANCE = flags.DEFINE_enum("importance", "l2", ["l2", "l1"], "Channel score: norm over the group's weights.")
_ROUND_TO = flags.DEFINE_integer("round_to", 1, "Channel pruning: keep a multiple of this many channels per group "
                                 "(8 suits most CPU kernels).", lower_bound=1)
_RESIDUAL = flags.DEFINE_bool("residual_stream", False, "Channel pruning: also remove residual streams' channels "
                              "that layer norms average over (a transformer's hidden size); off by default, it couples "
                              "every layer.")
_SCOPE = flags.DEFINE_enum("scope", "layer", ["layer", "global"], "Threshold per weight or one across weights.")
_EXCLUDE = flags.DEFINE_string("exclude", None, "Regex of weights/ops not to prune.")
_SPARSITY_FOR = flags.DEFINE_multi_string("sparsity_for", [], "REGEX=SPARSITY: own final sparsity (repeatable).")
_ONE_SHOT = flags.DEFINE_bool("one_shot", False, "Prune to --final_sparsity now (no training needed).")
_GATHER = flags.DEFINE_bool("include_gather", False, "Also prune embedding tables (weights only looked up, by "
                            "ResourceGather or GatherV2).")
_VERIFY = flags.DEFINE_bool("verify", False, "Run and compare the model after every pass (all-ones masks).")

flags.mark_flags_as_required(["input", "output", "final_sparsity"])


def main(argv):
    del argv
    import graphprune
    from graphprune.config import make_config

    end_step = _END.value
    if _SCHEDULE.value == "polynomial" and end_step is None:
        end_step = _BEGIN.value if _ONE_SHOT.value else None
        if end_step is None:
            common.fail("--end_step is required with --schedule=polynomial (or use --one_shot)")
    config = make_config(
        final_sparsity=_FINAL.value, initial_sparsity=_INITIAL.value, begin_step=_BEGIN.value,
        end_step=end_step, frequency=_FREQUENCY.value, power=_POWER.value, kind=_SCHEDULE.value,
        block_size=_BLOCK.value, block_pooling=_POOLING.value.upper(), m_by_n=_M_BY_N.value, scope=_SCOPE.value,
        exclude=_EXCLUDE.value, sparsity_for=_SPARSITY_FOR.value, structure=_STRUCTURE.value,
        importance=_IMPORTANCE.value, round_to=_ROUND_TO.value, residual_stream=_RESIDUAL.value,
    )
    graphprune.io.check_output(_OUTPUT.value, overwrite=_OVERWRITE.value, inputs=[_INPUT.value])
    stages = common.stages("prune")
    with stages("load and rewrite"):
        model = graphprune.prune(_INPUT.value, config=config, one_shot=_ONE_SHOT.value,
                                 verify=_VERIFY.value, include_gather=_GATHER.value)
    with stages("save"):
        graphprune.save(model, _OUTPUT.value, overwrite=_OVERWRITE.value, inputs=[_INPUT.value])
    if _VERIFY.value:
        print("verify (all-ones masks, largest |difference| per output after each pass):")
        print(model._graphprune.verify_summary())
    for row in model.weights():
        print(f"{row['name']:40s} {row['op']:22s} {str(row['shape']):20s} sparsity {row['sparsity']:.4f}")
    print(f"wrote {_OUTPUT.value}: {len(model.weights())} prunable weights, schedule {config.schedule!r}, "
          f"{config.structure.describe()}, scope {config.scope}")
