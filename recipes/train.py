"""Meta-train a HyperFlow drift network with Accelerate.

    accelerate launch recipes/train.py --config recipes/configs/smoke.yaml [--key value ...] [--resume]

Any config value can be overridden with a dotted key: ``--training.max_steps 200``, ``--losses.flow 0.5``,
``--datasets.0.source data/glyphs``, ``--flow.trajectories "[runs/traj]"`` (values are read as YAML).

Two real processes on a CPU machine (gloo):

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \\
        --dynamo_backend no --main_process_port 29531 recipes/train.py --config FILE --cpu

(``accelerate launch --cpu --num_processes 2`` starts only one process.) GPUs, several machines, FSDP /
DeepSpeed: see recipes/configs/README.md.

The run folder (``output_dir``) gets: training_config.{yaml,json}, checkpoints/step_NNNNNNN (accelerate
``save_state``; ``--resume`` continues from the latest), best/ and final/ (HyperFlowAdapter folders with the
training config and metrics), metrics.json, and with a random backbone, backbone/.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, type=Path, help="the YAML config of the run")
    parser.add_argument("--resume", nargs="?", const=True, default=False,
                        help="continue from the latest checkpoint of output_dir, or from the checkpoint folder given")
    parser.add_argument("--max-steps-this-run", type=int, default=None,
                        help="stop after this many optimizer steps (with a checkpoint); --resume continues")
    parser.add_argument("--cpu", action="store_true", help="run on CPU even where an accelerator exists")
    parser.add_argument("--print-config", action="store_true", help="print the validated config as JSON and exit")
    args, overrides = parser.parse_known_args(argv)
    if args.max_steps_this_run is not None and args.max_steps_this_run < 1:
        parser.error("--max-steps-this-run must be a positive integer")
    return args, overrides


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    from hf_hyperflow.training import load_config, train
    from recipes.data import BUILDERS

    try:
        config = load_config(args.config, overrides, data_builders=BUILDERS)
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=1))
        return 0
    result = train(config, resume=args.resume, max_steps_this_run=args.max_steps_this_run,
                   cpu=True if args.cpu else None, data_builders=BUILDERS)
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
