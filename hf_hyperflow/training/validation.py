"""Validation during meta-training: the mean query accuracy of fixed episodes of every dataset's validation
classes, sharded over the ranks and gathered."""

from __future__ import annotations

import numpy as np
import torch
from accelerate.utils import gather_object

from ..prefix import PrefixCache
from ..stats import mean_confidence_interval
from .data import LoadedEpisode, Source, row_key, unrolled_inputs
from .losses import episode_logits

__all__ = ["validate"]


@torch.no_grad()
def validate(adapter, samplers: list, sources: list[Source], prefix: PrefixCache, accelerator, tasks_per_batch: int,
             direct_transfer: bool = False) -> dict:
    """Mean query accuracy of the fixed validation episodes of every dataset (rank-sharded, gathered).

    With ``direct_transfer`` the accuracy of the frozen backbone's prototypes (theta_0, no head delta) instead.

    Returns:
        ``{<dataset name>: {"accuracy", "ci95", "episodes"}, "accuracy": mean over the datasets}``.
    """
    device, dtype = adapter._device_dtype()
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = []
    for k, sampler in enumerate(samplers):
        indices = list(range(rank, len(sampler), world))
        for start in range(0, len(indices), tasks_per_batch):
            episodes = [LoadedEpisode.of(i, row_key(sources[k].entry), sampler[i])
                        for i in indices[start:start + tasks_per_batch]]
            inputs = unrolled_inputs(episodes, device, dtype, prefix)
            with accelerator.autocast():
                logits = episode_logits(adapter, inputs, prefix.prefix, direct_transfer=direct_transfer)
            accuracies = [float((lg.argmax(-1) == y).float().mean())
                          for lg, y in zip(logits, inputs.query_labels.split(inputs.query_sizes), strict=True)]
            mine += [(k, e.index, a) for e, a in zip(episodes, accuracies, strict=True)]
    everything = gather_object(mine)
    result = {}
    means = []
    for k, source in enumerate(sources):
        values = [a for s, _, a in sorted(everything) if s == k]
        mean, half = mean_confidence_interval(values)
        result[source.name] = {"accuracy": mean, "ci95": half, "episodes": len(values)}
        means.append(mean)
    result["accuracy"] = float(np.mean(means))
    return result
