"""Structured channel pruning: the ``prune-channels`` pass and what it alone uses.

* :mod:`.channels` -- the pass (registered as ``prune-channels``): cost model, selection,
  schedules (hard / iterative / soft), BatchNorm re-estimation;
* :mod:`.importance` -- the importance criteria (one score per unit of every prunable group);
* :mod:`.rewrite` -- the physical removal (:func:`apply_channel_removal`) and soft pruning
  (:func:`zero_channels`) of the units chosen.

The channel-dependency analysis they read is :mod:`nnsculpt.ir.channel_deps`.
"""

from __future__ import annotations

from .channels import PruneChannels, recalibrate_batchnorm  # noqa: F401 - imports register the pass
from .rewrite import apply_channel_removal, keep_masks, zero_channels

__all__ = ["PruneChannels", "recalibrate_batchnorm", "apply_channel_removal", "zero_channels", "keep_masks"]
