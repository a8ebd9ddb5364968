"""`sftdata eval`: loss over trained tokens recomputed by hand, the report (base, tuned, k-shot, forgetting,
generations), split fallback, prompt files and scoring. CPU, tiny Llama models built from a config."""

from __future__ import annotations

import hashlib
import json
import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import train_fixtures as tf  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from sftdata.cli import main  # noqa: E402
from sftdata.eval import (  # noqa: E402
    EvalError,
    Example,
    evaluate,
    final_answer,
    load_examples,
    read_prompts,
    resolve_split,
    score_output,
)

CONVS = [
    ("a.jsonl", [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}]),
    ("a.jsonl", [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
                 {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Green."}]),
    ("b.jsonl", [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi there!"}]),
]


def write_dir(path, tok, splits: dict[str, list[tuple[str, int, list[int], list[int]]]], *, pack: set[str] = frozenset()):
    """An sftdata output directory with ``source``/``row`` columns; splits in ``pack`` hold one packed row."""
    path.mkdir(parents=True, exist_ok=True)
    info = {}
    for name, examples in splits.items():
        if name in pack:
            table = pa.table({
                "input_ids": pa.array([[t for _, _, ids, _ in examples for t in ids]], pa.list_(pa.int32())),
                "labels": pa.array([[t for _, _, _, lab in examples for t in lab]], pa.list_(pa.int32())),
                "position_ids": pa.array([[p for _, _, ids, _ in examples for p in range(len(ids))]],
                                         pa.list_(pa.int32())),
                "seq_lengths": pa.array([[len(ids) for _, _, ids, _ in examples]], pa.list_(pa.int32())),
                "source": pa.array([[s for s, _, _, _ in examples]], pa.list_(pa.string())),
                "row": pa.array([[r for _, r, _, _ in examples]], pa.list_(pa.int64())),
            })
        else:
            table = pa.table({
                "input_ids": pa.array([ids for _, _, ids, _ in examples], pa.list_(pa.int32())),
                "labels": pa.array([lab for _, _, _, lab in examples], pa.list_(pa.int32())),
                "source": pa.array([s for s, _, _, _ in examples], pa.string()),
                "row": pa.array([r for _, r, _, _ in examples], pa.int64()),
            })
        pq.write_table(table, path / f"{name}-00000.parquet")
        info[name] = {"rows": table.num_rows, "files": [f"{name}-00000.parquet"]}
    template = tf.INST_TEMPLATE
    manifest = {"format": "sftdata/1", "fingerprint": "test",
                "template": {"name": "llama2-test", "text": template, "end_of_turn": tok.eos_token,
                             "sha256": hashlib.sha256(template.encode()).hexdigest()},
                "tokenizer": tf.tokenizer_block(tok), "options": {}, "splits": info}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def examples_of(tok, convs):
    out = []
    for i, (src, conv) in enumerate(convs):
        ids, labels = tf.encode_conversation(tok, conv)
        out.append((src, i + 1, ids, labels))
    return out


@pytest.fixture(scope="module")
def tok():
    return tf.load_tokenizer("mistral-7b-v0.1")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok):
    return tf.tiny_model_dir(tmp_path_factory.mktemp("base"), tok)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tok):
    train = examples_of(tok, [(f"g{i % 2}.jsonl", c) for i, c in enumerate(
        [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in
         [("Add 1 and 1.", "2"), ("Capital of France?", "Paris."), ("Opposite of hot?", "Cold."),
          ("Spell cat.", "C-A-T."), ("Largest ocean?", "The Pacific."), ("Colour of grass?", "Green.")] * 2])])
    return write_dir(tmp_path_factory.mktemp("data"), tok, {"train": train, "test": examples_of(tok, CONVS)},
                     pack={"test"})


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, data_dir, model_dir):
    from sftdata.train import train

    out = tmp_path_factory.mktemp("adapter") / "adapter"
    train(data_dir, model_dir, out, max_steps=3, batch_size=4, grad_accum=1, lora_dropout=0.0, progress=False,
          warmup=0, learning_rate=1e-2, logging_steps=1, lora_r=8, lora_alpha=16)
    return out


def hand_nll(model, ids: list[int], labels: list[int]) -> tuple[float, int]:
    """-sum log p(labels[i] | ids[:i]) over trained positions i > 0, one example alone, no batching or padding."""
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
    total, n = 0.0, 0
    for i in range(1, len(ids)):
        if labels[i] != -100:
            total -= float(logp[i - 1, labels[i]])
            n += 1
    return total, n


def test_loss_over_trained_tokens_recomputed_by_hand(tmp_path, tok, model_dir, data_dir):
    from transformers import AutoModelForCausalLM

    result = evaluate(data_dir, [str(model_dir)], tmp_path / "report", num_prompts=0, progress=False)
    row = result.report["models"][0]
    assert result.report["split"] == "test" and result.notices == []
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    per = {}
    for src, conv in CONVS:
        ids, labels = tf.encode_conversation(tok, conv)
        s, n = hand_nll(model, ids, labels)
        acc = per.setdefault(src, [0.0, 0, 0])
        acc[0] += s
        acc[1] += n
        acc[2] += 1
    # trained tokens: the answers and their EOS ("4." -> 3, "Blue." + "Green." -> 3 + 3, "Hi there!" -> 4) minus none
    counts = {src: acc[1] for src, acc in per.items()}
    assert counts == {"a.jsonl": sum(len(tok.encode(f" {a}", add_special_tokens=False)) + 1
                                     for a in ("4.", "Blue.", "Green.")),
                      "b.jsonl": len(tok.encode(" Hi there!", add_special_tokens=False)) + 1}
    total_nll = sum(acc[0] for acc in per.values())
    total_n = sum(counts.values())
    assert row["trained_tokens"] == total_n and row["examples"] == 3
    assert row["loss"] == pytest.approx(total_nll / total_n, rel=1e-5)
    assert row["perplexity"] == pytest.approx(math.exp(total_nll / total_n), rel=1e-5)
    for src, (s, n, k) in per.items():
        got = row["per_source"][src]
        assert (got["trained_tokens"], got["examples"]) == (n, k)
        assert got["loss"] == pytest.approx(s / n, rel=1e-5)
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    assert saved["models"][0]["trained_tokens"] == total_n and saved["format"] == "sftdata-eval/1"


def test_packed_rows_split_back_into_examples(tok, data_dir):
    examples = load_examples(data_dir, "test")
    assert [(e.source, e.row) for e in examples] == [("a.jsonl", 1), ("a.jsonl", 2), ("b.jsonl", 3)]
    for e, (_, conv) in zip(examples, CONVS):
        assert (e.input_ids, e.labels) == tf.encode_conversation(tok, conv)
    # the last trained reply of the two-turn example is "Green." + EOS, right after its [/INST]
    ids, labels = examples[1].input_ids, examples[1].labels
    start, end = examples[1].last_reply()
    assert ids[start:end] == tok.encode(" Green.", add_special_tokens=False) + [tok.eos_token_id]
    assert labels[start - 1] == -100 and end == len(ids)


def test_report_base_tuned_shots_forgetting_and_generations(tmp_path, tok, data_dir, adapter, model_dir):
    general = tmp_path / "general.txt"
    general.write_text("The sea is large and blue. Ships sail across it every day between the ports.\n")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "What is 3+3?", "answer": "#### 6"}) + "\n"
                       + json.dumps({"messages": [{"role": "user", "content": "Hi"}]}) + "\n")
    res = evaluate(data_dir, [str(adapter)], tmp_path / "rep", general=general, prompts=prompts, shots=2,
                   num_prompts=2, max_new_tokens=6, progress=False)
    rep = res.report
    base, tuned = rep["models"]
    assert (base["name"], base["kind"], base["path"]) == ("base", "base", str(model_dir))
    assert (tuned["name"], tuned["kind"]) == ("adapter", "adapter")
    assert base["trained_tokens"] == tuned["trained_tokens"] == base["few_shot"]["trained_tokens"]
    assert tuned["delta_loss_vs_base"] == pytest.approx(tuned["loss"] - base["loss"])
    assert tuned["loss"] < base["loss"]  # 3 steps at lr 1e-2 on answers of the same shape
    assert base["general_tokens"] == tuned["general_tokens"] > 10
    assert tuned["forgetting"]["general_loss_delta"] == pytest.approx(tuned["general_loss"] - base["general_loss"])
    assert "forgetting" not in base and "few_shot" not in tuned
    assert len(rep["shot_examples"]) == 2
    # 2 test prompts + 2 from the file; every one generated by base, base (2-shot) and the adapter
    assert [s["origin"] for s in rep["samples"]] == ["test example 0 (a.jsonl:1)", "test example 1 (a.jsonl:2)",
                                                     "prompts.jsonl:1", "prompts.jsonl:2"]
    assert [s["reference"] for s in rep["samples"]] == ["4.", "Green.", "#### 6", None]
    for s in rep["samples"]:
        assert set(s["outputs"]) == {"base", "base (2-shot)", "adapter"}
    assert base["generation"]["scored"] == tuned["generation"]["scored"] == 3
    ids = tf.encode_conversation(tok, CONVS[1][1])[0]
    reply = len(tok.encode(" Green.", add_special_tokens=False)) + 1
    assert rep["samples"][1]["prompt"] == tok.decode(ids[:-reply])
    md = (tmp_path / "rep" / "report.md").read_text()
    for needle in ("| base | base |", "| base (2-shot) |", "| adapter | adapter |", "## Forgetting",
                   "![training and eval loss per step](loss_curve.svg)", "### 3. prompts.jsonl:1"):
        assert needle in md
    svg = (tmp_path / "rep" / "loss_curve.svg").read_text()
    assert svg.startswith("<svg") and svg.count("<polyline") == 1
    assert len(rep["loss_curve"]["train"]) == 3


def test_general_set_can_be_an_sftdata_output_directory(tok, data_dir):
    from sftdata.eval import general_examples

    examples, name = general_examples(data_dir, {}, "unused")
    assert name == str(data_dir) and len(examples) == 12 + 3  # every split: 12 train + 3 test examples


def test_split_falls_back_to_validation_with_a_notice(tmp_path, tok):
    d = write_dir(tmp_path / "d", tok, {"train": examples_of(tok, CONVS), "validation": examples_of(tok, CONVS[:1])})
    split, notice = resolve_split(d, None)
    assert split == "validation" and notice == f"{d} has no test split; evaluating the validation split"
    with pytest.raises(EvalError, match="no 'holdout' split"):
        resolve_split(d, "holdout")


def test_cli_prints_plain_progress_lines_off_a_terminal(tmp_path, data_dir, model_dir):
    out = tmp_path / "r"
    result = CliRunner().invoke(main, ["eval", str(data_dir), "--model", str(model_dir), "--num-prompts", "1",
                                       "--max-new-tokens", "2", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "report.md").is_file() and (out / "report.json").is_file()
    lines = [ln for ln in result.output.splitlines() if ln.startswith(f"eval {model_dir.name}:")]
    assert lines[0] == f"eval {model_dir.name}: loss on test (0/4)" and lines[-1].endswith("done (4/4)")


def test_progress_is_a_bar_per_model_on_a_terminal():
    import io

    from rich.console import Console

    from sftdata.eval import ModelProgress

    buf = io.StringIO()
    bar = ModelProgress("adapter", 4, Console(file=buf, force_terminal=True, width=100), True)
    bar.phase("loss on test")
    bar.advance(4)
    bar.close()
    text = buf.getvalue()
    assert "eval adapter" in text and "4/4" in text and "━" in text and "eval adapter: loss" not in text


def test_read_prompts_renders_the_training_template(tmp_path, tok):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"instruction": "Sum", "input": "1 2", "answer": "3"}) + "\n"
                 + json.dumps({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]})
                 + "\n")
    a, b = read_prompts(f, tf.INST_TEMPLATE, tok)
    assert a.text == "<s>[INST] Sum\n\n1 2 [/INST]" and a.reference == "3"
    assert a.ids == tok("<s>[INST] Sum\n\n1 2 [/INST]", add_special_tokens=False)["input_ids"]
    assert b.text == "<s>[INST] Q [/INST]" and b.reference == "A" and b.origin == "p.jsonl:2"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    with pytest.raises(EvalError, match=r"bad.jsonl:1: expected messages, prompt or instruction"):
        read_prompts(bad, tf.INST_TEMPLATE, tok)


def test_scoring():
    assert final_answer("so 3 + 3 = 6\n#### 6") == " 6"
    assert score_output("The answer is 6.", "reasoning\n#### 6") == {"exact_match": False, "contains_answer": True}
    assert score_output("  Paris. ", "paris.") == {"exact_match": True, "contains_answer": True}
    assert score_output("London", "Paris") == {"exact_match": False, "contains_answer": False}
    assert score_output("x", None) is None
    assert Example([1, 5, 6], [-100, 5, 6], "s", 1).last_reply() == (1, 3)
    assert Example([1, 5, 6], [1, 5, 6], "s", 1).last_reply() is None  # raw text: no prompt before the reply
