"""The ``hf-hyperflow`` command.

    hf-hyperflow adapt --backbone DIR_OR_ID --adapter DIR_OR_ID --support FOLDER --output TASK_DIR
    hf-hyperflow predict --task TASK_DIR IMAGE_OR_FOLDER... [--csv predictions.csv]
    hf-hyperflow train --config FILE [--section.key VALUE ...]
    hf-hyperflow evaluate --backbone DIR_OR_ID --adapter DIR_OR_ID --datasets "[PATH, ...]" --output DIR [...]
    hf-hyperflow push --folder DIR --repo_id NAMESPACE/NAME [...]
    hf-hyperflow domain-reference --config TRAINING_CONFIG --adapter DIR [--gate DISTANCE] [...]
    hf-hyperflow data build --name NAME --output DIR  |  hf-hyperflow data list

``FOLDER`` holds one subfolder of images per class (``FOLDER/cat/1.jpg``, ``FOLDER/dog/2.png``...). train,
evaluate, push and domain-reference take the options of recipes/train.py, recipes/evaluate.py, recipes/push.py and
recipes/domain_reference.py (values read as YAML; ``COMMAND --help`` lists them). Errors in what was given (a
folder that cannot be a task, a missing file, an unreadable image) print one line, ``hf-hyperflow: error: ...``, and
exit with status 1; a wrong command line (an unknown option or key, a bad value) exits with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import sys
import time
from pathlib import Path

__all__ = ["main", "build_parser"]

PROG = "hf-hyperflow"


def _local_or_hub(value: str) -> str:
    """An existing local path as an absolute path (recorded in what is saved), anything else as given."""
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else value


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def _add_adapt(commands) -> None:
    parser = commands.add_parser(
        "adapt", help="adapt to the classes of an image folder and save the task",
        description="Adapt a backbone to the classes of a support folder with a HyperFlow adapter (forward passes "
                    "only) and save the adapted task: a plain PEFT LoRA adapter plus its prototype head.")
    parser.add_argument("--backbone", required=True, type=_local_or_hub,
                        help="the backbone the adapter was made for: an AutoModel folder or Hub id")
    parser.add_argument("--adapter", required=True, type=_local_or_hub,
                        help="a HyperFlow adapter folder or Hub id")
    parser.add_argument("--revision", default=None, help="revision (branch, tag, commit) of a Hub adapter")
    parser.add_argument("--support", required=True, type=Path,
                        help="the support folder: one subfolder of images per class, at least two classes")
    parser.add_argument("--output", required=True, type=Path, help="the folder to save the adapted task in")
    parser.add_argument("--steps", type=_positive, default=None, help="integration steps (default: the adapter's)")
    parser.add_argument("--integrator", choices=["euler", "midpoint", "heun", "rk4"], default=None,
                        help="integrator (default: the adapter's)")
    parser.set_defaults(run=run_adapt)


def _add_predict(commands) -> None:
    parser = commands.add_parser(
        "predict", help="classify images with a saved task",
        description="Classify images with a task saved by 'hf-hyperflow adapt'. Writes CSV: image, label, score "
                    "(the label's probability), then one probability column per class.")
    parser.add_argument("--task", required=True, type=Path, help="a task folder written by 'hf-hyperflow adapt'")
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE",
                        help="image files, or folders (every file inside, sorted)")
    parser.add_argument("--csv", type=Path, default=None, help="write the predictions here (default: standard output)")
    parser.add_argument("--backbone", type=_local_or_hub, default=None,
                        help="the backbone folder or Hub id (default: the one the task records)")
    parser.add_argument("--batch-size", type=_positive, default=32, help="images per forward pass (default 32)")
    parser.set_defaults(run=run_predict)


def _add_data(commands) -> None:
    parser = commands.add_parser("data", help="build the benchmark datasets",
                                 description="The few-shot benchmark datasets, built from packages (benchmarks/DATA.md).")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    build = actions.add_parser("build", help="build one dataset, or all of them",
                               description="Build a dataset as a save_to_disk folder with its dataset card.")
    build.add_argument("--name", required=True, help="the dataset to build ('hf-hyperflow data list'), or 'all'")
    build.add_argument("--output", required=True, type=Path,
                       help="the dataset folder (with --name all: the parent folder of one folder per dataset)")
    build.add_argument("--cache-dir", type=Path, default=None, help="where fetched source packages are kept")
    build.add_argument("--max-classes", type=_positive, default=None, help="build a slice with at most this many classes")
    build.add_argument("--seed", type=int, default=0, help="seed of the class sampling and distortions (default 0)")
    build.set_defaults(run=run_data_build)
    listing = actions.add_parser("list", help="list the datasets that can be built",
                                 description="List the datasets that can be built and whether their sources are here.")
    listing.add_argument("--cache-dir", type=Path, default=None, help="where fetched source packages are kept")
    listing.set_defaults(run=run_data_list)


CONFIG_COMMANDS = {
    "train": ("meta-train a drift network from a YAML config",
              "Meta-train a HyperFlow drift network (one process; several: accelerate launch [...] -m "
              "hf_hyperflow.cli train --config FILE)."),
    "evaluate": ("evaluate methods on seeded few-shot episodes",
                 "Evaluate direct transfer, fine-tuning and HyperFlow on the same seeded episodes."),
    "push": ("push an adapter or task folder to the Hub with its model card",
             "Render the model card of a saved adapter or task folder and push the folder to the Hub."),
    "domain-reference": ("fit the domain gate's reference of a trained adapter into its folder",
                         "Fit the domain reference of a trained adapter (support statistics of its training "
                         "sources' episodes) into its folder; --gate sets its domain_gate too."),
}


def _add_config_commands(commands) -> None:
    """train / evaluate / push / domain-reference: their options are the fields of a draccus config
    (hf_hyperflow.commands), parsed by :func:`run_config_command`, not by argparse."""
    for name, (short, description) in CONFIG_COMMANDS.items():
        parser = commands.add_parser(name, help=short, description=description, add_help=False)
        parser.set_defaults(run=None, config_command=name)


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import PackageNotFoundError, version

    try:
        __version__ = version("hf-hyperflow")
    except PackageNotFoundError:
        __version__ = "unknown"
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_adapt(commands)
    _add_predict(commands)
    _add_config_commands(commands)
    _add_data(commands)
    return parser


def run_adapt(args: argparse.Namespace) -> None:
    """Load backbone and adapter, read the support folder, adapt, save the task, print one summary line."""
    from transformers import AutoModel

    from . import HyperFlowAdapter
    from .folders import load_support_folder

    images, labels = load_support_folder(args.support, progress=True)  # bad folders fail before any loading
    backbone = AutoModel.from_pretrained(args.backbone).eval()
    adapter = HyperFlowAdapter.from_pretrained(backbone, args.adapter, revision=args.revision)
    start = time.perf_counter()
    task = adapter.adapt(images, labels, steps=args.steps, integrator=args.integrator)
    seconds = time.perf_counter() - start
    task.save_pretrained(args.output)
    print(f"Adapted to {len(task.classes)} classes ({', '.join(map(str, task.classes))}) from {len(images)} images "
          f"in {seconds:.2f} s; task saved to {args.output}")


def _task_backbone(task_dir: Path, given: str | None) -> str:
    """The backbone to load a task onto: ``given``, else the one the task's ``hyperflow_task.json`` records."""
    from .io import read_json_checked

    meta = read_json_checked(task_dir / "hyperflow_task.json")
    if given is not None:
        return given
    from .hub import is_hub_id

    recorded = meta.get("base_model") or ""
    if not Path(recorded).expanduser().exists() and not is_hub_id(recorded):
        raise FileNotFoundError(f"{task_dir} records the backbone {recorded!r}, which is neither a folder here "
                                f"nor a Hub id: pass --backbone FOLDER_OR_HUB_ID.")
    return recorded


def run_predict(args: argparse.Namespace) -> None:
    """Load the task onto its backbone, classify the images batch by batch, write CSV rows."""
    from tqdm.auto import tqdm
    from transformers import AutoModel

    from . import AdaptedTask
    from .folders import image_files, load_image_files

    if not args.task.is_dir():
        raise FileNotFoundError(f"{args.task} is not a folder: give a task folder written by '{PROG} adapt'.")
    files = image_files(args.images)
    backbone = AutoModel.from_pretrained(_task_backbone(args.task, args.backbone)).eval()
    task = AdaptedTask.from_pretrained(backbone, args.task)
    handle = args.csv.open("w", newline="") if args.csv else sys.stdout
    try:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["image", "label", "score", *task.classes])
        with tqdm(total=len(files), desc="predict", unit="image", disable=None) as bar:
            for start in range(0, len(files), args.batch_size):
                batch = files[start:start + args.batch_size]
                probabilities = task.predict_proba(load_image_files(batch))
                best = probabilities.argmax(-1).tolist()
                for path, row, i in zip(batch, probabilities.tolist(), best, strict=True):
                    writer.writerow([str(path), task.classes[i], repr(row[i]), *map(repr, row)])
                bar.update(len(batch))
    finally:
        if args.csv:
            handle.close()
    if args.csv:
        print(f"Wrote {len(files)} predictions to {args.csv}")


@contextlib.contextmanager
def _library_bars(show: bool):
    """Within the block, the progress bars of datasets, transformers and huggingface_hub show only when ``show``
    (as tqdm's own do: on a terminal); their previous settings come back afterwards."""
    import datasets
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as transformers_logging

    switches = [(datasets.is_progress_bar_enabled(), datasets.disable_progress_bars, datasets.enable_progress_bars),
                (transformers_logging.is_progress_bar_enabled(), transformers_logging.disable_progress_bar,
                 transformers_logging.enable_progress_bar),
                (not hub_utils.are_progress_bars_disabled(), hub_utils.disable_progress_bars,
                 hub_utils.enable_progress_bars)]
    for enabled, disable, _ in switches:
        if enabled and not show:
            disable()
    try:
        yield
    finally:
        for enabled, _, enable in switches:
            if enabled and not show:
                enable()


def _builders(name: str) -> dict[str, object]:
    """``{dataset name: builder}`` for ``name`` (or every builder for ``"all"``)."""
    from .registry import data_builders

    builders = data_builders()
    if name == "all":
        return {key: builders[key] for key in sorted(builders)}
    if name not in builders:
        raise ValueError(f"No dataset named {name!r}; the builders are {sorted(builders)} (or 'all').")
    return {name: builders[name]}


def run_data_build(args: argparse.Namespace) -> None:
    """Build the dataset(s), one summary line each."""
    for name, builder in _builders(args.name).items():
        output = args.output / name if args.name == "all" else args.output
        start = time.perf_counter()
        dataset = builder.build(output, cache_dir=args.cache_dir, max_classes=args.max_classes, seed=args.seed)
        print(f"Built {name}: {dataset.features['label'].num_classes} classes, {len(dataset)} images in "
              f"{time.perf_counter() - start:.1f} s -> {output}", flush=True)


def run_data_list(args: argparse.Namespace) -> None:
    """One line per dataset: its name, and what its sources lack (if anything)."""
    for name, builder in _builders("all").items():
        missing = builder.sources_missing(args.cache_dir)
        print(f"{name}\t{'sources at hand' if missing is None else 'sources fetched when built: ' + missing}")


def _parse_config_command(name: str, options: list[str]):
    """The config of ``hf-hyperflow NAME OPTIONS`` (``--help`` prints its options and exits with status 0).

    Raises:
        ValueError / TypeError / FileNotFoundError: an unknown key, a bad value, a missing config file.
    """
    from .parsing import parse

    prog = f"{PROG} {name}"
    if name == "train":
        from .commands.train import parse_train_command, print_train_help

        if "--help" in options or "-h" in options:
            print_train_help(prog)
        return parse_train_command(options)
    if name == "evaluate":
        from .commands.evaluate import EvaluateConfig

        return parse(EvaluateConfig, options, prog=prog)
    if name == "domain-reference":
        from .commands.domain_reference import DomainReferenceConfig

        return parse(DomainReferenceConfig, options, prog=prog)
    from .commands.push import PushConfig

    return parse(PushConfig, options, prog=prog)


def _train(command) -> int:
    """Train, then print one summary line."""
    from .commands.train import DriftMismatchError, run_train

    try:
        summary = run_train(command)
    except DriftMismatchError as error:
        print(f"{PROG}: error: {_one_line(error)}", file=sys.stderr)
        return 1
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return 0
    best = "" if summary["best_step"] is None else (
        f"; best validation accuracy {summary['best_accuracy']:.4f} at step {summary['best_step']}")
    print(f"Trained to step {summary['step']} in {summary['train_seconds']} s{best}; adapters saved to "
          f"{summary['output_dir']}/best and {summary['output_dir']}/final", flush=True)
    return 0


def _evaluate(config, options: list[str]) -> int:
    """Evaluate, print the results table and the files written."""
    import shlex

    from .commands.evaluate import run_evaluate

    _, paths = run_evaluate(config, " ".join([PROG, "evaluate", *map(shlex.quote, options)]))
    print(paths["markdown"].read_text())
    print(f"Wrote {', '.join(path.name for path in paths.values())} to {config.output}")
    return 0


def _push(config) -> int:
    """Write the model card, then (unless --card_only) push the folder; one line each."""
    from .commands.push import run_push, write_card

    print(f"Wrote {write_card(config)}", flush=True)
    if config.card_only:
        return 0
    info = run_push(config)
    print(f"Pushed {config.folder} to {info.repo_url.repo_id if info.repo_url else config.repo_id}: commit "
          f"{info.oid} (load this version with revision={info.oid!r})")
    return 0


def _domain_reference(config) -> int:
    """Fit the reference into the adapter folder; one line."""
    from .commands.domain_reference import describe, run_domain_reference

    print(describe(run_domain_reference(config), config.adapter))
    return 0


def config_command(name: str, options: list[str]):
    """What ``hf-hyperflow train|evaluate|push|domain-reference OPTIONS`` will do (a callable returning the exit
    status), or the exit status of a wrong command line (2, usage and error printed) or of a finished one
    (``--print_config``)."""
    try:
        config = _parse_config_command(name, options)
    except (ValueError, TypeError, FileNotFoundError) as error:
        usage = "--config FILE [--section.key VALUE ...]" if name == "train" else "[--key VALUE ...]"
        print(f"usage: {PROG} {name} [--help] {usage}\n{PROG} {name}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    if name == "train" and config.print_config:
        import json

        print(json.dumps(config.to_dict(), indent=1))
        return 0
    if name == "evaluate":
        return lambda: _evaluate(config, options)
    return lambda: {"train": _train, "push": _push, "domain-reference": _domain_reference}[name](config)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 done, 1 an error in what was given, 2 a usage error,
    130 interrupted, 141 standard output closed early, as when killed by SIGPIPE)."""
    try:
        return _main(argv)
    except BrokenPipeError:  # the reader of standard output stopped (``| head``): end quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    name = getattr(args, "config_command", None)
    if name is None and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    work = config_command(name, rest) if name is not None else lambda: args.run(args)
    if isinstance(work, int):
        return work
    try:
        with _library_bars(sys.stderr.isatty()):
            return work() or 0
    except BrokenPipeError:
        raise
    except (ValueError, OSError, ImportError, LookupError) as error:
        print(f"{PROG}: error: {_one_line(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
