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


def test_the_example_recipe_builds(tmp_path, monkeypatch):
    """README's first command: the shipped recipe, 85/15 mix, 80/10/10 splits, filters and dedup, on the example data."""
    from sftdata.build import build

    monkeypatch.chdir(REPO)  # the recipe's source paths are relative to the repository
    manifest = build(config="examples/recipe.yaml", output=str(tmp_path / "out")).manifest
    counts = manifest["counts"]
    assert counts["rows_read"] == 200
    assert counts["rows_read"] == counts["rows_kept"] + counts["skipped_total"] + counts["removed_total"]
    assert set(counts["removed"]) <= {"mixing", "near-duplicate", "exact-duplicate", "refusal", "short-response"}
    assert set(manifest["splits"]) == {"train", "validation", "test"}
    shares = [s["share_rows"] for s in manifest["mixing"]["sources"]]
    assert abs(shares[0] - 0.85) < 0.02 and abs(shares[1] - 0.15) < 0.02  # 149 training rows: one row is 0.7%
