"""Push a saved HyperFlow adapter (or an adapted task) folder to the Hugging Face Hub with its model card:
:class:`PushConfig` and :func:`run_push`.

    hf-hyperflow push --folder OUTPUT_DIR --repo_id REPO_ID [--private true] [--revision BRANCH]
        [--commit_message MSG] [--results results.json] [--eval_method METHOD] [--plot IMAGE]
        [--training_config FILE] [--datasets "[NAME, ...]"] [--base_model ID] [--tags "[TAG, ...]"]
        [--source_adapter ID] [--card_only true]

The folder is what ``HyperFlowAdapter.save_pretrained`` (``adapter_config.json`` with peft_type HYPERFLOW) or
``AdaptedTask.save_pretrained`` (``hyperflow_task.json`` + a LoRA ``adapter_config.json``) wrote. The card is
rendered into ``OUTPUT_DIR/README.md`` from the folder's config, then the folder is pushed as one commit. With
``--results``, the card carries the evaluation table and metadata, and an accuracy-vs-latency plot is drawn into
the folder unless ``--plot`` gives one. Needs a token: ``hf auth login`` or HF_TOKEN.
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..parsing import option

if TYPE_CHECKING:
    from ..cards import AdapterCardData, TaskCardData

__all__ = ["PushConfig", "run_push", "write_card", "safetensors_size", "build_adapter_card_data",
           "build_task_card_data"]

CONFIG_FILES = ("adapter_config.json", "config.json")
TASK_FILE = "hyperflow_task.json"
TRAINING_CONFIG_FILES = ("training_config.json", "training_config.yaml", "train_config.yaml")
PLOT_NAME = "accuracy_vs_latency.png"


def safetensors_size(paths: list[Path]) -> tuple[int, int]:
    """(parameter count, tensor bytes) of safetensors files, read from their headers only.

    The format starts with an 8-byte little-endian header length, then a JSON header mapping each tensor
    name to its dtype, shape and byte offsets.
    """
    parameters = size = 0
    for path in paths:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            try:
                header = json.loads(handle.read(length))
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise ValueError(f"{path} is not a safetensors file (unreadable header: {error}).") from error
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for dim in entry["shape"]:
                count *= dim
            parameters += count
            size += entry["data_offsets"][1] - entry["data_offsets"][0]
    return parameters, size


def _read_config(folder: Path) -> dict:
    from ..io import read_json_checked

    for name in CONFIG_FILES:
        if (folder / name).is_file():
            return read_json_checked(folder / name)
    raise FileNotFoundError(f"{folder} has none of {list(CONFIG_FILES)}: it is not a saved adapter or task folder.")


def _read_mapping(path: Path) -> dict:
    import yaml

    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path} should hold a mapping of training settings, got {type(data).__name__}.")
    return data


def _first(config: dict, *keys: str):
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    return None


def _base_model(config: dict, override: str | None, folder: Path) -> str:
    base_model = override or _first(config, "base_model_name_or_path", "backbone_name_or_path", "backbone")
    if not base_model:
        raise ValueError(f"The config in {folder} does not name the backbone (base_model_name_or_path is empty): "
                         "pass --base_model with its Hub id or name.")
    return str(base_model)


def build_adapter_card_data(folder: Path, repo_id: str, args: PushConfig) -> AdapterCardData:
    """The card data of an adapter folder, from its config, weights, and the command-line options."""
    from ..cards import AdapterCardData
    from ..results import load_results, save_results_plot

    config = _read_config(folder)
    if config.get("peft_type") not in (None, "HYPERFLOW"):
        raise ValueError(f"{folder} holds a {config.get('peft_type')!r} adapter, not a HyperFlow adapter "
                         f"(an adapted task has {TASK_FILE}).")
    training_config: dict = {}
    if args.training_config:
        training_config = _read_mapping(Path(args.training_config))
    else:
        for name in TRAINING_CONFIG_FILES:
            if (folder / name).is_file():
                training_config = _read_mapping(folder / name)
                break
    datasets = args.datasets or [d for d in training_config.get("datasets") or [] if isinstance(d, str)]
    from ..domain_reference import DOMAIN_REFERENCE_FILE

    # the drift network's weights; the domain reference beside them is not part of it
    parameters, size = safetensors_size([p for p in sorted(folder.glob("*.safetensors"))
                                         if p.name != DOMAIN_REFERENCE_FILE])
    results = load_results(args.results) if args.results else None
    plot_path = None
    if args.plot:
        plot_path = Path(args.plot).name
        if Path(args.plot).resolve() != (folder / plot_path).resolve():
            shutil.copyfile(args.plot, folder / plot_path)
    elif results is not None and any(m.get("adapt_latency_s") for per in results["results"].values()
                                     for m in per.values()):
        save_results_plot(results, folder / PLOT_NAME, highlight=args.eval_method or "hyperflow")
        plot_path = PLOT_NAME
    groups = config.get("groups") or []
    return AdapterCardData(
        repo_id=repo_id,
        base_model=_base_model(config, args.base_model, folder),
        base_model_revision=_first(config, "revision", "backbone_fingerprint"),
        backbone_model_type=config.get("backbone_model_type"),
        feature_size=config.get("feature_size"),
        groups=list(groups),
        target_modules=config.get("target_modules"),
        lora_rank=_first(config, "r", "rank") if "lora" in groups else None,
        lora_alpha=config.get("lora_alpha") if "lora" in groups else None,
        integrator=config.get("integrator"),
        steps=_first(config, "steps", "num_steps"),
        stopping=config.get("stopping"),
        stopping_points=config.get("stopping_points"),
        **_domain_gate(folder, config),
        drift_parameters=parameters or None,
        drift_bytes=size or None,
        training_config=training_config,
        training_datasets=list(datasets),
        license=args.license,
        results=results,
        eval_method=args.eval_method,
        plot_path=plot_path,
        tags=args.tags,
    )


def _domain_gate(folder: Path, config: dict) -> dict:
    """The card's domain gate and its sources: only where the folder holds the reference the gate measures against."""
    from ..domain_reference import DomainReference

    reference = DomainReference.load_if_present(folder) if config.get("domain_gate") is not None else None
    if reference is None:
        return {}
    return {"domain_gate": config["domain_gate"], "domain_sources": reference.sources}


def build_task_card_data(folder: Path, repo_id: str, args: PushConfig) -> TaskCardData:
    """The card data of an adapted-task folder (``hyperflow_task.json`` + a LoRA adapter config)."""
    from ..cards import TaskCardData
    from ..io import read_json_checked

    task = read_json_checked(folder / TASK_FILE)
    config = _read_config(folder)
    source = args.source_adapter or task.get("source_adapter")
    if not source:
        raise ValueError(f"{folder / TASK_FILE} does not say which HyperFlow adapter made the task: pass "
                         "--source_adapter with its Hub id or name.")
    classes = task.get("classes")
    if not isinstance(classes, list) or not classes:
        raise ValueError(f"{folder / TASK_FILE} has no 'classes' list.")
    return TaskCardData(
        repo_id=repo_id,
        base_model=_base_model(config, args.base_model, folder),
        class_names=[str(c) for c in classes],
        source_adapter=str(source),
        source_adapter_revision=task.get("source_adapter_revision"),
        base_model_revision=_first(config, "revision") or task.get("backbone_fingerprint"),
        backbone_model_type=task.get("backbone_model_type"),
        lora_rank=config.get("r"),
        lora_alpha=config.get("lora_alpha"),
        target_modules=config.get("target_modules"),
        support_size=task.get("support_size"),
        license=args.license,
        tags=args.tags,
    )


@dataclass
class PushConfig:
    """Which folder goes to which repo, and what its model card says."""

    folder: str = option("A folder written by HyperFlowAdapter / AdaptedTask.save_pretrained.", "")
    repo_id: str = option("Hub repo id, namespace/name (created if missing).", "")
    private: bool = option("Create the repo private (if it does not exist).", False)
    revision: str | None = option("Branch to commit to (created from main if missing).")
    commit_message: str | None = option("Commit message.")
    results: str | None = option("Evaluation results.json to put in the card.")
    eval_method: str | None = option("Method of the results that is this adapter (default: hyperflow).")
    plot: str | None = option("Accuracy-vs-latency image to show (default: drawn from --results).")
    training_config: str | None = option("Training configuration file (JSON or YAML) for the card.")
    datasets: list[str] = option("Training dataset names.", list)
    base_model: str | None = option("Backbone Hub id or name, when the config does not record it.")
    source_adapter: str | None = option("For a task folder: the HyperFlow adapter that made it.")
    license: str = option("License id.", "apache-2.0")
    tags: list[str] = option("Extra card tags.", list)
    card_only: bool = option("Write README.md, do not push.", False)

    def __post_init__(self):
        if not self.folder or not self.repo_id:
            raise ValueError("Give the folder and the repo: --folder OUTPUT_DIR --repo_id namespace/name.")


def write_card(config: PushConfig) -> Path:
    """Render the folder's model card into ``<folder>/README.md``; returns its path."""
    from ..cards import render_adapter_card, render_task_card

    folder = Path(config.folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"There is no folder at {folder}.")
    if (folder / TASK_FILE).is_file():
        card = render_task_card(build_task_card_data(folder, config.repo_id, config))
    else:
        card = render_adapter_card(build_adapter_card_data(folder, config.repo_id, config))
    card.save(folder / "README.md")
    return folder / "README.md"


def run_push(config: PushConfig):
    """Push the folder (its card written first by :func:`write_card`) as one commit; returns the Hub's CommitInfo."""
    from ..hub import push_folder_to_hub

    return push_folder_to_hub(Path(config.folder), config.repo_id, private=config.private or None,
                              revision=config.revision, commit_message=config.commit_message)
