"""The stock-PEFT export of an adapted task: a plain LoRA config, and the same features computed by stock PEFT in a process that never imports hf_hyperflow, for every backbone."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from conftest import MODEL_TYPES, make_backbone
from conftest import make_random_adapter as make_adapter
from conftest import random_queries as queries
from conftest import random_support as support
from safetensors.torch import load_file, save_file
from tolerances import assert_same_math

from hf_hyperflow.backbones import BACKBONE_TABLE

STOCK_PEFT_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel

    cases = json.load(open(sys.argv[1]))
    out = {}
    for case in cases:
        backbone = AutoModel.from_pretrained(case["backbone"]).eval()
        model = PeftModel.from_pretrained(backbone, case["task"]).eval()
        pixels = load_file(case["pixels"])["pixel_values"]
        with torch.no_grad():
            output = model.base_model.model(pixel_values=pixels)
        if case["pooling"] == "cls":
            features = output.last_hidden_state[:, 0]
        else:
            features = output.pooler_output.flatten(1)
        out[case["model_type"]] = features.contiguous()
    assert "hf_hyperflow" not in sys.modules
    save_file(out, sys.argv[2])
    """
)


@pytest.fixture(scope="module")
def stock_peft_features(tmp_path_factory):
    """Features of every model_type's exported task, computed by stock PEFT in a fresh process."""
    root = tmp_path_factory.mktemp("stock_peft")
    cases, expected = [], {}
    for model_type in MODEL_TYPES:
        adapter = make_adapter(model_type, seed=1)
        backbone_dir = root / f"{model_type}-backbone"
        make_backbone(model_type, seed=1).save_pretrained(backbone_dir)
        task = adapter.adapt(*support(7))
        task.save_pretrained(root / f"{model_type}-task")
        x = queries(8)
        save_file({"pixel_values": x}, str(root / f"{model_type}-pixels.safetensors"))
        expected[model_type] = task.embed(x)
        cases.append({"model_type": model_type, "backbone": str(backbone_dir), "task": str(root / f"{model_type}-task"),
                      "pixels": str(root / f"{model_type}-pixels.safetensors"),
                      "pooling": BACKBONE_TABLE[model_type].pooling})
    (root / "cases.json").write_text(json.dumps(cases))
    script = root / "stock.py"
    script.write_text(STOCK_PEFT_SCRIPT)
    result = subprocess.run([sys.executable, str(script), str(root / "cases.json"), str(root / "out.safetensors")],
                            capture_output=True, text=True, timeout=600, env={**__import__("os").environ,
                                                                              "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return expected, load_file(str(root / "out.safetensors"))


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_stock_peft_export_reproduces_task_embed(model_type, stock_peft_features):
    expected, got = stock_peft_features
    assert_same_math(got[model_type], expected[model_type])


def test_exported_config_is_plain_lora(tmp_path):
    adapter = make_adapter("vit")
    adapter.adapt(*support()).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["init_lora_weights"] is False
    assert config["lora_bias"] is True
    assert "layers.0.attention.k_proj" in config["target_modules"]  # shift only: zero LoRA + lora_B bias
    assert sorted(config["modules_to_save"]) == sorted(
        [f"layers.{i}.{n}" for i in range(2) for n in ("layernorm_before", "layernorm_after")]
    )
    assert json.loads((tmp_path / "hyperflow_task.json").read_text())["classes"] == [0, 1, 2]
