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
