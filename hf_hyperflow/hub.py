"""Hub I/O: resolve a folder or Hub id to local files, push a folder as one commit, and tell a local path
from a Hub repo id.

Everything goes through ``huggingface_hub``; nothing here reaches the network unless a function is
asked for a Hub id or a push.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import httpx2
from huggingface_hub import CommitInfo, HfApi, constants, get_token, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    LocalTokenNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

__all__ = [
    "HubAuthError",
    "HubError",
    "HubNotFoundError",
    "HubUnavailableError",
    "HubUploadError",
    "is_hub_id",
    "looks_local",
    "push_folder_to_hub",
    "resolve_pretrained_folder",
]

LIBRARY_NAME = "hf-hyperflow"
_LOGIN_HINT = "log in with `hf auth login` (formerly `huggingface-cli login`) or set HF_TOKEN"
_COMMIT_ID = re.compile(r"^[0-9a-f]{40}$")


# ---------------------------------------------------------------------------------------------- errors
class HubError(OSError):
    """The Hub could not give or take what was asked; the message says what to check."""


class HubNotFoundError(HubError, FileNotFoundError):
    """A repo, revision or file does not exist (or is private and the token cannot see it)."""


class HubAuthError(HubError, PermissionError):
    """No token, a token the Hub rejects, or a token without the rights needed."""


class HubUnavailableError(HubError, ConnectionError):
    """The Hub could not be reached (or offline mode is on) and the local cache does not have the files."""


class HubUploadError(HubError):
    """A push failed; the message says where the branch points now."""


# ---------------------------------------------------------------------------------------------- names
def looks_local(text: str) -> bool:
    """Whether ``text`` names a local path rather than a Hub repo id (``namespace/name``).

    A local path exists here, starts with ``.``, ``/`` or ``~``, holds a backslash, has no ``/`` or more than
    one, ends in ``.parquet``, or sits in a folder that exists here (``data/glyphs`` beside a ``data/`` folder).
    """
    return (text.startswith((".", "/", "~")) or "\\" in text or text.count("/") != 1 or text.endswith(".parquet")
            or os.path.exists(text) or Path(text).parent.is_dir())


def is_hub_id(text: str) -> bool:
    """Whether ``text`` is a Hub repo id: not a local path (:func:`looks_local`) and a valid ``namespace/name``."""
    if looks_local(text):
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


# ---------------------------------------------------------------------------------------------- pull
def resolve_pretrained_folder(
    path_or_repo_id: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    required_files: Sequence[str] = (),
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """A local folder holding the files of ``path_or_repo_id``.

    An existing local folder is returned as it is (it wins over a Hub id of the same spelling); anything
    else must be a Hub repo id (``namespace/name``), downloaded with ``huggingface_hub.snapshot_download``
    into the HF cache (``cache_dir`` or ``HF_HUB_CACHE``) and returned as its snapshot folder.

    Args:
        path_or_repo_id: a folder, or a Hub model repo id.
        revision: branch, tag or full commit id of the Hub repo; not allowed with a local folder.
        token: Hub token (default: the logged-in one / ``HF_TOKEN``); only needed for private repos.
        required_files: files (``/``-separated relative paths) that must be in the folder.
        cache_dir: HF cache folder to download into.

    Raises:
        TypeError / ValueError: arguments of the wrong kind, or neither a folder nor a valid repo id.
        FileNotFoundError: a local folder lacks a required file, or a path does not exist.
        HubNotFoundError: the repo, the revision, or a required file is not on the Hub.
        HubAuthError: the Hub rejected the token.
        HubUnavailableError: the Hub cannot be reached (or HF_HUB_OFFLINE is set) and the cache lacks the files.
    """
    if not isinstance(path_or_repo_id, (str, os.PathLike)):
        raise TypeError(f"path_or_repo_id must be a folder path or a Hub repo id, got {type(path_or_repo_id).__name__}.")
    if isinstance(required_files, (str, bytes)) or not all(isinstance(f, str) and f for f in required_files):
        raise TypeError(f"required_files must be a sequence of file names, got {required_files!r}.")
    if revision is not None and (not isinstance(revision, str) or not revision):
        raise ValueError(f"revision must be a non-empty branch, tag or commit id, got {revision!r}.")
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to Hub repos, but {str(path)!r} is a local folder: "
                             "drop revision, or pass a Hub repo id.")
        for name in required_files:
            if not (path / name).is_file():
                raise FileNotFoundError(f"{name} is missing from the folder {path}: it is not a complete save "
                                        "(save it again, or pass the right folder).")
        return path
    if path.exists():
        raise ValueError(f"{path} is a file; pass the folder that holds it, or a Hub repo id.")
    text = os.fspath(path_or_repo_id)
    if isinstance(path_or_repo_id, os.PathLike) or looks_local(text):
        raise FileNotFoundError(f"There is no folder at {path}. Check the path (or pass a Hub repo id "
                                "such as 'namespace/name').")
    try:
        validate_repo_id(text)
    except HFValidationError as error:
        raise ValueError(f"{text!r} is neither an existing local folder nor a valid Hub repo id "
                         f"('namespace/name'): {error}") from error
    return _download(text, revision=revision, token=token, required_files=required_files, cache_dir=cache_dir)


def _download(repo_id: str, *, revision: str | None, token: str | bool | None, required_files: Sequence[str],
              cache_dir: str | os.PathLike | None) -> Path:
    where = f"{repo_id!r} on {constants.ENDPOINT}"
    shown_revision = revision or "main"
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, token=token, cache_dir=cache_dir))
    except LocalEntryNotFoundError as error:
        if constants.HF_HUB_OFFLINE:
            reason = "HF_HUB_OFFLINE is set, so nothing is downloaded: unset it (or download it once online)."
        else:
            reason = ("Check the connection and HF_ENDPOINT, then try again; once downloaded it also loads offline "
                      "(HF_HUB_OFFLINE=1).")
        raise HubUnavailableError(
            f"Could not download {where} (revision {shown_revision!r}) and the local cache does not have it. {reason}"
        ) from error
    except GatedRepoError as error:
        raise HubAuthError(f"{where} is gated: accept its conditions on the repo page and {_LOGIN_HINT}.") from error
    except RepositoryNotFoundError as error:
        raise HubNotFoundError(
            f"There is no repo {where}. Check the repo id (namespace/name); if the repo is private, "
            f"{_LOGIN_HINT} with a token that can read it."
        ) from error
    except RevisionNotFoundError as error:
        raise HubNotFoundError(
            f"The repo {where} has no revision {revision!r}. Check the branch, tag or commit id "
            "(commit ids are the full 40 hex digits)."
        ) from error
    except EntryNotFoundError as error:
        raise HubNotFoundError(f"A file of {where} (revision {shown_revision!r}) could not be found: {error}") from error
    except LocalTokenNotFoundError as error:
        raise HubAuthError(f"Downloading {where} needs a token, and none was found: {_LOGIN_HINT}.") from error
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status in (401, 403):
            raise HubAuthError(f"The Hub refused access to {where} ({status}): check the token ({_LOGIN_HINT}).") from error
        raise HubUnavailableError(f"The Hub failed while downloading {where}: {error}") from error
    for name in required_files:
        if not (folder / name).is_file():
            present = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
            raise HubNotFoundError(
                f"The repo {where} (revision {shown_revision!r}, commit {folder.name}) has no file {name!r}; it has "
                f"{present}. Check the repo id and revision: it may not hold what you are loading."
            )
    return folder


# ---------------------------------------------------------------------------------------------- push
def _check_push_arguments(folder: Path, repo_id, private, revision, commit_message, token, create_pr) -> str:
    """Every check of :func:`push_folder_to_hub`'s arguments that needs no request; returns the token to use."""
    if not folder.is_dir():
        raise FileNotFoundError(f"There is no folder at {folder} to push.")
    if not any(p.is_file() for p in folder.rglob("*") if ".git" not in p.parts):
        raise ValueError(f"The folder {folder} has no files to push.")
    if not isinstance(repo_id, str):
        raise TypeError(f"repo_id must be a string such as 'namespace/name', got {type(repo_id).__name__}.")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"{repo_id!r} is not a valid Hub repo id ('namespace/name'): {error}") from error
    if revision is not None and (not isinstance(revision, str) or not revision or _COMMIT_ID.match(revision)):
        raise ValueError(f"revision must be a branch name to commit to, got {revision!r} (a commit id cannot "
                         "be pushed to).")
    if create_pr and revision not in (None, constants.DEFAULT_REVISION):
        raise ValueError(f"create_pr=True opens a pull request against main; it cannot be combined with "
                         f"revision={revision!r}.")
    if private is not None and not isinstance(private, bool):
        raise TypeError(f"private must be True, False or None, got {private!r}.")
    if not isinstance(create_pr, bool):
        raise TypeError(f"create_pr must be True or False, got {create_pr!r}.")
    if token is not None and not isinstance(token, (str, bool)):
        raise TypeError(f"token must be a string, True/False or None, got {type(token).__name__}.")
    if commit_message is not None and (not isinstance(commit_message, str) or not commit_message.strip()):
        raise ValueError(f"commit_message must be a non-empty string, got {commit_message!r}.")
    resolved = token if isinstance(token, str) and token else (None if token is False else get_token())
    if not resolved:
        raise HubAuthError(f"Pushing to {repo_id!r} needs a Hugging Face token with write access, and none was "
                           f"found: {_LOGIN_HINT}, or pass token=.")
    return resolved


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    token: str | bool | None = None,
    create_pr: bool = False,
    delete_patterns: str | Sequence[str] | None = None,
) -> CommitInfo:
    """Upload every file of ``folder`` to the Hub model repo ``repo_id`` as one commit.

    The repo is created if needed (``private`` applies then only). ``revision`` names the branch to commit
    to (created from main if missing); ``create_pr=True`` opens a pull request against main instead.
    ``delete_patterns`` (e.g. ``"*"``) deletes remote files that match and are not in the folder.

    Returns:
        The ``CommitInfo`` of the commit (``.oid`` is the commit id to pass as ``revision=`` later). When
        no file changed, no commit is made and it describes the current head.

    Raises:
        TypeError / ValueError / FileNotFoundError: bad arguments or folder, before any request.
        HubAuthError: no token, a rejected token, or no write access; before anything is uploaded.
        HubUploadError: the upload failed; the message says whether the branch still points where it did.
    """
    folder = Path(folder).expanduser()
    resolved_token = _check_push_arguments(folder, repo_id, private, revision, commit_message, token, create_pr)

    api = HfApi(token=resolved_token)
    where = f"{repo_id!r} on {api.endpoint}"
    try:
        api.whoami()
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision is not None and not revision.startswith("refs/pr/"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        target = revision or constants.DEFAULT_REVISION
        before = api.repo_info(repo_id, revision=target).sha
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status in (401, 403):
            raise HubAuthError(f"The Hub refused the token for {where} ({status}): check that it is valid and "
                               f"has write access to the namespace ({_LOGIN_HINT}). Nothing was uploaded.") from error
        raise HubUploadError(f"Preparing the push to {where} failed: {error}. Nothing was uploaded.") from error
    except httpx2.HTTPError as error:
        raise HubUnavailableError(f"Could not reach {api.endpoint} to push {repo_id!r}: {error}. "
                                  "Nothing was uploaded; check the connection and HF_ENDPOINT.") from error
    try:
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message or f"Upload {folder.name} with {LIBRARY_NAME}",
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
            delete_patterns=delete_patterns if delete_patterns is None or isinstance(delete_patterns, str)
            else list(delete_patterns),
        )
    except (HfHubHTTPError, httpx2.HTTPError, OSError) as error:
        try:
            after = api.repo_info(repo_id, revision=target).sha
        except (HfHubHTTPError, httpx2.HTTPError, OSError):
            after = None
        if after == before:
            state = f"{target!r} still points at {before}: nothing was committed."
        elif after is None:
            state = f"The state of {target!r} could not be read back (it pointed at {before})."
        else:
            state = f"{target!r} now points at {after} (it pointed at {before}): check what it holds."
        if create_pr:
            state = f"No pull request was reported as opened. {state}"
        raise HubUploadError(f"Pushing {folder} to {where} failed ({type(error).__name__}: {error}). {state} "
                             "Run the push again.") from error
