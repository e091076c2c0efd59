"""Reading and writing saved files, with errors that say which file is broken and what to do.

Every safetensors file the package writes carries the sha256 of its tensors in its metadata (``tensors_sha256``,
see :func:`~hf_hyperflow.fingerprint.tensors_sha256`); :func:`load_safetensors_checked` recomputes it, so that
flipped bits, a tensor cut out of the header or a tensor of another shape are found before they are used.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .fingerprint import tensors_sha256

__all__ = ["CHECKSUM_KEY", "unload_to_original", "load_safetensors_checked", "save_safetensors", "add_checksum", "read_json_checked",
           "check_tensor_shapes", "attach_adapter_checked"]

CHECKSUM_KEY = "tensors_sha256"
SIDECAR_PREFIX = "saved:"  # metadata key of the copy of a JSON file saved beside the tensors


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None, *,
                     sidecars: Mapping[str | os.PathLike, Sequence[str]] | None = None) -> None:
    """Write ``tensors`` with ``metadata`` (default ``{"format": "pt"}``), their checksum and a copy of each JSON file
    of ``sidecars`` (``path -> fields left out``: fields free to change, such as provenance), through a temporary
    file: a reader never sees half a file.

    The copies are what :func:`load_safetensors_checked` compares the JSON files with: a config edited or damaged
    after saving, which would change what the tensors compute, is found on load.
    """
    path = Path(path)
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}
    metadata = {**(metadata or {"format": "pt"}), CHECKSUM_KEY: tensors_sha256(tensors)}
    for sidecar, ignored in (sidecars or {}).items():
        recorded = {k: v for k, v in read_json_checked(sidecar).items() if k not in set(ignored)}
        metadata[SIDECAR_PREFIX + Path(sidecar).name] = json.dumps(recorded, sort_keys=True)
    temporary = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(temporary), metadata=metadata)
    os.replace(temporary, path)


def add_checksum(path: str | os.PathLike, *, sidecars: Mapping[str | os.PathLike, Sequence[str]] | None = None) -> None:
    """Rewrite a safetensors file written by another library (PEFT) with the checksum of its tensors and the copies
    of its ``sidecars`` (see :func:`save_safetensors`)."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {"format": "pt"}
    save_safetensors(load_file(str(path)), path, metadata, sidecars=sidecars)


def load_safetensors_checked(path: str | os.PathLike, device: str = "cpu", *,
                             sidecars: Sequence[str | os.PathLike] = ()) -> dict[str, torch.Tensor]:
    """Load a safetensors file and check its tensors against the checksum saved with them (a file without one, from
    an older version or another library, loads with a warning), and each JSON file of ``sidecars`` against the copy
    saved with them (when there is one).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file cannot be parsed (truncated download, interrupted save, not safetensors), its tensors
            do not match their checksum (damaged on disk or in transfer, or edited), or a sidecar JSON file differs
            from its saved copy.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise ValueError(
            f"{path} is corrupt or truncated ({error}). Download or save it again."
        ) from error
    expected = metadata.get(CHECKSUM_KEY)
    if expected is None:
        warnings.warn(f"{path} carries no checksum of its tensors (written by an older version or another library), "
                      "so damage to it cannot be detected; save it again to add one.", stacklevel=2)
    elif tensors_sha256(tensors) != expected:
        raise ValueError(f"{path} is damaged: its tensors do not match the checksum saved with them (flipped bits, "
                         "an interrupted copy, or an edit). Download or save it again.")
    for sidecar in sidecars:
        _compare_sidecar(Path(sidecar), metadata, path)
    return tensors


def _compare_sidecar(sidecar: Path, metadata: Mapping[str, str], path: Path) -> None:
    """The JSON file ``sidecar`` holds the values its copy in ``path``'s metadata recorded (if it has one)."""
    recorded = metadata.get(SIDECAR_PREFIX + sidecar.name)
    if recorded is None:
        return
    try:
        recorded = json.loads(recorded)
    except json.JSONDecodeError:
        raise ValueError(f"{path} is damaged: its copy of {sidecar.name} is not valid JSON. Download or save it "
                         "again.") from None
    current = read_json_checked(sidecar)
    def same(a, b) -> bool:  # as JSON text: NaN equals NaN, 1 and 1.0 and True stay apart
        return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)

    changed = sorted(k for k in recorded if k not in current or not same(current[k], recorded[k]))
    if changed:
        shown = ", ".join(f"{k} (file: {current.get(k, '<missing>')!r:.40}, saved: {recorded[k]!r:.40})"
                          for k in changed[:4])
        raise ValueError(f"{sidecar} differs from the copy saved with {path.name} in {shown}: it was edited or "
                         "damaged after saving, and would not compute what was saved. Restore it or download it again; "
                         "to change a setting, change it on the loaded object and save again (for another number of "
                         "integration steps, pass steps= to adapt).")


def check_tensor_shapes(tensors: Mapping[str, torch.Tensor], expected: Mapping[str, tuple], path, fix: str) -> None:
    """The tensors of the file ``path`` are exactly the ``expected`` names and shapes.

    Raises:
        ValueError: a missing, unexpected or wrongly shaped tensor, naming the file, the tensor and ``fix``.
    """
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(n for n in set(expected) & set(tensors) if tuple(tensors[n].shape) != tuple(expected[n]))
    problems = []
    if missing:
        problems.append(f"lacks the tensor(s) {missing[:5]}")
    if unexpected:
        problems.append(f"has tensor(s) it should not have {unexpected[:5]}")
    if wrong:
        problems.append("has tensor(s) of the wrong shape " + ", ".join(
            f"{n} {tuple(tensors[n].shape)} (expected {tuple(expected[n])})" for n in wrong[:5]))
    if problems:
        raise ValueError(f"{path} {'; '.join(problems)}. {fix}")


def read_json_checked(path: str | os.PathLike) -> dict:
    """Read a JSON object; a missing file raises FileNotFoundError, a corrupt one ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist.")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); it may be truncated. Save it again.") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path} should hold a JSON object, got {type(data).__name__}.")
    return data


def attach_adapter_checked(backbone, config, tensors: Mapping[str, torch.Tensor], path: Path):
    """``PeftModel(backbone, config)`` (the adapter's layers injected, as PEFT does) with the saved ``tensors`` of the
    file ``path`` set. When they do not fit the config (a missing or unexpected tensor, another shape), the layers
    are taken out again, so that the backbone is as it was, and ValueError names the file.
    """
    from peft import PeftModel, set_peft_model_state_dict

    from .backbones import check_no_adapter
    from .tuner.model import peft_wrapping

    check_no_adapter(backbone, f"the adapter of {Path(path).parent}")
    # PEFT's unload keeps the loaded copies of modules_to_save (a task's norms): keep their values to put back
    entries = list(getattr(config, "modules_to_save", None) or [])
    kept = {key: value.detach().clone() for key, value in backbone.state_dict().items()
            if any(key.rsplit(".", 1)[0] == e or key.rsplit(".", 1)[0].endswith("." + e) for e in entries)}
    with peft_wrapping():
        model = PeftModel(backbone, config)
    try:
        result = set_peft_model_state_dict(model, dict(tensors), adapter_name="default")
        missing = [k for k in result.missing_keys if ".default." in k]
        problems = [f"lacks the tensor(s) {missing[:3]}"] if missing else []
        problems += [f"has tensor(s) it should not have {result.unexpected_keys[:3]}"] if result.unexpected_keys else []
    except RuntimeError as error:  # a tensor of another shape
        found = re.findall(r"size mismatch for (\S+): copying a param with shape torch.Size\((\[.*?\])\) from "
                           r"checkpoint, the shape in current model is torch.Size\((\[.*?\])\)", str(error))
        problems = [f"has {name} of shape {got} where the config needs {need}" for name, got, need in found[:3]]
        problems = problems or [f"cannot be loaded ({error})"]
    if problems:
        model.base_model.unload()
        state = backbone.state_dict()
        with torch.no_grad():
            for key, value in kept.items():
                state[key].copy_(value)
        raise ValueError(f"{path} does not fit {Path(path).parent / 'adapter_config.json'}: it {'; '.join(problems)}. "
                         "The two files come from different saves (or were edited): save them again.")
    return model


def unload_to_original(peft_model) -> torch.nn.Module:
    """PEFT's ``unload()``, but modules saved whole (``modules_to_save``: a task's norms) go back to their original
    values too (PEFT keeps the adapter's copies): the backbone is returned exactly as it was."""
    from peft.utils import ModulesToSaveWrapper

    base = peft_model.base_model.model
    for name, module in list(base.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            parent, _, child = name.rpartition(".")
            setattr(base.get_submodule(parent) if parent else base, child, module.original_module)
    return peft_model.unload()
