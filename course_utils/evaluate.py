"""Did fine-tuning help? Generate on held-out rows and measure (lesson 05 builds on this)."""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from course_utils.chat import JSONExtractionError, extract_json, generate_batch, split_thinking
from course_utils.data import with_images


def prompts_of(records: list[dict], base_dir: Path | None = None) -> list[list[dict]]:
    """Each record's conversation without its final assistant reply, images loaded."""
    return [with_images(r, base_dir)[:-1] for r in records]


def targets_of(records: list[dict]) -> list[dict]:
    """Each record's expected answer (its final assistant message) parsed as JSON."""
    return [json.loads(r["messages"][-1]["content"]) for r in records]


def validity(replies: list[str], schema: dict | None = None) -> dict:
    """Share of replies that hold a JSON object, and of those that also match ``schema``."""
    json_ok = schema_ok = 0
    for reply in replies:
        try:
            extract_json(reply)
            json_ok += 1
            if schema is not None:
                extract_json(reply, schema)
                schema_ok += 1
        except JSONExtractionError:
            pass
    n = max(1, len(replies))
    out = {"json_valid": json_ok / n, "n": len(replies)}
    if schema is not None:
        out["schema_valid"] = schema_ok / n
    return out


def json_valid_rate(
    model,
    processor,
    records: list[dict],
    schema: dict | None = None,
    max_new_tokens: int = 200,
    batch_size: int = 16,
    progress: bool = True,
) -> tuple[dict, list[str]]:
    """Greedy, batched replies for ``records`` and their JSON / schema validity."""
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        replies = generate_batch(
            model,
            processor,
            prompts_of(records),
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            progress=progress,
        )
    finally:
        if was_training:
            model.train()
    return validity(replies, schema), replies


# --- Field-level metrics ----------------------------------------------------------------------------

_CURRENCY_SYMBOLS = {"€": "EUR", "$": "USD", "£": "GBP", "¥": "JPY", "CHF": "CHF", "FR.": "CHF"}


def normalize_number(value) -> float | None:
    """``"1,234.50"``, ``"1.234,50"``, ``"12,3 €"``, ``"Rp 45.500"``, ``"(1.50)"``, ``12.30`` → the number,
    rounded to cents; ``None`` when not a number.

    The text must hold one run of digits and marks (``1e5`` or ``1/2`` hold two: not an amount). With both
    marks, the last one is the decimal mark and the other must group thousands. With one kind, it groups
    thousands only in the shape ``1.234`` / ``45.500`` / ``1.234.000`` (a leading 1–9, groups of three);
    otherwise a single mark is the decimal mark and several are not a number (``12.5.2023``). A space or an
    apostrophe groups thousands before exactly three digits (``1 234,56``, ``1'234.50``). A minus sign
    (``-`` or ``−``) before the digits or their currency mark, one right after them (``2,00-``), or
    parentheses around the amount alone make it negative.
    """
    import math
    import re

    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        try:
            number = float(value)
        except OverflowError:
            return None
        return round(number, 2) if math.isfinite(number) else None
    if not isinstance(value, str):
        return None
    text = re.sub(r"(?<=\d)[ \u00a0\u202f'’](?=\d{3}(?!\d))", "", value.strip())
    runs = re.findall(r"[.,]?\d[\d.,]*", text)
    if len(runs) != 1:
        return None
    cleaned = runs[0]
    at = text.find(cleaned)
    head, tail = text[:at], text[at + len(cleaned) :]
    mark = r"\s*[^\d\s()\-−]{0,4}\s*"  # a currency mark: €, Rp, R$, US$, Fr., ₹
    negative = bool(
        re.search(rf"(?:^|[\s(])[-−]{mark}$", head)  # -€12.50, € -2,00, -Rp 45.500
        or re.match(rf"{mark}[-−]", tail)  # 2,00- (a discount on German and SAP receipts)
        or (re.fullmatch(rf"\({mark}", head) and re.fullmatch(r"\s*\)", tail))  # (1.50), (USD 1.50)
    )
    kinds = {ch for ch in cleaned if ch in ".,"}
    if len(kinds) == 2:  # 1.234,56 / 1,234.56
        decimal = cleaned[max(cleaned.rfind("."), cleaned.rfind(","))]
        grouping = "," if decimal == "." else "."
        whole, _, cents = cleaned.rpartition(decimal)
        if decimal in whole or not re.fullmatch(rf"\d{{1,3}}(\{grouping}\d{{3}})+", whole):
            return None
        cleaned = whole.replace(grouping, "") + "." + cents
    elif kinds:
        (mark,) = kinds
        if re.fullmatch(rf"[1-9]\d{{0,2}}(\{mark}\d{{3}})+", cleaned):
            cleaned = cleaned.replace(mark, "")  # 45.500, 1,234, 1.234.000
        elif cleaned.count(mark) == 1:
            cleaned = cleaned.replace(mark, ".")  # 12,5 / 0.125 / .5
        else:
            return None
    number = float(cleaned)
    if not math.isfinite(number):
        return None
    return round(-number if negative else number, 2)


def normalize_date(value) -> str | None:
    """ISO ``YYYY-MM-DD`` from ISO, ``DD.MM.YYYY`` or ``MM/DD/YYYY`` text; ``None`` for a day the calendar
    lacks (``2024-13-01``, ``31.04.2024``)."""
    import datetime
    import re

    if not isinstance(value, str):
        return None
    text = value.strip()
    for pattern, order in (
        (r"(\d{4})-(\d{1,2})-(\d{1,2})$", "ymd"),
        (r"(\d{1,2})\.(\d{1,2})\.(\d{4})$", "dmy"),
        (r"(\d{1,2})/(\d{1,2})/(\d{4})$", "mdy"),
    ):
        match = re.match(pattern, text)
        if match:
            parts = {key: int(part) for key, part in zip(order, match.groups())}
            try:
                return datetime.date(parts["y"], parts["m"], parts["d"]).isoformat()
            except ValueError:
                return None
    return None


def normalize_text(value) -> str | None:
    """Case, spacing and Unicode form folded (NFKC: "Café" typed as e + combining accent matches)."""
    if not isinstance(value, (str, int, float)):
        return None
    return " ".join(unicodedata.normalize("NFKC", str(value)).casefold().split())


def normalize_currency(value) -> str | None:
    if not isinstance(value, str):
        return None
    text = value.strip().upper()
    return _CURRENCY_SYMBOLS.get(text, text)


def receipt_facts(receipt: dict | None) -> list[tuple]:
    """A receipt as comparable (field, normalised value) facts; each line item is one fact."""
    if not isinstance(receipt, dict):
        return []
    facts = [
        ("merchant", normalize_text(receipt.get("merchant"))),
        ("date", normalize_date(receipt.get("date"))),
        ("currency", normalize_currency(receipt.get("currency"))),
    ]
    facts += [(key, normalize_number(receipt.get(key))) for key in ("subtotal", "tax", "total")]
    items = receipt.get("items") if isinstance(receipt.get("items"), list) else []
    for item in items:
        if isinstance(item, dict):
            facts.append(
                (
                    "item",
                    (
                        normalize_text(item.get("name")),
                        normalize_number(item.get("qty")),
                        normalize_number(item.get("unit_price")),
                    ),
                )
            )
    return [(field_name, value) for field_name, value in facts if value is not None]


def field_scores(predicted: dict | None, expected: dict) -> dict:
    """Matched / predicted / expected fact counts for one receipt (multiset match)."""
    from collections import Counter

    pred, gold = Counter(receipt_facts(predicted)), Counter(receipt_facts(expected))
    matched = pred & gold
    per_field: dict[str, dict[str, int]] = {}
    for counter, key in ((pred, "predicted"), (gold, "expected"), (matched, "matched")):
        for (field_name, _), n in counter.items():
            per_field.setdefault(field_name, {"predicted": 0, "expected": 0, "matched": 0})[key] += n
    return {
        "matched": sum(matched.values()),
        "predicted": sum(pred.values()),
        "expected": sum(gold.values()),
        "per_field": per_field,
        "exact": predicted is not None and pred == gold,
    }


def _prf(matched: int, predicted: int, expected: int) -> dict:
    precision = matched / predicted if predicted else 0.0
    recall = matched / expected if expected else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4)}


def task_metrics(replies: list[str], targets: list[dict], schema: dict | None = None) -> dict:
    """JSON validity, schema validity, micro field P/R/F1 (overall and per field) and exact match."""
    if len(replies) != len(targets):
        raise ValueError(f"{len(replies)} replies but {len(targets)} targets")
    totals = {"matched": 0, "predicted": 0, "expected": 0}
    fields: dict[str, dict[str, int]] = {}
    exact = json_ok = schema_ok = 0
    for reply, target in zip(replies, targets):
        try:
            predicted = extract_json(reply)
            json_ok += 1
        except JSONExtractionError:
            predicted = None
        if predicted is not None and schema is not None:
            try:
                extract_json(reply, schema)
                schema_ok += 1
            except JSONExtractionError:
                pass
        scores = field_scores(predicted, target)
        exact += scores["exact"]
        for key in totals:
            totals[key] += scores[key]
        for field_name, counts in scores["per_field"].items():
            slot = fields.setdefault(field_name, {"predicted": 0, "expected": 0, "matched": 0})
            for key in slot:
                slot[key] += counts[key]
    n = max(1, len(replies))
    result = {
        "n": len(replies),
        "json_valid": json_ok / n,
        "exact_match": exact / n,
        **{
            f"field_{k}": v
            for k, v in _prf(totals["matched"], totals["predicted"], totals["expected"]).items()
        },
        "per_field": {
            name: _prf(c["matched"], c["predicted"], c["expected"]) for name, c in sorted(fields.items())
        },
    }
    if schema is not None:
        result["schema_valid"] = schema_ok / n
    return result


# --- Loss, and the silent no-op adapter -----------------------------------------------------------


def heldout_loss(
    model, processor, records: list[dict], batch_size: int = 8, max_seq_length: int = 1024
) -> dict:
    """Mean response-token loss on held-out records, and its perplexity."""
    import math

    import torch

    from course_utils.loss import VisionTextCollator, prepare_examples, response_only_loss

    examples = prepare_examples(records, processor, max_seq_length, progress=False)
    collate = VisionTextCollator(processor.tokenizer.pad_token_id)
    total, tokens = 0.0, 0
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(examples), batch_size):
                batch = collate(examples[start : start + batch_size])
                n = int((batch["labels"][:, 1:] != -100).sum())
                batch = {k: v.to(model.device) for k, v in batch.items()}
                total += float(response_only_loss(model, batch, num_items_in_batch=n)) * n
                tokens += n
    finally:
        if was_training:
            model.train()
    loss = total / max(1, tokens)
    return {"loss": round(loss, 4), "perplexity": round(math.exp(min(loss, 50)), 2), "tokens": tokens}


def adapter_effect(peft_model, processor, records: list[dict], max_seq_length: int = 1024) -> float:
    """Largest change the adapter makes to any next-token logit on ``records`` (0.0 = a no-op adapter).

    A LoRA adapter starts as an exact no-op (B = 0); one that is still a no-op after "training" — a
    wrong target_modules regex, a learning rate of 0, an adapter that was never loaded — silently
    evaluates the base model. Compare with the adapter switched off.
    """
    import torch

    from course_utils.loss import VisionTextCollator, prepare_examples

    examples = prepare_examples(records, processor, max_seq_length, progress=False)
    batch = {
        k: v.to(peft_model.device)
        for k, v in VisionTextCollator(processor.tokenizer.pad_token_id)(examples).items()
        if k != "labels"
    }
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(next(peft_model.parameters()).dtype)
    peft_model.eval()
    with torch.no_grad():
        tuned = peft_model(**batch).logits
        with peft_model.disable_adapter():
            base = peft_model(**batch).logits
    mask = batch["attention_mask"].bool()
    return float((tuned - base).abs()[mask].max())


# --- Base vs tuned: one comparison, shown as a table, a chart, the worst examples and a report -----

HEADLINE_METRICS = ("json_valid", "schema_valid", "field_f1", "exact_match")


def example_f1(reply: str, target: dict) -> float:
    """Field F1 of one reply against its target (0.0 when the reply holds no JSON)."""
    try:
        predicted = extract_json(reply)
    except JSONExtractionError:
        predicted = None
    s = field_scores(predicted, target)
    return _prf(s["matched"], s["predicted"], s["expected"])["f1"]


@dataclass
class Comparison:
    """Task metrics of several models (e.g. base and tuned) on the same rows, and every reply."""

    metrics: dict[str, dict]
    examples: list[dict]

    @property
    def names(self) -> list[str]:
        return list(self.metrics)

    def table(self) -> list[dict]:
        """One row per headline metric; a ``change`` column when exactly two models are compared."""
        rows = []
        for metric in HEADLINE_METRICS:
            if not all(metric in m for m in self.metrics.values()):
                continue
            row = {"metric": metric, **{name: round(m[metric], 3) for name, m in self.metrics.items()}}
            if len(self.metrics) == 2:
                first, second = (self.metrics[n][metric] for n in self.names)
                row["change"] = f"{second - first:+.3f}"
            rows.append(row)
        return rows

    def per_field(self) -> list[dict]:
        """Field F1 for every field any model produced or the targets hold."""
        fields = sorted({f for m in self.metrics.values() for f in m["per_field"]})
        return [
            {
                "field": f,
                **{name: m["per_field"].get(f, {}).get("f1", 0.0) for name, m in self.metrics.items()},
            }
            for f in fields
        ]

    def worst(self, n: int = 3, model: str | None = None) -> list[dict]:
        """The ``n`` rows where ``model`` (default: the last one) scores lowest — no JSON first, then F1."""
        model = model or self.names[-1]
        return sorted(self.examples, key=lambda e: (e["json_valid"][model], e["f1"][model], e["index"]))[:n]

    def outcomes(self) -> list[dict]:
        """Error analysis: how many replies of each model fall in each :data:`OUTCOMES` bucket."""
        return [
            {
                "outcome": o,
                **{name: sum(e["outcome"][name] == o for e in self.examples) for name in self.names},
            }
            for o in OUTCOMES
        ]

    def plot(self):
        """Grouped bars: headline metrics, and field F1 per field, one colour per model."""
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [1, 1.4]})
        for ax, rows, key, title in (
            (axes[0], self.table(), "metric", "Task metrics (test split)"),
            (axes[1], self.per_field(), "field", "Field F1 by field"),
        ):
            width = 0.8 / len(self.names)
            for i, name in enumerate(self.names):
                xs = [j + i * width for j in range(len(rows))]
                bars = ax.bar(xs, [r[name] for r in rows], width, label=name)
                ax.bar_label(bars, fmt="%.2f", fontsize=7)
            ax.set_xticks(
                [j + width * (len(self.names) - 1) / 2 for j in range(len(rows))],
                [r[key] for r in rows],
                rotation=20,
            )
            ax.set_ylim(0, 1.1)
            ax.set_title(title)
        axes[0].legend()
        fig.tight_layout()
        return fig

    def to_dict(self) -> dict:
        return {"metrics": self.metrics, "examples": self.examples}

    def markdown(self, title: str = "Evaluation report", context: dict | None = None, worst: int = 3) -> str:
        def md_table(rows: list[dict]) -> str:
            if not rows:
                return ""
            head = list(rows[0])
            lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(str(r[h]) for h in head) + " |" for r in rows]
            return "\n".join(lines)

        parts = [f"# {title}", ""]
        if context:
            parts += [f"- **{k}**: {v}" for k, v in context.items()] + [""]
        parts += [
            "## Task metrics",
            "",
            md_table(self.table()),
            "",
            "## Field F1 by field",
            "",
            md_table(self.per_field()),
            "",
            "## Outcomes",
            "",
            md_table(self.outcomes()),
            "",
            f"## Worst {worst} examples ({self.names[-1]})",
            "",
        ]
        for e in self.worst(worst):
            parts += [
                f"### Row {e['index']}",
                "",
                "Expected:",
                "",
                "```json",
                json.dumps(e["expected"], ensure_ascii=False),
                "```",
                "",
            ]
            for name in self.names:
                reply = e["replies"][name][:600]  # a fence one backtick longer than any run inside the reply
                fence = "`" * max(4, 1 + max((len(run) for run in re.findall(r"`+", reply)), default=0))
                parts += [f"{name} (F1 {e['f1'][name]:.2f}):", "", fence, reply, fence, ""]
        return "\n".join(parts)


OUTCOMES = ("no JSON", "schema error", "wrong values", "partly right", "all right")


def _outcome(checks: dict, f1: float, has_schema: bool) -> str:
    if not checks["json_valid"]:
        return "no JSON"
    if has_schema and not checks["schema_valid"]:
        return "schema error"
    return "all right" if f1 == 1.0 else "partly right" if f1 >= 0.5 else "wrong values"


def compare(replies: dict[str, list[str]], targets: list[dict], schema: dict | None = None) -> Comparison:
    """Score each model's replies (``{"base": [...], "tuned": [...]}``) against the same targets."""
    lengths = {name: len(r) for name, r in replies.items()}
    if set(lengths.values()) != {len(targets)}:
        raise ValueError(f"every model needs one reply per target ({len(targets)}); got {lengths}")
    metrics = {name: task_metrics(r, targets, schema) for name, r in replies.items()}
    examples = []
    for i, target in enumerate(targets):
        row = {"index": i, "expected": target, "replies": {}, "f1": {}, "json_valid": {}, "outcome": {}}
        for name, r in replies.items():
            row["replies"][name] = r[i]
            row["f1"][name] = example_f1(r[i], target)
            checks = validity([r[i]], schema)
            row["json_valid"][name] = checks["json_valid"] == 1.0
            row["outcome"][name] = _outcome(checks, row["f1"][name], schema is not None)
        examples.append(row)
    return Comparison(metrics, examples)


def save_report(
    comparison: Comparison,
    out_dir: str | Path,
    context: dict | None = None,
    overwrite: bool = False,
    title: str = "Evaluation report",
) -> tuple[Path, Path]:
    """``report.json`` (everything, incl. every reply) and ``report.md`` (for people), written atomically.

    Refuses to replace an earlier report unless ``overwrite`` — reports are evidence.
    """
    from course_utils.paths import atomic_write

    out = Path(out_dir)
    json_path, md_path = out / "report.json", out / "report.md"
    for path in (json_path, md_path):
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; choose another folder or pass overwrite=True")
    payload = {"context": context or {}, **comparison.to_dict()}
    atomic_write(
        json_path, json.dumps(payload, indent=1, ensure_ascii=False, default=str), overwrite=overwrite
    )
    atomic_write(md_path, comparison.markdown(title, context), overwrite=overwrite)
    return json_path, md_path


# --- LLM-as-judge through any OpenAI-compatible endpoint (off unless you configure one) ---------------

JUDGE_SYSTEM = "You are a strict grader of information extraction. You answer with JSON only."
JUDGE_TEMPLATE = """Grade how well a model extracted a receipt into JSON.

Reference (correct) JSON:
{expected}

Model reply:
{reply}

Score from 1 to 5:
5 = every field and line item correct (formatting differences such as 7.5 vs "7.50" do not matter)
4 = one small error (one value or one item wrong or missing)
3 = several errors, but merchant, date and total right
2 = valid receipt JSON with mostly wrong values
1 = not receipt JSON, or unusable

Answer with exactly one JSON object: {{"score": <integer 1-5>, "reason": "<one short sentence>"}}"""


class JudgeParseError(ValueError):
    """The judge's reply held no usable score."""


def judge_messages(expected: dict | str, reply: str) -> list[dict]:
    expected_text = expected if isinstance(expected, str) else json.dumps(expected, ensure_ascii=False)
    return [
        {"role": "system", "content": JUDGE_SYSTEM},
        {
            "role": "user",
            "content": JUDGE_TEMPLATE.format(expected=expected_text, reply=reply.strip() or "(empty)"),
        },
    ]


def parse_judge(text: str) -> dict:
    """``{"score": 1-5, "reason": str}`` from a judge reply.

    Tolerant of fences and chatter, strict on the score.
    """
    import re

    try:
        obj = extract_json(text)
        score, reason = obj.get("score"), str(obj.get("reason", "")).strip()
    except JSONExtractionError:
        match = re.search(r"score\W{0,4}([1-5](?:[.,]0+)?)(?![\d.,]\d|\d)", text, re.IGNORECASE)
        if not match:
            raise JudgeParseError(
                f"no JSON object and no 'score: N' in the judge's reply: {text[:120]!r}"
            ) from None
        score, reason = match.group(1).replace(",", "."), text.strip()[:200]
    try:
        if isinstance(score, bool):  # True == 1 in Python, not a score
            raise TypeError
        value = float(score)
    except (TypeError, ValueError):
        raise JudgeParseError(f"judge score {score!r} is not a number") from None
    if not value.is_integer() or not 1 <= value <= 5:
        raise JudgeParseError(f"judge score {score!r} is outside the integers 1-5")
    return {"score": int(value), "reason": reason}


def llm_judge(
    pairs: list[tuple[dict, str]],
    base_url: str,
    model: str,
    api_key: str | None = None,
    max_workers: int = 4,
    timeout: float = 60.0,
    progress: bool = True,
) -> list[dict]:
    """Ask a judge model (any OpenAI-compatible ``/v1`` endpoint) to score (expected, reply) pairs.

    The key comes from ``api_key`` or ``$JUDGE_API_KEY`` and is never printed. A failed call or an
    unparseable answer becomes ``{"score": None, "error": ...}`` — nothing is dropped.
    """
    import os
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI
    from tqdm.auto import tqdm

    client = OpenAI(
        base_url=base_url,
        api_key=api_key or os.environ.get("JUDGE_API_KEY") or "not-needed",
        timeout=timeout,
        max_retries=1,
    )

    def one(pair):
        expected, reply = pair
        try:
            response = client.chat.completions.create(
                model=model, messages=judge_messages(expected, reply), temperature=0.0, max_tokens=120
            )
            return parse_judge(response.choices[0].message.content or "")
        except Exception as error:  # noqa: BLE001 — recorded per row, the run goes on
            return {"score": None, "error": f"{type(error).__name__}: {str(error)[:160]}"}

    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        return list(tqdm(pool.map(one, pairs), total=len(pairs), desc="judge", disable=not progress))


def judge_summary(results: list[dict]) -> dict:
    scores = [r["score"] for r in results if r.get("score") is not None]
    return {
        "mean_score": round(sum(scores) / len(scores), 2) if scores else None,
        "scored": len(scores),
        "failed": len(results) - len(scores),
    }


# --- General benchmarks: lm-evaluation-harness commands -------------------------------------------


def lm_eval_command(
    model: str,
    tasks: tuple[str, ...] = ("mmlu", "gsm8k"),
    adapter: str | None = None,
    backend: str = "hf",
    base_url: str | None = None,
    num_fewshot: int | None = 5,
    limit: int | None = None,
    output_path: str = "outputs/lm-eval",
) -> list[str]:
    """An ``lm-eval run`` argument list: ``hf`` (transformers + peft adapter), ``vllm``, or
    ``local-chat-completions`` (any OpenAI-compatible server, e.g. lesson 07's)."""
    if backend == "hf":
        model_args = f"pretrained={model},dtype=bfloat16" + (f",peft={adapter}" if adapter else "")
    elif backend == "vllm":
        model_args = f"pretrained={model},dtype=auto,max_model_len=8192,gpu_memory_utilization=0.85"
        if adapter:
            model_args += f",enable_lora=True,lora_local_path={adapter}"
    elif backend == "local-chat-completions":
        if not base_url:
            raise ValueError(
                "local-chat-completions needs base_url, e.g. http://127.0.0.1:8080/v1/chat/completions"
            )
        model_args = f"model={model},base_url={base_url},num_concurrent=4,max_retries=2"
    else:
        raise ValueError(f"backend {backend!r}: choose 'hf', 'vllm' or 'local-chat-completions'")
    cmd = [
        "lm-eval",
        "run",
        "--model",
        backend,
        "--model_args",
        model_args,
        "--tasks",
        ",".join(tasks),
        "--apply_chat_template",
        "--output_path",
        output_path,
        "--log_samples",
    ]
    if num_fewshot is not None:
        cmd += ["--num_fewshot", str(num_fewshot)] + (["--fewshot_as_multiturn"] if num_fewshot else [])
    cmd += ["--batch_size", "1" if backend == "local-chat-completions" else "auto"]
    if limit:
        cmd += ["--limit", str(limit)]
    return cmd


# --- Small 4: reasoning on and off ---------------------------------------------------------------


def supports_reasoning(processor) -> bool:
    """Whether the model's chat template has Small 4's ``reasoning_effort`` switch (Small 3.x: no)."""
    template = getattr(processor, "chat_template", None) or getattr(processor.tokenizer, "chat_template", "")
    return "reasoning_effort" in (template or "")


@dataclass(frozen=True)
class ReasoningRun:
    """One reasoning effort over the same prompts: means per reply."""

    effort: str
    replies: int
    prompt_tokens: float  # either effort writes its [MODEL_SETTINGS] block
    reply_tokens: float  # everything generated, trace included
    thinking_tokens: float  # inside [THINK]…[/THINK]
    with_thinking: float  # share of replies that opened a trace
    json_valid: float  # of the answer, the trace removed
    seconds_per_reply: float
    answers: tuple[str, ...] = ()

    def row(self) -> dict:
        """The table row (answers left out)."""
        return {
            "effort": self.effort,
            "replies": self.replies,
            "prompt tokens": round(self.prompt_tokens, 1),
            "reply tokens": round(self.reply_tokens, 1),
            "thinking tokens": round(self.thinking_tokens, 1),
            "with [THINK]": round(self.with_thinking, 2),
            "JSON-valid": round(self.json_valid, 2),
            "s / reply": round(self.seconds_per_reply, 3),
        }


def compare_reasoning(
    model,
    processor,
    conversations: list[list[dict]],
    efforts: tuple[str, ...] = ("none", "high"),
    max_new_tokens: int = 128,
    batch_size: int = 8,
) -> list[ReasoningRun]:
    """Generate the same prompts once per ``reasoning_effort`` and measure what changes: prompt and reply
    length, the ``[THINK]`` trace (:func:`course_utils.chat.split_thinking`), the answer's JSON validity
    and the time per reply. Raises ``ValueError`` for a template without the switch (Small 3.x)."""
    import time

    if not supports_reasoning(processor):
        raise ValueError(
            "this model's chat template has no reasoning_effort (Small 3.x); run with MODEL='mistral-small-4'"
        )
    tokenizer = processor.tokenizer

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    runs = []
    for effort in efforts:
        kwargs = {"reasoning_effort": effort}
        prompt_lengths = [
            processor.apply_chat_template(
                c, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", **kwargs
            )["input_ids"].shape[-1]
            for c in conversations
        ]
        started = time.perf_counter()
        replies = generate_batch(
            model,
            processor,
            conversations,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            progress=False,
            template_kwargs=kwargs,
            skip_special_tokens=False,
        )
        seconds = time.perf_counter() - started
        split = [split_thinking(r) for r in replies]
        n = max(len(replies), 1)
        runs.append(
            ReasoningRun(
                effort=effort,
                replies=len(replies),
                prompt_tokens=sum(prompt_lengths) / n,
                reply_tokens=sum(count(r) for r in replies) / n,
                thinking_tokens=sum(count(s.thinking) for s in split if s.thinking) / n,
                with_thinking=sum(s.thinking is not None for s in split) / n,
                json_valid=validity([s.answer for s in split])["json_valid"],
                seconds_per_reply=seconds / n,
                answers=tuple(s.answer for s in split),
            )
        )
    return runs


def load_tuned(model, adapter_dir: str | Path):
    """Wrap a freshly loaded base model with a saved LoRA adapter (inference mode).

    The base stays reachable: ``with tuned.disable_adapter(): ...`` runs the untouched base model,
    so one copy in memory serves both sides of a comparison.
    """
    from peft import PeftModel

    tuned = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    tuned.eval()
    return tuned
