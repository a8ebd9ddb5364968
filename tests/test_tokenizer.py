"""Tokenizer loading: every way of pointing at a tokenizer that cannot work is one line saying what was looked for,
where, and what to do, decided before transformers is asked (so no download retries); a cached hub tokenizer loads
when the hub cannot be reached; the bundled tokenizers; no "PyTorch was not found" notice on core commands."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from sftdata.record import DataError
from sftdata.tokenizer import MODEL_FILES, hub_unreachable, load_tokenizer, locate_pretrained

from conftest import REPO, TINY_TOKENIZER

CHAT = str(REPO / "examples" / "data" / "chat.jsonl")

BUNDLED_HINT = "or a bundled name (qwen3, mistral-7b-v0.1)"
UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused at once


@pytest.fixture
def no_transformers_load(monkeypatch):
    """Fail the test if transformers is asked to load anything (its hub retries are what must not happen)."""
    from transformers import AutoTokenizer

    def refuse(*args, **kwargs):
        raise AssertionError("AutoTokenizer.from_pretrained was called")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", refuse)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """An empty Hugging Face cache in tmp_path and an endpoint set by the test (HF_HUB_OFFLINE unset)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    hub_unreachable.cache_clear()
    yield cache
    hub_unreachable.cache_clear()


def fake_cached_repo(cache, repo_id: str, source=TINY_TOKENIZER) -> None:
    """Lay out ``repo_id`` in a Hugging Face cache the way huggingface_hub stores a download."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    for f in source.iterdir():
        shutil.copy(f, snapshot / f.name)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "qwen2"}))  # AutoTokenizer reads a hub repo's config


def test_directory_without_tokenizer_files(tmp_path, no_transformers_load):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with pytest.raises(DataError) as caught:
        load_tokenizer(str(model))
    assert str(caught.value) == (
        f"--tokenizer {model}: {model} holds no tokenizer files (looked for tokenizer.json, tokenizer_config.json, "
        "tokenizer.model, vocab.json, vocab.txt, spiece.model, tekken.json); pass a directory holding tokenizer.json, "
        f"a hub id (org/name), {BUNDLED_HINT}")


def test_a_path_that_does_not_exist_is_not_called_a_bad_repo_id(tmp_path, monkeypatch, no_transformers_load):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as caught:
        load_tokenizer("./nope")
    assert str(caught.value) == (f"--tokenizer ./nope: no such directory ({tmp_path}/nope); pass a directory holding "
                                 f"tokenizer.json, a hub id (org/name), {BUNDLED_HINT}")
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(DataError, match=r"--tokenizer tokenizer.json: .*/tokenizer.json is a file; pass the directory "
                                        "that holds it"):
        load_tokenizer("tokenizer.json")


def test_hub_id_without_network_is_one_line_naming_hf_hub_offline(hub, monkeypatch, no_transformers_load):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", UNREACHABLE)
    with pytest.raises(DataError) as caught:
        load_tokenizer("Org/some-model")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"--tokenizer Org/some-model: tokenizer 'Org/some-model' is not in the Hugging Face cache "
                              f"({hub}) and {UNREACHABLE} cannot be reached (127.0.0.1:9: Connection refused); connect "
                              f"and retry, or pass a local directory holding tokenizer.json, {BUNDLED_HINT}. Once it is "
                              "cached, HF_HUB_OFFLINE=1 loads it without trying the network")


def test_hf_hub_offline_uses_only_the_cache(hub, monkeypatch, no_transformers_load):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as caught:
        load_tokenizer("Org/some-model")
    assert str(caught.value) == (f"--tokenizer Org/some-model: HF_HUB_OFFLINE=1 is set and tokenizer 'Org/some-model' "
                                 f"is not in the Hugging Face cache ({hub}); unset HF_HUB_OFFLINE to download it, or "
                                 f"pass a local directory holding tokenizer.json, {BUNDLED_HINT}")
    fake_cached_repo(hub, "Org/some-model")
    source = locate_pretrained("Org/some-model")
    assert (source.kwargs, source.note) == ({"local_files_only": True}, None)


def test_unreachable_hub_with_a_cached_copy_loads_it_and_says_so(tmp_path):
    # A fresh process: transformers and huggingface_hub read HF_HUB_CACHE / HF_ENDPOINT when they are imported.
    fake_cached_repo(tmp_path, "Org/tiny")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_CACHE": str(tmp_path), "HF_ENDPOINT": UNREACHABLE}
    env.pop("HF_HUB_OFFLINE", None)
    code = "from sftdata.tokenizer import load_tokenizer\nt = load_tokenizer('Org/tiny')\nprint(t.sftdata_name); print(len(t))"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"Org/tiny (cached copy; {UNREACHABLE} unreachable)", "300"]


def test_hub_probe_sees_a_listening_endpoint(hub, monkeypatch):
    from huggingface_hub import constants

    with socket.create_server(("127.0.0.1", 0)) as server:
        endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        assert hub_unreachable() is None
        source = locate_pretrained("Org/some-model")
    assert source.kwargs == {} and source.where == f"the Hugging Face Hub ({endpoint})"


def test_hub_probe_goes_through_the_https_proxy(hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "https://huggingface.co")
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    assert hub_unreachable() == "127.0.0.1:9: Connection refused"


def test_locate_pretrained_serves_models_too(tmp_path):
    model = tmp_path / "base"
    model.mkdir()
    with pytest.raises(DataError, match=r"^--model .*base: .*base holds no model files \(looked for config.json\); "
                                        "pass a directory holding config.json, a hub id \\(org/name\\)$"):
        locate_pretrained(str(model), what="model", option="--model", files=MODEL_FILES)
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert locate_pretrained(str(model), what="model", option="--model", files=MODEL_FILES).kwargs == {}


def test_transformers_failure_is_one_line(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(DataError) as caught:
        load_tokenizer(str(broken))
    assert str(caught.value).startswith(f"cannot load tokenizer {str(broken)!r} from the directory {broken}: ")
    assert "\n" not in str(caught.value)


def test_bundled_default_loads_offline():
    tok = load_tokenizer(None, template="llama2")
    assert tok.sftdata_name == "mistral-7b-v0.1 (bundled)" and len(tok) == 32000


def test_core_commands_do_not_print_the_missing_torch_notice(tmp_path):
    # torch made unimportable in a fresh process, as in a core install (`pip install .`).
    code = ("import sys\nsys.modules['torch'] = None\nfrom sftdata.cli import main\n"
            f"sys.argv = ['sftdata', 'build', {CHAT!r}, '-o', {str(tmp_path / 'o')!r}, '-q']\nmain()")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "torch" not in done.stderr.lower(), done.stderr
    # The simulation is real: transformers alone prints the notice under it.
    bare = subprocess.run([sys.executable, "-c", "import sys\nsys.modules['torch'] = None\nimport transformers"],
                          capture_output=True, text=True, timeout=300)
    assert "PyTorch was not found" in bare.stderr
