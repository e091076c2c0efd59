"""The trajectories of the flow-matching loss: recorded before training by the fine-tuning teacher
(``flow.generate``) or named stores, their interpolated paths, the support sets they were recorded on
(rebuilt from the store's dataset description) and those sets' features at theta_0, cached.

Sample ``g`` of the flow loss is a trajectory and a time, both drawn from ``(flow.seed, g)`` alone, so that a
resumed run draws what an uninterrupted run would have drawn.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..episodes import ClassSplit, EpisodeSampler
from ..prefix import PrefixCache
from ..trajectories import TrajectoryStore, record_trajectories
from .config import DatasetSection, TrainConfig, episode_shape
from .data import Source, entry_transform, load_source, make_sampler, row_key, seeds
from .losses import velocity_scales

__all__ = ["TrajectoryPool", "generate_trajectories"]


class TrajectoryPool:
    """Every trajectory of the flow loss: paths, rebuilt support sets and their cached features at theta_0."""

    def __init__(self, folders: list[Path], adapter, config: TrainConfig, sources: list[Source], prefix: PrefixCache,
                 transform):
        """Open the stores (checked against the adapter's state layout) and measure the flow loss's scales.

        Raises:
            ValueError: a store of another state layout or adapter, fine-tuned groups that differ between
                stores, or an empty store; naming ``flow.trajectories[k]``.
        """
        self.adapter = adapter
        self.kind = config.flow.interpolation
        self.prefix = prefix
        self.transform = transform
        self.stores = []
        self.entries: list[tuple[int, int]] = []
        expected = [[e.key, list(e.shape)] for e in adapter.drift.entries]
        identity = adapter.config.to_dict()
        groups = None
        for k, folder in enumerate(folders):
            key = f"flow.trajectories[{k}]"
            store = TrajectoryStore(folder)
            header = store.header
            if header.get("state_entries") != expected:
                raise ValueError(f"{key}: {folder} was recorded with another state layout (other groups, rank or "
                                 f"adapted blocks). Train from the adapter it was recorded with: set adapter.pretrained "
                                 f"to {folder / 'adapter'}.")
            differing = [name for name, value in (header.get("adapter") or {}).items()
                         if name in identity and identity[name] != value]
            if differing:
                raise ValueError(f"{key}: {folder} was recorded with an adapter whose {differing} differ from this "
                                 f"run's; set adapter.pretrained to {folder / 'adapter'} (or the adapter it used).")
            store_groups = list(store.settings["groups"])
            if groups is not None and store_groups != groups:
                raise ValueError(f"{key}: fine-tuned groups {store_groups} differ from the first store's {groups}.")
            groups = store_groups
            if len(store) == 0:
                raise ValueError(f"{key}: {folder} holds no trajectory.")
            self.stores.append(store)
            self.entries += [(k, i) for i in range(len(store))]
        self.groups = groups
        self._samplers: dict[str, Any] = {}
        self._row_keys: dict[str, str] = {}
        self._sources = sources
        self._features: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._orders: dict[int, np.ndarray] = {}
        self.seed = config.flow.seed
        count = min(config.flow.normalizer_trajectories, len(self.entries))
        self.scales = velocity_scales((self.stores[s][i].snapshots for s, i in self.entries[:count]), groups)

    def __len__(self) -> int:
        return len(self.entries)

    def draw(self, sample_id: int) -> tuple[int, float]:
        """Trajectory (index into the pool) and time of global sample ``sample_id``: each epoch of ``len(pool)``
        samples visits every trajectory once, in an order seeded by the epoch."""
        epoch, position = divmod(sample_id, len(self.entries))
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng(seeds(self.seed, epoch)).permutation(len(self.entries))}
        t = float(np.random.default_rng(seeds(self.seed, sample_id, 1)).random())
        return int(self._orders[epoch][position]), t

    def trajectory_id(self, index: int) -> str:
        store, i = self.entries[index]
        return f"{store}:{self.stores[store].ids[i]}"

    def _episode(self, store_index: int, record: dict):
        """Rebuild the episode a trajectory was recorded on, from the store's dataset description and its spec."""
        store = self.stores[store_index]
        description = store.header.get("dataset") or {}
        key = f"flow.trajectories[{store_index}]"
        cache_key = json.dumps(description, sort_keys=True)
        if cache_key not in self._samplers:
            if "source" not in description:
                raise ValueError(f"{key}: {store.path} does not say which dataset its episodes come from (no "
                                 f"dataset.source in store.json); record it with recipes/make_trajectories.py.")
            entry = DatasetSection(source=description["source"], max_classes=description.get("max_classes"),
                                   hub_split=description.get("hub_split") or "train",
                                   without_colour=bool(description.get("without_colour")),
                                   low_resolution=description.get("low_resolution"))
            known = next((s for s in self._sources if s.entry.source == entry.source
                          and s.entry.max_classes == entry.max_classes), None)
            if known is not None:
                dataset = known.dataset
            else:
                dataset, _ = load_source(entry, key)
            class_split = (ClassSplit.load(description["class_split"]) if description.get("class_split") else None)
            size = 1 + max(int(i.split(":")[0]) for i in store.ids)
            self._row_keys[cache_key] = row_key(entry)
            self._samplers[cache_key] = EpisodeSampler(
                dataset, protocol=description.get("protocol") or "fixed", ways=description.get("ways"),
                shots=description.get("shots"), queries=description.get("queries"),
                max_ways=description.get("max_ways"), max_support=description.get("max_support"),
                seed=description.get("episode_seed") or 0, split=description.get("split", "train"),
                class_split=class_split, num_episodes=size,
                image_transform=entry_transform(entry, self.transform))
        sampler = self._samplers[cache_key]
        episode = sampler[record["episode"]]
        if json.loads(json.dumps(episode.spec)) != record["spec"]:
            raise ValueError(f"{key}: the episode of trajectory {record['id']} cannot be rebuilt identically from "
                             f"{description} (stored spec {record['spec']}, rebuilt {episode.spec}); the dataset or "
                             f"its class split changed since it was recorded.")
        return episode, self._row_keys[cache_key]

    def features(self, index: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor, dict | None]:
        """``(Tensor[S, D], LongTensor[S], statistics)``: the trajectory's support features at theta_0, its labels
        and (for a drift network that reads them) its module input statistics; cached."""
        if index not in self._features:
            store_index, i = self.entries[index]
            record = self.stores[store_index][i].meta
            episode, row_key = self._episode(store_index, record)
            pixels = episode.support_images.to(device, dtype)
            keys = [(row_key, r) for r in episode.support_indices]
            with self.prefix.context(pixels, keys):
                labels = episode.support_labels.to(device)
                feats, statistics = self.adapter.task_inputs(pixels, labels, [len(labels)], [int(labels.max()) + 1])
            self._features[index] = (feats, labels, statistics)
        return self._features[index]

    def path(self, index: int):
        store_index, i = self.entries[index]
        return self.stores[store_index].path_for(i, self.kind)


def generate_trajectories(config: TrainConfig, adapter, sources: list[Source], accelerator, transform,
                           output_dir: Path) -> list[Path]:
    """Record ``flow.generate`` trajectories (one store per dataset) with the fine-tuning teacher; resumable."""
    generate = config.flow.generate
    parent = Path(generate.output) if generate.output else output_dir / "trajectories"
    folders = []
    for k, source in enumerate(sources):
        folder = parent / source.name
        sampler = make_sampler(source, config, "train", generate.seed, generate.episodes, transform, f"datasets[{k}]")
        description = {"source": source.entry.source, "hub_split": source.entry.hub_split,
                       "max_classes": source.entry.max_classes, "without_colour": source.entry.without_colour,
                       "low_resolution": source.entry.low_resolution, "split": "train",
                       **episode_shape(config, source.entry), "episode_seed": generate.seed, "class_split": str(source.class_split_file)}
        done = (folder / "store.json").is_file() and len(TrajectoryStore(folder)) >= generate.episodes * generate.inits
        if not done:
            record_trajectories(
                adapter, sampler, folder, groups=tuple(generate.groups or adapter.config.groups), steps=generate.steps,
                lr=generate.lr, inits=generate.inits, noise_std=generate.noise_std, seed=generate.seed,
                augment_pool=generate.augment_pool, snapshot_every=generate.snapshot_every,
                resume=(folder / "store.json").is_file(), accelerator=accelerator, dataset=description,
                progress=True)
        folders.append(folder)
    if accelerator.is_main_process:
        adapter_folder = parent / "adapter"
        if not adapter_folder.exists():
            adapter.save_pretrained(adapter_folder)
    accelerator.wait_for_everyone()
    return folders
