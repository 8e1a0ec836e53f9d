"""A model argument as a local folder: the bundled aliases, a local folder, or a Hugging Face Hub id.

    resolve_model("Qwen/Qwen3-30B-A3B", revision="main") -> Path of the cached snapshot

A folder that exists wins over a Hub id of the same spelling, and the bundled aliases (checkpoint/bundled.py)
never touch the network. A Hub id is fetched with `huggingface_hub.snapshot_download` (resumable, with its own
progress bars, cached under HF_HUB_CACHE / HF_HOME), restricted to what moequant reads: config, generation
config, tokenizer files, `*.safetensors` and their index, and `*.py` model code only with trust_remote_code.
Pickled weights (`*.bin`, `*.pt`) are never downloaded. HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE are read
from the environment at call time; the token is never logged or put in a message. Every failure is one
HubError line that names the id and what to do.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from moequant.errors import CheckpointError, HubError

logger = logging.getLogger(__name__)

DEFAULT_REVISION = "main"

# What a MODEL argument needs from a repository, as snapshot_download allow_patterns (fnmatch on repo paths).
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "*.tiktoken",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "*.safetensors",
    "model.safetensors.index.json",
)
CODE_FILES = ("*.py",)  # custom modelling/tokenizer code: only with --trust-remote-code

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_SNAPSHOT = re.compile(r"models--(?P<id>[^/\\]+)[/\\]snapshots[/\\][0-9a-f]{40}[/\\]?$")


def allow_patterns(trust_remote_code: bool = False) -> list[str]:
    return list(MODEL_FILES) + (list(CODE_FILES) if trust_remote_code else [])


def is_hub_id(name: str) -> bool:
    """`org/name` or `name` in the Hub's spelling (no path syntax: no '..', './', leading '/', or '\\')."""
    return bool(_HUB_ID.match(name)) and ".." not in name and not name.endswith((".", "-"))


def hub_id_of(path: str | os.PathLike | None) -> str | None:
    """The repo id of a Hub cache snapshot folder (`.../models--org--name/snapshots/<sha>`), else None."""
    if not path:
        return None
    m = _SNAPSHOT.search(os.fspath(path))
    return m["id"].replace("--", "/", 1) if m else None  # the cache spells org/name as models--org--name


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _offline() -> bool:
    from huggingface_hub import constants

    return _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE") or bool(constants.HF_HUB_OFFLINE)


def _cache_dir() -> str | None:
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None  # huggingface_hub's default (~/.cache/huggingface/hub)


def _endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _hub_error(err: Exception, repo_id: str, revision: str, offline: bool, endpoint: str) -> HubError:
    """One line naming the id and what to do; never the exception text (it may quote request headers)."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    token_hint = "set HF_TOKEN (or run `hf auth login`) with a token that has read access"
    if isinstance(err, GatedRepoError):
        return HubError(
            f"{repo_id} is a gated repository: accept its conditions on its Hub page, then {token_hint}"
        )
    if isinstance(err, RevisionNotFoundError):
        return HubError(
            f"{repo_id} has no revision {revision!r}: pass --revision with an existing branch, tag or commit"
        )
    if isinstance(err, RepositoryNotFoundError):
        return HubError(
            f"{repo_id} is neither a local folder nor a model repository on {endpoint}: check the spelling or "
            f"the path; if the repository is private, {token_hint}"
        )
    status = getattr(getattr(err, "response", None), "status_code", None)
    if isinstance(err, HfHubHTTPError) and status in (401, 403):
        return HubError(f"the Hub refused access to {repo_id} (HTTP {status}): {token_hint}")
    if offline and isinstance(err, LocalEntryNotFoundError | OfflineModeIsEnabled):
        return HubError(
            f"{repo_id} (revision {revision}) is not in the local Hub cache and HF_HUB_OFFLINE=1 forbids "
            "downloading it: unset HF_HUB_OFFLINE, or pass a local model folder"
        )
    if isinstance(err, LocalEntryNotFoundError | ConnectionError | OSError):
        return HubError(
            f"cannot download {repo_id} (revision {revision}): the Hub at {endpoint} cannot be reached and it "
            "is not cached; check the network (or HF_ENDPOINT), or pass a local model folder"
        )
    if isinstance(err, HfHubHTTPError):
        return HubError(f"downloading {repo_id} (revision {revision}) from {endpoint} failed (HTTP {status})")
    return HubError(f"downloading {repo_id} (revision {revision}) failed ({type(err).__name__})")


def resolve_model(
    name_or_path: str | os.PathLike | None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    progress: bool | None = None,
) -> Path:
    """The local folder of a model argument: the bundled model for None or its aliases, a local folder as
    is, else the cached snapshot of the Hub id (downloaded if needed; see the module docstring). `progress`
    shows (True) or hides (False) huggingface_hub's download bars; None leaves its global setting."""
    from moequant.checkpoint.bundled import bundled_model_path, is_bundled

    if is_bundled(name_or_path):
        return bundled_model_path()
    path = Path(name_or_path)
    if path.exists():  # a local folder wins over a Hub id of the same spelling
        return path
    name = os.fspath(name_or_path)
    if not is_hub_id(name):
        raise CheckpointError(f"{name} does not exist (not a local folder, and not a Hub id like org/name)")
    return _download(name, revision or DEFAULT_REVISION, trust_remote_code, progress)


def local_model(
    name_or_path: str | os.PathLike | None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    progress: bool | None = None,
) -> str | None:
    """A model argument for the passes: None, a bundled alias or a local path unchanged (what the reports
    record), a Hub id replaced by the path of its downloaded snapshot."""
    from moequant.checkpoint.bundled import is_bundled

    if name_or_path is None or is_bundled(name_or_path) or Path(name_or_path).exists():
        return None if name_or_path is None else os.fspath(name_or_path)
    return str(resolve_model(name_or_path, revision, trust_remote_code, progress))


def _download(repo_id: str, revision: str, trust_remote_code: bool, progress: bool | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    offline, endpoint = _offline(), _endpoint()
    logger.info(
        "%s %s (revision %s) from %s",
        "looking up the cached" if offline else "fetching",
        repo_id,
        revision,
        "the local cache" if offline else endpoint,
    )
    bars_were_off = are_progress_bars_disabled()  # the CLI turns them off with transformers' bars
    if progress is not None:
        (enable_progress_bars if progress else disable_progress_bars)()
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=allow_patterns(trust_remote_code),
            cache_dir=_cache_dir(),
            endpoint=endpoint,
            local_files_only=offline,
        )
    except Exception as err:  # huggingface_hub / httpx raise many types; each becomes one line
        logger.debug("snapshot_download(%s, revision=%s) failed: %s", repo_id, revision, type(err).__name__)
        raise _hub_error(err, repo_id, revision, offline, endpoint) from None
    finally:
        if progress is not None:
            (disable_progress_bars if bars_were_off else enable_progress_bars)()
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise HubError(f"{repo_id} (revision {revision}) has no config.json: it is not a transformers model")
    if not any(folder.glob("*.safetensors")):
        raise HubError(
            f"{repo_id} (revision {revision}) has no *.safetensors weights; moequant never loads pickled "
            "*.bin/*.pt weights (convert them to safetensors first)"
        )
    logger.info("%s (revision %s) -> %s", repo_id, revision, folder)
    return folder
