"""Channel dependency groups: which slices of which weights must be removed together.

A *channel space* is one axis of one tensor: an axis of an activation (channels are last, NHWC;
attention heads are an axis of their own), an axis of a variable or of a constant. Ops say
which spaces are the same channels, and every op accounts for every axis of its tensors (an axis
it does not keep is poisoned):

    Conv2D(x, w) -> y           x[..., c] ~ w[:, :, c, :] (consumer, "in");  y[..., c] ~ w[..., c] ("out")
    MatMul(x, w) -> y           x[:, c] ~ w[c, :] ("in");                   y[:, c] ~ w[:, c] ("out")
    DepthwiseConv2dNative       x[..., c] ~ y[..., c] ~ w[:, :, c, 0] ("through")
    Conv2D with one channel per group (groups = channels, Keras's Conv2D(groups=C))
                                x[..., c] ~ y[..., c] ~ w[:, :, 0, c] ("through")
    Conv2D with G groups of several channels (ResNeXt's, RegNet's)   x's channels are G groups x
                                the kernel's inputs, y's G groups x outputs (_refine_factors): an
                                input or output index goes from every group; the groups are kept
    BiasAdd, FusedBatchNorm, elementwise ops (Add/Mul/... with broadcast), activations, pooling,
    resizing (ResizeBilinear & co.), Pad, Mean over other axes, Squeeze/ExpandDims, Identity/Cast, comparisons and logical ops,
    SpaceToBatchND/BatchToSpaceND (a dilated conv)   the same channels
    Conv2D on ExpandDims(kernel) (Keras's Conv1D)     the kernel's own axes (as Conv2D's)
    Conv2DBackpropInput(shape, w, x) -> y (Keras's Conv2DTranspose; Conv3DBackpropInputV2 alike)
                                x[..., c] ~ w[:, :, :, c] ("in");  y[..., c] ~ w[:, :, c, :] ("out"); the
                                output shape operand's channel count is rewritten
    RandomUniform & co. of shape Shape(x)   x's axes (a dropout mask; its shape follows x's)
    ConcatV2 on the last axis   each input is a slice of the output's channels
    Einsum (q = x.Wq "abc,cde->abde")  each letter one space: the head axis of Wq, Wk, Wv, their
                                biases and the output projection's are one group (whole heads)
    BatchMatMul, Transpose, Softmax     batch axes and permuted axes go through; contracted axes of
                                two activations are one space (a MatMul of two 2-D activations too);
                                Softmax's own axis is poisoned
    Reshape keeping the last axis      the same channels
    Reshape flattening [N, H, W, C] -> [N, H*W*C] into a MatMul        rows p * C + c of the kernel
    Reshape merging two axes [.., h, d] -> [.., h*d] (or a kernel [D, h, d] -> [D, h*d]), and the
                                Reshape splitting it back: h and d stay two spaces, followed
                                through the (Batch)MatMul on the reshaped kernel (Keras's
                                EinsumDense as keras-hub ViT runs it)
    Reshape splitting a last axis [.., h*d] -> [.., h, d] (attention over a 2-D dense kernel), or a
                                merged axis read as one: channel i of the flat axis is (i // d, i % d),
                                so every space carrying it becomes two, heads and head dims, and each
                                member two: blocks of d and period d (_refine_factors); heads split
                                again (key/value groups, rotary pairs) are refined again, and so is
                                a split in three ([.., 3 * h * d] -> [.., 3, h, d]: a fused
                                query-key-value kernel); one that also meets a slice (Concat) or a
                                flatten is left whole
    Reshape keeping static trailing axes (leading ones regrouped)   those axes go through
    Reshape keeping, splitting and merging axes at once (blocks of equal size: [B, C, H, W] ->
                                [B, heads, d, H * W])   each block as the one-axis rules read it
    ReadVariableOp / AssignVariableOp / Const                          the variable's / constant's axis
    DepthToSpace / SpaceToDepth (block b, channels last)   the deep side's channels as b * b block
                                positions (kept whole) x the shallow side's channels, refined as
                                heads x head dims are
    Range of constant bounds (rotary inverse frequencies)    a constant's axis (shrunk: gathered)
    a slice of one whole head of a split axis (rotary halves: tf.split of the head dims)   the
                                head dims, channel for channel; the heads (halves) are kept whole
    GatherV2 / ResourceGather (axis 0)  an embedding table's axes after the first are the lookup's
    StridedSlice, Slice, Tile, BroadcastTo  an axis taken whole, repeated once or of the same size
                                goes through (a size written in a shape operand is rewritten); a
                                bound the graph computes cuts its own axis only
    Shape, read as one size     into a shape that follows the tensor: followed; into scalar
                                arithmetic and then float math or an output (1 / sqrt(head dims)):
                                shrink_channels writes the size it had (Analysis.numbers); into
                                nothing: no effect; into anything else: the axis is left whole
    Sum over the channels (an L2 norm)   read as a product of two activations is (below): a removed
                                channel adds what it holds (_summed)
    Mean over the channels alone (a layer norm)   with analyze(through_means=True) it does not
                                poison: insert_masks makes it a mean over the kept channels
                                (names.kept_mean), which later analyses accept: by default where its
                                group is not a residual stream (is_stream), with prune's
                                residual_stream everywhere (tf-keras's fused layer norm: the
                                unfuse_layer_norms pass makes it Means)
    TensorListFromTensor / Reserve / GetItem / SetItem / Stack (tf.TensorArray, RNN loops)
                                a list's element axes are spaces of their own (_Entry.list_spaces):
                                the tensors written to and read from it are the same channels, and
                                element shape operands are rewritten
    If / Case / While           each input is the same channels as the bodies' argument, each
                                output as the bodies' return (a loop body's return i also as its
                                argument i: the loop carries it); the bodies are read like the
                                top graph, at any depth, with shapes inferred from the call's inputs;
                                an argument that is a weight read outside (a branch's, or a loop's
                                that the loop hands back unchanged) is that weight

Connected spaces (networkx, after splitting spaces where a Concat puts a slice boundary) form a
*group*: removing channel i of a group removes index i of every member. A group is left whole,
with the reason, when an op graphprune does not model touches it (Softmax, a Mean over the
channels as in LayerNorm, Shape, a loop that changes a channel count, ...), when it reaches an entry's
inputs or outputs, or when a member variable is used where graphprune does not look. An op that
no output needs and that has no effect (a Keras layer's key/value cache, stacked and dropped) is
not read: it never runs, and shrink_channels strips it before it rewrites anything.

A group is *prunable* when it has at least one consumer member ("in": a kernel that contracts
over the channel) and every such member is a masked weight: a channel whose consumer slices are
all zero computes nothing the model uses, so removing it from every member (``shrink_channels``)
leaves the outputs unchanged, whatever the producer, bias or normalization parameters hold.
Channels contracted between two activations (attention's query/key head dims) are read by the
product instead: it loses nothing when a removed channel is zero in one operand (a projection
without a bias, rotated or not), or constant in both (a bias left) and the product only feeds
softmaxes through shifts (_when_removed, _shift_only). Otherwise (a bias then rotated, a table
of relative positions, a sigmoid of the scores) analyze(..., through_products=True) lets it
through and insert_masks multiplies one operand by the kept channels (names.kept_product), which
later analyses accept; where it cannot (no kernel tells those channels in that axis's order, the
contracted axis not last, a product inside a function body), the group is left whole.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import types_pb2

from graphprune import body as b
from graphprune import graph as g
from graphprune import names
from graphprune.analysis import live_roots
from graphprune.errors import GraphPruneError

UNARY_OPS = {"Identity", "Cast", "Snapshot", "StopGradient", "Relu", "Relu6", "Elu", "Selu", "LeakyRelu", "Sigmoid",
             "Tanh", "Softplus", "Softsign", "Erf", "Erfc", "Exp", "Expm1", "Neg", "Abs", "Square", "Sqrt", "Rsqrt",
             "Reciprocal", "Inv", "Log", "Log1p", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Gelu",
             "PreventGradient", "EnsureShape", "CheckNumerics", "LogicalNot", "ZerosLike", "OnesLike"}
ELEMENTWISE_OPS = {"Add", "AddV2", "Sub", "Mul", "RealDiv", "Div", "DivNoNan", "Maximum", "Minimum",
                   "SquaredDifference", "Pow", "BiasAdd", "SelectV2", "ClipByValue", "AddN", "MulNoNan", "FloorDiv",
                   "Greater", "GreaterEqual", "Less", "LessEqual", "Equal", "NotEqual", "LogicalAnd", "LogicalOr"}
RANDOM_OPS = {"RandomUniform", "RandomStandardNormal", "TruncatedNormal", "RandomUniformInt", "StatelessRandomUniform",
              "StatelessRandomNormal", "StatelessTruncatedNormal", "StatelessRandomUniformV2",
              "StatelessRandomNormalV2", "StatelessTruncatedNormalV2", "StatelessRandomUniformIntV2"}
POOL_OPS = {"MaxPool", "AvgPool", "MaxPool3D", "AvgPool3D"}
RESIZE_OPS = {"ResizeBilinear", "ResizeNearestNeighbor", "ResizeBicubic", "ResizeArea", "ScaleAndTranslate"}
REDUCE_OPS = {"Mean", "Sum", "Max", "Min", "Prod"}
BATCH_NORM_OPS = {"FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3"}
CONTROL_FLOW_OPS = {"If", "StatelessIf", "Case", "StatelessCase", "While", "StatelessWhile"}
ASSIGN_OPS = {"AssignVariableOp", "AssignSubVariableOp", "AssignAddVariableOp"}
IGNORED_OPS = {"NoOp", "Placeholder", "Const", "ReadVariableOp", "VarHandleOp"}
UNSIZED = "its size is not known statically"
MEETS_UNSIZED = "it meets a tensor whose channel count is not known statically"


@dataclasses.dataclass(frozen=True)
class Member:
    """Channels [start, stop) of a group lie at ``axis`` of a variable (kind "variable", name its
    key) or of a constant (kind "const", name "entry label/node"), at indices start + i, or, with a
    period (a flattened [.., C] feeding a kernel's rows; a head's dimension in an axis split
    into heads), at p * period + start + i for every p, or, with a block (a head of an axis split
    into heads of ``block`` values), at (start + i) * block + r for every r < block; with both (heads
    split again: the query heads that share a key/value head), at (p * period + start + i) * block + r."""

    kind: str
    name: str
    axis: int
    start: int
    stop: int
    period: int | None
    role: str
    block: int | None = None

    def indices(self, dim: int, channels) -> np.ndarray:
        """The indices along the axis (of length ``dim``) of the group's ``channels``: cycle by
        cycle (with a period), channel by channel, each over its block."""
        channels = np.asarray(channels, np.int64) + self.start
        block = self.block or 1
        if self.period is not None:
            cycles = dim // (self.period * block)
            channels = (np.arange(cycles, dtype=np.int64)[:, None] * self.period + channels[None, :]).reshape(-1)
        if self.block is not None:
            return (channels[:, None] * self.block + np.arange(self.block, dtype=np.int64)[None, :]).reshape(-1)
        return channels


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
    name: str
    size: int
    members: tuple[Member, ...]
    reason: str | None = None  # why it is left whole; None when it is prunable
    # consumed by a product of two activations read by softmaxes only (attention's query/key head
    # dims): a channel is dead when every kernel that makes it holds zeros there too (and every
    # kernel that reads it, if any does)
    contracted: bool = False

    @property
    def prunable(self) -> bool:
        return self.reason is None

    def weight_members(self, keys) -> tuple[Member, ...]:
        """The members that are variables among ``keys`` (kernels: in, out or through)."""
        return tuple(m for m in self.members if m.kind == "variable" and m.name in keys and m.role != "param")


@dataclasses.dataclass(frozen=True)
class Reshape:
    """A Reshape whose shape operand must change with its input's channels (or a BroadcastTo's
    shape, a Slice's size: the operand at ``operand``; its last element is rewritten)."""

    entry: str
    node: str
    space: tuple
    repeats: int  # 1: the last axis is kept; > 1: flattened (the last dim is repeats * channels)
    operand: int = 1


@dataclasses.dataclass(frozen=True)
class ShapeDim:
    """One element of a Reshape's (or Fill's) constant shape operand that must become the product
    of the (shrunk) sizes of ``spaces``: where two axes are merged or split (attention heads), or
    a kept axis of a constant shape."""

    entry: str
    node: str
    position: int
    spaces: tuple
    operand: int = 1  # the shape operand: a Fill's is 0
    # the whole operand's value where it is computed from constants alone (tf.repeat's shape under a
    # static signature, where tf.shape folds to a Const): shrink_channels writes a Const in its place
    static: tuple | None = None


@dataclasses.dataclass(frozen=True)
class SplitSite:
    """A Split or SplitV along a channel axis (DINOv2's fused SwiGLU kernel, CSPNet's halves):
    shrink_channels makes it a SplitV whose part sizes are the parts' kept channel counts
    (``spaces``: each part's cut axis)."""

    entry: str
    node: str
    spaces: tuple


@dataclasses.dataclass(frozen=True)
class SliceSite:
    """A StridedSlice or Slice that takes channels [start, stop) of ``space`` (one axis, stride 1:
    Keras 3's GRU cuts its gates so): shrink_channels writes the kept counts before ``start`` and
    ``stop`` into its begin and end (or size) operands at ``index``."""

    entry: str
    node: str
    index: int  # the element of the begin/end/size operands that bounds the channel axis
    space: tuple
    start: int
    stop: int
    operands: tuple = ()  # the begin and end (a Slice's size) operands' values, as analyzed


@dataclasses.dataclass(frozen=True)
class ScaleSite:
    """A Mul(batch, heads) that makes the size of an axis holding the batch merged with heads
    (ViTDet's and SAM's [3, B * heads, N, d]): shrink_channels writes the kept count of ``space``
    (the heads) over its constant operand at ``operand``."""

    entry: str
    node: str
    operand: int
    space: tuple


@dataclasses.dataclass(frozen=True)
class MeanSite:
    """A Mean over the channels of ``space`` alone (a layer norm's mean or variance) at the top
    graph of ``entry``: with ``analyze(..., through_means=True)`` it does not keep its channels'
    group whole; insert_masks then makes it a mean over the kept channels (names.kept_mean)."""

    entry: str
    node: str
    space: tuple


@dataclasses.dataclass(frozen=True)
class ProductSite:
    """A product of two activations over ``space`` (attention's query/key head dims) read by more
    than softmaxes (ViTDet's relative position tables, GPT-OSS's sinks concatenated to the scores),
    in the top graph of ``entry``: with ``analyze(..., through_products=True)`` it does not keep its
    channels' group whole; insert_masks then multiplies input ``operand`` of ``node``, whose last
    axis is ``space``, by the group's 0/1 channels (names.kept_product), so a removed channel adds
    exactly zero to the product, as it adds nothing once removed."""

    entry: str
    node: str
    operand: int
    space: tuple


@dataclasses.dataclass(frozen=True)
class TableSite:
    """Output axis ``axis`` of ``node`` (a Tile of copies of a table made from constants and
    shapes alone: DINOv3's rotary angles) in ``entry``, whose channels are ``space``: the table
    is not followed back (its own axis need not be one a slice can cut: two coordinates times the
    frequencies), shrink_channels gathers the kept channels of its output instead."""

    entry: str
    node: str
    axis: int
    space: tuple


class _Graph:
    """The spaces and their relations, built entry by entry."""

    def __init__(self, model: g.TracedModel, through_means: bool = False, through_products: bool = False):
        self.model = model
        self.through_means = through_means
        self.through_products = through_products
        self.products: list[ProductSite] = []
        self.tables: list[TableSite] = []
        self.means: list[MeanSite] = []
        self.sizes: dict[tuple, int] = {}
        self.edges: list[tuple[tuple, tuple, int]] = []  # (a, b, offset): a[i] is b[i + offset]
        self.poisoned: dict[tuple, str] = {}
        self.poisoned_variables: dict[str, str] = {}
        self.roles: dict[tuple, str] = {}
        self.reshapes: list[Reshape] = []
        self.dims: list[ShapeDim] = []
        self.splits: list[SplitSite] = []
        self.slice_sites: list[SliceSite] = []
        self.squeezes: list[tuple[str, str, tuple]] = []  # (entry, Squeeze with no dims, the axes it drops)
        self.counts: list[tuple[str, str, tuple]] = []  # (entry, a Tile's scalar count of copies, their axis)
        self.factors: list[tuple] = []  # (space, heads, head dims): an axis split into heads (_refine_factors)
        self.refined: dict[tuple, tuple] = {}  # a space -> its (heads, head dims) parts
        self.sizes_before_refining: dict[tuple, int] = {}
        self.refined_parts: set[tuple] = set()  # spaces _refine_factors made (periods of its own)
        # spaces contracted between two activations -> whether every such product is read by
        # softmaxes only, through ops that keep a shift of all its values a shift (_shift_only)
        self.contracted: dict[tuple, bool] = {}
        # a TensorList (an RNN's inputs and outputs, read and written step by step in a loop) ->
        # its elements' static shape: element axis k is space key + (k,) (_Entry.list_spaces)
        self.lists: dict[tuple, tuple] = {}
        # The batch merged with heads (_batch_heads): an axis of unknown size that a Reshape makes
        # from [.., B, heads, ..] -> [.., B * heads, ..] carries the heads, each over every batch
        # element. Such an axis (an origin, with the heads' count) is followed through the links
        # of unknown-size axes (loose) once every entry is read; a Reshape back [.., B, heads, ..]
        # (splits) joins the heads again; the sizes read of such axes (size_reads) and the shape
        # elements written for them (dim_elements) must follow them.
        self.unsized: set = set()
        self.loose: list[tuple[tuple, tuple, int]] = []
        self.batch_origins: dict[tuple, int] = {}
        self.batch_splits: list[tuple[tuple, tuple, str]] = []  # (merged axis, heads axis, Reshape)
        self.batch_sides: list[tuple[tuple, tuple, str]] = []  # (a batch axis, its merged axis, Reshape)
        self.dim_elements: dict[ShapeDim, tuple] = {}
        self.size_reads: list[tuple[tuple, tuple | None, str]] = []
        self.scales: list[ScaleSite] = []
        self.numbers: list[tuple[str, str, tuple]] = []  # (entry, a size read as a number, its axis)
        self.reasons: dict[tuple, list[str]] = {}  # every reason an unknown-size axis was poisoned for

    def space(self, space: tuple, size) -> tuple | None:
        if space in self.batch_origins:
            return space
        if size is None or int(size) < 0:  # -1: a shape computed as unknown
            self.unsized.add(space)
            self.poison(space, UNSIZED)
            return space
        self.sizes[space] = int(size)
        return space

    def link(self, a: tuple | None, c: tuple | None, offset: int = 0) -> None:
        if any(space in self.unsized or space in self.batch_origins for space in (a, c)) and None not in (a, c):
            self.loose.append((a, c, offset))  # followed by _batch_heads where it carries heads
        if a in self.batch_origins or c in self.batch_origins:
            for space in (a, c):
                self.poison(space, MEETS_UNSIZED)
        elif a in self.sizes and c in self.sizes and 0 <= offset and self.sizes[a] + offset <= self.sizes[c]:
            self.edges.append((a, c, offset))
        elif a in self.sizes and c in self.sizes:  # a's channels do not fit in c's: never the same channels
            for space in (a, c):
                self.poison(space, "it meets a tensor of another channel count")
        else:  # a tensor of unknown rank or size: its channels cannot be followed
            for space in (a, c):
                if space is not None:
                    self.poison(space, MEETS_UNSIZED)

    def poison(self, space: tuple, reason: str) -> None:
        self.poisoned.setdefault(space, reason)
        if space in self.unsized or space in self.batch_origins:
            self.reasons.setdefault(space, []).append(reason)

    def batch_origin(self, space: tuple, heads: tuple, size: int) -> None:
        """``space``, an axis of unknown size, is the batch merged with ``heads`` (of ``size``)."""
        self.batch_origins[space] = size
        self.sizes[space] = size
        self.unsized.discard(space)
        self.edges.append((heads, space, 0))

    def member(self, kind: str, name: str, axis: int, size, role: str, period=None) -> tuple:
        space = ("v" if kind == "variable" else "c", name, axis, period)
        self.space(space, size)
        if role != "param" or space not in self.roles:
            self.roles[space] = role
        return space


class _Entry:
    """Reads one entry's top-level graph into a _Graph.

    Every op accounts for every axis of its inputs and outputs: a handler links the axes that
    carry the same channels (``link``) and says which ones merely broadcast (``claim``); every
    other axis of the op's tensors is poisoned after it, so an axis can only reach a kernel
    through ops that keep it (a spatial axis a Transpose makes last, then a MatMul contracts, is
    never shrunk through the convolution that made it)."""

    def __init__(self, graph: _Graph, entry: g.Entry, body: b.Body | None = None, shapes: dict | None = None):
        self.graph = graph
        self.entry = entry
        # The top graph, or a function body (a loop's, a branch's) reached from it (_call).
        self.body = body if body is not None else b.top_body(entry.graph_def, dict(entry.resources), writable=False)
        self.shapes = shapes if shapes is not None else _static_shapes(entry, graph.model)
        # What strip_unused deletes before shrink_channels (no output or effect needs it: it never
        # runs) links no axes and poisons none (a Keras layer's key/value cache stacked and then
        # dropped would otherwise tie the keys' channels to the values').
        self.live = b.live_nodes(self.body, live_roots(self.body, entry, {}))
        for node in self.body.nodes:  # tf.tensordot's computed reshapes: known from static shapes
            shape = self.shapes.get((node.name, 0))
            if node.op == "Reshape" and shape is not None and None in shape:
                value = _evaluate(self, node.input[1], 0)
                if isinstance(value, list) and len(value) == len(shape):
                    self.shapes[(node.name, 0)] = [d if d is not None else v for d, v in zip(shape, value)]
        self.periodic: dict[str, tuple] = {}  # flattened tensor ref -> its channel space
        # Two adjacent axes merged into one (attention heads and head_dim, as Keras's EinsumDense
        # runs on a reshaped kernel): tensor ref -> (axis, (outer space, inner space)), and a
        # reshaped weight's ref -> (the weight operand, first merged axis). Only the consumers
        # below may read them (handled); any other poisons the spaces (_merged_consumers).
        self.merged: dict[str, tuple[int, tuple]] = {}
        self.merged_kernels: dict[str, tuple[str, int]] = {}
        self.handled: set = set()  # (merged ref, consumer node)
        # Shape(t) nodes -> t, and those whose every use follows t's channels (_sizes_read)
        self.shape_reads: dict[str, str] = {}
        self.followed_shapes: set = set()
        self.claimed: set = set()
        self.failed: str | None = None
        # a body's arguments that are a weight read outside (tf-keras's RNN loops pass their
        # kernels in): argument name -> the weight's source (_call)
        self.arg_sources: dict[str, tuple] = {}

    def shape(self, ref: str):
        name, index, _ = self.body.parse(ref)
        return self.shapes.get((name, index))

    def tensor(self, ref: str, axis: int = -1) -> tuple | None:
        """The space of ``axis`` of tensor ``ref`` (None for a scalar or a tensor of unknown rank)."""
        name, index, _ = self.body.parse(ref)
        shape = self.shapes.get((name, index))
        if shape is None or len(shape) == 0 or not -len(shape) <= axis < len(shape):
            return None
        axis %= len(shape)
        return self.graph.space(("t", self.entry.label, self.node_id(name), index, axis), shape[axis])

    def list_spaces(self, ref: str) -> list | None:
        """The spaces of the element axes of TensorList ``ref`` (None if no handler made them)."""
        name, index, _ = self.body.parse(ref)
        key = ("l", self.entry.label, self.node_id(name), index)
        sizes = self.graph.lists.get(key)
        return None if sizes is None else [self.graph.space(key + (k,), size) for k, size in enumerate(sizes)]

    def new_list(self, ref: str, sizes) -> list:
        """TensorList ``ref`` holds elements of static shape ``sizes``: its element spaces."""
        name, index, _ = self.body.parse(ref)
        self.graph.lists[("l", self.entry.label, self.node_id(name), index)] = tuple(sizes)
        return self.list_spaces(ref)

    def node_id(self, name: str) -> str:
        """A node's (or argument's) name, prefixed by the path of the body it is in (nothing at
        the top): how shrink_channels finds it again (Body.use_name)."""
        return self.body.path_name(name)

    def link(self, a: tuple | None, c: tuple | None, offset: int = 0) -> None:
        self.claimed.update(space for space in (a, c) if space is not None)
        self.graph.link(a, c, offset)

    def claim(self, ref: str, axis: int) -> None:
        """Axis ``axis`` of ``ref`` only broadcasts here (size 1): nothing to link, nothing lost."""
        space = self.tensor(ref, axis)
        if space is not None:
            self.claimed.add(space)

    def poison_tensor(self, ref: str, reason: str, axes=None) -> None:
        shape = self.shape(ref)
        for axis in range(len(shape or ())) if axes is None else axes:
            space = self.tensor(ref, axis)
            if space is not None:
                self.graph.poison(space, reason)
        source = self.source(ref)
        if axes is None and source is not None and source[0] == "variable":
            self.graph.poisoned_variables.setdefault(source[1], reason)
        if ref in self.periodic:
            self.graph.poison(self.periodic[ref], reason)

    def origin(self, ref: str, masks: bool = False):
        """The node making ``ref`` behind Identity/Cast (and, with ``masks``, a mask multiply)."""
        behind = self.behind(ref, masks)
        return None if behind is None else self.body.producer(behind)

    def behind(self, ref: str, masks: bool = False) -> str | None:
        """``ref`` behind Identity/Cast (and, with ``masks``, a mask multiply): the first tensor
        that is not one of those (None past b.MAX_DEPTH of them)."""
        for _ in range(b.MAX_DEPTH):
            node = self.body.producer(ref)
            passes = node is not None and (node.op in ("Identity", "Cast", "Snapshot") or
                                           (masks and node.op == "Mul" and names.is_masked_node(node.name)))
            if not passes:
                return ref
            ref = node.input[0]
        return None

    def argument(self, ref: str) -> str | None:
        """The body argument ``ref`` is (behind Identity/Cast and a mask multiply), else None."""
        behind = self.behind(ref, masks=True)
        if behind is None or not self.body.is_function or self.body.producer(behind) is not None:
            return None
        return self.body.parse(behind)[0]

    def source(self, ref: str):
        """("variable", key) or ("const", entry label/node) a weight operand reads (through Identity,
        Cast and a mask multiply), else None."""
        node = self.origin(ref, masks=True)
        if node is None and self.arg_sources:  # an argument: a weight its call hands in?
            return self.arg_sources.get(self.argument(ref))
        if node is not None and node.op == "ReadVariableOp":
            key = self.body.read_key(node)
            return ("variable", key) if key is not None else None
        if node is not None and node.op == "Const":
            return ("const", f"{self.entry.label}/{self.node_id(node.name)}")
        return None

    def flattened(self, ref: str) -> bool:
        """Whether ``ref`` is (through Identity/Cast) a Reshape flattening [N, ..., C] to 2-D."""
        node = self.origin(ref)
        return (node is not None and node.op == "Reshape" and self.body.ref(node.name) not in self.merged
                and _flattens(self.shape(node.input[0]), self.shape(node.name)))

    def outputs_of(self, node) -> list[str]:
        count = 0
        while (node.name, count) in self.shapes:
            count += 1
        return [self.body.ref(node.name, i) for i in range(count)]

    def unknown(self, node, reason: str | None = None) -> None:
        """Every axis of the op's inputs and outputs is poisoned (after the handler returns)."""
        self.failed = self.failed or reason or f"{node.op} '{node.name}' uses it (an op graphprune does not model)"
        for ref in self.body.data_inputs(node):
            key = self.body.resource_key(ref)
            if key is not None:
                self.graph.poisoned_variables.setdefault(key, self.failed)

    def same(self, ref_a: str, ref_b: str, node, axes=None) -> None:
        """Link the axes of two tensors of one rank (all of them, or ``axes``)."""
        sa, sb = self.shape(ref_a), self.shape(ref_b)
        if sa is None or sb is None or len(sa) != len(sb):
            self.unknown(node, f"{node.op} '{node.name}' has an operand of unknown rank")
            return
        for axis in range(len(sa)) if axes is None else axes:
            self.link(self.tensor(ref_a, axis), self.tensor(ref_b, axis))

    def weight(self, node, operand: str, axis: int, role: str):
        """The member space of a weight operand's ``axis`` (None if the operand is not a plain
        variable or constant read, a Transpose of one: a tied embedding's output projection, or an
        ExpandDims of one: a Conv1D's kernel); the operand's own axis is linked to it."""
        source, shape = self.source(operand), self.shape(operand)
        if shape is None:
            return None
        axis %= len(shape)
        source_axis = axis
        if source is None:
            view = self.origin(operand, masks=True)
            if view is not None and view.op in ("StridedSlice", "Slice"):  # a part of a kernel (a GRU's gates)
                return self.weight_part(view, operand, axis, role)
            if view is None or view.op not in ("Transpose", "ExpandDims"):
                return None
            source, argument = self.source(view.input[0]), _constant(self, view.input[1])  # perm, or dim
            if source is None or argument is None:
                return None
            if view.op == "ExpandDims":  # a Conv1D's kernel [k, in, out] read as [1, k, in, out]
                inserted = int(np.ravel(argument)[0]) % len(shape)
                if axis == inserted:
                    return None
                source_axis = axis - (axis > inserted)
            elif argument.size != len(shape):
                return None
            else:
                source_axis = int(np.ravel(argument)[axis])
        member = self.graph.member(source[0], source[1], source_axis, shape[axis], role)
        self.link(self.tensor(operand, axis), member)
        return member

    def weight_part(self, view, operand: str, axis: int, role: str):
        """A weight's axis ``axis`` read through a StridedSlice or Slice ``view`` (the slice's
        handler links the operand's axes to the weight read's, a part at its offset): the member is
        the weight's whole axis; the operand's own space is what the caller links."""
        inner = self.body.data_inputs(view)[0]
        source, whole = self.source(inner), self.shape(inner)
        moved = view.op == "StridedSlice" and (_attr(view, "shrink_axis_mask", "i", 0) or
                                               _attr(view, "new_axis_mask", "i", 0))
        if source is None or whole is None or moved or len(whole) != len(self.shape(operand)):
            return None  # an axis indexed away or added: the axes do not line up
        self.link(self.tensor(inner, axis), self.graph.member(source[0], source[1], axis, whole[axis], role))
        return self.tensor(operand, axis)

    def returns(self) -> list[str]:
        """What this body hands back: the entry's outputs, or a function's returned tensors."""
        if self.body.is_function:
            return [self.body.proto.ret[arg.name] for arg in self.body.proto.signature.output_arg]
        return list(self.entry.outputs)

    def run(self) -> None:
        if not self.body.is_function:  # a body's arguments and returns are linked by its call (_call)
            for info in self.entry.inputs:
                self.poison_tensor(self.body.ref(info.placeholder), f"it is an input of {self.entry.label}")
            for ref in self.entry.outputs:
                self.poison_tensor(ref, f"it is an output of {self.entry.label}")
        for node in self.body.nodes:
            if node.name not in self.live:
                continue
            handler = _HANDLERS.get(node.op)
            if node.op in UNARY_OPS:
                handler = _unary
            elif node.op in ELEMENTWISE_OPS:
                handler = _elementwise
            elif node.op in IGNORED_OPS:
                handler = _ignored
            if node.op == "Max" and names.kept_mean_part(node.name) == "keep_max" or \
                    node.op != "Const" and names.kept_product_part(node.name) in ("view", "cut", "keep_max"):
                handler = _claim_all
            self.claimed, self.failed = set(), None
            dims = len(self.graph.dims)
            if handler is not None:
                handler(self, node)
            else:
                self.unknown(node)
            for dim in self.graph.dims[dims:]:
                if dim.node == self.node_id(node.name) and any(space in self.graph.unsized for space in dim.spaces):
                    self.graph.dim_elements[dim] = self._element(node, dim)
            self._settle(node)
        for ref in list(self.periodic):
            self._periodic_consumers(ref)
        self._merged_consumers()
        self._sizes_read()

    def _element(self, node, dim: ShapeDim) -> tuple:
        """What element ``dim.position`` of ``node``'s shape operand is, for an axis of unknown
        size: ("inferred",) for a -1, ("follows", space) for the size of axis ``space`` read by
        Shape and an index, else ("other",)."""
        producer = self.body.producer(self.body.data_inputs(node)[dim.operand])
        if _literal_minus_one(self, producer, dim.position):
            return ("inferred",)
        if producer is None or producer.op != "Pack" or _attr(producer, "axis", "i", 0) != 0:
            return ("other",)
        element = self.body.data_inputs(producer)[dim.position]
        index = self.origin(element)
        shape = None if index is None or index.op != "StridedSlice" else self.origin(index.input[0])
        if shape is None or shape.op != "Shape" or self.shape(shape.input[0]) is None:
            return ("other",)
        picked = _elements_picked(self, index, len(self.shape(shape.input[0])))
        if len(picked) != 1 or not _attr(index, "shrink_axis_mask", "i", 0) & 1:
            return ("other",)
        return ("follows", self.tensor(shape.input[0], picked.pop()))

    def _size_targets(self, index) -> tuple | None:
        """(entry, Reshape, position) of every shape element a scalar ``index`` of a Shape becomes
        (through Identity/Cast and a Pack), or None where it goes anywhere else."""
        targets, pending = [], [index]
        while pending:
            node = pending.pop()
            for reader, position in self._readers(self.body.ref(node.name)):
                if reader.op in ("Identity", "Cast"):
                    pending.append(reader)
                elif reader.op != "Pack" or _attr(reader, "axis", "i", 0) != 0:
                    return None
                else:
                    for reshape, operand in self._readers(self.body.ref(reader.name)):
                        if reshape.op != "Reshape" or operand != 1:
                            return None
                        targets.append((self.entry.label, self.node_id(reshape.name), position))
        return tuple(targets)

    def _sizes_read(self) -> None:
        """A static size of t read by Shape(t) into something that does not follow t's channels
        (a reshape of another tensor to t's shape) would hand the shrunk model t's new size where
        the old one is needed: such axes of t are poisoned."""
        for name, t in self.shape_reads.items():
            ts = self.shape(t)
            if not ts:
                continue
            for reader, _ in self._consumers(name):
                picked = sorted(_elements_picked(self, reader, len(ts)))
                one = reader.op == "StridedSlice" and _attr(reader, "shrink_axis_mask", "i", 0) & 1  # a scalar
                if name in self.followed_shapes:  # shapes that follow the tensor's own channels
                    if self._number_read(reader):  # ... and a number: the shrunk one has both or neither
                        for a in picked:
                            if ts[a] is not None:
                                self.graph.poison(self.tensor(t, a), f"Shape '{name}' reads its size into a number "
                                                                     "as well as into a shape that follows it")
                    continue
                for a in picked:
                    if ts[a] is None and self.tensor(t, a) in self.graph.unsized:  # heads merged with the batch?
                        self.graph.size_reads.append((self.tensor(t, a), self._size_targets(reader) if one else None,
                                                      self.node_id(name)))
                    elif ts[a] is not None:
                        uses = self._number_uses(reader) if one and len(picked) == 1 else None
                        if uses == "value":  # 1 / sqrt(head dims): the shrunk model reads the size it had
                            self.graph.numbers.append((self.entry.label, self.node_id(reader.name), self.tensor(t, a)))
                        elif uses is None:
                            self.graph.poison(self.tensor(t, a), f"Shape '{name}' reads its size into "
                                                                 f"{reader.op} '{reader.name}'")

    def _number_read(self, reader) -> bool:
        """Whether shape arithmetic from ``reader`` (of a Shape) makes a float number anywhere."""
        pending, seen = [reader], {reader.name}
        while pending:
            node = pending.pop()
            if node.op not in SHAPE_ARITHMETIC and node.op not in _NUMBER_OPS:
                continue  # a shape operand (a Reshape's, a Fill's) ends it
            if _floating(node):
                return True
            for consumer, _ in self._consumers(node.name):
                if consumer.name not in seen:
                    seen.add(consumer.name)
                    pending.append(consumer)
        return False

    def _number_uses(self, reader) -> str | None:
        """How the scalar size a StridedSlice of a Shape picks is used: "dead" where nothing reads
        it (Keras 3's dot_product_attention reads the key's size and ignores it when given a
        scale), "value" where it only becomes a number, through scalar arithmetic, in float math
        with tensors or in an output (ESM's 1 / sqrt(head dims)), else None (a shape or a count)."""
        outputs = {self.body.parse(ref)[0] for ref in self.returns()}
        pending, seen, value = [reader], {reader.name}, False
        while pending:
            node = pending.pop()
            if node.name in outputs and self.body.is_function:
                return None  # handed to the caller, which may make it a shape
            value = value or node.name in outputs
            for consumer, position in self._consumers(node.name):
                if consumer.input[position].startswith("^") or consumer.op not in _NUMBER_OPS:
                    return None
                if consumer.name in seen:
                    continue
                seen.add(consumer.name)
                shape = self.shape(self.body.ref(consumer.name))
                if shape is not None and len(shape) == 0:
                    pending.append(consumer)  # still a scalar made from the size
                elif shape is not None and _floating(consumer) and \
                        not any(_made_of_constants(self, ref) for ref in self.body.data_inputs(consumer)
                                if self.body.source(ref) != node.name):
                    value = True  # a float tensor: the size is a number in it, no longer a size
                else:
                    return None  # an integer vector (a shape?) or a rank not known
        return "value" if value else "dead"

    def _settle(self, node) -> None:
        """Poison the axes the handler did not account for (all of them if it gave up)."""
        if node.op in ("Placeholder", "NoOp", "VarHandleOp"):
            return
        why = self.failed or f"{node.op} '{node.name}' does not keep this axis"
        for ref in self.body.data_inputs(node) + self.outputs_of(node):
            for space in self.list_spaces(ref) or ():  # a TensorList's elements
                if self.failed or space not in self.claimed:
                    self.graph.poison(space, why)
            shape = self.shape(ref)
            for axis in range(len(shape or ())):
                space = self.tensor(ref, axis)
                if space is not None and (self.failed or space not in self.claimed):
                    self.graph.poison(space, why)
            if self.failed and ref in self.periodic:
                self.graph.poison(self.periodic[ref], why)

    def _merged_consumers(self) -> None:
        outputs = {self.body.parse(ref)[:2] for ref in self.returns()}
        for ref, (axis, spaces) in self.merged.items():
            why = self._unhandled(ref, outputs)
            if why is None:
                continue
            if self.body.parse(ref)[:2] in outputs:
                for space in spaces:
                    self.graph.poison(space, why)
            else:  # read as one axis of heads x head dims: what reads it follows that axis's channels
                self.graph.factors.append((self.tensor(ref, axis), *spaces))
        for ref, (operand, _) in self.merged_kernels.items():
            why = self._unhandled(ref, outputs)
            if why is not None:
                self.poison_tensor(operand, why)

    def _consumers(self, name: str) -> list:
        """(node, input position) of every live node that reads node ``name``."""
        return [(node, position) for node, position in self.body.consumers(name) if node.name in self.live]

    def _readers(self, ref: str):
        """(consumer, input position) of every op that reads tensor ``ref`` (not control edges)."""
        name, index, _ = self.body.parse(ref)
        for consumer, position in self._consumers(name):
            raw = consumer.input[position]
            if not raw.startswith("^") and self.body.parse(raw)[1] == index:
                yield consumer, position

    def _unhandled(self, ref: str, outputs) -> str | None:
        """Why a merged tensor is read by something that does not model its merged axis, or None."""
        if self.body.parse(ref)[:2] in outputs:
            return f"it is an output of {self.entry.label}, merged with another axis"
        for consumer, _ in self._readers(ref):
            if (ref, consumer.name) not in self.handled:
                return f"{consumer.op} '{consumer.name}' reads it merged with another axis"
        return None

    def _periodic_consumers(self, ref: str) -> None:
        space = self.periodic[ref]
        for consumer, position in self._readers(ref):
            if consumer.op in ("Identity", "Cast", "Snapshot"):
                self.periodic[self.body.ref(consumer.name)] = space
                self._periodic_consumers(self.body.ref(consumer.name))
                continue
            transposed = consumer.op in MATMUL_2D and (_attr(consumer, "transpose_a", "b", False) or
                                                       _attr(consumer, "transpose_b", "b", False))
            if consumer.op not in MATMUL_2D or position != 0 or transposed:
                self.graph.poison(space, f"{consumer.op} '{consumer.name}' reads a flattened tensor")
                continue
            source = self.source(consumer.input[1])
            shape = self.shape(consumer.input[1])
            if source is None or shape is None:
                self.graph.poison(space, f"MatMul '{consumer.name}' multiplies a flattened tensor by a computed value")
                continue
            period = self.graph.sizes[space]
            member = self.graph.member(source[0], source[1], 0, period, "in", period=period)
            self.graph.link(space, member)


def _attr(node, name: str, field: str, default):
    """An attr's value, without adding the attr to the node (reading a missing key of a
    protobuf map inserts it)."""
    if name not in node.attr:
        return default
    value = getattr(node.attr[name], field)
    return list(value.i) if field == "list" else value


def _ignored(self: _Entry, node) -> None:
    """Constants and variable reads: each axis is the constant's or the variable's."""
    shape = self.shape(node.name)
    if node.op == "Const":
        for axis, size in enumerate(shape or ()):
            self.link(self.tensor(node.name, axis),
                      self.graph.member("const", f"{self.entry.label}/{self.node_id(node.name)}", axis, size,
                                        "param"))
    elif node.op == "ReadVariableOp":
        key = self.body.read_key(node)
        if key is None:
            self.unknown(node)
            return
        for axis, size in enumerate(shape or ()):
            self.link(self.tensor(node.name, axis), self.graph.member("variable", key, axis, size, "param"))


def _range(self: _Entry, node) -> None:
    """tf.range of constant bounds (a rotary embedding's inverse frequencies): its values are a
    constant's, which shrink_channels can gather the kept ones of; computed bounds (the positions
    of a sequence) are not modelled."""
    shape = self.shape(node.name)
    bounds = [self.origin(ref) for ref in self.body.data_inputs(node)[:3]]
    if not shape or shape[0] is None or any(bound is None or bound.op != "Const" for bound in bounds):
        self.unknown(node)
        return
    self.link(self.tensor(node.name, 0),
              self.graph.member("const", f"{self.entry.label}/{self.node_id(node.name)}", 0, shape[0], "param"))


def _unary(self: _Entry, node) -> None:
    inputs = self.body.data_inputs(node)
    if _attr(node, "T", "type", None) == types_pb2.DT_RESOURCE or \
            _attr(node, "DstT", "type", None) == types_pb2.DT_RESOURCE:
        return  # a resource handle passed on (the inliner's Identity): its reads are what count
    if not inputs or self.shape(inputs[0]) is None or self.shape(node.name) is None:
        self.unknown(node)
        return
    self.same(inputs[0], node.name, node)
    _link_lists(self, inputs[0], self, node.name)  # an Identity of a TensorList: the same elements
    for ref in inputs[1:]:  # ClipByValue-style bounds: scalars
        if self.shape(ref):
            self.unknown(node)


def _broadcast(self: _Entry, node, inputs) -> None:
    """Elementwise with NumPy broadcasting: operand axes aligned from the right with the output's
    carry the same channels where their sizes are equal; size-1 axes only broadcast."""
    out = self.shape(node.name)
    if out is None:
        self.unknown(node)
        return
    for ref in inputs:
        shape = self.shape(ref)
        if shape is None or len(shape) > len(out):
            self.unknown(node)
            return
        shift = len(out) - len(shape)
        for axis, size in enumerate(shape):
            target = out[axis + shift]
            if size == 1 and target != 1:
                self.claim(ref, axis)
            elif size == target or size is None or target is None:  # an unknown size: linked, and so
                self.link(self.tensor(ref, axis), self.tensor(node.name, axis + shift))  # poisoned
            else:
                self.unknown(node, f"{node.op} '{node.name}' broadcasts sizes graphprune cannot tell apart")
                return


def _elementwise(self: _Entry, node) -> None:
    if node.op == "BiasAdd" and _attr(node, "data_format", "s", b"") not in (b"", b"NHWC"):
        self.unknown(node)
        return
    _broadcast(self, node, self.body.data_inputs(node))


def _softmax(self: _Entry, node) -> None:
    """Every axis but the last (which it normalizes over: all its channels count) is kept."""
    x = self.body.data_inputs(node)[0]
    shape = self.shape(x)
    if not shape:
        self.unknown(node)
        return
    self.same(x, node.name, node, axes=range(len(shape) - 1))
    why = f"{node.op} '{node.name}' normalizes over the channels"
    self.poison_tensor(x, why, axes=[len(shape) - 1])
    self.poison_tensor(node.name, why, axes=[len(shape) - 1])


def _conv(self: _Entry, node) -> None:
    x, w = self.body.data_inputs(node)[:2]
    xs, ws = self.shape(x), self.shape(w)
    if _attr(node, "data_format", "s", b"") not in (b"", b"NHWC", b"NDHWC") or xs is None or ws is None:
        self.unknown(node)
        return
    if xs[-1] != ws[-2] and ws[-2] == 1 and ws[-1] == xs[-1]:  # one channel per group: a depthwise conv
        _channel_through_kernel(self, node, x, w, len(ws) - 1, len(ws) - 2)
        return
    if xs[-1] != ws[-2]:
        _grouped_conv(self, node, x, w, xs, ws)
        return
    _link_kernel(self, node, self.tensor(x), w, (-2, "in"), (-1, "out"))
    self.link(self.tensor(x, 0), self.tensor(node.name, 0))  # the batch


def _conv_transpose(self: _Entry, node) -> None:
    """Conv2DBackpropInput(output shape, kernel [h, w, out, in], x) (Keras's Conv2DTranspose; and
    Conv3DBackpropInputV2, kernel [d, h, w, out, in]: Conv3DTranspose): x's channels are the
    kernel's last axis ("in"), the output's the one before ("out"), and the batch goes through. The
    output's channel count is the last element of the output shape operand (a Const, or a Pack
    whose element is one): shrink_channels rewrites it (a ShapeDim on operand 0)."""
    sizes, w, x = self.body.data_inputs(node)[:3]
    xs, ws, ys = self.shape(x), self.shape(w), self.shape(node.name)
    producer = self.body.producer(sizes)
    rank = 5 if node.op == "Conv3DBackpropInputV2" else 4
    if _attr(node, "data_format", "s", b"") not in (b"", b"NHWC", b"NDHWC") or not xs or not ws or not ys or \
            len(ws) != rank or xs[-1] != ws[-1] or ys[-1] is None or \
            not _constant_elements(self, producer, [rank - 1]):
        self.unknown(node, f"{node.op} '{node.name}' of computed output channels or groups")
        return
    if not _link_kernel(self, node, self.tensor(x), w, (rank - 1, "in"), (rank - 2, "out")):
        return
    self.link(self.tensor(x, 0), self.tensor(node.name, 0))
    self.graph.dims.append(ShapeDim(self.entry.label, self.node_id(node.name), rank - 1,
                                    (self.tensor(node.name, rank - 1),), operand=0))
    self.claim(sizes, 0)


def _list_element_shape(self: _Entry, node, operand: int, spaces: list) -> None:
    """A TensorList op's element shape operand: where it spells out a channel count (a Const, or a
    Pack element shrink_channels can rewrite: a ShapeDim), that count follows the element axis;
    one spelled out otherwise would keep the old count, so the axis is poisoned."""
    ref = self.body.data_inputs(node)[operand]
    value, producer = _constant(self, ref), self.body.producer(ref)
    self.claim(ref, 0)
    if value is None or value.ndim != 1 or len(value) != len(spaces):
        return  # unknown (-1, or unknown rank): nothing written to rewrite
    for k, (element, space) in enumerate(zip(value.tolist(), spaces)):
        if element < 0 or space not in self.graph.sizes:
            continue
        if _constant_elements(self, producer, [k]):
            self.graph.dims.append(ShapeDim(self.entry.label, self.node_id(node.name), k, (space,), operand=operand))
        else:
            self.graph.poison(space, f"{node.op} '{node.name}' writes its size in a computed element shape")


def _tensor_list(self: _Entry, node) -> None:
    """TensorList ops, as tf.TensorArray and Keras's RNN loops use them: a list's elements are
    tensors of one static shape, each element axis a space (_Entry.list_spaces) that FromTensor
    (the axes after the first: one element per step), GetItem, SetItem and Stack link to the
    tensors read and written; the element shape operands follow (_list_element_shape)."""
    inputs = self.body.data_inputs(node)
    if node.op == "TensorListFromTensor":  # (tensor, element_shape)
        xs = self.shape(inputs[0])
        if not xs:
            self.unknown(node)
            return
        spaces = self.new_list(node.name, xs[1:])
        for k, space in enumerate(spaces):
            self.link(self.tensor(inputs[0], k + 1), space)
        self.claim(inputs[0], 0)
        _list_element_shape(self, node, 1, spaces)
    elif node.op == "TensorListReserve":  # (element_shape, num_elements)
        value = _constant(self, inputs[0])
        if value is None or value.ndim != 1:
            self.unknown(node, f"TensorListReserve '{node.name}' of an unknown element shape")
            return
        spaces = self.new_list(node.name, [None if d < 0 else d for d in value.tolist()])
        self.claimed.update(spaces)  # new elements: what writes them says which channels they are
        _list_element_shape(self, node, 0, spaces)
    elif node.op in ("TensorListGetItem", "TensorListStack"):  # (list, index, element_shape) / (list, element_shape)
        spaces, out = self.list_spaces(inputs[0]), self.shape(node.name)
        first = 1 if node.op == "TensorListStack" else 0  # a stack's first axis: the steps
        if spaces is None or out is None or len(out) != len(spaces) + first:
            self.unknown(node)
            return
        for k, space in enumerate(spaces):
            self.link(space, self.tensor(node.name, k + first))
        if first:
            self.claim(node.name, 0)
        _list_element_shape(self, node, 2 if node.op == "TensorListGetItem" else 1, spaces)
    elif node.op == "TensorListSetItem":  # (list, index, item)
        spaces, item = self.list_spaces(inputs[0]), self.shape(inputs[2])
        if spaces is None or item is None or len(item) != len(spaces):
            self.unknown(node)
            return
        for k, (space, out) in enumerate(zip(spaces, self.new_list(node.name, item))):
            self.link(space, out)
            self.link(self.tensor(inputs[2], k), out)
    else:  # TensorListLength: the elements are not read
        for space in self.list_spaces(inputs[0]) or ():
            self.claimed.add(space)


LIST_OPS = ("TensorListFromTensor", "TensorListReserve", "TensorListGetItem", "TensorListStack",
            "TensorListSetItem", "TensorListLength")


def _grouped_conv(self: _Entry, node, x: str, w: str, xs, ws) -> None:
    """A conv with G groups (TensorFlow reads them off the shapes: G = x's channels // the kernel's
    input channels, ResNeXt's and RegNet's Conv2D(groups=G)): x's channel g * cin + i is group g's
    input i, the output's g * cout + j group g's output j (the kernel's column g * cout + j reads
    kernel rows i of group g's inputs alone). So x's channels are split into groups x inputs, the
    output's into groups x outputs (_refine_factors, as heads x head dims): an input index goes from
    every group at once (kernel row i, "in"), an output index too (kernel columns j of every group);
    the groups themselves are kept (a whole group, both its input and its output slices, could go
    too, but with its inputs pruned as well that would compound), unless each reads one input.
    After shrink_channels the conv reads G' = kept channels // kept inputs groups, in the same order."""
    channels, inputs, outputs = xs[-1], ws[-2], ws[-1]
    if channels is None or inputs is None or outputs is None or channels % inputs or outputs % (channels // inputs):
        self.unknown(node, f"grouped {node.op} '{node.name}' of unknown or uneven groups")
        return
    count = channels // inputs
    groups, group_inputs, group_outputs = (
        self.graph.space(("t", self.entry.label, self.node_id(node.name), part, 0), size)
        for part, size in (("groups", count), ("group inputs", inputs), ("group outputs", outputs // count)))
    if not _link_kernel(self, node, group_inputs, w, (-2, "in"), (-1, "out")):
        return
    if inputs > 1:  # a group count kept, as Torch-Pruning keeps it: half the groups and half of
        # each group's inputs would remove three quarters of x's channels at 50%
        self.graph.poison(groups, f"they are the {count} groups of grouped {node.op} '{node.name}', kept "
                                  "(each group's inputs and outputs are pruned instead)")
    self.graph.factors.append((self.tensor(x), groups, group_inputs))
    self.graph.factors.append((self.tensor(node.name), groups, group_outputs))
    self.claim(x, -1)
    self.link(self.tensor(x, 0), self.tensor(node.name, 0))  # the batch


def _link_kernel(self: _Entry, node, reads: tuple | None, w: str, rows: tuple, columns: tuple) -> bool:
    """The channels space ``reads`` (x's, or a grouped conv's inputs within a group) is kernel w's
    axis ``rows[0]``, the op's output channels its ``columns[0]`` (each with its role); an operand
    that is not a plain variable or constant read poisons both (False)."""
    consumed = self.weight(node, w, *rows)
    produced = self.weight(node, w, *columns)
    if consumed is None or produced is None:
        self.unknown(node, f"{node.op} '{node.name}' reads a computed kernel")
        return False
    self.link(reads, consumed)
    self.link(self.tensor(node.name), produced)
    return True


def _depthwise(self: _Entry, node) -> None:
    x, w = self.body.data_inputs(node)[:2]
    ws = self.shape(w)
    if _attr(node, "data_format", "s", b"") not in (b"", b"NHWC") or ws is None or ws[-1] != 1:
        self.unknown(node, f"DepthwiseConv2dNative '{node.name}' with a channel multiplier")
        return
    _channel_through_kernel(self, node, x, w, 2, 3)


def _channel_through_kernel(self: _Entry, node, x: str, w: str, axis: int, single: int) -> None:
    """A depthwise conv: output channel c reads input channel c alone, through kernel axis ``axis``
    ("through"); the kernel's axis ``single`` has size 1; the batch goes through."""
    _link_kernel(self, node, self.tensor(x), w, (axis, "through"), (axis, "through"))
    self.claim(w, single)
    self.link(self.tensor(x, 0), self.tensor(node.name, 0))


MATMUL_2D = ("MatMul", "SparseMatMul")  # SparseMatMul: tf.matmul's a_is_sparse / b_is_sparse hints


def _matmul(self: _Entry, node) -> None:
    a, w = self.body.data_inputs(node)[:2]
    if node.op in MATMUL_2D:
        transpose_a, transpose_w = _attr(node, "transpose_a", "b", False), _attr(node, "transpose_b", "b", False)
    else:
        transpose_a, transpose_w = _attr(node, "adj_x", "b", False), _attr(node, "adj_y", "b", False)
    ws, xs, ys = self.shape(w), self.shape(a), self.shape(node.name)
    if w in self.merged_kernels:
        _merged_kernel_matmul(self, node, a, w, transpose_a or transpose_w)
        return
    if not _weight_operand(self, a) and not _weight_operand(self, w):  # two activations (2-D ones too)
        _batch_matmul(self, node, a, w, transpose_a, transpose_w)
        return
    if node.op in MATMUL_2D and not xs and ys and len(ys) == 2 and ws is not None and len(ws) == 2 and \
            self.source(a) is None:
        # a 2-D product of an activation whose shape TensorFlow could not infer (made by ops of a
        # library such as tensorflow_text, or from a ragged tensor): its columns are known, so the
        # kernel's output channels go; its rows and the activation's axes are poisoned after it
        cols = self.weight(node, w, 0 if transpose_w else 1, "out")
        if cols is None:
            self.unknown(node, f"{node.op} '{node.name}' multiplies two computed tensors")
            return
        self.link(self.tensor(node.name), cols)
        return
    if self.source(a) is not None or transpose_a or ws is None or len(ws) != 2 or not xs or not ys:
        self.unknown(node)
        return
    flattened = node.op in MATMUL_2D and self.flattened(a)  # rows linked by _periodic_consumers
    rows = None if flattened else self.weight(node, w, 1 if transpose_w else 0, "in")
    cols = self.weight(node, w, 0 if transpose_w else 1, "out")
    if cols is None or (rows is None and not flattened):
        self.unknown(node, f"{node.op} '{node.name}' multiplies two computed tensors")
        return
    if rows is not None:
        self.link(self.tensor(a), rows)
    else:
        self.claim(w, 1 if transpose_w else 0)
    self.link(self.tensor(node.name), cols)
    if len(xs) != len(ys):
        self.unknown(node)
        return
    self.same(a, node.name, node, axes=range(len(ys) - 1))  # batch (and time) axes go through


def _sparse_matmul(self: _Entry, node) -> None:
    """SparseTensorDenseMatMul(indices, values, dense shape, kernel): sparse features times a
    kernel (a linear layer over sparse inputs). The kernel's output channels go with the output's
    last axis; its other axis meets the sparse tensor's columns, which no dense tensor carries:
    whole, as is everything the sparse operands hold."""
    inputs = self.body.data_inputs(node)
    w, transpose_w = inputs[3], _attr(node, "adjoint_b", "b", False)
    ws, ys = self.shape(w), self.shape(node.name)
    cols = self.weight(node, w, 0 if transpose_w else 1, "out") if ws is not None and len(ws) == 2 else None
    rows = self.weight(node, w, 1 if transpose_w else 0, "in") if cols is not None else None
    if cols is None or rows is None or not ys or len(ys) != 2:
        self.unknown(node)
        return
    reason = f"{node.op} '{node.name}' reads it against a sparse tensor's columns"
    self.graph.poison(rows, reason)
    for ref in inputs[:3]:
        self.poison_tensor(ref, reason)
    self.link(self.tensor(node.name), cols)


def _weight_operand(self: _Entry, ref: str) -> bool:
    """Whether ``ref`` is a weight (a variable or constant read) or a view of one that
    _Entry.weight follows (a Transpose: a tied output projection; an ExpandDims: a Conv1D's kernel)."""
    if self.source(ref) is not None:
        return True
    view = self.origin(ref, masks=True)
    return view is not None and view.op in ("Transpose", "ExpandDims", "StridedSlice", "Slice") and \
        self.source(view.input[0]) is not None


def _batch_matmul(self: _Entry, node, a: str, b_ref: str, adj_a: bool, adj_b: bool) -> None:
    """Two activations (attention's scores and context): batch axes (aligned from the right, as
    broadcast) go through; the contracted axes of a and b are the same channels; a's rows and
    b's columns are the output's."""
    sa, sb, out = self.shape(a), self.shape(b_ref), self.shape(node.name)
    if not sa or not sb or not out or len(sa) < 2 or len(sb) < 2:
        self.unknown(node)
        return
    ra, rb, ro = len(sa), len(sb), len(out)
    m_axis, k_a = (ra - 1, ra - 2) if adj_a else (ra - 2, ra - 1)
    k_b, n_axis = (rb - 1, rb - 2) if adj_b else (rb - 2, rb - 1)
    self.link(self.tensor(a, k_a), self.tensor(b_ref, k_b))
    _contracted(self, node, (a, k_a), (b_ref, k_b))
    self.link(self.tensor(a, m_axis), self.tensor(node.name, ro - 2))
    self.link(self.tensor(b_ref, n_axis), self.tensor(node.name, ro - 1))
    for ref, rank in ((a, ra), (b_ref, rb)):
        shape = self.shape(ref)
        for axis in range(rank - 2):
            target = axis + (ro - rank)
            if shape[axis] == out[target]:
                self.link(self.tensor(ref, axis), self.tensor(node.name, target))
            elif shape[axis] == 1:
                self.claim(ref, axis)


SHIFT_KEEPING_OPS = {"AddV2", "Add", "Sub", "SelectV2", "Select", "Identity", "Cast", "Reshape", "Transpose",
                     "ExpandDims", "Squeeze", "Mul", "RealDiv"}


def _contracted(self: _Entry, node, *operands) -> None:
    """Record the spaces (axis ``axis`` of each (ref, axis) operand) contracted between two
    activations by ``node`` (see _Graph.contracted)."""
    removed = [_when_removed(self, ref) for ref, _ in operands]
    ok = "zero" in removed or None not in removed and _shift_only(self, node) or _zeroed_operand(self, node, operands)
    for ref, axis in operands:
        space = self.tensor(ref, axis)
        if space is not None:
            self.graph.contracted[space] = self.graph.contracted.get(space, True) and ok


KERNEL_PRODUCT_OPS = {"MatMul", "SparseMatMul", "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3", "Einsum", "Conv2D",
                      "Conv3D", "DepthwiseConv2dNative"}
ZERO_KEEPING_OPS = {"Square", "Abs", "Sqrt", "Relu", "Relu6", "Elu", "Selu", "LeakyRelu", "Tanh", "Softsign", "Erf",
                    "Expm1", "Sin", "Sign", "Gelu", "Atan", "Asinh"}  # f(0) = 0, one value in, one out
REMOVED_KEEPING_VIEWS = {"Reshape": 0, "Transpose": 0, "ExpandDims": 0, "Squeeze": 0, "Identity": 0, "Cast": 0,
                         "Snapshot": 0, "Unpack": 0, "Split": 1, "SplitV": 0, "StridedSlice": 0, "Slice": 0, "Neg": 0}


def _when_removed(self: _Entry, ref: str, seen: dict | None = None) -> str | None:
    """What a removed channel of ``ref`` holds in the masked model: "zero" where ``ref`` is a
    kernel's product (the kernel holds zeros there) through views, sums of such, and products
    with anything (a rotary embedding's cos and sin); "constant" (one value at every position)
    where a bias, a constant or a variable of one value per channel (_bias_like), is added, and
    the result is scaled by scalars; None for anything else (a table gathered by position, a
    bias then rotated, parts concatenated that are not all zero, an argument of a body)."""
    seen = {} if seen is None else seen
    if ref in seen:
        return seen[ref]
    seen[ref] = None  # a cycle, or too deep: not known
    node = self.body.producer(ref)
    if node is None or len(seen) > 256:
        return None
    inputs = self.body.data_inputs(node)
    verdict = None
    if node.op in KERNEL_PRODUCT_OPS:
        verdict = "zero" if any(_weight_operand(self, operand) for operand in inputs) else None
    elif node.op in REMOVED_KEEPING_VIEWS:
        verdict = _when_removed(self, inputs[REMOVED_KEEPING_VIEWS[node.op]], seen)
    elif node.op in ZERO_KEEPING_OPS:  # zero stays zero, one value stays one value
        verdict = _when_removed(self, inputs[0], seen)
    elif node.op == "Pow":  # x ** p, p a positive constant scalar (an L2 norm's square)
        exponent = _constant(self, inputs[1])
        if exponent is not None and np.size(exponent) == 1 and float(np.ravel(exponent)[0]) > 0:
            verdict = _when_removed(self, inputs[0], seen)
    elif node.op in ("ConcatV2", "Pack", "Add", "AddV2", "BiasAdd", "Sub", "AddN"):
        operands = inputs[:-1] if node.op == "ConcatV2" else inputs

        def part(operand) -> str | None:  # a weight is "constant" where it is a bias, else followed back
            if self.source(operand) is None:
                return _when_removed(self, operand, seen)
            return "constant" if _bias_like(self, operand, operands) else None

        parts = [part(operand) for operand in operands]
        verdict = None if None in parts else "constant" if "constant" in parts else "zero"
        if node.op in ("ConcatV2", "Pack") and verdict == "constant":
            verdict = None  # parts side by side: a learned null key before the keys' biases is not one value
    elif node.op in ("Mul", "RealDiv"):
        parts = [_when_removed(self, operand, seen) for operand in inputs[:2]]
        scalar = [self.shape(operand) is not None and all(d == 1 for d in self.shape(operand))
                  for operand in inputs[:2]]
        if parts[0] == "zero" or node.op == "Mul" and parts[1] == "zero":
            verdict = "zero"
        elif parts[0] == "constant" and scalar[1] or node.op == "Mul" and parts[1] == "constant" and scalar[0]:
            verdict = "constant"
    seen[ref] = verdict
    return verdict


def _bias_like(self: _Entry, weight: str, operands) -> bool:
    """Whether a weight added to ``operands`` holds one value per channel at every position (a
    bias): its shape without leading 1s has one axis, or is a shorter suffix of the shape of the
    kernel of a product among the operands (EinsumDense's [heads, dims] under its [D, heads, dims]).
    A table of a row per position ([N, heads, dims]: learned positions added after a projection)
    is not: a removed channel holds another value at every position."""
    shape = self.shape(weight)
    if shape is None or None in shape:
        return False
    core = list(shape)
    while core and core[0] == 1:
        core.pop(0)
    if len(core) <= 1:
        return True
    for operand in operands:
        product = self.origin(operand)
        if product is None or product.op not in KERNEL_PRODUCT_OPS:
            continue
        for kernel in self.body.data_inputs(product)[:2]:
            ks = self.shape(kernel)
            if _weight_operand(self, kernel) and ks is not None and len(core) < len(ks) and \
                    list(ks[-len(core):]) == core:
                return True
    return False


def _zeroed_operand(self: _Entry, node, operands) -> bool:
    """Whether a removed channel adds exactly zero to ``node``'s product, however it is read: an
    operand is the product of its value and the group's 0/1 channels (insert_masks:
    names.kept_product), or, with analyze(..., through_products=True), will be (a ProductSite: an
    operand of the top graph whose last axis is contracted, of a static size)."""
    inputs = self.body.data_inputs(node)
    for ref, _ in operands:
        producer = self.body.producer(ref)
        if producer is not None and names.kept_product_part(producer.name) == "apply":
            return True
    if not self.graph.through_products or self.body.is_function:
        return False
    for ref, axis in operands:
        shape, space = self.shape(ref), self.tensor(ref, axis)
        if shape and axis == len(shape) - 1 and shape[axis] is not None and shape[axis] > 1 and \
                space is not None and ref in inputs:
            self.graph.products.append(ProductSite(self.entry.label, node.name, inputs.index(ref), space))
            return True
    return False


def _shift_only(self: _Entry, node) -> bool:
    """Whether every use of ``node``'s product ends in a Softmax through ops that turn a constant
    added to all of its values into a constant added to all of theirs (adds, selects, views, a
    scale by a scalar): then a channel whose terms are constant in both operands (the query's and
    the key's head dim j, both kernels' columns zero, their biases left) changes no softmax."""

    def judge(reader, position) -> str:
        if reader.op in ("Softmax", "Shape", "OnesLike", "ZerosLike"):  # or its shape alone
            return "end"
        if reader.op not in SHIFT_KEEPING_OPS or (reader.op in ("SelectV2", "Select") and position == 0) or \
                (reader.op in ("Reshape", "Transpose", "ExpandDims", "Squeeze") and position != 0):
            return "fail"
        if reader.op in ("Mul", "RealDiv"):
            scale = self.shape(self.body.data_inputs(reader)[1 - position])
            if position != 0 and reader.op == "RealDiv" or scale is None or any(d != 1 for d in scale):
                return "fail"
        return "follow"

    return _every_use(self, node.name, judge)


def _einsum(self: _Entry, node) -> None:
    """Each letter of the equation is one space: in the data operand and the output, it goes
    through; in the data operand and a weight only, the weight's axis consumes it ("in"); in a
    weight and the output only, the weight's axis produces it ("out"); in two activations only,
    the two are the same channels (contracted); in all three, a batch of weights (experts) whose
    axis goes through ("through")."""
    equation = _attr(node, "equation", "s", b"").decode().replace(" ", "")
    inputs = self.body.data_inputs(node)
    lhs, _, out = equation.partition("->")
    operands = lhs.split(",")
    if len(inputs) != len(operands) or len(operands) > 2 or "." in equation or not out or \
            any(len(set(term)) != len(term) for term in operands + [out]):
        self.unknown(node)
        return
    weights = [self.source(ref) is not None for ref in inputs]
    if all(weights):
        self.unknown(node)
        return
    terms = list(zip(inputs, operands, weights))
    for letter in set("".join(operands)):
        holders = [(ref, term.index(letter), weight) for ref, term, weight in terms if letter in term]
        data = [(ref, axis) for ref, axis, weight in holders if not weight]
        kernel = [(ref, axis) for ref, axis, weight in holders if weight]
        in_out = letter in out
        if kernel and len(holders) == 1 and in_out:
            self.link(self.weight(node, kernel[0][0], kernel[0][1], "out"), self.tensor(node.name, out.index(letter)))
        elif kernel and data and not in_out:
            self.link(self.tensor(*data[0]), self.weight(node, kernel[0][0], kernel[0][1], "in"))
        elif kernel and data and in_out:  # a batch of weights (a mixture's experts): x[e] @ w[e]
            member = self.weight(node, kernel[0][0], kernel[0][1], "through")
            self.link(self.tensor(*data[0]), member)
            self.link(member, self.tensor(node.name, out.index(letter)))
        elif not kernel and in_out:
            for ref, axis in data:
                self.link(self.tensor(ref, axis), self.tensor(node.name, out.index(letter)))
        elif not kernel and len(data) == 2:
            self.link(self.tensor(*data[0]), self.tensor(*data[1]))
            _contracted(self, node, data[0], data[1])
        else:
            self.unknown(node, f"Einsum '{node.name}' ({equation}): '{letter}' is reduced or shared in a way "
                               "graphprune does not model")
            return


def _batch_norm(self: _Entry, node) -> None:
    inputs = self.body.data_inputs(node)
    if _attr(node, "data_format", "s", b"") not in (b"", b"NHWC"):
        self.unknown(node)
        return
    self.same(inputs[0], node.name, node)
    for ref in inputs[1:5]:
        if self.shape(ref):
            self.link(self.tensor(ref, 0), self.tensor(node.name))
    for ref in self.outputs_of(node)[1:]:
        if self.shape(ref) and len(self.shape(ref)) == 1 and self.shape(ref)[-1] == self.shape(node.name)[-1]:
            self.link(self.tensor(ref, 0), self.tensor(node.name))


def _pool(self: _Entry, node) -> None:
    ksize, strides = list(_attr(node, "ksize", "list", ())), list(_attr(node, "strides", "list", ()))
    if _attr(node, "data_format", "s", b"") not in (b"", b"NHWC", b"NDHWC") or not ksize or ksize[-1] != 1 or \
            strides[-1] != 1:
        self.unknown(node)
        return
    x = self.body.data_inputs(node)[0]
    self.same(x, node.name, node, axes=[0, len(ksize) - 1])


def _resize(self: _Entry, node) -> None:
    """ResizeBilinear & co. (Keras's Resizing and UpSampling2D, tf.image.resize): images
    [B, H, W, C] at a new height and width; the batch and the channels go through."""
    self.same(self.body.data_inputs(node)[0], node.name, node, axes=[0, 3])


def _constant(self: _Entry, ref: str):
    """The value of a small constant or shape tensor where it is known without running the graph
    (see _evaluate), as an array; None if any element is unknown."""
    value = _evaluate(self, ref, 0)
    if value is None or None in np.ravel(np.asarray(value, object)).tolist():
        return None
    return np.asarray(value)


def _evaluate(self: _Entry, ref: str, depth: int):
    """Constants and shape arithmetic on static shapes (Shape, GatherV2, Prod, Pack, ConcatV2, as
    tf.tensordot computes its reshapes): a Python int or list, None where a dimension is unknown."""
    node = self.body.producer(ref)
    if node is None or depth > 32:
        return None
    inputs = self.body.data_inputs(node)
    if node.op == "Const":
        return tf.make_ndarray(node.attr["value"].tensor).tolist()
    if node.op in ("Identity", "Cast"):
        return _evaluate(self, inputs[0], depth + 1)
    if node.op == "Shape":
        return self.shape(inputs[0])
    parts = [_evaluate(self, raw, depth + 1) for raw in inputs]
    if node.op == "GatherV2" and parts[0] is not None and parts[1] is not None and parts[2] == 0:
        return [parts[0][i] for i in parts[1]] if isinstance(parts[1], list) else parts[0][parts[1]]
    if node.op == "Prod" and isinstance(parts[0], list) and parts[1] in (0, [0]):
        product = None if None in parts[0] else int(np.prod(parts[0], dtype=np.int64))
        return [product] if _attr(node, "keep_dims", "b", False) else product
    if node.op == "Pack" and _attr(node, "axis", "i", 0) == 0 and not any(isinstance(p, list) for p in parts):
        return parts
    if node.op == "StridedSlice":  # of a shape vector, as tf-keras's LayerNormalization computes its sizes
        return _strided_slice_value(node, parts)
    if node.op == "Mul" and all(isinstance(p, int) for p in parts):
        return parts[0] * parts[1]
    if node.op == "FloorDiv" and all(isinstance(p, int) for p in parts) and parts[1]:  # C // heads
        return parts[0] // parts[1]
    if node.op == "ConcatV2" and parts[-1] == 0 and all(isinstance(p, list) for p in parts[:-1]):
        return [item for part in parts[:-1] for item in part]
    if node.op == "Reshape" and parts[0] is not None and isinstance(parts[1], (int, list)) and \
            None not in np.ravel(np.asarray(parts[0], object)).tolist():  # tf.repeat's count, to a scalar
        try:
            return np.reshape(np.asarray(parts[0]), parts[1]).tolist()
        except ValueError:
            return None
    return None


def _strided_slice_value(node, parts):
    """StridedSlice of a known list (one axis; begin/end masks, shrink_axis_mask), else None."""
    value, begin, end, strides = (parts + [None] * 4)[:4]
    if not isinstance(value, list) or not all(isinstance(p, list) and len(p) == 1 for p in (begin, end, strides)) \
            or strides[0] == 0 or _attr(node, "ellipsis_mask", "i", 0) or _attr(node, "new_axis_mask", "i", 0):
        return None
    start = None if _attr(node, "begin_mask", "i", 0) & 1 else begin[0]
    stop = None if _attr(node, "end_mask", "i", 0) & 1 else end[0]
    if _attr(node, "shrink_axis_mask", "i", 0) & 1:
        return value[start] if start is not None and -len(value) <= start < len(value) else None
    return value[start:stop:strides[0]]


def _pad(self: _Entry, node) -> None:
    x, paddings = self.body.data_inputs(node)[:2]
    value = _constant(self, paddings)
    if value is None or value.ndim != 2:
        self.unknown(node)
        return
    # the axes padded (the channels too, or a channels-first tensor's time axis: Qwen3.5's causal
    # conv and chunks) are left to _settle, which poisons any channels on them
    self.same(x, node.name, node, axes=[a for a in range(len(value)) if not np.any(value[a] != 0)])


def _space_to_batch(self: _Entry, node) -> None:
    """SpaceToBatchND / BatchToSpaceND(x, block_shape, paddings or crops), as a dilated convolution
    runs: the batch and the M blocked spatial axes are reshuffled; the axes after them (the
    channels) go through."""
    x, block = self.body.data_inputs(node)[:2]
    xs, ys, blocked = self.shape(x), self.shape(node.name), _constant(self, block)
    if not xs or not ys or len(xs) != len(ys) or blocked is None or blocked.ndim != 1:
        self.unknown(node)
        return
    self.same(x, node.name, node, axes=range(1 + blocked.size, len(xs)))


def _depth_to_space(self: _Entry, node) -> None:
    """DepthToSpace(x, b) (a pixel shuffle) and SpaceToDepth(x, b), channels last: the deep side's
    channel i is block position i // C and channel i % C of the shallow side's C channels. Its
    channels are refined as heads x head dims are (_refine_factors): the b * b positions kept
    whole, and channel c, with its copy at every position, one channel of the shallow side. The
    batch goes through; height and width are regrouped (not channels)."""
    x = self.body.data_inputs(node)[0]
    xs, ys, block = self.shape(x), self.shape(node.name), _attr(node, "block_size", "i", 0)
    if _attr(node, "data_format", "s", b"NHWC") != b"NHWC" or not xs or not ys or len(xs) != 4 or \
            len(ys) != 4 or block < 2:
        self.unknown(node)
        return
    deep, shallow = (x, node.name) if node.op == "DepthToSpace" else (node.name, x)
    depth, channels = self.shape(deep)[3], self.shape(shallow)[3]
    if depth is None or channels is None or depth != block * block * channels:
        self.unknown(node)
        return
    self.same(x, node.name, node, axes=[0])
    key = ("t", self.entry.label, self.node_id(node.name))
    positions = self.graph.space(key + ("positions",), block * block)
    kept = self.graph.space(key + ("channels",), channels)
    self.graph.poison(positions, f"{node.op} '{node.name}' moves them into space (its block positions)")
    self.graph.factors.append((self.tensor(deep, 3), positions, kept))
    self.claim(deep, 3)  # followed by the factor
    self.link(self.tensor(shallow, 3), kept)


def _reduce(self: _Entry, node) -> None:
    x, axes = self.body.data_inputs(node)[:2]
    value, shape = _constant(self, axes), self.shape(x)
    if value is None or not shape:
        self.unknown(node)
        return
    rank = len(shape)
    reduced = {int(a) % rank for a in np.ravel(value)}
    out = self.shape(node.name)
    if out is None or (not out and (rank - 1) not in reduced):  # a scalar sum of a kept mean's count is fine
        self.unknown(node, f"{node.op} '{node.name}' reduces over the channels" if (rank - 1) in reduced else None)
        return
    if (rank - 1) in reduced:
        if not _kept_mean_reduction(self, node, reduced, rank) and not (node.op == "Sum" and _summed(self, node, x)):
            hint = " (a layer norm's: residual_stream=True removes them)" if node.op == "Mean" and \
                reduced == {rank - 1} and not self.body.is_function and not self.graph.through_means else ""
            # only the reduced axis: a q/k norm over the head dims leaves the heads prunable
            self.poison_tensor(x, f"{node.op} '{node.name}' reduces over the channels{hint}", axes=[rank - 1])
        self.claim(x, rank - 1)  # poisoned above, or a mean over the kept channels only (names.kept_mean)
    keep = _attr(node, "keep_dims", "b", False)
    kept = [a for a in range(rank) if keep or a not in reduced]
    for position, axis in enumerate(kept):
        if axis not in reduced:
            self.link(self.tensor(x, axis), self.tensor(node.name, axis if keep else position))
        elif keep:
            self.claim(node.name, axis)  # size 1: broadcasts back


def _summed(self: _Entry, node, x: str) -> bool:
    """Whether a Sum over the channels of ``x`` (last axis) may lose removed ones: a removed
    channel adds what it holds, so it may where that is zero (an L2 norm of a projection without a
    bias: CLIP's head), a constant that only shifts what softmaxes read, or zeroed by insert_masks
    (names.kept_product; see _zeroed_operand), as for a product of two activations (_contracted).
    The channels are then contracted: they go only where the kernels that make them hold zeros."""
    axis = len(self.shape(x)) - 1
    removed = _when_removed(self, x)
    if not (removed == "zero" or removed == "constant" and _shift_only(self, node) or
            _zeroed_operand(self, node, [(x, axis)])):
        return False
    space = self.tensor(x, axis)
    if space is not None:
        self.graph.contracted.setdefault(space, True)
    return True


def _kept_mean_reduction(self: _Entry, node, reduced: set, rank: int) -> bool:
    """Whether a reduction over the channels (last axis) is one whose group may still be removed:
    the Sum of a mean insert_masks made over the kept channels (names.kept_mean), its count of
    kept channels, or (analyze(..., through_means=True)) a Mean over the channels alone in the
    top graph, which insert_masks will make one."""
    part = names.kept_mean_part(node.name)
    if part in ("sum", "count") and node.op == "Sum":
        return True
    last = self.shape(self.body.data_inputs(node)[0])[-1]
    if not self.graph.through_means or node.op != "Mean" or reduced != {rank - 1} or self.body.is_function \
            or last is None or last < 0:
        return False
    self.graph.means.append(MeanSite(self.entry.label, node.name, self.tensor(self.body.data_inputs(node)[0], -1)))
    return True


def _claim_all(self: _Entry, node) -> None:
    """The 0/1 vector of a kept-channel mean's channels, read off a kernel's mask (insert_masks):
    it only says which channels count; the Mul that applies it links them."""
    for ref in self.body.data_inputs(node) + self.outputs_of(node):
        for axis in range(len(self.shape(ref) or ())):
            self.claim(ref, axis)


def _gather(self: _Entry, node) -> None:
    """An embedding lookup, GatherV2(params, ids, axis 0) or ResourceGather(variable, ids): each
    axis of the table after the first is an axis of the output, after the ids' axes. A GatherV2 on
    another axis, with batch_dims (DeBERTa's relative positions taken along the last axis): the
    batch axes are the params', the ids' and the output's; the params' axes before the gathered one
    and after it go through; the gathered axis is not kept (picking channels by index poisons them)."""
    inputs = self.body.data_inputs(node)
    params, ids = inputs[0], inputs[1]
    key = None
    if node.op == "GatherV2":
        axis = _constant(self, inputs[2])
        table = self.shape(params)
    else:
        axis, key = 0, self.body.resource_key(params)
        spec = self.graph.model.variables.get(key) if key is not None else None
        table = list(spec.shape) if spec is not None else None
    id_shape, out = self.shape(ids), self.shape(node.name)
    if axis is None or table is None or id_shape is None or out is None or not table:
        self.unknown(node)
        return
    axis, batch = int(np.ravel(axis)[0]) % len(table), _attr(node, "batch_dims", "i", 0)
    batch = batch % len(id_shape) if batch < 0 and id_shape else batch
    if batch > axis or batch > len(id_shape) or len(out) != len(table) - 1 + len(id_shape) - batch or \
            (key is not None and (axis, batch) != (0, 0)):
        self.unknown(node)
        return
    for a in range(batch):  # batch axes: the params', the ids' and the output's
        self.link(self.tensor(params, a), self.tensor(node.name, a))
        self.link(self.tensor(ids, a), self.tensor(node.name, a))
    for a in range(batch, axis):
        self.link(self.tensor(params, a), self.tensor(node.name, a))
    for a in range(batch, len(id_shape)):  # the ids' positions take the gathered axis's place
        self.link(self.tensor(ids, a), self.tensor(node.name, axis + a - batch))
    for a in range(axis + 1, len(table)):
        source = self.tensor(params, a) if key is None else self.graph.member("variable", key, a, table[a], "param")
        self.link(source, self.tensor(node.name, axis + len(id_shape) - batch + a - axis - 1))


def _per_axis(self: _Entry, ref: str, rank: int) -> list | None:
    """A small shape-like operand's elements where known (None for an unknown one), or None."""
    value = _evaluate(self, ref, 0)
    if isinstance(value, int):
        value = [value]
    return value if isinstance(value, list) and len(value) == rank else None


def _broadcast_to(self: _Entry, node) -> None:
    """BroadcastTo(x, shape): x's axes of the output's size go through (the last one only if the
    shape operand's last element is a constant shrink_channels can rewrite, any other where its
    element is one); size-1 axes broadcast, into copies of one value whose count is rewritten where
    the element is such a constant (DeBERTa's relative positions, the same for every head)."""
    x, shape_ref = self.body.data_inputs(node)[:2]
    xs, ys = self.shape(x), self.shape(node.name)
    if not xs or not ys or len(ys) < len(xs):
        self.unknown(node)
        return
    lead = len(ys) - len(xs)
    producer = self.body.producer(shape_ref)

    def rewritable(position: int) -> bool:
        return _constant_elements(self, producer, [position])

    def follows(position: int, space) -> None:  # the shape element becomes the size of space
        self.graph.dims.append(ShapeDim(self.entry.label, self.node_id(node.name), position, (space,)))

    for a, size in enumerate(xs):
        if size == 1 and ys[a + lead] != 1:
            self.claim(x, a)
            if ys[a + lead] is not None and rewritable(a + lead):
                self.claim(node.name, a + lead)
                follows(a + lead, self.tensor(node.name, a + lead))
        elif size is not None and size == ys[a + lead]:
            if a == len(xs) - 1 and _shape_last(self, shape_ref) is None:
                continue  # poisoned: its size is written where shrink_channels cannot change it
            self.link(self.tensor(x, a), self.tensor(node.name, a + lead))
            if a == len(xs) - 1:
                self.graph.reshapes.append(Reshape(self.entry.label, self.node_id(node.name), self.tensor(x), 1))
            elif rewritable(a + lead):
                follows(a + lead, self.tensor(x, a))
            else:  # any other axis: its size is in the shape operand too, where it cannot be rewritten
                self.graph.poison(self.tensor(x, a), f"BroadcastTo '{node.name}' names its size")


def _strided_slice(self: _Entry, node) -> None:
    """x[b:e:s, ...] with constant strides: an axis taken whole (stride 1), or covered by an
    ellipsis, goes through; an axis indexed (shrink_axis_mask) or sliced otherwise is poisoned
    (its channels would move); a new axis (size 1) reads nothing. A bound the graph computes
    (ESM's ``cos[:, :seq_len]``) cuts its own axis only: that axis is poisoned, and a part of
    the channels cut beside it is a crop."""
    x, begin_ref, end_ref, strides_ref = self.body.data_inputs(node)[:4]
    xs, ys = self.shape(x), self.shape(node.name)
    strides = _constant(self, strides_ref)
    begin, end = (_evaluate(self, ref, 0) for ref in (begin_ref, end_ref))  # None where an element is not static
    if not xs or ys is None or strides is None or not isinstance(begin, list) or not isinstance(end, list):
        self.unknown(node)
        return
    strides = np.ravel(strides).tolist()
    masks = {name: _attr(node, name, "i", 0) for name in
             ("begin_mask", "end_mask", "shrink_axis_mask", "ellipsis_mask", "new_axis_mask")}
    spec = len(begin)
    if bin(masks["ellipsis_mask"]).count("1") > 1 or not len(end) == len(strides) == spec or \
            any(not isinstance(v, (int, type(None))) for v in begin + end):
        self.unknown(node)
        return
    unknown = {i for i in range(spec) if (begin[i] is None and not masks["begin_mask"] & 1 << i) or
               (end[i] is None and not masks["end_mask"] & 1 << i and not masks["shrink_axis_mask"] & 1 << i)}
    begin, end = ([0 if v is None else v for v in bounds] for bounds in (begin, end))  # masked: not read
    ellipsis = len(xs) - sum(1 for i in range(spec) if not (masks["ellipsis_mask"] | masks["new_axis_mask"]) & 1 << i)
    parts = []  # (spec index, axis of x, axis of the output, start, stop): an axis cut to a part
    a = position = 0
    for i in range(spec):
        bit = 1 << i
        if masks["ellipsis_mask"] & bit:
            for _ in range(ellipsis):
                if position < len(ys):
                    self.link(self.tensor(x, a), self.tensor(node.name, position))
                a, position = a + 1, position + 1
            continue
        if masks["new_axis_mask"] & bit:
            position += 1  # a size-1 axis of the output only
            continue
        if a >= len(xs):
            break
        if i in unknown:  # cut where the graph computes (ESM's cos[:, :seq_len]): this axis is poisoned
            position += 0 if masks["shrink_axis_mask"] & bit else 1
        elif not masks["shrink_axis_mask"] & bit:  # one index of the axis (the CLS token's position) names a place
            size = xs[a]
            if strides[i] == 1 and (masks["begin_mask"] & bit or begin[i] == 0) and \
                    (masks["end_mask"] & bit or (size is not None and end[i] >= size)) and position < len(ys):
                self.link(self.tensor(x, a), self.tensor(node.name, position))
            elif strides[i] == 1 and size is not None and position < len(ys):
                start = 0 if masks["begin_mask"] & bit else min(max(begin[i] + size if begin[i] < 0 else begin[i], 0), size)
                stop = size if masks["end_mask"] & bit else min(max(end[i] + size if end[i] < 0 else end[i], 0), size)
                if stop <= start and min(begin[i], end[i]) >= 0 and ys[position] == 0:  # nothing taken (Keras 3's
                    self.claim(x, a)                       # GRU without reset_after): nothing, however many
                    self.claim(node.name, position)
                else:
                    parts.append((i, a, position, start, stop))
            elif strides[i] > 1 and size is not None and size % strides[i] == 0 and position < len(ys) and \
                    (masks["begin_mask"] & bit or 0 <= begin[i] < strides[i]) and \
                    (masks["end_mask"] & bit or end[i] >= size) and ys[position] == size // strides[i]:
                parts.append((i, a, position, None, strides[i]))  # every s-th channel: interleaved parts
            position += 1
        a += 1
    for a in range(a, len(xs)):  # the axes after the spec are whole
        if position < len(ys):
            self.link(self.tensor(x, a), self.tensor(node.name, position))
        position += 1
    if unknown and parts:  # a part of the channels and a cut of unknown bounds: a crop
        return
    if len(parts) == 1 and parts[0][3] is None:  # the other axes whole: interleaved parts
        _interleaved(self, node, x, parts[0][1], parts[0][2], parts[0][4])
    elif len(parts) == 1:  # the other axes whole: a part of the channels (more cut axes are a crop: poisoned)
        i, a, position, start, stop = parts[0]
        _channel_part(self, node, i, x, a, position, start, stop, (tuple(begin), tuple(end)))


def _interleaved(self: _Entry, node, x: str, a: int, position: int, stride: int) -> None:
    """x[..., r::s] (GPT-OSS's gate and up halves of one fused kernel, interleaved): x's channel i
    is unit i // s, part i % s (_refine_factors, as heads x head dims); the output's channel j is
    unit j. Units go, with all s parts of each (the slice reads the same parts of fewer units:
    nothing to rewrite); the parts are kept."""
    units = self.graph.space(("t", self.entry.label, self.node_id(node.name), "units", position),
                             self.shape(node.name)[position])
    parts = self.graph.space(("t", self.entry.label, self.node_id(node.name), "parts", position), stride)
    self.graph.poison(parts, f"StridedSlice '{node.name}' takes one channel in {stride}: the {stride} "
                             "interleaved parts are kept")
    self.graph.factors.append((self.tensor(x, a), units, parts))
    self.claim(x, a)  # followed by the factor
    self.link(self.tensor(node.name, position), units)


def _channel_part(self: _Entry, node, index: int, x: str, a: int, position: int, start: int, stop: int,
                  operands: tuple) -> None:
    """The output's axis ``position`` is channels [start, stop) of x's axis ``a``: linked at that
    offset (so the channels before, within and after are groups apart where nothing else ties
    them), with a SliceSite for shrink_channels to move the bounds."""
    if stop <= start or self.shape(node.name)[position] != stop - start:
        return
    whole = self.tensor(x, a)
    self.link(self.tensor(node.name, position), whole, start)
    self.graph.slice_sites.append(SliceSite(self.entry.label, self.node_id(node.name), index, whole, start, stop,
                                            operands))


def _slice(self: _Entry, node) -> None:
    """Slice(x, begin, size): an axis from 0 with size -1 goes through, and so does the last axis
    taken whole where the size operand's last element is a constant (shrink_channels rewrites it)."""
    x, begin_ref, size_ref = self.body.data_inputs(node)[:3]
    xs, ys = self.shape(x), self.shape(node.name)
    if not xs or not ys or len(xs) != len(ys):
        self.unknown(node)
        return
    begin, size = _per_axis(self, begin_ref, len(xs)), _per_axis(self, size_ref, len(xs))
    if begin is None or size is None:
        self.unknown(node)
        return
    cut = [a for a, dim in enumerate(xs) if begin[a] != 0 or (size[a] != -1 and (dim is None or size[a] != dim))]
    if len(cut) == 1 and xs[cut[0]] is not None and None not in (begin[cut[0]], size[cut[0]]) and \
            0 <= begin[cut[0]] <= xs[cut[0]]:  # a part of the channels (more cut axes are a crop: poisoned)
        a = cut[0]
        _channel_part(self, node, a, x, a, a, begin[a], xs[a] if size[a] == -1 else begin[a] + size[a],
                      (tuple(begin), tuple(size)))
    for a, dim in enumerate(xs):
        if a in cut:
            continue  # a part of the axis: poisoned, unless the only one (_channel_part)
        if size[a] != -1:  # its size is written in the size operand: the last element can be rewritten
            if a != len(xs) - 1 or _shape_last(self, size_ref) is None:
                continue
            self.graph.reshapes.append(Reshape(self.entry.label, self.node_id(node.name), self.tensor(x, a), 1, 2))
        self.link(self.tensor(x, a), self.tensor(node.name, a))


def _tile(self: _Entry, node) -> None:
    """Tile(x, multiples): an axis repeated once goes through. A size-1 axis repeated r times (tf.repeat's
    copies: the query heads that share a key/value head) is a space of r identical channels where r is
    an element of a constant read by this Tile only, or a scalar count shrink_channels can rewrite
    (_tile_count): removing copies makes fewer of them. Any other axis of copies of a table made from
    constants and shapes alone (DINOv3's rotary angles, tiled twice over a head's dims) is a
    TableSite: its channels go by a gather of the kept ones, whatever the table is made of."""
    x, multiples_ref = self.body.data_inputs(node)[:2]
    xs, ys = self.shape(x), self.shape(node.name)
    if not xs or not ys or len(xs) != len(ys):
        self.unknown(node)
        return
    multiples = _per_axis(self, multiples_ref, len(xs))
    if multiples is None:
        self.unknown(node)
        return
    for a in range(len(xs)):
        if multiples[a] == 1:
            self.link(self.tensor(x, a), self.tensor(node.name, a))
        elif xs[a] == 1:
            self.claim(x, a)
            if ys[a] is None:
                continue
            constant = self.body.producer(multiples_ref)
            if constant is not None and constant.op == "Const" and \
                    all(reader.name == node.name for reader, _ in self._readers(multiples_ref)):
                self.claim(node.name, a)  # tf.tile(x, [1, 1, r, 1]): the constant's element is rewritten
                self.graph.dims.append(ShapeDim(self.entry.label, self.node_id(node.name), a,
                                                (self.tensor(node.name, a),)))
                continue
            count = _tile_count(self, node, a)
            if count is not None:
                self.claim(node.name, a)
                self.graph.counts.append((self.entry.label, self.node_id(count), self.tensor(node.name, a)))
        elif ys[a] is not None and _is_table(self, self.body.ref(node.name)):  # copies of a table (rotary angles)
            self.claim(node.name, a)
            self.graph.tables.append(TableSite(self.entry.label, self.node_id(node.name), a, self.tensor(node.name, a)))


# ops a table may be made of (_is_table): every one a function of its inputs alone
TABLE_STOPS = ("Const", "Shape", "ShapeN", "Size", "Rank")
TABLE_OPS = {"Reshape", "ExpandDims", "Squeeze", "Tile", "Pack", "ConcatV2", "StridedSlice", "Slice", "GatherV2",
             "Transpose", "Range", "Fill", "BroadcastTo", "LinSpace", "Prod", "Sum", "Max", "Min", "Mean", "Cumsum",
             "FloorMod", "TruncateDiv", "MatMul", "BatchMatMulV2", "Einsum"}


def _is_table(self: _Entry, ref: str, limit: int = 256) -> bool:
    """Whether tensor ``ref`` is made from constants and the shapes of tensors alone (no value of an
    input, a variable or a random draw reaches it), within ``limit`` ops of this body."""
    pending, seen = [ref], set()
    while pending:
        producer = self.body.producer(pending.pop())
        if producer is None:
            return False  # a body's argument
        if producer.name in seen:
            continue
        seen.add(producer.name)
        if producer.op in TABLE_STOPS:
            continue
        stateless = producer.op in UNARY_OPS or producer.op in ELEMENTWISE_OPS or producer.op in TABLE_OPS
        if not stateless or len(seen) > limit:
            return False
        pending.extend(self.body.data_inputs(producer))
    return True


def _tile_count(self: _Entry, node, a: int) -> str | None:
    """The node of a Tile's count of copies along axis ``a`` when rewriting it to a smaller constant
    changes nothing but that count: element ``a`` of a Pack read by this Tile only, a Const behind
    Reshape/Cast/Identity (tf.repeat's), read elsewhere only by shape arithmetic that sizes a Reshape of
    this Tile's output (tf.repeat's merge of the copies). None otherwise."""
    pack = self.body.producer(self.body.data_inputs(node)[1])
    if pack is None or pack.op != "Pack" or _attr(pack, "axis", "i", 0) != 0 or \
            any(reader.name != node.name for reader, _ in self._readers(self.body.ref(pack.name))):
        return None
    elements = self.body.data_inputs(pack)
    count = self.body.producer(elements[a])
    if count is None or sum(self.body.producer(ref) is not None and self.body.producer(ref).name == count.name
                            for ref in elements) != 1:
        return None
    source = count
    while source is not None and source.op in ("Reshape", "Cast", "Identity"):
        source = self.body.producer(self.body.data_inputs(source)[0])
    if source is None or source.op != "Const":
        return None

    def judge(reader, position) -> str:
        data = self.body.producer(reader.input[0])
        if reader.name == pack.name or (reader.op == "Reshape" and position == 1 and data is not None and
                                        data.name == node.name):
            return "end"
        integer = _attr(reader, "DstT" if reader.op == "Cast" else "T", "type", types_pb2.DT_INT32) in \
            (types_pb2.DT_INT32, types_pb2.DT_INT64)
        return "follow" if reader.op in SHAPE_ARITHMETIC and integer else "fail"

    return count.name if _every_use(self, count.name, judge) else None


def _every_use(self: _Entry, start: str, judge) -> bool:
    """Whether every use of node ``start``'s output is accepted, reader by reader: judge(reader,
    input position) says "end" (a use that is fine), "follow" (fine if every use of the reader's
    output is) or anything else (not fine). An output of the body, or one nothing reads, is not."""
    returned = {self.body.parse(ref)[0] for ref in self.returns()}
    pending, seen = [start], {start}
    while pending:
        name = pending.pop()
        readers = list(self._readers(self.body.ref(name)))
        if name in returned or not readers:
            return False
        for reader, position in readers:
            verdict = judge(reader, position)
            if verdict == "end":
                continue
            if verdict != "follow" or len(seen) > 64:
                return False
            if reader.name not in seen:
                seen.add(reader.name)
                pending.append(reader.name)
    return True


def _squeeze_expand(self: _Entry, node) -> None:
    x = self.body.data_inputs(node)[0]
    xs, ys = self.shape(x), self.shape(node.name)
    if not xs or not ys:
        self.unknown(node)
        return
    if node.op == "ExpandDims":
        value = _constant(self, self.body.data_inputs(node)[1])
        if value is None:
            self.unknown(node)
            return
        inserted = int(np.ravel(value)[0]) % len(ys)
        mapping = [(a, a if a < inserted else a + 1) for a in range(len(xs))]
    else:  # Squeeze, with no dims: every size-1 axis
        dims = {d % len(xs) for d in _attr(node, "squeeze_dims", "list", ())} or \
            {a for a, size in enumerate(xs) if size == 1}
        if any(xs[a] is None for a in range(len(xs))) and not _attr(node, "squeeze_dims", "list", ()):
            self.unknown(node)
            return
        kept = [a for a in range(len(xs)) if a not in dims]
        mapping = list(zip(kept, range(len(kept))))
        if not _attr(node, "squeeze_dims", "list", ()):  # a channel axis shrunk to 1 must not go too
            self.graph.squeezes.append((self.entry.label, self.node_id(node.name), tuple(sorted(dims))))
    for axis, target in mapping:
        self.link(self.tensor(x, axis), self.tensor(node.name, target))


def _reshape(self: _Entry, node) -> None:
    x, shape_ref = self.body.data_inputs(node)[:2]
    xs, ys = self.shape(x), self.shape(node.name)
    if not xs or not ys or xs[-1] is None or ys[-1] is None:
        self.unknown(node)
        return
    if _merge_or_split(self, node, x, shape_ref, xs, ys) or _repeat(self, node, x, shape_ref, xs, ys):
        return
    if _batch_blocks(xs, ys) is not None and _blockwise(self, node, x, shape_ref, xs, ys, batch_only=True):
        return  # the batch merged with heads, or split back (_batch_heads)
    if xs[-1] == ys[-1] and _shape_last(self, shape_ref) is None and _shape_of_own_input(self, x, shape_ref):
        self.link(self.tensor(x), self.tensor(node.name))  # tf.tensordot: computed from the input's own shape
        return
    if _shape_last(self, shape_ref) is None:
        if not (_prefix_reshape(self, node, x, shape_ref, xs, ys) | _suffix_reshape(self, node, shape_ref, xs, ys)) \
                and not _blockwise(self, node, x, shape_ref, xs, ys):
            self.unknown(node)
        return
    if xs[-1] == ys[-1]:
        if sum(d != 1 for d in xs) > 1 and _unit_axes(self, node, x, shape_ref, xs, ys):
            return  # static, size-1 axes dropped or added: a 1x1 kernel [1, 1, Cin, Cout] -> [Cin, Cout]
        if len(xs) > 1 and len(ys) > 1 and xs[-2] == ys[-2] and xs[-2] is not None and \
                _suffix_reshape(self, node, shape_ref, xs, ys):
            return  # more than the last axis kept: each kept axis's element follows it
        self.link(self.tensor(x), self.tensor(node.name))
        self.graph.reshapes.append(Reshape(self.entry.label, self.node_id(node.name), self.tensor(x), 1))
        return
    if _flattens(xs, ys):
        space = self.graph.space(("p", self.entry.label, self.node_id(node.name)), xs[-1])
        self.link(self.tensor(x), space)
        self.periodic[self.body.ref(node.name)] = space
        self.graph.poison(self.tensor(node.name), f"Reshape '{node.name}' flattens it")
        self.graph.reshapes.append(Reshape(self.entry.label, self.node_id(node.name), self.tensor(x), ys[-1] // xs[-1]))
        return
    if not (_prefix_reshape(self, node, x, shape_ref, xs, ys) | _suffix_reshape(self, node, shape_ref, xs, ys)) and \
            not _unit_axes(self, node, x, shape_ref, xs, ys) and not _blockwise(self, node, x, shape_ref, xs, ys):
        self.unknown(node)


def _blocks(xs, ys) -> list[tuple[tuple, tuple]] | None:
    """A Reshape from ``xs`` to ``ys`` as consecutive blocks of axes of equal size, [(x axes, y
    axes)], or None: every size static (the one -1 worked out) but for leading axes unknown on both
    sides (the batch), no axis of size 0 or 1."""
    xs, ys = ([None if d is None or d < 0 else int(d) for d in shape] for shape in (xs, ys))
    if xs.count(None) == ys.count(None) and xs.count(None) and xs[0] is not None:
        return _aligned_blocks(xs, ys)
    lead = 0
    while lead < min(len(xs), len(ys)) and xs[lead] is None and ys[lead] is None:
        lead += 1
    rest_x, rest_y = xs[lead:], ys[lead:]
    if not rest_x or None in rest_x or rest_y.count(None) > 1 or \
            min(rest_x + [d for d in rest_y if d is not None]) < 2:  # (an empty axis: nothing to follow)
        return None
    total = int(np.prod(rest_x))
    if None in rest_y:
        known = int(np.prod([d for d in rest_y if d is not None]))
        if total % known or total // known == 1:
            return None
        rest_y[rest_y.index(None)] = total // known
    if int(np.prod(rest_y)) != total:
        return None
    found = _greedy_blocks(rest_x, rest_y)
    if found is None:
        return None
    return [((axis,), (axis,)) for axis in range(lead)] + \
        [(tuple(lead + a for a in part_x), tuple(lead + c for c in part_y)) for part_x, part_y in found]


def _greedy_blocks(sizes_x: list, sizes_y: list) -> list[tuple[range, range]] | None:
    """Static sizes cut into consecutive blocks of equal size, each as small as it can be,
    [(x positions, y positions)]; None where they do not end together."""
    blocks, a, c = [], 0, 0
    while a < len(sizes_x) and c < len(sizes_y):
        first_x, first_y, size_x, size_y = a, c, sizes_x[a], sizes_y[c]
        a, c = a + 1, c + 1
        while size_x != size_y:
            if size_x < size_y and a < len(sizes_x):
                size_x, a = size_x * sizes_x[a], a + 1
            elif size_y < size_x and c < len(sizes_y):
                size_y, c = size_y * sizes_y[c], c + 1
            else:
                return None
        blocks.append((range(first_x, a), range(first_y, c)))
    return blocks if (a, c) == (len(sizes_x), len(sizes_y)) else None


def _aligned_blocks(xs: list, ys: list) -> list[tuple[tuple, tuple]] | None:
    """_blocks where axes of unknown size (as many on each side) pair up in order, each a block of
    its own, and the static axes between them make blocks of equal size (none of size 0 or 1)."""
    unknown_x, unknown_y = ([i for i, d in enumerate(shape) if d is None] for shape in (xs, ys))
    if len(unknown_x) != len(unknown_y):
        return None
    bounds_x, bounds_y = [-1] + unknown_x + [len(xs)], [-1] + unknown_y + [len(ys)]
    blocks = []
    for k in range(len(unknown_x) + 1):
        part_x, part_y = range(bounds_x[k] + 1, bounds_x[k + 1]), range(bounds_y[k] + 1, bounds_y[k + 1])
        sizes_x, sizes_y = [xs[i] for i in part_x], [ys[i] for i in part_y]
        found = _greedy_blocks(sizes_x, sizes_y) if min(sizes_x + sizes_y or [2]) >= 2 else None
        if found is None:
            return None
        blocks += [(tuple(part_x[i] for i in at_x), tuple(part_y[i] for i in at_y)) for at_x, at_y in found]
        if k < len(unknown_x):
            blocks.append(((unknown_x[k],), (unknown_y[k],)))
    return blocks


def _batch_blocks(xs, ys) -> tuple[list, tuple] | None:
    """A Reshape that merges the batch with the static axis after it ([.., B, heads, ..] ->
    [.., B * heads, ..]) or splits such an axis back, as blocks (_blocks) and that one:
    ("merge", batch axis, heads axis, merged axis) or ("split", merged axis, batch axis, heads
    axis); None otherwise."""
    xs, ys = ([None if d is None or d < 0 else int(d) for d in shape] for shape in (xs, ys))
    if xs.count(None) != ys.count(None) or not xs.count(None):
        return None
    for merging, ws, zs in ((True, xs, ys), (False, ys, xs)):  # a split is a merge read backwards
        for i in range(len(ws) - 1):
            if ws[i] is not None or ws[i + 1] is None or ws[i + 1] < 2:
                continue
            blocks = _aligned_blocks(ws[:i + 1] + ws[i + 2:], zs)
            if blocks is None:
                continue
            blocks = [(tuple(axis if axis <= i else axis + 1 for axis in w), z) for w, z in blocks]
            k = next(z[0] for w, z in blocks if w == (i,))
            blocks = [(w, z) for w, z in blocks if w != (i,)]
            if merging:
                return blocks, ("merge", i, i + 1, k)
            return [(z, w) for w, z in blocks], ("split", k, i, i + 1)
    return None


def _blockwise(self: _Entry, node, x: str, shape_ref: str, xs, ys, batch_only: bool = False) -> bool:
    """A Reshape that keeps, splits in two and merges axes in one go (MobileNetV5's multi-query
    attention: [B, C, H, W] -> [B, heads, key dim, H * W], and [B, H * W, heads, value dim] ->
    [B, H, W, heads * value dim]): each block of equal size (_blocks) is read as the rules for one
    axis do: kept (linked), split in two (heads x head dims: _refine_factors) or two merged (at
    most one merge: see _Entry.merged), where the shape operand's elements for it are constants
    shrink_channels can rewrite (a -1 needs none). Other blocks are poisoned. False when nothing
    goes through (``batch_only``: unless the batch merged with heads, or split back, does)."""
    producer = self.body.producer(shape_ref)
    blocks, batch = _blocks(xs, ys), None
    if blocks is None:
        blocks, batch = _batch_blocks(xs, ys) or (None, None)
    if producer is None or producer.op not in ("Const", "Pack") or blocks is None or x in self.merged:
        return False
    y, went = self.body.ref(node.name), batch is not None and _batch_block(self, node, x, producer, batch)
    if batch_only and not went:
        return False

    def rewritable(positions) -> bool:
        return _constant_elements(self, producer, positions)

    def dim(position: int, spaces: tuple) -> None:  # a -1 stays right whatever goes
        if not _literal_minus_one(self, producer, position):
            self.graph.dims.append(ShapeDim(self.entry.label, self.node_id(node.name), position, spaces))

    merges = [block for block in blocks if len(block[0]) == 2 and len(block[1]) == 1]
    for x_axes, y_axes in blocks:
        if len(x_axes) == len(y_axes) == 1 and (xs[x_axes[0]] is None or xs[x_axes[0]] < 0 or rewritable(y_axes)):
            self.link(self.tensor(x, x_axes[0]), self.tensor(y, y_axes[0]))  # an unknown size: _batch_heads
            dim(y_axes[0], (self.tensor(x, x_axes[0]),))
        elif len(x_axes) == 1 and len(y_axes) == 3 and rewritable(y_axes) and \
                all(d is not None and d > 0 for d in (self.shape(y)[a] for a in y_axes)):  # a fused query-key-value
            _split_in_three_at(self, node, x, x_axes[0], y, y_axes[0])
            for axis in y_axes:
                dim(axis, (self.tensor(y, axis),))
        elif len(x_axes) == 1 and len(y_axes) == 2 and rewritable(y_axes):
            spaces = tuple(self.tensor(y, axis) for axis in y_axes)
            self.graph.factors.append((self.tensor(x, x_axes[0]), *spaces))
            self.claim(x, x_axes[0])
            self.claimed.update(spaces)
            for axis in y_axes:
                dim(axis, (self.tensor(y, axis),))
        elif len(merges) == 1 and (x_axes, y_axes) == merges[0] and rewritable(y_axes):
            spaces = tuple(self.tensor(x, axis) for axis in x_axes)
            _merged_into(self, y, y_axes[0], spaces)
            dim(y_axes[0], spaces)
        else:
            continue
        went = True
    return went


def _batch_block(self: _Entry, node, x: str, producer, batch: tuple) -> bool:
    """The block of a Reshape that merges the batch with heads or splits them back (_batch_blocks;
    see _batch_heads). A merge's element must be a -1 or Mul(batch, heads), whose heads
    shrink_channels rewrites (ScaleSite); a split's heads element a constant it can rewrite."""
    y = self.body.ref(node.name)
    if batch[0] == "split":
        _, merged, batch_axis, heads = batch
        if not _constant_elements(self, producer, [heads]):
            return False
        self.graph.batch_splits.append((self.tensor(x, merged), self.tensor(y, heads), node.name))
        self.graph.batch_sides.append((self.tensor(y, batch_axis), self.tensor(x, merged), node.name))
        self.graph.dims.append(ShapeDim(self.entry.label, self.node_id(node.name), heads, (self.tensor(y, heads),)))
        for ref, axis in ((x, merged), (y, batch_axis), (y, heads)):
            self.claim(ref, axis)
        return True
    _, batch_axis, heads, merged = batch
    space, heads_space = self.tensor(y, merged), self.tensor(x, heads)
    size = self.graph.sizes.get(heads_space)
    if size is None:
        return False
    if producer.op == "Const" and not _literal_minus_one(self, producer, merged):
        return False
    if not _literal_minus_one(self, producer, merged):
        element_ref = self.body.data_inputs(producer)[merged]
        element = self.body.producer(element_ref)
        if element is None or element.op != "Mul" or len(list(self._readers(element_ref))) != 1:
            return False
        factors = [_evaluate(self, ref, 0) for ref in self.body.data_inputs(element)[:2]]
        factors = [f if isinstance(f, int) and f >= 0 else None for f in factors]  # -1: unknown
        if factors.count(size) != 1 or None not in factors:
            return False
        self.graph.scales.append(ScaleSite(self.entry.label, self.node_id(element.name), factors.index(size), space))
    self.graph.batch_origin(space, heads_space, size)
    self.graph.batch_sides.append((self.tensor(x, batch_axis), space, node.name))
    for ref, axis in ((x, batch_axis), (x, heads), (y, merged)):
        self.claim(ref, axis)
    return True


def _literal_minus_one(self: _Entry, producer, position: int) -> bool:
    """Whether element ``position`` of a shape operand made by ``producer`` (a Const vector or a
    Pack of scalars) is a constant -1: a Reshape's size to infer, not a size computed as unknown."""
    if producer is not None and producer.op == "Pack":
        inputs = self.body.data_inputs(producer)
        if not -len(inputs) <= position < len(inputs):
            return False
        producer, position = self.origin(inputs[position]), 0
    if producer is None or producer.op != "Const":
        return False
    value = np.ravel(tf.make_ndarray(producer.attr["value"].tensor))
    return -value.size <= position < value.size and int(value[position]) == -1


def _unit_axes(self: _Entry, node, x: str, shape_ref: str, xs, ys) -> bool:
    """A Reshape of static shapes that only adds or drops size-1 axes (GPT-OSS's attention sinks,
    [heads] -> [1, heads, 1, 1]): the other axes go through in order, where the shape operand's
    elements for them are constants shrink_channels can rewrite."""
    if None in xs or None in ys or min(xs + ys) < 0:
        return False
    kept_x, kept_y = ([a for a, d in enumerate(shape) if d != 1] for shape in (xs, ys))
    if not kept_x or [xs[a] for a in kept_x] != [ys[a] for a in kept_y] or \
            not _constant_elements(self, self.body.producer(shape_ref), kept_y):
        return False
    for a, position in zip(kept_x, kept_y):
        self.link(self.tensor(x, a), self.tensor(node.name, position))
        self.graph.dims.append(ShapeDim(self.entry.label, self.node_id(node.name), position, (self.tensor(x, a),)))
    for ref, shape in ((x, xs), (node.name, ys)):
        for a, size in enumerate(shape):
            if size == 1:
                self.claim(ref, a)
    return True


def _suffix_reshape(self: _Entry, node, shape_ref: str, xs, ys) -> bool:
    """A Reshape that regroups leading axes and keeps static trailing ones (Swin's attention
    scores [B * windows, heads, N, N] -> [B, windows, heads, N, N] to add its shifted windows' mask,
    and back): each kept trailing axis goes through where the shape operand's element for it is a
    constant shrink_channels can rewrite. False when nothing goes through."""
    x = self.body.data_inputs(node)[0]
    xs, ys = ([None if d is None or d < 0 else d for d in shape] for shape in (xs, ys))
    k = 0
    while k < min(len(xs), len(ys)) - 1 and xs[-1 - k] is not None and xs[-1 - k] == ys[-1 - k]:
        k += 1
    producer = self.body.producer(shape_ref)
    if k == 0 or producer is None or producer.op not in ("Const", "Pack"):
        return False
    kept = [a for a in range(1, k + 1) if _constant_elements(self, producer, [len(ys) - a])]
    for a in kept:
        self.link(self.tensor(x, len(xs) - a), self.tensor(node.name, len(ys) - a))
        self.graph.dims.append(ShapeDim(self.entry.label, self.node_id(node.name), len(ys) - a,
                                        (self.tensor(x, len(xs) - a),)))
    return bool(kept)


def _prefix_reshape(self: _Entry, node, x: str, shape_ref: str, xs, ys) -> bool:
    """A Reshape that keeps its leading axes and regroups static trailing ones only (rotary
    embeddings' [.., 2, d/2] -> [.., d]): a kept axis of static size, with only static axes up to
    the regrouped ones, goes through where the shape operand's element for it is a constant
    shrink_channels can rewrite; the regrouped axes are poisoned. False when nothing goes through."""
    xs, ys = ([None if d is None or d < 0 else d for d in shape] for shape in (xs, ys))  # -1: unknown
    k = 0
    while k < min(len(xs), len(ys)) and xs[k] == ys[k]:
        k += 1
    while k > 0 and (None in xs[k:] or None in ys[k:] or int(np.prod(xs[k:])) != int(np.prod(ys[k:]))):
        k -= 1
    producer = self.body.producer(shape_ref)
    if k == 0 or producer is None or producer.op not in ("Const", "Pack"):
        return False
    axes = [a for a in range(k) if None not in xs[a:k] and _constant_elements(self, producer, [a])]
    for a in axes:
        self.link(self.tensor(x, a), self.tensor(node.name, a))
        self.graph.dims.append(ShapeDim(self.entry.label, self.node_id(node.name), a, (self.tensor(x, a),)))
    return bool(axes)


def _merged_axis(xs, ys, at: int | None = None) -> int | None:
    """i where a Reshape from ``xs`` to ``ys`` merges axes i and i + 1 (both static) and keeps
    every other axis; None otherwise (the first such i where size-1 axes make it ambiguous). An
    axis of unknown size on one side matches any size on the other (a sequence length that shape
    inference lost through tf.tensordot): the merged axes' values stay in their rows either way.
    ``at``: whether axes ``at`` and ``at + 1`` are merged, either of them of size 1 or not (the
    caller knows which axes the reshape merges: tf.repeat's)."""
    if len(ys) != len(xs) - 1:
        return None
    xs, ys = ([None if d is None or d < 0 else d for d in shape] for shape in (xs, ys))  # -1: unknown

    def same(a, b) -> bool:
        return len(a) == len(b) and all(p is None or q is None or p == q for p, q in zip(a, b))

    for i in range(len(ys)) if at is None else [at]:
        if same(xs[:i], ys[:i]) and same(xs[i + 2:], ys[i + 1:]) and xs[i] is not None and xs[i + 1] is not None \
                and ys[i] == xs[i] * xs[i + 1] and (at is not None or xs[i] > 1 and xs[i + 1] > 1):
            return i
    return None


def _other_axes(i: int, rank: int) -> list[tuple[int, int]]:
    """(axis, the same axis once axes i and i + 1 of a rank-``rank`` shape are merged into one),
    for every axis but those two."""
    return [(axis, axis if axis < i else axis - 1) for axis in range(rank) if axis not in (i, i + 1)]


def _merge_or_split(self: _Entry, node, x: str, shape_ref: str, xs, ys) -> bool:
    """Two adjacent axes merged into one, or a merged axis split back (see _Entry.merged); False
    when the Reshape is neither (the other rules apply)."""
    producer = self.body.producer(shape_ref)
    if producer is None or producer.op not in ("Const", "Pack"):  # shrink_channels rewrites constant elements
        return False
    y = self.body.ref(node.name)
    i = _merged_axis(xs, ys)
    j = _merged_axis(ys, xs)  # a split: the inverse merge
    if not _constant_elements(self, producer, [i] if i is not None else [j, j + 1] if j is not None else []):
        return False

    def split_dims(rank: int) -> None:  # every element of a split shape follows its own axis
        for position in range(rank):
            self.graph.dims.append(ShapeDim(self.entry.label, self.node_id(node.name), position,
                                            (self.tensor(y, position),)))

    if i is not None and self.source(x) is not None and producer.op == "Const":  # a kernel reshaped for a MatMul
        self.merged_kernels[y] = (x, i)
        for ref, rank in ((x, len(xs)), (y, len(ys))):
            for axis in range(rank):
                self.claim(ref, axis)
        _merged_dims(self, node, x, i, len(xs))
        return True
    if i is not None and (len(xs) == 3 or not _flattens(xs, ys)):  # [N, h, d] -> [N, h * d]: heads or a flatten
        _merge(self, x, y, i, len(xs))
        _merged_dims(self, node, x, i, len(xs))
        return True
    if j is not None and x not in self.merged:
        # an axis split in two: the last into heads x head dims (a dense layer's output, as attention
        # splits it), or heads into key/value groups x the query heads sharing each (Gemma's)
        spaces = (self.tensor(y, j), self.tensor(y, j + 1))
        self.graph.factors.append((self.tensor(x, j), *spaces))
        for axis, merged_axis in _other_axes(j, len(ys)):
            self.link(self.tensor(x, merged_axis), self.tensor(y, axis))
        self.claim(x, j)
        self.claimed.update(spaces)
        split_dims(len(ys))
        return True
    if j is not None and x in self.merged and self.merged[x][0] == j:
        spaces = self.merged[x][1]
        if [self.graph.sizes.get(space) for space in spaces] != [ys[j], ys[j + 1]]:
            return False
        self.handled.add((x, node.name))
        for axis, merged_axis in _other_axes(j, len(ys)):
            self.link(self.tensor(x, merged_axis), self.tensor(y, axis))
        self.link(spaces[0], self.tensor(y, j))
        self.link(spaces[1], self.tensor(y, j + 1))
        self.claim(x, j)
        split_dims(len(ys))
        return True
    k = _parameter_split(xs, ys)
    if k is not None and self.source(x) is not None and _constant_elements(self, producer, [k, k + 1]):
        # a per-channel parameter [C] shaped [1, .., 1, groups, C / groups] to scale an activation
        # split so (Keras's GroupNormalization: its gamma and beta): split as the activation is
        spaces = (self.tensor(y, k), self.tensor(y, k + 1))
        self.graph.factors.append((self.tensor(x, 0), *spaces))
        self.claim(x, 0)
        self.claimed.update(spaces)
        for axis in range(k):  # the size-1 axes it broadcasts over
            self.claim(y, axis)
        for position in (k, k + 1):
            self.graph.dims.append(ShapeDim(self.entry.label, self.node_id(node.name), position,
                                            (self.tensor(y, position),)))
        return True
    j = _split_in_three(xs, ys)
    if j is not None and x not in self.merged and _constant_elements(self, producer, [j, j + 1, j + 2]):
        # a fused projection's [.., 3 * heads * d] -> [.., 3, heads, d] (Swin's query-key-value)
        _split_in_three_at(self, node, x, j, y, j)
        for axis in range(len(ys)):
            if axis < j or axis > j + 2:
                self.link(self.tensor(x, axis if axis < j else axis - 2), self.tensor(y, axis))
        split_dims(len(ys))
        return True
    return False


def _parameter_split(xs, ys) -> int | None:
    """k where a Reshape from ``xs`` (one static axis, C) to ``ys`` adds size-1 axes and splits C
    into the last two, [1, .., 1, G, C / G] (both > 1); None otherwise."""
    if len(xs) != 1 or xs[0] is None or len(ys) < 2 or any(d != 1 for d in ys[:-2]) or \
            any(d is None or d < 2 for d in ys[-2:]) or ys[-2] * ys[-1] != xs[0]:
        return None
    return len(ys) - 2


def _split_in_three_at(self: _Entry, node, x: str, a: int, y: str, j: int) -> None:
    """Axis a of x is axes j, j + 1 and j + 2 of y (a fused projection's 3 x heads x head dims):
    split in two, and the second part again (_refine_factors), through a space of its own."""
    ys = self.shape(y)
    inner = self.graph.space(("t", self.entry.label, self.node_id(node.name), "inner", j), ys[j + 1] * ys[j + 2])
    self.graph.factors.append((self.tensor(x, a), self.tensor(y, j), inner))
    self.graph.factors.append((inner, self.tensor(y, j + 1), self.tensor(y, j + 2)))
    self.claim(x, a)
    self.claimed.update(self.tensor(y, axis) for axis in (j, j + 1, j + 2))


def _split_in_three(xs, ys) -> int | None:
    """j where a Reshape from ``xs`` to ``ys`` splits axis j into three static axes (each > 1) and
    keeps every other axis (an unknown size on one side matches any on the other); else None."""
    if len(ys) != len(xs) + 2:
        return None
    xs, ys = ([None if d is None or d < 0 else d for d in shape] for shape in (xs, ys))
    for j in range(len(xs)):
        parts, rest = ys[j:j + 3], list(zip(xs[:j] + xs[j + 1:], ys[:j] + ys[j + 3:]))
        if xs[j] is not None and None not in parts and min(parts) > 1 and int(np.prod(parts)) == xs[j] and \
                all(p is None or q is None or p == q for p, q in rest):
            return j
    return None


def _repeat(self: _Entry, node, x: str, shape_ref: str, xs, ys) -> bool:
    """tf.repeat(data, r, axis=i), as grouped-query attention repeats its key/value heads:
    Reshape(Tile(ExpandDims(data, i + 1), r at i + 1), a shape computed from Shape(data)) merges
    data's axis i with its r copies. The shape follows data's when channels go; the copies' axis
    is the second factor, a group of its own where _tile could make r a count to rewrite."""
    tile = self.body.producer(x)
    if tile is None or tile.op != "Tile" or len(ys) != len(xs) - 1:
        return False
    expand = self.body.producer(self.body.data_inputs(tile)[0])
    if expand is None or expand.op != "ExpandDims":
        return False
    data, dim_ref = self.body.data_inputs(expand)[:2]
    dim, ds = _constant(self, dim_ref), self.shape(data)
    if dim is None or not ds or len(ds) != len(xs) - 1:
        return False
    i = int(np.ravel(dim)[0]) % len(xs) - 1  # data's axis, next to its copies (one key/value head: size 1)
    if i < 0 or _merged_axis(xs, ys, at=i) != i:
        return False
    static = None
    if not _shape_of_own_input(self, data, shape_ref):
        # under a static signature tf.shape(data) is a Const, and the shape is computed from it: the
        # shrunk shape is written in its place, each element the product of its axes' kept sizes
        static = _constant(self, shape_ref)
        if static is None or static.shape != (len(ys),) or \
                any(d is not None and d >= 0 and d != v for d, v in zip(ys, static.tolist())):
            return False
    _merge(self, x, self.body.ref(node.name), i, len(xs))
    if static is not None:
        _merged_dims(self, node, x, i, len(xs), static=tuple(int(v) for v in static.tolist()))
    return True


def _merged_dims(self: _Entry, node, x: str, i: int, rank: int, static: tuple | None = None) -> None:
    """Every element of the shape operand of a Reshape merging axes i and i + 1 of x (rank ``rank``)
    follows its spaces: the merged one is the product of both axes' kept sizes (ShapeDim)."""
    for position in range(rank - 1):
        axes = (i, i + 1) if position == i else (position if position < i else position + 1,)
        self.graph.dims.append(ShapeDim(self.entry.label, self.node_id(node.name), position,
                                        tuple(self.tensor(x, axis) for axis in axes), static=static))


def _merge(self: _Entry, x: str, y: str, i: int, rank: int) -> None:
    """y is x with axes i and i + 1 merged into one (see _Entry.merged); the other axes go through."""
    for axis, merged_axis in _other_axes(i, rank):
        self.link(self.tensor(x, axis), self.tensor(y, merged_axis))
    _merged_into(self, y, i, (self.tensor(x, i), self.tensor(x, i + 1)))


def _merged_into(self: _Entry, y: str, position: int, spaces: tuple) -> None:
    """Axis ``position`` of y is the two ``spaces`` merged (see _Entry.merged): they are accounted
    for here, and whatever reads y follows them (or poisons them: _merged_consumers)."""
    self.merged[y] = (position, spaces)
    self.claimed.update(spaces)
    self.claim(y, position)


def _constant_elements(self: _Entry, producer, positions) -> bool:
    """Whether a Reshape's shape operand has constant elements at ``positions`` that
    shrink_channels can rewrite: a Const, or a Pack of scalars that are Consts there or are
    computed from static sizes (Keras's ``ops.shape(x)[2] // num_heads``: shrink makes them Consts).
    Any other producer (or none: an argument) has none."""
    if producer is None or producer.op not in ("Const", "Pack"):
        return False
    if producer.op == "Const":
        return True
    inputs = self.body.data_inputs(producer)
    if _attr(producer, "axis", "i", 0) != 0 or any(p >= len(inputs) for p in positions):
        return False
    return all(isinstance(_evaluate(self, inputs[p], 0), int) for p in positions)


def _merged_kernel_matmul(self: _Entry, node, a: str, w: str, transposed: bool) -> None:
    """x @ reshape(kernel): the kernel's merged axes are consumed from x's merged axis (its
    factors, one each) or produce the output's last axis merged (see _Entry.merged)."""
    operand, i = self.merged_kernels[w]
    ws, xs, ys = self.shape(operand), self.shape(a), self.shape(node.name)
    if transposed or ws is None or len(ws) != 3 or not xs or not ys or len(xs) != len(ys):
        self.unknown(node)
        return
    if i == 0:  # rows: the kernel's axes 0 and 1, read from x's merged last axis
        merged = self.merged.get(a)
        if merged is None or merged[0] != len(xs) - 1 or \
                [self.graph.sizes.get(space) for space in merged[1]] != [ws[0], ws[1]]:
            self.unknown(node, f"{node.op} '{node.name}' reads a reshaped kernel from a tensor it does not follow")
            return
        self.handled.add((a, node.name))
        self.claim(a, len(xs) - 1)
        self.link(merged[1][0], self.weight(node, operand, 0, "in"))
        self.link(merged[1][1], self.weight(node, operand, 1, "in"))
        self.link(self.tensor(node.name), self.weight(node, operand, 2, "out"))
    else:  # columns: the kernel's axes 1 and 2, the output's last axis merged
        self.link(self.tensor(a), self.weight(node, operand, 0, "in"))
        spaces = (self.weight(node, operand, 1, "out"), self.weight(node, operand, 2, "out"))
        self.merged[self.body.ref(node.name)] = (len(ys) - 1, spaces)
        self.claim(node.name, len(ys) - 1)
    self.handled.add((w, node.name))
    for axis in range(2):
        self.claim(w, axis)
    self.same(a, node.name, node, axes=range(len(ys) - 1))


def _flattens(xs, ys) -> bool:
    """Whether a Reshape from static shape ``xs`` to ``ys`` flattens [N, ..., C] to [N, ... * C]."""
    return bool(xs and ys and len(ys) == 2 and len(xs) >= 3 and None not in xs[1:]
                and int(np.prod(xs[1:])) == ys[-1] and xs[-1] != ys[-1])


def _shape_last(self: _Entry, ref: str):
    """The node holding the last element of a Reshape's shape operand (a Const vector, or a Const
    scalar packed last), or None."""
    node = self.body.producer(ref)
    if node is not None and node.op == "Const":
        return node
    if node is not None and node.op in ("Pack", "ConcatV2"):
        values = self.body.data_inputs(node)[:-1] if node.op == "ConcatV2" else self.body.data_inputs(node)
        last = self.body.producer(values[-1])
        return last if last is not None and last.op == "Const" else None
    return None


SHAPE_ARITHMETIC = ("Pack", "Prod", "GatherV2", "ConcatV2", "StridedSlice", "Cast", "Identity", "Mul", "Const")


def _shape_of_own_input(self: _Entry, x: str, shape_ref: str) -> bool:
    """Whether a Reshape's computed shape operand is arithmetic on constants and Shape(t) only,
    every t being the reshaped tensor ``x`` itself (behind Identity and Transposes that keep the
    last axis): after channels are removed, such a shape follows by itself (tf.tensordot's)."""
    target = _behind_transposes(self, x)
    pending, seen, shapes = [shape_ref], set(), 0
    while pending:
        node = self.body.producer(pending.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op == "Shape":
            if _behind_transposes(self, node.input[0]) != target:
                return False
            shapes += 1
        elif node.op in SHAPE_ARITHMETIC or node.op == "Reshape":  # tf.repeat reshapes its count to a scalar
            pending.extend(self.body.data_inputs(node))
        else:
            return False
        if len(seen) > 64:
            return False
    self.followed_shapes.update(name for name in seen if self.body.node(name).op == "Shape")
    return shapes > 0


def _behind_transposes(self: _Entry, ref: str):
    for _ in range(b.MAX_DEPTH):
        node = self.origin(ref)
        if node is None or node.op != "Transpose" or not _keeps_last(self, node):
            return node.name if node is not None else ref
        ref = node.input[0]
    return None


def _keeps_last(self: _Entry, node) -> bool:
    perm = _constant(self, self.body.data_inputs(node)[1])
    return perm is not None and perm.size > 0 and int(perm[-1]) % perm.size == perm.size - 1


def _transpose(self: _Entry, node) -> None:
    x, perm_ref = self.body.data_inputs(node)[:2]
    perm = _constant(self, perm_ref)
    if perm is None or self.shape(x) is None or perm.size != len(self.shape(x)):
        self.unknown(node)
        return
    for target, axis in enumerate(np.ravel(perm).tolist()):
        self.link(self.tensor(x, int(axis)), self.tensor(node.name, target))


def _identity_n(self: _Entry, node) -> None:
    """IdentityN (tf.custom_gradient's, as Keras 3's swish uses): output i is input i."""
    for index, ref in enumerate(self.body.data_inputs(node)):
        self.same(ref, self.body.ref(node.name, index), node)


def _shape(self: _Entry, node) -> None:
    """Shape(x) reads no channel values; what uses its result decides (a Reshape computed from it
    follows x, see _shape_of_own_input; a tensor created from it is an unknown op's output)."""
    x = self.body.data_inputs(node)[0]
    self.shape_reads[node.name] = x
    for axis in range(len(self.shape(x) or ())):
        self.claim(x, axis)


_NUMBER_OPS = {"Identity", "Cast", "Sqrt", "Rsqrt", "Reciprocal", "Neg", "Square", "Mul", "RealDiv", "Div",
               "AddV2", "Add", "Sub", "Pow", "Maximum", "Minimum", "FloorDiv", "TruncateDiv"}


def _floating(node) -> bool:
    """Whether a node of shape arithmetic or of _NUMBER_OPS makes a float tensor."""
    dtype = _attr(node, {"Cast": "DstT", "GatherV2": "Tparams"}.get(node.op, "T"), "type", 0)
    return bool(dtype) and tf.dtypes.as_dtype(dtype).is_floating


def _made_of_constants(self: _Entry, ref: str) -> bool:
    """Whether tensor ``ref`` is a constant or made from nothing but a shape (a Fill, a Range,
    ones or zeros like another tensor), which a size could make into a shape again."""
    producer = self.body.producer(ref)
    return producer is not None and (producer.op in ("Const", "Fill", "OnesLike", "ZerosLike", "Range",
                                                      "BroadcastTo", "LinSpace") or _constant(self, ref) is not None)


def _elements_picked(self: _Entry, reader, rank: int) -> set:
    """The elements of a shape vector that ``reader`` takes: a StridedSlice's with constant
    bounds (an index, or a range: _strided_slice_value on the element positions), any other
    op's all of them."""
    everything = set(range(rank))
    if reader.op != "StridedSlice":
        return everything
    bounds = [_constant(self, ref) for ref in self.body.data_inputs(reader)[1:4]]
    if any(bound is None for bound in bounds):
        return everything
    picked = _strided_slice_value(reader, [list(range(rank)), *(np.ravel(bound).tolist() for bound in bounds)])
    if picked is None:
        return everything
    return {picked} if isinstance(picked, int) else set(picked)


def _random_like(self: _Entry, node) -> None:
    """A random tensor of shape Shape(x) (a dropout mask), or a Fill of it (tf.ones_like of a
    tensor of unknown batch size): its axes are x's. Its shape follows x when channels go; its
    other operands (seeds, bounds, the fill value) are not channels."""
    shape_ref, *others = self.body.data_inputs(node)
    producer = self.body.producer(shape_ref)
    while producer is not None and producer.op == "Identity":
        producer = self.body.producer(producer.input[0])
    if producer is None or producer.op != "Shape":
        self.unknown(node)
        return
    self.followed_shapes.add(producer.name)
    self.same(producer.input[0], node.name, node)
    for ref in others:
        for axis in range(len(self.shape(ref) or ())):
            self.claim(ref, axis)


def _fill(self: _Entry, node) -> None:
    """tf.fill, tf.zeros, tf.ones. Of Shape(x): x's axes (_random_like). Of a constant shape (a
    Const, or a Pack whose element for the axis is a Const: T5's zero position bias [1, heads, q,
    k]): every value is the same, so an axis of static size follows whatever it meets, and
    shrink_channels rewrites its element of the shape (a ShapeDim on operand 0)."""
    shape_ref = self.body.data_inputs(node)[0]
    producer = self.body.producer(shape_ref)
    if producer is None or producer.op not in ("Const", "Pack"):
        _random_like(self, node)
        return
    for axis, size in enumerate(self.shape(node.name) or ()):
        if size is not None and _constant_elements(self, producer, [axis]):
            self.graph.dims.append(ShapeDim(self.entry.label, self.node_id(node.name), axis,
                                            (self.tensor(node.name, axis),), operand=0))
            self.claim(node.name, axis)
    self.claim(shape_ref, 0)  # the shape vector's own axis is not a channel


def _concat(self: _Entry, node) -> None:
    inputs = self.body.data_inputs(node)
    values, axis_ref = inputs[:-1], inputs[-1]
    axis, out = _constant(self, axis_ref), self.shape(node.name)
    shapes = [self.shape(ref) for ref in values]
    if axis is None or not out or any(not s for s in shapes):
        self.unknown(node)
        return
    axis = int(axis) % len(out)
    for ref in values:  # every other axis goes through; the concatenated one is cut in slices
        self.same(ref, node.name, node, axes=[a for a in range(len(out)) if a != axis])
    if any(s[axis] is None for s in shapes):  # positions of a sequence of unknown length (GPT-OSS's
        return  # attention sinks after its scores): that axis is poisoned, the others went through
    target, offset = self.tensor(node.name, axis), 0
    for ref, shape in zip(values, shapes):
        if shape[axis]:
            self.link(self.tensor(ref, axis), target, offset)
        offset += shape[axis]


def _split(self: _Entry, node) -> None:
    """Split / SplitV / Unpack: every axis but the one cut goes through to each part. Split and
    SplitV into parts of static sizes: each part is a slice of the cut axis (a concatenation read
    backwards; shrink_channels rewrites the part sizes). Unpack's cut axis is poisoned."""
    inputs = self.body.data_inputs(node)
    if node.op == "Unpack":
        x, axis = inputs[0], _attr(node, "axis", "i", 0)
    else:
        x, axis_ref = (inputs[1], inputs[0]) if node.op == "Split" else (inputs[0], inputs[2])
        axis = _constant(self, axis_ref)
    xs = self.shape(x)
    if axis is None or not xs:
        self.unknown(node)
        return
    axis = int(axis) % len(xs)
    for out in self.outputs_of(node):
        ys = self.shape(out)
        if ys is None:
            self.unknown(node)
            return
        removed = node.op == "Unpack"
        for a in range(len(xs)):
            if a != axis:
                self.link(self.tensor(x, a), self.tensor(out, a - 1 if removed and a > axis else a))
    if node.op != "Unpack":
        _split_parts(self, node, x, axis)


def _split_parts(self: _Entry, node, x: str, axis: int) -> None:
    """Link each part's cut axis to its slice of x's (left unclaimed, so poisoned, where a size is
    not known statically)."""
    outs = self.outputs_of(node)
    sizes = [self.shape(out)[axis] for out in outs]
    if self.shape(x)[axis] is None or None in sizes or sum(sizes) != self.shape(x)[axis]:
        return
    offset = 0
    for out, size in zip(outs, sizes):
        if size:
            self.link(self.tensor(out, axis), self.tensor(x, axis), offset)
        offset += size
    self.graph.splits.append(SplitSite(self.entry.label, self.node_id(node.name),
                                       tuple(self.tensor(out, axis) for out in outs)))


def _reverse(self: _Entry, node) -> None:
    """ReverseV2: the axes not reversed go through (a reversed one is poisoned: its channels move)."""
    x, axis_ref = self.body.data_inputs(node)[:2]
    xs, axes = self.shape(x), _constant(self, axis_ref)
    if not xs or axes is None:
        self.unknown(node)
        return
    reversed_ = {int(a) % len(xs) for a in np.ravel(axes)}
    self.same(x, node.name, node, axes=[a for a in range(len(xs)) if a not in reversed_])


def _pack(self: _Entry, node) -> None:
    """Pack (tf.stack): each input's axes go through to the output's, around the new axis."""
    ys = self.shape(node.name)
    if not ys:
        self.unknown(node)
        return
    axis = _attr(node, "axis", "i", 0) % len(ys)
    for ref in self.body.data_inputs(node):
        xs = self.shape(ref)
        if xs is None or len(xs) != len(ys) - 1:
            self.unknown(node)
            return
        for a in range(len(xs)):
            self.link(self.tensor(ref, a), self.tensor(node.name, a if a < axis else a + 1))


def _assign(self: _Entry, node) -> None:
    resource, value = self.body.data_inputs(node)[:2]
    key = self.body.resource_key(resource)
    shape = self.shape(value)
    if key is None:
        self.unknown(node)
        return
    for axis, size in enumerate(shape or ()):
        self.link(self.tensor(value, axis), self.graph.member("variable", key, axis, size, "param"))


def _call(self: _Entry, node) -> None:
    """An If/Case (each branch) or a While (body and condition): the call's inputs are the
    bodies' arguments and its outputs their returns (a loop body's return i is also its argument
    i: the loop carries it), axis by axis; each body is then read like the top graph, with
    shapes inferred from the call's inputs. Resources pass through (a variable read inside is
    the variable's member)."""
    sites = b.CallSite(self.body, node, b.called_functions(node, self.body.library))
    callees = sites.open()
    inputs = self.body.data_inputs(node)
    outputs = self.outputs_of(node)
    loop = node.op in b.LOOP_OPS
    offset = sites.offset
    if not callees or self.body.depth >= b.MAX_DEPTH:
        self.unknown(node)
        return
    children = []
    for callee in callees:
        signature = callee.proto.signature
        refs = [inputs[i + offset] if i + offset < len(inputs) else None for i in range(len(signature.input_arg))]
        shapes = _body_shapes(self.graph.model, callee, [self.shape(ref) if ref else None for ref in refs])
        if shapes is None:
            self.unknown(node, f"{node.op} '{node.name}': the shapes inside '{signature.name}' are not known")
            return
        child = _Entry(self.graph, self.entry, body=callee, shapes=shapes)
        for i, (arg, ref) in enumerate(zip(signature.input_arg, refs)):
            source = self.source(ref) if ref is not None else None
            # a weight handed in: to a branch, or to a loop that hands it back unchanged
            if source is not None and (not loop or _passed_through(child, i)):
                child.arg_sources[arg.name] = source
        children.append(child)
    for child in children:
        signature = child.body.proto.signature
        for i, arg in enumerate(signature.input_arg):
            if arg.type != types_pb2.DT_RESOURCE and i + offset < len(inputs):
                _link_tensors(self, inputs[i + offset], child, arg.name, node)
                _link_lists(self, inputs[i + offset], child, arg.name)
        if loop and child.body.attr[0] == "cond":
            continue
        for j, (out, ret) in enumerate(zip(signature.output_arg, child.returns())):
            if out.type == types_pb2.DT_RESOURCE:
                continue
            if j < len(outputs):
                _link_tensors(self, outputs[j], child, ret, node)
            if loop:
                child.same(ret, signature.input_arg[j].name, node)
                _link_lists(child, signature.input_arg[j].name, child, ret)  # the list the loop carries
                if j < len(outputs):
                    _link_lists(child, ret, self, outputs[j])
    if self.failed:
        return
    for child in children:
        child.run()
    if not loop:  # a list a branch returns: known once the branch is read
        for child in children:
            for j, ret in enumerate(child.returns()[:len(outputs)]):
                _link_lists(child, ret, self, outputs[j])


def _passed_through(child: _Entry, i: int) -> bool:
    """Whether loop body ``child`` returns its argument i as its result i (a loop invariant)."""
    signature = child.body.proto.signature
    if child.body.attr[0] == "cond":
        return True  # a condition returns no loop variable
    if i >= len(signature.output_arg):
        return False
    return child.argument(child.body.proto.ret[signature.output_arg[i].name]) == signature.input_arg[i].name


def _link_lists(self: _Entry, ref: str, other: _Entry, other_ref: str) -> None:
    """TensorList ``ref`` of this body is the same elements as ``other_ref`` of another (a call's
    input and a body's argument, a loop's carried list, a body's return and the call's output)."""
    spaces = self.list_spaces(ref)
    if spaces is not None:
        for a, c in zip(spaces, other.new_list(other_ref, [self.graph.sizes.get(space) for space in spaces])):
            self.link(a, c)
            other.claimed.add(c)


def _link_tensors(self: _Entry, outer: str, child: _Entry, inner: str, node) -> None:
    """Axis by axis, a tensor of this body is the same channels as one of a callee's."""
    outer_shape, inner_shape = self.shape(outer), child.shape(inner)
    if outer_shape is None or inner_shape is None or len(outer_shape) != len(inner_shape):
        self.unknown(node, f"{node.op} '{node.name}' passes a tensor of unknown rank to '{child.body.name}'")
        return
    for axis in range(len(outer_shape)):
        a, c = self.tensor(outer, axis), child.tensor(inner, axis)
        if a is not None and c is not None and self.graph.sizes.get(a) != self.graph.sizes.get(c):
            for space in (a, c):  # a loop that changes the size of an axis: not followed
                self.graph.poison(space, f"{node.op} '{node.name}' changes the size of this axis")
        self.link(a, c)


def _body_shapes(model: g.TracedModel, callee: b.Body, arg_shapes: list) -> dict | None:
    """(node or argument, output index) -> static shape inside a function body, inferred from
    the call's input shapes (every variable read given its variable's shape); None if the body
    cannot be imported."""
    from tensorflow.python.framework import function_def_to_graph as fdg

    function = b.copy_function(callee.proto)
    renamed = {}  # a ReadVariableOp's output is "value", a Placeholder's "output"
    for node in function.node_def:
        key = callee.read_key(node) if node.op == "ReadVariableOp" else None
        if key is not None and key in model.variables:
            _as_placeholder(node, model.variables[key].shape)
            renamed[f"{node.name}:value:0"] = f"{node.name}:output:0"
    for node in function.node_def:
        for position, raw in enumerate(node.input):
            if raw in renamed:
                node.input[position] = renamed[raw]
    for name, raw in list(function.ret.items()):
        if raw in renamed:
            function.ret[name] = renamed[raw]
    shapes_in = [None if shape is None or arg.type == types_pb2.DT_RESOURCE else tf.TensorShape(shape)
                 for shape, arg in zip(arg_shapes, function.signature.input_arg)]
    for position, shape in enumerate(shapes_in):  # an argument's recorded shape would win over the call's
        if shape is not None and position in function.arg_attr and "_output_shapes" in function.arg_attr[position].attr:
            del function.arg_attr[position].attr["_output_shapes"]
    try:
        graph_def, _ = fdg.function_def_to_graph_def(function, shapes_in)
        for name in sorted(b.referenced_functions(function.node_def, callee.library)):  # nested loops, branches
            graph_def.library.function.add().CopyFrom(callee.library[name])
        return _imported_shapes(graph_def)
    except (ValueError, TypeError, KeyError, tf.errors.OpError):  # left whole, with the reason
        return None


def _imported_shapes(graph_def) -> dict[tuple[str, int], list | None]:
    """(node, output index) -> static shape (a list with None for unknown dims; None if the rank
    is unknown) of every output once ``graph_def`` is imported, TensorFlow inferring them."""
    with tf.Graph().as_default() as graph:
        tf.graph_util.import_graph_def(graph_def, name="")
    return {(op.name, index): None if output.shape.rank is None else output.shape.as_list()
            for op in graph.get_operations() for index, output in enumerate(op.outputs)}


def _as_placeholder(node, shape) -> None:
    """Turn a ReadVariableOp node into a Placeholder of the variable's dtype and ``shape``."""
    dtype = type(node.attr["dtype"])()
    dtype.CopyFrom(node.attr["dtype"])
    node.op = "Placeholder"
    del node.input[:]
    node.attr.clear()
    node.attr["dtype"].CopyFrom(dtype)
    node.attr["shape"].shape.CopyFrom(tf.TensorShape(shape).as_proto())


def _as_gather(graph_def, node, shape) -> None:
    """Turn a ResourceGather node into a GatherV2 of a Placeholder of the table's ``shape``."""
    dtype = node.attr["dtype"].type
    table = graph_def.node.add(name=f"{node.name}/graphprune_table", op="Placeholder")
    table.attr["dtype"].type = dtype
    table.attr["shape"].shape.CopyFrom(tf.TensorShape(shape).as_proto())
    axis = graph_def.node.add(name=f"{node.name}/graphprune_axis", op="Const")
    axis.attr["dtype"].type = types_pb2.DT_INT32
    axis.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(0, tf.int32))
    indices = type(node.attr["Tindices"])()
    indices.CopyFrom(node.attr["Tindices"])
    controls = [i for i in node.input if i.startswith("^")]
    ids = node.input[1]
    node.op = "GatherV2"
    del node.input[:]
    node.input.extend([table.name, ids, axis.name, *controls])
    node.attr.clear()
    node.attr["Tparams"].type = dtype
    node.attr["Tindices"].CopyFrom(indices)
    node.attr["Taxis"].type = types_pb2.DT_INT32
    node.attr["batch_dims"].i = 0


_HANDLERS = {
    "IdentityN": _identity_n, **{op: _call for op in CONTROL_FLOW_OPS},
    "Softmax": _softmax, "LogSoftmax": _softmax,
    "Conv2D": _conv, "Conv3D": _conv, "DepthwiseConv2dNative": _depthwise, "MatMul": _matmul, "SparseMatMul": _matmul,
    "SparseTensorDenseMatMul": _sparse_matmul, "Conv2DBackpropInput": _conv_transpose,
    "Conv3DBackpropInputV2": _conv_transpose, **{op: _tensor_list for op in LIST_OPS},
    "BatchMatMul": _matmul, "BatchMatMulV2": _matmul, "BatchMatMulV3": _matmul, "Einsum": _einsum,
    **{op: _batch_norm for op in BATCH_NORM_OPS}, **{op: _pool for op in POOL_OPS}, **{op: _resize for op in RESIZE_OPS},
    "Pad": _pad, "PadV2": _pad,
    "MirrorPad": _pad, "SpaceToBatchND": _space_to_batch, "BatchToSpaceND": _space_to_batch,
    "DepthToSpace": _depth_to_space, "SpaceToDepth": _depth_to_space,
    **{op: _reduce for op in REDUCE_OPS}, "Squeeze": _squeeze_expand,
    "ExpandDims": _squeeze_expand, "Reshape": _reshape, "Transpose": _transpose, "Shape": _shape,
    "ConcatV2": _concat, **{op: _assign for op in ASSIGN_OPS}, "GatherV2": _gather, "ResourceGather": _gather,
    "BroadcastTo": _broadcast_to, "Range": _range, "StridedSlice": _strided_slice, "Slice": _slice, "Tile": _tile,
    "Split": _split, "SplitV": _split, "Unpack": _split, "Pack": _pack, "ReverseV2": _reverse,
    **{op: _random_like for op in RANDOM_OPS}, "Fill": _fill,
}


def _static_shapes(entry: g.Entry, model: g.TracedModel) -> dict[tuple[str, int], list | None]:
    """(node, output index) -> static shape of the entry's top graph (_imported_shapes), every
    variable read given its variable's shape and every input its declared shape."""
    graph_def = g.copy_graph(entry.graph_def)
    body = b.top_body(graph_def, dict(entry.resources), writable=False)
    for node in graph_def.node:
        key = body.read_key(node) if node.op == "ReadVariableOp" else None
        if key is not None and key in model.variables:
            _as_placeholder(node, model.variables[key].shape)
        elif node.op == "ResourceGather":  # a lookup of the variable itself: its table's shape
            key = body.resource_key(node.input[0])
            if key in model.variables and _attr(node, "batch_dims", "i", 0) == 0:
                _as_gather(graph_def, node, model.variables[key].shape)
    for info in entry.inputs:  # the entry's declared input shapes
        node = next((n for n in graph_def.node if n.name == info.placeholder), None)
        if node is not None and info.shape is not None:
            node.attr["shape"].shape.CopyFrom(tf.TensorShape(info.shape).as_proto())
    shapes = _imported_shapes(graph_def)
    for _ in range(4):  # computed reshapes made constant where static sizes tell (Swin's C // heads)
        added = len(graph_def.node)
        patched = _constant_reshapes(graph_def, dict(entry.resources), shapes)
        if not patched:
            break
        try:
            shapes = _imported_shapes(graph_def)
        except (ValueError, tf.errors.OpError):  # sizes TensorFlow finds inconsistent: keep what it inferred
            for node, shape_input in patched:
                node.input[1] = shape_input
            del graph_def.node[added:]
            break
    return shapes


def _inferred_size(view, node, value: list) -> list:
    """A Reshape's shape ``value`` with its -1 worked out where every unknown element is the
    reshaped tensor's own size at some axis (Shape(x)[i]), or the size at the same axis of a tensor
    that is also unknown there (the batch: [B, N, 3, heads, -1] with B read off the layer's input):
    those sizes cancel out of both products."""
    x = node.input[0]
    xs, shape = view.shape(x), view.body.producer(node.input[1])
    if value.count(-1) != 1 or None not in value or xs is None or shape is None or shape.op != "Pack":
        return value
    elements = view.body.data_inputs(shape)
    own = [_dim_read(view, ref, x, k, xs) if v is None else None for k, (v, ref) in enumerate(zip(value, elements))]
    if any(v is None and i is None for v, i in zip(value, own)):
        return value
    matched = {i for i in own if i is not None}
    rest = [d for i, d in enumerate(xs) if i not in matched]
    known = int(np.prod([v for v in value if v is not None and v != -1], dtype=np.int64))
    if None in rest or not known or int(np.prod(rest, dtype=np.int64)) % known:
        return value
    return [int(np.prod(rest, dtype=np.int64)) // known if v == -1 else v for v in value]


def _dim_read(view, ref: str, x: str, position: int, xs) -> int | None:
    """i where ``ref`` is Shape(x)[i], or ``position`` where it is Shape(t)[position] of another
    tensor t whose size there is unknown, as x's is (a StridedSlice that picks one element); else None."""
    node = view.body.producer(ref)
    while node is not None and node.op in ("Identity", "Cast"):
        node = view.body.producer(view.body.data_inputs(node)[0])
    if node is None or node.op != "StridedSlice" or not _attr(node, "shrink_axis_mask", "i", 0) & 1:
        return None
    shape = view.body.producer(node.input[0])
    begin = _evaluate(view, node.input[1], 0)
    if shape is None or shape.op != "Shape" or not isinstance(begin, list) or len(begin) != 1 or \
            not isinstance(begin[0], int):
        return None
    if view.body.parse(shape.input[0])[:2] == view.body.parse(x)[:2]:
        return begin[0] % len(xs)
    ts = view.shape(shape.input[0])
    return position if begin[0] == position and ts and position < len(ts) and ts[position] is None and \
        position < len(xs) and xs[position] is None else None


class _ShapeView:
    """What _evaluate reads (a body, static shapes) of a graph being shape-inferred."""

    def __init__(self, body, shapes):
        self.body, self.shapes = body, shapes

    def shape(self, ref: str):
        name, index, _ = self.body.parse(ref)
        return self.shapes.get((name, index))


def _constant_reshapes(graph_def, resources: dict, shapes: dict) -> list:
    """Give every Reshape whose computed shape operand _evaluate finds (all but at most one element)
    where TensorFlow's inference left sizes unknown a constant operand (-1 for the unknown one), so
    a new inference carries those sizes on through what follows; where more are unknown (a batch
    and a sequence length), a copy of its Pack with the known elements made Consts. The (Reshape,
    its old shape input) changed; the new nodes are appended to ``graph_def``."""
    view = _ShapeView(b.top_body(graph_def, resources, writable=False), shapes)
    patches = []
    for node in graph_def.node:
        shape = shapes.get((node.name, 0))
        if node.op != "Reshape" or not shape or None not in shape:
            continue
        value = _evaluate(view, node.input[1], 0)
        if not isinstance(value, list) or len(value) != len(shape) or \
                not all(v is None or (isinstance(v, int) and v >= -1) for v in value):
            continue
        value = _inferred_size(view, node, value)
        known = [d if d is not None else (v if v is not None and v >= 0 else None) for d, v in zip(shape, value)]
        pack = view.body.producer(node.input[1])
        if known == shape:
            continue
        if sum(d is None for d in known) <= 1:
            patches.append((node, [-1 if d is None else d for d in known], None))
        elif pack is not None and pack.op == "Pack" and len(pack.input) == len(known):
            patches.append((node, known, pack))  # dynamic elements stay: the known ones become Consts
    taken, changed = {node.name for node in graph_def.node}, []

    def unused(name: str) -> str:
        while name in taken:
            name += "_"
        taken.add(name)
        return name

    def constant(name: str, value, dtype):
        const = graph_def.node.add(name=unused(name), op="Const")
        const.attr["dtype"].type = dtype.as_datatype_enum
        const.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(np.array(value, dtype.as_numpy_dtype)))
        return const

    for node, value, pack in patches:
        dtype = tf.dtypes.as_dtype(node.attr["Tshape"].type) if "Tshape" in node.attr else tf.int32
        if pack is None:
            shape = constant(f"{node.name}/graphprune_shape", value, dtype)
        else:
            shape = graph_def.node.add()
            shape.CopyFrom(pack)
            shape.name = unused(f"{node.name}/graphprune_shape")
            for position, size in enumerate(value):
                if size is not None:
                    shape.input[position] = constant(f"{shape.name}/{position}", size, dtype).name
        changed.append((node, node.input[1]))
        node.input[1] = shape.name
    return changed


@dataclasses.dataclass(frozen=True)
class Analysis:
    groups: tuple[ChannelGroup, ...]
    reshapes: tuple[Reshape, ...]
    slices: dict  # space -> [(start, stop, group name)]: where each group's channels lie in it
    sizes: dict  # space -> its channel count
    dims: tuple[ShapeDim, ...] = ()
    means: tuple[MeanSite, ...] = ()
    splits: tuple[SplitSite, ...] = ()
    squeezes: tuple = ()  # (entry, node, axes): a Squeeze of every size-1 axis, and the axes it drops
    refined: dict = dataclasses.field(default_factory=dict)  # a space split into heads -> (heads, dims)
    counts: tuple = ()  # (entry, node, space): a scalar node counting a Tile's copies, now of space's size
    slice_sites: tuple[SliceSite, ...] = ()  # StridedSlices and Slices that take a part of a channel axis
    scales: tuple[ScaleSite, ...] = ()  # Muls that size an axis of the batch merged with heads
    numbers: tuple = ()  # (entry, node, space): a size of space read as a number, which keeps its value
    products: tuple[ProductSite, ...] = ()
    tables: tuple[TableSite, ...] = ()  # tables computed from constants whose kept channels are gathered


def channel_groups(model) -> tuple[ChannelGroup, ...]:
    """Every channel group (prunable or not, with the reason), over every entry, of a TracedModel,
    a PrunableModel, or anything graphprune.prune takes (a SavedModel directory, ...)."""
    if not isinstance(model, g.TracedModel):
        if hasattr(model, "traced"):
            model = model.traced
        else:
            from graphprune.load import load

            model = load(model).model
    if "channel_groups" in model.facts:
        return model.facts["channel_groups"]
    if any(spec.role == names.ROLE_MASK for spec in model.variables.values()):
        # pruned: its layer norms' Means are kept-channel means, and its products zero the removed
        # channels, where prune made them so
        return analyze(model).groups
    groups = analyze(model, through_products=True).groups
    return stream_reasons(model, groups, asked=False, pruned=False)  # as prune(structure="channel") finds them


def _through_means(model: g.TracedModel, groups, through_products: bool = False) -> dict:
    """The groups of ``groups`` that a layer norm's Mean keeps whole (the reason says to ask for
    residual_stream=True) -> the same channels' group with Means let through (None if none)."""
    stale = [group for group in groups if not group.prunable and "residual_stream=True" in group.reason]
    if not stale:
        return {}
    through = {(m.kind, m.name, m.axis): group
               for group in analyze(model, through_means=True, through_products=through_products).groups
               for m in group.members}
    return {group: next((through[key] for key in ((m.kind, m.name, m.axis) for m in group.members)
                         if key in through), None) for group in stale}


def channel_ids(analysis: Analysis, space: tuple) -> list | None:
    """Channel i of ``space`` as (group name, its index in the group); a space split into parts
    (heads x head dims, rotary halves x pairs: Analysis.refined) as the pair of its parts' ids.
    Two spaces with equal ids carry the same channels in the same order. None where a channel
    is in no group."""
    if space in analysis.refined:
        outer, inner = (channel_ids(analysis, part) for part in analysis.refined[space])
        if outer is None or inner is None:
            return None
        return [(outer[i // len(inner)], inner[i % len(inner)]) for i in range(len(outer) * len(inner))]
    size = analysis.sizes.get(space)
    if size is None or space not in analysis.slices:
        return None
    ids = [None] * size
    for start, stop, name in analysis.slices[space]:
        ids[start:stop] = [(name, index) for index in range(stop - start)]
    return None if None in ids else ids


def is_stream(group: ChannelGroup) -> bool:
    """Whether ``group`` is a residual stream: channels written by two or more kernels (summed, as
    residual adds sum every block's output) and read by others, never contracted between two
    activations (attention's query/key head dims are, with the value's where a model ties them).
    A layer norm's Means over a stream are let through only with residual_stream=True (the
    stream couples every layer); over other channels (a conv's or dense layer's own output,
    normalized before its activation; an embedding normalized before its projection; query/key
    heads normalized over their dims) by default (insert_masks: kept-channel means)."""
    written = {m.name for m in group.members if m.role == "out"}
    return len(written) >= 2 and any(m.role == "in" for m in group.members) and not group.contracted


def stream_reasons(model: g.TracedModel, groups, asked: bool = True, pruned: bool = True) -> tuple[ChannelGroup, ...]:
    """``groups`` (analyzed with Means poisoning) with a layer norm's Mean keeping a group whole
    told right: the hint to ask for residual_stream=True stays only where that would remove the
    group (a stream, not ``asked``); where something else keeps it whole (found with Means let
    through), that is the reason. Otherwise, in a model not ``pruned`` yet, the group is prunable
    (prune will make its Means kept-channel means), and in a pruned one its Means stayed plain."""
    stale = _through_means(model, groups, through_products=not pruned)
    fixed = []
    for group in groups:
        other = stale.get(group)
        if group in stale and other is not None and (not other.prunable or asked or not is_stream(other)):
            reason = other.reason if not other.prunable else None if not pruned else (
                "its layer norms' Means stay plain: a kernel of the group is not pruned, or none holds all of its "
                "channels")
            group = dataclasses.replace(group, reason=reason)
        fixed.append(group)
    return tuple(fixed)


def analyze(model: g.TracedModel, through_means: bool = False, through_products: bool = False) -> Analysis:
    """The channel groups of ``model``, and what a rewrite that removes channels must also change.
    ``through_means``: a Mean over the channels alone (a layer norm's) does not keep its group
    whole; the Analysis lists them (``means``) for insert_masks to make means over kept channels.
    ``through_products``: nor does a product of two activations read by more than softmaxes; the
    Analysis lists them (``products``) for insert_masks to zero the removed channels of one operand."""
    import networkx as nx

    graph = _Graph(model, through_means, through_products)
    for entry in model.entries:
        if entry.kind == "update":
            continue
        _Entry(graph, entry).run()
    _batch_heads(graph)
    _poison_nested(graph, model)
    _refine_factors(graph)
    atoms, atom_edges = _atoms(graph)
    network = nx.Graph()
    network.add_nodes_from(atoms)
    network.add_edges_from(atom_edges)
    groups, slices, taken = [], {}, set()
    for component in nx.connected_components(network):
        group = _group(graph, component)
        if group is None:
            continue
        name, number = group.name, 1
        while name in taken:  # a kernel whose output axis is cut in several groups
            number += 1
            name = f"{group.name}#{number}"
        taken.add(name)
        group = dataclasses.replace(group, name=name)
        groups.append(group)
        for space, start, stop in component:
            slices.setdefault(space, []).append((start, stop, name))
    groups.sort(key=lambda group: group.name)
    sizes = {**graph.sizes, **{space: graph.sizes_before_refining[space] for space in graph.refined}}
    return Analysis(tuple(groups), tuple(graph.reshapes), slices, sizes, tuple(graph.dims),
                    tuple(graph.means), tuple(graph.splits), tuple(graph.squeezes), dict(graph.refined),
                    tuple(graph.counts), tuple(graph.slice_sites), tuple(graph.scales), tuple(graph.numbers),
                    tuple(graph.products), tuple(graph.tables))


def _refine_factors(graph: _Graph) -> None:
    """An axis split into heads x head dims (or merged from them and read as one axis): its
    channel i is head i // d, head dim i % d. Every space that carries the same channels (the
    split tensor's, the dense kernel's columns, the bias, ...) is replaced by two spaces, heads
    and head dims, linked as the originals were; a variable's or constant's axis becomes two
    members, one in blocks of d and one with period d. Heads or head dims split again (query heads
    into key/value heads x the query heads that share one, rotary pairs) are refined again, round
    after round. A split whose channels also meet a slice (a Concat), a flattened axis or a split
    of another size is left whole."""
    factors = list(graph.factors)
    while factors:
        factors = _refine_round(graph, factors)


def _refine_round(graph: _Graph, factors: list) -> list:
    """One round of _refine_factors; the factors found for the next round: a part linked to an
    axis that this round split again."""
    import networkx as nx

    plain = nx.Graph()
    edges_of: dict[tuple, list] = {}
    for a, c, offset in graph.edges:
        plain.add_edge(a, c, offset=offset)
        edges_of.setdefault(a, []).append((a, c, offset))
    parts_of: dict[tuple, tuple] = {}
    aligned: set = set()  # (slice, whole, offset): a slice of one head, linked to the head dims
    extra_edges = []
    for whole, heads, dims in factors:
        sizes = [graph.sizes.get(space) for space in (whole, heads, dims)]
        if None in sizes or sizes[0] != sizes[1] * sizes[2]:
            for space in (whole, heads, dims):
                graph.poison(space, "it is split into heads whose sizes are not known statically")
            continue
        if 1 in sizes[1:]:  # one head, or heads of one dim: channel i is that part's i, nothing to split
            # (refining a part of period d by d again would give itself back: Gemma 3n's 2 x 2 AltUp
            # coefficients split a second time)
            extra_edges.append((whole, dims if sizes[1] == 1 else heads, 0))
            continue
        component = nx.node_connected_component(plain, whole) if whole in plain else {whole}
        period = sizes[2]
        why, slices = None, _head_slices(graph, component, edges_of, sizes[0], period)
        if slices is None:
            why = "it is split into heads and sliced (a concatenation)"
        elif slices and any(graph.sizes[space] == period and space in parts_of for space in component):
            why = "it is split into heads of two different sizes"
        elif any(space[0] == "p" or (space[0] in ("v", "c") and space[3] is not None and
                                     space not in graph.refined_parts) for space in component):
            why = "it is split into heads and flattened"
        elif any(space in parts_of and graph.sizes[parts_of[space][1]] != period for space in component):
            why = "it is split into heads of two different sizes"
        if why is not None:
            if why.endswith("(a concatenation)"):  # the other slices are other channels: they may go
                same = nx.Graph((a, c) for a, c, data in plain.subgraph(component).edges(data=True)
                                if not data["offset"] and graph.sizes.get(a) == graph.sizes.get(c))
                component = nx.node_connected_component(same, whole) if whole in same else {whole}
            for space in component | {heads, dims}:
                graph.poison(space, why)
                for part in parts_of.get(space, ()):  # refined by an earlier factor this round
                    graph.poison(part, why)
            continue
        aligned.update(slices)
        for space in component:
            if space in parts_of or (slices and graph.sizes[space] == period):  # a slice stays whole
                continue
            parts = _parts(space, period)
            parts_of[space] = parts
            graph.refined_parts.update(parts)
            if space in graph.contracted:
                graph.contracted.update({part: graph.contracted[space] for part in parts})
            for part, size in zip(parts, (sizes[1], period)):
                graph.sizes[part] = size
                if space in graph.poisoned:
                    graph.poison(part, graph.poisoned[space])
                if space in graph.roles:
                    graph.roles[part] = graph.roles[space]
        if slices:  # a slice holds one head: the heads cannot go (nor be told apart)
            for space in component:
                if space in parts_of:
                    graph.poison(parts_of[space][0], "its parts are sliced apart (a rotary embedding's halves)")
        extra_edges += [(parts_of[whole][0], heads, 0), (parts_of[whole][1], dims, 0)]
    if not parts_of:
        return []
    edges = []
    for a, c, offset in graph.edges:
        if a in parts_of and c in parts_of:  # a component is refined whole
            edges += [(parts_of[a][0], parts_of[c][0], 0), (parts_of[a][1], parts_of[c][1], 0)]
        elif (a, c, offset) in aligned and c in parts_of:  # slice a is one head: channel i is head dim i
            edges.append((a, parts_of[c][1], 0))
        elif a in parts_of or c in parts_of:  # never so (_head_slices); were it, nothing of it goes
            for space in (a, c, *parts_of.get(a, ()), *parts_of.get(c, ())):
                graph.poison(space, "it is split into heads and sliced (a concatenation)")
        else:
            edges.append((a, c, offset))
    nested = []
    for part, axis, offset in extra_edges:
        if axis in parts_of:  # heads or head dims split again: the part is split the same way next round
            nested.append((part, *parts_of[axis]))
        else:
            edges.append((part, axis, offset))
    graph.edges = edges
    for space, parts in parts_of.items():
        graph.sizes_before_refining[space] = graph.sizes.pop(space)
        graph.refined[space] = parts
    return nested


def _head_slices(graph: _Graph, component, edges_of: dict, size: int, period: int):
    """The edges of ``component`` (spaces of ``size`` channels split into heads of ``period``) that
    tie a slice of one whole head to a split space: an empty set when there are none; None when
    some space or edge is another cut (a slice across heads, a concatenation of other sizes)."""
    found = set()
    for space in component:
        if graph.sizes.get(space) not in (size, period):
            return None
        for a, c, offset in edges_of.get(space, ()):
            if graph.sizes[a] == graph.sizes[c]:
                if offset:
                    return None
            elif graph.sizes[a] == period and graph.sizes[c] == size and offset % period == 0:
                found.add((a, c, offset))
            else:
                return None
    if any(graph.sizes[space] == size for space in component) and period < size:
        return found
    return None if found else set()


def _parts(space: tuple, d: int) -> tuple[tuple, tuple]:
    """The (outer, inner) spaces of ``space`` split into parts of d channels. A variable's or
    constant's axis space (kind, name, axis, period, block) has channel c at the indices
    (q * period + c) * block + r (Member); its outer part is every d of its channels, in blocks d
    times as long, its inner part the channel within them, with period d."""
    if space[0] not in ("v", "c"):
        return (*space, "heads"), (*space, "dims")
    period, block = space[3], (space[4] if len(space) > 4 else None)
    outer = (*space[:3], None if period is None else period // d, d * (block or 1))
    inner = (*space[:3], d) + ((block,) if block is not None else ())
    return outer, inner


def _batch_heads(graph: _Graph) -> None:
    """Follow each axis that holds the batch merged with heads (_Graph.batch_origins) through the
    links of axes of unknown size: every axis it reaches carries those heads (each over every
    batch element, as a channel axis carries its channels) and has their count; it is poisoned
    where it meets a static axis, a part of itself (an offset) or heads of another count, where
    a Reshape computes its size from anything but the size of an axis that carries the same heads
    (a -1 needs none), or where its size is read into anything else. A Reshape that splits such an
    axis back into [.., B, heads, ..] links the heads; one that splits any other unknown axis so
    keeps that axis's heads whole."""
    neighbours: dict[tuple, list] = {}
    for a, c, offset in graph.loose:
        neighbours.setdefault(a, []).append((c, offset))
        neighbours.setdefault(c, []).append((a, offset))
    sizes, bad = dict(graph.batch_origins), {}
    pending = list(sizes)
    while pending:
        space = pending.pop()
        for other, offset in neighbours.get(space, ()):
            if other not in graph.unsized and other not in graph.batch_origins:
                bad.setdefault(space, "it holds heads merged with the batch and meets a static axis")
            elif offset:
                bad.setdefault(space, "it holds heads merged with the batch and meets a part of itself")
            elif other not in sizes:
                sizes[other] = sizes[space]
                pending.append(other)
            elif sizes[other] != sizes[space]:
                bad.setdefault(space, "it holds heads merged with the batch and meets heads of another count")
    edges = [(a, c, 0) for a, c, offset in graph.loose if a in sizes and c in sizes and not offset]
    for merged, heads, reshape in graph.batch_splits:
        if merged in sizes and sizes[merged] == graph.sizes.get(heads):
            edges.append((merged, heads, 0))
        else:
            graph.poison(heads, f"Reshape '{reshape}' splits it off an axis of unknown size")
            if merged in sizes:
                bad.setdefault(merged, f"Reshape '{reshape}' splits off heads of another count")
    for batch, merged, reshape in graph.batch_sides:  # the batch beside heads must not hold heads itself
        if batch in sizes:
            for space in (batch, merged):
                bad.setdefault(space, f"Reshape '{reshape}' merges heads with an axis that holds heads")
    follows = {}
    dims = []
    for dim in graph.dims:
        if not any(space in sizes for space in dim.spaces):
            dims.append(dim)
            continue
        element = graph.dim_elements.get(dim, ("other",))
        if element[0] == "follows" and len(dim.spaces) == 1 and sizes.get(element[1]) == sizes.get(dim.spaces[0]):
            edges.append((dim.spaces[0], element[1], 0))
            follows[(dim.entry, dim.node, dim.position)] = element[1]
        elif element[0] != "inferred":
            for space in dim.spaces:
                bad.setdefault(space, f"Reshape '{dim.node}' computes the size of an axis that holds heads "
                                      "merged with the batch")
    graph.dims = dims
    rewritten = [(site.space, site.node) for site in graph.reshapes + graph.slice_sites + graph.means] + \
        [(space, site.node) for site in graph.splits for space in site.spaces] + \
        [(space, node) for _, node, space in graph.counts]
    for space, node in rewritten:  # sizes written as the channel count alone
        if space in sizes:
            bad.setdefault(space, f"'{node}' writes the size of an axis that holds heads merged with the batch")
    for space, targets, shape in graph.size_reads:
        if space in sizes and (targets is None or any(target not in follows for target in targets)):
            bad.setdefault(space, f"Shape '{shape}' reads the size of an axis that holds heads merged with "
                                  "the batch into something that does not follow it")
    for space, size in sizes.items():
        graph.sizes[space] = size
        graph.unsized.discard(space)
        reasons = [why for why in graph.reasons.get(space, ()) if why not in (UNSIZED, MEETS_UNSIZED)]
        why = bad.get(space) or (reasons[0] if reasons else None)
        if why is None:
            graph.poisoned.pop(space, None)
        else:
            graph.poisoned[space] = why
    graph.edges.extend((a, c, 0) for a, c, _ in edges if graph.sizes.get(a) == graph.sizes.get(c))


def _poison_nested(graph: _Graph, model: g.TracedModel) -> None:
    """Variables read inside function bodies that _call does not read (a function called as an
    op, a call kept by the loader) are not modelled."""
    for entry in model.entries:
        if entry.kind == "update":
            continue

        def visit(body, entry=entry):
            site = body.site
            while site is not None and site.node.op in CONTROL_FLOW_OPS:
                site = site.parent.site
            if site is None:
                return
            for node in body.nodes:
                key = body.read_key(node) if node.op == "ReadVariableOp" else None
                if key is not None:
                    graph.poisoned_variables.setdefault(key, f"it is read inside function '{body.name}'")

        b.visit_entry(entry, visit)


def _atoms(graph: _Graph):
    """Split spaces where a related space has a boundary (a Concat's slices), to a fixed point:
    (atoms as (space, start, stop), edges between atoms)."""
    cuts = {space: {0, size} for space, size in graph.sizes.items()}
    changed = True
    edges = graph.edges  # _Graph.link keeps only edges between spaces of known size
    for a, c, offset in edges:
        cuts[c].update((offset, offset + graph.sizes[a]))
    while changed:
        changed = False
        for a, c, offset in edges:
            length = graph.sizes[a]
            into_c = {x + offset for x in cuts[a]} - cuts[c]
            into_a = {x - offset for x in cuts[c] if offset <= x <= offset + length} - cuts[a]
            if into_c or into_a:
                cuts[c] |= into_c
                cuts[a] |= into_a
                changed = True
    atoms = []
    bounds = {}
    for space, points in cuts.items():
        ordered = sorted(points)
        bounds[space] = ordered
        atoms.extend((space, start, stop) for start, stop in zip(ordered, ordered[1:]))
    atom_edges = []
    for a, c, offset in edges:
        ordered = bounds[a]
        for start, stop in zip(ordered, ordered[1:]):
            atom_edges.append(((a, start, stop), (c, start + offset, stop + offset)))
    return atoms, atom_edges


def _group(graph: _Graph, component) -> ChannelGroup | None:
    atoms = sorted(component, key=repr)
    sizes = {stop - start for _, start, stop in atoms}
    size = sizes.pop()
    members, reason = [], None
    for space, start, stop in atoms:
        if space in graph.poisoned:
            reason = reason or graph.poisoned[space]
        if space[0] not in ("v", "c"):
            continue
        kind = "variable" if space[0] == "v" else "const"
        name, axis, period = space[1], space[2], space[3]
        block = space[4] if len(space) > 4 else None
        if kind == "variable":
            spec = graph.model.variables.get(name)
            if spec is None or spec.role != names.ROLE_OTHER:
                continue  # masks, thresholds: they follow their weight
            if name in graph.poisoned_variables:
                reason = reason or f"'{name}': {graph.poisoned_variables[name]}"
        members.append(Member(kind, name, axis, start, stop, period, graph.roles.get(space, "param"), block))
    if not any(m.role in ("in", "out", "through") for m in members):
        return None  # no kernel: parameters of a group with nothing to prune
    if reason is None and not any(space[0] in ("t", "p") for space, _, _ in atoms):
        reason = "no tensor of the graph carries these channels"
    # a product of two activations reads them (attention's query/key head dims): only where it is
    # read by softmaxes alone (a constant left by a bias is a shift they ignore), and a channel is
    # dead only where the kernels that make it hold zeros too, whether or not a kernel also reads it
    contracted = [graph.contracted[space] for space, _, _ in atoms if space in graph.contracted]
    read = any(m.role == "in" for m in members)
    if reason is None and contracted and not all(contracted):
        reason = "a product of two activations over them is read by more than a softmax"
    if reason is None and not read and not contracted:
        reason = "no kernel consumes these channels"
    if reason is None and size < 2:
        reason = "a single channel"
    named = next((m for m in members if m.role == "out"), None) or next(m for m in members if m.role != "param")
    suffix = "" if (named.start, named.stop) == (0, size) and named.period is None and named.block is None else \
        f"[{named.start}:{named.stop}]" + (f" heads of {named.block}" if named.block else "") + \
        (f" every {named.period}" if named.period else "")
    name = f"{named.name}:{named.axis}{suffix}"
    return ChannelGroup(name, size, tuple(members), reason, bool(contracted))


def rounding(group: ChannelGroup, round_to: int, shape_of, contracted=frozenset()) -> int:
    """The multiple a group's kept count is rounded up to: ``round_to`` over what one channel of
    the group already spans in the kernels that produce it (shape_of(member) gives a member's
    weight shape; ``contracted`` holds the (weight, axis) pairs that are some group's "in" axes,
    which a channel does not span). A conv's or dense layer's channel spans one value, so it is
    ``round_to``; an attention head spans its head_dim values (and a key/value head its query
    heads' too), so 8 heads of 64 need no rounding to give kernels multiples of 8."""
    spans = []
    for m in group.members:
        if m.role == "out":
            shape = shape_of(m)
            after = [size for axis, size in enumerate(shape) if axis > m.axis and (m.name, axis) not in contracted]
            spans.append((m.block or 1) * int(np.prod(after, dtype=np.int64)))
    return round_to // np.gcd(round_to, min(spans)) if spans else round_to


def contracted_axes(groups) -> set:
    """(weight, axis) of every kernel axis that consumes channels (an "in" member of any group)."""
    return {(m.name, m.axis) for group in groups for m in group.members if m.role == "in"}


def describe(groups) -> str:
    """One line per group: its name, size, whether it is prunable (or why not) and its members.
    A constant (a finalized model's kernel) is shown by the weight it was made from ('left/kernel',
    not 'signature:serving_default/StatefulPartitionedCall/.../left/kernel/graphprune/masked')."""
    lines = []
    for group in groups:
        # each entry has its own copy of a constant: one line names it once
        roles = ", ".join(dict.fromkeys(f"{_shown(m.kind, m.name)}[{m.axis}]{'' if m.role == 'param' else ' ' + m.role}"
                                        for m in group.members))
        state = "prunable" if group.prunable else f"left whole: {group.reason}"
        name = group.name
        for m in group.members:
            if m.kind == "const" and name.startswith(m.name + ":"):
                name = _shown("const", m.name) + name[len(m.name):]
                break
        lines.append(f"{name}: {group.size} channels, {state}; {roles}")
    return "\n".join(lines)


def _shown(kind: str, name: str) -> str:
    """A member's name as describe shows it: a constant's ("entry label/node") as the weight name."""
    if kind != "const" or "/" not in name:
        return name
    return names.display_name(name.split("/", 1)[1])


@dataclasses.dataclass(frozen=True)
class Cost:
    """Parameters (float variables and constants of rank >= 1 that the entry reads) and FLOPs
    (2 x multiply-adds of its convolutions and matrix products, at batch 1) of one entry, in
    its loops and branches too (a loop body counted once, every branch counted); only what the
    outputs need counts. ``non_trainable``: how many of the parameters are in variables the
    model does not train (batch-norm moving statistics, state), which PyTorch counts as buffers,
    not parameters. ``uncounted``: convolutions and matrix products whose shapes are not known
    (a text model's sequence length; cost(..., unknown_size=N) gives it): they count no FLOPs."""

    entry: str
    parameters: int
    flops: int
    non_trainable: int = 0
    uncounted: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def ratios(self, baseline: "Cost") -> str:
        """'0.27x parameters, 0.26x FLOPs' against ``baseline``."""
        return (f"{self.parameters / max(baseline.parameters, 1):.2f}x parameters, "
                f"{self.flops / max(baseline.flops, 1):.2f}x FLOPs")


def cost(target, entry: str | None = None, *, unknown_size: int | None = None) -> Cost:
    """Parameters and FLOPs at batch 1 of a model's default entry (or ``entry``): a SavedModel
    directory, a PrunableModel, or anything graphprune.prune takes. An input dimension past the
    batch that the entry leaves unknown (a text model's sequence length) counts no FLOPs, unless
    ``unknown_size`` gives it (every such dimension of every input takes that size)."""
    if unknown_size is not None and (isinstance(unknown_size, bool) or not isinstance(unknown_size, (int, np.integer))
                                     or unknown_size < 1):
        raise GraphPruneError(f"unknown_size must be a whole number >= 1, got {unknown_size!r}")
    from graphprune.load import load

    if hasattr(target, "traced"):
        model = target.traced
    else:
        model = load(target).model
    entries = [e for e in model.entries if e.kind != "update" and e.alias is None]
    chosen = next((e for e in entries if e.name == entry), None) if entry else None
    if chosen is None:
        chosen = next((e for e in entries if e.name in ("__call__", "serve", "serving_default")), entries[0])
    def sized(shape):
        if not shape:
            return shape
        rest = tuple(unknown_size if d is None and unknown_size is not None else d for d in shape[1:])
        return (1 if shape[0] is None else shape[0], *rest)

    batch_one = dataclasses.replace(chosen, inputs=tuple(
        dataclasses.replace(info, shape=sized(info.shape)) for info in chosen.inputs))
    keys, totals = set(), [0, 0, 0, 0]

    def count(body, shapes, depth=0):
        def shape(ref):  # at batch 1: a loop's or a branch's outputs keep the batch unknown
            name, index, _ = body.parse(ref)
            found = shapes.get((name, index))
            return [1, *found[1:]] if found and found[0] is None else found

        returned = body.proto.ret.values() if body.is_function else chosen.outputs
        # what the outputs are computed from; a control edge orders, it computes nothing they use
        live = b.live_nodes(body, [body.source(ref) for ref in returned], control=False)
        for node in body.nodes:
            if node.name not in live:  # what no output needs (Keras's probing RNN step) never runs
                continue
            if node.op in ("ReadVariableOp", "ResourceGather", "ResourceGatherNd"):  # a read, or a lookup
                key = body.read_key(node) if node.op == "ReadVariableOp" else body.resource_key(node.input[0])
                spec = model.variables.get(key)
                if spec is not None and key not in keys and len(spec.shape) >= 1 and "float" in spec.dtype:
                    keys.add(key)
                    totals[0] += int(np.prod(spec.shape))
                    totals[2] += 0 if spec.trainable else int(np.prod(spec.shape))
            elif node.op == "Const" and "float" in tf.dtypes.as_dtype(node.attr["dtype"].type).name:
                dims = node.attr["value"].tensor.tensor_shape.dim
                if len(dims) >= 1:
                    totals[0] += int(np.prod([d.size for d in dims]))
            elif node.op in CONTROL_FLOW_OPS and depth < b.MAX_DEPTH:
                site = b.CallSite(body, node, b.called_functions(node, body.library))
                inputs = body.data_inputs(node)
                for callee in site.open():
                    args = callee.proto.signature.input_arg
                    arg_shapes = [shape(inputs[i + site.offset]) if i + site.offset < len(inputs) else None
                                  for i in range(len(args))]
                    inner = _body_shapes(model, callee, arg_shapes)
                    if inner is not None:
                        count(callee, inner, depth + 1)
            flops = _flops(node, shape, body)
            totals[1] += flops or 0
            totals[3] += flops is None

    count(b.top_body(chosen.graph_def, dict(chosen.resources), writable=False), _static_shapes(batch_one, model))
    return Cost(chosen.label, *totals)


PRODUCT_OPS = ("Conv2D", "Conv3D", "DepthwiseConv2dNative", "Conv2DBackpropInput", "Conv3DBackpropInputV2", "MatMul",
               "SparseMatMul", "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3", "Einsum")


def _flops(node, shape, body) -> int | None:
    """2 x multiply-adds of a convolution or matrix product (0 for any other op); None for one
    whose shapes are not known."""
    if node.op not in PRODUCT_OPS:
        return 0
    inputs = body.data_inputs(node)
    out = shape(node.name)
    if not out or None in out:
        return None
    if node.op in ("Conv2DBackpropInput", "Conv3DBackpropInputV2"):  # each input value times [(d,) h, w, out]
        kernel, x = shape(inputs[1]), shape(inputs[2])
        if not kernel or None in kernel or not x or None in x:
            return None
        return 2 * int(np.prod(x)) * int(np.prod(kernel[:-1]))
    if node.op in ("Conv2D", "Conv3D", "DepthwiseConv2dNative"):
        kernel = shape(inputs[1])
        if not kernel or None in kernel:
            return None
        # a grouped kernel's Cin is already per group; a depthwise output reads one input channel
        per_output = int(np.prod(kernel[:-2])) * (kernel[-2] if node.op != "DepthwiseConv2dNative" else 1)
        return 2 * int(np.prod(out)) * per_output
    if node.op in ("MatMul", "SparseMatMul", "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3", "Einsum"):
        operand = shape(inputs[0])
        if not operand or None in operand:
            return None
        if node.op == "Einsum":
            lhs, _, result = _attr(node, "equation", "s", b"").decode().replace(" ", "").partition("->")
            terms = lhs.split(",")
            sizes = {}
            for term, ref in zip(terms, inputs):
                dims = shape(ref)
                if not dims or None in dims or "." in term or len(term) != len(dims):
                    return None
                sizes.update(zip(term, dims))
            contracted = [letter for letter in sizes if letter not in result]
            return 2 * int(np.prod(out)) * int(np.prod([sizes[c] for c in contracted] or [1]))
        transposed = _attr(node, "transpose_a" if node.op in MATMUL_2D else "adj_x", "b", False)
        depth = operand[-2] if transposed else operand[-1]
        return 2 * int(np.prod(out)) * depth
    return 0
