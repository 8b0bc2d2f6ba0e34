"""The one place that builds and parses the names graphprune gives what it adds.

Everything graphprune inserts lives under a deterministic scope, so a re-run is a no-op and
finalization (or a reloaded model) finds what was inserted:

    variables   <weight>/graphprune/mask        mask_key(weight)
                <weight>/graphprune/threshold   threshold_key(weight)
                graphprune/step                 STEP_KEY
    nodes       <scope>/masked[_N]              the Mul(read(w), read(mask)) in front of a use
                <scope>/mask/read               the mask's ReadVariableOp
                <scope>/mask/resource           the mask's resource placeholder (top-level graph)
                (<scope> = node_scope(weight): the key made node-name safe, + '/graphprune')
    entries     update_masks                    the step + conditional mask update
    rebuilt     graphprune/...                  the scope an entry is imported under (IMPORT_SCOPE)
                graphprune_weight_<hex name>    a large frozen weight captured by a function
                graphprune_resource_<N>         a resource argument threaded into a body
"""

from __future__ import annotations

import re

SCOPE = "graphprune"
STEP_KEY = f"{SCOPE}/step"
UPDATE_ENTRY = "update_masks"

ROLE_WEIGHT = "weight"
ROLE_MASK = "mask"
ROLE_THRESHOLD = "threshold"
ROLE_STEP = "step"
ROLE_OTHER = "variable"

IMPORT_SCOPE = SCOPE
_CAPTURE_PREFIX = "graphprune_weight_"
_IMPORT_PREFIX = re.compile(rf"^(?:(?:Stateful)?PartitionedCall(?:_\d+)?/|{IMPORT_SCOPE}/)+")

_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.\-/]")
_MASKED_SUFFIX = re.compile(rf"/{SCOPE}/masked(?:_\d+)?$")
# what finalize appends to a frozen kernel's name: its mask folded in, then its batch norm
_FROZEN_SUFFIXES = re.compile(rf"(?:/{SCOPE}/(?:masked|folded)(?:_\d+)?)+$")


def mask_key(weight_key: str) -> str:
    return f"{weight_key}/{SCOPE}/{ROLE_MASK}"


def threshold_key(weight_key: str) -> str:
    return f"{weight_key}/{SCOPE}/{ROLE_THRESHOLD}"


def role_of(key: str) -> tuple[str, str | None]:
    """(role, weight key) of a variable key, from the names above; ROLE_OTHER for the user's own."""
    if key == STEP_KEY:
        return ROLE_STEP, None
    for role in (ROLE_MASK, ROLE_THRESHOLD):
        suffix = f"/{SCOPE}/{role}"
        if key.endswith(suffix):
            return role, key[: -len(suffix)]
    return ROLE_OTHER, None


def node_scope(key: str) -> str:
    """A node-name-safe scope for a variable key: '<key>/graphprune'."""
    safe = _SAFE_NAME.sub("_", key).strip("/") or "weight"
    if not re.match(r"[A-Za-z0-9.]", safe[0]):
        safe = "w" + safe
    return f"{safe}/{SCOPE}"


def masked_node(key: str, number: int = 0) -> str:
    """The name of the number-th masked read of weight ``key`` in one body."""
    return f"{node_scope(key)}/masked" + (f"_{number}" if number else "")


def mask_read_node(key: str) -> str:
    return f"{node_scope(key)}/mask/read"


def mask_cast_node(key: str) -> str:
    return f"{node_scope(key)}/mask/cast"


def mask_placeholder(key: str) -> str:
    return f"{node_scope(key)}/mask/resource"


def resource_placeholder_node(key: str) -> str:
    """A resource placeholder for variable ``key`` in a graph graphprune builds (the update entry)."""
    return f"{node_scope(key)}/resource"


def is_masked_node(name: str) -> bool:
    """Whether a node is a Mul(read(w), read(mask)) that insert_masks added."""
    return f"/{SCOPE}/masked" in name


def kept_mean(node_name: str, part: str) -> str:
    """A node of the mean over kept channels that replaces Mean ``node_name`` (insert_masks with
    residual_stream): 'keep_max' (the channels' 0/1 vector, from a kernel's mask), 'kept' (x * keep),
    'sum', 'count' (of kept channels); the mean itself keeps the Mean's name. (Not under
    '/graphprune/masked': that names a weight's mask multiply.)"""
    return f"{node_name}/{SCOPE}/kept_mean/{part}"


def kept_mean_part(name: str) -> str | None:
    """'keep_max', 'kept', 'sum', ... for a node kept_mean named, else None."""
    match = re.search(rf"/{SCOPE}/kept_mean/([a-z_]+)$", name)
    return match.group(1) if match else None


def kept_product(node_name: str, operand: int, part: str) -> str:
    """A node that zeroes the removed channels of operand ``operand`` of a product of two
    activations (insert_masks: attention's query/key head dims where the product is read by more
    than a softmax): 'view' (the kernel's mask reshaped so its channels are one axis), 'cut' (the
    part of that axis the operand holds), 'keep_max' (the channels' 0/1 vector), 'keep_cast',
    'apply' (the operand times it)."""
    return f"{node_name}/{SCOPE}/kept_product_{operand}/{part}"


def kept_product_part(name: str) -> str | None:
    """'view', 'cut', 'keep_max', 'keep_cast', 'apply' ... for a node kept_product named, else None."""
    match = re.search(rf"/{SCOPE}/kept_product_[0-9]+/([a-z_]+)$", name)
    return match.group(1) if match else None


def strip_masked_suffix(name: str) -> str:
    """'dense/kernel/graphprune/masked_1' -> 'dense/kernel'."""
    return _MASKED_SUFFIX.sub("", name)


def update_import_scope(replica: int) -> str:
    """The scope replica ``replica``'s mask update is imported under."""
    return f"{IMPORT_SCOPE}_update_{replica}"


def resource_argument(number: int) -> str:
    """The name of a resource argument graphprune threads into a body."""
    return f"{SCOPE}_resource_{number}"


def capture_name(node_name: str) -> str:
    """A name for a captured frozen weight that survives SavedModel, which lower-cases a function
    argument's name and turns everything not alphanumeric into '_': the name in hex."""
    return _CAPTURE_PREFIX + node_name.encode().hex()


def name_from_capture(name: str) -> str | None:
    """The node name capture_name encoded (anywhere in ``name``), or None."""
    match = re.search(_CAPTURE_PREFIX + r"((?:[0-9a-f]{2})+)", name)
    if match is None:
        return None
    try:
        return bytes.fromhex(match.group(1)).decode()
    except ValueError:
        return None


def folded_kernel(node_name: str) -> str:
    """The constant fold_batch_norms writes for kernel ``node_name`` scaled by its normalization."""
    return f"{node_name}/{SCOPE}/folded"


def display_name(node_name: str) -> str:
    """'StatefulPartitionedCall/graphprune/dense/kernel/graphprune/masked' -> 'dense/kernel', and
    so does '.../dense/kernel/graphprune/masked/graphprune/folded' (a batch norm folded into it);
    a frozen weight captured under capture_name gets its name back."""
    node_name = name_from_capture(node_name) or node_name
    return _FROZEN_SUFFIXES.sub("", _IMPORT_PREFIX.sub("", node_name))
