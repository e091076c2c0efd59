"""The wheel: built from this checkout and installed into a fresh environment that cannot see the source tree,
it adapts a task, saves an adapter and the task with their model cards (templates read as package data), and
stock PEFT, without the package imported, loads the task and computes the same features."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

ADAPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModel
    import hf_hyperflow
    from hf_hyperflow import HyperFlowAdapter, HyperFlowConfig

    out = Path(sys.argv[1])
    torch.manual_seed(0)
    config = AutoConfig.for_model("vit", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, image_size=32, patch_size=8)
    backbone = AutoModel.from_config(config).eval()
    backbone.save_pretrained(out / "backbone")
    adapter = HyperFlowAdapter(backbone, HyperFlowConfig(steps=2))
    with torch.no_grad():  # an untrained drift network moves nothing: give it random output layers
        for name, parameter in adapter.drift.named_parameters():
            if name.startswith(("state_out", "head_net")):
                parameter.normal_(0, 0.05)
    task = adapter.adapt(torch.randn(6, 3, 32, 32), ["cat", "dog", "bird"] * 2)
    adapter.save_pretrained(out / "adapter")
    task.save_pretrained(out / "task")
    queries = torch.randn(4, 3, 32, 32)
    save_file({"queries": queries, "features": task.embed(queries).contiguous()}, str(out / "expected.safetensors"))
    print(json.dumps({"package": hf_hyperflow.__file__, "classes": task.predict(queries)}))
""")

STOCK_PEFT = textwrap.dedent("""
    import sys
    from pathlib import Path
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModel

    out = Path(sys.argv[1])
    expected = load_file(str(out / "expected.safetensors"))
    model = PeftModel.from_pretrained(AutoModel.from_pretrained(out / "backbone").eval(), out / "task").eval()
    with torch.no_grad():
        features = model.base_model.model(pixel_values=expected["queries"]).last_hidden_state[:, 0]  # ViT: CLS
    scale = float(expected["features"].abs().max())  # 2**10 roundings of float32, as tests/tolerances.py
    torch.testing.assert_close(features, expected["features"], rtol=0, atol=2**10 * torch.finfo(torch.float32).eps * scale)
    assert "hf_hyperflow" not in sys.modules
    print("stock peft ok")
""")


def _run(python: Path, script: str, *args, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    done = subprocess.run([str(python), "-c", script, *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


@pytest.mark.slow  # builds a wheel and a virtual environment (about a minute)
def test_the_installed_wheel_adapts_saves_cards_and_its_task_loads_in_stock_peft(tmp_path):
    wheels = tmp_path / "wheels"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-4000:]
    (wheel,) = wheels.glob("hf_hyperflow-*.whl")
    # A fresh environment: the wheel in its own site-packages; this environment's installed dependencies (torch &
    # co., no second download) after it through a path line, whose own .pth files (this checkout's editable
    # install) are not run.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "installed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                                "--no-index", "-q", str(wheel)], capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr[-4000:]

    work = tmp_path / "work"
    work.mkdir()
    report = json.loads(_run(python, ADAPT, work, cwd=work).strip().splitlines()[-1])
    assert Path(report["package"]).is_relative_to(site), report["package"]  # the wheel's copy, not the checkout
    assert set(report["classes"]) <= {"cat", "dog", "bird"}
    adapter_card = (work / "adapter" / "README.md").read_text()
    assert "library_name: hf-hyperflow" in adapter_card and "HyperFlow" in adapter_card
    task_card = (work / "task" / "README.md").read_text()
    assert "library_name: peft" in task_card and "bird" in task_card
    assert json.loads((work / "task" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert "stock peft ok" in _run(python, STOCK_PEFT, work, cwd=work)
