"""Sizes and sparsity of the prunable weights in any artifact: SavedModel dir or .tflite file.

For each weight: elements, nonzeros, sparsity, stored bytes raw and gzip, and the
information-theoretic lower bound for storing it at that sparsity:

    bound_bits = nonzeros * (bits per stored value) + elements * H(nonzeros / elements)

where H is the binary entropy (the cost of saying which elements are nonzero). A file can only
approach the bound; ``bound_ratio`` (gzip / bound) says how close it is.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import math
import os
import tarfile

import numpy as np

from graphprune import names
from graphprune.errors import BadModelError


@dataclasses.dataclass
class WeightSize:
    name: str
    op: str
    shape: list
    dtype: str
    elements: int
    nonzeros: int
    raw_bytes: int
    gzip_bytes: int
    encoding: str = "dense"

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzeros / self.elements if self.elements else 0.0

    @property
    def bound_bytes(self) -> float:
        return lower_bound_bytes(self.elements, self.nonzeros, value_bits(self.dtype))

    def to_dict(self) -> dict:
        row = dataclasses.asdict(self)
        row.update(sparsity=self.sparsity, bound_bytes=self.bound_bytes)
        return row


@dataclasses.dataclass
class SizeReport:
    path: str
    kind: str  # "saved_model" or "tflite"
    weights: list[WeightSize]
    file_bytes: int
    file_gzip_bytes: int
    skipped: dict = dataclasses.field(default_factory=dict)  # weight -> why it is not pruned

    @property
    def elements(self) -> int:
        return sum(w.elements for w in self.weights)

    @property
    def nonzeros(self) -> int:
        return sum(w.nonzeros for w in self.weights)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzeros / self.elements if self.elements else 0.0

    @property
    def bound_bytes(self) -> float:
        return sum(w.bound_bytes for w in self.weights)

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "kind": self.kind,
            "weights": [w.to_dict() for w in self.weights],
            "totals": {
                "elements": self.elements,
                "nonzeros": self.nonzeros,
                "sparsity": self.sparsity,
                "weight_raw_bytes": sum(w.raw_bytes for w in self.weights),
                "weight_gzip_bytes": sum(w.gzip_bytes for w in self.weights),
                "bound_bytes": self.bound_bytes,
                "file_bytes": self.file_bytes,
                "file_gzip_bytes": self.file_gzip_bytes,
                "gzip_level": REPORT_GZIP_LEVEL,
            },
            "skipped": dict(self.skipped),
        }

    def __str__(self) -> str:
        return self.table()

    def table(self) -> str:
        header = f"{'weight':40s} {'op':22s} {'shape':18s} {'sparsity':>8s} {'nonzeros':>10s} {'bytes':>10s} {'gzip -6':>10s} {'bound':>10s}"
        lines = [f"{self.kind}: {self.path}", header, "-" * len(header)]
        for w in self.weights:
            lines.append(
                f"{w.name[:40]:40s} {w.op[:22]:22s} {str(w.shape)[:18]:18s} {w.sparsity:8.4f} {w.nonzeros:10d} "
                f"{w.raw_bytes:10d} {w.gzip_bytes:10d} {w.bound_bytes:10.0f}"
            )
        lines.append("-" * len(header))
        lines.append(
            f"{'total (' + str(len(self.weights)) + ' weights)':40s} {'':22s} {self.elements:<18d} {self.sparsity:8.4f} "
            f"{self.nonzeros:10d} {sum(w.raw_bytes for w in self.weights):10d} "
            f"{sum(w.gzip_bytes for w in self.weights):10d} {self.bound_bytes:10.0f}"
        )
        lines.append(f"file: {self.file_bytes} bytes, gzip -{REPORT_GZIP_LEVEL} {self.file_gzip_bytes} bytes")
        lines += [f"not pruned: {key}: {reason}" for key, reason in sorted(self.skipped.items())]
        return "\n".join(lines)


def value_bits(dtype: str) -> int:
    return {"float64": 64, "float32": 32, "float16": 16, "bfloat16": 16, "int8": 8, "uint8": 8, "int16": 16,
            "int32": 32}.get(dtype, 32)


def binary_entropy(p: float) -> float:
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def lower_bound_bytes(elements: int, nonzeros: int, bits: int) -> float:
    if not elements:
        return 0.0
    return (nonzeros * bits + elements * binary_entropy(nonzeros / elements)) / 8.0


# size_report compresses at gzip level 6 (what `gzip` does by default): on a 100M-parameter,
# half-sparse weight it is 8x faster than level 9 (18 s against 155 s here) for 1% more bytes.
# The benchmarks and the demo, which compare with the reference toolkit's figures, use level 9.
REPORT_GZIP_LEVEL = 6


def gzip_size(data: bytes, level: int = 9) -> int:
    return len(gzip.compress(data, compresslevel=level, mtime=0))


def directory_bytes(path: str, level: int = 9) -> tuple[int, int]:
    """(raw bytes of all files, gzip of a tar of the directory)."""
    raw = 0
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for root, _, files in sorted(os.walk(path)):
            for name in sorted(files):
                full = os.path.join(root, name)
                raw += os.path.getsize(full)
                archive.add(full, arcname=os.path.relpath(full, path), recursive=False)
    return raw, gzip_size(buffer.getvalue(), level)


def _weight_size(name, op, array: np.ndarray, stored: bytes | None = None, encoding="dense") -> WeightSize:
    stored = array.tobytes() if stored is None else stored
    return WeightSize(name=name, op=op, shape=list(array.shape), dtype=str(array.dtype), elements=int(array.size),
                      nonzeros=int(np.count_nonzero(array)), raw_bytes=len(stored),
                      gzip_bytes=gzip_size(stored, REPORT_GZIP_LEVEL),
                      encoding=encoding)


# SavedModel ------------------------------------------------------------------------------------


def saved_model_weights(path: str) -> list[WeightSize]:
    """The prunable weights of a SavedModel: variables (masked ones as w * mask) or constants."""
    return _saved_model_weights(path)[0]


def _saved_model_weights(path: str):
    """(saved_model_weights, the weights that feed a prunable op but are not pruned, with why)."""
    import tensorflow as tf

    from graphprune import body as b
    from graphprune.analysis import PASS_THROUGH_OPS, RESHAPE_OPS, SLICE_OPS, find_prunable_weights, weight_operands
    from graphprune.load import load
    from graphprune.passbase import PassContext, VariableValues

    loaded = load(path)
    context = PassContext(values=VariableValues(loaded.variables))
    found: dict[str, WeightSize] = {}
    # Variable weights, also inside While/If bodies (masked ones as w * mask).
    weights, skipped = find_prunable_weights(loaded.model)
    for weight in weights:
        value = context.value(loaded.model, weight.key)
        if weight.mask is not None:
            value = value * context.value(loaded.model, weight.mask)
        found[weight.key] = _weight_size(weight.key, ",".join(weight.ops), value)
    # Frozen weights: one Const per entry that uses them, so each is counted in the first entry
    # that has it and recognized in the others by its content (a signature that calls a method
    # captures the method's constant under a generic name, so methods, whose captures carry the
    # weight's name, are read first). Within an entry, Consts of other names are other weights,
    # equal values or not (layers built from one seeded initializer start out equal).
    seen_content = set()

    def visit(body, contents):  # every body at any depth: frozen weights of loops and kept functions too
        for node in body.nodes:
            for _, raw in weight_operands(node):
                producer = body.producer(raw)
                while producer is not None and producer.op in (*PASS_THROUGH_OPS, *RESHAPE_OPS, *SLICE_OPS):
                    producer = body.producer(producer.input[0])
                if producer is not None and producer.op == "Const" and names.display_name(producer.name) not in found:
                    value = tf.make_ndarray(producer.attr["value"].tensor)
                    content = (value.shape, value.dtype.str, hashlib.sha1(value.tobytes()).hexdigest())
                    if value.ndim >= 2 and content not in seen_content:
                        contents.add(content)
                        name = names.display_name(producer.name)
                        found[name] = _weight_size(name, node.op, value)

    for entry in sorted(loaded.model.entries, key=lambda e: e.kind != "method"):
        contents = set()
        b.visit_entry(entry, lambda body, contents=contents: visit(body, contents))
        seen_content |= contents
    return list(found.values()), {key: reason for key, reason in skipped.items() if key not in found}


# TFLite ----------------------------------------------------------------------------------------

_TFLITE_WEIGHT_OPS = {"FULLY_CONNECTED": (1,), "CONV_2D": (1,), "DEPTHWISE_CONV_2D": (1,), "CONV_3D": (1,),
                      "TRANSPOSE_CONV": (1,), "BATCH_MATMUL": (0, 1)}
_TFLITE_PASS_THROUGH = ("DENSIFY", "DEQUANTIZE")
_TFLITE_TYPES = {0: np.float32, 1: np.float16, 2: np.int32, 3: np.uint8, 4: np.int64, 7: np.int16, 9: np.int8,
                 10: np.float64}


def tflite_weights(path: str) -> list[WeightSize]:
    """Constant weight tensors feeding FC/conv/batch-matmul ops (through DENSIFY/DEQUANTIZE)."""
    from graphprune.compat import tflite_schema

    schema = tflite_schema()

    with open(path, "rb") as handle:
        data = handle.read()
    try:
        model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(data, 0))
    except Exception as error:  # a broken flatbuffer raises anything
        raise BadModelError(f"{path}: not a readable .tflite file ({type(error).__name__})") from error
    op_names = {value: name for name, value in vars(schema.BuiltinOperator).items() if not name.startswith("_")}
    codes = [op_names.get(max(c.builtinCode, c.deprecatedBuiltinCode), "CUSTOM") for c in model.operatorCodes]
    weights, seen = [], set()
    for subgraph in model.subgraphs:
        producers = {int(out): op for op in subgraph.operators for out in op.outputs}
        for op in subgraph.operators:
            name = codes[op.opcodeIndex]
            if name not in _TFLITE_WEIGHT_OPS:
                continue
            for operand in _TFLITE_WEIGHT_OPS[name]:
                if operand >= len(op.inputs) or op.inputs[operand] < 0:
                    continue
                tensor_index = int(op.inputs[operand])
                while tensor_index in producers and codes[producers[tensor_index].opcodeIndex] in _TFLITE_PASS_THROUGH:
                    tensor_index = int(producers[tensor_index].inputs[0])
                tensor = subgraph.tensors[tensor_index]
                buffer = model.buffers[tensor.buffer]
                if buffer.data is None or len(buffer.data) == 0 or (id(subgraph), tensor_index) in seen:
                    continue
                seen.add((id(subgraph), tensor_index))
                weights.append(_tflite_weight(tensor, bytes(bytearray(buffer.data)), name))
    return weights


def _tflite_weight(tensor, stored: bytes, op: str) -> WeightSize:
    dtype = _TFLITE_TYPES.get(tensor.type, np.uint8)
    values = np.frombuffer(stored, dtype=dtype)
    shape = [int(d) for d in tensor.shape] if tensor.shape is not None else [values.size]
    elements = int(np.prod(shape))
    name = tensor.name.decode() if isinstance(tensor.name, bytes) else str(tensor.name)
    if tensor.sparsity is None:
        return WeightSize(name=name, op=op, shape=shape, dtype=np.dtype(dtype).name, elements=elements,
                          nonzeros=int(np.count_nonzero(values)), raw_bytes=len(stored),
                          gzip_bytes=gzip_size(stored, REPORT_GZIP_LEVEL))
    index_bytes = _sparsity_index_bytes(tensor.sparsity)
    return WeightSize(name=name, op=op, shape=shape, dtype=np.dtype(dtype).name, elements=elements,
                      nonzeros=int(np.count_nonzero(values)), raw_bytes=len(stored) + index_bytes,
                      gzip_bytes=gzip_size(stored, REPORT_GZIP_LEVEL) + index_bytes, encoding="tflite-sparse")


def _sparsity_index_bytes(sparsity) -> int:
    total = 0
    for dimension in sparsity.dimMetadata or []:
        for vector in (dimension.arraySegments, dimension.arrayIndices):
            values = getattr(vector, "values", None)
            if values is not None:
                total += np.asarray(values).nbytes
    return total


def size_report(path) -> SizeReport:
    """Per-weight and total sizes, sparsity and lower bound for a SavedModel dir or a .tflite file."""
    path = os.fspath(path)
    if os.path.isdir(path):
        weights, skipped = _saved_model_weights(path)
        raw, zipped = directory_bytes(path, REPORT_GZIP_LEVEL)
        return SizeReport(path=path, kind="saved_model", weights=weights, file_bytes=raw, file_gzip_bytes=zipped,
                          skipped=skipped)
    if os.path.isfile(path):
        with open(path, "rb") as handle:
            data = handle.read()
        if data[:4] == b"PK\x03\x04":
            raise BadModelError(f"{path}: a zip archive (an .npz?), not a .tflite file or a SavedModel directory")
        return SizeReport(path=path, kind="tflite", weights=tflite_weights(path), file_bytes=len(data),
                          file_gzip_bytes=gzip_size(data, REPORT_GZIP_LEVEL))
    raise BadModelError(f"{path}: no such SavedModel directory or .tflite file")
