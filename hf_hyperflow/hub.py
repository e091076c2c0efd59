"""The Hugging Face Hub side of hf-hyperflow: resolve a folder or Hub id to local files, push a folder,
and render model cards (from the Jinja templates in ``model_cards/``) with evaluation results.

Everything goes through ``huggingface_hub``; nothing here reaches the network unless a function is
asked for a Hub id or a push.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any

import httpx2
import yaml
from huggingface_hub import (
    CommitInfo,
    EvalResult,
    HfApi,
    ModelCard,
    ModelCardData,
    constants,
    get_token,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    LocalTokenNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from .io import read_json_checked

__all__ = [
    "AdapterCardData",
    "HubAuthError",
    "HubError",
    "HubNotFoundError",
    "HubUnavailableError",
    "HubUploadError",
    "TaskCardData",
    "load_results",
    "push_folder_to_hub",
    "render_adapter_card",
    "render_task_card",
    "resolve_pretrained_folder",
    "save_results_plot",
    "validate_results",
]

LIBRARY_NAME = "hf-hyperflow"
ADAPTER_TEMPLATE = "adapter_card.md"
TASK_TEMPLATE = "task_card.md"
BASE_TAGS = ("hyperflow", "peft", "few-shot", "image-classification")
_LOGIN_HINT = "log in with `hf auth login` (formerly `huggingface-cli login`) or set HF_TOKEN"
_COMMIT_ID = re.compile(r"^[0-9a-f]{40}$")


# ---------------------------------------------------------------------------------------------- errors
class HubError(OSError):
    """The Hub could not give or take what was asked; the message says what to check."""


class HubNotFoundError(HubError, FileNotFoundError):
    """A repo, revision or file does not exist (or is private and the token cannot see it)."""


class HubAuthError(HubError, PermissionError):
    """No token, a token the Hub rejects, or a token without the rights needed."""


class HubUnavailableError(HubError, ConnectionError):
    """The Hub could not be reached (or offline mode is on) and the local cache does not have the files."""


class HubUploadError(HubError):
    """A push failed; the message says where the branch points now."""


# ---------------------------------------------------------------------------------------------- pull
def _looks_like_path(text: str) -> bool:
    return text.startswith((".", "/", "~")) or "\\" in text or text.count("/") > 1 or os.path.isabs(text)


def resolve_pretrained_folder(
    path_or_repo_id: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    required_files: Sequence[str] = (),
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """A local folder holding the files of ``path_or_repo_id``.

    An existing local folder is returned as it is (it wins over a Hub id of the same spelling); anything
    else must be a Hub repo id (``namespace/name``), downloaded with ``huggingface_hub.snapshot_download``
    into the HF cache (``cache_dir`` or ``HF_HUB_CACHE``) and returned as its snapshot folder.

    Args:
        path_or_repo_id: a folder, or a Hub model repo id.
        revision: branch, tag or full commit id of the Hub repo; not allowed with a local folder.
        token: Hub token (default: the logged-in one / ``HF_TOKEN``); only needed for private repos.
        required_files: files (``/``-separated relative paths) that must be in the folder.
        cache_dir: HF cache folder to download into.

    Raises:
        TypeError / ValueError: arguments of the wrong kind, or neither a folder nor a valid repo id.
        FileNotFoundError: a local folder lacks a required file, or a path does not exist.
        HubNotFoundError: the repo, the revision, or a required file is not on the Hub.
        HubAuthError: the Hub rejected the token.
        HubUnavailableError: the Hub cannot be reached (or HF_HUB_OFFLINE is set) and the cache lacks the files.
    """
    if not isinstance(path_or_repo_id, (str, os.PathLike)):
        raise TypeError(f"path_or_repo_id must be a folder path or a Hub repo id, got {type(path_or_repo_id).__name__}.")
    if isinstance(required_files, (str, bytes)) or not all(isinstance(f, str) and f for f in required_files):
        raise TypeError(f"required_files must be a sequence of file names, got {required_files!r}.")
    if revision is not None and (not isinstance(revision, str) or not revision):
        raise ValueError(f"revision must be a non-empty branch, tag or commit id, got {revision!r}.")
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to Hub repos, but {str(path)!r} is a local folder: "
                             "drop revision, or pass a Hub repo id.")
        for name in required_files:
            if not (path / name).is_file():
                raise FileNotFoundError(f"{name} is missing from the folder {path}: it is not a complete save "
                                        "(save it again, or pass the right folder).")
        return path
    if path.exists():
        raise ValueError(f"{path} is a file; pass the folder that holds it, or a Hub repo id.")
    text = os.fspath(path_or_repo_id)
    if isinstance(path_or_repo_id, os.PathLike) or _looks_like_path(text):
        raise FileNotFoundError(f"There is no folder at {path}. Check the path (or pass a Hub repo id "
                                "such as 'namespace/name').")
    try:
        validate_repo_id(text)
    except HFValidationError as error:
        raise ValueError(f"{text!r} is neither an existing local folder nor a valid Hub repo id "
                         f"('namespace/name'): {error}") from error
    return _download(text, revision=revision, token=token, required_files=required_files, cache_dir=cache_dir)


def _download(repo_id: str, *, revision: str | None, token: str | bool | None, required_files: Sequence[str],
              cache_dir: str | os.PathLike | None) -> Path:
    where = f"{repo_id!r} on {constants.ENDPOINT}"
    shown_revision = revision or "main"
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, token=token, cache_dir=cache_dir))
    except LocalEntryNotFoundError as error:
        if constants.HF_HUB_OFFLINE:
            reason = "HF_HUB_OFFLINE is set, so nothing is downloaded: unset it (or download it once online)."
        else:
            reason = ("Check the connection and HF_ENDPOINT, then try again; once downloaded it also loads offline "
                      "(HF_HUB_OFFLINE=1).")
        raise HubUnavailableError(
            f"Could not download {where} (revision {shown_revision!r}) and the local cache does not have it. {reason}"
        ) from error
    except GatedRepoError as error:
        raise HubAuthError(f"{where} is gated: accept its conditions on the repo page and {_LOGIN_HINT}.") from error
    except RepositoryNotFoundError as error:
        raise HubNotFoundError(
            f"There is no repo {where}. Check the repo id (namespace/name); if the repo is private, "
            f"{_LOGIN_HINT} with a token that can read it."
        ) from error
    except RevisionNotFoundError as error:
        raise HubNotFoundError(
            f"The repo {where} has no revision {revision!r}. Check the branch, tag or commit id "
            "(commit ids are the full 40 hex digits)."
        ) from error
    except EntryNotFoundError as error:
        raise HubNotFoundError(f"A file of {where} (revision {shown_revision!r}) could not be found: {error}") from error
    except LocalTokenNotFoundError as error:
        raise HubAuthError(f"Downloading {where} needs a token, and none was found: {_LOGIN_HINT}.") from error
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status in (401, 403):
            raise HubAuthError(f"The Hub refused access to {where} ({status}): check the token ({_LOGIN_HINT}).") from error
        raise HubUnavailableError(f"The Hub failed while downloading {where}: {error}") from error
    for name in required_files:
        if not (folder / name).is_file():
            present = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
            raise HubNotFoundError(
                f"The repo {where} (revision {shown_revision!r}, commit {folder.name}) has no file {name!r}; it has "
                f"{present}. Check the repo id and revision: it may not hold what you are loading."
            )
    return folder


# ---------------------------------------------------------------------------------------------- push
def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    token: str | bool | None = None,
    create_pr: bool = False,
    delete_patterns: str | Sequence[str] | None = None,
) -> CommitInfo:
    """Upload every file of ``folder`` to the Hub model repo ``repo_id`` as one commit.

    The repo is created if needed (``private`` applies then only). ``revision`` names the branch to commit
    to (created from main if missing); ``create_pr=True`` opens a pull request against main instead.
    ``delete_patterns`` (e.g. ``"*"``) deletes remote files that match and are not in the folder.

    Returns:
        The ``CommitInfo`` of the commit (``.oid`` is the commit id to pass as ``revision=`` later). When
        no file changed, no commit is made and it describes the current head.

    Raises:
        TypeError / ValueError / FileNotFoundError: bad arguments or folder, before any request.
        HubAuthError: no token, a rejected token, or no write access; before anything is uploaded.
        HubUploadError: the upload failed; the message says whether the branch still points where it did.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"There is no folder at {folder} to push.")
    if not any(p.is_file() for p in folder.rglob("*") if ".git" not in p.parts):
        raise ValueError(f"The folder {folder} has no files to push.")
    if not isinstance(repo_id, str):
        raise TypeError(f"repo_id must be a string such as 'namespace/name', got {type(repo_id).__name__}.")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"{repo_id!r} is not a valid Hub repo id ('namespace/name'): {error}") from error
    if revision is not None and (not isinstance(revision, str) or not revision or _COMMIT_ID.match(revision)):
        raise ValueError(f"revision must be a branch name to commit to, got {revision!r} (a commit id cannot "
                         "be pushed to).")
    if create_pr and revision not in (None, constants.DEFAULT_REVISION):
        raise ValueError(f"create_pr=True opens a pull request against main; it cannot be combined with "
                         f"revision={revision!r}.")
    if private is not None and not isinstance(private, bool):
        raise TypeError(f"private must be True, False or None, got {private!r}.")
    if not isinstance(create_pr, bool):
        raise TypeError(f"create_pr must be True or False, got {create_pr!r}.")
    if token is not None and not isinstance(token, (str, bool)):
        raise TypeError(f"token must be a string, True/False or None, got {type(token).__name__}.")
    if commit_message is not None and (not isinstance(commit_message, str) or not commit_message.strip()):
        raise ValueError(f"commit_message must be a non-empty string, got {commit_message!r}.")
    resolved_token = token if isinstance(token, str) and token else (None if token is False else get_token())
    if not resolved_token:
        raise HubAuthError(f"Pushing to {repo_id!r} needs a Hugging Face token with write access, and none was "
                           f"found: {_LOGIN_HINT}, or pass token=.")

    api = HfApi(token=resolved_token)
    where = f"{repo_id!r} on {api.endpoint}"
    try:
        api.whoami()
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision is not None and not revision.startswith("refs/pr/"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        target = revision or constants.DEFAULT_REVISION
        before = api.repo_info(repo_id, revision=target).sha
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status in (401, 403):
            raise HubAuthError(f"The Hub refused the token for {where} ({status}): check that it is valid and "
                               f"has write access to the namespace ({_LOGIN_HINT}). Nothing was uploaded.") from error
        raise HubUploadError(f"Preparing the push to {where} failed: {error}. Nothing was uploaded.") from error
    except httpx2.HTTPError as error:
        raise HubUnavailableError(f"Could not reach {api.endpoint} to push {repo_id!r}: {error}. "
                                  "Nothing was uploaded; check the connection and HF_ENDPOINT.") from error
    try:
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message or f"Upload {folder.name} with {LIBRARY_NAME}",
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
            delete_patterns=delete_patterns if delete_patterns is None or isinstance(delete_patterns, str)
            else list(delete_patterns),
        )
    except (HfHubHTTPError, httpx2.HTTPError, OSError) as error:
        try:
            after = api.repo_info(repo_id, revision=target).sha
        except (HfHubHTTPError, httpx2.HTTPError, OSError):
            after = None
        if after == before:
            state = f"{target!r} still points at {before}: nothing was committed."
        elif after is None:
            state = f"The state of {target!r} could not be read back (it pointed at {before})."
        else:
            state = f"{target!r} now points at {after} (it pointed at {before}): check what it holds."
        if create_pr:
            state = f"No pull request was reported as opened. {state}"
        raise HubUploadError(f"Pushing {folder} to {where} failed ({type(error).__name__}: {error}). {state} "
                             "Run the push again.") from error


# ---------------------------------------------------------------------------------------------- results
_OPTIONAL_NUMBERS = ("adapt_latency_s", "query_latency_s", "peak_memory_bytes", "latency_vs_dt",
                     "latency_vs_ft_full", "memory_vs_ft_full")
_META_STRINGS = ("backbone", "adapter", "protocol", "machine", "date", "command")
_META_INTS = ("ways", "shots", "queries", "image_size")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_results(data: Any, source: str = "results") -> dict:
    """Check an evaluation ``results.json`` object; returns it unchanged.

    Schema: ``{"meta": {...}, "results": {dataset: {method: {"accuracy", "ci95", "episodes", ...}}}}`` with
    accuracy and ci95 in percent; the latency / memory fields and their ratios are optional numbers >= 0.

    Raises:
        ValueError: naming ``source`` and the first field that does not fit.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a JSON object with 'meta' and 'results', got {type(data).__name__}.")
    missing = [k for k in ("meta", "results") if k not in data]
    if missing:
        raise ValueError(f"{source}: missing {missing}; an evaluation results file has 'meta' and 'results'.")
    meta = data["meta"]
    if not isinstance(meta, dict):
        raise ValueError(f"{source}: 'meta' must be an object, got {type(meta).__name__}.")
    for key in ("backbone", "protocol"):
        if not isinstance(meta.get(key), str) or not meta[key]:
            raise ValueError(f"{source}: meta.{key} must be a non-empty string, got {meta.get(key)!r}.")
    for key in _META_STRINGS:
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise ValueError(f"{source}: meta.{key} must be a string, got {meta[key]!r}.")
    for key in _META_INTS:
        value = meta.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise ValueError(f"{source}: meta.{key} must be a positive integer (or null), got {value!r}.")
    results = data["results"]
    if not isinstance(results, dict) or not results:
        raise ValueError(f"{source}: 'results' must be a non-empty object {{dataset: {{method: metrics}}}}.")
    for dataset, methods in results.items():
        if not isinstance(methods, dict) or not methods:
            raise ValueError(f"{source}: results[{dataset!r}] must be a non-empty object {{method: metrics}}.")
        for method, metrics in methods.items():
            where = f"{source}: results[{dataset!r}][{method!r}]"
            if not isinstance(metrics, dict):
                raise ValueError(f"{where} must be an object of metrics, got {type(metrics).__name__}.")
            accuracy = metrics.get("accuracy")
            if not _is_number(accuracy) or not 0 <= accuracy <= 100:
                raise ValueError(f"{where}.accuracy must be a number in [0, 100] (percent), got {accuracy!r}.")
            ci95 = metrics.get("ci95")
            if not _is_number(ci95) or ci95 < 0:
                raise ValueError(f"{where}.ci95 must be a number >= 0 (percent), got {ci95!r}.")
            episodes = metrics.get("episodes")
            if not isinstance(episodes, int) or isinstance(episodes, bool) or episodes <= 0:
                raise ValueError(f"{where}.episodes must be a positive integer, got {episodes!r}.")
            for key in _OPTIONAL_NUMBERS:
                value = metrics.get(key)
                if value is not None and (not _is_number(value) or value < 0):
                    raise ValueError(f"{where}.{key} must be a number >= 0 (or absent), got {value!r}.")
    return data


def load_results(path: str | os.PathLike) -> dict:
    """Read and check an evaluation ``results.json`` (schema: :func:`validate_results`).

    Raises:
        FileNotFoundError: no file at ``path``. ValueError: not JSON, or not the results schema.
    """
    return validate_results(read_json_checked(path), source=str(path))


def _headline_method(results: dict, eval_method: str | None) -> str:
    methods = list(dict.fromkeys(m for per_dataset in results["results"].values() for m in per_dataset))
    if eval_method is not None:
        if eval_method not in methods:
            raise ValueError(f"eval_method {eval_method!r} is not in the results; they have {methods}.")
        return eval_method
    if "hyperflow" in methods:
        return "hyperflow"
    candidates = [m for m in methods if m.startswith("hyperflow")]
    if len(candidates) == 1:
        return candidates[0]
    raise ValueError(f"Cannot tell which method of {methods} is this adapter's: pass eval_method= (the method "
                     "whose accuracy goes into the card metadata).")


def _protocol_text(meta: dict) -> str:
    ways, shots, queries = meta.get("ways"), meta.get("shots"), meta.get("queries")
    parts = [f"{ways}-way {shots}-shot" if ways and shots else "variable-way variable-shot"]
    if queries:
        parts.append(f"{queries} queries per class")
    if meta.get("image_size"):
        parts.append(f"{meta['image_size']} px images")
    parts.append(f"{meta['protocol']} episodes")
    return ", ".join(parts)


def _eval_results(results: dict, method: str) -> list[EvalResult]:
    """One model-index entry per dataset for ``method``: accuracy (%) with its 95% CI in the metric args."""
    meta = results["meta"]
    task_name = f"Few-shot image classification ({_protocol_text(meta)})"
    out = []
    for dataset, methods in results["results"].items():
        if method not in methods:
            continue
        metrics = methods[method]
        out.append(EvalResult(
            task_type="image-classification",
            task_name=task_name,
            dataset_type=dataset,
            dataset_name=dataset,
            metric_type="accuracy",
            metric_value=float(metrics["accuracy"]),
            metric_name=f"accuracy (%, mean of {metrics['episodes']} episodes)",
            metric_args={"ci95": float(metrics["ci95"]), "episodes": int(metrics["episodes"]), "method": method},
        ))
    return out


def _format_seconds(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


def _format_ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.3g}×"


def _format_bytes(value: float | None) -> str:
    if value is None:
        return "–"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{int(value)} B"


def _result_rows(results: dict, headline: str | None) -> list[dict[str, str]]:
    rows = []
    for dataset, methods in results["results"].items():
        for method, metrics in methods.items():
            rows.append({
                "dataset": dataset,
                "method": f"**{method}**" if method == headline else method,
                "accuracy": f"{metrics['accuracy']:.1f}",
                "ci95": f"± {metrics['ci95']:.1f}",
                "episodes": str(metrics["episodes"]),
                "adapt": _format_seconds(metrics.get("adapt_latency_s")),
                "query": _format_seconds(metrics.get("query_latency_s")),
                "memory": _format_bytes(metrics.get("peak_memory_bytes")),
                "latency_vs_dt": _format_ratio(metrics.get("latency_vs_dt")),
                "latency_vs_ft_full": _format_ratio(metrics.get("latency_vs_ft_full")),
                "memory_vs_ft_full": _format_ratio(metrics.get("memory_vs_ft_full")),
            })
    return rows


def save_results_plot(results: dict, path: str | os.PathLike, *, highlight: str | None = None) -> Path:
    """Draw accuracy (with its 95% CI) against adaptation latency, one panel per dataset, into ``path`` (PNG).

    Uses matplotlib's object API (no pyplot, no global backend change).

    Raises:
        ValueError: the results are not the results schema, or no method has ``adapt_latency_s``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    validate_results(results)
    datasets = [d for d, methods in results["results"].items()
                if any(m.get("adapt_latency_s") for m in methods.values())]
    if not datasets:
        raise ValueError("No method in the results has adapt_latency_s > 0: there is no latency to plot.")
    columns = min(3, len(datasets))
    rows = math.ceil(len(datasets) / columns)
    figure = Figure(figsize=(4.2 * columns, 3.4 * rows), constrained_layout=True)
    FigureCanvasAgg(figure)
    methods = list(dict.fromkeys(m for d in datasets for m in results["results"][d]))
    colours = {m: f"C{i % 10}" for i, m in enumerate(methods)}  # one colour per method across panels
    for index, dataset in enumerate(datasets):
        axes = figure.add_subplot(rows, columns, index + 1)
        for method, metrics in results["results"][dataset].items():
            latency = metrics.get("adapt_latency_s")
            if not latency:
                continue
            strong = method == highlight
            axes.errorbar(latency, metrics["accuracy"], yerr=metrics["ci95"], fmt="*" if strong else "o",
                          color=colours[method], markersize=11 if strong else 6, capsize=3, label=method)
        axes.set_xscale("log")
        axes.set_xlabel("adaptation latency per task (s, log)")
        axes.set_ylabel("accuracy (%) ± 95% CI")
        axes.set_title(dataset)
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=7)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=110)
    return path


# ---------------------------------------------------------------------------------------------- cards
def _template_text(name: str) -> str:
    """The text of a card template: packaged with the installed package, or ``model_cards/`` of a checkout."""
    packaged = resources.files("hf_hyperflow").joinpath("model_cards", name)
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    source = Path(__file__).resolve().parent.parent / "model_cards" / name
    if source.is_file():
        return source.read_text(encoding="utf-8")
    raise FileNotFoundError(f"The model card template {name} is missing: neither hf_hyperflow/model_cards/{name} "
                            f"(installed package) nor {source} (source checkout) exists. Reinstall hf-hyperflow.")


def _is_hub_id(name: str) -> bool:
    if _looks_like_path(name) or "/" not in name:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _check_str(value: Any, name: str, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not value:
        raise TypeError(f"{name} must be a non-empty string, got {value!r}.")


def _check_str_list(value: Any, name: str) -> None:
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(isinstance(v, str) and v for v in value):
        raise TypeError(f"{name} must be a list of non-empty strings, got {value!r}.")


def _check_positive(value: Any, name: str, kind: type = int) -> None:
    if value is None:
        return
    ok = (isinstance(value, int) and not isinstance(value, bool)) if kind is int else _is_number(value)
    if not ok or value <= 0:
        raise ValueError(f"{name} must be a positive {kind.__name__} (or None), got {value!r}.")


def _check_repo_id(repo_id: Any, name: str = "repo_id") -> None:
    _check_str(repo_id, name)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"{name} {repo_id!r} is not a valid Hub repo id ('namespace/name'): {error}") from error


def _target_summary(target_modules: str | Sequence[str] | None) -> str | None:
    if target_modules is None:
        return None
    if isinstance(target_modules, str):
        return f"`{target_modules}`"
    return ", ".join(f"`{m}`" for m in target_modules)


def _metadata(*, library_name: str, base_model: str, license: str, pipeline_tag: str, tags: Sequence[str],
              datasets: Sequence[str] = (), model_name: str | None = None,
              eval_results: list[EvalResult] | None = None) -> ModelCardData:
    extra: dict[str, Any] = {}
    if _is_hub_id(base_model):
        extra = {"base_model": base_model, "base_model_relation": "adapter"}
    return ModelCardData(
        library_name=library_name,
        license=license,
        pipeline_tag=pipeline_tag,
        tags=list(dict.fromkeys(tags)),
        datasets=list(datasets) or None,
        model_name=model_name if eval_results else None,
        eval_results=eval_results or None,
        **extra,
    )


def _render(template: str, metadata: ModelCardData, d: AdapterCardData | TaskCardData, **variables: Any) -> ModelCard:
    """Fill ``template`` with the metadata block and the variables both card kinds share, plus ``variables``."""
    return ModelCard.from_template(
        metadata,
        template_str=_template_text(template),
        repo_id=d.repo_id,
        model_title=d.repo_id.split("/")[-1],
        backbone=d.base_model,
        backbone_is_hub_id=_is_hub_id(d.base_model),
        backbone_revision=d.base_model_revision,
        backbone_model_type=d.backbone_model_type,
        **variables,
    )


@dataclass
class AdapterCardData:
    """What the model card of a HyperFlow adapter says.

    Args:
        repo_id: the Hub id the adapter is (or will be) pushed to; also the model name in the metadata.
        base_model: the backbone: a Hub id (goes into the ``base_model`` metadata) or a local name.
        base_model_revision: the backbone's revision or content fingerprint the adapter was trained on.
        backbone_model_type: transformers ``model_type`` of the backbone (``"dinov2"``...).
        feature_size: size D of the backbone's image embedding.
        groups: adapted parameter groups (``"lora"``, ``"shift"``, ``"head"``).
        target_modules: the LoRA target modules (names or a regex), as configured.
        lora_rank / lora_alpha: LoRA rank r and alpha of the ``lora`` group.
        integrator / steps: how the drift is integrated (``"euler"``, ``"rk4"``...) and in how many steps.
        drift_parameters / drift_bytes: size of the drift network (parameter count; bytes on disk).
        training_config: the meta-training configuration, shown as YAML.
        training_datasets: datasets the drift network was trained on (metadata ``datasets``).
        license: license id of the adapter.
        results: an evaluation ``results.json`` object (see :func:`load_results`), or None.
        eval_method: the results' method that is this adapter (default ``"hyperflow"``, or the only
            ``"hyperflow*"`` method); its accuracy per dataset goes into the model-index metadata.
        plot_path: repo-relative path of the accuracy-vs-latency image (see :func:`save_results_plot`).
        tags: extra tags.
        pipeline_tag: Hub pipeline tag.
    """

    repo_id: str
    base_model: str
    base_model_revision: str | None = None
    backbone_model_type: str | None = None
    feature_size: int | None = None
    groups: list[str] = field(default_factory=list)
    target_modules: str | list[str] | None = None
    lora_rank: int | None = None
    lora_alpha: float | None = None
    integrator: str | None = None
    steps: int | None = None
    drift_parameters: int | None = None
    drift_bytes: int | None = None
    training_config: dict = field(default_factory=dict)
    training_datasets: list[str] = field(default_factory=list)
    license: str = "apache-2.0"
    results: dict | None = None
    eval_method: str | None = None
    plot_path: str | None = None
    tags: list[str] = field(default_factory=list)
    pipeline_tag: str = "image-classification"

    def __post_init__(self) -> None:
        _check_repo_id(self.repo_id)
        _check_str(self.base_model, "base_model")
        for name in ("base_model_revision", "backbone_model_type", "integrator", "eval_method", "plot_path"):
            _check_str(getattr(self, name), name, optional=True)
        _check_str(self.license, "license")
        _check_str(self.pipeline_tag, "pipeline_tag")
        _check_str_list(self.groups, "groups")
        _check_str_list(self.training_datasets, "training_datasets")
        _check_str_list(self.tags, "tags")
        if self.target_modules is not None and not isinstance(self.target_modules, str):
            _check_str_list(self.target_modules, "target_modules")
        for name in ("feature_size", "lora_rank", "steps", "drift_parameters", "drift_bytes"):
            _check_positive(getattr(self, name), name)
        _check_positive(self.lora_alpha, "lora_alpha", float)
        if "lora" in self.groups and self.lora_rank is None:
            raise ValueError("groups include 'lora' but lora_rank is None: give the LoRA rank.")
        if not isinstance(self.training_config, Mapping):
            raise TypeError(f"training_config must be a dict, got {type(self.training_config).__name__}.")
        if self.results is not None:
            validate_results(self.results, source="AdapterCardData.results")
            self.eval_method = _headline_method(self.results, self.eval_method)
        elif self.eval_method is not None:
            raise ValueError("eval_method is set but there are no results.")
        if self.plot_path is not None:
            posix = PurePosixPath(self.plot_path)
            if posix.is_absolute() or ".." in posix.parts or "\\" in self.plot_path:
                raise ValueError(f"plot_path must be a path inside the repo such as 'accuracy_vs_latency.png', "
                                 f"got {self.plot_path!r}.")


def render_adapter_card(card_data: AdapterCardData) -> ModelCard:
    """The model card of a HyperFlow adapter, from ``model_cards/adapter_card.md``.

    Metadata: library_name, base_model (when a Hub id), datasets, tags, pipeline_tag, license and, with
    results, a model-index with the adapter's accuracy per dataset (95% CI in the metric args).
    """
    if not isinstance(card_data, AdapterCardData):
        raise TypeError(f"render_adapter_card takes an AdapterCardData, got {type(card_data).__name__}.")
    d = card_data
    eval_results = _eval_results(d.results, d.eval_method) if d.results is not None else None
    metadata = _metadata(
        library_name=LIBRARY_NAME, base_model=d.base_model, license=d.license, pipeline_tag=d.pipeline_tag,
        tags=[*BASE_TAGS, *([d.backbone_model_type] if d.backbone_model_type else []), *d.tags],
        datasets=d.training_datasets, model_name=d.repo_id.split("/")[-1], eval_results=eval_results,
    )
    results_meta = d.results["meta"] if d.results is not None else None
    return _render(
        ADAPTER_TEMPLATE, metadata, d,
        feature_size=d.feature_size,
        groups=", ".join(f"`{g}`" for g in d.groups) if d.groups else None,
        target_modules=_target_summary(d.target_modules),
        lora_rank=d.lora_rank,
        lora_alpha=d.lora_alpha,
        integrator=d.integrator,
        steps=d.steps,
        drift_parameters=f"{d.drift_parameters:,}" if d.drift_parameters else None,
        drift_size=_format_bytes(d.drift_bytes) if d.drift_bytes else None,
        training_config=yaml.safe_dump(dict(d.training_config), sort_keys=False).strip() if d.training_config else None,
        training_datasets=d.training_datasets,
        results_meta=results_meta,
        protocol=_protocol_text(results_meta) if results_meta else None,
        result_rows=_result_rows(d.results, d.eval_method) if d.results is not None else [],
        headline_method=d.eval_method,
        plot_path=d.plot_path,
    )


@dataclass
class TaskCardData:
    """What the model card of an adapted task (a plain PEFT LoRA adapter plus a prototype head) says.

    Args:
        repo_id: the Hub id the task is (or will be) pushed to.
        base_model: the backbone: a Hub id (goes into the ``base_model`` metadata) or a local name.
        class_names: the task's classes, in the order of the head's rows.
        source_adapter: the HyperFlow adapter (Hub id or name) that produced the task.
        source_adapter_revision: its revision (commit id) when known.
        base_model_revision: the backbone's revision or content fingerprint.
        backbone_model_type: transformers ``model_type`` of the backbone.
        lora_rank / lora_alpha / target_modules: the exported LoRA adapter's settings.
        support_size: number of labelled support images the task was adapted from.
        head_file / classes_file: files holding the head (prototypes [C, D], logit_scale, logit_bias) and
            the class names (``{"classes": [...]}``).
        license / tags / pipeline_tag: metadata.
    """

    repo_id: str
    base_model: str
    class_names: list[str]
    source_adapter: str
    source_adapter_revision: str | None = None
    base_model_revision: str | None = None
    backbone_model_type: str | None = None
    lora_rank: int | None = None
    lora_alpha: float | None = None
    target_modules: str | list[str] | None = None
    support_size: int | None = None
    head_file: str = "hyperflow_head.safetensors"
    classes_file: str = "hyperflow_task.json"
    license: str = "apache-2.0"
    tags: list[str] = field(default_factory=list)
    pipeline_tag: str = "image-classification"

    def __post_init__(self) -> None:
        _check_repo_id(self.repo_id)
        for name in ("base_model", "source_adapter", "head_file", "classes_file", "license", "pipeline_tag"):
            _check_str(getattr(self, name), name)
        for name in ("source_adapter_revision", "base_model_revision", "backbone_model_type"):
            _check_str(getattr(self, name), name, optional=True)
        _check_str_list(self.class_names, "class_names")
        if len(self.class_names) < 2:
            raise ValueError(f"A task has at least 2 classes, got {list(self.class_names)}.")
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"class_names has duplicates: {list(self.class_names)}.")
        _check_str_list(self.tags, "tags")
        if self.target_modules is not None and not isinstance(self.target_modules, str):
            _check_str_list(self.target_modules, "target_modules")
        _check_positive(self.lora_rank, "lora_rank")
        _check_positive(self.support_size, "support_size")
        _check_positive(self.lora_alpha, "lora_alpha", float)


def render_task_card(card_data: TaskCardData) -> ModelCard:
    """The model card of an adapted task, from ``model_cards/task_card.md``: its classes, the adapter it
    came from, and how to load it with stock PEFT (``library_name: peft``)."""
    if not isinstance(card_data, TaskCardData):
        raise TypeError(f"render_task_card takes a TaskCardData, got {type(card_data).__name__}.")
    d = card_data
    metadata = _metadata(
        library_name="peft", base_model=d.base_model, license=d.license, pipeline_tag=d.pipeline_tag,
        tags=[*BASE_TAGS, "lora", LIBRARY_NAME, *([d.backbone_model_type] if d.backbone_model_type else []), *d.tags],
    )
    return _render(
        TASK_TEMPLATE, metadata, d,
        class_names=list(d.class_names),
        source_adapter=d.source_adapter,
        source_adapter_is_hub_id=_is_hub_id(d.source_adapter),
        source_adapter_revision=d.source_adapter_revision,
        lora_rank=d.lora_rank,
        lora_alpha=d.lora_alpha,
        target_modules=_target_summary(d.target_modules),
        support_size=d.support_size,
        head_file=d.head_file,
        classes_file=d.classes_file,
    )
