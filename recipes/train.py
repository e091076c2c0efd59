"""Meta-train a HyperFlow drift network with Accelerate.

    accelerate launch recipes/train.py --config recipes/configs/smoke.yaml [--section.key value ...] [--resume true]

The config is read by draccus: any value can be overridden with its dotted key (values are read as YAML):
``--training.max_steps 200``, ``--losses.flow 0.5``, ``--flow.trajectories "[runs/traj]"``; a list section is
overridden whole: ``--datasets "[{source: data/glyphs, builder: glyphs}]"``. ``--help`` lists every key.

Two real processes on a CPU machine (gloo):

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \\
        --dynamo_backend no --main_process_port 29531 recipes/train.py --config FILE --cpu true

(``accelerate launch --cpu --num_processes 2`` starts only one process.) GPUs, several machines, FSDP /
DeepSpeed: see recipes/configs/README.md.

The run folder (``output_dir``) gets: training_config.{yaml,json}, checkpoints/step_NNNNNNN (accelerate
``save_state``; ``--resume true`` continues from the latest), best/ and final/ (HyperFlowAdapter folders with the
training config and metrics), metrics.json, and with a random backbone, backbone/.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_hyperflow.checks import check_int  # noqa: E402
from hf_hyperflow.parsing import option  # noqa: E402
from hf_hyperflow.training import TrainConfig, load_config, train  # noqa: E402


@dataclass
class TrainCommand(TrainConfig):
    """A meta-training config and how this call runs it."""

    resume: bool | str = option("true: continue from the latest checkpoint of output_dir (start afresh when there "
                                "is none); a folder: from that checkpoint.", False)
    max_steps_this_run: int | None = option("Stop after this many optimizer steps (with a checkpoint); --resume "
                                            "true continues.")
    cpu: bool = option("Run on CPU even where an accelerator exists.", False)
    print_config: bool = option("Print the validated config as JSON and exit.", False)

    def validate(self, data_builders=None) -> None:
        super().validate(data_builders)
        if self.max_steps_this_run is not None:
            check_int(self.max_steps_this_run, "max_steps_this_run", 1)


def parse_command(argv: list[str]) -> TrainCommand:
    """The command of ``argv``: ``--config FILE`` (the YAML config) and overrides of any of its keys.

    Raises:
        ValueError / TypeError / FileNotFoundError: a missing config file, an unknown key, a bad value.
    """
    tokens = list(argv)
    for i, token in enumerate(tokens):
        if token == "--config" and i + 1 < len(tokens):
            return load_config(tokens[i + 1], tokens[:i] + tokens[i + 2:], config_class=TrainCommand)
        if token.startswith("--config="):
            return load_config(token.partition("=")[2], tokens[:i] + tokens[i + 1:], config_class=TrainCommand)
    raise ValueError("Give the run's YAML config: --config FILE (see recipes/configs/).")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        import draccus

        draccus.parse(TrainCommand, args=["--help"])
    try:
        command = parse_command(argv)
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if command.print_config:
        print(json.dumps(command.to_dict(), indent=1))
        return 0
    result = train(command, resume=command.resume, max_steps_this_run=command.max_steps_this_run,
                   cpu=True if command.cpu else None)
    if result.metrics.get("drift_fingerprints") and len(set(result.metrics["drift_fingerprints"])) > 1:
        print(f"error: the drift networks of the processes differ: {result.metrics['drift_fingerprints']}",
              file=sys.stderr)
        return 1
    summary = {"output_dir": str(result.output_dir), "step": result.step, "best_step": result.best_step,
               "best_accuracy": result.best_accuracy,
               "direct_transfer": (result.metrics.get("direct_transfer") or {}).get("accuracy"),
               "train_seconds": round(result.metrics["train_seconds"], 1)}
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
