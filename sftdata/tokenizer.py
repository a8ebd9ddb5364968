"""Tokenizer loading (local directory, hub id, or a bundled default) and tokenizer identity.

The bundled defaults let ``sftdata build raw.jsonl --template chatml`` work offline on a fresh install:

* ``qwen3`` (Qwen3's 151,669-token byte-level BPE, Apache-2.0) — the default for ChatML and other templates;
* ``mistral-7b-v0.1`` (Mistral-7B v0.1's 32,000-token Llama-family SentencePiece BPE, Apache-2.0) — the default
  for ``llama2`` and ``alpaca``.

They ship gzip-compressed inside the package and are unpacked once into ``~/.cache/sftdata/tokenizers``.

Any other tokenizer (or model) is located by :func:`locate_pretrained` before transformers is asked for it, so that a
wrong path, a directory without tokenizer files or a hub id without network is one line within a second or two, not
a traceback or a minute of download retries.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shutil
import socket
import threading
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from urllib.request import getproxies, proxy_bypass

from sftdata.record import DataError


class _HideTorchNotice(logging.Filter):
    """transformers announces "PyTorch was not found..." on import; building, showing and verifying data need no
    torch, so that notice is not the user's business there (training checks for torch itself)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("PyTorch was not found")


logging.getLogger("transformers").addFilter(_HideTorchNotice())  # before anything in sftdata imports transformers

BUNDLED = ("qwen3", "mistral-7b-v0.1")
DEFAULT_FOR_TEMPLATE = {"llama2": "mistral-7b-v0.1", "alpaca": "mistral-7b-v0.1"}
DEFAULT_TOKENIZER = "qwen3"


def default_tokenizer_for(template: str) -> str:
    """The bundled tokenizer used when ``--tokenizer`` is not given."""
    return DEFAULT_FOR_TEMPLATE.get(template, DEFAULT_TOKENIZER)


def _cache_dir() -> Path:
    root = os.environ.get("SFTDATA_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "sftdata")
    return Path(root) / "tokenizers"


def bundled_tokenizer_path(name: str) -> Path:
    """Unpack bundled tokenizer ``name`` (once) and return its directory."""
    assets = resources.files("sftdata") / "assets" / "tokenizers" / name
    packed = assets / "tokenizer.json.gz"
    if not packed.is_file():
        raise DataError(f"no bundled tokenizer {name!r}; bundled: {', '.join(BUNDLED)}")
    data = packed.read_bytes()
    digest = hashlib.sha256(data).hexdigest()[:16]
    target = _cache_dir() / f"{name}-{digest}"
    if not (target / "tokenizer.json").is_file():
        tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "tokenizer.json").write_bytes(gzip.decompress(data))
        (tmp / "tokenizer_config.json").write_bytes((assets / "tokenizer_config.json").read_bytes())
        try:
            tmp.rename(target)
        except OSError:  # another process unpacked it first
            shutil.rmtree(tmp, ignore_errors=True)
    return target


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "tekken.json")
MODEL_FILES = ("config.json",)
HUB_PROBE_SECONDS = 1.5


@dataclass
class PretrainedSource:
    """Where ``from_pretrained(spec, **kwargs)`` will load from: ``where`` in words, ``note`` when it is not the
    obvious place (a cached copy because the hub is unreachable)."""

    spec: str
    where: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    note: str | None = None


@cache
def hub_unreachable(timeout: float = HUB_PROBE_SECONDS) -> str | None:
    """Why the Hugging Face Hub (``HF_ENDPOINT``, or the HTTPS proxy in front of it) cannot be reached, or None.

    A DNS lookup and a TCP connect in a daemon thread, given ``timeout`` seconds: enough to tell "no network" from
    "network", where huggingface_hub would retry a download for about a minute before giving up.
    """
    from huggingface_hub import constants

    url = urlsplit(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    proxy = getproxies().get(url.scheme)
    if proxy and not proxy_bypass(host):
        proxied = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxied.hostname or host, proxied.port or 80
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                outcome.append(None)
        except OSError as e:
            outcome.append(f"{host}:{port}: {e.strerror or e}")

    thread = threading.Thread(target=probe, daemon=True)  # a daemon: a hung DNS lookup must not delay exit
    thread.start()
    thread.join(timeout + 0.2)
    return outcome[0] if outcome else f"{host}:{port}: no answer within {timeout:g} s"


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def locate_pretrained(spec: str, *, what: str = "tokenizer", option: str = "--tokenizer",
                      files: tuple[str, ...] = TOKENIZER_FILES, alternatives: str = "") -> PretrainedSource:
    """Check that ``spec`` (a local directory or a hub id) can be loaded, quickly, before transformers tries.

    A local directory must hold one of ``files``; a path that does not exist is reported as such (not as a bad hub
    id); a hub id must be in the local Hugging Face cache or the hub must answer a connection test within
    :data:`HUB_PROBE_SECONDS` (with ``HF_HUB_OFFLINE=1`` only the cache is used and nothing is tried on the network).
    When the hub cannot be reached but the files are cached, the cached copy is used (``local_files_only``).
    Raises :class:`DataError` with one line saying what was looked for, where, and what to do. ``alternatives``
    is appended to the suggestions (e.g. the bundled tokenizer names). Reusable for models:
    ``locate_pretrained(path, what="model", option="--model", files=MODEL_FILES)``.
    """
    path = Path(spec).expanduser()
    instead = f"pass a directory holding {files[0]}, a hub id (org/name){alternatives}"
    local = f"pass a local directory holding {files[0]}{alternatives}"
    if path.is_file():
        raise DataError(f"{option} {spec}: {path.resolve()} is a file; pass the directory that holds it")
    if path.is_dir():
        if not any((path / f).is_file() for f in files):
            raise DataError(f"{option} {spec}: {path.resolve()} holds no {what} files (looked for {', '.join(files)}); "
                            f"{instead}")
        return PretrainedSource(spec, f"the directory {path.resolve()}")
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(spec)
    except HFValidationError:
        raise DataError(f"{option} {spec}: no such directory ({path.resolve()}); {instead}") from None
    local_too = "" if "/" in spec else f" (and there is no directory {path.resolve()})"
    cached = any(isinstance(try_to_load_from_cache(spec, f), str) for f in files)
    cache_dir = constants.HF_HUB_CACHE
    if _hub_offline():
        if not cached:
            raise DataError(f"{option} {spec}: HF_HUB_OFFLINE=1 is set and {what} {spec!r} is not in the Hugging Face "
                            f"cache ({cache_dir}){local_too}; unset HF_HUB_OFFLINE to download it, or {local}")
        return PretrainedSource(spec, f"the Hugging Face cache ({cache_dir})", {"local_files_only": True})
    why = hub_unreachable()
    if why is None:
        return PretrainedSource(spec, f"the Hugging Face Hub ({constants.ENDPOINT})")
    if not cached:
        raise DataError(f"{option} {spec}: {what} {spec!r} is not in the Hugging Face cache ({cache_dir}) and "
                        f"{constants.ENDPOINT} cannot be reached ({why}){local_too}; connect and retry, or {local}. "
                        "Once it is cached, HF_HUB_OFFLINE=1 loads it without trying the network")
    return PretrainedSource(spec, f"the Hugging Face cache ({cache_dir})", {"local_files_only": True},
                            note=f"cached copy; {constants.ENDPOINT} unreachable")


def _one_line(error: BaseException, limit: int = 400) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[:limit] + "…"


def load_tokenizer(spec: str | None, *, template: str = "chatml") -> Any:
    """Load a fast tokenizer from a local directory, a hub id, or a bundled name (``None`` = the default).

    Only fast (Rust) tokenizers are accepted: sftdata needs character offsets to place label boundaries.
    Every failure is a :class:`DataError` with one line (see :func:`locate_pretrained`).
    """
    name = spec or default_tokenizer_for(template)
    if name in BUNDLED and not Path(name).exists():
        from transformers import AutoTokenizer

        path = bundled_tokenizer_path(name)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        tokenizer.sftdata_name = f"{name} (bundled)"
    else:
        source = locate_pretrained(name, alternatives=f", or a bundled name ({', '.join(BUNDLED)})")
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(name, **source.kwargs)
        except Exception as e:  # noqa: BLE001 -- whatever transformers raises, the user gets one line
            hint = ("; sentencepiece is not installed (pip install sentencepiece protobuf), or save the tokenizer "
                    "with a tokenizer.json" if "sentencepiece" in str(e) else "")
            raise DataError(f"cannot load tokenizer {name!r} from {source.where}: {_one_line(e)}{hint}") from None
        tokenizer.sftdata_name = name if source.note is None else f"{name} ({source.note})"
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"tokenizer {name!r} is not a fast tokenizer (no tokenizer.json); sftdata needs offsets")
    return tokenizer


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 over the serialized vocabulary/merges/normalizer/pre-tokenizer and the special tokens.

    Two tokenizers with the same fingerprint turn every text into the same ids; the trainer compares it with the
    manifest to refuse a dataset built for another tokenizer.
    """
    h = hashlib.sha256()
    h.update(tokenizer.backend_tokenizer.to_str().encode("utf-8"))
    h.update(repr(sorted(dict(tokenizer.special_tokens_map).items())).encode("utf-8"))
    return h.hexdigest()


def tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    """What the manifest records about the tokenizer."""
    chat_template = getattr(tokenizer, "chat_template", None)
    if isinstance(chat_template, dict):
        chat_template = chat_template.get("default")
    return {
        "name_or_path": getattr(tokenizer, "sftdata_name", None) or tokenizer.name_or_path,
        "sha256": tokenizer_fingerprint(tokenizer),
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "chat_template_sha256": hashlib.sha256(chat_template.encode()).hexdigest() if chat_template else None,
    }


def special_token_strings(tokenizer: Any) -> list[str]:
    """Strings that the tokenizer turns into control tokens wherever they appear in text (added, special)."""
    return sorted({t.content for t in tokenizer.added_tokens_decoder.values() if t.special and t.content})
