"""Episodic evaluation of direct transfer, gradient fine-tuning and HyperFlow on the same seeded episodes.

    python recipes/evaluate.py --backbone PATH_OR_ID --adapter PATH_OR_ID --datasets "[PATH_OR_ID, NAME=PATH]"
        --episodes 600 --protocol md|fixed --ways N --shots K --queries Q --methods "[dt, ft-shift, hyperflow]"
        [--episodes_per_method "{ft-full: 100}"] [--steps_sweep "[1, 2, 4, 8]"] --output DIR
    python recipes/evaluate.py --config_path evaluation.yaml [--key value ...]

The same as ``hf-hyperflow evaluate`` (hf_hyperflow.commands.evaluate). A dataset is a Hub id, a
``load_from_disk`` folder, a parquet file or an image folder, optionally named ``name=path``; its test classes
are used (``--split``), its validation classes choose the fine-tuning lr. Writes results.json, results.md and
PNG plots to ``--output``. ``--help`` lists every option.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_hyperflow.commands.evaluate import EvaluateConfig, domains, load_adapter, run_evaluate  # noqa: E402,F401
from hf_hyperflow.parsing import parse  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        config = parse(EvaluateConfig, argv, prog="recipes/evaluate.py")
    except (ValueError, TypeError) as error:
        raise SystemExit(f"error: {error}") from None
    try:
        results, paths = run_evaluate(config, "python recipes/evaluate.py " + " ".join(shlex.quote(a) for a in argv))
    except FileNotFoundError as error:  # a backbone or adapter path that is not there
        raise SystemExit(f"error: {error}") from None
    print(paths["markdown"].read_text())
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return results


if __name__ == "__main__":
    main()
