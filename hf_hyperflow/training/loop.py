"""The meta-training loop: :func:`train` and the run it drives, one optimizer step at a time.

Everything distributed goes through Accelerate: device placement, DDP (the module handed to
``accelerator.prepare`` is a :class:`~hf_hyperflow.training.losses.DriftObjective` whose only submodule is the
drift network; the backbone is a plain attribute), gradient accumulation, bf16 autocast, trackers. Checkpoints
are safetensors and JSON (:mod:`~hf_hyperflow.training.checkpoint`); a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm

from ..checks import check_int
from ..domain_reference import DOMAIN_REFERENCE_FILE, DomainReference
from ..inputs import PixelTransform
from ..prefix import PrefixCache
from ..registry import data_builders as data_builders_of_entry_points
from .checkpoint import (
    clear_run,
    drift_fingerprint,
    load_checkpoint,
    resume_checkpoint,
    save_adapter,
    save_checkpoint,
    write_json,
)
from .components import build_adapter, build_backbone, build_optimizer, start_accelerator
from .config import TrainConfig
from .data import (
    EpisodeMix,
    episode_loader,
    make_sampler,
    prepare_sources,
    row_key,
    step_episode_ids,
    step_sample_ids,
    unrolled_inputs,
)
from .losses import DriftObjective, flow_inputs
from .reference import fit_domain_reference
from .trajectory_pool import TrajectoryPool, generate_trajectories
from .validation import validate

__all__ = ["TrainResult", "train"]


@dataclass
class TrainResult:
    """What :func:`train` returns (the same numbers are in ``<output_dir>/metrics.json``).

    Attributes:
        output_dir: the run folder. best_dir / final_dir: the saved adapters (best by validation accuracy).
        step: the optimizer step reached. best_step / best_accuracy: the best validation (None without one).
        metrics: the metrics dict written to metrics.json.
    """

    output_dir: Path
    best_dir: Path | None
    final_dir: Path | None
    step: int
    best_step: int | None
    best_accuracy: float | None
    metrics: dict


def train(config: TrainConfig, *, resume: bool | str | os.PathLike = False, max_steps_this_run: int | None = None,
          cpu: bool | None = None, callback: Callable[[int, dict], None] | None = None,
          data_builders: Mapping | None = None, overwrite: bool = False) -> TrainResult:
    """Meta-train the drift network as ``config`` says (call it under ``accelerate launch`` for several processes).

    Args:
        config: a validated :class:`TrainConfig` (see :func:`~hf_hyperflow.training.load_config`).
        resume: True: continue from the latest checkpoint in ``<output_dir>/checkpoints`` (start afresh when
            there is none); a path: from that checkpoint. A resumed run ends exactly as an uninterrupted one.
        max_steps_this_run: stop (with a checkpoint) after this many optimizer steps of this call.
        cpu: force CPU (overrides ``training.cpu``).
        callback: called as ``callback(step, record)`` on every rank after each optimizer step (and its
            checkpoint, if any).
        data_builders: name -> an object with ``build(output_dir)``: what builds a dataset whose ``builder`` is set
            and whose folder is missing; default: the installed ones (:func:`hf_hyperflow.registry.data_builders`).
        overwrite: start afresh in an ``output_dir`` that holds an earlier run (else an error says so).

    Returns:
        A :class:`TrainResult`.

    Raises:
        ValueError / TypeError: a config that cannot run (named key), before any training step.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig (see load_config), got {type(config).__name__}.")
    data_builders = data_builders if data_builders is not None else _installed_builders()
    config.validate(data_builders)
    if max_steps_this_run is not None:
        check_int(max_steps_this_run, "max_steps_this_run", 1)
    output_dir = Path(config.output_dir)
    accelerator = start_accelerator(config, output_dir, cpu)
    checkpoint = resume_checkpoint(output_dir, resume, overwrite)
    if accelerator.is_main_process:
        if checkpoint is None and overwrite:  # the earlier run's results go before this one writes any
            clear_run(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        write_json(output_dir / "training_config.json", config.to_dict())
        (output_dir / "training_config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    accelerator.wait_for_everyone()

    run = _Run(config, accelerator, data_builders)
    start, end = run.start(checkpoint, max_steps_this_run)
    bar = tqdm(total=config.training.max_steps, initial=start, desc="meta-training", unit="step",
               disable=not accelerator.is_local_main_process)
    for step in range(start + 1, end + 1):
        record = run.step(step - 1)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}")
        run.after_step(step, end)
        if callback is not None:
            callback(step, record)
    bar.close()
    return run.finish()


def _installed_builders() -> Mapping | None:
    """The dataset builders of the ``hf_hyperflow.data_builders`` entry points, or None when none is installed."""
    try:
        return data_builders_of_entry_points()
    except LookupError:
        return None


class _Run:
    """One call of :func:`train`: the data, the adapter, the objective and optimizer, the trainer state (saved
    with every checkpoint) and what happens at each optimizer step."""

    def __init__(self, config: TrainConfig, accelerator, data_builders: Mapping | None):
        self.config, self.accelerator = config, accelerator
        self.output_dir = Path(config.output_dir)
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        run = config.training
        self.per_step = run.episodes_per_step
        self.flow_per_step = config.flow.trajectories_per_step or self.per_step
        self.sources = prepare_sources(config, accelerator, self.output_dir, data_builders)
        backbone, self.backbone_source = build_backbone(config, self.output_dir, accelerator)
        set_seed(config.seed)
        self.adapter = adapter = build_adapter(config, backbone)
        adapter.model.to(accelerator.device)
        transform = PixelTransform(adapter.image_processor)
        self.device, self.dtype = adapter._device_dtype()
        self.train_samplers = ([make_sampler(s, config, "train", config.episodes.seed + 7919 * k,
                                             run.max_steps * self.per_step, transform, f"datasets[{k}]", self.rank,
                                             self.world) for k, s in enumerate(self.sources)]
                               if config.losses.unrolled > 0 else [])
        self.validation_samplers = ([make_sampler(s, config, "validation", config.validation.seed + k,
                                                  config.validation.episodes, transform, f"datasets[{k}]")
                                     for k, s in enumerate(self.sources)] if config.validation.episodes > 0 else [])
        self.prefix = PrefixCache(adapter.backbone, run.prefix_cache_mb * 2**20)
        self.pool = self._trajectory_pool(transform)
        objective = DriftObjective(adapter, unrolled_weight=config.losses.unrolled, flow_weight=config.losses.flow,
                                   steps=config.unrolled.steps, integrator=config.unrolled.integrator,
                                   scales=self.pool.scales if self.pool is not None else None,
                                   prefix=self.prefix.prefix)
        optimizer, self.scheduler = build_optimizer(config, objective, adapter)
        self.objective, self.optimizer = accelerator.prepare(objective, optimizer)
        self.drift = accelerator.unwrap_model(self.objective).drift
        self.state = {"step": 0, "best_accuracy": None, "best_step": None, "history": [], "validations": [],
                      "train_seconds": 0.0, "direct_transfer": None, "processes": self.world}
        self.window = _Window()
        self.episode_log: Path | None = None
        self.loader_iter = None

    def _trajectory_pool(self, transform) -> TrajectoryPool | None:
        """The flow loss's trajectories (recorded first with ``flow.generate``), or None without the flow loss."""
        config = self.config
        if config.losses.flow <= 0:
            return None
        folders = [Path(p) for p in config.flow.trajectories]
        if config.flow.generate is not None:
            folders += generate_trajectories(config, self.adapter, self.sources, self.accelerator, transform,
                                             self.output_dir)
        return TrajectoryPool(folders, self.adapter, config, self.sources, self.prefix, transform)

    # -- start -------------------------------------------------------------------------------------
    def start(self, checkpoint: Path | None, max_steps_this_run: int | None) -> tuple[int, int]:
        """Load the checkpoint, open the episode log and trackers, validate at step 0 of a fresh run, and
        open this rank's episodes; returns ``(start_step, end_step)`` of this call."""
        run, accelerator = self.config.training, self.accelerator
        if checkpoint is not None:
            self.state = load_checkpoint(accelerator, checkpoint, drift=self.drift, optimizer=self.optimizer,
                                         scheduler=self.scheduler)
            if accelerator.is_local_main_process:
                tqdm.write(f"resumed from {checkpoint} at step {self.state['step']}")
        start = self.state["step"]
        if start >= run.max_steps and not (self.output_dir / "final").is_dir():
            return start, start  # stopped after its last checkpoint, before final/: only the end is left to do
        if start >= run.max_steps:
            raise ValueError(f"training.max_steps={run.max_steps}: the checkpoint is at step {start} already; raise "
                             f"training.max_steps to train further.")
        end = run.max_steps if max_steps_this_run is None else min(run.max_steps, start + max_steps_this_run)
        if run.log_episodes:
            self._open_episode_log(start)
        if run.report_to:
            accelerator.init_trackers("hyperflow", config={k: v for k, v in _flatten(self.config.to_dict()).items()
                                                           if isinstance(v, (int, float, str, bool))})
        if start == 0 and self.validation_samplers:
            began = time.perf_counter()
            self.state["direct_transfer"] = validate(self.adapter, self.validation_samplers, self.sources, self.prefix,
                                                     accelerator, self.config.validation.tasks_per_batch,
                                                     direct_transfer=True)
            self.state["direct_transfer"]["seconds"] = time.perf_counter() - began
            self.validate(0)
        if self.train_samplers:
            mix = EpisodeMix(self.train_samplers, [s.entry.weight for s in self.sources], self.config.episodes.seed)
            schedule = [ids for step in range(start, end)
                        for ids in step_episode_ids(step, self.per_step, run.gradient_accumulation_steps, self.rank,
                                                    self.world)]
            self.loader_iter = iter(episode_loader(mix, schedule, [row_key(s.entry) for s in self.sources],
                                                   run.num_workers))
        return start, end

    def _open_episode_log(self, start: int) -> None:
        """``<output_dir>/episodes/rank_<r>.jsonl``, rewound to the lines of the steps before ``start``."""
        self.episode_log = self.output_dir / "episodes" / f"rank_{self.rank}.jsonl"
        self.episode_log.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if self.episode_log.is_file():  # a line cut by a kill belongs to a step after the checkpoint: dropped too
            steps = [(line, _step_of(line)) for line in self.episode_log.read_text().splitlines()]
            kept = [line for line, step in steps if step is not None and step < start]
        temporary = self.episode_log.with_name(f".{self.episode_log.name}.tmp")
        temporary.write_text("".join(line + "\n" for line in kept))
        os.replace(temporary, self.episode_log)  # the earlier steps' lines are never lost half way

    # -- one optimizer step ------------------------------------------------------------------------
    def step(self, step: int) -> dict:
        """Optimizer step ``step`` (0-based) over its micro-batches; returns the record of its losses (mean over
        the processes), gradient norm and learning rate."""
        accelerator, accumulation = self.accelerator, self.config.training.gradient_accumulation_steps
        began = time.perf_counter()
        used_episodes, used_trajectories = [], []
        sums: dict[str, float] = {}
        for micro in range(accumulation):
            with accelerator.accumulate(self.objective):
                out = self.objective(*self._micro_batch(step, micro, used_episodes, used_trajectories))
                accelerator.backward(out["loss"])
                max_grad_norm = self.config.optimizer.max_grad_norm
                if accelerator.sync_gradients and max_grad_norm is not None:
                    sums["grad_norm"] = float(accelerator.clip_grad_norm_(self.objective.parameters(), max_grad_norm))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                for name, value in out.items():
                    sums[name] = sums.get(name, 0.0) + float(value.detach()) / accumulation
        self.scheduler.step()
        seconds = time.perf_counter() - began
        self.state["train_seconds"] += seconds
        self.state["step"] = step + 1
        reduced = accelerator.reduce(torch.tensor([sums[k] for k in sorted(sums)], device=self.device), "mean")
        record = dict(zip(sorted(sums), reduced.tolist(), strict=True))
        record["lr"] = self.scheduler.get_last_lr()[0]
        self.window.add(record, seconds, len(used_episodes) * self.world, len(used_trajectories) * self.world)
        if self.episode_log is not None:
            with self.episode_log.open("a") as handle:
                handle.write(json.dumps({"step": step, "episodes": used_episodes,
                                         "trajectories": used_trajectories}) + "\n")
        if self.config.training.report_to:
            accelerator.log({f"train/{k}": v for k, v in record.items()}, step=step + 1)
        return record

    def _micro_batch(self, step: int, micro: int, used_episodes: list, used_trajectories: list):
        """``(unrolled inputs, flow inputs)`` of one micro-batch of this rank (None for a loss that is off);
        appends the episode and trajectory ids used."""
        unrolled = flow = None
        if self.loader_iter is not None:
            episodes = next(self.loader_iter)
            used_episodes += [e.index for e in episodes]
            unrolled = unrolled_inputs(episodes, self.device, self.dtype, self.prefix)
        if self.pool is not None:
            pool = self.pool
            ids = step_sample_ids(step, micro, self.flow_per_step, self.config.training.gradient_accumulation_steps,
                                  self.rank, self.world)
            draws = [pool.draw(g) for g in ids]
            used_trajectories += [pool.trajectory_id(i) for i, _ in draws]
            features = [pool.features(i, self.device, self.dtype) for i, _ in draws]
            flow = flow_inputs(self.drift, [f for f, _, _ in features], [y for _, y, _ in features],
                               [pool.path(i) for i, _ in draws], torch.tensor([t for _, t in draws]), pool.groups,
                               [m for _, _, m in features])
        return unrolled, flow

    def after_step(self, step: int, end: int) -> None:
        """The history record, validation and checkpoint due after optimizer step ``step`` (1-based)."""
        run = self.config.training
        if step % run.log_every == 0 or step == end:
            self.state["history"].append(self.window.entry(step, self.state["train_seconds"],
                                                           self.prefix.used_bytes / 2**20))
            self.window = _Window()
        if step % self.config.validation.every == 0 or step == run.max_steps:
            self.validate(step)
        if step % run.checkpoint_every == 0 or step == end:
            save_checkpoint(self.accelerator, self.output_dir, step, self.state, run.keep_checkpoints, drift=self.drift,
                            optimizer=self.optimizer, scheduler=self.scheduler)
            if self.accelerator.is_main_process:
                write_json(self.output_dir / "metrics.json", self.metrics())

    # -- validation, metrics, the end --------------------------------------------------------------
    def validate(self, step: int) -> dict | None:
        """Validate at ``step``; a new best accuracy saves the adapter to ``<output_dir>/best``."""
        if not self.validation_samplers:
            return None
        accelerator, state = self.accelerator, self.state
        began = time.perf_counter()
        result = validate(self.adapter, self.validation_samplers, self.sources, self.prefix, accelerator,
                          self.config.validation.tasks_per_batch)
        result.update(step=step, seconds=time.perf_counter() - began, train_seconds=state["train_seconds"])
        state["validations"].append(result)
        if state["best_accuracy"] is None or result["accuracy"] > state["best_accuracy"]:
            state["best_accuracy"], state["best_step"] = result["accuracy"], step
            if accelerator.is_main_process:
                save_adapter(self.adapter, self.output_dir / "best", self.config.to_dict(),
                             {**self.metrics(), "step": step, "validation": result})
        if self.config.training.report_to:
            accelerator.log({"validation/accuracy": result["accuracy"]}, step=step)
        if accelerator.is_local_main_process:
            tqdm.write(f"step {step}: validation accuracy {result['accuracy']:.4f}")
        accelerator.wait_for_everyone()
        return result

    def metrics(self) -> dict:
        """The run's metrics so far (what ``metrics.json`` holds)."""
        state, pool = self.state, self.pool
        return {"output_dir": str(self.output_dir), "backbone": self.backbone_source, "processes": self.world,
                "episodes_per_step": self.per_step, "trajectories_per_step": self.flow_per_step if pool else 0,
                "step": state["step"], "best_step": state["best_step"], "best_accuracy": state["best_accuracy"],
                "direct_transfer": state["direct_transfer"], "train_seconds": state["train_seconds"],
                "flow_scales": pool.scales if pool is not None else None,
                "trajectories": len(pool) if pool is not None else 0,
                "validations": state["validations"], "history": state["history"]}

    def _domain_reference(self) -> DomainReference | None:
        """The reference an adapter with a ``domain_gate`` needs to gate (None without a gate). It depends on the
        frozen backbone and the datasets, not on the drift network: one fit serves the final and best adapters."""
        if self.adapter.config.domain_gate is None:
            return None
        section = self.config.domain_reference
        tqdm.write(f"domain reference: {section.episodes} train-class episodes per dataset")
        return fit_domain_reference(self.adapter, self.config, section.episodes, section.seed,
                                    progress=self.accelerator.is_local_main_process)

    def finish(self) -> TrainResult:
        """The end of this call: the drift networks of all ranks compared, the final adapter and metrics."""
        accelerator, step, output_dir = self.accelerator, self.state["step"], self.output_dir
        fingerprints = gather_object([drift_fingerprint(self.drift)])
        metrics = self.metrics()
        metrics["drift_fingerprints"] = fingerprints
        metrics["prefix_cache"] = {"images_kept": self.prefix.images_kept, "mb": self.prefix.used_bytes / 2**20,
                                   "hits": self.prefix.hits, "misses": self.prefix.misses}
        final_dir = output_dir / "final" if step == self.config.training.max_steps else None
        if accelerator.is_main_process:  # final/ last: its presence says the run is finished
            write_json(output_dir / "metrics.json", metrics)
            reference = self._domain_reference() if final_dir is not None else None
            if not self.validation_samplers and final_dir is not None:
                save_adapter(self.adapter, output_dir / "best", self.config.to_dict(),
                             {**metrics, "step": step, "validation": None}, reference)
            elif reference is not None and (output_dir / "best").is_dir():
                reference.save(output_dir / "best" / DOMAIN_REFERENCE_FILE)
            if final_dir is not None:
                save_adapter(self.adapter, final_dir, self.config.to_dict(), {**metrics, "step": step}, reference)
        accelerator.wait_for_everyone()
        if self.config.training.report_to:
            accelerator.end_training()
        best_dir = output_dir / "best"
        return TrainResult(output_dir=output_dir, best_dir=best_dir if best_dir.exists() else None,
                           final_dir=final_dir, step=step, best_step=self.state["best_step"],
                           best_accuracy=self.state["best_accuracy"], metrics=metrics)


class _Window:
    """Sums of the step records between two entries of the training history."""

    def __init__(self):
        self.seconds, self.episodes, self.trajectories, self.count = 0.0, 0, 0, 0
        self.sums: dict[str, float] = {}

    def add(self, record: dict, seconds: float, episodes: int, trajectories: int) -> None:
        self.seconds += seconds
        self.episodes += episodes
        self.trajectories += trajectories
        self.count += 1
        for name, value in record.items():
            self.sums[name] = self.sums.get(name, 0.0) + value

    def entry(self, step: int, train_seconds: float, prefix_cache_mb: float) -> dict:
        """The history entry: mean of every record field, plus throughput over the window."""
        entry = {k: v / self.count for k, v in self.sums.items()}
        entry.update(step=step, seconds=self.seconds, train_seconds=train_seconds,
                     episodes_per_second=self.episodes / self.seconds,
                     trajectories_per_second=self.trajectories / self.seconds, prefix_cache_mb=prefix_cache_mb)
        return entry


def _step_of(line: str) -> int | None:
    """The step of an episode-log line; None for a line that is not whole JSON."""
    try:
        step = json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None
    return step if isinstance(step, int) else None


def _flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out
