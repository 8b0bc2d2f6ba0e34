"""Verification mode: after every pass, run the rebuilt entries on seeded inputs and compare.

Masks are forced to all ones for the comparison, so every pass except folding must leave the
outputs unchanged; the largest difference per output is recorded in ``Verifier.report``.
"""

from __future__ import annotations

import logging
import re
import zlib
from collections.abc import Mapping

import numpy as np
import tensorflow as tf

from graphprune import body as b
from graphprune import graph as g
from graphprune import rebuild
from graphprune.analysis import written_variables
from graphprune.channels import RANDOM_OPS
from graphprune.errors import DataError, PassError, first_line
from graphprune.pipeline import PassContext


# Sizes tried, in turn, for an entry's unknown input dimensions past the first (a sequence's
# length, an image's height and width), as (floating-point inputs' size, other inputs' size):
# the first the entry runs on is used. Most models run on 2; a model whose input must be long
# (Moonshine's raw audio, read by a convolution of width 127 and stride 64) needs more, while its
# token ids may not be longer than its position table. A size that would make any input larger
# than MAX_INPUT_ELEMENTS is not tried.
INPUT_SIZES = ((2, 2), (32, 32), (32, 2), (512, 512), (512, 2), (4096, 4096), (4096, 2))
MAX_INPUT_ELEMENTS = 1 << 22
# Then, where none of those runs, the lengths the model's own 2-D weights have (at most this many,
# shortest first): a text tower that adds its whole position table needs exactly that many tokens
# (keras-hub SigLIP's, 64 by default).
MAX_MODEL_SIZES = 16


def seeded_inputs(entry: g.Entry, seed: int = 0, batch: int = 2, positive: bool = False,
                  size: tuple[int, int] | None = None, composites: tuple = ()) -> list[np.ndarray]:
    """Deterministic inputs for an entry's flat placeholders (unknown dims become ``batch``; past
    the first dimension, ``size`` (floating-point inputs' size, other inputs' size) when given).

    Floats are standard normal, or uniform in [0.1, 1) with ``positive`` (for models whose
    outputs are NaN on negative inputs: a log, a sqrt); integers are 0 or 1 (valid token ids,
    class ids and indices of any table with two rows or more). ``composites``
    (composite_layout): the placeholders that are the components of a ragged or sparse input get
    those of a valid one: row splits that start at 0, rise and end at the values' length (rows
    of 1 to 3 values); sorted, distinct indices inside the dense shape (about a third filled)."""
    rng = np.random.RandomState(seed)
    values = [_seeded_array(rng, tf.as_dtype(info.dtype), _input_shape(info, batch, size), positive, entry)
              for info in entry.inputs]

    def sized(dims, dtype) -> list[int]:
        return [_past_first(dtype, batch, size) if d is None else d for d in dims]

    for positions, spec in composites:
        if isinstance(spec, tf.RaggedTensorSpec):
            inner = sized(spec.shape.as_list()[spec.ragged_rank + 1:], spec.dtype)
            rows = batch if spec.shape[0] is None else spec.shape[0]
            lengths = []
            for _ in range(spec.ragged_rank):
                lengths.append(rng.randint(1, 4, size=rows).astype(spec.row_splits_dtype.as_numpy_dtype))
                rows = int(lengths[-1].sum())
            flat = _seeded_array(rng, spec.dtype, [rows, *inner], positive, entry)
            value = tf.RaggedTensor.from_nested_row_lengths(flat, lengths)
        else:  # a SparseTensorSpec
            dense = [batch if spec.shape[0] is None else spec.shape[0], *sized(spec.shape.as_list()[1:], spec.dtype)]
            filled = np.flatnonzero(rng.uniform(size=int(np.prod(dense))) < 1 / 3)
            indices = np.stack(np.unravel_index(filled, dense), axis=1).astype(np.int64).reshape(-1, len(dense))
            value = tf.SparseTensor(indices, _seeded_array(rng, spec.dtype, [len(filled)], positive, entry), dense)
        components = tf.nest.flatten(value, expand_composites=True)
        if len(components) == len(positions):
            for position, component in zip(positions, components):
                values[position] = component.numpy()
    return values


def _seeded_array(rng, dtype, shape, positive: bool, entry) -> np.ndarray:
    if dtype.is_floating and positive:
        return rng.uniform(0.1, 1.0, shape).astype(dtype.as_numpy_dtype)
    if dtype.is_floating:
        return rng.standard_normal(shape).astype(dtype.as_numpy_dtype)
    if dtype.is_integer:
        return rng.randint(0, 2, size=shape).astype(dtype.as_numpy_dtype)
    if dtype == tf.bool:
        return rng.randint(0, 2, size=shape).astype(bool)
    if dtype == tf.string:  # words, a known one and an unknown one alike: both models get the same
        return rng.choice(np.array([b"a", b"the", b"graphprune", b""], dtype=object), size=shape)
    raise PassError(f"verify: cannot make inputs of dtype {dtype.name} for entry '{entry.name}'")


def composite_layout(model: g.TracedModel, entry: g.Entry) -> tuple:
    """((flat input positions, RaggedTensorSpec or SparseTensorSpec), ...) for each ragged or
    sparse input of ``entry``: from its own input structure, or for a signature that calls a
    method (a SavedModel's signature flattens such an argument into plain inputs), from the
    method's, through the alias."""
    def layout(structure) -> tuple:
        if not (isinstance(structure, tuple) and len(structure) == 2):
            return ()
        found, position = [], 0
        for leaf in tf.nest.flatten(structure):
            count = len(tf.nest.flatten(leaf, expand_composites=True)) if isinstance(leaf, tf.TypeSpec) else 0
            if isinstance(leaf, (tf.RaggedTensorSpec, tf.SparseTensorSpec)) and leaf.shape.rank:
                found.append((tuple(range(position, position + count)), leaf))
            position += count
        return tuple(found) if position == len(entry.inputs) else ()

    if entry.kind != "signature" or entry.alias is None:
        return layout(entry.input_structure)
    method_name, order = entry.alias[0], entry.alias[1]
    method = next((e for e in model.entries if e.kind == "method" and e.name == method_name and
                   len(e.inputs) == len(order)), None)
    if method is None:
        return ()
    at = {index: number for number, index in enumerate(order)}  # method input -> signature input
    return tuple((tuple(at[p] for p in positions), spec) for positions, spec in layout(method.input_structure))


def _input_shape(info, batch: int, size: tuple[int, int] | None) -> list[int]:
    """The shape seeded_inputs gives input ``info``: unknown dims ``batch``, past the first
    ``size`` (floating-point inputs' size, other inputs' size) when given."""
    past_first = _past_first(tf.as_dtype(info.dtype), batch, size)
    return [(past_first if i else batch) if d is None else d for i, d in enumerate(info.shape or (batch,))]


def _past_first(dtype, batch: int, size: tuple[int, int] | None) -> int:
    """The size seeded inputs give an unknown dimension past the first: ``batch``, or ``size``'s
    floating-point or other inputs' size."""
    return batch if size is None else size[0] if dtype.is_floating else size[1]


def run_entries(model: g.TracedModel, values, *, ones_masks: bool = True, seed: int = 0,
                positive: bool = False, random: str = "seeded", sizes: dict | None = None,
                sized_only: bool = False, given: dict | None = None, failed: list | None = None,
                only=None) -> dict:
    """Outputs of every non-update entry on seeded inputs, as {"kind:name": [arrays]}.

    Unknown input dimensions past the first take the first of INPUT_SIZES the entry runs on
    (PassError, in one line, when it runs on none). ``sizes`` ({"kind:name": size}) keeps the
    choice: an entry found there runs at that size only (so that a rewritten model runs on the
    inputs its original ran on, and its failure is an error), one that is not is tried and added.

    Random ops draw with fixed seeds (``random="seeded"``), or are constants of their shape
    (``"constant"``: for models whose random draws change shape, see constant_random_ops).

    ``sized_only``: run only the entries found in ``sizes``, and leave out (rather than fail on)
    an entry that does not run at its size (a second, longer size a model may refuse).

    ``given`` ({"kind:name": [arrays]}, from given_inputs): the inputs those entries run on instead
    of seeded ones; DataError (one line) where one fails on them.

    ``failed``: a list to append (label, PassError) to for each entry that runs on none of the
    inputs graphprune makes, left out, instead of raising. ``only``: the labels to run (all).

    Variables hold the values a pass would see (``PassContext.value``): live variables the graphs
    only read are used as they are (no copy of the weights), every variable a graph writes is a
    fresh copy, so the caller's variables are never changed; with ``ones_masks`` every mask is
    all ones.
    """
    context = PassContext(values=values)
    written = written_variables(model)
    live = {}
    for key, spec in model.variables.items():
        ones = ones_masks and spec.role == g.ROLE_MASK
        shared = None if ones or key in written else rebuild.shared_variable(values, key, spec)
        if shared is not None:  # only read: the live variable itself, not a copy of a weight
            live[key] = shared
            continue
        if ones:  # from the spec: the mask's own value is never read (nor copied)
            value = np.broadcast_to(np.ones((), tf.dtypes.as_dtype(spec.dtype).as_numpy_dtype), spec.shape)
        else:
            value = context.value(model, key)
        live[key] = rebuild.new_variable(value, dtype=spec.dtype, trainable=False)
    outputs = {}
    logger = logging.getLogger("tensorflow")  # one tf.function per entry: TF warns of 'retracing'
    level = logger.level
    logger.setLevel(max(level, logging.ERROR))
    try:
        for entry in model.entries:
            if entry.kind == "update" or sized_only and entry.label not in sizes or only is not None and \
                    entry.label not in only:
                continue
            fixed = constant_random_ops(entry) if random == "constant" else seeded_random_ops(entry)
            run = tf.function(_runner(fixed, live), autograph=False)
            if given and entry.label in given:
                try:
                    outputs[entry.label] = [np.asarray(t) for t in run(*given[entry.label])]
                except (ValueError, tf.errors.InvalidArgumentError) as error:
                    raise DataError(f"'{entry.label}' fails on the check_inputs given: {first_line(error)}") from error
                continue
            try:
                outputs[entry.label] = _run_sized(entry, run, seed, positive, {} if sizes is None else sizes,
                                                  _model_sizes(model), composite_layout(model, entry))
            except PassError as error:
                if failed is not None:
                    failed.append((entry.label, error))
                elif not sized_only:
                    raise
    finally:
        logger.setLevel(level)
    return outputs


def given_inputs(model: g.TracedModel, check_inputs) -> dict:
    """finalize's ``check_inputs``, as the flat arrays of each entry they are for: {label: [arrays]}.

    ``check_inputs`` is either what one call takes, for every entry it fits (a signature's keyword
    arguments as a dict; a method's single argument, a tuple of its positional arguments or a dict
    of them by parameter name), or a dict of such values by entry name (a signature's or a
    method's) for several entries that take different inputs. A value fits an entry where its
    nest matches the entry's inputs, each array's shape is compatible with its input's and its
    dtype casts to the input's within its kind (float64 to float32, int64 to int32). A signature
    that calls a method (as SavedModel signatures do) and that method share what either is given.
    DataError (one line) where a value fits none of the entries it is meant for, or a name is no
    entry's."""
    if check_inputs is None:
        return {}
    entries = [entry for entry in model.entries if entry.kind != "update"]
    names = {entry.name for entry in entries}
    if isinstance(check_inputs, Mapping) and check_inputs and set(check_inputs) <= names:
        wanted = dict(check_inputs)
    elif isinstance(check_inputs, Mapping) and any(key in names for key in check_inputs):
        missing = sorted(str(key) for key in check_inputs if key not in names)
        raise DataError(f"check_inputs: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not an entry of "
                        f"the model (its entries: {', '.join(sorted(names))}); key check_inputs by entry names only, "
                        "or give what one call takes")
    else:
        wanted = {None: check_inputs}
    given, reasons = {}, {}
    for name, value in wanted.items():
        for entry in entries:
            if name is not None and entry.name != name:
                continue
            flat = _flat_given(entry, value)
            if isinstance(flat, str):
                reasons.setdefault(name, []).append(f"{entry.label}: {flat}")
            else:
                given[entry.label] = flat
        if not any(entry.label in given for entry in entries if name is None or entry.name == name):
            where = f"entry '{name}'" if name is not None else "any entry of the model"
            raise DataError(f"check_inputs do not fit {where} ({'; '.join(reasons.get(name, []))})"[:600])
    _share_with_aliases(entries, given)
    return given


def _share_with_aliases(entries, given: dict) -> None:
    """A signature that calls a method and that method: each given the other's inputs, where
    only one of them was given any (the alias maps the signature's inputs to the method's)."""
    by_name = {}
    for entry in entries:
        by_name.setdefault(entry.name, []).append(entry)
    for signature in entries:
        if signature.alias is None:
            continue
        method_name, indices = signature.alias[0], signature.alias[1]
        for method in by_name.get(method_name, []):
            if method.kind != "method" or len(method.inputs) != len(indices):
                continue
            if signature.label in given and method.label not in given:
                flat = [None] * len(indices)
                for value, index in zip(given[signature.label], indices):
                    flat[index] = value
                if _fits_flat(method, flat) is None:
                    given[method.label] = flat
            elif method.label in given and signature.label not in given:
                flat = [given[method.label][index] for index in indices]
                if _fits_flat(signature, flat) is None:
                    given[signature.label] = flat


def _flat_given(entry: g.Entry, value) -> list[np.ndarray] | str:
    """``value`` as ``entry``'s flat input arrays, or why it does not fit (a phrase)."""
    structure = entry.input_structure
    if not (isinstance(structure, tuple) and len(structure) == 2):
        return "its inputs' structure is not known"
    args, kwargs = structure
    if entry.kind == "signature" or not args:
        candidates = [((), value)] if isinstance(value, Mapping) else []
        if not candidates:
            return f"it takes keyword arguments ({', '.join(sorted(kwargs))}), given a {type(value).__name__}"
    else:
        # keyword-only parameters keep their traced constants; an omitted positional one takes the
        # callable's default (training=False), so that only the trace made with it fits
        omitted = {key: _OMITTED for key in kwargs}
        parameters = entry.parameters[:len(args)]
        defaults = [entry.defaults.get(p, _OMITTED) for p in parameters]
        candidates = [((value, *defaults[1:]), omitted)] if args else []
        if isinstance(value, (tuple, list)) and 0 < len(value) <= len(args):
            candidates.append(((*value, *defaults[len(value):]), omitted))
        if isinstance(value, Mapping) and set(value) <= set(parameters) and value:
            candidates.append((tuple(value.get(p, d) for p, d in zip(parameters, defaults)), omitted))
    reason = takes = f"it takes ({', '.join(entry.parameters)})"
    for candidate in candidates:
        flat, paths = _flatten_like(structure, candidate, entry.parameters)
        if isinstance(flat, str):
            reason = flat
            continue
        if len(flat) != len(entry.inputs):
            reason = f"it has {len(entry.inputs)} flat inputs, the nest gives {len(flat)}"
            continue
        misfit = _fits_flat(entry, flat, paths)
        if misfit is None:
            return [_cast(value, info) for value, info in zip(flat, entry.inputs)]
        reason = misfit
    if isinstance(value, Mapping) and entry.kind == "method" and args:
        unknown = sorted(str(key) for key in value if key not in kwargs and key not in entry.parameters)
        if unknown and len(unknown) < len(value):  # some keys name parameters: the others are a mistake
            return f"it has no parameter {', '.join(repr(key) for key in unknown)}; {takes}"
    return reason


_OMITTED = object()


def _flatten_like(structure, value, parameters=()) -> tuple:
    """(``value``'s arrays at the TensorSpec leaves of ``structure`` ((args, kwargs), nests of
    specs and Python constants), their paths ('images', 'inputs/boxes', by ``parameters`` for
    the args)), or (why not, None): its other leaves (``training=False``) must be equal or omitted."""
    flat, paths, path = [], [], []

    def where(default):  # the path of the leaf walked, by parameter name
        names = list(path[1:])
        if path and path[0] == "0" and names and int(names[0]) < len(parameters):
            names[0] = parameters[int(names[0])]
        return "/".join(names) or default

    def walk(spec, given):
        if isinstance(spec, tf.TensorSpec):
            name = where(spec.name)
            if given is _OMITTED or given is None:
                raise _Misfit(f"no value for input '{name}'")
            flat.append(given)
            paths.append(name)
        elif isinstance(spec, Mapping):
            if given is _OMITTED and not _has_tensor(spec):
                return
            if not isinstance(given, Mapping) or set(given) != set(spec):
                keys = sorted(given) if isinstance(given, Mapping) else type(given).__name__
                raise _Misfit(f"takes keys {sorted(spec)}, given {keys}")
            for key in sorted(spec):
                path.append(str(key))
                walk(spec[key], given[key])
                path.pop()
        elif isinstance(spec, (tuple, list)):
            if given is _OMITTED and not _has_tensor(spec):
                return
            if not isinstance(given, (tuple, list)) or len(given) != len(spec):
                raise _Misfit(f"takes a sequence of {len(spec)}, given {type(given).__name__}")
            for number, (s, v) in enumerate(zip(spec, given)):
                path.append(str(number))
                walk(s, v)
                path.pop()
        elif isinstance(spec, tf.RaggedTensorSpec) and isinstance(given, tf.RaggedTensor) or \
                isinstance(spec, tf.SparseTensorSpec) and isinstance(given, tf.SparseTensor):
            # its components (values and row splits; indices, values and shape), as the entry flattens it
            for number, component in enumerate(tf.nest.flatten(given, expand_composites=True)):
                flat.append(component.numpy())
                paths.append(f"{where('composite')}/{number}")
        elif isinstance(spec, tf.TypeSpec):
            wanted = {tf.RaggedTensorSpec: "tf.RaggedTensor", tf.SparseTensorSpec: "tf.SparseTensor"}.get(type(spec))
            raise _Misfit(f"takes a {type(spec).__name__}, which check_inputs cannot give"
                          + (f" (give a {wanted})" if wanted else ""))
        elif given is not _OMITTED and not _same_constant(spec, given):
            raise _Misfit(f"was traced with {spec!r}, given {given!r}")

    try:
        walk(structure, value)
    except _Misfit as misfit:
        return str(misfit), None
    return flat, paths


class _Misfit(Exception):
    pass


def _has_tensor(spec) -> bool:
    return any(isinstance(leaf, tf.TypeSpec) for leaf in tf.nest.flatten(spec))


def _same_constant(spec, given) -> bool:
    try:
        return bool(spec == given)
    except (ValueError, TypeError):
        return False


def _fits_flat(entry: g.Entry, flat: list, paths=None) -> str | None:
    """Why ``flat`` cannot feed ``entry`` (a phrase naming the input by ``paths``, else by its
    placeholder), or None where every array fits its input."""
    for number, (value, info) in enumerate(zip(flat, entry.inputs)):
        name = paths[number] if paths else info.name
        try:
            array = np.asarray(value) if not isinstance(value, np.ndarray) else value
        except (ValueError, TypeError):
            return f"input '{name}' takes an array, given a {type(value).__name__} that is none"
        dtype = tf.as_dtype(info.dtype)
        if info.shape is not None and not tf.TensorShape(info.shape).is_compatible_with(array.shape):
            return f"input '{name}' takes shape {list(info.shape)}, given {list(array.shape)}"
        if dtype == tf.string:
            if array.dtype.kind not in "OSU":
                return f"input '{name}' takes strings, given {array.dtype}"
        elif dtype == tf.bool:
            if array.dtype.kind != "b":
                return f"input '{name}' takes bool, given {array.dtype}"
        elif not np.can_cast(array.dtype, dtype.as_numpy_dtype, "same_kind"):
            return f"input '{name}' takes {info.dtype}, given {array.dtype}"
    return None


def _cast(value, info) -> np.ndarray:
    """``value`` as an array of ``info``'s dtype (a copy only where the dtype differs)."""
    dtype = tf.as_dtype(info.dtype)
    array = np.asarray(value)
    if dtype == tf.string:
        return array.astype(object) if array.dtype.kind != "O" else array
    return array if array.dtype == dtype.as_numpy_dtype else array.astype(dtype.as_numpy_dtype)


def _model_sizes(model: g.TracedModel) -> tuple:
    """The sizes to try after INPUT_SIZES: the first axis of each 2-D variable (a position table's
    length), shortest first, at most MAX_MODEL_SIZES of them."""
    tried = {n for pair in INPUT_SIZES for n in pair}
    found = sorted({int(spec.shape[0]) for spec in model.variables.values() if len(spec.shape) == 2
                    and spec.shape[0] is not None and 2 < int(spec.shape[0]) <= 4096} - tried)
    return tuple((n, n) for n in found[:MAX_MODEL_SIZES])


def _run_sized(entry: g.Entry, run, seed: int, positive: bool, sizes: dict, more: tuple = (),
               composites: tuple = ()) -> list[np.ndarray]:
    """``run``'s outputs on seeded inputs of the first size the entry runs on (see run_entries):
    one of INPUT_SIZES, else one of ``more`` (_model_sizes). ``composites``: composite_layout."""
    if entry.label in sizes:
        try:
            inputs = seeded_inputs(entry, seed, positive=positive, size=sizes[entry.label],
                                   composites=composites)
            return [np.asarray(t) for t in run(*inputs)]
        except (ValueError, tf.errors.InvalidArgumentError) as error:
            raise PassError(f"'{entry.label}' fails on inputs (unknown dimensions of size {sizes[entry.label][0]} in "
                            f"floating-point inputs, {sizes[entry.label][1]} in others) that it ran on before: "
                            f"{first_line(error)}") from error
    unknown, first_error, bad_indices, tried = _has_unknown_sizes(entry), None, 0, set()
    for size in INPUT_SIZES + more if unknown else INPUT_SIZES[:1]:
        if size != INPUT_SIZES[0] and _largest_input(entry, size) > MAX_INPUT_ELEMENTS:
            continue
        tried.add(size[0])
        try:
            outputs = [np.asarray(t) for t in run(*seeded_inputs(entry, seed, positive=positive, size=size,
                                                                  composites=composites))]
        except (ValueError, tf.errors.InvalidArgumentError) as error:  # too short for a convolution, ...
            first_error = first_error or error
            if _bad_index(error):
                bad_indices += 1
                if bad_indices == 2:
                    break  # the values are wrong, not the sizes: longer inputs only cost memory
            continue
        sizes[entry.label] = size
        return outputs
    tried = f" (unknown dimensions of size {', '.join(str(n) for n in sorted(tried))} tried)"
    raise PassError(f"cannot run '{entry.label}' on the inputs graphprune makes{tried if unknown else ''}: "
                    f"{first_line(first_error)}")


_BAD_INDEX = re.compile(r"does not index into param shape|is not in \[0, ")


def _bad_index(error: Exception) -> bool:
    """Whether ``error`` is an op refusing an index out of range (a Gather, a GatherNd, ...).
    Two such refusals, at two sizes, mean the inputs' values are wrong for the model (keras-hub
    SAM 3 computes indices from box coordinates, which normal random values put off the image,
    and different gathers refuse at different sizes), and larger sizes cannot help: SAM 3 at 512
    boxes (and 2 tokens) took over 12 GB before its process was killed."""
    return bool(_BAD_INDEX.search(getattr(error, "message", None) or str(error)))


def longer_sizes(model: g.TracedModel, sizes: dict) -> dict:
    """For each entry of ``model`` with unknown input dimensions past the first, a size (as in
    ``sizes``, which run_entries chose) longer than the chosen one: 16 for 2 (8 times a size under
    16), twice a longer one. Errors that grow with the length (a rotary embedding's phase, a
    relative-position table) barely show on two tokens. Entries whose largest input would pass
    MAX_INPUT_ELEMENTS are left out."""
    longer = {}
    for entry in model.entries:
        if entry.label not in sizes or not _has_unknown_sizes(entry):
            continue
        size = tuple(max(16, 8 * n) if n < 16 else 2 * n for n in sizes[entry.label])
        if _largest_input(entry, size) <= MAX_INPUT_ELEMENTS:
            longer[entry.label] = size
    return longer


def _has_unknown_sizes(entry: g.Entry) -> bool:
    """Whether an input of ``entry`` has a dimension of unknown size past the first (the batch)."""
    return any(d is None for info in entry.inputs for d in (info.shape or ())[1:])


def _largest_input(entry: g.Entry, size: tuple[int, int], batch: int = 2) -> int:
    """How many elements the largest of seeded_inputs(entry, size=size) has (none is made)."""
    return max((int(np.prod(_input_shape(info, batch, size))) for info in entry.inputs), default=0)


def seeded_random_ops(entry: g.Entry) -> g.Entry:
    """The entry with every unseeded random op (Dropout in training mode, ...) given a fixed seed
    derived from its name, at any depth: two runs of a model and of its rewrite (which keeps node
    names) then draw the same numbers, so their outputs can be compared."""

    def seed(body):
        for node in body.nodes:
            if "seed" in node.attr and "seed2" in node.attr and not node.attr["seed"].i and not node.attr["seed2"].i:
                node.attr["seed"].i = 1
                node.attr["seed2"].i = 1 + zlib.crc32(node.name.encode()) % (2 ** 31 - 2)
                body.mark_changed()

    return b.rewrite_entry(entry, seed)[0]


def _constant_draw(op: str) -> float | None:
    """What constant_random_ops puts in place of a random op's draw: the middle of a uniform draw
    on [0, 1), the mean of a normal one, None for an integer draw (its lower bound, an input)."""
    if "Int" in op:
        return None
    return 0.5 if "Uniform" in op else 0.0


def constant_random_ops(entry: g.Entry) -> g.Entry:
    """The entry with every random op (channels.RANDOM_OPS) replaced, at any depth, by a Fill of its
    shape with a constant (under its name). A model whose channels were removed draws its dropout
    masks over fewer channels, so seeded draws cannot match its masked model's; with constants,
    the two compute the same thing wherever the masked model's outputs do not depend on the draw."""

    def fill(body):
        for node in list(body.nodes):
            if node.op not in RANDOM_OPS:
                continue
            inputs = body.data_inputs(node)
            index_type = next(node.attr[a].type for a in ("T", "Tshape") if a in node.attr)
            dtype = node.attr["Tout" if node.op == "RandomUniformInt" else "dtype"].type
            value = _constant_draw(node.op)
            if value is None:  # an integer draw: its lower bound
                bound = inputs[1] if node.op == "RandomUniformInt" else inputs[3]
            else:
                constant = body.add(g.const_node(f"{node.name}/constant_draw",
                                                 np.array(value, tf.dtypes.as_dtype(dtype).as_numpy_dtype),
                                                 tf.dtypes.as_dtype(dtype).name))
                bound = body.ref(constant.name)
            replacement = g.make_node(node.name, "Fill", [inputs[0], bound], T=tf.dtypes.as_dtype(dtype),
                                      index_type=tf.dtypes.as_dtype(index_type))
            replacement.input.extend(i for i in node.input if i.startswith("^"))
            body.replace(node, replacement)

    return b.rewrite_entry(entry, fill)[0]


def _runner(entry, live):
    def run(*flat):
        return rebuild.import_entry(entry, flat, live)

    return run


class Verifier:
    """``after_pass`` hook for run_pipeline: compares each pass's result with its input.

    ``ones_masks=True`` (rewriting): masks are forced to ones, so every pass must keep outputs.
    ``ones_masks=False`` (finalizing): the real masks are used, so folding must keep outputs too.
    """

    def __init__(self, values, *, ones_masks: bool = True, atol: float = 1e-5, rtol: float = 1e-5, seed: int = 0,
                 given: dict | None = None):
        self.values = values
        self.given = given  # {"kind:name": [arrays]}: the inputs those entries run on (given_inputs)
        self.ones_masks = ones_masks
        self.atol, self.rtol, self.seed = atol, rtol, seed
        self.report: list[tuple[str, str, int, float]] = []  # (pass, entry, output, max |diff|)
        self._last = (None, None)  # (model, its outputs): a pass's result is the next one's input
        self.positive = None  # decided on the first model: positive inputs if normal ones give NaN
        self.sizes = {}  # the input sizes each entry runs on, chosen on the first model (run_entries)

    def _outputs(self, model: g.TracedModel) -> dict:
        if self._last[0] is not model:
            if self.positive is None:
                outputs = run_entries(model, self.values, ones_masks=self.ones_masks, seed=self.seed, sizes=self.sizes,
                                      given=self.given)
                self.positive = any(_has_nan(o) for values in outputs.values() for o in values)
                if not self.positive:
                    self._last = (model, outputs)
                    return outputs
            self._last = (model, run_entries(model, self.values, ones_masks=self.ones_masks, seed=self.seed,
                                             positive=self.positive, sizes=self.sizes, given=self.given))
        return self._last[1]

    def __call__(self, pass_name: str, before: g.TracedModel, after: g.TracedModel) -> None:
        expected = self._outputs(before)
        actual = self._outputs(after)
        for entry_name, reference in expected.items():
            if entry_name not in actual:
                raise PassError(f"verify: pass '{pass_name}' dropped '{entry_name}' (every signature and function "
                                "must survive every pass)")
            if len(actual[entry_name]) != len(reference):
                raise PassError(f"verify: pass '{pass_name}' changed the outputs of '{entry_name}' from "
                                f"{len(reference)} to {len(actual[entry_name])}")
            for number, (want, got) in enumerate(zip(reference, actual[entry_name])):
                if want.shape != got.shape:
                    raise PassError(f"verify: pass '{pass_name}' changed the shape of output {number} of "
                                    f"'{entry_name}' from {want.shape} to {got.shape}")
                difference = max_difference(want, got)
                self.report.append((pass_name, entry_name, number, difference))
                numeric = want.dtype.kind in "fciub"
                if not (np.allclose(want, got, atol=self.atol, rtol=self.rtol, equal_nan=want.dtype.kind in "fc")
                        if numeric else np.array_equal(want, got)):
                    raise PassError(
                        f"verify: pass '{pass_name}' changed output {number} of '{entry_name}' "
                        f"by up to {difference:.3g} (atol {self.atol})"
                    )

    def summary(self) -> str:
        return format_report(self.report)


def _has_nan(array) -> bool:
    return array.dtype.kind in "fc" and bool(np.isnan(array).any())


def max_difference(want, got) -> float:
    """Largest |want - got|, NaN equal to NaN (where both have it); inf where only one has NaN."""
    if not want.size:
        return 0.0
    if want.dtype.kind not in "fciub":
        return 0.0 if np.array_equal(want, got) else float("inf")
    want, got = want.astype(np.float64), got.astype(np.float64)
    both = np.isnan(want) & np.isnan(got)
    if (np.isnan(want) ^ np.isnan(got)).any():
        return float("inf")
    difference = np.abs(np.where(both, 0.0, want - got))
    difference = np.where(np.isinf(want) & (want == got), 0.0, difference)
    return float(np.max(difference))


def optional_verifier(enabled: bool, values, *, ones_masks: bool = True, given: dict | None = None):
    """A Verifier when ``enabled`` (the ``verify=True`` / ``--verify`` switch), else None;
    ``given``: the inputs it runs those entries on (given_inputs), as finalize's check_inputs."""
    return Verifier(values, ones_masks=ones_masks, given=given) if enabled else None


def format_report(report) -> str:
    """One line per (pass, entry, output): the largest |difference| verification saw."""
    return "\n".join(f"  {p:22s} {e}[{n}]  max |diff| = {d:.3g}" for p, e, n, d in report or [])
