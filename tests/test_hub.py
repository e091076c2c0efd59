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
from hub_server import HubClient, LoopbackHub, RemoteError
from huggingface_hub import EvalResult, ModelCard
from PIL import Image
from safetensors.numpy import save as save_safetensors

from hf_hyperflow.cards import AdapterCardData, TaskCardData, render_adapter_card, render_task_card
from hf_hyperflow.hub import resolve_pretrained_folder
from hf_hyperflow.results import load_results, save_results_plot, validate_results

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


RESULTS = {
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


def card_data(**overrides) -> AdapterCardData:
    values = dict(repo_id="org/hyperflow-dinov2-small", base_model="facebook/dinov2-small",
                  backbone_model_type="dinov2", feature_size=384, groups=["lora", "shift", "head"],
                  target_modules=["query", "value"], lora_rank=4, lora_alpha=8.0, integrator="rk4", steps=4,
                  drift_parameters=1_234_567, drift_bytes=4_938_268,
                  training_config={"lr": 0.001, "loss": {"flow": 1.0, "unrolled": 0.5}},
                  training_datasets=["emoji-google", "noto-fonts"], results=json.loads(json.dumps(RESULTS)),
                  plot_path="accuracy_vs_latency.png", tags=["efficient"])
    values.update(overrides)
    return AdapterCardData(**values)


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


# ------------------------------------------------------------------------------------ results
def test_load_results_reads_a_valid_file(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(RESULTS))
    assert load_results(path) == RESULTS


def _broken(change) -> dict:
    data = json.loads(json.dumps(RESULTS))
    change(data)
    return data


@pytest.mark.parametrize(("data", "message"), [
    ([], "should hold a JSON object, got list"),
    ({"meta": {}}, "missing ['results']"),
    (_broken(lambda d: d["meta"].pop("backbone")), "meta.backbone must be a non-empty string, got None"),
    (_broken(lambda d: d["meta"].update(ways=0)), "meta.ways must be a positive integer (or null), got 0"),
    (_broken(lambda d: d.update(results={})), "'results' must be a non-empty object"),
    (_broken(lambda d: d["results"]["emoji"]["dt"].update(accuracy=171.0)),
     "results['emoji']['dt'].accuracy must be a number in [0, 100] (percent), got 171.0"),
    (_broken(lambda d: d["results"]["emoji"]["dt"].update(accuracy=float("nan"))), ".accuracy must be a number"),
    (_broken(lambda d: d["results"]["fonts"]["hyperflow"].update(ci95=-1)), "['hyperflow'].ci95 must be a number >= 0"),
    (_broken(lambda d: d["results"]["fonts"]["dt"].pop("episodes")), "['dt'].episodes must be a positive integer"),
    (_broken(lambda d: d["results"]["emoji"]["hyperflow"].update(latency_vs_dt="fast")),
     "['hyperflow'].latency_vs_dt must be a number >= 0 (or absent), got 'fast'"),
    (_broken(lambda d: d["results"]["emoji"].update(dt=[1])), "results['emoji']['dt'] must be an object of metrics"),
])
def test_results_schema_errors_name_the_field(tmp_path, data, message):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError) as caught:
        load_results(path)
    assert str(caught.value).startswith(f"{path}") and message in str(caught.value)


def test_load_results_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_results(tmp_path / "absent.json")
    (tmp_path / "cut.json").write_text('{"meta": {')
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_results(tmp_path / "cut.json")


def test_results_plot_is_a_png_and_needs_latencies(tmp_path):
    path = save_results_plot(RESULTS, tmp_path / "plot" / "accuracy_vs_latency.png", highlight="hyperflow")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 600 and image.height > 300
    no_latency = _broken(lambda d: [m.pop("adapt_latency_s", None) for per in d["results"].values()
                                    for m in per.values()])
    with pytest.raises(ValueError, match="No method in the results has adapt_latency_s"):
        save_results_plot(no_latency, tmp_path / "x.png")


# ------------------------------------------------------------------------------------ cards
def test_adapter_card_round_trips_metadata_and_eval_results(tmp_path):
    card = render_adapter_card(card_data())
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")

    data = loaded.data.to_dict()
    assert data["library_name"] == "hf-hyperflow" and data["license"] == "apache-2.0"
    assert data["base_model"] == "facebook/dinov2-small" and data["base_model_relation"] == "adapter"
    assert data["pipeline_tag"] == "image-classification"
    assert data["datasets"] == ["emoji-google", "noto-fonts"]
    assert data["tags"] == ["hyperflow", "peft", "few-shot", "image-classification", "dinov2", "efficient"]
    task = "Few-shot image classification (5-way 5-shot, 15 queries per class, 128 px images, fixed episodes)"
    assert loaded.data.model_name == "hyperflow-dinov2-small"
    assert loaded.data.eval_results == [
        EvalResult(task_type="image-classification", task_name=task, dataset_type=name, dataset_name=name,
                   metric_type="accuracy", metric_value=accuracy, metric_name=f"accuracy (%, mean of {n} episodes)",
                   metric_args={"ci95": ci, "episodes": n, "method": "hyperflow"})
        for name, accuracy, ci, n in (("emoji", 71.23, 1.31, 600), ("fonts", 45.5, 2.1, 300))
    ]
    text = loaded.text
    assert "| emoji | **hyperflow** | 71.2 | ± 1.3 | 600 | 50.0 ms | – | – | 4.17× | 0.0125× | 0.05× |" in text
    assert "| emoji | dt | 61.0 | ± 1.5 | 600 | 12.0 ms | 4.0 ms | 100.0 MiB | 1× | 0.003× | 0.2× |" in text
    assert "| emoji | ft-full | 75.0 | ± 1.2 | 600 | 4.00 s | – | 500.0 MiB | – | – | – |" in text
    assert "| fonts | dt | 40.0 | ± 2.0 | 300 | – | – | – | – | – | – |" in text
    assert "![Accuracy against adaptation latency](accuracy_vs_latency.png)" in text
    assert 'HyperFlowAdapter.from_pretrained(backbone, "org/hyperflow-dinov2-small")' in text
    assert 'AutoModel.from_pretrained("facebook/dinov2-small")' in text
    assert 'PeftModel.from_pretrained(backbone, "org/hyperflow-dinov2-small")' in text
    assert "| Drift network | 1,234,567 parameters (4.7 MiB on disk) |" in text
    assert "| Integrator | rk4, 4 steps |" in text
    assert "```yaml\nlr: 0.001\nloss:\n  flow: 1.0\n  unrolled: 0.5\n```" in text
    assert "python recipes/evaluate.py --adapter out/adapter" in text
    assert "## Limitations" in text


def test_adapter_card_without_results_or_hub_backbone(tmp_path):
    card = render_adapter_card(card_data(results=None, plot_path=None, base_model="effnet-lite0-local",
                                         training_datasets=[], training_config={}))
    data = card.data.to_dict()
    assert "model-index" not in data and "base_model" not in data and "datasets" not in data
    assert "No evaluation results were attached to this card." in card.text
    assert 'AutoModel.from_pretrained("path/to/effnet-lite0-local")' in card.text
    assert "`effnet-lite0-local` is not on the Hub: load the same checkpoint from a local folder." in card.text
    assert "The training data was not recorded." in card.text and "![" not in card.text


def test_adapter_card_picks_the_single_hyperflow_method_or_asks():
    results = _broken(lambda d: [per.__setitem__("hyperflow:rk4:4", per.pop("hyperflow"))
                                 for per in d["results"].values()])
    assert card_data(results=results).eval_method == "hyperflow:rk4:4"
    results["results"]["emoji"]["hyperflow:euler:8"] = dict(results["results"]["emoji"]["dt"])
    with pytest.raises(ValueError, match=r"Cannot tell which method of \['dt', 'ft-full', 'hyperflow:rk4:4', "
                                         r"'hyperflow:euler:8'\] is this adapter's: pass eval_method="):
        card_data(results=results)
    card = render_adapter_card(card_data(results=results, eval_method="hyperflow:euler:8"))
    assert [r.metric_value for r in card.data.eval_results] == [61.04]


@pytest.mark.parametrize(("overrides", "error", "match"), [
    ({"repo_id": "not a repo"}, ValueError, "repo_id 'not a repo' is not a valid Hub repo id"),
    ({"base_model": ""}, TypeError, "base_model must be a non-empty string"),
    ({"lora_rank": None}, ValueError, "groups include 'lora' but lora_rank is None"),
    ({"steps": 0}, ValueError, "steps must be an integer >= 1, got 0"),
    ({"groups": "lora"}, TypeError, "groups must be a list of non-empty strings"),
    ({"eval_method": "ft-lora"}, ValueError, r"eval_method 'ft-lora' is not in the results; they have \['dt'"),
    ({"results": None, "eval_method": "hyperflow"}, ValueError, "eval_method is set but there are no results"),
    ({"plot_path": "/tmp/plot.png"}, ValueError, "plot_path must be a path inside the repo"),
    ({"results": {"meta": {}, "results": {}}}, ValueError, "AdapterCardData.results: meta.backbone must be"),
    ({"training_config": [1]}, TypeError, "training_config must be a dict"),
])
def test_adapter_card_data_errors(overrides, error, match):
    with pytest.raises(error, match=match):
        card_data(**overrides)


def test_task_card_states_classes_and_source_and_round_trips(tmp_path):
    card = render_task_card(TaskCardData(
        repo_id="org/emoji-task", base_model="facebook/dinov2-small", class_names=["cat", "dog", "owl"],
        source_adapter="org/hyperflow-dinov2-small", source_adapter_revision="a" * 40, lora_rank=4,
        lora_alpha=8.0, target_modules=["query", "value"], support_size=15, backbone_model_type="dinov2"))
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.to_dict() == {
        "base_model": "facebook/dinov2-small", "base_model_relation": "adapter", "library_name": "peft",
        "license": "apache-2.0", "pipeline_tag": "image-classification",
        "tags": ["hyperflow", "peft", "few-shot", "image-classification", "lora", "hf-hyperflow", "dinov2"]}
    text = loaded.text
    assert "A few-shot image classifier for 3 classes" in text
    assert "| 0 | cat |\n| 1 | dog |\n| 2 | owl |" in text
    assert (f"HyperFlow adapter [`org/hyperflow-dinov2-small`](https://huggingface.co/org/hyperflow-dinov2-small) "
            f"(revision `{'a' * 40}`)\nfrom 15 labelled support images.") in text
    assert 'model = PeftModel.from_pretrained(backbone, "org/emoji-task").eval()' in text
    assert 'head = load_file(hf_hub_download("org/emoji-task", "hyperflow_head.safetensors"))' in text


@pytest.mark.parametrize(("overrides", "match"), [
    ({"class_names": ["cat"]}, r"at least 2 classes"),
    ({"class_names": ["cat", "cat"]}, "class_names has duplicates"),
    ({"source_adapter": ""}, "source_adapter must be a non-empty string"),
])
def test_task_card_data_errors(overrides, match):
    values = dict(repo_id="org/t", base_model="b/m", class_names=["a", "b"], source_adapter="org/a")
    with pytest.raises((TypeError, ValueError), match=match):
        TaskCardData(**{**values, **overrides})


def test_validate_results_returns_its_input():
    assert validate_results(RESULTS) is RESULTS


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
