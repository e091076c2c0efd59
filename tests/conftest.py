"""Shared test fixtures: tiny random backbones built from configs (no network), one per model_type."""

from __future__ import annotations

import contextlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models run far faster on one thread than on two contending ones (the 2-core CI machine included).
torch.set_num_threads(1)

# Tiny configs: hidden 32, 2 layers, 2 heads, 32 px, patch 8 (builds in milliseconds).
TINY_CONFIGS: dict[str, dict] = {
    "vit": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                patch_size=8),
    "dinov2": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=32,
                   patch_size=8),
    "clip_vision_model": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                              image_size=32, patch_size=8),
    "siglip_vision_model": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                image_size=32, patch_size=8),
    "swin": dict(embed_dim=16, depths=[1, 1], num_heads=[2, 2], image_size=32, patch_size=4, window_size=2),
    "convnext": dict(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, image_size=32, layer_scale_init_value=0.5),
    "resnet": dict(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic"),
    "timm_wrapper": dict(architecture="test_efficientnet", num_classes=0),
}
MODEL_TYPES = list(TINY_CONFIGS)
IMAGE_SIZE = 32


def make_backbone(model_type: str, seed: int = 0):
    """A tiny random backbone of ``model_type`` in eval mode, deterministic for a seed."""
    from transformers import AutoConfig, AutoModel, TimmWrapperConfig

    torch.manual_seed(seed)
    if model_type == "timm_wrapper":
        config = TimmWrapperConfig(**TINY_CONFIGS[model_type])
    else:
        config = AutoConfig.for_model(model_type, **TINY_CONFIGS[model_type])
    model = AutoModel.from_config(config).eval()
    if model_type == "timm_wrapper":
        # transformers' init of a timm model leaves its features at ~1e-14; timm's own init is usable
        import timm

        model.timm_model.load_state_dict(timm.create_model(config.architecture, num_classes=0).state_dict())
    if model_type in ("resnet", "timm_wrapper"):  # non-trivial BatchNorm statistics: shifts and merges show
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, torch.nn.BatchNorm2d):
                    module.running_mean.uniform_(-0.1, 0.1)
                    module.running_var.uniform_(0.5, 2.0)
                    module.weight.uniform_(0.5, 1.5)
    return model


def randomize_drift(adapter, scale: float = 0.05, seed: int = 0) -> None:
    """Give an (untrained, zero-output) drift network random output layers, so that deltas are non-zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in adapter.drift.named_parameters():
            if name.startswith("state_out") or name.startswith("head_net"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)


@pytest.fixture(params=MODEL_TYPES)
def model_type(request) -> str:
    return request.param


def random_support(seed: int = 0, ways: int = 3, shots: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random support set: pixels ``[ways * shots, 3, IMAGE_SIZE, IMAGE_SIZE]`` and labels ``[ways * shots]``
    (each class ``shots`` times in a row)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(ways * shots, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    return images, torch.arange(ways).repeat_interleave(shots)


def random_pixels(n: int = 4, seed: int | None = None) -> torch.Tensor:
    """Seeded random pixels ``[n, 3, IMAGE_SIZE, IMAGE_SIZE]`` (seed ``n`` unless given)."""
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(n if seed is None else seed))


def random_queries(seed: int = 100, n: int = 5) -> torch.Tensor:
    """Seeded random query pixels ``[n, 3, IMAGE_SIZE, IMAGE_SIZE]``."""
    return random_pixels(n, seed)


def make_random_adapter(model_type: str, seed: int = 0, random_drift: bool = True, **config):
    """A HyperFlowAdapter (3 steps unless ``config`` says) on a tiny ``model_type`` backbone, its drift randomised."""
    from hf_hyperflow import HyperFlowAdapter, HyperFlowConfig

    adapter = HyperFlowAdapter(make_backbone(model_type, seed), HyperFlowConfig(**{"steps": 3, **config}))
    if random_drift:
        randomize_drift(adapter)
    return adapter


@pytest.fixture(scope="module")
def adapter():
    """The default adapter of a test module: a tiny ViT with a random drift, 2 steps (a module may define its own)."""
    return make_random_adapter("vit", steps=2)


def save_tiny_adapter(root):
    """A tiny ViT saved to ``root/backbone`` and a HyperFlow adapter on it (3 steps, random non-zero drift) saved
    to ``root/adapter``; returns the two folders."""
    from pathlib import Path

    from transformers import AutoModel

    from hf_hyperflow import HyperFlowAdapter, HyperFlowConfig

    backbone, adapter_dir = Path(root) / "backbone", Path(root) / "adapter"
    make_backbone("vit").save_pretrained(backbone)
    adapter = HyperFlowAdapter(AutoModel.from_pretrained(backbone), HyperFlowConfig(steps=3))
    randomize_drift(adapter)
    adapter.save_pretrained(adapter_dir)
    return backbone, adapter_dir


def missing_requirement(message: str) -> None:
    """A test needs something this environment lacks (a console script, a browser): it fails under CI, whose
    .ci/run installs everything, and is skipped elsewhere with ``message`` saying what to install."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message, allow_module_level=True)


def digit_images(classes: int = 3, per_class: int = 3, size: int = 40) -> dict[str, list]:
    """Real images from scikit-learn's bundled handwritten digits: ``{"digit_0": [PIL RGB image, ...], ...}``,
    the first ``per_class`` images of each of the first ``classes`` digits, black ink on white, ``size`` px."""
    from PIL import Image
    from sklearn.datasets import load_digits

    bunch = load_digits()
    folders: dict[str, list] = {}
    for digit in range(classes):
        rows = [i for i, target in enumerate(bunch.target) if target == digit][:per_class]
        folders[f"digit_{digit}"] = [
            Image.fromarray((255 - bunch.images[i] * (255 / 16)).round().astype("uint8"), mode="L")
            .resize((size, size), Image.Resampling.BICUBIC).convert("RGB")
            for i in rows
        ]
    return folders


def write_image_folder(root, images_by_class: dict[str, list]):
    """Save ``{class: [PIL images]}`` as an image folder (``root/class/NN.png``); returns ``root`` as a Path."""
    from pathlib import Path

    root = Path(root)
    for name, images in images_by_class.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            image.save(root / name / f"{i:02d}.png")
    return root


# ------------------------------------------------------------------------------------------------ meta-training
TINY_RESNET = {"model_type": "resnet", "embedding_size": 16, "hidden_sizes": [16, 32], "depths": [1, 1],
               "layer_type": "basic", "seed": 0}


@pytest.fixture
def fresh_accelerate():
    """Each in-process run builds its own Accelerator: reset Accelerate's process-wide state around a test."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _png(array) -> dict:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def write_image_dataset(folder, classes: int = 12, per_class: int = 10, groups: int | None = None,
                        seed: int = 0) -> str:
    """A save_to_disk image dataset of 32 px images: a class colour and stripe direction, plus per-image noise.
    With ``groups``, a ``script`` column puts consecutive classes into that many groups (like glyphs' scripts)."""
    import math

    import datasets
    import numpy as np

    rng = np.random.default_rng(seed)
    images, labels = [], []
    grid = np.arange(32)
    for c in range(classes):
        colour = rng.uniform(40, 215, size=3)
        stripes = np.sin((grid[:, None] * math.cos(c) + grid[None, :] * math.sin(c)) * (0.3 + 0.05 * c))
        for _ in range(per_class):
            pixels = colour[None, None] * (0.6 + 0.4 * stripes[..., None]) + rng.normal(0, 20, (32, 32, 3))
            images.append(_png(np.clip(pixels, 0, 255).astype(np.uint8)))
            labels.append(c)
    columns = {"image": images, "label": labels}
    features = {"image": datasets.Image(), "label": datasets.ClassLabel(names=[f"c{c:02d}" for c in range(classes)])}
    if groups is not None:
        columns["script"] = [f"script{label * groups // classes}" for label in labels]
        features["script"] = datasets.Value("string")
    datasets.Dataset.from_dict(columns, features=datasets.Features(features)).save_to_disk(str(folder))
    return str(folder)


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory) -> str:
    """12 classes x 10 images of 32 px (:func:`write_image_dataset`)."""
    return write_image_dataset(tmp_path_factory.mktemp("data") / "synthetic")


def tiny_train_config(output_dir, source: str, **changes) -> dict:
    """A meta-training run of a few seconds in the YAML layout: tiny random ResNet, both losses, trajectories
    recorded first. ``changes``: dotted keys (``"training.max_steps"``) and their new values."""
    data = {
        "output_dir": str(output_dir),
        "backbone": {"random_init": dict(TINY_RESNET)},
        "adapter": {"groups": ["lora", "shift", "head"], "r": 2, "first_adapted_block": -1, "image_size": 32,
                    "steps": 3, "hidden_size": 32, "output_rank": 8},
        "datasets": [{"source": source, "class_split": {"fractions": [0.6, 0.4, 0.0], "seed": 0}}],
        "episodes": {"ways": 3, "shots": 2, "queries": 3, "seed": 0},
        "losses": {"unrolled": 1.0, "flow": 0.5},
        "flow": {"generate": {"episodes": 4, "steps": 4, "lr": 0.01}, "interpolation": "cubic",
                 "trajectories_per_step": 4},
        "validation": {"episodes": 4, "every": 3, "tasks_per_batch": 4},
        "optimizer": {"lr": 3e-3, "warmup_steps": 1},
        "training": {"max_steps": 6, "episodes_per_step": 4, "checkpoint_every": 2, "log_every": 2, "threads": 1,
                     "log_episodes": True},
    }
    for key, value in changes.items():
        *sections, name = key.split(".")
        node = data
        for section in sections:
            node = node[int(section)] if section.isdigit() else node.setdefault(section, {})
        node[name] = value
    return data


# ------------------------------------------------------------------------------------------------ results
# A results.json object of two datasets (the schema of hf_hyperflow.results).
SAMPLE_RESULTS = {
    "meta": {"backbone": "facebook/dinov2-small", "adapter": "out/adapter", "protocol": "fixed", "ways": 5,
             "shots": 5, "queries": 15, "image_size": 128, "machine": "2-core CPU", "date": "2026-11-30",
             "command": "python recipes/evaluate.py --adapter out/adapter"},
    "results": {
        "emoji": {
            "dt": {"accuracy": 61.04, "ci95": 1.52, "episodes": 600, "adapt_latency_s": 0.012,
                   "query_latency_s": 0.004, "peak_memory_bytes": 104857600, "latency_vs_dt": 1.0,
                   "latency_vs_ft_full": 0.003, "memory_vs_ft_full": 0.2},
            "ft-full": {"accuracy": 75.0, "ci95": 1.2, "episodes": 600, "adapt_latency_s": 4.0,
                        "peak_memory_bytes": 524288000},
            "hyperflow": {"accuracy": 71.23, "ci95": 1.31, "episodes": 600, "adapt_latency_s": 0.05,
                          "latency_vs_dt": 4.17, "latency_vs_ft_full": 0.0125, "memory_vs_ft_full": 0.05},
        },
        "fonts": {
            "dt": {"accuracy": 40.0, "ci95": 2.0, "episodes": 300},
            "hyperflow": {"accuracy": 45.5, "ci95": 2.1, "episodes": 300, "adapt_latency_s": 0.06},
        },
    },
}




def changed_results(change) -> dict:
    """A copy of SAMPLE_RESULTS with ``change(copy)`` applied."""
    import json

    data = json.loads(json.dumps(SAMPLE_RESULTS))
    change(data)
    return data


# ------------------------------------------------------------------------------------------------ labelled datasets
def png(value: int, size: int = 4, mode: str = "L") -> dict:
    """A tiny image whose pixels all equal ``value`` (so a decoded image tells which row it came from)."""
    import io

    from PIL import Image

    if mode == "RGBA":
        image = Image.new("RGBA", (size, size), (value, value, value, 0))
    elif mode == "P":
        image = Image.new("P", (size, size), 0)
        image.putpalette([value, 255 - value, 7] * 256)
    else:
        image = Image.new(mode, (size, size), value if mode == "L" else (value, 0, 0))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def make_dataset(counts: list[int], label_kind: str = "classlabel", groups: list[str] | None = None,
                 label_name: str = "label"):
    """``counts[c]`` rows of class c; image pixel value = row % 256. Rows of a class are interleaved."""
    import datasets
    import numpy as np

    labels = [c for c, n in enumerate(counts) for _ in range(n)]
    order = np.random.default_rng(123).permutation(len(labels))
    labels = [labels[i] for i in order]
    names = [f"class{c:03d}" for c in range(len(counts))]
    columns = {"image": [png(r % 256) for r in range(len(labels))]}
    if label_kind == "classlabel":
        columns[label_name] = labels
        label_feature = datasets.ClassLabel(names=names)
    elif label_kind == "int":
        columns[label_name] = [100 + c for c in labels]
        label_feature = datasets.Value("int64")
    else:
        columns[label_name] = [names[c] for c in labels]
        label_feature = datasets.Value("string")
    features = {"image": datasets.Image(), label_name: label_feature}
    if groups is not None:
        columns["group"] = [groups[c] for c in labels]
        features["group"] = datasets.Value("string")
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


# ------------------------------------------------------------------------------------------------ notices
@contextlib.contextmanager
def transformers_notices():
    """Collect what transformers logs within the block at its default (warning) level, as a user would see it:
    the tests run at "error" (TRANSFORMERS_VERBOSITY above), and each notice is said once per process."""
    import logging

    from transformers.utils import logging as transformers_logging

    notices: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: notices.append(record.getMessage())
    logging.Logger.warning_once.cache_clear()
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_warning()
    logging.getLogger("transformers").addHandler(handler)
    try:
        yield notices
    finally:
        logging.getLogger("transformers").removeHandler(handler)
        transformers_logging.set_verbosity(verbosity)
