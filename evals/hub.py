"""Push a finished moequant checkpoint folder to the Hugging Face Hub (create_repo + upload_folder).

The token comes from the argument, else `HF_TOKEN`, else the token `hf auth login` stored; the endpoint
from the argument, else `HF_ENDPOINT`, else huggingface.co. The token is never logged or put in a message:
every error text that leaves this module has it masked.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from moequant.errors import MoEQuantError

logger = logging.getLogger(__name__)

IGNORE = [".*", "**/.*", "*.tmp", "*.partial/**"]  # hidden/temporary files never leave the machine


@dataclass(frozen=True)
class PushResult:
    repo_url: str
    commit_url: str
    revision: str
    files: int


def check_pushable(folder: str | Path) -> Path:
    """Refuse anything but a complete moequant checkpoint folder."""
    folder = Path(folder)
    if folder.name.endswith(".partial"):
        raise MoEQuantError(
            f"{folder} is an unfinished quantization (.partial); finish it with --resume first"
        )
    if not folder.is_dir():
        partial = folder.with_name(folder.name + ".partial")
        hint = f" ({partial} holds an interrupted run)" if partial.is_dir() else ""
        raise MoEQuantError(f"{folder} is not a folder{hint}")
    cfg = folder / "config.json"
    try:
        qc = json.loads(cfg.read_text()).get("quantization_config") or {}
    except FileNotFoundError:
        raise MoEQuantError(f"{folder} has no config.json: not a model folder") from None
    except json.JSONDecodeError as err:
        raise MoEQuantError(f"{cfg} is not valid JSON ({err})") from None
    if qc.get("quant_method") != "moequant":
        raise MoEQuantError(
            f"{folder} is not a moequant checkpoint (config.json has no moequant quantization_config)"
        )
    if qc.get("status") != "complete":
        raise MoEQuantError(
            f"{folder} is an incomplete moequant checkpoint (status {qc.get('status')!r}); finish it before pushing"
        )
    if not any(folder.glob("*.safetensors")):
        raise MoEQuantError(f"{folder} has no .safetensors weights")
    return folder


def resolve_token(token: str | None = None) -> str:
    if token:
        return token
    from huggingface_hub import get_token

    found = os.environ.get("HF_TOKEN") or get_token()
    if not found:
        raise MoEQuantError(
            "no Hugging Face token: set HF_TOKEN (a token with write access) or run `hf auth login`"
        )
    return found


def _mask(text: str, token: str) -> str:
    return text.replace(token, "***") if token else text


def push(
    folder: str | Path,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    commit_message: str | None = None,
) -> PushResult:
    """Create `repo_id` (if needed) and upload every file of the checkpoint folder in one commit."""
    from huggingface_hub import HfApi

    from moequant.evals.card import CARD, is_generated_unedited, write_card

    folder = check_pushable(folder)
    token = resolve_token(token)
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or "").rstrip("/") or None
    api = HfApi(endpoint=endpoint, token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if not (folder / CARD).is_file() or is_generated_unedited(folder / CARD):
            write_card(folder, repo_id=repo_id)  # the loading snippet names the repo; hand-edited cards stay
        else:
            logger.info("keeping the hand-edited %s", folder / CARD)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            revision=revision,
            commit_message=commit_message or f"moequant checkpoint {folder.name}",
            ignore_patterns=IGNORE,
        )
    except MoEQuantError:
        raise
    except Exception as err:  # HTTP errors, bad repo id, network: one clear line, token masked
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MoEQuantError(_mask(f"push to {repo_id} failed: {type(err).__name__}: {msg}", token)) from None
    files = [
        p for p in folder.rglob("*") if p.is_file() and not p.relative_to(folder).as_posix().startswith(".")
    ]
    logger.info("pushed %d files from %s to %s", len(files), folder, _mask(str(url), token))
    return PushResult(str(url), str(getattr(info, "commit_url", info)), revision or "main", len(files))
