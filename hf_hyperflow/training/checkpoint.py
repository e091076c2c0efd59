"""Checkpoints of a meta-training run and the files it writes.

A checkpoint is ``accelerator.save_state`` (drift network as safetensors; optimizer, schedule and random
states in Accelerate's own format) plus ``trainer_state.json`` (step, best validation, history), written to a
temporary folder and renamed: it exists whole or not at all. ``best/`` and ``final/`` are HyperFlowAdapter
folders (safetensors + JSON) with the training config and metrics beside them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from torch import nn

from ..fingerprint import tensors_fingerprint

__all__ = ["CHECKPOINT_DIR", "TRAINER_STATE", "list_checkpoints", "save_checkpoint", "resume_checkpoint",
           "write_json", "save_adapter", "drift_fingerprint"]

CHECKPOINT_DIR = "checkpoints"
TRAINER_STATE = "trainer_state.json"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """The complete checkpoints of a run folder, oldest first."""
    folder = output_dir / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def resume_checkpoint(output_dir: Path, resume: bool | str | os.PathLike) -> Path | None:
    """The checkpoint to start from: the latest with ``resume=True`` (None when there is none), the folder
    given, or None for a fresh run.

    Raises:
        ValueError: ``resume`` names a folder that is not a checkpoint, or a fresh run would write into a
            folder that holds an earlier run's checkpoints.
    """
    if not resume:
        if list_checkpoints(output_dir):
            raise ValueError(f"output_dir={str(output_dir)!r} holds checkpoints of an earlier run: pass resume=True "
                             f"(recipes/train.py: --resume true) to continue it, or choose another output_dir.")
        return None
    checkpoint = Path(resume) if not isinstance(resume, bool) else (list_checkpoints(output_dir) or [None])[-1]
    if checkpoint is not None and not (checkpoint / TRAINER_STATE).is_file():
        raise ValueError(f"resume: {checkpoint} is not a checkpoint of this trainer (no {TRAINER_STATE}).")
    return checkpoint


def save_checkpoint(accelerator, output_dir: Path, step: int, trainer_state: dict, keep: int) -> Path:
    """``accelerator.save_state`` into a temporary folder, then renamed; the ``keep`` latest are kept."""
    final = output_dir / CHECKPOINT_DIR / f"step_{step:07d}"
    temporary = output_dir / CHECKPOINT_DIR / f".tmp-step_{step:07d}"
    if accelerator.is_main_process and temporary.exists():
        shutil.rmtree(temporary)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (temporary / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` as JSON through a temporary file, so that a reader never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(temporary, path)


def save_adapter(adapter, folder: Path, training_config: dict, metrics: dict) -> None:
    """A HyperFlowAdapter folder (replacing ``folder``) with ``training_config.json`` and ``metrics.json``."""
    if folder.exists():
        shutil.rmtree(folder)
    adapter.save_pretrained(folder)
    write_json(folder / "training_config.json", training_config)
    write_json(folder / "metrics.json", metrics)


def drift_fingerprint(drift: nn.Module) -> str:
    """sha256 (first 16 hex digits) of the drift network's parameters and buffers, in name order."""
    return tensors_fingerprint(drift.state_dict())
