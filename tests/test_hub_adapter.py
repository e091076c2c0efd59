"""HyperFlow adapters and adapted tasks through a loopback Hub, with the real huggingface_hub client over HTTP.

One client process pushes, another one with an empty HF cache loads (see tests/hub_server.py for why the
client runs in its own process).
"""

from __future__ import annotations

import numpy as np
import pytest
from hub_server import HubClient, LoopbackHub, RemoteError
from huggingface_hub import ModelCard

USER = "loopback-user"
SETUP = """
import sys, torch
sys.path.insert(0, 'tests')
from conftest import make_backbone, randomize_drift
from hf_hyperflow import AdaptedTask, HyperFlowAdapter, HyperFlowConfig
images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
labels = ['cat', 'dog', 'owl'] * 2
queries = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
"""


@pytest.fixture(scope="module")
def hub():
    with LoopbackHub() as server:
        yield server


@pytest.fixture(scope="module")
def pusher(hub, tmp_path_factory):
    with HubClient(hub, tmp_path_factory.mktemp("pusher-home")) as process:
        yield process


@pytest.fixture(scope="module")
def loader(hub, tmp_path_factory):
    with HubClient(hub, tmp_path_factory.mktemp("loader-home")) as process:
        yield process


@pytest.fixture(scope="module")
def pushed(pusher):
    """Push an adapter twice (two drift networks) and a task; return ids and the pusher's logits."""
    return pusher.exec(SETUP + f"""
adapter = HyperFlowAdapter(make_backbone('vit'), HyperFlowConfig(steps=2))
randomize_drift(adapter, seed=1)
first = adapter.push_to_hub('{USER}/hf-adapter', commit_message='first drift')
logits_first = adapter.adapt(images, labels).logits(queries).tolist()
randomize_drift(adapter, seed=2)
second = adapter.push_to_hub('{USER}/hf-adapter', commit_message='second drift')
task = adapter.adapt(images, labels)
task.push_to_hub('{USER}/hf-task')
result = dict(first=first.oid, second=second.oid, logits_first=logits_first,
              logits_second=task.logits(queries).tolist(), task_embed=task.embed(queries).tolist())
""")


def test_push_then_load_in_a_fresh_cache_gives_equal_logits(pushed, loader):
    got = loader.exec(SETUP + f"""
adapter = HyperFlowAdapter.from_pretrained(make_backbone('vit'), '{USER}/hf-adapter')
result = dict(logits=adapter.adapt(images, labels).logits(queries).tolist(), revision=adapter.revision)
""")
    assert got["revision"] == pushed["second"]
    np.testing.assert_allclose(got["logits"], pushed["logits_second"], atol=1e-5)


def test_revision_loads_the_older_commit(pushed, loader):
    assert pushed["first"] != pushed["second"]
    got = loader.exec(SETUP + f"""
adapter = HyperFlowAdapter.from_pretrained(make_backbone('vit'), '{USER}/hf-adapter', revision='{pushed['first']}')
result = adapter.adapt(images, labels).logits(queries).tolist()
""")
    np.testing.assert_allclose(got, pushed["logits_first"], atol=1e-5)
    assert np.abs(np.array(got) - np.array(pushed["logits_second"])).max() > 1e-3


def test_peft_model_from_pretrained_by_hub_id(pushed, loader):
    got = loader.exec(SETUP + f"""
from peft import PeftModel
model = PeftModel.from_pretrained(make_backbone('vit'), '{USER}/hf-adapter')
adapter = HyperFlowAdapter(model)
result = adapter.adapt(images, labels).logits(queries).tolist()
""")
    np.testing.assert_allclose(got, pushed["logits_second"], atol=1e-5)


def test_pushed_task_loads_with_stock_peft_and_with_its_head(pushed, loader):
    got = loader.exec(SETUP + f"""
from peft import PeftModel
model = PeftModel.from_pretrained(make_backbone('vit'), '{USER}/hf-task').eval()
with torch.no_grad():
    stock = model.base_model.model(pixel_values=queries).last_hidden_state[:, 0]
task = AdaptedTask.from_pretrained(make_backbone('vit'), '{USER}/hf-task')
result = dict(stock=stock.tolist(), logits=task.logits(queries).tolist(), classes=task.classes)
""")
    assert got["classes"] == ["cat", "dog", "owl"]
    np.testing.assert_allclose(got["stock"], pushed["task_embed"], atol=1e-5)
    np.testing.assert_allclose(got["logits"], pushed["logits_second"], atol=1e-5)


def test_cards_parse_back(pushed, hub):
    adapter_card = ModelCard(hub.read_files(f"{USER}/hf-adapter")["README.md"].decode())
    assert adapter_card.data.library_name == "hf-hyperflow"
    assert "hyperflow" in adapter_card.data.tags
    assert "HyperFlowAdapter.from_pretrained" in adapter_card.text
    task_card = ModelCard(hub.read_files(f"{USER}/hf-task")["README.md"].decode())
    assert task_card.data.library_name == "peft"
    for name in ("cat", "dog", "owl"):
        assert name in task_card.text
    assert f"{USER}/hf-adapter" in task_card.text


def test_adapter_for_another_backbone_from_the_hub(pushed, loader):
    with pytest.raises(RemoteError) as error:
        loader.exec(SETUP + f"HyperFlowAdapter.from_pretrained(make_backbone('dinov2'), '{USER}/hf-adapter')")
    assert error.value.is_a("builtins.ValueError")
    assert "made for a 'vit' backbone" in error.value.message


def test_missing_repo_and_missing_token(hub, tmp_path):
    with HubClient(hub, tmp_path / "home", token=False) as client:
        with pytest.raises(RemoteError) as error:
            client.exec(SETUP + f"HyperFlowAdapter.from_pretrained(make_backbone('vit'), '{USER}/no-such-adapter')")
        assert error.value.is_a("builtins.FileNotFoundError")
        with pytest.raises(RemoteError) as error:
            client.exec(SETUP + f"HyperFlowAdapter(make_backbone('vit')).push_to_hub('{USER}/new-adapter')")
        assert error.value.is_a("builtins.PermissionError")
        assert "token" in error.value.message.lower()
