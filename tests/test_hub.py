"""Hub plumbing against a loopback Hub: the real huggingface_hub client over real HTTP.

The server runs in this process (``LoopbackHub``); the client runs in a ``HubClient`` process whose
``HF_ENDPOINT`` / ``HF_HOME`` / ``HF_TOKEN`` are set before huggingface_hub is imported (see
tests/hub_server.py for why it cannot be this process). Card rendering and local-folder checks need no
Hub and run here.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE_RESULTS as RESULTS
from hub_server import HubClient, LoopbackHub, RemoteError
from PIL import Image
from safetensors.numpy import save as save_safetensors

from hf_hyperflow.hub import resolve_pretrained_folder

HUB = "hf_hyperflow.hub"
USER = "loopback-user"


@pytest.fixture(scope="module")
def hub():
    with LoopbackHub() as server:
        yield server
        assert server.server_errors == [], "\n".join(server.server_errors)


@pytest.fixture(scope="module")
def client(hub, tmp_path_factory):
    with HubClient(hub, tmp_path_factory.mktemp("hf-home")) as process:
        yield process


def write_folder(folder: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


def read_folder(folder: str | Path) -> dict[str, bytes]:
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def adapter_files(version: int) -> dict[str, bytes]:
    rng = np.random.default_rng(version)
    weights = {"drift.trunk.weight": rng.standard_normal((64, 32)).astype(np.float32),
               "drift.trunk.bias": rng.standard_normal(64).astype(np.float32)}
    config = {"peft_type": "HYPERFLOW", "base_model_name_or_path": "facebook/dinov2-small",
              "groups": ["lora", "head"], "r": 4, "lora_alpha": 8.0, "integrator": "rk4", "steps": 4,
              "backbone_model_type": "dinov2", "feature_size": 384, "target_modules": ["query", "value"],
              "version": version}
    return {"adapter_config.json": json.dumps(config).encode(),
            "adapter_model.safetensors": save_safetensors(weights),
            "notes/history.txt": f"version {version}\n".encode()}


# ------------------------------------------------------------------------------------ push and pull
def test_push_then_resolve_in_fresh_cache_gives_identical_files(hub, client, tmp_path):
    folder = write_folder(tmp_path / "adapter", adapter_files(1))
    info = client.call(f"{HUB}:push_folder_to_hub", str(folder), f"{USER}/round-trip")

    assert info["oid"] == hub.head(f"{USER}/round-trip")
    assert hub.read_files(f"{USER}/round-trip") == {**read_folder(folder), ".gitattributes": hub.read_files(
        f"{USER}/round-trip")[".gitattributes"]}
    cache = tmp_path / "fresh-cache"
    local = Path(client.call(f"{HUB}:resolve_pretrained_folder", f"{USER}/round-trip", cache_dir=str(cache),
                             required_files=["adapter_config.json", "adapter_model.safetensors"]))
    assert local.is_relative_to(cache) and local.name == info["oid"]
    downloaded = read_folder(local)
    assert downloaded.pop(".gitattributes").startswith(b"*.bin filter=lfs")
    assert downloaded == read_folder(folder)


def test_second_push_is_a_new_commit_and_revision_loads_the_old_one(hub, client, tmp_path):
    repo = f"{USER}/two-versions"
    first = client.call(f"{HUB}:push_folder_to_hub", str(write_folder(tmp_path / "v1", adapter_files(1))), repo,
                        commit_message="first version")
    second = client.call(f"{HUB}:push_folder_to_hub", str(write_folder(tmp_path / "v2", adapter_files(2))), repo)

    assert first["oid"] != second["oid"]
    history = hub.history(repo)
    assert [c["id"] for c in history[:2]] == [second["oid"], first["oid"]]
    assert [c["title"] for c in history] == ["Upload v2 with hf-hyperflow", "first version", "initial commit"]
    cache = str(tmp_path / "cache")
    old = client.call(f"{HUB}:resolve_pretrained_folder", repo, revision=first["oid"], cache_dir=cache)
    new = client.call(f"{HUB}:resolve_pretrained_folder", repo, cache_dir=cache)
    assert {k: v for k, v in read_folder(old).items() if k != ".gitattributes"} == adapter_files(1)
    assert {k: v for k, v in read_folder(new).items() if k != ".gitattributes"} == adapter_files(2)


def test_a_renamed_repo_resolves_at_its_old_id_through_a_redirect(hub, client, tmp_path):
    pushed = client.call(f"{HUB}:push_folder_to_hub", str(write_folder(tmp_path / "a", adapter_files(6))),
                         f"{USER}/old-name")
    client.exec("from huggingface_hub import HfApi\nHfApi().move_repo(old, new)", old=f"{USER}/old-name",
                new=f"{USER}/new-name")
    start = len(hub.requests)
    local = client.call(f"{HUB}:resolve_pretrained_folder", f"{USER}/old-name", cache_dir=str(tmp_path / "c"))
    assert Path(local).name == pushed["oid"] == hub.head(f"{USER}/new-name")
    assert {k: v for k, v in read_folder(local).items() if k != ".gitattributes"} == adapter_files(6)
    redirects = [r for r in hub.requests_since(start) if r[2] == 307]
    assert ("GET", f"/api/models/{USER}/old-name/revision/main", 307) in redirects
    assert any(r[:2] == ("HEAD", f"/{USER}/old-name/resolve/{pushed['oid']}/adapter_config.json") for r in redirects)


def test_unchanged_push_makes_no_commit(hub, client, tmp_path):
    folder = str(write_folder(tmp_path / "same", adapter_files(3)))
    first = client.call(f"{HUB}:push_folder_to_hub", folder, f"{USER}/unchanged")
    again = client.call(f"{HUB}:push_folder_to_hub", folder, f"{USER}/unchanged")
    assert again["oid"] == first["oid"] == hub.head(f"{USER}/unchanged")
    assert len(hub.history(f"{USER}/unchanged")) == 2


def test_push_to_a_branch_and_a_pull_request_leaves_main_alone(hub, client, tmp_path):
    repo = "loopback-org/branches"
    main = client.call(f"{HUB}:push_folder_to_hub", str(write_folder(tmp_path / "v1", adapter_files(1))), repo)
    dev = client.call(f"{HUB}:push_folder_to_hub", str(write_folder(tmp_path / "v2", adapter_files(2))), repo,
                      revision="dev")
    pr = client.call(f"{HUB}:push_folder_to_hub", str(write_folder(tmp_path / "v3", adapter_files(3))), repo,
                     create_pr=True)

    assert hub.head(repo) == main["oid"]
    assert hub.head(repo, "dev") == dev["oid"] and hub.history(repo, "dev")[1]["id"] == main["oid"]
    assert hub.head(repo, "refs/pr/1") == pr["oid"] and pr["pr_url"].endswith("/discussions/1")
    assert hub.read_files(repo, "dev")["adapter_config.json"] == adapter_files(2)["adapter_config.json"]
    local = client.call(f"{HUB}:resolve_pretrained_folder", repo, revision="dev", cache_dir=str(tmp_path / "c"))
    assert read_folder(local)["notes/history.txt"] == b"version 2\n"


def test_private_repo_needs_a_token_to_download(client, tmp_path):
    repo = f"{USER}/private-adapter"
    client.call(f"{HUB}:push_folder_to_hub", str(write_folder(tmp_path / "p", adapter_files(4))), repo, private=True)
    with pytest.raises(RemoteError) as caught:
        client.call(f"{HUB}:resolve_pretrained_folder", repo, token=False, cache_dir=str(tmp_path / "anon"))
    assert caught.value.is_a(f"{HUB}.HubNotFoundError")
    assert f"There is no repo '{repo}'" in caught.value.message
    assert "if the repo is private, log in with `hf auth login`" in caught.value.message
    assert caught.value.chain[0][0] == "huggingface_hub.errors.RepositoryNotFoundError"
    local = client.call(f"{HUB}:resolve_pretrained_folder", repo, cache_dir=str(tmp_path / "auth"))
    assert read_folder(local)["notes/history.txt"] == b"version 4\n"


# ------------------------------------------------------------------------------------ errors
def test_push_without_a_token_fails_before_any_request(hub, client, tmp_path):
    folder = str(write_folder(tmp_path / "a", adapter_files(1)))
    start = len(hub.requests)
    client.set_env(HF_TOKEN=None)
    try:
        with pytest.raises(RemoteError) as caught:
            client.call(f"{HUB}:push_folder_to_hub", folder, f"{USER}/no-token")
    finally:
        client.set_env(HF_TOKEN=hub.token)
    assert caught.value.is_a(f"{HUB}.HubAuthError") and caught.value.is_a("builtins.PermissionError")
    assert caught.value.message == (
        f"Pushing to '{USER}/no-token' needs a Hugging Face token with write access, and none was found: log in "
        "with `hf auth login` (formerly `huggingface-cli login`) or set HF_TOKEN, or pass token=.")
    assert hub.requests_since(start) == []
    assert hub.head(f"{USER}/no-token") is None


def test_push_with_a_rejected_token_uploads_nothing(hub, client, tmp_path):
    folder = str(write_folder(tmp_path / "a", adapter_files(1)))
    start = len(hub.requests)
    with pytest.raises(RemoteError) as caught:
        client.call(f"{HUB}:push_folder_to_hub", folder, f"{USER}/bad-token", token="hf_not_a_real_token")
    assert caught.value.is_a(f"{HUB}.HubAuthError")
    assert "refused the token" in caught.value.message and "(401)" in caught.value.message
    assert "Nothing was uploaded" in caught.value.message
    assert [r[:2] for r in hub.requests_since(start)] == [("GET", "/api/whoami-v2")]


def test_push_outside_the_users_namespaces_is_refused(hub, client, tmp_path):
    folder = str(write_folder(tmp_path / "a", adapter_files(1)))
    with pytest.raises(RemoteError) as caught:
        client.call(f"{HUB}:push_folder_to_hub", folder, "someone-else/adapter")
    assert caught.value.is_a(f"{HUB}.HubAuthError") and "(403)" in caught.value.message
    assert hub.head("someone-else/adapter") is None


def test_resolve_a_repo_that_does_not_exist(client, tmp_path):
    with pytest.raises(RemoteError) as caught:
        client.call(f"{HUB}:resolve_pretrained_folder", f"{USER}/no-such-repo", cache_dir=str(tmp_path))
    assert caught.value.is_a(f"{HUB}.HubNotFoundError") and caught.value.is_a("builtins.FileNotFoundError")
    assert caught.value.message.startswith(f"There is no repo '{USER}/no-such-repo' on http://127.0.0.1:")
    assert "Check the repo id (namespace/name)" in caught.value.message
    assert caught.value.chain[0][0] == "huggingface_hub.errors.RepositoryNotFoundError"


def test_resolve_a_revision_that_does_not_exist(client, tmp_path):
    repo = f"{USER}/revisions"
    client.call(f"{HUB}:push_folder_to_hub", str(write_folder(tmp_path / "a", adapter_files(1))), repo)
    with pytest.raises(RemoteError) as caught:
        client.call(f"{HUB}:resolve_pretrained_folder", repo, revision="v9", cache_dir=str(tmp_path / "c"))
    assert caught.value.is_a(f"{HUB}.HubNotFoundError")
    assert f"The repo '{repo}' on http://127.0.0.1:" in caught.value.message
    assert "has no revision 'v9'. Check the branch, tag or commit id" in caught.value.message
    assert caught.value.chain[0][0] == "huggingface_hub.errors.RevisionNotFoundError"


def test_resolve_a_repo_without_a_required_file(hub, client, tmp_path):
    repo = f"{USER}/missing-file"
    client.call(f"{HUB}:push_folder_to_hub", str(write_folder(tmp_path / "a", {"other.json": b"{}"})), repo)
    with pytest.raises(RemoteError) as caught:
        client.call(f"{HUB}:resolve_pretrained_folder", repo, cache_dir=str(tmp_path / "c"),
                    required_files=["other.json", "adapter_config.json"])
    assert caught.value.is_a(f"{HUB}.HubNotFoundError")
    assert (f"(revision 'main', commit {hub.head(repo)}) has no file 'adapter_config.json'; it has "
            "['.gitattributes', 'other.json']") in caught.value.message


@pytest.mark.parametrize("mode", ["error", "disconnect"])
def test_server_failing_mid_upload_raises_and_main_keeps_the_previous_commit(hub, client, tmp_path, mode):
    repo = f"{USER}/failing-{mode}"
    first = client.call(f"{HUB}:push_folder_to_hub", str(write_folder(tmp_path / "v1", adapter_files(1))), repo)
    v2 = str(write_folder(tmp_path / "v2", adapter_files(2)))
    hub.fail_commits(1, mode)
    with pytest.raises(RemoteError) as caught:
        client.call(f"{HUB}:push_folder_to_hub", v2, repo)
    assert caught.value.is_a(f"{HUB}.HubUploadError")
    assert f"'main' still points at {first['oid']}: nothing was committed. Run the push again." in caught.value.message
    assert caught.value.chain[0][0] == ("huggingface_hub.errors.HfHubHTTPError" if mode == "error"
                                        else "httpx2.RemoteProtocolError")
    assert hub.head(repo) == first["oid"] and len(hub.history(repo)) == 2
    assert hub.read_files(repo)["adapter_config.json"] == adapter_files(1)["adapter_config.json"]
    again = client.call(f"{HUB}:push_folder_to_hub", v2, repo)
    assert hub.head(repo) == again["oid"] != first["oid"]


def test_invalid_card_metadata_is_refused_before_anything_is_committed(hub, client, tmp_path):
    repo = f"{USER}/bad-card"
    first = client.call(f"{HUB}:push_folder_to_hub", str(write_folder(tmp_path / "v1", adapter_files(1))), repo)
    folder = write_folder(tmp_path / "v2", {**adapter_files(2), "README.md": b"---\ntags: 5\n---\n# card\n"})
    with pytest.raises(RemoteError) as caught:
        client.call(f"{HUB}:push_folder_to_hub", str(folder), repo)
    assert caught.value.is_a("builtins.ValueError")
    assert caught.value.message == 'Invalid metadata in README.md.\n- "tags" must be a string or a list of strings'
    assert hub.head(repo) == first["oid"]


@pytest.mark.parametrize(("args", "kwargs", "error", "message"), [
    (["missing-folder", "a/b"], {}, "builtins.FileNotFoundError", "There is no folder at missing-folder to push."),
    (["FOLDER", "not a repo id"], {}, "builtins.ValueError", "'not a repo id' is not a valid Hub repo id"),
    (["FOLDER", "a/b"], {"revision": "0" * 40}, "builtins.ValueError", "a commit id cannot be pushed to"),
    (["FOLDER", "a/b"], {"revision": "dev", "create_pr": True}, "builtins.ValueError",
     "create_pr=True opens a pull request against main; it cannot be combined with revision='dev'."),
    (["FOLDER", "a/b"], {"commit_message": " "}, "builtins.ValueError", "commit_message must be a non-empty string"),
    (["EMPTY", "a/b"], {}, "builtins.ValueError", "has no files to push."),
    (["FOLDER", "a/b"], {"private": "yes"}, "builtins.TypeError", "private must be True, False or None, got 'yes'."),
])
def test_push_argument_errors_come_before_any_request(hub, client, tmp_path, args, kwargs, error, message):
    (tmp_path / "empty").mkdir()
    folder = write_folder(tmp_path / "f", {"a.txt": b"a"})
    args = [str(folder) if a == "FOLDER" else str(tmp_path / "empty") if a == "EMPTY" else a for a in args]
    start = len(hub.requests)
    with pytest.raises(RemoteError) as caught:
        client.call(f"{HUB}:push_folder_to_hub", *args, **kwargs)
    assert caught.value.is_a(error) and message in caught.value.message
    assert hub.requests_since(start) == []


@pytest.mark.slow  # a second client process (about 8 s of imports)
@pytest.mark.parametrize("situation", ["hub down", "offline"])
def test_unreachable_hub_or_offline_mode_is_a_clear_error(hub, tmp_path, situation):
    """The Hub stopped answering, or HF_HUB_OFFLINE=1 with nothing cached: HubUnavailableError says which."""
    gone = LoopbackHub().start() if situation == "hub down" else hub
    env = {"HF_HUB_OFFLINE": "1"} if situation == "offline" else {}
    url = gone.url
    with HubClient(gone, tmp_path / "home", env=env) as process:
        if situation == "hub down":
            gone.stop()
        start = len(hub.requests)
        with pytest.raises(RemoteError) as caught:
            process.call(f"{HUB}:resolve_pretrained_folder", f"{USER}/anything")
    assert caught.value.is_a(f"{HUB}.HubUnavailableError") and caught.value.is_a("builtins.ConnectionError")
    assert caught.value.message.startswith(
        f"Could not download '{USER}/anything' on {url} (revision 'main') and the local cache does not have it.")
    if situation == "offline":
        assert caught.value.message.endswith("HF_HUB_OFFLINE is set, so nothing is downloaded: unset it (or "
                                             "download it once online).")
        assert hub.requests_since(start) == []
    else:
        assert "Check the connection and HF_ENDPOINT, then try again" in caught.value.message
    assert caught.value.chain[0][0] == "huggingface_hub.errors.LocalEntryNotFoundError"


@pytest.mark.slow  # a second client process (about 8 s of imports)
def test_xet_upload_pipeline_round_trip_and_a_retried_transient_failure(hub, tmp_path):
    """With hf_xet enabled (the client's default), upload_folder uses the streamed pipeline, which retries a
    failed commit: one transient 500 still gives exactly one new commit."""
    repo = f"{USER}/xet-pipeline"
    with HubClient(hub, tmp_path / "home", xet=True) as process:
        assert process.exec("from huggingface_hub.utils._runtime import is_xet_available; result = is_xet_available()")
        first = process.call(f"{HUB}:push_folder_to_hub", str(write_folder(tmp_path / "v1", adapter_files(1))), repo)
        hub.fail_commits(1, "error")
        second = process.call(f"{HUB}:push_folder_to_hub", str(write_folder(tmp_path / "v2", adapter_files(2))), repo)
        local = process.call(f"{HUB}:resolve_pretrained_folder", repo, revision=first["oid"])
    assert [c["id"] for c in hub.history(repo)[:2]] == [second["oid"], first["oid"]]
    assert len(hub.history(repo)) == 3
    assert {k: v for k, v in read_folder(local).items() if k != ".gitattributes"} == adapter_files(1)


# ------------------------------------------------------------------------------------ local folders
def test_resolve_local_folder_returns_it_and_checks_required_files(tmp_path):
    folder = write_folder(tmp_path / "saved", adapter_files(1))
    assert resolve_pretrained_folder(folder, required_files=["adapter_config.json", "notes/history.txt"]) == folder
    assert resolve_pretrained_folder(str(folder)) == folder
    with pytest.raises(FileNotFoundError, match=r"^preprocessor_config.json is missing from the folder .*saved: "):
        resolve_pretrained_folder(folder, required_files=["adapter_config.json", "preprocessor_config.json"])


@pytest.mark.parametrize(("value", "kwargs", "error", "match"), [
    ("SAVED", {"revision": "main"}, ValueError, "revision='main' applies to Hub repos, but .* is a local folder"),
    ("./not-here", {}, FileNotFoundError, "There is no folder at not-here"),
    ("a/b/c", {}, FileNotFoundError, "There is no folder at a/b/c"),
    ("no-namespace", {}, FileNotFoundError, "There is no folder at no-namespace.*'namespace/name'"),
    ("bad/repo id", {}, ValueError, "'bad/repo id' is neither an existing local folder nor a valid Hub repo id"),
    ("FILE", {}, ValueError, r"is a file; pass the folder that holds it"),
    (3, {}, TypeError, "path_or_repo_id must be a folder path or a Hub repo id, got int"),
    ("SAVED", {"required_files": "adapter_config.json"}, TypeError, "required_files must be a sequence"),
])
def test_resolve_argument_errors(tmp_path, value, kwargs, error, match):
    saved = write_folder(tmp_path / "saved", adapter_files(1))
    value = str(saved) if value == "SAVED" else str(saved / "adapter_config.json") if value == "FILE" else value
    with pytest.raises(error, match=match):
        resolve_pretrained_folder(value, **kwargs)


# ------------------------------------------------------------------------------------ the push recipe
def run_push_recipe(client: HubClient, argv: list[str]) -> int:
    """``python recipes/push.py ARGV`` in the client process (its imports are already warm there)."""
    return client.exec("import runpy\nresult = runpy.run_path('recipes/push.py')['main'](argv)", argv=argv)


def test_push_recipe_renders_the_card_and_pushes_the_folder(hub, client, tmp_path):
    folder = write_folder(tmp_path / "out", adapter_files(5))
    results = tmp_path / "results.json"
    results.write_text(json.dumps(RESULTS))
    repo = f"{USER}/recipe-adapter"
    assert run_push_recipe(client, ["--folder", str(folder), "--repo_id", repo, "--results", str(results),
                                    "--datasets", "[emoji-google]", "--commit_message", "recipe push"]) == 0

    pushed = hub.read_files(repo)
    assert pushed["adapter_model.safetensors"] == adapter_files(5)["adapter_model.safetensors"]
    assert pushed["README.md"] == (folder / "README.md").read_bytes()
    with Image.open(io.BytesIO(pushed["accuracy_vs_latency.png"])) as image:
        assert image.format == "PNG"
    assert hub.history(repo)[0]["title"] == "recipe push"
    card = client.exec("from huggingface_hub import ModelCard\ncard = ModelCard.load(repo)\n"
                       "result = [card.data.to_dict(), card.text]", repo=repo)
    metadata, text = card
    assert metadata["base_model"] == "facebook/dinov2-small" and metadata["datasets"] == ["emoji-google"]
    assert [r["metrics"][0]["value"] for r in metadata["model-index"][0]["results"]] == [71.23, 45.5]
    assert "| Drift network | 2,112 parameters (8.2 KiB on disk) |" in text  # 64 * 32 + 64 float32
    assert "| LoRA rank / alpha | 4 / 8.0 |" in text and "| Integrator | rk4, 4 steps |" in text
    assert "![Accuracy against adaptation latency](accuracy_vs_latency.png)" in text


def test_push_recipe_for_an_adapted_task(hub, client, tmp_path):
    task = {"classes": ["cat", "dog"], "backbone_model_type": "dinov2", "feature_size": 384}
    lora = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["query"],
            "base_model_name_or_path": None}
    folder = write_folder(tmp_path / "task", {"hyperflow_task.json": json.dumps(task).encode(),
                                              "adapter_config.json": json.dumps(lora).encode()})
    with pytest.raises(RemoteError) as caught:
        run_push_recipe(client, ["--folder", str(folder), "--repo_id", f"{USER}/task", "--card_only", "true"])
    assert caught.value.is_a("builtins.ValueError")
    assert "does not say which HyperFlow adapter made the task: pass --source_adapter" in caught.value.message
    assert run_push_recipe(client, ["--folder", str(folder), "--repo_id", f"{USER}/task", "--source_adapter",
                                    f"{USER}/recipe-adapter", "--base_model", "facebook/dinov2-small"]) == 0
    readme = hub.read_files(f"{USER}/task")["README.md"].decode()
    assert "library_name: peft" in readme and "| 1 | dog |" in readme
    assert f"HyperFlow adapter [`{USER}/recipe-adapter`]" in readme
