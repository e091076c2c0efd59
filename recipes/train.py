"""Meta-train a HyperFlow drift network with Accelerate.

    accelerate launch recipes/train.py --config recipes/configs/smoke.yaml [--section.key value ...] [--resume true]

The same as ``hf-hyperflow train`` (hf_hyperflow.commands.train), launchable on several processes. The config is
read by draccus: any value can be overridden with its dotted key (values are read as YAML):
``--training.max_steps 200``, ``--losses.flow 0.5``, ``--flow.trajectories "[runs/traj]"``; a list section is
overridden whole: ``--datasets "[{source: data/glyphs, builder: glyphs}]"``. ``--help`` lists every key.

Two real processes on a CPU machine (gloo):

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \\
        --dynamo_backend no --main_process_port 29531 recipes/train.py --config FILE --cpu true

(``accelerate launch --cpu --num_processes 2`` starts only one process.) GPUs, several machines, FSDP /
DeepSpeed: see recipes/configs/README.md.

The run folder (``output_dir``) gets: training_config.{yaml,json}, checkpoints/step_NNNNNNN (safetensors +
JSON; ``--resume true`` continues from the latest, bit for bit), best/ and final/ (HyperFlowAdapter folders with the
training config and metrics; final/ is written last), metrics.json, and with a random backbone, backbone/. A folder
holding an earlier run is refused unless ``--resume true`` or ``--overwrite true``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_hyperflow.commands.train import (  # noqa: E402,F401
    DriftMismatchError,
    TrainCommand,
    parse_train_command,
    print_train_help,
    run_train,
)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print_train_help("recipes/train.py")
    try:
        command = parse_train_command(argv)
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if command.print_config:
        print(json.dumps(command.to_dict(), indent=1))
        return 0
    try:
        summary = run_train(command)
    except DriftMismatchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
