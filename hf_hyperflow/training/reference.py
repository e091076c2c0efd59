"""The domain reference of a trained adapter (:mod:`hf_hyperflow.domain_reference`): the support statistics of
episodes of its training sources' train classes, drawn as meta-training draws them."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..domain_reference import DomainReference, statistics_vector
from .config import TrainConfig
from .data import load_sources, make_sampler

__all__ = ["fit_domain_reference", "support_statistics"]


def support_statistics(adapter, sampler, episodes: int, desc: str | None = None) -> torch.Tensor:
    """``Tensor[E, F]``: the statistics vectors of the first ``episodes`` episodes of ``sampler`` (their support
    sets through the frozen backbone, one task at a time)."""
    rows = []
    for i in tqdm(range(episodes), desc=desc, disable=desc is None):
        episode = sampler[i]
        labels = torch.as_tensor(episode.support_labels)
        sizes, classes = [len(labels)], [int(labels.max()) + 1]
        _, statistics = adapter.task_inputs(adapter.pixel_values(episode.support_images), labels, sizes, classes)
        rows.append(statistics_vector(statistics, adapter.drift.modules_order))
    return torch.cat(rows)


def fit_domain_reference(adapter, config: TrainConfig, episodes: int = 300, seed: int = 1,
                         progress: bool = True) -> DomainReference:
    """Fit the reference of ``adapter`` on ``episodes`` train-class episodes of every dataset of its training
    ``config`` (episode shapes, grey copies and class splits as meta-training's; seeds from ``seed``).

    Raises:
        ValueError: the adapter's drift network reads no module statistics (``statistics_size=0``), or
            ``episodes < 2``.
    """
    if not adapter.drift.statistics_size:
        raise ValueError("A domain reference is made of the module input statistics, which this adapter's drift "
                         "network does not read (statistics_size=0).")
    if episodes < 2:
        raise ValueError(f"episodes must be >= 2 (a spread needs two), got {episodes}.")
    statistics = {}
    for k, source in enumerate(load_sources(config)):
        sampler = make_sampler(source, config, "train", seed + 104729 * k, episodes, None, f"datasets[{k}]")
        statistics[source.name] = support_statistics(adapter, sampler, episodes, source.name if progress else None)
    return DomainReference.fit(statistics, adapter.config.backbone_fingerprint)
