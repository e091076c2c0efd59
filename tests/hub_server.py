"""A loopback Hugging Face Hub for tests: the real ``huggingface_hub`` client pushes to it and downloads
from it over real HTTP on 127.0.0.1.

Two parts:

``LoopbackHub``
    A Hub API server built on the standard library (``http.server.ThreadingHTTPServer`` on 127.0.0.1, an
    ephemeral port, a background thread). Repositories live on disk under ``hub.root``: file contents in a
    content-addressed blob store keyed by their git blob id (the id the Hub reports as ``oid`` / ``ETag``),
    every commit a JSON snapshot ``{path: blob id}`` with its parent, and refs (branches, ``refs/pr/N``)
    pointing at commit ids (40 hex digits, like git). It answers the routes the client calls:
    ``/api/whoami-v2``, ``/api/validate-yaml``, ``/api/repos/{create,delete,move}``,
    ``/api/{models,datasets,spaces}/{repo}[/revision/{rev}]`` (info), ``.../preupload/{rev}`` (every file
    "regular"), ``.../commit/{rev}`` (NDJSON, base64 contents; ``create_pr=1``), ``.../tree/{rev}[/{path}]``,
    ``.../paths-info/{rev}``, ``.../refs``, ``.../commits/{rev}``, ``.../branch/{name}``, and
    ``/{repo}/resolve/{rev}/{path}`` (GET with ``Range``, HEAD) with ``X-Repo-Commit``, ``ETag``,
    ``Content-Length`` and the ``X-Error-Code`` / ``X-Error-Message`` headers that make the client raise
    ``RepositoryNotFoundError``, ``RevisionNotFoundError`` and ``RemoteEntryNotFoundError``. A renamed repo
    answers 307 (``Location``: the same URL under the new id) at its old id, as the Hub does. Writes need a
    valid token (401 without one, 401 "Invalid credentials in Authorization header" for a wrong one, 403
    outside the user's namespace and organisations). ``hub.fail_commits(count, mode)`` makes the next
    commit requests fail: ``mode="error"`` answers 500 after reading the body, ``mode="disconnect"`` reads
    half the body and drops the connection; neither applies the commit.

``HubClient``
    A Python process set up to talk to a ``LoopbackHub``, that runs calls for the test process.

Why a separate process: ``huggingface_hub.constants`` reads ``HF_ENDPOINT``, ``HF_HOME`` (hence the cache
and token paths), ``HF_HUB_OFFLINE`` and ``HF_HUB_DISABLE_XET`` once, when it is first imported, and
``hf_hub_download`` / ``snapshot_download`` / ``PeftModel.from_pretrained`` fall back to those constants
(the client also fetches ``{ENDPOINT}/api/agent-harnesses`` for its user agent, so a client imported
without ``HF_ENDPOINT`` reaches out to huggingface.co even when ``endpoint=`` is passed). Within one pytest
run, other test modules import transformers, and so huggingface_hub, before this module could set the
environment, and changing the constants afterwards would be patching the library. So the client runs in
a fresh interpreter whose environment is set before anything is imported (``LoopbackHub.client_env``):
the test process keeps the server (and can look at it and inject failures), the ``HubClient`` process
imports huggingface_hub / hf_hyperflow / peft and calls them, and results or exceptions come back as JSON.

How a test uses it::

    hub = LoopbackHub().start()            # or the `hub` fixture of tests/test_hub.py
    with HubClient(hub, hf_home=tmp_path / "hf") as client:
        info = client.call("hf_hyperflow.hub:push_folder_to_hub", str(folder), "loopback-user/x")
        logits = client.exec("import torch ...; result = out.tolist()", repo="loopback-user/x")
    hub.head("loopback-user/x") == info["oid"]
    hub.stop()

A process that sets its environment itself must do it before importing huggingface_hub (or anything
that imports it: transformers, peft, datasets, hf_hyperflow)::

    os.environ.update(hub.client_env(hf_home))

Failures in the client process come back as ``RemoteError`` (type, MRO, message, cause chain).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
REPO_TYPES = ("model", "dataset", "space")
_API_ACTIONS = {"revision", "preupload", "commit", "tree", "paths-info", "refs", "commits", "branch"}
_COMMIT_ID = re.compile(r"^[0-9a-f]{40}$")
_INVALID_TOKEN = "Invalid credentials in Authorization header"
# What the Hub writes into a new repository.
_GITATTRIBUTES = b"""*.bin filter=lfs diff=lfs merge=lfs -text
*.h5 filter=lfs diff=lfs merge=lfs -text
*.onnx filter=lfs diff=lfs merge=lfs -text
*.pt filter=lfs diff=lfs merge=lfs -text
*.pth filter=lfs diff=lfs merge=lfs -text
*.safetensors filter=lfs diff=lfs merge=lfs -text
*.zip filter=lfs diff=lfs merge=lfs -text
"""


def git_blob_id(data: bytes) -> str:
    """The git blob id of ``data`` (sha1 of ``b"blob <size>\\0" + data``): the Hub's oid and ETag."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class _HttpError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None,
                 body: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}
        self.body = {"error": message, **(body or {})}


class _Dropped(Exception):
    """The connection was closed on purpose without a response."""


class _Redirect(Exception):
    """Answer 307 to ``location`` (a repo that was renamed, like the Hub does)."""

    def __init__(self, location: str):
        super().__init__(location)
        self.location = location


class _Repo:
    """One repository on disk: ``repo.json`` (refs, visibility) and ``commits/<id>.json``."""

    def __init__(self, hub: LoopbackHub, repo_type: str, repo_id: str):
        if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", repo_id) or ".." in repo_id:
            raise _HttpError(400, f"Invalid repo id {repo_id!r}")
        self.hub, self.repo_type, self.repo_id = hub, repo_type, repo_id
        self.dir = hub.root / "repos" / f"{repo_type}s" / repo_id

    @property
    def exists(self) -> bool:
        return (self.dir / "repo.json").is_file()

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/")[0]

    def meta(self) -> dict:
        return json.loads((self.dir / "repo.json").read_text())

    def save_meta(self, meta: dict) -> None:
        tmp = self.dir / "repo.json.tmp"
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, self.dir / "repo.json")

    def commit(self, commit_id: str) -> dict:
        return json.loads((self.dir / "commits" / f"{commit_id}.json").read_text())

    def has_commit(self, commit_id: str) -> bool:
        return (self.dir / "commits" / f"{commit_id}.json").is_file()

    def resolve(self, revision: str) -> str:
        """Branch, ``refs/pr/N``, tag or full commit id -> commit id; 404 RevisionNotFound otherwise."""
        refs = self.meta()["refs"]
        for key in (revision, f"refs/heads/{revision}", f"refs/tags/{revision}"):
            if key in refs:
                return refs[key]
        if _COMMIT_ID.match(revision) and self.has_commit(revision):
            return revision
        raise _HttpError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def files(self, commit_id: str) -> dict[str, str]:
        return self.commit(commit_id)["files"]

    def new_commit(self, parent: str | None, files: dict[str, str], title: str, description: str, author: str) -> str:
        record = {
            "parents": [parent] if parent else [],
            "files": dict(sorted(files.items())),
            "title": title,
            "message": description,
            "author": author,
            "date": _now(),
        }
        nonce = secrets.token_hex(8)  # two identical snapshots committed twice are still two commits
        commit_id = hashlib.sha1(json.dumps({**record, "nonce": nonce}, sort_keys=True).encode()).hexdigest()
        record["id"] = commit_id
        (self.dir / "commits").mkdir(parents=True, exist_ok=True)
        (self.dir / "commits" / f"{commit_id}.json").write_text(json.dumps(record, indent=1))
        return commit_id


class LoopbackHub:
    """A Hugging Face Hub API server on 127.0.0.1 that keeps repositories on disk (see the module docstring).

    Args:
        root: folder for the repositories; a temporary folder (removed by ``stop``) when None.
        user: the user name that ``token`` authenticates.
        orgs: organisations the user may write to.
    """

    def __init__(self, root: str | os.PathLike | None = None, *, user: str = "loopback-user",
                 orgs: Iterable[str] = ("loopback-org",)):
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="loopback-hub-") if root is None else root)
        self.user = user
        self.orgs = list(orgs)
        self.token = "hf_loopback_" + secrets.token_hex(12)
        self.tokens: dict[str, str] = {self.token: user}
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status) in order of answer
        self.server_errors: list[str] = []  # tracebacks of unexpected exceptions in handlers
        self._lock = threading.RLock()
        self._commit_failures: list[str] = []
        self._moved: dict[tuple[str, str], str] = {}  # (repo type, old id) -> new id
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> LoopbackHub:
        if self._server is not None:
            raise RuntimeError("LoopbackHub is already running")
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.block_on_close = False
        server.hub = self  # type: ignore[attr-defined]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="loopback-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LoopbackHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("LoopbackHub is not running: call start() first")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def client_env(self, hf_home: str | os.PathLike, *, token: bool = True, xet: bool = False) -> dict[str, str]:
        """Environment variables for a huggingface_hub client of this server; set them before importing it.

        ``xet=False`` sets ``HF_HUB_DISABLE_XET=1``: uploads go through one ``create_commit`` (README
        metadata validated on the server) instead of the hf_xet pipeline; both work with this server.
        """
        env = {
            "HF_ENDPOINT": self.url,
            "HF_HOME": str(hf_home),
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_HUB_OFFLINE": "0",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }
        if token:
            env["HF_TOKEN"] = self.token
        if not xet:
            env["HF_HUB_DISABLE_XET"] = "1"
        return env

    # ------------------------------------------------------------------ test controls and inspection
    def fail_commits(self, count: int = 1, mode: str = "error") -> None:
        """Make the next ``count`` commit requests fail without applying them.

        ``mode="error"``: read the whole body, answer 500. ``mode="disconnect"``: read half the body, then
        close the connection without answering (the client sees a broken connection mid-upload).
        """
        if mode not in ("error", "disconnect"):
            raise ValueError(f"mode must be 'error' or 'disconnect', got {mode!r}")
        with self._lock:
            self._commit_failures = [mode] * count

    def add_token(self, user: str) -> str:
        """A new valid token for ``user`` (who owns the namespace of the same name)."""
        token = "hf_loopback_" + secrets.token_hex(12)
        self.tokens[token] = user
        return token

    def repo(self, repo_id: str, repo_type: str = "model") -> _Repo:
        return _Repo(self, repo_type, repo_id)

    def head(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> str | None:
        """The commit id ``revision`` points at, or None when the repo or the revision does not exist."""
        repo = self.repo(repo_id, repo_type)
        if not repo.exists:
            return None
        try:
            return repo.resolve(revision)
        except _HttpError:
            return None

    def history(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[dict]:
        """Commits from ``revision`` back to the first, newest first (id, parents, title, files)."""
        repo = self.repo(repo_id, repo_type)
        out, commit_id = [], repo.resolve(revision)
        while commit_id:
            record = repo.commit(commit_id)
            out.append(record)
            commit_id = record["parents"][0] if record["parents"] else None
        return out

    def read_files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """Every file of ``repo_id`` at ``revision``: path -> content."""
        repo = self.repo(repo_id, repo_type)
        return {path: self._blob(oid) for path, oid in repo.files(repo.resolve(revision)).items()}

    def requests_since(self, index: int) -> list[tuple[str, str, int]]:
        return self.requests[index:]

    # ------------------------------------------------------------------ storage helpers
    def _store_blob(self, data: bytes) -> str:
        oid = git_blob_id(data)
        path = self.root / "blobs" / oid
        if not path.exists():
            tmp = path.with_suffix(f".{secrets.token_hex(4)}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return oid

    def _blob(self, oid: str) -> bytes:
        return (self.root / "blobs" / oid).read_bytes()

    def _repo_url(self, repo: _Repo) -> str:
        prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
        return f"{self.url}/{prefix}{repo.repo_id}"

    def _take_commit_failure(self) -> str | None:
        with self._lock:
            return self._commit_failures.pop(0) if self._commit_failures else None

    # ------------------------------------------------------------------ auth
    def _user(self, request: _Handler) -> str | None:
        """The authenticated user; None without a token; 401 for a token this server does not know."""
        header = request.headers.get("Authorization")
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or token.strip() not in self.tokens:
            raise _HttpError(401, _INVALID_TOKEN)
        return self.tokens[token.strip()]

    def _can_write(self, user: str, namespace: str) -> bool:
        return namespace == user or (user == self.user and namespace in self.orgs)

    def _writable_repo(self, request: _Handler, repo: _Repo) -> str:
        user = self._user(request)
        if user is None:
            raise _HttpError(401, "You must be authenticated to write to a repository: pass a token with write access.")
        if not repo.exists:
            raise _HttpError(404, f"Repository not found: {repo.repo_id}", "RepoNotFound")
        if not self._can_write(user, repo.namespace):
            raise _HttpError(403, f"You don't have write access to {repo.repo_id}")
        return user

    def _readable_repo(self, request: _Handler, repo: _Repo) -> None:
        user = self._user(request)
        if not repo.exists:
            # The Hub answers 401 to anonymous requests so as not to reveal whether a private repo exists.
            raise _HttpError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        if repo.meta()["private"] and (user is None or not self._can_write(user, repo.namespace)):
            raise _HttpError(401 if user is None else 404, "Repository not found", "RepoNotFound")

    # ------------------------------------------------------------------ routing
    def _route(self, request: _Handler, method: str) -> tuple[int, Any, dict]:
        url = urlsplit(request.path)
        segments = [unquote(s) for s in url.path.split("/")[1:]]
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if segments[:1] == ["api"]:
            return self._route_api(request, method, segments[1:], query)
        kind = "model"
        if segments and segments[0] in ("datasets", "spaces"):
            kind, segments = segments[0][:-1], segments[1:]
        for i in (1, 2):
            if len(segments) > i + 1 and segments[i] == "resolve" and method in ("GET", "HEAD"):
                repo = self._follow_moves(request, kind, "/".join(segments[:i]))
                return self._resolve(request, method, repo, segments[i + 1], "/".join(segments[i + 2:]))
        raise _HttpError(404, f"LoopbackHub has no route for {method} {url.path}")

    def _route_api(self, request: _Handler, method: str, segs: list[str], query: dict) -> tuple[int, Any, dict]:
        if segs == ["whoami-v2"] and method == "GET":
            return self._whoami(request)
        if segs == ["validate-yaml"] and method == "POST":
            return self._validate_yaml(request.json_body())
        if segs == ["repos", "create"] and method == "POST":
            return self._create_repo(request)
        if segs == ["repos", "delete"] and method == "DELETE":
            return self._delete_repo(request)
        if segs == ["repos", "move"] and method == "POST":
            return self._move_repo(request)
        if segs == ["agent-harnesses"] and method == "GET":
            return 200, {"standardEnvVars": [], "harnesses": {}}, {}
        if segs[:1] == ["telemetry"]:
            return 200, {}, {}
        if segs and segs[0] in ("models", "datasets", "spaces"):
            kind, rest = segs[0][:-1], segs[1:]
            if len(rest) >= 3 and rest[2] in _API_ACTIONS:
                repo_id, action, args = "/".join(rest[:2]), rest[2], rest[3:]
            elif len(rest) >= 2 and rest[1] in _API_ACTIONS:
                repo_id, action, args = rest[0], rest[1], rest[2:]
            elif 1 <= len(rest) <= 2:
                repo_id, action, args = "/".join(rest), "info", []
            else:
                raise _HttpError(404, f"LoopbackHub has no route for {method} /api/{'/'.join(segs)}")
            repo = self._follow_moves(request, kind, repo_id)
            handler = {
                ("info", "GET"): self._info, ("revision", "GET"): self._info,
                ("preupload", "POST"): self._preupload, ("commit", "POST"): self._commit,
                ("tree", "GET"): self._tree, ("paths-info", "POST"): self._paths_info,
                ("refs", "GET"): self._refs, ("commits", "GET"): self._commits,
                ("branch", "POST"): self._create_branch, ("branch", "DELETE"): self._delete_branch,
            }.get((action, method))
            if handler is not None:
                return handler(request, repo, args, query)
        raise _HttpError(404, f"LoopbackHub has no route for {method} /api/{'/'.join(segs)}")

    # ------------------------------------------------------------------ account and cards
    def _whoami(self, request: _Handler) -> tuple[int, Any, dict]:
        user = self._user(request)
        if user is None:
            raise _HttpError(401, _INVALID_TOKEN)
        orgs = self.orgs if user == self.user else []
        return 200, {
            "type": "user", "id": hashlib.sha1(user.encode()).hexdigest()[:24], "name": user, "fullname": user,
            "email": None, "emailVerified": False, "isPro": False, "canPay": False, "avatarUrl": "",
            "orgs": [{"type": "org", "name": org, "fullname": org, "roleInOrg": "write"} for org in orgs],
            "auth": {"type": "access_token", "accessToken": {"displayName": "loopback", "role": "write"}},
        }, {}

    @staticmethod
    def _front_matter(content: str) -> dict | None:
        """The YAML metadata block of a card; None without one; 400 when it is not a YAML mapping."""
        match = re.match(r"^\s*---\s*\n(.*?)\n---\s*(\n|$)", content, re.DOTALL)
        if match is None:
            return None
        try:
            data = yaml.safe_load(match.group(1))
        except yaml.YAMLError as error:
            raise _HttpError(400, f"Invalid YAML in the card metadata: {error}") from error
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise _HttpError(400, "The card metadata must be a YAML mapping")
        return data

    @staticmethod
    def _metadata_errors(data: dict) -> list[str]:
        errors = []
        for key in ("license", "library_name", "pipeline_tag"):
            if key in data and not isinstance(data[key], str):
                errors.append(f'"{key}" must be a string')
        for key in ("tags", "datasets", "base_model", "language"):
            value = data.get(key)
            if value is not None and not (isinstance(value, str) or (
                    isinstance(value, list) and all(isinstance(v, str) for v in value))):
                errors.append(f'"{key}" must be a string or a list of strings')
        index = data.get("model-index")
        if index is not None:
            if not isinstance(index, list):
                return [*errors, '"model-index" must be a list']
            for i, model in enumerate(index):
                if not isinstance(model, dict) or not isinstance(model.get("name"), str):
                    errors.append(f'"model-index[{i}].name" must be a string')
                    continue
                for j, result in enumerate(model.get("results") or []):
                    where = f"model-index[{i}].results[{j}]"
                    if not isinstance(result, dict):
                        errors.append(f'"{where}" must be a mapping')
                        continue
                    if not isinstance((result.get("task") or {}).get("type"), str):
                        errors.append(f'"{where}.task.type" is required')
                    dataset = result.get("dataset") or {}
                    if not (isinstance(dataset.get("type"), str) and isinstance(dataset.get("name"), str)):
                        errors.append(f'"{where}.dataset" needs "type" and "name"')
                    for k, metric in enumerate(result.get("metrics") or []):
                        if not (isinstance(metric, dict) and isinstance(metric.get("type"), str) and "value" in metric):
                            errors.append(f'"{where}.metrics[{k}]" needs "type" and "value"')
        return errors

    def _validate_yaml(self, body: dict) -> tuple[int, Any, dict]:
        try:
            data = self._front_matter(str(body.get("content", "")))
        except _HttpError as error:
            return 400, {"errors": [{"message": error.message}], "warnings": []}, {}
        if not data:
            return 200, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata in repo card"}]}, {}
        errors = self._metadata_errors(data)
        if errors:
            return 400, {"errors": [{"message": e} for e in errors], "warnings": []}, {}
        return 200, {"errors": [], "warnings": []}, {}

    # ------------------------------------------------------------------ repositories
    def _create_repo(self, request: _Handler) -> tuple[int, Any, dict]:
        body = request.json_body()
        user = self._user(request)
        if user is None:
            raise _HttpError(401, "You must be authenticated to create a repository: pass a token with write access.")
        kind = body.get("type") or "model"
        if kind not in REPO_TYPES:
            raise _HttpError(400, f"Invalid repo type {kind!r}")
        name = body.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[\w.-]{1,96}", name) or ".." in name:
            raise _HttpError(400, f"Invalid repo name {name!r}")
        namespace = body.get("organization") or user
        if not self._can_write(user, namespace):
            raise _HttpError(403, f"You don't have the rights to create a {kind} under the namespace \"{namespace}\"")
        repo = _Repo(self, kind, f"{namespace}/{name}")
        with self._lock:
            if repo.exists:
                raise _HttpError(409, f"You already created this {kind} repo", body={"url": self._repo_url(repo)})
            repo.dir.mkdir(parents=True)
            private = body.get("private")
            if private is None:
                private = body.get("visibility") == "private"
            first = repo.new_commit(None, {".gitattributes": self._store_blob(_GITATTRIBUTES)}, "initial commit", "", user)
            repo.save_meta({"private": bool(private), "created_at": _now(), "refs": {"refs/heads/main": first},
                            "pull_requests": 0})
        return 200, {"url": self._repo_url(repo), "name": repo.repo_id, "id": repo.repo_id}, {}

    def _delete_repo(self, request: _Handler) -> tuple[int, Any, dict]:
        body = request.json_body()
        user = self._user(request)
        namespace = body.get("organization") or user
        repo = _Repo(self, body.get("type") or "model", f"{namespace}/{body.get('name')}")
        self._writable_repo(request, repo)
        with self._lock:
            shutil.rmtree(repo.dir)
        return 200, {}, {}

    def _move_repo(self, request: _Handler) -> tuple[int, Any, dict]:
        body = request.json_body()
        kind = body.get("type") or "model"
        source, target = _Repo(self, kind, str(body.get("fromRepo"))), _Repo(self, kind, str(body.get("toRepo")))
        user = self._writable_repo(request, source)
        if target.repo_id.count("/") != 1 or not self._can_write(user, target.namespace):
            raise _HttpError(403, f"You cannot move a repo to {target.repo_id}")
        with self._lock:
            if target.exists:
                raise _HttpError(409, f"{target.repo_id} already exists")
            target.dir.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source.dir, target.dir)
            self._moved[(kind, source.repo_id)] = target.repo_id
        return 200, {}, {}

    def _follow_moves(self, request: _Handler, kind: str, repo_id: str) -> _Repo:
        """The repo; a 307 to the same URL under the new id when ``repo_id`` was renamed."""
        new_id = self._moved.get((kind, repo_id))
        if new_id is None or _Repo(self, kind, repo_id).exists:
            return _Repo(self, kind, repo_id)
        url = urlsplit(request.path)
        start = (url.path + "/").index(f"/{repo_id}/")
        path = f"{url.path[:start]}/{new_id}{url.path[start + len(repo_id) + 1:]}"
        raise _Redirect(path + (f"?{url.query}" if url.query else ""))

    def _info(self, request: _Handler, repo: _Repo, args: list[str], query: dict) -> tuple[int, Any, dict]:
        self._readable_repo(request, repo)
        commit_id = repo.resolve(args[0] if args else "main")
        record, meta = repo.commit(commit_id), repo.meta()
        files = record["files"]
        blobs = query.get("blobs", "").lower() in ("1", "true")
        siblings = []
        for path, oid in files.items():
            entry: dict[str, Any] = {"rfilename": path}
            if blobs:
                entry.update(size=len(self._blob(oid)), blobId=oid)
            siblings.append(entry)
        card = {}
        if "README.md" in files:
            try:
                card = self._front_matter(self._blob(files["README.md"]).decode("utf-8")) or {}
            except (_HttpError, UnicodeDecodeError):
                card = {}
        tags = list(card.get("tags") or []) if isinstance(card.get("tags"), list) else []
        info = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id,
            "author": repo.namespace, "sha": commit_id, "private": meta["private"], "gated": False,
            "disabled": False, "downloads": 0, "likes": 0, "tags": tags, "siblings": siblings,
            "lastModified": record["date"], "createdAt": meta["created_at"],
            "usedStorage": sum(len(self._blob(oid)) for oid in files.values()),
        }
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
            for key in ("library_name", "pipeline_tag"):
                if isinstance(card.get(key), str):
                    info[key] = card[key]
        if card:
            info["cardData"] = card
        return 200, info, {}

    # ------------------------------------------------------------------ uploads
    def _branch_for_write(self, repo: _Repo, revision: str, create_pr: bool) -> tuple[str, str]:
        """(ref to move, commit id it points at) for a write to ``revision``."""
        refs = repo.meta()["refs"]
        if revision.startswith("refs/pr/") and revision in refs:
            if create_pr:
                raise _HttpError(400, "create_pr cannot target a pull request ref")
            return revision, refs[revision]
        key = f"refs/heads/{revision}"
        if key not in refs:
            raise _HttpError(404, f"Invalid rev id: {revision} is not a branch", "RevisionNotFound")
        return key, refs[key]

    def _preupload(self, request: _Handler, repo: _Repo, args: list[str], query: dict) -> tuple[int, Any, dict]:
        self._writable_repo(request, repo)
        body = request.json_body()
        revision = args[0] if args else "main"
        _, head = self._branch_for_write(repo, revision, query.get("create_pr") == "1")
        current = repo.files(head)
        files = body.get("files")
        if not isinstance(files, list):
            raise _HttpError(400, '"files" must be a list')
        answer = []
        for item in files:
            path = _check_repo_path(item.get("path"))
            answer.append({"path": path, "uploadMode": "regular", "shouldIgnore": False, "oid": current.get(path)})
        return 200, {"files": answer, "commitOid": head}, {}

    def _commit(self, request: _Handler, repo: _Repo, args: list[str], query: dict) -> tuple[int, Any, dict]:
        user = self._writable_repo(request, repo)
        failure = self._take_commit_failure()
        if failure == "disconnect":
            request.drop_mid_body()
        body = request.raw_body()
        if failure == "error":
            raise _HttpError(500, "Internal Error - the loopback Hub was told to fail this commit")
        try:
            lines = [json.loads(line) for line in body.decode("utf-8").splitlines() if line.strip()]
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise _HttpError(400, f"The commit payload is not NDJSON: {error}") from error
        if not lines or lines[0].get("key") != "header":
            raise _HttpError(400, "The first NDJSON line of a commit must be the header")
        header = lines[0]["value"]
        title = header.get("summary") or ""
        if not title.strip():
            raise _HttpError(400, "A commit needs a summary")
        create_pr = query.get("create_pr") == "1"
        revision = args[0] if args else "main"
        with self._lock:
            ref, head = self._branch_for_write(repo, revision, create_pr)
            parent_commit = header.get("parentCommit")
            if parent_commit and parent_commit != head:
                raise _HttpError(412, f"A commit has happened since {parent_commit}. Please refresh and try again.")
            files = dict(repo.files(head))
            for line in lines[1:]:
                key, value = line.get("key"), line.get("value") or {}
                path = _check_repo_path(value.get("path"))
                if key == "file":
                    if value.get("encoding") != "base64":
                        raise _HttpError(400, f"Unsupported encoding {value.get('encoding')!r} for {path}")
                    files[path] = self._store_blob(base64.b64decode(value.get("content", ""), validate=True))
                elif key == "deletedFile":
                    if path not in files:
                        raise _HttpError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    del files[path]
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    files = {p: o for p, o in files.items() if not p.startswith(prefix)}
                elif key == "lfsFile":
                    raise _HttpError(400, f"LFS uploads are not supported by the loopback Hub ({path}): "
                                          "preupload answers 'regular' for every file")
                else:
                    raise _HttpError(400, f"Unknown commit operation {key!r}")
            commit_id = repo.new_commit(head, files, title, header.get("description") or "", user)
            meta = repo.meta()
            pr_url = None
            if create_pr:
                meta["pull_requests"] += 1
                ref = f"refs/pr/{meta['pull_requests']}"
                pr_url = f"{self._repo_url(repo)}/discussions/{meta['pull_requests']}"
            meta["refs"][ref] = commit_id
            repo.save_meta(meta)
        answer = {"success": True, "commitOid": commit_id, "commitUrl": f"{self._repo_url(repo)}/commit/{commit_id}"}
        if pr_url:
            answer["pullRequestUrl"] = pr_url
        return 200, answer, {}

    def _create_branch(self, request: _Handler, repo: _Repo, args: list[str], query: dict) -> tuple[int, Any, dict]:
        self._writable_repo(request, repo)
        if len(args) != 1 or not args[0] or args[0].startswith("refs/"):
            raise _HttpError(400, f"Invalid branch name {'/'.join(args)!r}")
        body = request.json_body()
        with self._lock:
            meta = repo.meta()
            key = f"refs/heads/{args[0]}"
            if key in meta["refs"]:
                raise _HttpError(409, f"Reference already exists: {key}")
            meta["refs"][key] = repo.resolve(body.get("startingPoint") or "main")
            repo.save_meta(meta)
        return 200, {}, {}

    def _delete_branch(self, request: _Handler, repo: _Repo, args: list[str], query: dict) -> tuple[int, Any, dict]:
        self._writable_repo(request, repo)
        with self._lock:
            meta = repo.meta()
            key = f"refs/heads/{'/'.join(args)}"
            if key not in meta["refs"] or key == "refs/heads/main":
                raise _HttpError(404 if key not in meta["refs"] else 403, f"Cannot delete {key}")
            del meta["refs"][key]
            repo.save_meta(meta)
        return 200, {}, {}

    # ------------------------------------------------------------------ listings
    def _entries(self, repo: _Repo, commit_id: str) -> dict[str, dict]:
        """path -> tree entry for every file and folder at ``commit_id``."""
        entries: dict[str, dict] = {}
        for path, oid in repo.files(commit_id).items():
            entries[path] = {"type": "file", "oid": oid, "size": len(self._blob(oid)), "path": path}
            for parent in PurePosixPath(path).parents:
                if str(parent) != ".":
                    entries.setdefault(str(parent), {"type": "directory", "size": 0, "path": str(parent)})
        for path, entry in entries.items():
            if entry["type"] == "directory":
                inside = sorted(f"{p}:{e.get('oid')}" for p, e in entries.items() if p.startswith(path + "/"))
                entry["oid"] = hashlib.sha1("\n".join(inside).encode()).hexdigest()
        return entries

    def _tree(self, request: _Handler, repo: _Repo, args: list[str], query: dict) -> tuple[int, Any, dict]:
        self._readable_repo(request, repo)
        if not args:
            raise _HttpError(400, "A tree listing needs a revision")
        commit_id = repo.resolve(args[0])
        folder = "/".join(args[1:]).strip("/")
        recursive = query.get("recursive", "false").lower() in ("1", "true")
        entries = self._entries(repo, commit_id)
        if folder and entries.get(folder, {}).get("type") != "directory":
            raise _HttpError(404, f"{folder} does not exist at {args[0]}", "EntryNotFound",
                             {"X-Repo-Commit": commit_id})
        prefix = folder + "/" if folder else ""
        listing = [e for p, e in sorted(entries.items())
                   if p.startswith(prefix) and (recursive or "/" not in p[len(prefix):])]
        return 200, listing, {}

    def _paths_info(self, request: _Handler, repo: _Repo, args: list[str], query: dict) -> tuple[int, Any, dict]:
        self._readable_repo(request, repo)
        form = parse_qs(request.raw_body().decode("utf-8"))
        entries = self._entries(repo, repo.resolve(args[0] if args else "main"))
        return 200, [entries[p.strip("/")] for p in form.get("paths", []) if p.strip("/") in entries], {}

    def _refs(self, request: _Handler, repo: _Repo, args: list[str], query: dict) -> tuple[int, Any, dict]:
        self._readable_repo(request, repo)
        refs = repo.meta()["refs"]

        def group(prefix: str, strip: bool = True) -> list[dict]:
            return [{"name": ref[len(prefix):] if strip else ref, "ref": ref, "targetCommit": target}
                    for ref, target in sorted(refs.items()) if ref.startswith(prefix)]

        return 200, {"branches": group("refs/heads/"), "tags": group("refs/tags/"), "converts": [],
                     "pullRequests": group("refs/pr/", strip=False)}, {}

    def _commits(self, request: _Handler, repo: _Repo, args: list[str], query: dict) -> tuple[int, Any, dict]:
        self._readable_repo(request, repo)
        listing, commit_id = [], repo.resolve(args[0] if args else "main")
        while commit_id:
            record = repo.commit(commit_id)
            listing.append({"id": commit_id, "authors": [{"user": record["author"]}], "date": record["date"],
                            "title": record["title"], "message": record["message"]})
            commit_id = record["parents"][0] if record["parents"] else None
        return 200, listing, {}

    # ------------------------------------------------------------------ downloads
    def _resolve(self, request: _Handler, method: str, repo: _Repo, revision: str, path: str) -> tuple[int, Any, dict]:
        self._readable_repo(request, repo)
        commit_id = repo.resolve(revision)
        oid = repo.files(commit_id).get(path)
        if oid is None:
            raise _HttpError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit_id})
        data = self._blob(oid)
        headers = {"X-Repo-Commit": commit_id, "ETag": f'"{oid}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream",
                   "Content-Disposition": f'inline; filename="{PurePosixPath(path).name}"'}
        status = 200
        ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", request.headers.get("Range", ""))
        if ranged:
            start = int(ranged.group(1))
            end = min(int(ranged.group(2)) if ranged.group(2) else len(data) - 1, len(data) - 1)
            if start >= len(data):
                raise _HttpError(416, "Range Not Satisfiable", headers={"Content-Range": f"bytes */{len(data)}"})
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start:end + 1], 206
        return status, data, headers


def _check_repo_path(path: Any) -> str:
    if not isinstance(path, str) or not path or path.startswith("/") or "\\" in path or any(
            part in ("", ".", "..") for part in path.split("/")):
        raise _HttpError(400, f"Invalid path in repo: {path!r}")
    return path


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "LoopbackHub/1.0"
    _body: bytes | None = None

    @property
    def hub(self) -> LoopbackHub:
        return self.server.hub  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:  # silence the default stderr log
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    # -------------------------------------------------------------- body
    def raw_body(self) -> bytes:
        if self._body is None:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        break
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                self._body = b"".join(chunks)
            else:
                self._body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        return self._body

    def json_body(self) -> dict:
        raw = self.raw_body()
        try:
            data = json.loads(raw or b"{}")
        except json.JSONDecodeError as error:
            raise _HttpError(400, f"The request body is not JSON: {error}") from error
        if not isinstance(data, dict):
            raise _HttpError(400, "The request body must be a JSON object")
        return data

    def drop_mid_body(self) -> None:
        """Read half of the body, then close the connection without an answer."""
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length // 2)
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        raise _Dropped

    # -------------------------------------------------------------- dispatch
    def _dispatch(self, method: str) -> None:
        self._body = None
        try:
            status, body, headers = self.hub._route(self, method)
        except _Dropped:
            self.hub.requests.append((method, self.path, 0))
            return
        except _Redirect as redirect:
            status, body, headers = 307, b"", {"Location": redirect.location}
        except _HttpError as error:
            status, body, headers = error.status, error.body, dict(error.headers)
            headers["X-Error-Message"] = error.message.encode("ascii", "replace").decode("ascii")
            if error.code:
                headers["X-Error-Code"] = error.code
        except Exception:
            self.hub.server_errors.append(traceback.format_exc())
            status, body, headers = 500, {"error": "LoopbackHub handler crashed"}, {}
        if self._body is None and (status >= 400 or status == 307):
            try:
                self.raw_body()  # an unread body would be taken for the next request on this connection
            except (OSError, ValueError):
                self.close_connection = True
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        if not isinstance(body, bytes):
            headers.setdefault("Content-Type", "application/json")
        for key, value in headers.items():
            self.send_header(key, str(value))
        self.send_header("Content-Length", str(len(payload)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(payload)
        self.hub.requests.append((method, self.path, status))


# ====================================================================== the client process
class RemoteError(Exception):
    """An exception raised in a ``HubClient`` process.

    Attributes: ``type`` (qualified name), ``mro`` (qualified names of its classes), ``message``,
    ``chain`` ([(qualified type, message)] along ``__cause__`` / ``__context__``), ``remote_traceback``.
    """

    def __init__(self, info: dict):
        self.type, self.mro, self.message = info["type"], info["mro"], info["message"]
        self.chain = [tuple(item) for item in info["chain"]]
        self.remote_traceback = info["traceback"]
        super().__init__(f"{self.type}: {self.message}")

    def is_a(self, qualified_name: str) -> bool:
        """Whether the remote exception is an instance of the class named ``module.QualName``."""
        return qualified_name in self.mro


class HubClient:
    """A Python process with a huggingface_hub client pointed at ``hub`` (see the module docstring).

    Args:
        hub: a started ``LoopbackHub``.
        hf_home: the process's ``HF_HOME`` (cache, token file); created if missing.
        token: put the hub's token in ``HF_TOKEN``.
        xet: leave hf_xet enabled (the client's default when it is installed).
        env: extra environment variables.
        timeout: seconds to wait for any one answer.
    """

    def __init__(self, hub: LoopbackHub, hf_home: str | os.PathLike, *, token: bool = True, xet: bool = False,
                 env: dict[str, str] | None = None, timeout: float = 300.0):
        self.timeout = timeout
        hf_home = Path(hf_home)
        hf_home.mkdir(parents=True, exist_ok=True)
        child_env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING")) and k not in (
            "TRANSFORMERS_OFFLINE", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
            "all_proxy")}
        child_env.update(hub.client_env(hf_home, token=token, xet=xet))
        child_env.update(env or {})
        self.log_path = hf_home / f"client-{os.getpid()}-{secrets.token_hex(3)}.log"
        self._log = open(self.log_path, "wb")
        self._proc = subprocess.Popen([sys.executable, "-u", __file__, "--client"], cwd=REPO_ROOT, env=child_env,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log)
        ready = self._read()
        if ready.get("endpoint") != hub.url:
            self.close()
            raise RuntimeError(f"the client process uses endpoint {ready.get('endpoint')!r}, not {hub.url!r}")

    def call(self, target: str, *args: Any, **kwargs: Any) -> Any:
        """Call ``"package.module:function"`` with JSON-able arguments; its result comes back as JSON."""
        return self._request({"op": "call", "target": target, "args": list(args), "kwargs": kwargs})

    def exec(self, code: str, **variables: Any) -> Any:
        """Run ``code`` with ``variables`` defined; returns the JSON-able value it assigns to ``result``."""
        return self._request({"op": "exec", "code": code, "vars": variables})

    def set_env(self, **values: str | None) -> None:
        """Set (or, with None, remove) environment variables of the client process, e.g. ``HF_TOKEN=None``."""
        self._request({"op": "env", "values": values})

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._proc.stdin.close()
                self._proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
        self._proc.stdout.close()
        self._log.close()

    def __enter__(self) -> HubClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def log(self) -> str:
        """What the client process wrote to stdout / stderr so far."""
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def _request(self, message: dict) -> Any:
        self._proc.stdin.write(json.dumps(message).encode() + b"\n")
        self._proc.stdin.flush()
        answer = self._read()
        if "error" in answer:
            raise RemoteError(answer["error"])
        return answer["value"]

    def _read(self) -> dict:
        deadline = time.monotonic() + self.timeout
        while True:
            ready, _, _ = select.select([self._proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if ready:
                line = self._proc.stdout.readline()
                if line:
                    return json.loads(line)
                raise RuntimeError(f"the hub client process exited ({self._proc.poll()}):\n{self.log()[-4000:]}")
            if time.monotonic() >= deadline:
                self._proc.kill()
                raise TimeoutError(f"no answer from the hub client in {self.timeout} s:\n{self.log()[-4000:]}")


def _jsonable(value: Any) -> Any:
    """JSON form of what a call returns: paths as str, dataclasses and str subclasses with fields as dicts."""
    import dataclasses

    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not f.name.startswith("_")}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _describe(error: BaseException) -> dict:
    def name(cls: type) -> str:
        return f"{cls.__module__}.{cls.__qualname__}"

    chain, seen, current = [], {id(error)}, error.__cause__ or error.__context__
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append([name(type(current)), str(current)])
        current = current.__cause__ or current.__context__
    return {"type": name(type(error)), "mro": [name(c) for c in type(error).__mro__], "message": str(error),
            "chain": chain, "traceback": "".join(traceback.format_exception(error))}


def _client_main() -> None:
    """Serve ``HubClient`` requests: one JSON line in, one JSON line out on the original stdout."""
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if p != here]
    sys.path.insert(0, str(REPO_ROOT))
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything a library prints goes to the log, not into the protocol

    import importlib

    from huggingface_hub import constants

    protocol.write(json.dumps({"endpoint": constants.ENDPOINT}) + "\n")
    for line in sys.stdin:
        message = json.loads(line)
        try:
            if message["op"] == "call":
                module, _, qualname = message["target"].partition(":")
                function: Any = importlib.import_module(module)
                for part in qualname.split("."):
                    function = getattr(function, part)
                value = function(*message["args"], **message["kwargs"])
            elif message["op"] == "exec":
                namespace = dict(message["vars"])
                exec(compile(message["code"], "<hub-client>", "exec"), namespace)
                value = namespace.get("result")
            elif message["op"] == "env":
                for key, val in message["values"].items():
                    if val is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = val
                value = None
            else:
                raise ValueError(f"unknown op {message['op']!r}")
            answer = {"value": _jsonable(value)}
        except BaseException as error:  # report everything, including SystemExit from a CLI main()
            answer = {"error": _describe(error)}
        protocol.write(json.dumps(answer) + "\n")


if __name__ == "__main__" and sys.argv[1:] == ["--client"]:
    _client_main()
