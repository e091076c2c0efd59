"""Fit the domain reference of a trained adapter (the support statistics of its training sources' episodes) and
save it into the adapter's folder, so that tasks far from every training source keep direct transfer.

    python recipes/domain_reference.py --config recipes/configs/efficientnet_lite0_multidomain.yaml \
        --adapter adapters/efficientnet_lite0 [--episodes 300] [--seed 1] [--gate 2.2]

See hf_hyperflow.commands.domain_reference; ``--help`` lists every option.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_hyperflow.commands.domain_reference import DomainReferenceConfig, describe, run_domain_reference  # noqa: E402
from hf_hyperflow.parsing import parse  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    try:
        settings = parse(DomainReferenceConfig, sys.argv[1:] if argv is None else argv,
                         prog="recipes/domain_reference.py")
    except (ValueError, TypeError) as error:
        raise SystemExit(f"error: {error}") from None
    print(describe(run_domain_reference(settings), settings.adapter))
    return 0


if __name__ == "__main__":
    sys.exit(main())
