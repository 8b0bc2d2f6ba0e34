"""graphprune's graph passes, one per module; each registers itself under its module name.

The import order below is the order a full pipeline runs them in:
analysis first (find_weights), then the rewrites that build on its facts, then finalization.
"""

from graphprune.passes import unfuse_layer_norms  # noqa: F401  residual_stream: fused layer norms as plain ops
from graphprune.passes import find_weights  # noqa: F401  analysis: what is prunable
from graphprune.passes import insert_masks  # noqa: F401  mask variables + Mul in front of every use
from graphprune.passes import insert_mask_updates  # noqa: F401  step, schedule, conditional mask update
from graphprune.passes import fold_masks  # noqa: F401  w * mask -> Const (or the variable's value)
from graphprune.passes import freeze_variables  # noqa: F401  remaining variable reads -> Const
from graphprune.passes import read_handles_directly  # noqa: F401  no Identity between a handle and its reads
from graphprune.passes import strip_unused  # noqa: F401  dead nodes, variables, functions
from graphprune.passes import shrink_channels  # noqa: F401  dead channels out of every coupled weight
from graphprune.passes import fold_batch_norms  # noqa: F401  per-channel scale and shift into the kernel
from graphprune.passes import pointwise_matmul  # noqa: F401  1x1 convolutions as matrix products
from graphprune.passes import fold_pads  # noqa: F401  a Pad that SAME padding adds, into the convolution
from graphprune.passes import static_batch  # noqa: F401  fixed batch for TFLite (RNN TensorLists)
from graphprune.passes import expand_new_axes  # noqa: F401  new-axis slices as ExpandDims (TFLite)
from graphprune.passes import known_channels  # noqa: F401  a conv input's channel count stated (TFLite)
from graphprune.passes import outer_einsums  # noqa: F401  einsums that contract nothing as Mul (TFLite)
