"""Episodic evaluation: methods x datasets on the same seeded episodes; accuracy with 95% CI, adaptation
latency, query latency and peak memory of adaptation, and the ratios between methods.

Methods:
- ``dt``: direct transfer (prototypes of the frozen backbone, no adaptation);
- ``ft-full``, ``ft-blocks``, ``ft-lora``, ``ft-shift``, ``ft-head``: gradient fine-tuning (P>M>F protocol, lr
  chosen per dataset on validation episodes) of the whole backbone, of every weight of the adapted blocks, or
  of one adapted-state group; ``ft-<groups>:<optimizer>:<steps>`` with other steps or plain gradient steps
  (e.g. ``ft-lora+shift:sgd:1``, one step along the support loss's gradient at theta_0);
- ``hyperflow``: the adapter's drift network with its integrator and steps; ``hyperflow:<integrator>:<steps>``
  for other integrators / step counts (e.g. ``hyperflow:rk4:4``); ``hyperflow:auto`` (or
  ``hyperflow:<integrator>:auto``) stops each task where its support set classifies itself best;
  ``hyperflow:fixed`` integrates to t=1 whatever the adapter's stopping rule.

Latency is wall-clock time from the support's pixel tensors to a ready classifier (image decoding and
processing are the same for every method and excluded; on CUDA the clock is read after the queued kernels
finish); mean and median over the episodes. Query latency is the time of ``logits`` on the query set. Peak
memory of adaptation: on CUDA the allocator's peak above the level before adaptation; on CPU the peak of the
bytes PyTorch's CPU allocator holds above that level during adaptation (activations, autograd buffers,
optimiser state, copies), from ``torch.profiler``'s allocator events (every allocation and free, each at its
own time), measured in a separate, profiled run of the first episodes.
"""

from __future__ import annotations

import gc
import itertools
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .adapter import HyperFlowAdapter
from .config import ADAPTED_GROUPS, INTEGRATOR_NAMES
from .episodes import Episode, EpisodeSampler
from .finetune import DEFAULT_LR_GRID, OPTIMIZERS, finetune, select_lr
from .stats import mean_confidence_interval, paired_difference
from .task import AdaptedTask

__all__ = ["Method", "parse_method", "measure_peak_memory", "Evaluator", "FT_GROUPS", "run_evaluation",
           "machine_description", "add_ratios", "add_paired_gains"]

FT_GROUPS: dict[str, tuple[str, ...]] = {
    "ft-full": ("full",),
    "ft-blocks": ("blocks",),
    "ft-lora": ("lora",),
    "ft-shift": ("shift",),
    "ft-head": ("head",),
}
KNOWN_METHODS = ("dt", *FT_GROUPS, "ft-<group>+<group>", "ft-<groups>:<optimizer>:<steps>", "hyperflow",
                 "hyperflow:auto", "hyperflow:fixed", "hyperflow:<integrator>:<steps>")


@dataclass(frozen=True)
class Method:
    """One evaluated method: ``kind`` is ``"dt"``, ``"ft"`` or ``"hyperflow"``."""

    name: str
    kind: str
    groups: tuple[str, ...] = ()
    integrator: str | None = None
    steps: int | str | None = None  # ft: None keeps the evaluator's ft_steps
    stopping: str | None = None  # hyperflow: "fixed" / "auto" replacing the adapter config's rule
    optimizer: str | None = None  # ft: "adam" (None) or "sgd"


def parse_method(name: str) -> Method:
    """``"dt"``, ``"ft-full"``/``"ft-blocks"``/``"ft-lora"``/``"ft-shift"``/``"ft-head"``, a mix such as
    ``"ft-lora+shift"``, either with ``":<optimizer>:<steps>"`` (``"ft-lora+shift:sgd:1"``), ``"hyperflow"`` or
    ``"hyperflow:<integrator>:<steps>"``; anything else is a ValueError listing the choices."""
    if name == "dt":
        return Method(name, "dt")
    if name.startswith("ft-"):
        return _fine_tuning_method(name)
    if name == "hyperflow":
        return Method(name, "hyperflow")
    if name == "hyperflow:auto":
        return Method(name, "hyperflow", steps="auto")
    if name == "hyperflow:fixed":
        return Method(name, "hyperflow", stopping="fixed")
    parts = name.split(":")
    if parts[0] == "hyperflow" and len(parts) == 3:
        integrator, steps = parts[1], parts[2]
        if integrator not in INTEGRATOR_NAMES:
            raise ValueError(f"Method {name!r}: integrator {integrator!r} is unknown; use one of {list(INTEGRATOR_NAMES)}.")
        if steps == "auto":
            return Method(name, "hyperflow", integrator=integrator, steps="auto")
        if not steps.isdigit() or int(steps) < 1:
            raise ValueError(f"Method {name!r}: the number of steps must be a positive integer or 'auto'.")
        return Method(name, "hyperflow", integrator=integrator, steps=int(steps))
    raise ValueError(f"Unknown method {name!r}. Choose from {list(KNOWN_METHODS)}.")


def _fine_tuning_method(name: str) -> Method:
    """``ft-<group>``, ``ft-<group>+<group>...``, optionally followed by ``:<optimizer>:<steps>``."""
    base, _, schedule = name.partition(":")
    if base in FT_GROUPS:
        groups = FT_GROUPS[base]
    elif "+" in base:  # a mix of state groups, e.g. ft-lora+shift
        groups = tuple(base[3:].split("+"))
        unknown = [g for g in groups if g not in ADAPTED_GROUPS]
        if unknown or len(set(groups)) != len(groups):
            raise ValueError(f"Method {name!r}: a fine-tuning mix joins distinct groups of {list(ADAPTED_GROUPS)} "
                             f"with '+', e.g. 'ft-lora+shift'.")
    else:
        raise ValueError(f"Unknown method {name!r}. Choose from {list(KNOWN_METHODS)}.")
    if not schedule:
        return Method(name, "ft", groups=groups)
    parts = schedule.split(":")
    if len(parts) != 2 or parts[0] not in OPTIMIZERS or not parts[1].isdigit() or int(parts[1]) < 1:
        raise ValueError(f"Method {name!r}: after the groups, give ':<optimizer>:<steps>' with an optimizer of "
                         f"{list(OPTIMIZERS)} and a positive number of steps, e.g. 'ft-lora+shift:sgd:1'.")
    return Method(name, "ft", groups=groups, steps=int(parts[1]), optimizer=parts[0])


def _clock() -> float:
    """``time.perf_counter()`` once the accelerator has finished the work queued so far (CUDA kernels run
    asynchronously: without this a latency would end before its work does)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def measure_peak_memory(fn: Callable[[], object]) -> int:
    """Peak bytes allocated by PyTorch while ``fn()`` runs, above the level when it starts (see the module
    docstring for how, on CUDA and on CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - start)
    from torch.profiler import ProfilerActivity, profile

    # The profiler's backend (Kineto) logs every start and stop, and a failed CUDA probe, to stderr: quiet
    # unless the user asked for a level.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        fn()
    # Every allocation and free with its own time (an operator's self memory would date the frees that happen
    # between operators inside a record_function range at the start of that range).
    changes = sorted(_cpu_allocations(profiler.profiler.kineto_results.experimental_event_tree()))
    peak = int(max(0, max(itertools.accumulate(size for _, size in changes), default=0)))
    # The profiler's results hold reference cycles: left to the next automatic collection, the events of a long
    # fn (seconds of fine-tuning: gigabytes) stay alive, and repeated measurements pile them up.
    del profiler, changes
    gc.collect()
    return peak


def _cpu_allocations(nodes) -> list[tuple[int, int]]:
    """``(time ns, bytes; negative for a free)`` of the CPU allocator events in a profiler event tree."""
    from torch._C._profiler import _EventType

    found, stack = [], list(nodes)
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        kind, fields = node.typed
        if kind == _EventType.Allocation and fields.device.type == "cpu":
            found.append((node.start_time_ns, fields.alloc_size))
    return found


@dataclass
class _Prepared:
    support: torch.Tensor
    support_labels: torch.Tensor
    query: torch.Tensor
    query_labels: torch.Tensor
    indices: tuple[list[int], list[int]]


class Evaluator:
    """Runs methods on the same seeded episodes of each dataset.

    Args:
        adapter: the HyperFlowAdapter (its backbone, image processor and state parametrisation serve every
            method; its drift network serves ``hyperflow``).
        methods: method names (see :func:`parse_method`).
        ft_steps: fine-tuning steps (50 in P>M>F).
        lr_grid: learning rates tried per dataset on ``lr_episodes`` validation episodes; ``fixed_lr`` (one lr, or
            ``method -> lr``) skips that.
        ft_augment_pool: fine-tuning's pseudo-queries drawn from this many augmented copies of the support whose
            frozen prefix runs once (the trajectory teacher's protocol); None: fresh augmentations every step
            through the whole network (P>M>F).
        memory_episodes: episodes per method whose adaptation is measured again under the memory profiler.
        seed: the episodes' seed (every method sees the same episodes).
    """

    def __init__(self, adapter: HyperFlowAdapter, methods: Sequence[str], *, ft_steps: int = 50,
                 lr_grid: Sequence[float] = DEFAULT_LR_GRID, lr_episodes: int = 5, fixed_lr: float | dict[str, float] | None = None,
                 ft_augment_pool: int | None = None, memory_episodes: int = 2, seed: int = 0, progress: bool = True):
        if not methods:
            raise ValueError("Give at least one method.")
        self.methods = [parse_method(m) for m in methods]
        if len({m.name for m in self.methods}) != len(self.methods):
            raise ValueError(f"Methods listed twice: {list(methods)}.")
        self.adapter = adapter
        self.ft_steps = ft_steps
        self.lr_grid = list(lr_grid)
        self.lr_episodes = lr_episodes
        self.fixed_lr = fixed_lr
        self.ft_augment_pool = ft_augment_pool
        self.memory_episodes = memory_episodes
        self.seed = seed
        self.progress = progress

    # -- one method on one episode -------------------------------------------------------------------
    def _adapt(self, method: Method, episode: _Prepared, lr: float | None, episode_index: int) -> AdaptedTask:
        if method.kind == "dt":
            return self.adapter.direct_transfer(episode.support, episode.support_labels)
        if method.kind == "hyperflow":
            return self.adapter.adapt(episode.support, episode.support_labels, steps=method.steps,
                                      integrator=method.integrator, stopping=method.stopping)
        return finetune(self.adapter, episode.support, episode.support_labels, lr=lr, seed=self.seed + episode_index,
                        **self._fine_tuning(method)).task

    def _fine_tuning(self, method: Method) -> dict:
        """``finetune`` keywords of a fine-tuning method, the same for choosing its lr and for evaluating it: its
        groups, its steps and optimizer (the evaluator's ``ft_steps`` and Adam unless it names others) and the
        evaluator's augmented pool."""
        return {"groups": method.groups, "steps": method.steps or self.ft_steps,
                "optimizer": method.optimizer or "adam", "augment_pool": self.ft_augment_pool}

    def _choose_lrs(self, dataset, sampler_kwargs: dict) -> dict[str, dict]:
        lrs: dict[str, dict] = {}
        ft_methods = [m for m in self.methods if m.kind == "ft"]
        if not ft_methods:
            return lrs
        if isinstance(self.fixed_lr, dict):
            missing = [m.name for m in ft_methods if m.name not in self.fixed_lr]
            if missing:
                raise ValueError(f"fixed_lr gives no lr for {missing}.")
            return {m.name: {"lr": self.fixed_lr[m.name], "table": None} for m in ft_methods}
        if self.fixed_lr is not None:
            return {m.name: {"lr": self.fixed_lr, "table": None} for m in ft_methods}
        # Validation classes; a domain whose episodes draw on every class (held out of training as a whole) gives
        # other episodes of every class.
        split = None if "split" in sampler_kwargs and sampler_kwargs["split"] is None else "validation"
        validation = EpisodeSampler(dataset, **{**sampler_kwargs, "split": split,
                                                "num_episodes": self.lr_episodes, "seed": self.seed + 10_000})
        episodes = [validation[i] for i in range(self.lr_episodes)]
        for method in ft_methods:
            best, table = select_lr(self.adapter, episodes, grid=self.lr_grid, seed=self.seed,
                                    **self._fine_tuning(method))
            lrs[method.name] = {"lr": best, "table": {str(k): v for k, v in table.items()}}
        return lrs

    def _prepare(self, episode: Episode) -> _Prepared:
        device = self.adapter._device_dtype()[0]
        return _Prepared(
            support=self.adapter.pixel_values(episode.support_images),
            support_labels=torch.as_tensor(episode.support_labels).to(device),
            query=self.adapter.pixel_values(episode.query_images),
            query_labels=torch.as_tensor(episode.query_labels),
            indices=(list(episode.support_indices), list(episode.query_indices)),
        )

    # -- a dataset -------------------------------------------------------------------------------------
    def evaluate_dataset(self, name: str, dataset, *, episodes: int, episodes_per_method: dict[str, int] | None = None,
                         sampler_kwargs: dict | None = None, batch_tasks: int = 0) -> dict:
        """Evaluate every method on ``dataset``; returns ``{"methods": {...}, "episode_rows": [...], ...}``: the rows
        of each episode once (a method with fewer episodes ran on the first ones), per-episode accuracies per method."""
        from tqdm.auto import tqdm

        sampler_kwargs = dict(sampler_kwargs or {})
        per_method = {m.name: min(episodes, (episodes_per_method or {}).get(m.name, episodes)) for m in self.methods}
        sampler = EpisodeSampler(dataset, **{**sampler_kwargs, "num_episodes": episodes, "seed": self.seed})
        lrs = self._choose_lrs(dataset, sampler_kwargs)
        records: dict[str, dict[str, list]] = {m.name: {"accuracy": [], "adapt": [], "query": [], "memory": []}
                                               for m in self.methods}
        rows: list = []
        prepared_cache: list[_Prepared] = []
        bar = tqdm(range(episodes), desc=f"{name}: episodes", disable=not self.progress)
        for i in bar:
            episode = self._prepare(sampler[i])
            if any(i < count for count in per_method.values()):
                rows.append(episode.indices)
            if len(prepared_cache) < max(batch_tasks, 1):
                prepared_cache.append(episode)
            for method in self.methods:
                if i >= per_method[method.name]:
                    continue
                lr = lrs.get(method.name, {}).get("lr")
                start = _clock()
                task = self._adapt(method, episode, lr, i)
                adapt_seconds = _clock() - start
                start = _clock()
                logits = task.logits(episode.query)
                query_seconds = _clock() - start
                accuracy = float((logits.argmax(-1).cpu() == episode.query_labels.cpu()).float().mean())
                record = records[method.name]
                record["accuracy"].append(accuracy)
                record["adapt"].append(adapt_seconds)
                record["query"].append(query_seconds)
                if i < self.memory_episodes:
                    record["memory"].append(measure_peak_memory(
                        lambda m=method, e=episode, r=lr, j=i: self._adapt(m, e, r, j)))
        summary = {}
        for method in self.methods:
            record = records[method.name]
            mean, half = mean_confidence_interval([100.0 * a for a in record["accuracy"]])
            summary[method.name] = {
                "accuracy": mean,
                "ci95": half,
                "episodes": len(record["accuracy"]),
                "adapt_latency_s": sum(record["adapt"]) / len(record["adapt"]),
                "adapt_latency_median_s": statistics.median(record["adapt"]),
                "query_latency_s": sum(record["query"]) / len(record["query"]),
                "peak_memory_bytes": int(max(record["memory"])) if record["memory"] else None,
            }
            if method.name in lrs:
                summary[method.name]["lr"] = lrs[method.name]["lr"]
                summary[method.name]["lr_table"] = lrs[method.name]["table"]
        add_ratios(summary)
        add_paired_gains(summary, {name: [100.0 * a for a in record["accuracy"]] for name, record in records.items()})
        out = {"methods": summary, "episode_rows": rows, "per_episode_accuracy":
               {m: records[m]["accuracy"] for m in records}}
        if batch_tasks > 1 and any(m.kind == "hyperflow" for m in self.methods):
            out["batched_throughput"] = self.batched_throughput(prepared_cache[:batch_tasks])
        return out

    def batched_throughput(self, episodes: list[_Prepared]) -> dict:
        """Tasks per second of ``adapt_many`` (one pass over all tasks) against ``adapt`` one by one."""
        tasks = [(e.support, e.support_labels) for e in episodes]
        self.adapter.adapt_many(tasks[:1])  # warm-up
        start = _clock()
        for support, labels in tasks:
            self.adapter.adapt(support, labels)
        one_by_one = _clock() - start
        start = _clock()
        self.adapter.adapt_many(tasks)
        batched = _clock() - start
        return {"tasks": len(tasks), "one_by_one_tasks_per_s": len(tasks) / one_by_one,
                "batched_tasks_per_s": len(tasks) / batched, "speedup": one_by_one / batched}

    def steps_sweep(self, dataset, *, steps: Sequence[int], integrators: Sequence[str], episodes: int,
                    sampler_kwargs: dict | None = None) -> dict:
        """Accuracy of ``hyperflow`` against the number of integration steps (same episodes for every point)."""
        sampler = EpisodeSampler(dataset, **{**(sampler_kwargs or {}), "num_episodes": episodes, "seed": self.seed})
        prepared = [self._prepare(sampler[i]) for i in range(episodes)]
        sweep: dict[str, dict[str, list[float]]] = {}
        for integrator in integrators:
            points = {"steps": [], "accuracy": [], "ci95": []}
            for count in steps:
                accuracies = []
                for episode in prepared:
                    task = self.adapter.adapt(episode.support, episode.support_labels, steps=count,
                                              integrator=integrator)
                    accuracies.append(100.0 * float((task.logits(episode.query).argmax(-1).cpu()
                                                     == episode.query_labels).float().mean()))
                mean, half = mean_confidence_interval(accuracies)
                points["steps"].append(count)
                points["accuracy"].append(mean)
                points["ci95"].append(half)
            sweep[integrator] = points
        return sweep


def machine_description() -> str:
    """What ran the evaluation, for the results' meta block."""
    import platform

    device = f"CUDA {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "CPU"
    return f"{platform.machine()}, {torch.get_num_threads()} torch threads, {device}"


def run_evaluation(evaluator: Evaluator, domains: dict[str, tuple], *, episodes: int, meta: dict,
                   episodes_per_method: dict[str, int] | None = None, batch_tasks: int = 8,
                   sweep_steps: Sequence[int] = (), sweep_integrators: Sequence[str] = ("euler", "rk4"),
                   sweep_episodes: int = 50) -> tuple[dict, dict]:
    """Evaluate every domain; returns ``(results, sweeps)`` with results in the ``results.json`` schema.

    Args:
        domains: ``name -> (dataset, sampler_kwargs)`` (EpisodeSampler keywords: protocol, ways, split...).
        meta: the ``meta`` block of the results (backbone, adapter, protocol, machine, date, command...).
        sweep_steps: if given (and a hyperflow method is evaluated), accuracy against the number of steps.
    """
    results = {"meta": meta, "results": {}, "details": {}, "batched_throughput": {}}
    sweeps: dict = {}
    for name, (dataset, sampler_kwargs) in domains.items():
        out = evaluator.evaluate_dataset(name, dataset, episodes=episodes, episodes_per_method=episodes_per_method,
                                         sampler_kwargs=sampler_kwargs, batch_tasks=batch_tasks)
        results["results"][name] = out["methods"]
        results["details"][name] = {"episode_rows": out["episode_rows"],
                                    "per_episode_accuracy": out["per_episode_accuracy"]}
        if "batched_throughput" in out:
            results["batched_throughput"][name] = out["batched_throughput"]
        if sweep_steps and any(m.kind == "hyperflow" for m in evaluator.methods):
            sweeps[name] = evaluator.steps_sweep(dataset, steps=sweep_steps, integrators=sweep_integrators,
                                                 episodes=min(sweep_episodes, episodes), sampler_kwargs=sampler_kwargs)
    if sweeps:
        results["steps_sweep"] = sweeps
    return results, sweeps


def add_ratios(summary: dict[str, dict]) -> None:
    """Ratios of each method's latency / memory to ``dt`` and ``ft-full`` of the same run (in place)."""
    dt = summary.get("dt")
    full = summary.get("ft-full")
    for row in summary.values():
        if dt:
            row["latency_vs_dt"] = row["adapt_latency_s"] / dt["adapt_latency_s"]
        if full:
            row["latency_vs_ft_full"] = row["adapt_latency_s"] / full["adapt_latency_s"]
            if row.get("peak_memory_bytes") is not None and full.get("peak_memory_bytes"):
                row["memory_vs_ft_full"] = row["peak_memory_bytes"] / full["peak_memory_bytes"]


def add_paired_gains(summary: dict[str, dict], accuracies: dict[str, list[float]]) -> None:
    """Paired gains over ``dt`` and shares of the best fine-tuning variant's gain (in place).

    Every method runs on a prefix of the same seeded episode sequence (``dt`` on all of it), so each row
    gets ``gain_vs_dt`` / ``gain_vs_dt_ci95``: the mean over its episodes of (its accuracy - dt's) with the
    95% CI of that mean. The best fine-tuning variant is the ``ft-*`` row with the largest paired gain;
    every other row that ran on (at least) that variant's episodes gets ``share_of_best_ft``: its own paired
    gain on exactly those episodes divided by the variant's (None when the variant does not beat dt).

    Args:
        summary: ``method -> row`` of one dataset.
        accuracies: ``method -> [n_method]`` accuracies in percent, episode i of every method the same task.
    """
    if "dt" not in accuracies:
        return
    dt = accuracies["dt"]
    for name, values in accuracies.items():
        if name != "dt":
            mean, half = paired_difference(values, dt[: len(values)])
            summary[name].update(gain_vs_dt=mean, gain_vs_dt_ci95=half)
    fine_tuned = [name for name in accuracies if name.startswith("ft-")]
    if not fine_tuned:
        return
    best = max(fine_tuned, key=lambda name: summary[name]["gain_vs_dt"])
    count = len(accuracies[best])
    reference_gain = summary[best]["gain_vs_dt"]
    for name, values in accuracies.items():
        if name == "dt" or len(values) < count:
            continue
        gain = paired_difference(values[:count], dt[:count])[0]
        share = gain / reference_gain if reference_gain > 1e-9 else None
        summary[name].update(best_ft=best, best_ft_episodes=count, share_of_best_ft=share)
