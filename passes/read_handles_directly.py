"""read_handles_directly: readers of Identity(resource handle) read the handle itself.

TensorFlow's inliner leaves ``Placeholder(resource) -> Identity -> ReadVariableOp`` in the graphs
graphprune loads, and a SavedModel saved from them keeps the Identity. TFLite's converter then
treats every variable read through such an Identity as one that may change: it keeps it as a
resource variable (VAR_HANDLE / READ_VARIABLE ops, a transposed kernel and BATCH_MATMUL instead
of FULLY_CONNECTED at run time) and never quantizes it (quantize='dynamic' wrote the float
model, byte for byte). Read directly, the converter freezes and quantizes those weights as it
does for any model.

Matches Identity nodes of dtype resource whose control inputs order nothing with a side effect
(an assign, a call, a loop: then the Identity stays), in every body at any depth; every reader
(and function output) is repointed to the Identity's input, and control edges to it are
dropped. The Identities are left dead (strip_unused removes them). Postcondition: outputs are
unchanged; no node reads such an Identity.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from graphprune import body as b
from graphprune import graph as g
from graphprune.analysis import has_side_effect
from graphprune.passbase import PassContext, PassResult, register_pass

_RESOURCE = tf.resource.as_datatype_enum


def read_handles_directly(model: g.TracedModel, context: PassContext) -> PassResult:
    """Bypass every Identity of a resource handle that orders nothing with a side effect."""
    bypassed = []

    def visit(body: b.Body) -> None:
        memo: dict = {}
        for node in list(body.nodes):
            if node.op != "Identity" or node.attr["T"].type != _RESOURCE:
                continue
            # TensorFlow's inliner makes each input of an inlined call wait for all the call's
            # inputs (a NoOp); for a handle that is only read, that orders pure work.
            waits = [body.producer(raw) for raw in node.input[1:]]
            if any(producer is not None and has_side_effect(body, producer, memo) for producer in waits):
                continue
            readers = body.consumers(node.name)
            if not readers:
                continue
            body.repoint(body.ref(node.name), node.input[0], exclude=(node.name,))
            for reader in {id(reader): reader for reader, _ in body.consumers(node.name)}.values():
                if reader.name != node.name:  # control edges to a pure Identity order nothing
                    body.set_inputs(reader, [raw for raw in reader.input if raw != f"^{node.name}"])
            bypassed.append(f"{body.name or 'top'}:{node.name}")

    entries = tuple(b.rewrite_entry(entry, visit)[0] for entry in model.entries)
    if not bypassed:
        return PassResult(model, changed=False, report={"bypassed": []})
    return PassResult(dataclasses.replace(model, entries=entries), changed=True, report={"bypassed": bypassed})


register_pass("read_handles_directly", read_handles_directly)
