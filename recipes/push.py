"""Push a saved HyperFlow adapter (or an adapted task) folder to the Hugging Face Hub with its model card.

    python recipes/push.py --folder OUTPUT_DIR --repo_id REPO_ID [--private true] [--revision BRANCH]
        [--commit_message MSG] [--results results.json] [--eval_method METHOD] [--plot IMAGE]
        [--training_config FILE] [--datasets "[NAME, ...]"] [--base_model ID] [--tags "[TAG, ...]"]
        [--source_adapter ID] [--card_only true]

The same as ``hf-hyperflow push`` (hf_hyperflow.commands.push); ``--help`` lists every option. The card is
rendered into ``OUTPUT_DIR/README.md`` from the folder's config, then the folder is pushed as one commit; the
commit id is printed (pass it as ``revision=`` to load exactly this version). Needs a token: ``hf auth login`` or
HF_TOKEN.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_hyperflow.commands.push import PushConfig, run_push, safetensors_size, write_card  # noqa: E402,F401
from hf_hyperflow.parsing import parse  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    args = parse(PushConfig, sys.argv[1:] if argv is None else argv, prog="recipes/push.py")
    print(f"Wrote {write_card(args)}")
    if args.card_only:
        return 0
    info = run_push(args)
    print(f"Pushed {args.folder} to {info.repo_url.repo_id if info.repo_url else args.repo_id}: commit {info.oid}")
    print(f"Load this exact version with revision={info.oid!r}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
