"""The shipped examples run end to end (they are documentation, so they must not rot)."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_train_tiny_example_runs_end_to_end(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "examples" / "train_tiny.py"), "--workdir", str(tmp_path),
                             "--steps", "2"], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # the adapter directory's tokenizer renders the serving prompt with the build's template (Llama-2 [INST])
    assert "prompt rendered with the build's template: '<s>[INST] Write a Python function that reverses a string. [/INST]'" in result.stdout
    assert "merged model: same greedy tokens = True" in result.stdout
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
