"""The end of the pipeline: fold masks, strip the machinery, export SavedModel and TFLite."""

from __future__ import annotations

import dataclasses
import os
import tempfile
import warnings

import numpy as np
import tensorflow as tf

from graphprune.errors import BadModelError, DataError, GraphPruneError, PassError, first_line
from graphprune import body as b
from graphprune import rebuild
from graphprune.analysis import is_mask_multiply, written_variables
from graphprune.graph import ROLE_MASK, ROLE_OTHER
from graphprune.io import atomic_file, check_output
from graphprune.masks import kept, pruned_values, store_pruned
from graphprune.load import load
from graphprune.pipeline import PassContext, VariableValues, run_pipeline
from graphprune.verify import given_inputs, optional_verifier

QUANTIZE_MODES = (None, "dynamic", "int8")
# TFLite variants by name (the CLI's --tflite_variants): (quantize, sparse encoding).
VARIANTS = {"float": (None, False), "dynamic": ("dynamic", False), "int8": ("int8", False), "sparse": (None, True)}


def variant_path(base, variant: str) -> str:
    """'model.tflite' + 'dynamic' -> 'model.dynamic.tflite' (absolute)."""
    base = os.path.abspath(os.fspath(base))
    stem = base[: -len(".tflite")] if base.endswith(".tflite") else base
    return f"{stem}.{variant}.tflite"


# Frozen weights are constants in the GraphDef: protobuf caps a GraphDef (and saved_model.pb) at
# 2 GB, and TensorFlow copies a graph's constants when it imports it, builds a function of it and
# saves it. Variables go to the checkpoint one at a time and are never copied. So finalize
# freezes pruned weights, smallest first, up to this many bytes in all; the others keep their
# pruned values as variables (the outputs are the same; TFLite conversion freezes them anyway).
# Measured on a 100M-parameter model: one frozen 64 MiB weight raised finalize's peak memory by
# 0.9 GB (2.63 GB against 1.75 GB with none frozen, plain TensorFlow's load + save 1.0 GB).
MAX_FROZEN_BYTES = 16 << 20


def finalize_model(prunable, *, freeze: bool | str = True, verify: bool = False,
                   max_frozen_bytes: int = MAX_FROZEN_BYTES, shrink: bool = False, fold_batch_norms=None,
                   pointwise_matmul: bool | str = False, fold_pads: bool = False, check_inputs=None):
    """(final TracedModel, the values its variables are read from, pipeline result); nothing written.

    The pruned weights are folded (w := w * mask) into variables first: into the ones loaded from
    a directory (graphprune's own copies), or into new ones for an in-memory PrunableModel (whose
    variables are never changed). Every model built from the returned values reads those
    variables, so a model's weights are held once, whatever its size. ``check_inputs``: what
    ``verify`` runs the entries they fit on (finalize's, see verify.given_inputs)."""
    if isinstance(prunable, (str, os.PathLike)):
        loaded = load(os.fspath(prunable))
        traced, variables, owned = loaded.model, loaded.variables, True
    elif hasattr(prunable, "traced"):
        traced, variables, owned = prunable.traced, prunable.variables_by_key, False
    else:
        raise BadModelError(
            f"finalize takes a PrunableModel or the directory it was saved to, got {type(prunable).__name__}"
        )
    if not (isinstance(freeze, bool) or freeze == "all"):
        raise GraphPruneError(f"freeze must be True, False or 'all', got {freeze!r}")
    _check_frozen_limit(max_frozen_bytes)
    pruned = {spec.weight: key for key, spec in traced.variables.items() if spec.role == ROLE_MASK}
    _warn_if_nothing_pruned(traced, variables)
    live = _fold_into_variables(traced, variables, pruned, owned)
    frozen = _to_freeze(traced, pruned, freeze, max_frozen_bytes)
    steps = [("find_weights", {}),
             ("fold_masks", {"freeze": bool(freeze), "keep": tuple(w for w in pruned if w not in frozen),
                             "stored": tuple(pruned)})]
    if frozen:  # fold_masks leaves weights read inside loop bodies to this pass
        steps.append(("freeze_variables", {"only": tuple(sorted(frozen))}))
    steps.append(("read_handles_directly", {}))  # so TFLite freezes and quantizes
    if shrink:  # shrink_channels strips what is unused first
        steps += [("shrink_channels", {"round_to": _round_to(prunable)}), ("strip_unused", {})]
    else:
        steps.append(("strip_unused", {}))
    if _folds(fold_batch_norms, freeze):
        steps += [("fold_batch_norms", {"variables": True}), ("strip_unused", {})]
    if pointwise_matmul:
        steps += [("pointwise_matmul", {"max_macs": _max_macs(pointwise_matmul)}), ("strip_unused", {})]
    if fold_pads:
        steps += [("fold_pads", {}), ("strip_unused", {})]
    values = VariableValues(live)
    given = given_inputs(traced, check_inputs) if verify and check_inputs is not None else None
    after_pass = optional_verifier(verify, values, ones_masks=False, given=given)
    result = run_pipeline(traced, steps, PassContext(values=values), after_pass=after_pass)
    return result.model, values, result


def _folds(fold_batch_norms, freeze) -> bool:
    if fold_batch_norms is None:
        return bool(freeze)  # frozen kernels are for inference: their batch norms go in too
    if not isinstance(fold_batch_norms, bool):
        raise GraphPruneError(f"fold_batch_norms must be True, False or None, got {fold_batch_norms!r}")
    return fold_batch_norms


def _max_macs(pointwise_matmul) -> int | None:
    """The pointwise_matmul pass's max_macs for finalize's option: True (every 1x1 conv) or "auto"."""
    from graphprune.passes.pointwise_matmul import AUTO_MAX_MACS

    if pointwise_matmul is True:
        return None
    if pointwise_matmul == "auto":
        return AUTO_MAX_MACS
    raise GraphPruneError(f"pointwise_matmul must be 'auto', True or False, got {pointwise_matmul!r}")


# what a pass reports of what it changed (finalize may give up the first three; a shrink that
# changed nothing is warned about)
_CHANGED = {"pointwise_matmul": "rewritten", "fold_batch_norms": "folded", "fold_pads": "folded",
            "shrink_channels": "shrunk"}


def _changed(result, pass_name: str) -> bool:
    """Whether finalize_model's ``pass_name`` pass changed anything (its report's list)."""
    return any(report.report.get(_CHANGED[pass_name]) for name, report, _ in result.reports if name == pass_name)


def _round_to(prunable) -> int:
    config = getattr(prunable, "config", None)
    return config.structure.round_to if config is not None and config.structure.channels else 1


def _check_frozen_limit(max_frozen_bytes) -> None:
    integer = isinstance(max_frozen_bytes, (int, np.integer)) and not isinstance(max_frozen_bytes, bool)
    if not integer or max_frozen_bytes < 0:
        raise GraphPruneError(f"max_frozen_bytes must be a non-negative integer (bytes), got {max_frozen_bytes!r}")


def _fold_into_variables(traced, variables, pruned: dict, owned: bool) -> dict:
    """The variables by key, each pruned weight holding w * mask (+0.0 where pruned): assigned in
    place when graphprune owns the variables, else in a new variable of the weight's key."""
    live = dict(variables)
    for weight, mask in pruned.items():
        if owned and not rebuild.is_distributed(live[weight]):
            store_pruned(live[weight], live[mask])  # in TensorFlow: one weight's temporaries
            continue
        spec = traced.variables[weight]
        with tf.init_scope():
            live[weight] = tf.Variable(pruned_values(live[weight], live[mask]), name=weight, dtype=spec.dtype,
                                       trainable=spec.trainable)
    return live


def _to_freeze(traced, pruned: dict, freeze, budget: int) -> set:
    """The variable keys to freeze: the pruned weights (freeze=True) or every variable the model
    does not write (freeze='all'), smallest first, while their bytes in all stay within budget."""
    if not freeze:
        return set()
    if freeze == "all":
        # What the model writes, not the mask update (which fold_masks drops with the masks).
        state = written_variables(dataclasses.replace(
            traced, entries=tuple(entry for entry in traced.entries if entry.kind != "update")))
        candidates = [key for key, spec in traced.variables.items()
                      if spec.role == ROLE_OTHER and key not in state]
    else:
        candidates = list(pruned)

    def size(key):
        spec = traced.variables[key]
        return int(np.prod(spec.shape, dtype=np.int64)) * tf.dtypes.as_dtype(spec.dtype).size

    chosen, total = set(), 0
    for key in sorted(candidates, key=lambda k: (size(k), k)):
        if total + size(key) > budget:
            break
        chosen.add(key)
        total += size(key)
    return chosen


def _warn_if_nothing_pruned(traced, variables) -> None:
    masks = [key for key, spec in traced.variables.items() if spec.role == ROLE_MASK]
    if not masks:
        warnings.warn("graphprune: finalize: the model has no masks, so nothing is pruned; the output computes what "
                      "the input does (prune it first: graphprune.prune / `graphprune prune`)", stacklevel=3)
    elif all(bool(tf.reduce_all(kept(variables[key]))) for key in masks):  # no NumPy copy of a mask
        warnings.warn("graphprune: finalize: nothing is pruned yet (every mask is all ones); train with "
                      "update_masks() past begin_step, or prune one-shot, before finalizing", stacklevel=3)


def check_final(masked, final, values, *, atol: float = 1e-5, rtol: float = 1e-5, random: str = "seeded",
                longer: bool = False, given: dict | None = None) -> None:
    """Refuse a finalized model that computes something else than the masked one: both run on the
    same seeded inputs (each output compared with atol relative to its scale), and the largest
    difference is named with the entry and output it was found in. ``random="constant"``: random
    draws are constants in both (a shrunk model's dropout draws over fewer channels).

    ``longer``: entries with unknown input dimensions past the first (a sequence's length, an
    image's size) are compared again on longer inputs (verify.longer_sizes: 16 tokens where the
    first run chose 2, twice a longer size, halved while the masked model refuses it): a shrunk model
    that is wrong only past the first positions (a removed query dim's bias turned by a rotary
    embedding) passes on two tokens.

    ``given`` ({"kind:name": [arrays]}, verify.given_inputs): the inputs those entries are compared
    on, instead of seeded ones (and not again on longer ones); the masked model failing on them is
    a DataError. An entry the masked model runs on no seeded input of is left out, with a warning
    (and the whole check, where no entry runs)."""
    from graphprune.verify import longer_sizes, run_entries

    sizes, failed = {}, []  # the final model runs on the inputs the masked one ran on
    expected = run_entries(masked, values, ones_masks=False, random=random, sizes=sizes, given=given, failed=failed)
    for name in given or ():
        outputs = expected[name]
        if not any(np.size(output) for output in outputs):
            raise DataError(f"'{name}' computes only empty outputs on the check_inputs given (a batch of 0?), so "
                            "they check nothing: give inputs with at least one example")
        floats = [output for output in outputs if output.dtype.kind in "fc" and output.size]
        if floats and not any(np.isfinite(output).any() for output in floats):
            raise DataError(f"'{name}' computes NaN or infinity everywhere on the check_inputs given, so they check "
                            "nothing: give inputs the model computes numbers on")
    if failed:  # inputs graphprune cannot make (a variant, a resource, boxes on the image): say so
        more = f" and {len(failed) - 1} more entries" if len(failed) > 1 else ""
        checked = f"; {', '.join(sorted(expected))} checked" if expected else ""
        warnings.warn(f"graphprune: finalize: not checked against the masked model ({failed[0][1]}{more}){checked}; "
                      "give it inputs with check_inputs= (--check_inputs)", stacklevel=3)
        if not expected:
            return
    try:
        actual = run_entries(final, values, ones_masks=False, random=random, sizes=sizes, given=given,
                             only=set(expected))
    except (PassError, DataError) as error:
        raise PassError(f"finalize: the finalized model does not run where the masked model does: {error}; "
                        "nothing was written") from error
    _refuse_differences(expected, actual, atol, rtol, sizes, shrunk=longer, given=given or {})
    pending = longer_sizes(masked, sizes) if longer else {}
    while pending:  # a size the masked model refuses (a short position table) is halved towards the first one
        expected = run_entries(masked, values, ones_masks=False, random=random, sizes=pending, sized_only=True)
        ran = {name: size for name, size in pending.items() if name in expected}
        actual = run_entries(final, values, ones_masks=False, random=random, sizes=ran, sized_only=True) if ran else {}
        for name, size in ran.items():
            if name not in actual:
                raise PassError(f"finalize: the finalized model does not run where the masked model does: '{name}' "
                                f"fails on inputs with unknown dimensions of size {size[0]} in floating-point "
                                f"inputs, {size[1]} in others; nothing was written")
        _refuse_differences(expected, actual, atol, rtol, ran, shrunk=longer)
        pending = {name: half for name, size in pending.items() if name not in ran
                   for half in [tuple(max(first, n // 2) for first, n in zip(sizes[name], size))] if half != sizes[name]}


def _refuse_differences(expected: dict, actual: dict, atol: float, rtol: float, sizes: dict, *,
                        shrunk: bool = False, given=()) -> None:
    """PassError (nothing written) naming the largest difference between two models' outputs
    beyond ``atol`` times the output's scale (at least 1) plus ``rtol`` times it, if any.
    ``shrunk``: the finalized model had channels removed, and the error says how to keep them."""
    from graphprune.verify import max_difference

    worst = None
    for name, reference in expected.items():
        if name not in actual or len(actual[name]) != len(reference):
            raise PassError(f"finalize: '{name}' lost an output or the whole function; nothing was written")
        for number, (want, got) in enumerate(zip(reference, actual[name])):
            if want.dtype.kind not in "fc":
                if not np.array_equal(want, got):
                    raise PassError(f"finalize: output {number} of '{name}' differs from the masked model's"
                                    f"{_on_inputs(sizes, name, given)}; nothing was written")
                continue
            finite = want[np.isfinite(want)]
            scale = float(np.max(np.abs(finite))) if finite.size else 1.0
            difference = max_difference(want, got)
            if difference > atol * max(1.0, scale) + rtol * scale and (worst is None or difference > worst[0]):
                worst = (difference, name, number, scale)
    if worst is not None:
        difference, name, number, scale = worst
        keep = "Try without shrink=True (--shrink), which keeps every channel; or " if shrunk else "Try "
        raise PassError(
            f"finalize: the finalized model differs from the masked model by {difference:.3g} (output {number} of "
            f"'{name}', output scale {scale:.3g}{_on_inputs(sizes, name, given)}); nothing was written. "
            f"{keep}freeze=False "
            "(--nofreeze): TensorFlow folds and fuses constants (oneDNN), which changes the arithmetic; or accept "
            f"it with check_tolerance={_rounded_up(difference / max(1.0, scale)):g} (--check_tolerance)")


def _on_inputs(sizes: dict, name: str, given=()) -> str:
    """', on inputs ...' naming the unknown dimensions' size ``name`` ran at, where it was not 2
    (', on the check_inputs given' where they were the user's)."""
    if name in given:
        return ", on the check_inputs given"
    size = sizes.get(name)
    if size is None or size == (2, 2):
        return ""
    return f", on inputs with unknown dimensions of size {size[0]} in floating-point inputs, {size[1]} in others"


def _rounded_up(value: float) -> float:
    """``value`` rounded up to one significant digit (1.46e-4 -> 2e-4)."""
    if value <= 0:
        return 0.0
    exponent = 10.0 ** np.floor(np.log10(value))
    return float(np.ceil(value / exponent * (1 - 1e-12)) * exponent)


def products_as_folded_weights(masked):
    """The masked model with every ``w * mask`` product read as the weight itself, for running it
    once finalize_model has folded the masks into the stored weights: pruned elements are then
    +0.0 and masks exactly 0 or 1, so each product equals its weight bit for bit and the outputs
    are the masked model's. Run as it is, the masked model's products (which depend on no input)
    are all computed first, a second copy of every pruned weight at once: at 1B parameters 4 GB,
    most of finalize's peak memory."""

    def read_weights(body):
        for node in [node for node in body.nodes if is_mask_multiply(node)]:
            body.repoint(body.ref(node.name), node.input[0], exclude=(node.name,))

    return dataclasses.replace(masked, entries=tuple(b.rewrite_entry(entry, read_weights)[0]
                                                     for entry in masked.entries))


def finalize(prunable, output_dir, *, freeze: bool | str = True, overwrite: bool = False, verify: bool = False,
             check: bool = True, max_frozen_bytes: int = MAX_FROZEN_BYTES, progress=None, shrink: bool = False,
             fold_batch_norms: bool | None = None, check_tolerance: float = 1e-5,
             pointwise_matmul: bool | str = "auto", fold_pads: bool | None = None, check_inputs=None) -> str:
    """Fold the masks into the weights, drop every mask/step/update op, and write a SavedModel
    with the original signatures that plain TensorFlow loads and runs (no graphprune needed).

    prunable: a PrunableModel, or the directory ``graphprune.save`` wrote.
    freeze=True: the pruned weights become constants (w * mask folded), smallest first, up to
        ``max_frozen_bytes`` in all (16 MiB); larger ones stay variables holding their pruned
        values, so that no weight is copied through a GraphDef and models past protobuf's 2 GB
        limit finalize (MAX_FROZEN_BYTES says why); the batch norms after them are folded in
        (fold_batch_norms below); every other variable (biases, normalization parameters read
        elsewhere, state) stays a variable. TensorFlow folds constant normalization parameters
        into their neighbours and fuses ops on constants (oneDNN), which changes the
        arithmetic: freezing them moved DenseNet121's logits by up to 1e-3 of their scale, and a
        tf-keras LayerNormalization's output more.
    freeze="all": every variable read becomes a constant (except variables the model writes).
    freeze=False: weights stay variables, holding the pruned values.
    check=True: run the finalized and the masked model on the same seeded inputs first and refuse
        (PassError, nothing written) if any output differs beyond ``check_tolerance`` (1e-5) of
        its scale; with shrink=True, again on longer inputs (16 tokens, say: check_final). Freezing
        normalization parameters (freeze="all") lets TensorFlow fold and fuse
        them, which can move a deep CNN's outputs by 1e-4 of their scale: raise the tolerance
        to accept that knowingly.
    check_inputs: the inputs the check (and ``verify``) runs the models on, for models whose
        inputs graphprune cannot make up (its inputs are random normal floats and 0s and 1s:
        boxes that must lie on the image, indices into a table, lengths). What one call takes,
        for every entry it fits: a signature's keyword arguments as a dict ({"images": x,
        "boxes": b}), a method's one argument, a tuple of its arguments or a dict of them by
        parameter name; or such values by entry name ({"serving_default": {...}, "encode":
        (x,)}) for entries that take different inputs. Arrays or tensors, any batch; a
        signature that calls a method and that method share them. Other entries run on inputs
        graphprune makes; an entry that runs on none of those is left out of the check with a
        warning (the others are checked). The shrunk model's second check on longer inputs
        leaves the entries given inputs out. DataError where they fit no entry (before any work,
        for a PrunableModel) or the masked model fails on them, computes NaN or infinity
        everywhere on them or computes only empty outputs (a batch of 0): they would check
        nothing; refused with check=False (unless verify=True).
    progress: a callable taking one line per stage (with its time and peak memory); the CLI's
        --verbose prints them.
    shrink=True: remove dead channels (every channel whose consuming kernels are all zero there,
        as structure='channel' leaves them) from every weight, bias and normalization parameter
        coupled to them (the shrink_channels pass): a smaller dense model with fewer FLOPs,
        checked to compute what the masked one does.
    fold_batch_norms: fold per-channel scales and shifts after a kernel (inference batch
        normalization) into the kernel and one BiasAdd, which TensorFlow fuses with the
        activation (the fold_batch_norms pass): their parameters, constants or variables the
        model never writes, are taken at their values now. None (default): with freeze=True or
        "all" (the kernels are for inference), keeping them where the folded model fails the
        check (with a warning; True refuses instead); False: never. Keras 3's batch norms,
        tf-keras's FusedBatchNormV3 and those after Conv1D kernels fold. At batch 1 this is
        much of a small convolutional model's TensorFlow latency (benchmarks/README.md: a
        shrunk MobileNetV2 at 128x128, 2.8-3.2 ms folded against 4.6-4.8 ms not).
    pointwise_matmul="auto" (default): write each 1x1, stride-1 convolution with a constant or
        variable kernel and at most 3.5M multiply-adds per image (height and width known) as a
        MatMul between two Reshapes (the pointwise_matmul pass), its BiasAdd and activation
        moved along. TensorFlow's oneDNN convolution costs about 50 us more a call than the
        matrix product when it runs on more than one thread (measured on x86, 2 cores): at
        batch 1 that is much of a small or shrunk MobileNet's time (a shrunk MobileNetV2 at
        128x128: 6.4-7.3 ms as convolutions, 4.6-5.1 ms so). Larger convolutions stay: they
        gain little or lose, and a MatMul forgoes the fusion of a convolution with a residual
        Add (ResNet50's dense frozen model: 26.1-29.0 ms with every one a MatMul, 23.6-24.1 ms
        without; shrunk at 50%, its 1x1 convolutions 4.2M each, 5-15% faster kept). Where the
        MatMuls' outputs fail the check (a deep network summed in another order:
        EfficientNetV2B0 frozen, 4e-5 of the scale), "auto" warns and keeps the convolutions.
        True: every such convolution, whatever its size; False: none, which serves frozen
        residual networks with small 1x1 convolutions in large batches better (a frozen
        ResNet50 at 50% of its channels, batch 32: 9-20% slower over four runs under the 8M
        bound "auto" had before, which made its 4.2M convolutions MatMuls). LiteRT runs both
        forms alike.
    fold_pads: fold a zero Pad before a VALID convolution into it where the Pad adds what SAME
        padding would (the fold_pads pass): Keras pads the input of every stride-2 depthwise
        convolution of MobileNet, MobileNetV2 and EfficientNet so, and TensorFlow runs each Pad as
        an op of its own (a shrunk MobileNetV2 at 128x128, batch 1: 3.0-3.1 ms folded against
        3.4-3.5 ms not; TFLite's converter folds them itself). None (default): fold, keeping the
        Pads where the folded model fails the check (with a warning; True refuses instead);
        False: never.
    """
    from graphprune.api import save_traced
    from graphprune.progress import Stages

    _check_frozen_limit(max_frozen_bytes)
    if isinstance(pointwise_matmul, np.bool_):
        pointwise_matmul = bool(pointwise_matmul)
    if pointwise_matmul is not False:
        _max_macs(pointwise_matmul)  # a bad value is refused before anything is read or written
    if isinstance(fold_pads, np.bool_):
        fold_pads = bool(fold_pads)
    if fold_pads is not None and not isinstance(fold_pads, bool):
        raise GraphPruneError(f"fold_pads must be True, False or None, got {fold_pads!r}")
    number = isinstance(check_tolerance, (int, float, np.integer, np.floating)) and not isinstance(check_tolerance, bool)
    if not number or not 0 <= check_tolerance < 1:
        raise GraphPruneError(f"check_tolerance must be a number in [0, 1) (of the output scale), got {check_tolerance!r}")
    if check_inputs is not None and not (check or verify):
        raise GraphPruneError("check_inputs are the inputs finalize's check (and verify) runs on: give them with "
                              "check=True or verify=True, or leave them out")
    inputs = [prunable] if isinstance(prunable, (str, os.PathLike)) else []
    check_output(output_dir, overwrite=overwrite, inputs=inputs)
    # inputs that fit no entry are refused before the work, where the entries are known by now
    given = given_inputs(prunable.traced, check_inputs) if hasattr(prunable, "traced") else None
    stages = Stages("finalize", progress)

    def build(pointwise_matmul, fold_batch_norms, fold_pads):
        return finalize_model(prunable, freeze=freeze, verify=verify, max_frozen_bytes=max_frozen_bytes,
                              shrink=shrink, fold_batch_norms=fold_batch_norms, pointwise_matmul=pointwise_matmul,
                              fold_pads=fold_pads is not False, check_inputs=check_inputs)

    with stages("fold masks and strip the pruning ops"):
        final, values, result = build(pointwise_matmul, fold_batch_norms, fold_pads)
    if fold_batch_norms is True and not _changed(result, "fold_batch_norms"):
        warnings.warn("graphprune: finalize: fold_batch_norms folded nothing: no per-channel scale or shift (from "
                      "constants or variables the model never writes) follows a kernel read nowhere else",
                      stacklevel=2)

    if shrink and not _changed(result, "shrink_channels"):
        warnings.warn("graphprune: finalize: shrink removed no channel: no channel has all its kernels' slices zero "
                      "(pruning element by element zeroes weights, not whole channels: prune with "
                      "structure='channel', --structure=channel, to remove them; a group it leaves whole, "
                      "graphprune.channel_groups says why)", stacklevel=2)

    if given is None and check:  # the pipeline's first pass (find_weights) only records facts: the masked model
        given = given_inputs(result.reports[0][1].model, check_inputs)

    def checked(final, values, result) -> None:
        check_final(products_as_folded_weights(result.reports[0][1].model), final, values,
                    atol=check_tolerance, rtol=check_tolerance, random="constant" if shrink else "seeded",
                    longer=shrink, given=given)

    # The defaults' rewrites ("auto"'s MatMuls, folded batch norms) are taken where the outputs
    # stay within the tolerance: a deep network summed in another order can move past it
    # (EfficientNetV2B0: 4e-5 of the scale with the MatMuls, 2e-5 with the folds). Where the model
    # fails the check, each is given up alone, then both; asked for by name (True), they are
    # refused instead.
    defaults = {"pointwise_matmul": (pointwise_matmul == "auto",
                                     "its 1x1 convolutions as MatMuls (pointwise_matmul='auto')",
                                     "they stay convolutions", "pointwise_matmul=True"),
                "fold_batch_norms": (fold_batch_norms is None,
                                     "its batch norms folded into the kernels (fold_batch_norms's default)",
                                     "they stay as they are", "fold_batch_norms=True"),
                "fold_pads": (fold_pads is None,
                              "its Pads folded into the convolutions' SAME padding (fold_pads's default)",
                              "they stay Pads", "fold_pads=True")}
    fallbacks, given_up = None, []  # what to give up in turn: known once the first check fails
    while check:
        with stages("check against the masked model"):
            try:
                checked(final, values, result)
                break
            except PassError as error:
                if fallbacks is None:
                    applied = [option for option, (implicit, *_) in defaults.items()
                               if implicit and _changed(result, option)]
                    fallbacks = [[option] for option in applied] + ([applied] if len(applied) > 1 else [])
                    refused = first_line(str(error)).split("; nothing was written")[0]
                if not fallbacks:
                    raise
        given_up = fallbacks.pop(0)
        del final, values, result
        with stages(f"fold masks and strip the pruning ops, {' and '.join(given_up)} off"):
            final, values, result = build(**{"pointwise_matmul": pointwise_matmul,
                                             "fold_batch_norms": fold_batch_norms, "fold_pads": fold_pads,
                                             **{option: False for option in given_up}})
    for option in given_up:
        _, what, instead, asked = defaults[option]
        warnings.warn(f"graphprune: finalize: with {what} the model failed the check ({refused}); {instead}. "
                      f"{asked} and a larger check_tolerance apply them anyway", stacklevel=2)
    with stages("save"):
        return save_traced(final, values, output_dir, overwrite=overwrite, inputs=inputs, name="finalized_model")


# A flatbuffer's 32-bit offsets cap a plain .tflite at 2 GB. TensorFlow 2.21's converter writes
# larger models anyway (its buffers placed after the flatbuffer; measured: a 604M-parameter model
# gave a 2.4 GB file that LiteRT runs), but older runtimes and flatbuffer tools cannot read those.
TFLITE_MAX_BYTES = 2 << 30


def export_tflite(saved_model_dir, tflite_path, *, quantize=None, sparse: bool = False, representative_data=None,
                  signature_keys=None, overwrite: bool = False, batch_size: int | None = None) -> str:
    """Convert a (finalized) SavedModel to TFLite.

    quantize: None (float), "dynamic" (int8 weights, float activations) or "int8" (full integer;
        needs ``representative_data``: an array of inputs, a list of them, or a callable yielding
        lists of input arrays). Inputs and outputs stay float.
    sparse: use TFLite's sparse tensor encoding for weights that are sparse enough.
    batch_size: convert with this fixed batch size (the static_batch pass): needed for RNNs
        (Keras LSTM/GRU), whose TensorList element shapes the converter wants static.
    """
    if quantize not in QUANTIZE_MODES:
        raise GraphPruneError(f"quantize must be one of none, dynamic, int8; got {quantize!r}")
    if quantize == "int8" and representative_data is None:
        raise GraphPruneError("quantize='int8' needs representative_data (a few hundred real input samples)")
    if not os.path.isdir(os.fspath(saved_model_dir)):
        raise BadModelError(f"{saved_model_dir}: no such SavedModel directory")
    check_output(tflite_path, overwrite=overwrite, inputs=[saved_model_dir])
    rewrites = _converter_rewrites(saved_model_dir)
    with tempfile.TemporaryDirectory(prefix="graphprune-tflite-") as scratch:
        try:
            source = _for_converter(saved_model_dir, os.path.join(scratch, "model"), batch_size, rewrites)
            flatbuffer = _convert(source, quantize, sparse, representative_data, signature_keys)
        except GraphPruneError as error:
            # a Reshape stated before convolutions the converter takes as they are would only add
            # ops: known_channels runs where it refuses one (the pass finds which, if any)
            from graphprune.passes.known_channels import CONVOLUTIONS

            if not any(f"'tf.{op}' op is neither" in str(error) for op in CONVOLUTIONS):
                raise
            stated = rewrites + ["known_channels"]
            source = _for_converter(saved_model_dir, os.path.join(scratch, "stated"), batch_size, stated)
            if source == os.fspath(saved_model_dir):  # nothing to state: the first refusal stands
                raise
            flatbuffer = _convert(source, quantize, sparse, representative_data, signature_keys)
    if len(flatbuffer) > TFLITE_MAX_BYTES:
        size = len(flatbuffer) / 2**30
        warnings.warn(f"graphprune: {os.fspath(tflite_path)} is {size:.2f} GiB, past the 2 GB of a plain flatbuffer: "
                      "LiteRT reads it, older TFLite runtimes and flatbuffer tools cannot (quantize='dynamic' stores "
                      "int8 weights, a quarter of the size)", stacklevel=2)
    with atomic_file(tflite_path, overwrite=overwrite, inputs=[saved_model_dir]) as temp:
        with open(temp, "wb") as handle:
            handle.write(flatbuffer)
    return os.path.abspath(os.fspath(tflite_path))


def _convert(saved_model_dir, quantize, sparse, representative_data, signature_keys) -> bytes:
    from graphprune.load import with_op_libraries

    converter = with_op_libraries(  # a broken SavedModel, or one whose ops need a library: one line
        lambda: tf.lite.TFLiteConverter.from_saved_model(os.fspath(saved_model_dir), signature_keys=signature_keys),
        os.fspath(saved_model_dir), "re-export it")
    optimizations = []
    if quantize is not None:
        optimizations.append(tf.lite.Optimize.DEFAULT)
    if sparse:
        optimizations.append(tf.lite.Optimize.EXPERIMENTAL_SPARSITY)
    converter.optimizations = optimizations
    if quantize == "int8":
        converter.representative_dataset = _representative(representative_data)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    try:
        return converter.convert()
    except Exception as error:  # the converter raises many types
        raise GraphPruneError(f"TFLite conversion failed: {converter_reason(error)}") from error

_REASONS = (
    # (text in the converter's message, what to tell the user)
    ("is neither a custom op nor a flex op", "allow TensorFlow ops in TFLite (converter.target_spec.supported_ops "
                                            "+= [tf.lite.OpsSet.SELECT_TF_OPS]) or change the model"),
    ("TensorList", "an RNN's TensorList needs static shapes: convert with batch_size=1 (--tflite_batch_size=1)"),
    ("2GB", "the model exceeds TFLite's 2 GB flatbuffer limit: quantize it first (quantize='dynamic') or export "
            "the part that fits"),
    ("2 GB", "the model exceeds TFLite's 2 GB flatbuffer limit: quantize it first (quantize='dynamic') or export "
             "the part that fits"),
)


def converter_reason(error: BaseException) -> str:
    """One line for a converter failure: the line that names the real reason (not the first line,
    which is often 'Could not translate MLIR to FlatBuffer ... loc(callsite(...'), and what to do."""
    text = str(error).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for marker, advice in _REASONS:
        for line in lines:
            if marker in line:
                reason = line.split("error: ", 1)[-1]
                start = reason.rfind("): ", 0, reason.index(marker))  # drop a 'loc(callsite(...)): ' prefix
                reason = reason[start + 3:] if start >= 0 else reason
                return f"{reason[:240]} ({advice})"
    errors = [line.split("error: ", 1)[1] for line in lines if "error: " in line]
    return (errors[0] if errors else lines[0] if lines else type(error).__name__)[:300]


def _for_converter(saved_model_dir, output_dir, batch_size, rewrites) -> str:
    """The SavedModel to convert: ``saved_model_dir`` itself, or a copy in ``output_dir`` rewritten
    for the converter: a fixed batch (static_batch, where ``batch_size`` is given), and, where the
    model has them, what TFLite's converter refuses on dynamic shapes in a form it takes:
    new-axis slices as ExpandDims (expand_new_axes: every keras-hub decoder's attention mask),
    einsums that contract nothing as a Mul (outer_einsums: Gemma 4's rotary angles) and
    convolutions' unknown input channels stated (known_channels: after Keras 3's UpSampling2D);
    ``rewrites``: those of them to run."""
    passes = [("static_batch", {"batch_size": batch_size})] if batch_size is not None else []
    passes += [(name, {}) for name in rewrites]
    if not passes:
        return os.fspath(saved_model_dir)
    from graphprune.api import save_traced  # api imports this module

    try:
        loaded = load(os.fspath(saved_model_dir))
        values = VariableValues(loaded.variables)
        result = run_pipeline(loaded.model, passes, PassContext(values=values))
    except GraphPruneError:
        if batch_size is not None:
            raise
        return os.fspath(saved_model_dir)  # a model graphprune cannot read: the converter may, as it is
    if batch_size is None and not any(step.changed for _, step, _ in result.reports):
        return os.fspath(saved_model_dir)
    save_traced(result.model, values, output_dir)
    return output_dir


def _converter_rewrites(saved_model_dir) -> list[str]:
    """The passes of _for_converter a look at the SavedModel's graphs says will change it: a
    StridedSlice with a new_axis_mask; an Einsum that contracts nothing. (known_channels is run
    where the converter refuses a convolution.)"""
    from tensorflow.core.protobuf import saved_model_pb2

    from graphprune.passes.outer_einsums import outer_equation

    path = os.path.join(os.fspath(saved_model_dir), "saved_model.pb")
    if not os.path.isfile(path):
        return []  # the converter's own message tells
    proto = saved_model_pb2.SavedModel()
    try:
        with open(path, "rb") as handle:
            proto.ParseFromString(handle.read())
    except Exception:  # noqa: BLE001  a broken file: the loader's message tells
        return []
    found = set()
    for meta_graph in proto.meta_graphs:
        graph = meta_graph.graph_def
        for nodes in [graph.node] + [function.node_def for function in graph.library.function]:
            for node in nodes:
                if node.op == "StridedSlice" and node.attr["new_axis_mask"].i:
                    found.add("expand_new_axes")
                elif node.op == "Einsum" and outer_equation(node) is not None:
                    found.add("outer_einsums")
    return [name for name in ("expand_new_axes", "outer_einsums") if name in found]


def _representative(data):
    if callable(data):
        return data

    def generate():
        samples = data if isinstance(data, (list, tuple)) else [data]
        for sample in samples:
            array = np.asarray(sample, np.float32)
            for row in array:
                yield [row[np.newaxis, ...]]

    return generate
