"""Rewrite evaluation results.json files in the compact form that hf_hyperflow.results writes; numbers unchanged.

    python benchmarks/compact_results.py benchmarks/results/results.json benchmarks/fewer_steps/*/results.json

The compact form stores each domain's episode rows once (every method runs on a prefix of the same seeded
episode sequence; files written before stored them once per method) and writes arrays of numbers on one line.
Every number is checked to be the same after the rewrite.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_hyperflow.results import compact_rows, load_results, results_json  # noqa: E402


def compact(results: dict) -> dict:
    """The same results with each domain's episode rows stored once."""
    details = {domain: {**detail, "episode_rows": compact_rows(detail["episode_rows"])}
               for domain, detail in results.get("details", {}).items()}
    return {**results, "details": details} if details else dict(results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="results.json files, rewritten in place")
    args = parser.parse_args(argv)
    for path in args.files:
        before = load_results(path)
        after = compact(before)
        text = results_json(after)
        again = json.loads(text)
        if again != json.loads(json.dumps(after)):
            raise ValueError(f"{path}: the compact JSON does not read back as the same results.")
        for domain, detail in before.get("details", {}).items():
            rows = again["details"][domain]["episode_rows"]
            by_method = detail["episode_rows"] if isinstance(detail["episode_rows"], dict) else {"all": rows}
            for method, method_rows in by_method.items():
                if json.loads(json.dumps(method_rows)) != rows[: len(method_rows)]:
                    raise ValueError(f"{path}: {domain}/{method}: episode rows changed in the rewrite.")
        if {k: v for k, v in again.items() if k != "details"} != {k: v for k, v in before.items() if k != "details"}:
            raise ValueError(f"{path}: a number changed in the rewrite.")
        size = path.stat().st_size
        path.write_text(text)
        print(f"{path}: {size / 2**20:.1f} MB -> {path.stat().st_size / 2**20:.1f} MB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
