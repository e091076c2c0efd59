"""Fine-tuning trajectories: record them over many episodes, store them, turn them into continuous paths.

Recording (:func:`record_trajectories`) fine-tunes every episode of a sampler (optionally from several
initialisations: theta_0, then theta_0 plus Gaussian noise on the fine-tuned groups) and stores the
snapshots theta_0 .. theta_K of the fine-tuned state groups with the episode's spec, so that the
episode can be rebuilt (``EpisodeSampler(dataset, **spec)[spec["index"]]`` with the spec's protocol,
split, seed, ways, shots and queries).

Layout of a store folder::

    store.json                         settings, adapter identity, state layout (JSON)
    shards/r000-000000.safetensors     one shard: tensors "<slot>/<state key>" = [K'+1, *shape] (K'+1 kept
                                       snapshots), and the shard's records (JSON) in the safetensors metadata
    index-r000.json                    the shards and trajectory ids rank 0 has committed (JSON)

A shard is written to a temporary file and moved into place with ``os.replace``: it exists whole or not
at all, and is the unit of commit. A killed run loses only the trajectories of its unfinished shard;
``resume=True`` deletes stale temporary files, reads the ids already stored (in every shard, whatever
rank wrote it) and fine-tunes only the others, so nothing is written twice or lost. Episodes are spread
over processes: rank ``r`` of ``w`` takes episodes ``i % w == r`` and writes only its own shards.

Paths (:func:`trajectory_path`): a stored trajectory is flattened into ``[1, K'+1, D]`` for
:func:`hf_hyperflow.interpolation.interpolate` (linear, piecewise linear, natural cubic spline), whose
positions and velocities come back as :class:`TaskState`.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .adapter import HyperFlowAdapter
from .checks import check_int, check_number
from .finetune import check_groups, finetune, initial_state
from .fingerprint import fingerprint
from .interpolation import INTERPOLATION_KINDS, TrajectoryPath, interpolate
from .io import read_json_checked
from .state import TaskState, parse_state_key

__all__ = [
    "STORE_FORMAT",
    "StatePath",
    "StoredTrajectory",
    "TrajectoryStore",
    "flatten_state",
    "record_trajectories",
    "snapshot_steps",
    "trajectory_path",
    "unflatten_state",
]

STORE_FORMAT = "hf-hyperflow-trajectories"
STORE_VERSION = 1
STORE_FILE = "store.json"
SHARD_DIR = "shards"
_SHARD_RE = re.compile(r"^r(\d{3})-(\d{6})\.safetensors$")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Settings that must agree for trajectories to be appended to an existing store.
_ADAPTER_IDENTITY = ("backbone_model_type", "backbone_fingerprint", "feature_size", "groups", "r", "lora_alpha",
                     "target_modules", "shift_modules", "exclude_modules", "first_adapted_block", "init_seed",
                     "image_size")


# ------------------------------------------------------------------------------------------------
# Flattening a TaskState, continuous paths
# ------------------------------------------------------------------------------------------------
Layout = tuple[tuple[str, tuple[int, ...]], ...]


def flatten_state(state: TaskState) -> tuple[torch.Tensor, Layout]:
    """``Tensor[T, D]`` (entries concatenated in the state's order) and the layout that undoes it."""
    if not isinstance(state, TaskState) or len(state) == 0:
        raise TypeError(f"flatten_state needs a non-empty TaskState, got {state!r}.")
    layout = tuple((key, tuple(value.shape[1:])) for key, value in state.items())
    flat = torch.cat([value.reshape(value.shape[0], -1) for value in state.values()], dim=1)
    return flat, layout


def unflatten_state(flat: torch.Tensor, layout: Layout) -> TaskState:
    """Inverse of :func:`flatten_state`: ``Tensor[T, D]`` -> TaskState of T tasks."""
    sizes = [math.prod(shape) for _, shape in layout]
    if flat.dim() != 2 or flat.shape[1] != sum(sizes):
        raise ValueError(f"Expected a tensor [T, {sum(sizes)}] for this layout, got {tuple(flat.shape)}.")
    parts = flat.split(sizes, dim=1)
    return TaskState({key: part.reshape(flat.shape[0], *shape) for (key, shape), part in zip(layout, parts,
                                                                                             strict=True)})


class StatePath:
    """Continuous paths through B trajectories of TaskStates (see :func:`trajectory_path`).

    Attributes:
        path: the underlying :class:`~hf_hyperflow.interpolation.TrajectoryPath` over ``[B, K+1, D]``.
        layout: the state entries and their shapes (without the task axis).
    """

    def __init__(self, path: TrajectoryPath, layout: Layout):
        self.path = path
        self.layout = layout

    @property
    def kind(self) -> str:
        return self.path.kind

    @property
    def batch_size(self) -> int:
        return self.path.batch_size

    def position(self, t: torch.Tensor | float) -> TaskState:
        """The state on each path at time ``t`` (``Tensor[B]`` or a number in [0, 1]): a TaskState of B tasks."""
        return unflatten_state(self.path.position(t), self.layout)

    def velocity(self, t: torch.Tensor | float) -> TaskState:
        """d state / dt on each path at time ``t``: a TaskState of B tasks."""
        return unflatten_state(self.path.velocity(t), self.layout)

    def __repr__(self) -> str:
        return f"StatePath(kind={self.kind!r}, batch_size={self.batch_size}, entries={len(self.layout)})"


def trajectory_path(snapshots: TaskState | Sequence[TaskState], kind: str = "linear",
                    times: torch.Tensor | None = None) -> StatePath:
    """A continuous path through one trajectory or a batch of B trajectories.

    Args:
        snapshots: a TaskState whose task axis holds the K+1 snapshots of one trajectory, or a list of B such
            states with the same entries and shapes (e.g. episodes with the same number of classes).
        kind: ``"linear"``, ``"piecewise"`` or ``"cubic"``.
        times: ``Tensor[K+1]`` knot times from 0 to 1 (default ``k / K``; for a stored trajectory use
            :meth:`TrajectoryStore.times`).

    Returns:
        A :class:`StatePath`; ``position(t)`` / ``velocity(t)`` take ``t`` of shape ``[B]`` and return TaskStates
        of B tasks.
    """
    if kind not in INTERPOLATION_KINDS:
        raise ValueError(f"unknown interpolation kind {kind!r}; choose one of {', '.join(INTERPOLATION_KINDS)}")
    states = [snapshots] if isinstance(snapshots, TaskState) else list(snapshots)
    if not states or not all(isinstance(s, TaskState) for s in states):
        raise TypeError("snapshots must be a TaskState (snapshots on the task axis) or a non-empty list of them.")
    flats = []
    layout = None
    for state in states:
        flat, this_layout = flatten_state(state)
        if layout is not None and this_layout != layout:
            raise ValueError("Trajectories with different entries or shapes (e.g. a different number of classes) "
                             "cannot share one path batch; group them by layout.")
        layout = this_layout
        flats.append(flat)
    lengths = {f.shape[0] for f in flats}
    if len(lengths) > 1:
        raise ValueError(f"Trajectories with different numbers of snapshots {sorted(lengths)} cannot share one batch.")
    return StatePath(interpolate(torch.stack(flats), kind, times), layout)


# ------------------------------------------------------------------------------------------------
# Store
# ------------------------------------------------------------------------------------------------
def snapshot_steps(steps: int, every: int) -> list[int]:
    """The fine-tuning steps whose snapshots are kept: ``0, every, 2 every, ...`` and always ``steps``."""
    kept = list(range(0, steps + 1, every))
    if kept[-1] != steps:
        kept.append(steps)
    return kept


class StoredTrajectory(NamedTuple):
    """One stored trajectory.

    spec: the episode's spec (what rebuilds it); snapshots: TaskState with the kept snapshots on the task
    axis (the fine-tuned groups' entries); meta: the record (id, episode, init, classes, lr, steps, groups,
    seconds, losses, ...).
    """

    spec: dict
    snapshots: TaskState
    meta: dict


def _atomic_write_text(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(text)
    os.replace(temporary, path)


def _shard_records(path: Path) -> list[dict]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as error:  # safetensors raises its own error types for a corrupt header
        raise ValueError(f"{path} is not a readable trajectory shard ({error}); delete it and resume.") from error
    if "records" not in metadata:
        raise ValueError(f"{path} has no trajectory records in its metadata: it was not written by this store.")
    return json.loads(metadata["records"])


def _shard_files(folder: Path) -> list[Path]:
    shards = folder / SHARD_DIR
    if not shards.is_dir():
        return []
    return sorted(p for p in shards.iterdir() if _SHARD_RE.match(p.name))


class TrajectoryStore(Sequence):
    """Read a folder written by :func:`record_trajectories`.

    ``store[i]`` is a :class:`StoredTrajectory` ``(spec, snapshots, meta)``; trajectories are ordered by
    shard (rank, then sequence) and slot. Tensors are read lazily, one trajectory at a time.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        header_file = self.path / STORE_FILE
        if not header_file.is_file():
            raise FileNotFoundError(f"{self.path} is not a trajectory store: {STORE_FILE} is missing.")
        self.header = read_json_checked(header_file)
        if self.header.get("format") != STORE_FORMAT:
            raise ValueError(f"{header_file} is not a {STORE_FORMAT} header (format={self.header.get('format')!r}).")
        if self.header.get("version") != STORE_VERSION:
            raise ValueError(f"{header_file} has version {self.header.get('version')}; this code reads version "
                             f"{STORE_VERSION}.")
        self._entries: list[tuple[Path, dict]] = []
        for shard in _shard_files(self.path):
            for record in _shard_records(shard):
                self._entries.append((shard, record))
        self._by_id = {record["id"]: i for i, (_, record) in enumerate(self._entries)}

    @property
    def settings(self) -> dict:
        """The fine-tuning settings every trajectory of the store was made with."""
        return self.header["settings"]

    def times(self) -> torch.Tensor:
        """``Tensor[K'+1]``: the knot time ``step / K`` of every kept snapshot."""
        steps = self.settings["steps"]
        return torch.tensor(self.settings["snapshot_steps"], dtype=torch.float64) / steps

    @property
    def ids(self) -> list[str]:
        return [record["id"] for _, record in self._entries]

    def index_of(self, trajectory_id: str) -> int:
        try:
            return self._by_id[trajectory_id]
        except KeyError:
            raise KeyError(f"No trajectory {trajectory_id!r} in {self.path}.") from None

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, index: int) -> StoredTrajectory:
        if isinstance(index, slice):
            raise TypeError("TrajectoryStore takes one integer index at a time.")
        shard, record = self._entries[index]
        slot = record["slot"]
        tensors = {}
        with safe_open(str(shard), framework="pt") as handle:
            for key in record["keys"]:
                tensors[key] = handle.get_tensor(f"{slot}/{key}")
        return StoredTrajectory(record["spec"], TaskState(tensors), record)

    def path_for(self, index: int, kind: str = "linear", dtype: torch.dtype = torch.float32) -> StatePath:
        """The continuous path through trajectory ``index`` (snapshots cast to ``dtype``), knots at :meth:`times`."""
        snapshots = self[index].snapshots.map(lambda t: t.to(dtype))
        return trajectory_path(snapshots, kind, self.times().to(dtype))

    def metadata(self):
        """The records as a ``datasets.Dataset`` (Arrow): id, episode, init, ways, seconds, final_loss, shard, slot,
        and the spec as a JSON string."""
        import datasets

        rows = [{
            "id": r["id"], "episode": r["episode"], "init": r["init"], "ways": len(r["classes"]),
            "seconds": r["seconds"], "final_loss": r["losses"][-1] if r["losses"] else None,
            "shard": shard.name, "slot": r["slot"], "spec": json.dumps(r["spec"], sort_keys=True),
        } for shard, r in self._entries]
        return datasets.Dataset.from_list(rows)


# ------------------------------------------------------------------------------------------------
# Recording
# ------------------------------------------------------------------------------------------------
def _derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _theta0_digest(adapter: HyperFlowAdapter) -> str:
    drift = adapter.drift
    return fingerprint(part for entry in drift.entries for part in (
        (f"{entry.key}{entry.shape}", drift.theta0(entry.key)) if entry.group == "lora" and entry.param == "A"
        else (f"{entry.key}{entry.shape}",)))


def _header(adapter, settings: dict, dataset: dict | None) -> dict:
    config = adapter.config.to_dict()
    return {
        "format": STORE_FORMAT,
        "version": STORE_VERSION,
        "settings": settings,
        "adapter": {k: config.get(k) for k in _ADAPTER_IDENTITY},
        "theta0_digest": _theta0_digest(adapter),
        "state_entries": [[e.key, list(e.shape)] for e in adapter.drift.entries],
        "dataset": dataset,
    }


def _compare_headers(existing: dict, new: dict, folder: Path) -> None:
    differences = []
    for section in ("settings", "adapter", "dataset"):
        old, fresh = existing.get(section) or {}, new.get(section) or {}
        for key in sorted(set(old) | set(fresh)):
            if old.get(key) != fresh.get(key):
                differences.append(f"{section}.{key}: stored {old.get(key)!r}, now {fresh.get(key)!r}")
    for key in ("theta0_digest", "state_entries", "format", "version"):
        if existing.get(key) != new.get(key):
            differences.append(f"{key} differs")
    if differences:
        raise ValueError(f"{folder} holds trajectories made with other settings; write to another folder or use the "
                         f"same settings. Differences: " + "; ".join(differences[:8]))


def _open_store(folder: Path, header: dict, resume: bool) -> None:
    """Create the store folder and its header, or check that an existing one was made with the same settings."""
    header_file = folder / STORE_FILE
    if header_file.is_file():
        if not resume:
            raise ValueError(f"{folder} already holds a trajectory store: pass resume=True (--resume) to continue it, "
                             f"or choose another folder.")
        _compare_headers(read_json_checked(header_file), header, folder)
    elif folder.is_dir() and any(folder.iterdir()):
        raise ValueError(f"{folder} is not empty and holds no trajectory store: choose an empty or new folder.")
    else:
        folder.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(header_file, json.dumps(header, indent=1) + "\n")
    (folder / SHARD_DIR).mkdir(exist_ok=True)


@dataclass
class _Writer:
    """Commits the trajectories of one rank, shard by shard."""

    folder: Path
    rank: int
    dtype: torch.dtype
    shard_size: int
    sequence: int
    committed: list[dict]

    def __post_init__(self):
        self.buffer: list[tuple[dict, dict[str, torch.Tensor]]] = []

    def add(self, record: dict, tensors: dict[str, torch.Tensor]) -> None:
        self.buffer.append((record, tensors))
        if len(self.buffer) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        name = f"r{self.rank:03d}-{self.sequence:06d}.safetensors"
        tensors, records = {}, []
        for slot, (record, state) in enumerate(self.buffer):
            record = dict(record, slot=slot, keys=list(state))
            records.append(record)
            for key, value in state.items():
                tensors[f"{slot}/{key}"] = value.detach().to("cpu", self.dtype).contiguous()
        path = self.folder / SHARD_DIR / name
        temporary = path.with_name(f".{name}.tmp-{os.getpid()}")
        save_file(tensors, str(temporary), metadata={"format": "pt", "records": json.dumps(records)})
        os.replace(temporary, path)
        self.committed.append({"file": name, "ids": [r["id"] for r in records]})
        self.sequence += 1
        self.buffer.clear()
        self.write_index()

    def write_index(self) -> None:
        index = {"rank": self.rank, "shards": self.committed}
        _atomic_write_text(self.folder / f"index-r{self.rank:03d}.json", json.dumps(index, indent=1) + "\n")


def record_trajectories(
    adapter: HyperFlowAdapter,
    episodes: Sequence,
    output_dir: str | os.PathLike,
    *,
    groups: Sequence[str] = ("lora", "shift", "head"),
    steps: int = 50,
    lr: float = 1e-3,
    inits: int = 1,
    noise_std: float = 0.0,
    seed: int = 0,
    augment_probability: float = 0.9,
    augment_pool: int | None = None,
    snapshot_every: int = 1,
    dtype: str = "float32",
    shard_size: int = 16,
    resume: bool = False,
    rank: int = 0,
    world_size: int = 1,
    accelerator=None,
    dataset: dict | None = None,
    progress: bool = False,
    callback: Callable[[dict], None] | None = None,
) -> list[str]:
    """Fine-tune every episode (and initialisation) assigned to this process and store the trajectories.

    Args:
        adapter: the HyperFlowAdapter whose state parametrisation and theta_0 the trajectories live in.
        episodes: a sequence whose item ``i`` has ``support_images`` (PIL list or pixel tensor),
            ``support_labels`` (``LongTensor[S]`` in ``0..C-1``), ``classes`` and ``spec`` (a JSON-able dict that
            rebuilds the episode), e.g. :class:`hf_hyperflow.episodes.EpisodeSampler`.
        output_dir: the store folder.
        groups, steps, lr, augment_probability, augment_pool: as in :func:`hf_hyperflow.finetune.finetune`
            (state groups only).
        inits: initialisations per episode: init 0 starts at theta_0, init ``j >= 1`` at theta_0 plus
            ``noise_std * N(0, 1)`` on the fine-tuned groups (seeded by ``(seed, episode, j)``).
        seed: base seed; trajectory ``(i, j)`` fine-tunes with a seed derived from ``(seed, i, j)``.
        snapshot_every: keep the snapshots of steps ``0, every, ...`` and the last (:func:`snapshot_steps`).
        dtype: storage dtype of the snapshots, ``"float32"``, ``"float16"`` or ``"bfloat16"``.
        shard_size: trajectories per shard file (the unit of commit).
        resume: continue a store that exists (same settings); without it, a folder holding a store is an error.
        rank, world_size: this process takes episodes ``i % world_size == rank``; ignored when ``accelerator`` is
            given (its ``process_index`` / ``num_processes`` are used).
        dataset: JSON-able description of where the episodes come from, stored in the header.
        progress: show a tqdm bar (on the main process only when ``accelerator`` is given).
        callback: called with each trajectory's record after it is fine-tuned (before it is committed).

    Returns:
        The ids (``"<episode>:<init>"``) of the trajectories this call stored.

    Raises:
        ValueError: bad settings; an existing store without ``resume``; a store made with other settings.
    """
    if not isinstance(adapter, HyperFlowAdapter):
        raise TypeError(f"adapter must be a HyperFlowAdapter, got {type(adapter).__name__}.")
    groups = check_groups(adapter, groups)
    settings = _record_settings(groups, steps, lr, inits, noise_std, seed, augment_probability, augment_pool,
                                snapshot_every, dtype, shard_size)
    if accelerator is not None:
        rank, world_size = accelerator.process_index, accelerator.num_processes
        progress = progress and accelerator.is_main_process
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"Need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}.")
    if not hasattr(episodes, "__len__") or not hasattr(episodes, "__getitem__"):
        raise TypeError("episodes must be a sequence of episodes (e.g. an EpisodeSampler).")
    if dataset is not None:
        json.dumps(dataset)  # a TypeError here names what is not JSON-able
    folder = Path(output_dir)
    _open_store_on_every_rank(folder, _header(adapter, settings, dataset), resume, accelerator)
    writer, done = _resume_writer(folder, rank, _DTYPES[dtype], shard_size)
    todo = [(i, j) for i in range(rank, len(episodes), world_size) for j in range(inits) if f"{i}:{j}" not in done]
    written: list[str] = []
    bar = tqdm(total=len(todo), disable=not progress, desc=f"trajectories (rank {rank})", unit="traj")
    try:
        for i, j in todo:
            record, stored = _fine_tune_trajectory(adapter, episodes[i], i, j, settings)
            if callback is not None:
                callback(record)
            writer.add(record, stored.to_flat_dict())
            written.append(record["id"])
            bar.update(1)
        writer.flush()
    finally:
        bar.close()
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return written


def _record_settings(groups, steps, lr, inits, noise_std, seed, augment_probability, augment_pool, snapshot_every,
                     dtype, shard_size) -> dict:
    """The checked settings of a recording, as the store's header keeps them."""
    if "full" in groups:
        raise ValueError("Trajectories are paths in the adapter's state: use state groups (lora / shift / head), not "
                         "'full'.")
    check_int(steps, "steps", 1)
    check_number(lr, "lr", 0.0)
    check_int(inits, "inits", 1)
    check_number(noise_std, "noise_std", 0.0)
    check_int(seed, "seed", 0)
    check_int(snapshot_every, "snapshot_every", 1)
    check_int(shard_size, "shard_size", 1)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not a storage dtype: use one of {list(_DTYPES)}.")
    return {"groups": list(groups), "steps": steps, "lr": float(lr), "inits": inits, "noise_std": float(noise_std),
            "seed": seed, "augment_probability": float(augment_probability), "augment_pool": augment_pool,
            "snapshot_steps": snapshot_steps(steps, snapshot_every), "dtype": dtype}


def _open_store_on_every_rank(folder: Path, header: dict, resume: bool, accelerator) -> None:
    """The main process checks and creates the store; the others join the store it created."""
    if accelerator is None:
        _open_store(folder, header, resume)
        return
    if accelerator.is_main_process:
        _open_store(folder, header, resume)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        _open_store(folder, header, resume=True)


def _resume_writer(folder: Path, rank: int, dtype: torch.dtype, shard_size: int) -> tuple[_Writer, set[str]]:
    """This rank's shard writer, continuing after its committed shards, and the ids every rank has stored."""
    for stale in (folder / SHARD_DIR).glob(f".r{rank:03d}-*.tmp-*"):
        stale.unlink()
    done: set[str] = set()
    committed: list[dict] = []
    sequence = 0
    for shard in _shard_files(folder):
        ids = [r["id"] for r in _shard_records(shard)]
        done.update(ids)
        shard_rank, shard_sequence = map(int, _SHARD_RE.match(shard.name).groups())
        if shard_rank == rank:
            committed.append({"file": shard.name, "ids": ids})
            sequence = max(sequence, shard_sequence + 1)
    writer = _Writer(folder, rank, dtype, shard_size, sequence, committed)
    writer.write_index()
    return writer, done


def _fine_tune_trajectory(adapter: HyperFlowAdapter, episode, i: int, j: int, settings: dict
                          ) -> tuple[dict, TaskState]:
    """Fine-tune initialisation ``j`` of episode ``i``; its record and its kept snapshots of the chosen groups."""
    groups, seed = tuple(settings["groups"]), settings["seed"]
    pixel_values = adapter.pixel_values(episode.support_images)
    labels = torch.as_tensor(episode.support_labels, dtype=torch.long, device=pixel_values.device)
    start = initial_state(adapter, int(labels.max()) + 1)
    if j > 0 and settings["noise_std"] > 0:
        generator = torch.Generator().manual_seed(_derived_seed(seed, i, j, 1))
        start = TaskState({k: (v + settings["noise_std"] * torch.randn(v.shape, generator=generator).to(v)
                               if parse_state_key(k)[0] in groups else v) for k, v in start.items()})
    result = finetune(adapter, pixel_values, labels, groups=groups, steps=settings["steps"], lr=settings["lr"],
                      seed=_derived_seed(seed, i, j), augment_probability=settings["augment_probability"],
                      augment_pool=settings["augment_pool"], record_trajectory=True, initial=start,
                      classes=list(episode.classes))
    trajectory = result.trajectory.select(settings["snapshot_steps"])
    stored = TaskState({k: v for k, v in trajectory.items() if parse_state_key(k)[0] in groups})
    record = {"id": f"{i}:{j}", "episode": i, "init": j, "spec": dict(episode.spec),
              "classes": [c if isinstance(c, (int, str)) else str(c) for c in episode.classes],
              "lr": settings["lr"], "steps": settings["steps"], "groups": list(groups), "seconds": result.seconds,
              "losses": result.losses, "prefix_cached": result.prefix_cached}
    return record, stored
