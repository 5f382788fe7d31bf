"""Did fine-tuning help? Generate on held-out rows and measure (lesson 05 builds on this)."""

from __future__ import annotations

from pathlib import Path

from course_utils.chat import JSONExtractionError, extract_json, generate_batch
from course_utils.data import with_images


def prompts_of(records: list[dict], base_dir: Path | None = None) -> list[list[dict]]:
    """Each record's conversation without its final assistant reply, images loaded."""
    return [with_images(r, base_dir)[:-1] for r in records]


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


def json_valid_rate(model, processor, records: list[dict], schema: dict | None = None, max_new_tokens: int = 200,
                    batch_size: int = 16, progress: bool = True) -> tuple[dict, list[str]]:
    """Greedy, batched replies for ``records`` and their JSON / schema validity."""
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        replies = generate_batch(model, processor, prompts_of(records), max_new_tokens=max_new_tokens,
                                 batch_size=batch_size, progress=progress)
    finally:
        if was_training:
            model.train()
    return validity(replies, schema), replies


# --- Field-level metrics ----------------------------------------------------------------------------

_CURRENCY_SYMBOLS = {"€": "EUR", "$": "USD", "£": "GBP", "¥": "JPY", "CHF": "CHF", "FR.": "CHF"}


def normalize_number(value) -> float | None:
    """``"1,234.50"``, ``"12.3 €"``, ``12.30`` → 12.3 (rounded to cents); ``None`` when not a number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return round(float(value), 2)
    if isinstance(value, str):
        cleaned = "".join(ch for ch in value if ch.isdigit() or ch in ".-,")
        if cleaned.count(",") and cleaned.count("."):
            cleaned = cleaned.replace(",", "")
        elif cleaned.count(",") == 1 and len(cleaned.split(",")[1]) == 2:
            cleaned = cleaned.replace(",", ".")  # decimal comma: 12,30
        else:
            cleaned = cleaned.replace(",", "")
        try:
            return round(float(cleaned), 2)
        except ValueError:
            return None
    return None


def normalize_date(value) -> str | None:
    """ISO ``YYYY-MM-DD`` from ISO, ``DD.MM.YYYY`` or ``MM/DD/YYYY`` text."""
    import re

    if not isinstance(value, str):
        return None
    text = value.strip()
    for pattern, order in ((r"(\d{4})-(\d{1,2})-(\d{1,2})$", "ymd"), (r"(\d{1,2})\.(\d{1,2})\.(\d{4})$", "dmy"),
                           (r"(\d{1,2})/(\d{1,2})/(\d{4})$", "mdy")):
        match = re.match(pattern, text)
        if match:
            parts = dict(zip(order, match.groups()))
            return f"{int(parts['y']):04d}-{int(parts['m']):02d}-{int(parts['d']):02d}"
    return None


def normalize_text(value) -> str | None:
    return " ".join(str(value).casefold().split()) if isinstance(value, (str, int, float)) else None


def normalize_currency(value) -> str | None:
    if not isinstance(value, str):
        return None
    text = value.strip().upper()
    return _CURRENCY_SYMBOLS.get(text, text)


def receipt_facts(receipt: dict | None) -> list[tuple]:
    """A receipt as comparable (field, normalised value) facts; each line item is one fact."""
    if not isinstance(receipt, dict):
        return []
    facts = [("merchant", normalize_text(receipt.get("merchant"))), ("date", normalize_date(receipt.get("date"))),
             ("currency", normalize_currency(receipt.get("currency")))]
    facts += [(key, normalize_number(receipt.get(key))) for key in ("subtotal", "tax", "total")]
    items = receipt.get("items") if isinstance(receipt.get("items"), list) else []
    for item in items:
        if isinstance(item, dict):
            facts.append(("item", (normalize_text(item.get("name")), normalize_number(item.get("qty")),
                                   normalize_number(item.get("unit_price")))))
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
    return {"matched": sum(matched.values()), "predicted": sum(pred.values()), "expected": sum(gold.values()),
            "per_field": per_field, "exact": predicted is not None and pred == gold}


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
    result = {"n": len(replies), "json_valid": json_ok / n, "exact_match": exact / n,
              **{f"field_{k}": v for k, v in _prf(totals["matched"], totals["predicted"], totals["expected"]).items()},
              "per_field": {name: _prf(c["matched"], c["predicted"], c["expected"]) for name, c in sorted(fields.items())}}
    if schema is not None:
        result["schema_valid"] = schema_ok / n
    return result


# --- Loss, and the silent no-op adapter -----------------------------------------------------------

def heldout_loss(model, processor, records: list[dict], batch_size: int = 8, max_seq_length: int = 1024) -> dict:
    """Mean response-token loss on held-out records, and its perplexity."""
    import math

    import torch

    from course_utils.train import VisionTextCollator, prepare_examples, response_only_loss

    examples = prepare_examples(records, processor, max_seq_length, progress=False)
    collate = VisionTextCollator(processor.tokenizer.pad_token_id)
    total, tokens = 0.0, 0
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(examples), batch_size):
                batch = collate(examples[start:start + batch_size])
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

    from course_utils.train import VisionTextCollator, prepare_examples

    examples = prepare_examples(records, processor, max_seq_length, progress=False)
    batch = {k: v.to(peft_model.device) for k, v in VisionTextCollator(processor.tokenizer.pad_token_id)(examples).items()
             if k != "labels"}
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(next(peft_model.parameters()).dtype)
    peft_model.eval()
    with torch.no_grad():
        tuned = peft_model(**batch).logits
        with peft_model.disable_adapter():
            base = peft_model(**batch).logits
    mask = batch["attention_mask"].bool()
    return float((tuned - base).abs()[mask].max())
