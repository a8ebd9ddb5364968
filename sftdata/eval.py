"""Evaluate: base vs fine-tuned models on a built split, with the training masks and the training template.

For every model (the base, an adapter directory, a merged or fully fine-tuned directory):

* **loss over trained tokens only** — the split's own ``labels`` (the exact masks the model was trained with),
  token-weighted over every target (``labels[i] != -100`` for ``i > 0``: labels are unshifted), overall and per
  source, and its perplexity ``exp(loss)``. Packed rows are split back into their examples and each is scored alone
  (what the block-diagonal mask computes in training);
* the same for the base model **with k examples from the train split placed before each test conversation**
  (``--shots K``), so "did fine-tuning help" is also asked against a few-shot prompt;
* **forgetting**: the loss and perplexity on a general held-out set (raw text or chat, built here with the same
  template and tokenizer), reported as the difference from the base model;
* **generations** for N test prompts and for prompts from a file. A test prompt is the row's tokens before its
  last trained reply — ``tok(P_k)``, the serving prompt, by the build's prefix invariant — so it is rendered with
  the training template's generation prompt by construction; the reply itself is the reference for exact-match /
  contains-answer scoring. Generation is greedy (or sampled with a seed) and stops at every end-of-turn id.

``evaluate`` writes ``report.json``, ``report.md`` and, when an adapter directory holds ``trainer_state.json``,
``loss_curve.svg`` (the training/eval loss curve the report embeds). torch is imported inside functions.
"""

from __future__ import annotations

import gc
import html
import json
import math
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from sftdata.record import DataError

FORMAT = "sftdata-eval/1"
IGNORE_INDEX = -100
DEFAULT_SPLIT = "test"
FALLBACK_SPLIT = "validation"


class EvalError(Exception):
    """A problem that stops the evaluation, with a message meant for the user."""


# --------------------------------------------------------------------------------------------------------------
# Data: examples of a split, prompts, few-shot prefixes
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Example:
    """One example of a split (a packed row holds several)."""

    input_ids: list[int]
    labels: list[int]
    source: str
    row: int

    @property
    def targets(self) -> int:
        return sum(1 for i, x in enumerate(self.labels) if i > 0 and x != IGNORE_INDEX)

    def last_reply(self) -> tuple[int, int] | None:
        """``[start, end)`` of the last trained run, when a prompt precedes it (a chat example)."""
        end = None
        for i in range(len(self.labels) - 1, -1, -1):
            trained = self.labels[i] != IGNORE_INDEX
            if trained and end is None and i > 0:
                end = i + 1
            elif not trained and end is not None:
                return (i + 1, end)
        return None  # no trained token, or trained from position 0 on (raw text)


def resolve_split(data_dir: str | Path, split: str | None) -> tuple[str, str | None]:
    """The split to evaluate and a one-line notice when ``test`` was asked for but only ``validation`` exists."""
    from sftdata.write import split_files

    splits = split_files(data_dir)
    wanted = split or DEFAULT_SPLIT
    if splits.get(wanted):
        return wanted, None
    if wanted == DEFAULT_SPLIT and splits.get(FALLBACK_SPLIT):
        return FALLBACK_SPLIT, f"{data_dir} has no test split; evaluating the validation split"
    have = ", ".join(sorted(splits)) or "none"
    raise EvalError(f"{data_dir} has no {wanted!r} split (splits: {have}); build one with a held-out fraction")


def load_examples(data_dir: str | Path, split: str) -> list[Example]:
    """Every example of ``split``, packed rows split back by ``seq_lengths``; file order."""
    import pyarrow.parquet as pq

    from sftdata.write import split_files

    out: list[Example] = []
    for path in split_files(data_dir, split).get(split, []):
        table = pq.read_table(path)
        cols = set(table.column_names)
        for rec in table.to_pylist():
            ids, labels = list(rec["input_ids"]), list(rec["labels"])
            lengths = rec.get("seq_lengths") if "seq_lengths" in cols else None
            if not lengths:
                out.append(Example(ids, labels, str(rec.get("source") or ""), int(rec.get("row") or 0)))
                continue
            sources, rows = rec.get("source") or [""] * len(lengths), rec.get("row") or [0] * len(lengths)
            at = 0
            for n, src, row in zip(lengths, sources, rows):
                out.append(Example(ids[at:at + n], labels[at:at + n], str(src), int(row)))
                at += n
    return out


def strip_bos(ids: list[int], bos_id: int | None) -> list[int]:
    return ids[1:] if ids and bos_id is not None and ids[0] == bos_id else ids


def few_shot_prefix(shots: Sequence[Example], bos_id: int | None) -> list[int]:
    """The shots' rendered conversations one after another, as the template renders each, with one BOS at most."""
    prefix: list[int] = []
    for i, shot in enumerate(shots):
        prefix += shot.input_ids if i == 0 else strip_bos(shot.input_ids, bos_id)
    return prefix


def with_prefix(example: Example, prefix: list[int], bos_id: int | None) -> Example:
    """``example`` placed after ``prefix``; the prefix is never scored."""
    if not prefix:
        return example
    ids = strip_bos(example.input_ids, bos_id)
    cut = len(example.input_ids) - len(ids)
    return Example(prefix + ids, [IGNORE_INDEX] * len(prefix) + example.labels[cut:], example.source, example.row)


def pick_shots(train: list[Example], k: int, seed: int, max_tokens: int = 512) -> list[Example]:
    """``k`` chat examples of the train split (seeded), preferring ones of at most ``max_tokens`` tokens."""
    if k <= 0:
        return []
    chats = [e for e in train if e.last_reply() is not None]
    short = [e for e in chats if len(e.input_ids) <= max_tokens] or chats
    if len(short) < k:
        raise EvalError(f"--shots {k}: the train split has only {len(short)} chat examples to draw from")
    return random.Random(seed).sample(short, k)


@dataclass
class Prompt:
    ids: list[int]
    text: str
    reference: str | None
    origin: str


def reply_text(tokenizer: Any, ids: list[int], end_of_turn: str | None) -> str:
    """Decoded reply without special tokens and without a textual end-of-turn marker."""
    text = tokenizer.decode(ids, skip_special_tokens=True).strip()
    if end_of_turn and text.endswith(end_of_turn.strip()):
        text = text[: -len(end_of_turn.strip())].rstrip()
    return text


def split_prompts(examples: list[Example], tokenizer: Any, n: int, end_of_turn: str | None) -> list[Prompt]:
    """The first ``n`` chat examples as prompts: the tokens before their last trained reply, the reply as reference."""
    out = []
    for index, ex in enumerate(examples):
        if len(out) >= n:
            break
        span = ex.last_reply()
        if span is None:
            continue
        start, end = span
        prompt_ids = ex.input_ids[:start]
        origin = f"test example {index}" + (f" ({Path(ex.source).name}:{ex.row})" if ex.source else "")
        out.append(Prompt(prompt_ids, tokenizer.decode(prompt_ids), reply_text(tokenizer, ex.input_ids[start:end],
                                                                                end_of_turn), origin))
    return out


def read_prompts(path: str | Path, template_text: str, tokenizer: Any) -> list[Prompt]:
    """Prompts from a file, rendered with the training template and its generation prompt.

    ``.txt``: one user message per line. ``.jsonl``/``.json``: rows with ``messages`` (a final assistant message is
    taken as the reference), or ``prompt`` / ``instruction`` (+ ``input``); optional ``answer`` or ``reference``.
    """
    from sftdata.templates import ChatTemplate, special_token_variables

    path = Path(path)
    if not path.is_file():
        raise EvalError(f"--prompts {path}: no such file")
    template = ChatTemplate("training", template_text, special_token_variables(tokenizer))
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".txt":
        rows = [(i + 1, {"prompt": line}) for i, line in enumerate(text.splitlines()) if line.strip()]
    elif path.suffix == ".json":
        data = json.loads(text)
        rows = list(enumerate(data if isinstance(data, list) else data.get("rows", []), start=1))
    else:
        rows = []
        for i, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append((i, json.loads(line)))
                except ValueError as e:
                    raise EvalError(f"{path}:{i}: not JSON ({e})") from None
    prompts = []
    for i, row in rows:
        if not isinstance(row, dict):
            raise EvalError(f"{path}:{i}: expected an object with messages, prompt or instruction")
        reference = row.get("answer", row.get("reference"))
        if isinstance(row.get("messages"), list) and row["messages"]:
            messages = [dict(m) for m in row["messages"]]
            if messages[-1].get("role") == "assistant":
                reference = reference if reference is not None else messages[-1].get("content")
                messages = messages[:-1]
        elif isinstance(row.get("prompt"), str):
            messages = [{"role": "user", "content": row["prompt"]}]
        elif isinstance(row.get("instruction"), str):
            content = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
            messages = [{"role": "user", "content": content, "instruction": row["instruction"],
                         "input": row.get("input") or ""}]
        else:
            raise EvalError(f"{path}:{i}: expected messages, prompt or instruction")
        if not messages or messages[-1].get("role") != "user":
            raise EvalError(f"{path}:{i}: the conversation must end with a user message")
        try:
            rendered = template.render(messages, add_generation_prompt=True)
        except Exception as e:  # jinja2 raise_exception and friends
            raise EvalError(f"{path}:{i}: the training template refuses this conversation: {e}") from None
        ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        prompts.append(Prompt(ids, rendered, None if reference is None else str(reference), f"{path.name}:{i}"))
    return prompts


# --------------------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    return " ".join(text.split()).strip().lower()


def final_answer(reference: str) -> str:
    """The part of a reference answer to look for: after the last ``####`` (GSM8K) if present, else all of it."""
    return reference.rsplit("####", 1)[1] if "####" in reference else reference


def score_output(output: str, reference: str | None) -> dict[str, bool] | None:
    if reference is None or not reference.strip():
        return None
    answer = normalize_answer(final_answer(reference))
    return {"exact_match": normalize_answer(output) == normalize_answer(reference),
            "contains_answer": bool(answer) and answer in normalize_answer(output)}


@dataclass
class LossTotals:
    nll: float = 0.0
    targets: int = 0
    examples: int = 0

    def add(self, nll: float, targets: int) -> None:
        self.nll += nll
        self.targets += targets
        self.examples += 1

    def to_dict(self) -> dict[str, Any]:
        loss = self.nll / self.targets if self.targets else float("nan")
        return {"loss": loss, "perplexity": perplexity(loss), "trained_tokens": self.targets,
                "examples": self.examples}


def perplexity(loss: float) -> float:
    if math.isnan(loss):
        return float("nan")
    return math.exp(loss) if loss < 700 else float("inf")


def example_nll(model: Any, examples: Sequence[Example], *, device: Any, max_batch_tokens: int | None = None,
                on_batch: Any = None) -> list[tuple[float, int]]:
    """``(sum of -log p over trained targets, number of targets)`` for each example, in input order.

    Examples are scored in length-sorted, right-padded batches with an attention mask (padding never changes a
    real position's logits under the causal mask); the cross-entropy is taken in fp32 and summed in fp64.
    """
    import torch

    vocab = model.get_output_embeddings().weight.shape[0]
    budget = max_batch_tokens or max(256, (1 << 26) // max(vocab, 1))  # ≈ 256 MiB of fp32 logits per batch
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    results: list[tuple[float, int]] = [(0.0, 0)] * len(examples)
    batch: list[int] = []

    def run(indices: list[int]) -> None:
        width = max(len(examples[i].input_ids) for i in indices)
        ids = torch.zeros((len(indices), width), dtype=torch.long)
        labels = torch.full((len(indices), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(indices), width), dtype=torch.long)
        for r, i in enumerate(indices):
            n = len(examples[i].input_ids)
            ids[r, :n] = torch.tensor(examples[i].input_ids)
            labels[r, :n] = torch.tensor(examples[i].labels)
            mask[r, :n] = 1
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        logits = logits[:, :-1].float()
        target = labels[:, 1:].to(logits.device)
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                ignore_index=IGNORE_INDEX, reduction="none").view(target.shape)
        sums = nll.double().sum(dim=1).tolist()
        counts = (target != IGNORE_INDEX).sum(dim=1).tolist()
        for r, i in enumerate(indices):
            results[i] = (float(sums[r]), int(counts[r]))
        if on_batch is not None:
            on_batch(len(indices))

    for i in order:
        length = len(examples[i].input_ids)
        if batch and (len(batch) + 1) * max(length, 1) > budget:
            run(batch)
            batch = []
        batch.append(i)
    if batch:
        run(batch)
    return results


def totals(examples: Sequence[Example], nll: Sequence[tuple[float, int]]) -> tuple[LossTotals, dict[str, LossTotals]]:
    overall, per_source = LossTotals(), {}
    for ex, (s, n) in zip(examples, nll):
        if n == 0:
            continue
        overall.add(s, n)
        per_source.setdefault(ex.source, LossTotals()).add(s, n)
    return overall, per_source


def generate(model: Any, prompt_ids: list[int], *, eos_ids: list[int], pad_id: int, max_new_tokens: int,
             temperature: float, seed: int, device: Any) -> tuple[list[int], bool]:
    """New token ids (greedy, or sampled with ``seed``) and whether generation stopped at an end-of-turn id."""
    import torch

    torch.manual_seed(seed)
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    kwargs: dict[str, Any] = {"do_sample": temperature > 0}
    if temperature > 0:
        kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             eos_token_id=eos_ids or None, pad_token_id=pad_id, use_cache=True, **kwargs)
    new = out[0, len(prompt_ids):].tolist()
    stopped = bool(new) and new[-1] in set(eos_ids)
    return new, stopped


# --------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------


@dataclass
class ModelSpec:
    name: str
    path: str
    kind: str  # base | adapter | model


def model_kind(path: str | Path) -> str:
    p = Path(path)
    if (p / "adapter_config.json").is_file():
        return "adapter"
    return "model"


def adapter_base(path: str | Path) -> str | None:
    """The base model an adapter was trained on (sftdata_train.json, else adapter_config.json)."""
    p = Path(path)
    for name, key in (("sftdata_train.json", "base_model"), ("adapter_config.json", "base_model_name_or_path")):
        if (p / name).is_file():
            value = json.loads((p / name).read_text(encoding="utf-8")).get(key)
            if value:
                return str(value)
    return None


def model_specs(models: Sequence[str], base: str | None) -> list[ModelSpec]:
    """The base first (given, or the base recorded by the first adapter), then every ``--model`` in order."""
    specs: list[ModelSpec] = []
    base = base or next((adapter_base(m) for m in models if model_kind(m) == "adapter" and adapter_base(m)), None)
    if base is not None:
        specs.append(ModelSpec("base", str(base), "base"))
    seen = {"base"}
    for m in models:
        kind = model_kind(m)
        name = Path(m).name or str(m)
        while name in seen:
            name += "'"
        seen.add(name)
        specs.append(ModelSpec(name, str(m), kind))
    if not specs:
        raise EvalError("give at least one --model (an adapter, a merged model or a base model)")
    return specs


def compute_device() -> tuple[Any, Any]:
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", 0), (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    return torch.device("cpu"), torch.float32


def load_model(spec: ModelSpec, *, base_override: str | None, device: Any, dtype: Any) -> Any:
    """A model ready for scoring: an adapter on its base loaded as training loaded it (NF4 for QLoRA), or a plain
    checkpoint in the compute dtype."""
    from sftdata.train import TrainError, load_adapter_model, require_train_deps

    try:
        if spec.kind == "adapter":
            require_train_deps("lora")
            model = load_adapter_model(spec.path, base_model=base_override)
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=dtype, device_map={"": device})
    except (TrainError, OSError, ValueError) as e:
        raise EvalError(f"cannot load model {spec.path!r}: {str(e).splitlines()[0]}") from None
    model.eval()
    return model


def model_tokenizer(spec: ModelSpec, manifest: dict[str, Any]) -> tuple[Any, str]:
    """The model's tokenizer (or the manifest's when the directory has none), checked against the data's."""
    from sftdata.train import TrainError, check_tokenizer, load_model_tokenizer

    try:
        tok, source = load_model_tokenizer(spec.path, None, manifest)
        check_tokenizer(manifest, tok, model_name=f"model {spec.path}")
    except TrainError as e:
        raise EvalError(str(e)) from None
    return tok, source


# --------------------------------------------------------------------------------------------------------------
# General held-out set (forgetting)
# --------------------------------------------------------------------------------------------------------------


def general_examples(general: str | Path, manifest: dict[str, Any], tokenizer_dir: str, *,
                     max_length: int = 1024) -> tuple[list[Example], str]:
    """Examples of a general held-out set: an sftdata output directory as it is (every split), or a file (raw text
    or chat) built here with the data's exact template and tokenizer (raw text trains every token)."""
    from sftdata.build import build
    from sftdata.write import is_sftdata_output, split_files

    general = Path(general)
    if general.is_dir() and is_sftdata_output(general):
        return [e for split in split_files(general) for e in load_examples(general, split)], str(general)
    if not general.exists():
        raise EvalError(f"--general {general}: no such file or directory")
    template = (manifest.get("template") or {}).get("text")
    with tempfile.TemporaryDirectory(prefix="sftdata-general-") as tmp:
        spec = "chatml"
        if template:
            spec = str(Path(tmp) / "training.jinja")
            Path(spec).write_text(template, encoding="utf-8")
        try:
            result = build([str(general)], template=spec, tokenizer=tokenizer_dir, output=Path(tmp) / "built",
                           max_length=max_length, progress=False)
        except DataError as e:
            raise EvalError(f"--general {general}: {e}") from None
        if result.manifest["counts"]["rows_kept"] == 0:
            raise EvalError(f"--general {general}: no usable row (see the build's problems)")
        examples = [e for split in split_files(result.output) for e in load_examples(result.output, split)]
    return examples, str(general)


# --------------------------------------------------------------------------------------------------------------
# Progress: a bar per model on a terminal, plain lines otherwise
# --------------------------------------------------------------------------------------------------------------


class ModelProgress:
    def __init__(self, name: str, total: int, console: Any, enabled: bool):
        self.name, self.total, self.console, self.done = name, max(total, 1), console, 0
        self.enabled = enabled and console is not None
        self.bar = None
        if self.enabled and console.is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self.bar = Progress(TextColumn(f"[bold]eval {name}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.description}"), TimeElapsedColumn(), console=console)
            self.bar.start()
            self.task = self.bar.add_task("", total=self.total)

    def phase(self, what: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, description=what)
        elif self.enabled:
            self.console.print(f"eval {self.name}: {what} ({self.done}/{self.total})")

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        elif self.enabled:
            self.console.print(f"eval {self.name}: done ({self.done}/{self.total})")


# --------------------------------------------------------------------------------------------------------------
# The evaluation
# --------------------------------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    output: str
    report: dict[str, Any]
    notices: list[str] = field(default_factory=list)


def evaluate(
    data_dir: str | Path,
    models: Sequence[str],
    output: str | Path,
    *,
    base: str | None = None,
    split: str | None = None,
    general: str | Path | None = None,
    prompts: str | Path | None = None,
    shots: int = 0,
    num_prompts: int = 8,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    seed: int = 0,
    general_max_length: int = 1024,
    progress: bool = True,
    console: Any = None,
) -> EvalResult:
    """Evaluate ``models`` (and the base) on ``split`` of the sftdata output ``data_dir``; write the report.

    Returns the report dict that ``REPORT_DIR/report.json`` holds; see the module docstring for what is measured.
    """
    from sftdata.export import generation_eos_ids
    from sftdata.train import read_manifest, require_train_deps

    try:
        require_train_deps("full")
        manifest = read_manifest(data_dir)
        split_name, notice = resolve_split(data_dir, split)
    except Exception as e:
        raise EvalError(str(e)) from None
    notices = [notice] if notice else []
    if notice and console is not None:
        console.print(f"note: {notice}")
    output = Path(output)
    examples = load_examples(data_dir, split_name)
    scored = [e for e in examples if e.targets > 0]
    if not scored:
        raise EvalError(f"the {split_name} split of {data_dir} has no trained token to evaluate")
    specs = model_specs(models, base)
    device, dtype = compute_device()
    template_info = manifest.get("template") or {}
    end_of_turn = template_info.get("end_of_turn")

    first_tok, tok_source = model_tokenizer(specs[0], manifest)
    bos_id = first_tok.bos_token_id
    shot_examples = pick_shots(load_examples(data_dir, "train"), shots, seed) if shots else []
    prefix = few_shot_prefix(shot_examples, bos_id)
    test_prompts = split_prompts(examples, first_tok, num_prompts, end_of_turn)
    if prompts:
        if not template_info.get("text"):
            raise EvalError("--prompts needs a chat template, and the data's manifest records none (raw-text data)")
        test_prompts += read_prompts(prompts, template_info["text"], first_tok)
    general_set: list[Example] = []
    general_name = None
    if general:
        general_set, general_name = general_examples(general, manifest, tok_source, max_length=general_max_length)
        general_set = [e for e in general_set if e.targets > 0]

    rows: list[dict[str, Any]] = []
    outputs: list[dict[str, Any]] = [{} for _ in test_prompts]
    for spec in specs:
        tok, _ = model_tokenizer(spec, manifest) if spec is not specs[0] else (first_tok, tok_source)
        eos_ids = generation_eos_ids(manifest, tok)
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
        with_shots = spec.kind == "base" and bool(prefix)
        total = len(scored) + len(general_set) + len(test_prompts) * (2 if with_shots else 1) \
            + (len(scored) if with_shots else 0)
        bar = ModelProgress(spec.name, total, console, progress)
        start = time.time()
        model = load_model(spec, base_override=base if spec.kind == "adapter" else None, device=device, dtype=dtype)
        vocab = model.get_output_embeddings().weight.shape[0]
        top = max(max(e.input_ids) for e in scored)
        if top >= vocab:
            raise EvalError(f"the data uses token id {top} but {spec.path} has only {vocab} embeddings")
        try:
            bar.phase(f"loss on {split_name}")
            overall, per_source = totals(scored, example_nll(model, scored, device=device, on_batch=bar.advance))
            row: dict[str, Any] = {"name": spec.name, "path": spec.path, "kind": spec.kind, **overall.to_dict(),
                                   "per_source": {k: v.to_dict() for k, v in per_source.items()}}
            if with_shots:
                bar.phase(f"loss on {split_name} with {shots} shots")
                shot_set = [with_prefix(e, prefix, bos_id) for e in scored]
                k_overall, _ = totals(shot_set, example_nll(model, shot_set, device=device, on_batch=bar.advance))
                row["few_shot"] = {"shots": shots, **k_overall.to_dict()}
            if general_set:
                bar.phase("general held-out set")
                g_overall, _ = totals(general_set, example_nll(model, general_set, device=device,
                                                              on_batch=bar.advance))
                g = g_overall.to_dict()
                row.update(general_loss=g["loss"], general_perplexity=g["perplexity"],
                           general_tokens=g["trained_tokens"])
            bar.phase("generations")
            variants = [(spec.name, [])] + ([(f"{spec.name} ({shots}-shot)", prefix)] if with_shots else [])
            for label, pre in variants:
                hits = {"exact_match": 0, "contains_answer": 0, "scored": 0}
                for i, p in enumerate(test_prompts):
                    ids = (pre + strip_bos(p.ids, bos_id)) if pre else p.ids
                    new, stopped = generate(model, ids, eos_ids=eos_ids, pad_id=pad_id,
                                            max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                                            device=device)
                    text = tok.decode(new, skip_special_tokens=True).strip()
                    score = score_output(text, p.reference)
                    outputs[i][label] = {"text": text, "tokens": len(new), "stopped": stopped, "score": score}
                    if score is not None:
                        hits["scored"] += 1
                        hits["exact_match"] += score["exact_match"]
                        hits["contains_answer"] += score["contains_answer"]
                    bar.advance()
                summary = {k: (hits[k] / hits["scored"] if hits["scored"] else None)
                           for k in ("exact_match", "contains_answer")} | {"scored": hits["scored"]}
                if pre:
                    row.setdefault("few_shot", {"shots": shots})["generation"] = summary
                else:
                    row["generation"] = summary
        finally:
            bar.close()
            del model
            gc.collect()
            if getattr(device, "type", "cpu") == "cuda":
                import torch

                torch.cuda.empty_cache()
        row["seconds"] = round(time.time() - start, 2)
        rows.append(row)

    base_row = next((r for r in rows if r["kind"] == "base"), None)
    for r in rows:
        if base_row is not None and r is not base_row:
            r["delta_loss_vs_base"] = r["loss"] - base_row["loss"]
            if "general_loss" in r and "general_loss" in base_row:
                r["forgetting"] = {"general_loss_delta": r["general_loss"] - base_row["general_loss"],
                                   "general_perplexity_delta": r["general_perplexity"] - base_row["general_perplexity"]}

    output.mkdir(parents=True, exist_ok=True)
    curve = loss_curve([s.path for s in specs if s.kind != "base"])
    if curve is not None:
        (output / "loss_curve.svg").write_text(loss_curve_svg(curve), encoding="utf-8")
    report = {
        "format": FORMAT,
        "data_dir": str(Path(data_dir).resolve()),
        "split": split_name,
        "notices": notices,
        "template": {k: template_info.get(k) for k in ("name", "sha256", "end_of_turn")},
        "tokenizer": (manifest.get("tokenizer") or {}).get("name_or_path"),
        "device": str(device),
        "shots": shots,
        "shot_examples": [f"{Path(e.source).name}:{e.row}" for e in shot_examples],
        "general": general_name,
        "generation": {"max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed,
                       "mode": "sampled" if temperature > 0 else "greedy"},
        "models": rows,
        "samples": [{"origin": p.origin, "prompt": p.text, "reference": p.reference, "outputs": o}
                    for p, o in zip(test_prompts, outputs)],
        "loss_curve": curve,
    }
    (output / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False, default=_json_default) + "\n",
                                        encoding="utf-8")
    (output / "report.md").write_text(render_markdown(report), encoding="utf-8")
    return EvalResult(output=str(output), report=report, notices=notices)


def _json_default(x: Any) -> Any:
    return str(x)


# --------------------------------------------------------------------------------------------------------------
# Loss curve and report
# --------------------------------------------------------------------------------------------------------------


def loss_curve(model_dirs: Iterable[str]) -> dict[str, Any] | None:
    """``(step, loss)`` and ``(step, eval_loss)`` points from the first ``trainer_state.json`` found."""
    for d in model_dirs:
        path = Path(d) / "trainer_state.json"
        if path.is_file():
            history = json.loads(path.read_text(encoding="utf-8")).get("log_history", [])
            train = [[h["step"], h["loss"]] for h in history if "loss" in h and "step" in h]
            evals = [[h["step"], h["eval_loss"]] for h in history if "eval_loss" in h and "step" in h]
            if train or evals:
                return {"trainer_state": str(path), "train": train, "eval": evals}
    return None


def loss_curve_svg(curve: dict[str, Any], w: int = 640, h: int = 280) -> str:
    """A self-contained SVG line chart: training loss (blue) and eval loss (orange dots) per step."""
    points = curve["train"] + curve["eval"]
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    left, right, top, bottom = 56, 16, 28, 36
    pw, ph = w - left - right, h - top - bottom

    def xy(p):
        return left + (p[0] - x0) / (x1 - x0) * pw, top + ph - (p[1] - y0) / (y1 - y0) * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
           f'font-size="11" role="img" aria-label="loss curve">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{left}" y="16" font-size="13" font-weight="bold">training loss (blue) and eval loss '
           f'(orange) per step</text>']
    for frac in (0, 0.5, 1):
        y = top + ph - frac * ph
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
                   f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{y0 + frac * (y1 - y0):.3g}</text>')
    for frac in (0, 0.5, 1):
        x = left + frac * pw
        out.append(f'<text x="{x:.1f}" y="{top + ph + 16}" text-anchor="middle">{x0 + frac * (x1 - x0):.4g}</text>')
    if curve["train"]:
        line = " ".join(f"{a:.1f},{b:.1f}" for a, b in map(xy, curve["train"]))
        out.append(f'<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{line}"/>')
    for p in curve["eval"]:
        a, b = xy(p)
        out.append(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="4" fill="#ff7f0e"><title>step {p[0]}: eval loss '
                   f'{p[1]:.4f}</title></circle>')
    out.append(f'<text x="{left + pw / 2}" y="{h - 4}" text-anchor="middle">step</text></svg>')
    return "".join(out)


def _f(x: Any, spec: str = ".4f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    return format(x, spec)


def _pct(x: Any) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _cell(text: str) -> str:
    return html.escape(text).replace("|", "\\|").replace("\n", "↵")


def _fence(text: str) -> str:
    ticks = "````" if "```" in text else "```"
    return f"{ticks}\n{text}\n{ticks}"


def render_markdown(report: dict[str, Any]) -> str:
    """``report.md``: tables of the numbers, the loss curve picture and the sample generations."""
    L = [f"# sftdata eval — {report['split']} split", "",
         f"Data `{report['data_dir']}` · template `{report['template'].get('name')}` · tokenizer "
         f"`{report['tokenizer']}` · device {report['device']} · generation {report['generation']['mode']}, at most "
         f"{report['generation']['max_new_tokens']} new tokens", ""]
    for n in report["notices"]:
        L += [f"> {n}", ""]
    L += ["## Loss over trained tokens", "",
          "Token-weighted cross-entropy over exactly the tokens the masks train (labels ≠ -100), and `exp` of it.", "",
          "| model | kind | loss | perplexity | trained tokens | examples | Δ loss vs base | exact match | "
          "contains answer |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["models"]:
        gen = r.get("generation") or {}
        L.append(f"| {_cell(r['name'])} | {r['kind']} | {_f(r['loss'])} | {_f(r['perplexity'], '.3f')} | "
                 f"{r['trained_tokens']:,} | {r['examples']:,} | {_f(r.get('delta_loss_vs_base'), '+.4f')} | "
                 f"{_pct(gen.get('exact_match'))} | {_pct(gen.get('contains_answer'))} |")
        if "few_shot" in r:
            k = r["few_shot"]
            g = k.get("generation") or {}
            L.append(f"| {_cell(r['name'])} ({k['shots']}-shot) | base + {k['shots']} train examples | "
                     f"{_f(k.get('loss'))} | {_f(k.get('perplexity'), '.3f')} | {k.get('trained_tokens', 0):,} | "
                     f"{k.get('examples', 0):,} | – | {_pct(g.get('exact_match'))} | {_pct(g.get('contains_answer'))} |")
    L.append("")
    if report["general"]:
        L += ["## Forgetting (general held-out set)", "", f"`{report['general']}`; Δ is the model minus the base.", "",
              "| model | general loss | general perplexity | tokens | Δ general loss | Δ general perplexity |",
              "|---|---:|---:|---:|---:|---:|"]
        for r in report["models"]:
            fg = r.get("forgetting") or {}
            L.append(f"| {_cell(r['name'])} | {_f(r.get('general_loss'))} | {_f(r.get('general_perplexity'), '.3f')} | "
                     f"{r.get('general_tokens', 0):,} | {_f(fg.get('general_loss_delta'), '+.4f')} | "
                     f"{_f(fg.get('general_perplexity_delta'), '+.3f')} |")
        L.append("")
    sources = sorted({s for r in report["models"] for s in r["per_source"]})
    if len(sources) > 1 or (sources and sources[0]):
        L += ["## Per source", "", "| source | " + " | ".join(_cell(r["name"]) for r in report["models"]) + " |",
              "|---|" + "---:|" * len(report["models"])]
        for s in sources:
            cells = []
            for r in report["models"]:
                v = r["per_source"].get(s)
                cells.append(f"{_f(v['loss'])} (ppl {_f(v['perplexity'], '.2f')}, {v['trained_tokens']:,} tok)"
                             if v else "–")
            L.append(f"| {_cell(Path(s).name or s)} | " + " | ".join(cells) + " |")
        L.append("")
    if report["loss_curve"]:
        L += ["## Training loss curve", "", f"From `{report['loss_curve']['trainer_state']}`.", "",
              "![training and eval loss per step](loss_curve.svg)", ""]
    if report["samples"]:
        L += ["## Sample generations", ""]
        if report["shots"]:
            L += [f"Few-shot rows put {report['shots']} train examples ({', '.join(report['shot_examples'])}) "
                  "before the prompt, each rendered with the training template.", ""]
        for i, s in enumerate(report["samples"], 1):
            L += [f"### {i}. {s['origin']}", "", "Prompt (the prompt tokens, decoded; rendered with the training template):",
                  "", _fence(s["prompt"]), ""]
            if s["reference"] is not None:
                L += ["Reference:", "", _fence(s["reference"]), ""]
            for label, o in s["outputs"].items():
                score = o.get("score")
                marks = "" if score is None else (f" — exact match {'yes' if score['exact_match'] else 'no'}, "
                                                   f"contains answer {'yes' if score['contains_answer'] else 'no'}")
                stop = "stopped at end of turn" if o["stopped"] else "hit the token limit"
                L += [f"**{_cell(label)}** ({o['tokens']} tokens, {stop}{marks}):", "", _fence(o["text"]), ""]
    return "\n".join(L) + "\n"


def summary_rows(report: dict[str, Any]) -> list[list[str]]:
    """Rows for the terminal summary table."""
    out = []
    for r in report["models"]:
        gen = r.get("generation") or {}
        out.append([r["name"], r["kind"], _f(r["loss"]), _f(r["perplexity"], ".3f"), f"{r['trained_tokens']:,}",
                    _f(r.get("delta_loss_vs_base"), "+.4f"), _f(r.get("general_perplexity"), ".3f"),
                    _f((r.get("forgetting") or {}).get("general_loss_delta"), "+.4f"), _pct(gen.get("exact_match")),
                    _pct(gen.get("contains_answer"))])
        if "few_shot" in r:
            k, g = r["few_shot"], r["few_shot"].get("generation") or {}
            out.append([f"{r['name']} ({k['shots']}-shot)", "base+shots", _f(k.get("loss")),
                        _f(k.get("perplexity"), ".3f"), f"{k.get('trained_tokens', 0):,}", "–", "–", "–",
                        _pct(g.get("exact_match")), _pct(g.get("contains_answer"))])
    return out


__all__ = ["evaluate", "EvalError", "EvalResult", "Example", "load_examples", "example_nll", "resolve_split",
           "read_prompts", "score_output", "render_markdown", "loss_curve_svg"]
