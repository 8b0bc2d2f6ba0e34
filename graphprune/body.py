"""One view of a graph body: an entry's top-level GraphDef or a FunctionDef of its library.

The two spell tensors differently (top level: ``n``, ``n:1``; a function body: ``arg``,
``n:z:0``, ``n:output:1``). A pass never spells either: it asks its Body.

    Body        nodes by name, parsed inputs, producers and consumers, re-pointing inputs,
                replacing a node under its own name, adding and deleting nodes, the variable
                behind a resource tensor (``resources``: placeholder or argument -> variable
                key), a resource tensor for any variable (``resource``), and the call sites
                through which it reaches other bodies.
    walk        applies ``visit(body)`` to the top graph and to every body reachable from it
                (While/If/Case bodies, (Stateful)PartitionedCall functions, functions called
                as ops), at any depth, before or after their callees. A body a pass changed
                gets a content-hashed name and its caller points at it; a resource a nested
                body asks for is threaded through every caller on the way (a loop variable
                the body passes through, a branch input, a call argument).

    entry graph:  Placeholder(w) -> While(..., w) --body--> f: arg w_0 -> If(w_0) --then--> g: ...
                                          Body(top)             Body(f)                  Body(g)
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Callable, Iterable, Mapping

import tensorflow as tf

from tensorflow.core.framework import types_pb2

from graphprune import compat
from graphprune import graph as g
from graphprune import names

# Call ops: (function attrs, offset from the node's data input index to the function's arg index).
CALL_OPS = {
    "While": (("body", "cond"), 0),
    "StatelessWhile": (("body", "cond"), 0),
    "If": (("then_branch", "else_branch"), 1),
    "StatelessIf": (("then_branch", "else_branch"), 1),
    "Case": (("branches",), 1),
    "StatelessCase": (("branches",), 1),
    "PartitionedCall": (("f",), 0),
    "StatefulPartitionedCall": (("f",), 0),
}
LOOP_OPS = ("While", "StatelessWhile")
MAX_DEPTH = 64


def _is_loop(op: str) -> bool:
    return op in LOOP_OPS


class Body:
    """A uniform, mutable view over the nodes of one graph body (see the module docstring)."""

    def __init__(self, proto, *, function: bool, resources: dict, library: dict, site: "CallSite | None" = None,
                 path: str = "", writable: bool = True, variables: Mapping | None = None):
        self.proto = proto
        self.is_function = function
        self.resources = resources  # placeholder (top) / argument (function) name -> variable key
        self.library = library  # function name -> FunctionDef, shared by every body of the entry
        self.site = site
        self.path = path
        self.writable = writable
        self.variables = variables if variables is not None else {}  # key -> VariableSpec, where known
        self.changed = False
        self.attr = None  # (attr, list index) of the call that reaches this body
        self._nodes = None
        self._consumers = None

    # --- identity -------------------------------------------------------------------------------
    @property
    def nodes(self):
        return self.proto.node_def if self.is_function else self.proto.node

    @property
    def name(self) -> str:
        return self.proto.signature.name if self.is_function else ""

    @property
    def depth(self) -> int:
        return 0 if self.site is None else self.site.parent.depth + 1

    def use_name(self, node) -> str:
        """A name for a node that is unique across the entry's bodies: the call path + its name."""
        return self.path_name(node.name)

    def path_name(self, name: str) -> str:
        """use_name for a node or argument given by name."""
        return self.path + name

    def root(self) -> "Body":
        body = self
        while body.site is not None:
            body = body.site.parent
        return body

    # --- lookup ---------------------------------------------------------------------------------
    def node(self, name: str):
        if self._nodes is None:
            self._nodes = {node.name: node for node in self.nodes}
        return self._nodes.get(name)

    def fresh(self, name: str) -> str:
        """``name``, or the first of ``name_1``, ``name_2``, ... that no node of this body has."""
        candidate, n = name, 1
        while self.node(candidate) is not None:
            candidate, n = f"{name}_{n}", n + 1
        return candidate

    def parse(self, ref: str) -> tuple[str, int, bool]:
        """(node or argument name, flat output index, is control) of an input reference."""
        if ref.startswith("^"):
            return ref[1:], -1, True
        if not self.is_function:
            return g.parse_input(ref)
        parts = ref.split(":")
        if len(parts) == 1:
            return parts[0], 0, False
        node = self.node(parts[0])
        index = int(parts[2]) if len(parts) > 2 else 0
        if node is None:
            return parts[0], index, False
        offset = 0
        for arg_name, size in _output_args(node, self.library):
            if arg_name == parts[1]:
                return parts[0], offset + index, False
            offset += size
        return parts[0], index, False

    def source(self, ref: str) -> str:
        """The name of the node (or argument) an input reference reads."""
        return ref.lstrip("^").split(":")[0]

    def producer(self, ref: str):
        """The node making tensor ``ref``; None for an argument or a missing node."""
        return self.node(self.source(ref))

    def data_inputs(self, node) -> list[str]:
        return [raw for raw in node.input if not raw.startswith("^")]

    def ref(self, node_name: str, index: int = 0) -> str:
        """How this body spells output ``index`` of node ``node_name``."""
        if not self.is_function:
            return g.tensor_name(node_name, index)
        node = self.node(node_name)
        if node is None:  # an argument
            return node_name
        offset = 0
        for arg_name, size in _output_args(node, self.library):
            if index < offset + size:
                return f"{node_name}:{arg_name}:{index - offset}"
            offset += size
        raise ValueError(f"node '{node_name}' ({node.op}) has no output {index}")

    def consumers(self, name: str) -> list:
        """(node, input position) for every input that reads node ``name`` (data or control)."""
        if self._consumers is None:
            consumers: dict[str, list] = {}
            for node in self.nodes:
                for position, raw in enumerate(node.input):
                    consumers.setdefault(self.source(raw), []).append((node, position))
            self._consumers = consumers
        return self._consumers.get(name, [])

    def outputs(self) -> list[str]:
        """The references this body returns (a function's rets; the top graph's are the entry's)."""
        if self.is_function:
            return list(self.proto.ret.values()) + list(self.proto.control_ret.values())
        return []

    # --- variables ------------------------------------------------------------------------------
    def resource_key(self, ref: str) -> str | None:
        """The variable key behind a resource tensor (through Identity chains), or None."""
        for _ in range(MAX_DEPTH):
            name = self.source(ref)
            if name in self.resources:
                return self.resources[name]
            node = self.node(name)
            if node is None or node.op != "Identity" or not node.input:
                return None
            ref = node.input[0]
        return None

    def read_key(self, node) -> str | None:
        """The variable a ReadVariableOp reads, or None."""
        if node is None or node.op != "ReadVariableOp":
            return None
        return self.resource_key(node.input[0])

    def resource(self, key: str, hint: str) -> str:
        """A reference to variable ``key``'s resource in this body, added when missing: a
        placeholder named ``hint`` at the top (the entry binds it), else an argument threaded
        through every caller."""
        for name, bound in self.resources.items():
            if bound == key and (self.is_function or self.node(name) is not None):
                return name
        self._check_writable()
        if self.site is None:
            self.add(g.resource_placeholder(hint))
            self.resources[hint] = key
            return hint
        return self.site.add_resource(key, hint)

    # --- rewriting ------------------------------------------------------------------------------
    def _check_writable(self):
        if not self.writable:
            raise RuntimeError(f"body '{self.name or 'top'}' is read-only here: walk(..., writable=True)")

    def _touch(self, structure: bool = False):
        """Record a change. The consumer index is kept up to date by the edits below; only
        structural edits (nodes added in bulk, deleted, copied over) drop the name index."""
        self._check_writable()
        self.changed = True
        if structure:
            self._nodes = None
            self._consumers = None

    def _index_inputs(self, node, sign: int) -> None:
        """Add (sign=1) or remove (sign=-1) ``node``'s inputs in the consumer index, if built."""
        if self._consumers is None:
            return
        for position, raw in enumerate(node.input):
            readers = self._consumers.setdefault(self.source(raw), [])
            if sign > 0:
                readers.append((node, position))
            else:
                readers[:] = [(n, p) for n, p in readers if not (n is node and p == position)]

    def add(self, node):
        """Append a node (a copy of ``node``); returns the stored node."""
        self._touch()
        self.nodes.append(node)
        stored = self.nodes[len(self.nodes) - 1]
        if self._nodes is not None:
            self._nodes[stored.name] = stored
        self._index_inputs(stored, 1)
        return stored

    def mark_changed(self) -> None:
        """Record an edit made in place on a node's attributes."""
        self._touch()

    def set_input(self, node, position: int, ref: str) -> None:
        self._touch()
        self._index_inputs(node, -1)
        node.input[position] = ref
        self._index_inputs(node, 1)

    def set_inputs(self, node, refs: Iterable[str]) -> None:
        self._touch()
        refs = list(refs)
        self._index_inputs(node, -1)
        del node.input[:]
        node.input.extend(refs)
        self._index_inputs(node, 1)

    def repoint(self, old: str, new: str, exclude: Iterable[str] = ()) -> None:
        """Make every input (and function output) that reads tensor ``old`` read ``new``, except
        the inputs of the nodes named in ``exclude``."""
        exclude = set(exclude)
        self._touch()
        aliases = {old}
        if not self.is_function:
            name, index, _ = g.parse_input(old)
            aliases = {g.tensor_name(name, index), f"{name}:{index}"}
        readers = {id(node): node for node, _ in self.consumers(self.source(old))}
        for node in readers.values():
            if node.name in exclude or not any(raw in aliases for raw in node.input):
                continue
            self.set_inputs(node, [new if raw in aliases else raw for raw in node.input])
        if self.is_function:
            for output, value in list(self.proto.ret.items()):
                if value in aliases:
                    self.proto.ret[output] = new

    def replace(self, node, replacement) -> None:
        """Swap ``node`` for ``replacement`` under the same name; readers of its outputs read the
        replacement's (in a function body, 'n:z:0' becomes 'n:output:0' where the op changes)."""
        count = min(_output_count(node, self.library), _output_count(replacement, self.library))
        old_refs = [self.ref(node.name, i) for i in range(count)]
        self._touch()
        self._index_inputs(node, -1)
        name = node.name
        node.CopyFrom(replacement)
        node.name = name
        self._index_inputs(node, 1)
        for i, old in enumerate(old_refs):
            new = self.ref(node.name, i)
            if new != old:
                self.repoint(old, new)

    def delete(self, live: set) -> int:
        """Delete every node not in ``live``, in place, a run of neighbours at a time from the end
        (rebuilding the list would copy every kept node, frozen weights included, once more)."""
        nodes = self.nodes
        before = len(nodes)
        end = len(nodes)
        while end > 0:
            if nodes[end - 1].name in live:
                end -= 1
                continue
            start = end - 1
            while start > 0 and nodes[start - 1].name not in live:
                start -= 1
            del nodes[start:end]
            end = start
        if len(nodes) != before:
            self._touch(structure=True)
        return before - len(nodes)

    # --- calls ----------------------------------------------------------------------------------
    def call_sites(self) -> list["CallSite"]:
        """The nodes of this body that call library functions, each with the functions it calls."""
        sites = []
        for node in list(self.nodes):
            attrs = called_functions(node, self.library)
            if attrs:
                sites.append(CallSite(self, node, attrs))
        return sites


def const_once(body: Body, seen: dict, name: str, key: str, value, dtype: str):
    """The replacement of a read of weight ``key`` named ``name``: a Const holding ``value`` for
    the first read in ``body``, an Identity of that Const for every later one (``seen``: key ->
    the Const's name, one dict per body). A weight read twice (a tied embedding's lookup and its
    output projection) is then stored once, not once per read."""
    if key in seen:
        return g.make_node(name, "Identity", [body.ref(seen[key])], T=tf.dtypes.as_dtype(dtype))
    seen[key] = name
    return g.const_node(name, value, dtype)


def builders(body: Body, base: str):
    """(const, op): functions that add a node named ``base/<name>`` (made unique) to ``body`` and
    return the ref of its output 0: ``const(name, value, dtype)`` a Const of ``value`` (dtype: a
    name, "int32"), ``op(name, op_type, inputs, **attrs)`` any op (attrs as graph.make_node takes)."""
    def const(name: str, value, dtype: str) -> str:
        return body.ref(body.add(g.const_node(body.fresh(f"{base}/{name}"), value, dtype)).name)

    def op(name: str, op_type: str, inputs, **attrs) -> str:
        return body.ref(body.add(g.make_node(body.fresh(f"{base}/{name}"), op_type, inputs, **attrs)).name)

    return const, op


def called_functions(node, library: dict) -> list[tuple[str, int | None, str]]:
    """(attr, list index or None, function name) of every library function ``node`` calls; the
    attr is '' for a function called as an op."""
    found = []
    if node.op in CALL_OPS:
        for attr in CALL_OPS[node.op][0]:
            value = node.attr[attr]
            if value.HasField("func"):
                found.append((attr, None, value.func.name))
            for position, func in enumerate(value.list.func):
                found.append((attr, position, func.name))
    elif node.op in library:
        found.append(("", None, node.op))
    return [(attr, position, name) for attr, position, name in found if name in library]


def _offset(node) -> int:
    return CALL_OPS[node.op][1] if node.op in CALL_OPS else 0


class CallSite:
    """A node that calls library functions, and Body views over (copies of) those functions."""

    def __init__(self, parent: Body, node, attrs):
        self.parent = parent
        self.node = node
        self.attrs = attrs
        self.offset = _offset(node)
        self.bodies: list[Body] = []

    @property
    def is_loop(self) -> bool:
        return _is_loop(self.node.op)

    def open(self) -> list[Body]:
        """Body views of the called functions (copies if the parent is writable), with each
        resource argument mapped to the variable the node passes in."""
        library = self.parent.library
        data_inputs = self.parent.data_inputs(self.node)
        for attr, position, name in self.attrs:
            original = library[name]
            function = copy_function(original) if self.parent.writable else original
            resources = {}
            for index, arg in enumerate(function.signature.input_arg):
                outer = index + self.offset
                if arg.type == types_pb2.DT_RESOURCE and outer < len(data_inputs):
                    key = self.parent.resource_key(data_inputs[outer])
                    if key is not None:
                        resources[arg.name] = key
            self.bodies.append(Body(function, function=True, resources=resources, library=library, site=self,
                                    path=f"{self.parent.path}{self.node.name}/{name}/", writable=self.parent.writable,
                                    variables=self.parent.variables))
            self.bodies[-1].attr = (attr, position)
        return self.bodies

    def close(self) -> bool:
        """Name every changed body by its content, add it to the library and point the node at
        it; True if the node changed."""
        if not any(body.changed for body in self.bodies):
            return False
        library = self.parent.library
        graph_library = self.parent.root().proto.library
        for body in self.bodies:
            attr, position = body.attr
            name = rename_with_content_hash(body.proto) if body.changed else body.proto.signature.name
            if body.changed and name not in library:
                graph_library.function.append(body.proto)
                library[name] = graph_library.function[len(graph_library.function) - 1]
            if attr == "":
                self.node.op = name
            elif position is None:
                self.node.attr[attr].func.name = name
            else:
                self.node.attr[attr].list.func[position].name = name
        self.parent._touch()
        return True

    def add_resource(self, key: str, hint: str) -> str:
        """Thread variable ``key`` into every function of this call (one more argument; a loop
        body also returns it unchanged) and make the node pass the caller's resource for it."""
        outer = self.parent.resource(key, hint)
        node = self.node
        data_inputs = self.parent.data_inputs(node)
        controls = [raw for raw in node.input if raw.startswith("^")]
        position = len(data_inputs)
        taken = {arg.name for b in self.bodies for arg in b.proto.signature.input_arg}
        number = position - self.offset
        name = names.resource_argument(number)
        while name in taken:
            number += 1
            name = names.resource_argument(number)
        self.parent.set_inputs(node, data_inputs + [outer] + controls)
        if self.is_loop:
            node.attr["T"].list.type.append(types_pb2.DT_RESOURCE)
            for attr in ("output_shapes", "_output_shapes"):
                if attr in node.attr:
                    node.attr[attr].list.shape.add()
            if "_num_original_outputs" in node.attr:
                node.attr["_num_original_outputs"].i += 1
        elif "Tin" in node.attr:
            node.attr["Tin"].list.type.append(types_pb2.DT_RESOURCE)
        if "_read_only_resource_inputs" in node.attr:
            node.attr["_read_only_resource_inputs"].list.i.append(position)
        for callee in self.bodies:
            callee._touch()
            arg = callee.proto.signature.input_arg.add()
            arg.name, arg.type = name, types_pb2.DT_RESOURCE
            set_handle_data(arg, self.parent.variables.get(key))
            if self.is_loop and callee.attr[0] == "body":
                out = callee.proto.signature.output_arg.add()
                out.name, out.type = f"{name}_out", types_pb2.DT_RESOURCE
                callee.proto.ret[out.name] = name
            callee.resources[name] = key
        return name

    def drop_unused_resources(self) -> bool:
        """Remove resource arguments no function of the call reads any more (what folding and
        freezing leave behind), with the node's inputs; for a loop, only where the body passes
        the resource through unchanged and nobody reads the loop's output for it."""
        node = self.node
        data_inputs = self.parent.data_inputs(node)
        used_outputs = set()
        if self.is_loop:
            for consumer, position in self.parent.consumers(node.name):
                name, index, control = self.parent.parse(consumer.input[position])
                if not control:
                    used_outputs.add(index)
            for ref in self.parent.outputs():
                name, index, control = self.parent.parse(ref)
                if name == node.name and not control:
                    used_outputs.add(index)
        first = self.bodies[0].proto.signature
        drop = []
        for index, arg in enumerate(first.input_arg):
            outer = index + self.offset
            if arg.type != types_pb2.DT_RESOURCE or outer >= len(data_inputs):
                continue
            if any(_reads_argument(b, b.proto.signature.input_arg[index].name) for b in self.bodies):
                continue
            if self.is_loop:
                body = next(b for b in self.bodies if b.attr[0] == "body")
                output = body.proto.signature.output_arg[index].name
                if index in used_outputs or body.proto.ret.get(output) != body.proto.signature.input_arg[index].name:
                    continue
            drop.append(index)
        if not drop:
            return False
        arg_count = len(first.input_arg)
        keep = [i for i in range(arg_count) if i not in drop]
        for body in self.bodies:
            body._touch()
            signature = body.proto.signature
            for name in (signature.input_arg[i].name for i in drop):
                body.resources.pop(name, None)
            arguments = [signature.input_arg[i] for i in keep]
            del signature.input_arg[:]
            signature.input_arg.extend(arguments)
            if self.is_loop and body.attr[0] == "body":
                removed = {signature.output_arg[i].name for i in drop}
                outputs = [signature.output_arg[i] for i in keep]
                del signature.output_arg[:]
                signature.output_arg.extend(outputs)
                for name in removed:
                    del body.proto.ret[name]
            _renumber(body.proto.arg_attr, keep)  # the kept arguments keep their recorded shapes
            _renumber(body.proto.resource_arg_unique_id, keep)
        controls = [raw for raw in node.input if raw.startswith("^")]
        kept_inputs = data_inputs[:self.offset] + [data_inputs[i + self.offset] for i in keep]
        self.parent.set_inputs(node, kept_inputs + controls)
        type_attr = "T" if self.is_loop else "Tin"
        if type_attr in node.attr:
            types = [node.attr[type_attr].list.type[i] for i in keep]
            del node.attr[type_attr].list.type[:]
            node.attr[type_attr].list.type.extend(types)
        if self.is_loop:
            for attr in ("output_shapes", "_output_shapes"):
                if attr in node.attr and len(node.attr[attr].list.shape) == arg_count:
                    shapes = [node.attr[attr].list.shape[i] for i in keep]
                    del node.attr[attr].list.shape[:]
                    node.attr[attr].list.shape.extend(shapes)
            if "_num_original_outputs" in node.attr:
                node.attr["_num_original_outputs"].i -= len(drop)
            # the loop's outputs after a dropped one move down
            for consumer, position in list(self.parent.consumers(node.name)):
                name, index, control = self.parent.parse(consumer.input[position])
                if not control and index in keep and keep.index(index) != index:
                    self.parent.set_input(consumer, position, self.parent.ref(node.name, keep.index(index)))
            if self.parent.is_function:
                for output, value in list(self.parent.proto.ret.items()):
                    name, index, control = self.parent.parse(value)
                    if name == node.name and index in keep and keep.index(index) != index:
                        self.parent.proto.ret[output] = self.parent.ref(node.name, keep.index(index))
        if "_read_only_resource_inputs" in node.attr:
            renumbered = [keep.index(i - self.offset) + self.offset
                          for i in node.attr["_read_only_resource_inputs"].list.i
                          if i < self.offset or (i - self.offset) in keep]
            del node.attr["_read_only_resource_inputs"].list.i[:]
            node.attr["_read_only_resource_inputs"].list.i.extend(renumbered)
        return True


def set_handle_data(arg, spec) -> bool:
    """Give a resource argument the dtype and shape of the variable it carries (VariableSpec),
    unless it has them; True if it changed. Without handle data TensorFlow can take no gradient
    through an If or While that the argument feeds."""
    if spec is None or arg.handle_data:
        return False
    arg.handle_data.add(dtype=tf.dtypes.as_dtype(spec.dtype).as_datatype_enum, shape=tf.TensorShape(spec.shape).as_proto())
    return True


def _reads_argument(body: Body, argument: str) -> bool:
    """Whether a node of ``body`` reads ``argument`` (a loop body returning it does not count)."""
    return any(body.source(raw) == argument for node in body.nodes for raw in node.input)


def _output_args(node, library) -> list[tuple[str, int]]:
    """(output argument name, number of tensors) of a node's op, in order."""
    op_def = compat.op_def(node.op)
    if op_def is None:
        function = library.get(node.op)
        if function is None:
            return [("output", 1)]
        return [(arg.name, 1) for arg in function.signature.output_arg]
    args = []
    for arg in op_def.output_arg:
        if arg.number_attr:
            size = node.attr[arg.number_attr].i
        elif arg.type_list_attr:
            size = len(node.attr[arg.type_list_attr].list.type)
        else:
            size = 1
        args.append((arg.name, size))
    return args


def _output_count(node, library) -> int:
    return sum(size for _, size in _output_args(node, library))


def copy_function(function):
    """A copy of a FunctionDef, to rewrite without touching the original."""
    copy = type(function)()
    copy.CopyFrom(function)
    return copy


def rename_with_content_hash(function) -> str:
    """Give a rewritten function a name derived from its body; returns the new name. The hash is
    taken under a neutral name, so equal bodies get equal names whatever they were called."""
    base = g.strip_content_suffix(function.signature.name)
    function.signature.name = "graphprune_tmp"
    function.signature.name = base + g.content_suffix(function)
    return function.signature.name


def dependency_graph(body: Body, control: bool = True):
    """The body as a networkx DiGraph: producer -> consumer for every data input and (``control``)
    every control input. The back edge of a TF1 loop (NextIteration -> Merge) is left out: it is
    the loop, not a bug."""
    import networkx as nx

    graph = nx.DiGraph()
    for node in body.nodes:
        graph.add_node(node.name)
        for raw in (node.input if control else body.data_inputs(node)):
            source = body.source(raw)
            producer = body.node(source)
            if node.op in ("Merge", "RefMerge") and producer is not None and producer.op in (
                    "NextIteration", "RefNextIteration"):
                continue
            graph.add_edge(source, node.name)
    return graph


def live_nodes(body: Body, roots: Iterable[str], control: bool = True) -> set[str]:
    """The nodes the roots need (themselves included), through data and (``control``) control
    inputs."""
    import networkx as nx

    graph = dependency_graph(body, control)
    sink = object()  # one search from a node every root feeds, instead of one per root
    graph.add_edges_from((root, sink) for root in roots if root in graph)
    if sink not in graph:
        return set()
    return {name for name in nx.ancestors(graph, sink) if body.node(name) is not None}


# --- walking --------------------------------------------------------------------------------------

Visit = Callable[[Body], None]


def top_body(graph_def, resources, *, writable: bool = True, variables: Mapping | None = None) -> Body:
    library = {f.signature.name: f for f in graph_def.library.function}
    return Body(graph_def, function=False, resources=resources, library=library, writable=writable,
                variables=variables)


def walk(body: Body, visit: Visit, *, order: str = "pre") -> None:
    """Apply ``visit`` to ``body`` and to every body it reaches (callees before their caller
    with order='post'); changed callees are renamed and their callers updated."""
    _walk(body, visit, order, (), 0)


def _walk(body: Body, visit: Visit, order: str, active: tuple, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise RecursionError(f"function bodies nested deeper than {MAX_DEPTH} (a recursive function?)")
    if order == "pre":
        visit(body)
    for site in body.call_sites():
        for callee in site.open():
            if callee.proto.signature.name in active:  # a recursive call: visited further up
                continue
            _walk(callee, visit, order, active + (callee.proto.signature.name,), depth + 1)
        site.close()
    if order == "post":
        visit(body)


def rewrite_entry(entry: g.Entry, visit: Visit, *, order: str = "pre",
                  variables: Mapping | None = None) -> tuple[g.Entry, bool]:
    """``visit`` applied to a copy of the entry's graph and every body it reaches; returns the
    rewritten entry (resources the pass asked for bound) and whether anything changed.
    ``variables`` (key -> VariableSpec) gives threaded resource arguments their handle data."""
    graph_def = g.copy_graph(entry.graph_def)
    top = top_body(graph_def, dict(entry.resources), variables=variables)
    walk(top, visit, order=order)
    if not top.changed:
        return entry, False
    return dataclasses.replace(entry, graph_def=graph_def, resources=MappingProxyType(top.resources)), True


CALL_FUNCTION_OPS = ("PartitionedCall", "StatefulPartitionedCall")


def inline_call(body: Body, node) -> None:
    """Replace a function call by the function's nodes (named '<call>/<node>'), in any body.

    Readers of the call's outputs read what the function returns; the call's own name stays as a
    NoOp that waits for the function's side effects and returns, so control edges to the call
    (and an entry's control outputs) keep their meaning. Nested calls come along as calls."""
    name = node.op if node.op in body.library else node.attr["f"].func.name
    function = body.library[name]
    callee = Body(function, function=True, resources={}, library=body.library, writable=False)
    data_inputs = body.data_inputs(node)
    controls = [raw for raw in node.input if raw.startswith("^")]
    arguments = {arg.name: data_inputs[i] for i, arg in enumerate(function.signature.input_arg)}
    prefix = f"{node.name}/"
    while any(body.node(prefix + n.name) is not None for n in function.node_def):
        prefix = f"{prefix[:-1]}_/"
    added = []
    for original in function.node_def:
        copy = type(original)()
        copy.CopyFrom(original)
        copy.name = prefix + original.name
        del copy.input[:]
        added.append((body.add(copy), original))

    def translate(ref: str) -> str:
        source, index, control = callee.parse(ref)
        if source in arguments:
            outer = arguments[source]
            return "^" + body.source(outer) if control else outer
        return "^" + prefix + source if control else body.ref(prefix + source, index)

    for new, original in added:
        inputs = [translate(raw) for raw in original.input]
        body.set_inputs(new, inputs if inputs else controls)
    waits = ["^" + prefix + body_name.split(":")[0] for body_name in function.control_ret.values()]
    for index, output in enumerate(function.signature.output_arg):
        value = translate(function.ret[output.name])
        body.repoint(body.ref(node.name, index), value, exclude=(node.name,))
        if body.producer(value) is not None:
            waits.append("^" + body.source(value))
    body.replace(node, g.make_node(node.name, "NoOp", sorted(set(waits)) + controls))


def inline_calls(graph_def, resources: Mapping) -> bool:
    """Inline, in place, every function call left in the graph and in every body it reaches.

    Grappler's inliner keeps calls of functions compiled with ``jit_compile=True`` (Keras 3 runs
    grouped convolutions so on CPU); TensorFlow can take no gradient through such a call when
    it reads a variable (SymbolicGradient), and TensorFlow's own kernels run what XLA would.
    Library functions nothing calls any more are dropped."""

    def visit(body):
        while True:
            calls = [node for node in body.nodes if node.op in CALL_FUNCTION_OPS and node.attr["f"].func.name
                     in body.library]
            if not calls:
                return
            for node in calls:
                inline_call(body, node)

    return _rewrite_in_place(graph_def, resources, visit)


def _rewrite_in_place(graph_def, resources: Mapping, visit: Visit, variables: Mapping | None = None) -> bool:
    top = top_body(graph_def, dict(resources), variables=variables)
    walk(top, visit)
    if top.changed:
        drop_uncalled_functions(graph_def)
    return top.changed


def referenced_functions(nodes, library: dict) -> set[str]:
    """Names of the library functions ``nodes`` reference, transitively: called as an op or named
    by any function attr (bodies, branches, a dataset's map function, ...)."""
    called: set[str] = set()
    pending = list(nodes)
    while pending:
        node = pending.pop()
        names = [node.op] if node.op in library else []
        for attr in node.attr.values():
            names += [attr.func.name] if attr.HasField("func") else []
            names += [f.name for f in attr.list.func]
        for name in names:
            if name in library and name not in called:
                called.add(name)
                pending.extend(library[name].node_def)
    return called


def drop_uncalled_functions(graph_def) -> int:
    """Remove, in place, the library functions (and their gradients) nothing in the graph
    references; returns how many went."""
    library = {f.signature.name: f for f in graph_def.library.function}
    called = referenced_functions(graph_def.node, library)
    if len(called) == len(library):
        return 0
    kept = [f for f in graph_def.library.function if f.signature.name in called]
    del graph_def.library.function[:]
    graph_def.library.function.extend(kept)
    gradients = [gr for gr in graph_def.library.gradient if gr.function_name in called]
    del graph_def.library.gradient[:]
    graph_def.library.gradient.extend(gradients)
    return len(library) - len(kept)


def annotate_resource_arguments(graph_def, resources: Mapping, variables: Mapping) -> bool:
    """Give every resource argument of every body the graph reaches the handle data (dtype,
    shape) of the variable it carries, in place; bodies that needed it are renamed by content
    and the originals dropped when nothing calls them any more. A serialized FunctionDef keeps
    no handle data of its own, and without it TensorFlow cannot take the gradient of an If or
    While inside another body ('a variable without handle data')."""

    def visit(body):
        if not body.is_function:
            return
        for arg in body.proto.signature.input_arg:
            if arg.type == types_pb2.DT_RESOURCE and set_handle_data(arg, variables.get(body.resources.get(arg.name))):
                body.mark_changed()

    return _rewrite_in_place(graph_def, resources, visit, variables)


def visit_entry(entry: g.Entry, visit: Visit) -> None:
    """``visit`` applied, read-only, to the entry's graph and every body it reaches."""
    walk(top_body(entry.graph_def, dict(entry.resources), writable=False), visit)


def _renumber(by_position, keep: list) -> None:
    """A FunctionDef map keyed by argument position (arg_attr, resource_arg_unique_id), after
    the arguments at ``keep`` (old positions, in order) became 0, 1, ...: the dropped ones' entries go."""
    kept = {}
    for new, old in enumerate(keep):
        if old in by_position:
            value = by_position[old]
            kept[new] = value if isinstance(value, int) else type(value).FromString(value.SerializeToString())
    by_position.clear()
    for position, value in kept.items():
        if isinstance(value, int):
            by_position[position] = value
        else:
            by_position[position].CopyFrom(value)
