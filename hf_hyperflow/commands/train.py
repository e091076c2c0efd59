"""Meta-training from a YAML config: :class:`TrainCommand` (the config and how this call runs it) and :func:`run_train`.

    hf-hyperflow train --config recipes/configs/smoke.yaml [--section.key value ...] [--resume true]
    accelerate launch [...] recipes/train.py --config FILE [...]      # the same options, several processes

The config is read by draccus: any value can be overridden with its dotted key (values are read as YAML):
``--training.max_steps 200``, ``--losses.flow 0.5``, ``--flow.trajectories "[runs/traj]"``; a list section is
overridden whole: ``--datasets "[{source: data/glyphs, builder: glyphs}]"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..checks import check_int
from ..parsing import option, print_help
from ..training.config import TrainConfig, load_config

__all__ = ["TrainCommand", "DriftMismatchError", "parse_train_command", "print_train_help", "run_train"]

CONFIG_FLAGS = ("--config", "--config_path")


class DriftMismatchError(RuntimeError):
    """The processes of a distributed run ended with different drift networks."""


@dataclass
class TrainCommand(TrainConfig):
    """A meta-training config and how this call runs it."""

    resume: bool | str = option("true: continue from the latest checkpoint of output_dir (start afresh when there "
                                "is none); a folder: from that checkpoint.", False)
    overwrite: bool = option("true: start afresh in an output_dir that holds an earlier run (its checkpoints, best/, "
                             "final/ and metrics are removed first); without it such a folder is refused.", False)
    max_steps_this_run: int | None = option("Stop after this many optimizer steps (with a checkpoint); --resume "
                                            "true continues.")
    cpu: bool = option("Run on CPU even where an accelerator exists.", False)
    print_config: bool = option("Print the validated config as JSON and exit.", False)

    def validate(self, data_builders=None) -> None:
        super().validate(data_builders)
        if self.max_steps_this_run is not None:
            check_int(self.max_steps_this_run, "max_steps_this_run", 1)


def parse_train_command(argv: Sequence[str]) -> TrainCommand:
    """The command of ``argv``: ``--config FILE`` (the YAML config; also ``--config_path``) and overrides of any of
    its keys.

    Raises:
        ValueError / TypeError / FileNotFoundError: a missing config file, an unknown key, a bad value.
    """
    tokens = list(argv)
    for i, token in enumerate(tokens):
        if token in CONFIG_FLAGS and i + 1 < len(tokens):
            return load_config(tokens[i + 1], tokens[:i] + tokens[i + 2:], config_class=TrainCommand)
        if token.startswith(tuple(f"{flag}=" for flag in CONFIG_FLAGS)):
            return load_config(token.partition("=")[2], tokens[:i] + tokens[i + 1:], config_class=TrainCommand)
    raise ValueError("Give the run's YAML config: --config FILE (see recipes/configs/).")


def print_train_help(prog: str) -> None:
    """Print every option of :class:`TrainCommand` (``--config FILE`` first) and exit with status 0."""
    print_help(TrainCommand, prog, usage=f"{prog} --config FILE [--section.key VALUE ...]",
               config_flag=("--config", "the run's YAML config, required (recipes/configs/); the keys below override it"))


def run_train(command: TrainCommand) -> dict:
    """Train; returns the run's summary (output_dir, step, best_step, best_accuracy, direct_transfer, train_seconds).

    Raises:
        DriftMismatchError: the processes ended with different drift networks.
    """
    from ..training.loop import train

    result = train(command, resume=command.resume, max_steps_this_run=command.max_steps_this_run,
                   cpu=True if command.cpu else None, overwrite=command.overwrite)
    fingerprints = result.metrics.get("drift_fingerprints")
    if fingerprints and len(set(fingerprints)) > 1:
        raise DriftMismatchError(f"the drift networks of the processes differ: {fingerprints}")
    return {"output_dir": str(result.output_dir), "step": result.step, "best_step": result.best_step,
            "best_accuracy": result.best_accuracy,
            "direct_transfer": (result.metrics.get("direct_transfer") or {}).get("accuracy"),
            "train_seconds": round(result.metrics["train_seconds"], 1)}
