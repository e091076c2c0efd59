"""Reading saved files with errors that say which file is broken and what to do."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

__all__ = ["load_safetensors_checked", "read_json_checked"]


def load_safetensors_checked(path: str | os.PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file; a corrupt or truncated file raises ValueError naming it.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file cannot be parsed (truncated download, interrupted save, not safetensors).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist.")
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(
            f"{path} is corrupt or truncated ({error}). Download or save it again."
        ) from error


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
