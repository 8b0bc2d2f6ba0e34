"""Function bodies as first-class citizens: While loops (RNN recurrent kernels) and If branches.

Grappler inlines plain calls, so what stays functional are While/If nodes of an entry's top-level
graph. Their bodies read weights through function arguments:

    entry:  Placeholder(w) ------------------------> While(..., w) --body--> while_body
    body:   arg 'w_0' -> ReadVariableOp -> MatMul

These helpers map body arguments to the variables they carry, and give masks a way into a body:
the mask's resource becomes one more loop variable (body passes it through, cond ignores it).
A body that was rewritten gets a new, content-hashed name, so rebuilt functions never collide.
"""

from __future__ import annotations

import re

from graphprune import graph as g
from tensorflow.core.framework import types_pb2

LOOP_OPS = ("While", "StatelessWhile")
BRANCH_OPS = ("If", "StatelessIf")


CALL_OPS = ("PartitionedCall", "StatefulPartitionedCall")
# Ops that change a variable's value (or destroy it); a variable any of them touches is state,
# not a weight to freeze.
WRITE_OP_PREFIXES = ("Assign", "ResourceScatter", "ResourceApply", "ResourceSparseApply",
                     "ResourceStridedSliceAssign", "DestroyResourceOp")


def body_attrs(node) -> list[tuple[str, int]]:
    """(attr naming a body function, offset from node input index to function arg index)."""
    if node.op in LOOP_OPS:
        return [("body", 0), ("cond", 0)]
    if node.op in BRANCH_OPS:
        return [("then_branch", 1), ("else_branch", 1)]
    return []


def _called_functions(node) -> list[tuple[str, int]]:
    """body_attrs plus the function of a (Stateful)PartitionedCall and Case's branches."""
    if node.op in CALL_OPS:
        return [("f", 0)]
    if node.op == "Case":
        return [("branches", 1)]
    return body_attrs(node)


def written_variables(model: g.TracedModel) -> set[str]:
    """Keys of the variables some op assigns to (a counter, a running statistic), in the top graph
    or in any body it calls, at any depth."""
    written = set()
    for entry in model.entries:
        index = g.NodeIndex(entry.graph_def)
        library = library_of(entry.graph_def)

        def key_of(raw, index=index, entry=entry):
            producer = index.producer(raw)
            while producer is not None and producer.op == "Identity":
                producer = index.producer(producer.input[0])
            return entry.resources.get(producer.name) if producer is not None else None

        written |= _written(entry.graph_def.node, key_of, library, set())
    return written


def _written(nodes, key_of, library, active) -> set[str]:
    found = set()
    for node in nodes:
        if node.op.startswith(WRITE_OP_PREFIXES) and node.input:
            key = key_of(node.input[0])
            if key is not None:
                found.add(key)
        for attr, offset in _called_functions(node):
            names = ([f.name for f in node.attr[attr].list.func] if attr == "branches"
                     else [node.attr[attr].func.name])
            for name in names:
                function = library.get(name)
                if function is None or name in active:
                    continue
                arguments = resource_arguments(node, function, offset, key_of)
                if not arguments:
                    continue
                found |= _written(function.node_def, lambda raw, a=arguments: a.get(producer_name(raw)), library,
                                  active | {name})
    return found


def library_of(graph_def) -> dict:
    return {f.signature.name: f for f in graph_def.library.function}


def producer_name(raw: str) -> str:
    """Node name in a function body reference ('n:out:0' -> 'n', '^n' -> 'n', 'arg' -> 'arg')."""
    return raw.lstrip("^").split(":")[0]


def argument_resources(index: g.NodeIndex, entry: g.Entry, node, function, offset: int) -> dict[str, str]:
    """Body arg name -> variable key, for args fed by one of the entry's variable placeholders."""

    def key_of(raw):
        producer = index.producer(raw)
        while producer is not None and producer.op == "Identity":
            producer = index.producer(producer.input[0])
        return entry.resources.get(producer.name) if producer is not None else None

    return resource_arguments(node, function, offset, key_of)


def resource_arguments(node, function, offset: int, key_of) -> dict[str, str]:
    """Body arg name -> variable key for the resource args of ``function`` called by ``node``;
    ``key_of(input)`` names the variable behind one of the node's inputs (or None)."""
    data_inputs = [i for i in node.input if not i.startswith("^")]
    found = {}
    for position, arg in enumerate(function.signature.input_arg):
        outer = position + offset
        if arg.type != types_pb2.DT_RESOURCE or outer >= len(data_inputs):
            continue
        key = key_of(data_inputs[outer])
        if key is not None:
            found[arg.name] = key
    return found


def functional_nodes(entry: g.Entry):
    """(node, attr, function, offset) for every While/If body of the entry's top-level graph."""
    library = library_of(entry.graph_def)
    for node in entry.graph_def.node:
        for attr, offset in body_attrs(node):
            function = library.get(node.attr[attr].func.name)
            if function is not None:
                yield node, attr, function, offset


def body_index(function) -> dict:
    return {n.name: n for n in function.node_def}


_CONTENT_SUFFIX = re.compile(r"_gp[0-9a-f]{12}$")


def copy_function(function):
    """A copy of a FunctionDef, to rewrite without touching the original."""
    copy = type(function)()
    copy.CopyFrom(function)
    return copy


def rename_with_content_hash(function) -> str:
    """Give a rewritten function a name derived from its body; returns the new name. The hash is
    taken under a neutral name, so equal bodies get equal names whatever they were called."""
    base = _CONTENT_SUFFIX.sub("", function.signature.name)
    function.signature.name = "graphprune_tmp"
    function.signature.name = base + g.content_suffix(function)
    return function.signature.name


def add_resource_loop_variable(node, placeholder: str) -> int:
    """Append a read-only resource input to a While node; returns its input index."""
    data_inputs = [i for i in node.input if not i.startswith("^")]
    controls = [i for i in node.input if i.startswith("^")]
    position = len(data_inputs)
    del node.input[:]
    node.input.extend(data_inputs + [placeholder] + controls)
    node.attr["T"].list.type.append(types_pb2.DT_RESOURCE)
    if "output_shapes" in node.attr:
        node.attr["output_shapes"].list.shape.add()
    if "_output_shapes" in node.attr:
        node.attr["_output_shapes"].list.shape.add()
    if "_num_original_outputs" in node.attr:
        node.attr["_num_original_outputs"].i += 1
    if "_read_only_resource_inputs" in node.attr:
        node.attr["_read_only_resource_inputs"].list.i.append(position)
    return position


def add_branch_input(node, placeholder: str) -> int:
    """Append a resource input to an If node (after its existing inputs)."""
    data_inputs = [i for i in node.input if not i.startswith("^")]
    controls = [i for i in node.input if i.startswith("^")]
    del node.input[:]
    node.input.extend(data_inputs + [placeholder] + controls)
    node.attr["Tin"].list.type.append(types_pb2.DT_RESOURCE)
    if "_read_only_resource_inputs" in node.attr:
        node.attr["_read_only_resource_inputs"].list.i.append(len(data_inputs))
    return len(data_inputs)


def add_argument(function, name: str, passthrough: bool) -> str:
    """Add a resource argument (and, for loop bodies, an output returning it unchanged)."""
    arg = function.signature.input_arg.add()
    arg.name, arg.type = name, types_pb2.DT_RESOURCE
    if passthrough:
        out = function.signature.output_arg.add()
        out.name, out.type = f"{name}_out", types_pb2.DT_RESOURCE
        function.ret[out.name] = name
    return name


def replace_body_node(function, position: int, replacement, old_output: str) -> None:
    """Swap a body node for ``replacement`` (same name), repointing references to its output
    ('name:<old_output>:0') at the replacement's ('name:output:0', as Const and Identity name it)."""
    name = function.node_def[position].name
    function.node_def[position].CopyFrom(replacement)
    repoint(function, f"{name}:{old_output}:0", f"{name}:output:0")


def repoint(function, old: str, new: str) -> None:
    """Make every body input and output that reads tensor ``old`` read ``new`` instead."""
    for node in function.node_def:
        for index, raw in enumerate(node.input):
            if raw == old:
                node.input[index] = new
    for output, value in list(function.ret.items()):
        if value == old:
            function.ret[output] = new


def rewrite_bodies(graph_def, entry: g.Entry, rewrite) -> list:
    """Apply ``rewrite(function, arguments) -> list of touched node names`` to a copy of every
    While/If body of the entry's graph (``arguments``: body arg -> variable key); rewritten bodies
    get content-hashed names. Returns what was touched."""
    index = g.NodeIndex(graph_def)
    library = library_of(graph_def)
    touched = []
    for outer in list(graph_def.node):
        for attr, offset in body_attrs(outer):
            original = library.get(outer.attr[attr].func.name)
            if original is None:
                continue
            arguments = argument_resources(index, entry, outer, original, offset)
            if not arguments:
                continue
            function = copy_function(original)
            changes = rewrite(function, arguments)
            if changes:
                outer.attr[attr].func.name = rename_with_content_hash(function)
                graph_def.library.function.append(function)
                touched += [f"{outer.name}/{attr}:{c}" for c in changes]
    return touched


def _uses(function, argument: str) -> bool:
    """Whether a body node or a non-passthrough output reads ``argument``."""
    for node in function.node_def:
        if any(producer_name(raw) == argument for raw in node.input):
            return True
    return False


def drop_unused_resource_loop_variables(graph_def, node, index: g.NodeIndex) -> bool:
    """Remove resource loop variables of a While whose body and cond no longer read them and
    whose outputs nobody consumes (what folding and freezing leave behind)."""
    library = library_of(graph_def)
    body, cond = library.get(node.attr["body"].func.name), library.get(node.attr["cond"].func.name)
    if body is None or cond is None:
        return False
    data_inputs = [i for i in node.input if not i.startswith("^")]
    consumers = index.consumers.get(node.name, [])
    used_outputs = {g.parse_input(c.input[p])[1] for c, p in consumers if not c.input[p].startswith("^")}
    drop = []
    for position, arg in enumerate(body.signature.input_arg):
        if (arg.type == types_pb2.DT_RESOURCE and position < len(data_inputs) and position not in used_outputs
                and not _uses(body, arg.name) and not _uses(cond, cond.signature.input_arg[position].name)):
            output = body.signature.output_arg[position].name
            if body.ret.get(output) == arg.name:
                drop.append(position)
    if not drop:
        return False
    keep = [i for i in range(len(data_inputs)) if i not in drop]
    new_body, new_cond = copy_function(body), copy_function(cond)
    for function, has_outputs in ((new_body, True), (new_cond, False)):
        arguments = [function.signature.input_arg[i] for i in keep]
        del function.signature.input_arg[:]
        function.signature.input_arg.extend(arguments)
        if has_outputs:
            removed = {function.signature.output_arg[i].name for i in drop}
            outputs = [function.signature.output_arg[i] for i in keep]
            del function.signature.output_arg[:]
            function.signature.output_arg.extend(outputs)
            for name in removed:
                del function.ret[name]
        function.arg_attr.clear()
    controls = [i for i in node.input if i.startswith("^")]
    del node.input[:]
    node.input.extend([data_inputs[i] for i in keep] + controls)
    types = [node.attr["T"].list.type[i] for i in keep]
    del node.attr["T"].list.type[:]
    node.attr["T"].list.type.extend(types)
    for attr in ("output_shapes", "_output_shapes"):
        if attr in node.attr and len(node.attr[attr].list.shape) == len(data_inputs):
            shapes = [node.attr[attr].list.shape[i] for i in keep]
            del node.attr[attr].list.shape[:]
            node.attr[attr].list.shape.extend(shapes)
    if "_num_original_outputs" in node.attr:
        node.attr["_num_original_outputs"].i -= len(drop)
    if "_read_only_resource_inputs" in node.attr:
        renumbered = [keep.index(i) for i in node.attr["_read_only_resource_inputs"].list.i if i in keep]
        del node.attr["_read_only_resource_inputs"].list.i[:]
        node.attr["_read_only_resource_inputs"].list.i.extend(renumbered)
    # outputs after a dropped one move down
    for consumer, position in consumers:
        source, output, control = g.parse_input(consumer.input[position])
        if not control and output in keep:
            consumer.input[position] = g.tensor_name(source, keep.index(output))
    node.attr["body"].func.name = rename_with_content_hash(new_body)
    node.attr["cond"].func.name = rename_with_content_hash(new_cond)
    graph_def.library.function.extend([new_body, new_cond])
    return True
