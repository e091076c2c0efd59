"""Shared pieces of the dataset builders: fetching source packages into a cache, encoding images,
saving a dataset folder with its dataset card."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from huggingface_hub import DatasetCard, DatasetCardData
from PIL import Image

CACHE_ENV = "HF_HYPERFLOW_DATA_CACHE"
COMPLETE = ".complete.json"


def default_cache_dir() -> Path:
    """Where source packages are kept: ``$HF_HYPERFLOW_DATA_CACHE``, else ``~/.cache/hf_hyperflow/data-sources``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hf_hyperflow" / "data-sources"


@dataclass(frozen=True)
class Source:
    """A fetched source package: its extracted root folder and version."""

    kind: str        # "deb" or "npm"
    name: str
    version: str
    root: Path


def cached_source(kind: str, name: str, cache_dir: Path | None = None) -> Source | None:
    """The source package if it is already extracted in the cache, else None. Never touches the network."""
    root = Path(cache_dir or default_cache_dir()) / kind / name
    marker = root / COMPLETE
    if not marker.is_file():
        return None
    info = json.loads(marker.read_text())
    return Source(kind, name, info["version"], root / "files")


def fetch_source(kind: str, name: str, cache_dir: Path | None = None) -> Source:
    """Fetch and extract a Debian (``apt-get download`` + ``dpkg -x``) or npm (``npm pack``) package into the
    cache, unless it is there already."""
    found = cached_source(kind, name, cache_dir)
    if found is not None:
        return found
    if kind not in ("deb", "npm"):
        raise ValueError(f"kind must be 'deb' or 'npm', got {kind!r}")
    tool = {"deb": ["apt-get", "dpkg"], "npm": ["npm"]}[kind]
    missing = [t for t in tool if shutil.which(t) is None]
    if missing:
        raise RuntimeError(f"{missing} not found, needed to fetch the {kind} package {name!r}; install it, or put the "
                           f"extracted package under {Path(cache_dir or default_cache_dir()) / kind / name}")
    root = Path(cache_dir or default_cache_dir()) / kind / name
    if root.exists():
        shutil.rmtree(root)
    (root / "files").mkdir(parents=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        os.chmod(tmp, 0o777)  # apt-get download runs as the _apt user when it can
        if kind == "deb":
            _run(["apt-get", "download", name], cwd=tmp)
            archive = next(Path(tmp).glob("*.deb"))
            version = _run(["dpkg-deb", "--field", str(archive), "Version"], cwd=tmp).strip()
            _run(["dpkg", "-x", str(archive), str(root / "files")], cwd=tmp)
        else:
            _run(["npm", "pack", name, "--pack-destination", tmp, "--silent"], cwd=tmp)
            archive = next(Path(tmp).glob("*.tgz"))
            with tarfile.open(archive) as tar:
                tar.extractall(root / "files", filter="data")
            version = json.loads((root / "files" / "package" / "package.json").read_text())["version"]
    (root / COMPLETE).write_text(json.dumps({"kind": kind, "name": name, "version": version}))
    return Source(kind, name, version, root / "files")


def _run(command: list[str], cwd: str) -> str:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return done.stdout


def missing_sources(needed: list[tuple[str, str]], cache_dir: Path | None = None) -> str | None:
    """None when every (kind, name) source is cached, else a sentence naming the missing ones."""
    absent = [f"{kind} package {name}" for kind, name in needed if cached_source(kind, name, cache_dir) is None]
    if not absent:
        return None
    return f"not in the cache {Path(cache_dir or default_cache_dir())}: {', '.join(absent)}"


def rebuild_command(name: str, output_dir: str | os.PathLike, max_classes: int | None = None, seed: int = 0) -> str:
    """The command line that rebuilds a dataset, for its card."""
    command = f"python -m recipes.data.build --name {name} --output {output_dir}"
    if max_classes is not None:
        command += f" --max-classes {max_classes}"
    if seed != 0:
        command += f" --seed {seed}"
    return command


def round_robin(items: list, group_of: Callable[[Any], str], limit: int | None) -> list:
    """At most ``limit`` items taken in turn from each group (groups in sorted order; all items when ``limit``
    is None), in their original order."""
    if limit is None or limit >= len(items):
        return list(items)
    by_group: dict[str, list[int]] = defaultdict(list)
    for position, item in enumerate(items):
        by_group[group_of(item)].append(position)
    queues = [by_group[g] for g in sorted(by_group)]
    taken: list[int] = []
    depth = 0
    while len(taken) < limit:
        for queue in queues:
            if depth < len(queue) and len(taken) < limit:
                taken.append(queue[depth])
        depth += 1
    return [items[k] for k in sorted(taken)]


def png_bytes(image: Image.Image) -> dict:
    """An ``Image`` feature value holding the PNG encoding of ``image``."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def fit_sprite(image: Image.Image, size: int, margin: int = 0, pixel_art: bool = False) -> Image.Image:
    """A sprite with transparency cropped to its visible pixels (alpha > 8), scaled with its aspect kept so that
    its longer side is ``size - 2 * margin``, centred on white: RGB ``size`` x ``size``. ``pixel_art``: enlarge
    by the largest whole factor that fits with nearest-neighbour first (crisp pixels), then Lanczos for the
    rest of the way; otherwise Lanczos all the way."""
    rgba = image.convert("RGBA")
    box = rgba.getchannel("A").point(lambda a: 255 if a > 8 else 0).getbbox()
    sprite = rgba.crop(box) if box else rgba
    inner = size - 2 * margin
    if pixel_art and max(sprite.size) < inner:
        factor = inner // max(sprite.size)
        sprite = sprite.resize((sprite.width * factor, sprite.height * factor), Image.Resampling.NEAREST)
    scale = inner / max(sprite.size)
    width, height = (max(1, round(d * scale)) for d in sprite.size)
    if (width, height) != sprite.size:
        sprite = sprite.resize((width, height), Image.Resampling.LANCZOS)
    canvas = Image.new("RGBA", (size, size), (255, 255, 255, 255))
    canvas.alpha_composite(sprite, ((size - width) // 2, (size - height) // 2))
    return canvas.convert("RGB")


def pixel_digest(image: Image.Image) -> bytes:
    """A hash of an image's pixels and size: equal for two images with the same pixels."""
    return hashlib.sha1(image.tobytes() + repr(image.size).encode()).digest()


def is_near_copy(signature: np.ndarray, kept: list[np.ndarray], level: float) -> bool:
    """Whether ``signature`` (an image as a float array) is within a mean absolute difference of ``level`` of one
    of ``kept`` (arrays of the same shape)."""
    return any(np.abs(signature - other).mean() < level for other in kept)


def evenly_spaced(items: list, limit: int) -> list:
    """``items`` when there are at most ``limit``, else ``limit`` of them evenly spaced from the first to the last."""
    if len(items) <= limit:
        return list(items)
    return [items[k] for k in np.unique(np.linspace(0, len(items) - 1, limit).round().astype(int))]


def class_label(names: list[str]) -> datasets.ClassLabel:
    if len(set(names)) != len(names):
        duplicates = [n for n, c in Counter(names).items() if c > 1]
        raise ValueError(f"class names must be unique; repeated: {duplicates[:5]}")
    return datasets.ClassLabel(names=names)


def dataset_stats(dataset: datasets.Dataset, group_column: str | None) -> dict:
    """Counts for the card: classes, images, images per class (min / max), classes per group."""
    labels = dataset.data.column("label").to_numpy()
    per_class = np.bincount(labels, minlength=dataset.features["label"].num_classes)
    stats = {"classes": int((per_class > 0).sum()), "images": len(dataset),
             "min_per_class": int(per_class[per_class > 0].min()), "max_per_class": int(per_class.max())}
    if group_column is not None:
        groups = dataset.data.column(group_column).to_numpy(zero_copy_only=False)
        pairs = set(zip(labels.tolist(), groups.tolist(), strict=True))
        stats["groups"] = dict(sorted(Counter(g for _, g in pairs).items()))
    return stats


def folder_size(path: Path) -> int:
    """Bytes of all files under ``path``."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def write_dataset(dataset: datasets.Dataset, output_dir: str | os.PathLike, *, pretty_name: str, licenses: list[str],
                  summary: str, sources: list[dict], construction: str, group_column: str | None,
                  command: str, tags: list[str]) -> datasets.Dataset:
    """Save ``dataset`` with ``save_to_disk`` and a README.md dataset card to ``output_dir``; returns it reloaded.

    ``sources``: rows of {"name", "version", "license", "url"} for the card's source table. An existing
    ``output_dir`` is replaced only if it is a dataset folder (it has a state.json) or empty.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not (output_dir / "state.json").is_file():
        raise ValueError(f"{output_dir} exists and is not a dataset folder; choose an empty or new --output")
    stats = dataset_stats(dataset, group_column)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}-", dir=output_dir.parent))
    try:
        dataset.save_to_disk(str(staging), max_shard_size="200MB")
        card = dataset_card(stats, pretty_name=pretty_name, licenses=licenses, summary=summary, sources=sources,
                            construction=construction, group_column=group_column, command=command,
                            features=dataset.features, tags=tags)
        card.save(staging / "README.md")
        if output_dir.exists():
            shutil.rmtree(output_dir)
        staging.rename(output_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return datasets.load_from_disk(str(output_dir))


def _size_category(n: int) -> str:
    for bound, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < bound:
            return name
    return "1M<n<10M"


def dataset_card(stats: dict, *, pretty_name: str, licenses: list[str], summary: str, sources: list[dict],
                 construction: str, group_column: str | None, command: str, features: datasets.Features,
                 tags: list[str]) -> DatasetCard:
    data = DatasetCardData(license=licenses if len(licenses) > 1 else licenses[0], pretty_name=pretty_name,
                           task_categories=["image-classification"], size_categories=_size_category(stats["images"]),
                           tags=["few-shot"] + tags)
    source_rows = "\n".join(f"| {s['name']} | {s['version']} | {s['license']} | {s['url']} |" for s in sources)
    columns = "\n".join(f"| `{name}` | `{type(feature).__name__}` |" for name, feature in features.items())
    lines = [
        "---", data.to_yaml(), "---", "", f"# {pretty_name}", "", summary, "",
        "## Counts", "",
        f"- classes: {stats['classes']}",
        f"- images: {stats['images']}",
        f"- images per class: {stats['min_per_class']} to {stats['max_per_class']}",
    ]
    if group_column is not None:
        groups = stats["groups"]
        lines += [f"- `{group_column}` groups: {len(groups)}", "", f"| {group_column} | classes |", "|---|---|"]
        lines += [f"| {g} | {n} |" for g, n in groups.items()]
    lines += ["", "## Sources", "", "| package | version | licence | upstream |", "|---|---|---|---|", source_rows, "",
              "## How classes and instances were formed", "", construction, "",
              "## Columns", "", "| column | feature |", "|---|---|", columns, "",
              "## Rebuild", "", "```bash", command, "```", ""]
    return DatasetCard("\n".join(lines))
