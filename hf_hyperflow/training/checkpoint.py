"""Checkpoints of a meta-training run and the files it writes; nothing is pickled.

A checkpoint folder ``checkpoints/step_NNNNNNN`` holds the drift network (``drift.safetensors``), AdamW's state
(``optimizer.safetensors``: its tensors; ``optimizer.json``: its parameter groups), the learning-rate schedule
(``scheduler.json``), each process's random number generators (``rng_<rank>.safetensors`` with ``rng_<rank>.json``:
Python's, NumPy's, torch's CPU and CUDA generators) and ``trainer_state.json`` (step, best validation, history),
written to a temporary folder and renamed: it exists whole or not at all. Resuming from one continues the run
exactly as if it had not stopped.

``best/`` and ``final/`` are HyperFlowAdapter folders (safetensors + JSON) with the training config and metrics
beside them, written to a temporary folder and swapped in: the previous folder stays whole until the new one is.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..domain_reference import DOMAIN_REFERENCE_FILE
from ..fingerprint import tensors_fingerprint
from ..io import load_safetensors_checked, read_json_checked, save_safetensors

__all__ = ["CHECKPOINT_DIR", "TRAINER_STATE", "FINISHED_RUN_FILES", "list_checkpoints", "save_checkpoint",
           "load_checkpoint", "resume_checkpoint", "recover_swapped_folders", "clear_run", "write_json", "save_adapter",
           "drift_fingerprint"]

CHECKPOINT_DIR = "checkpoints"
TRAINER_STATE = "trainer_state.json"
MAIN_JSON_FILES = (TRAINER_STATE, "scheduler.json", "accelerator.json")  # copies kept in drift.safetensors
# What a run that got somewhere leaves in its output_dir: a fresh run there needs overwrite=True.
FINISHED_RUN_FILES = ("final", "best", "metrics.json")


def list_checkpoints(output_dir: Path) -> list[Path]:
    """The complete checkpoints of a run folder, oldest first."""
    folder = output_dir / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def resume_checkpoint(output_dir: Path, resume: bool | str | os.PathLike, overwrite: bool = False) -> Path | None:
    """The checkpoint to start from: the latest with ``resume=True`` (None when there is none), the folder
    given, or None for a fresh run.

    Raises:
        ValueError: ``resume`` names a folder that is not a checkpoint, or a fresh run would write into a folder
            that holds an earlier run (its checkpoints, or its best/, final/ or metrics.json) without ``overwrite``.
    """
    recover_swapped_folders(output_dir)
    checkpoint = None
    if resume:
        checkpoint = Path(resume) if not isinstance(resume, bool) else (list_checkpoints(output_dir) or [None])[-1]
        if checkpoint is not None and not (checkpoint / TRAINER_STATE).is_file():
            raise ValueError(f"resume: {checkpoint} is not a checkpoint of this trainer (no {TRAINER_STATE}).")
    if checkpoint is not None or overwrite:
        return checkpoint
    if list_checkpoints(output_dir):
        raise ValueError(f"output_dir={str(output_dir)!r} holds checkpoints of an earlier run: pass resume=True "
                         f"(recipes/train.py: --resume true) to continue it, overwrite=True (--overwrite true) to start "
                         f"again there, or choose another output_dir.")
    # resuming a run stopped before its first checkpoint starts it again; a finished run is never started again
    earlier = [name for name in (("final",) if resume else FINISHED_RUN_FILES) if (output_dir / name).exists()]
    if earlier:
        raise ValueError(f"output_dir={str(output_dir)!r} holds an earlier run ({', '.join(earlier)}) and no checkpoint "
                         f"to resume from: pass overwrite=True (recipes/train.py: --overwrite true) to replace it, or "
                         f"choose another output_dir.")
    return None


def save_checkpoint(accelerator, output_dir: Path, step: int, trainer_state: dict, keep: int, *, drift: nn.Module,
                    optimizer, scheduler) -> Path:
    """The checkpoint of step ``step`` (see the module's doc) into a temporary folder, then renamed; the ``keep``
    latest are kept."""
    final = output_dir / CHECKPOINT_DIR / f"step_{step:07d}"
    temporary = output_dir / CHECKPOINT_DIR / f".tmp-step_{step:07d}"
    if accelerator.is_main_process:
        if temporary.exists():
            shutil.rmtree(temporary)
        temporary.mkdir(parents=True)
    accelerator.wait_for_everyone()
    _save_rng_states(temporary, accelerator.process_index)
    if accelerator.is_main_process:
        # the JSON files first: each safetensors file keeps a copy of the JSON files beside it, compared on load
        write_json(temporary / "scheduler.json", scheduler.state_dict())
        scaler = getattr(accelerator, "scaler", None)
        write_json(temporary / "accelerator.json", {"step": accelerator.step, "processes": accelerator.num_processes,
                                                    "scaler": scaler.state_dict() if scaler is not None else None})
        write_json(temporary / TRAINER_STATE, trainer_state)
        _save_optimizer(optimizer.state_dict(), temporary)
        save_safetensors(drift.state_dict(), temporary / "drift.safetensors",
                         sidecars={temporary / name: () for name in MAIN_JSON_FILES})
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, checkpoint: Path, *, drift: nn.Module, optimizer, scheduler) -> dict:
    """Restore what :func:`save_checkpoint` saved; returns the trainer state.

    Raises:
        ValueError: a damaged or incomplete checkpoint (the file named), or one saved by another number of
            processes.
    """
    if not (checkpoint / "drift.safetensors").is_file() and (checkpoint / "model.safetensors").is_file():
        warnings.warn(f"{checkpoint} was written by an earlier version (Accelerate's save_state, with pickled random "
                      "states): loaded with Accelerate; the next checkpoints are written without pickles.",
                      stacklevel=3)
        accelerator.register_for_checkpointing(scheduler)
        accelerator.load_state(str(checkpoint))
        return read_json_checked(checkpoint / TRAINER_STATE)
    # every file checked (checksums, and the JSON files against the copies kept with the tensors) before any is used
    tensors = load_safetensors_checked(checkpoint / "drift.safetensors",
                                       sidecars=[checkpoint / name for name in MAIN_JSON_FILES])
    state = read_json_checked(checkpoint / TRAINER_STATE)
    saved = read_json_checked(checkpoint / "accelerator.json")
    if saved.get("processes") != accelerator.num_processes:
        raise ValueError(f"{checkpoint} was saved by {saved.get('processes')} processes and this run has "
                         f"{accelerator.num_processes}: each process's episodes and random states belong to its rank. "
                         "Resume with the same number of processes.")
    optimizer_state = _load_optimizer(checkpoint)
    rng = _read_rng_states(checkpoint, accelerator.process_index)
    with _restoring(checkpoint / "drift.safetensors"):
        missing, unexpected = drift.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise ValueError(f"{checkpoint / 'drift.safetensors'} does not fit this run's drift network (missing "
                             f"{missing[:3]}, unexpected {unexpected[:3]}): it was saved with another adapter config.")
    with _restoring(checkpoint / "optimizer.safetensors"):
        optimizer.load_state_dict(optimizer_state)
    with _restoring(checkpoint / "scheduler.json"):
        scheduler.load_state_dict(read_json_checked(checkpoint / "scheduler.json"))
    with _restoring(checkpoint / "accelerator.json"):
        accelerator.step = int(saved["step"])
        scaler = getattr(accelerator, "scaler", None)
        if scaler is not None and saved.get("scaler") is not None:
            scaler.load_state_dict(saved["scaler"])
    with _restoring(checkpoint / f"rng_{accelerator.process_index}.json"):
        _set_rng_states(*rng)
    return state


@contextlib.contextmanager
def _restoring(path: Path):
    """Errors of a file that passed its checks but does not fit this run (another version, another config), named."""
    try:
        yield
    except (KeyError, TypeError, IndexError, RuntimeError) as error:
        raise ValueError(f"{path} cannot be restored ({type(error).__name__}: {error}): it was written by another "
                         "version or for another config. Resume from another checkpoint (resume=<its folder>) or "
                         "start again (overwrite=True).") from None


def _save_optimizer(state_dict: dict, folder: Path) -> None:
    """``optimizer.safetensors`` (every tensor of the per-parameter state, ``<index>.<name>``) and
    ``optimizer.json`` (the parameter groups and the state's other values)."""
    tensors, values = {}, {}
    for index, entries in state_dict["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value
            else:
                values[f"{index}.{name}"] = value
    write_json(folder / "optimizer.json", {"param_groups": state_dict["param_groups"], "values": values})
    save_safetensors(tensors, folder / "optimizer.safetensors", sidecars={folder / "optimizer.json": ()})


def _load_optimizer(folder: Path) -> dict:
    tensors = load_safetensors_checked(folder / "optimizer.safetensors", sidecars=[folder / "optimizer.json"])
    saved = read_json_checked(folder / "optimizer.json")
    with _restoring(folder / "optimizer.json"):
        state: dict[int, dict] = {}
        for key, value in [*tensors.items(), *saved["values"].items()]:
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
        groups = [{**group, "betas": tuple(group["betas"])} if "betas" in group else group
                  for group in saved["param_groups"]]
        return {"state": state, "param_groups": groups}


def _save_rng_states(folder: Path, rank: int) -> None:
    """This process's random number generators: Python's and NumPy's (JSON and tensors), torch's CPU and CUDA."""
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64))}
    if torch.cuda.is_available():
        for device, value in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{device}"] = value
    write_json(folder / f"rng_{rank}.json", {"python": [version, list(internal), gauss],
                                              "numpy": [kind, int(position), int(has_gauss), float(cached)]})
    save_safetensors(tensors, folder / f"rng_{rank}.safetensors", sidecars={folder / f"rng_{rank}.json": ()})


def _read_rng_states(folder: Path, rank: int) -> tuple[dict, dict]:
    tensors = load_safetensors_checked(folder / f"rng_{rank}.safetensors", sidecars=[folder / f"rng_{rank}.json"])
    return tensors, read_json_checked(folder / f"rng_{rank}.json")


def _set_rng_states(tensors: dict, saved: dict) -> None:
    version, internal, gauss = saved["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, position, has_gauss, cached = saved["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{d}"] for d in range(len(tensors)) if f"cuda.{d}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` as JSON through a temporary file, so that a reader never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(temporary, path)


def save_adapter(adapter, folder: Path, training_config: dict, metrics: dict, domain_reference=None) -> None:
    """A HyperFlowAdapter folder with ``training_config.json`` and ``metrics.json`` (and ``domain_reference``'s
    file, when given), written beside ``folder`` and swapped in: until the new folder is whole the old one stays (a
    process killed between the two renames leaves it as ``.old-<name>``, which :func:`recover_swapped_folders` puts
    back)."""
    temporary, old = folder.with_name(f".tmp-{folder.name}"), folder.with_name(f".old-{folder.name}")
    if temporary.exists():
        shutil.rmtree(temporary)
    adapter.save_pretrained(temporary)
    if domain_reference is not None:
        domain_reference.save(temporary / DOMAIN_REFERENCE_FILE)
    write_json(temporary / "training_config.json", training_config)
    write_json(temporary / "metrics.json", metrics)
    if folder.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(folder, old)
    os.replace(temporary, folder)
    if old.exists():
        shutil.rmtree(old)


def clear_run(output_dir: Path) -> None:
    """Remove what an earlier run wrote in ``output_dir`` (checkpoints, best/, final/, metrics, episode logs), as a
    fresh run with ``overwrite=True`` does; datasets, trajectories and a backbone folder stay."""
    for name in (CHECKPOINT_DIR, "episodes", *FINISHED_RUN_FILES):
        path = output_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def recover_swapped_folders(output_dir: Path) -> None:
    """Undo a swap of :func:`save_adapter` that a killed process left half done: ``.old-best`` back to ``best``
    when ``best`` is missing; leftover temporary folders removed."""
    for name in ("best", "final"):
        folder, old = output_dir / name, output_dir / f".old-{name}"
        if old.is_dir() and not folder.exists():
            os.replace(old, folder)
        for leftover in (old, output_dir / f".tmp-{name}"):
            if leftover.exists():
                shutil.rmtree(leftover)


def drift_fingerprint(drift: nn.Module) -> str:
    """sha256 (first 16 hex digits) of the drift network's parameters and buffers, in name order."""
    return tensors_fingerprint(drift.state_dict())
