"""What training and evaluation both compute: tokenized, labelled examples, their batches, and the
response-only loss.

Backs lesson 04 (which shows ``response_only_loss`` in full) and lesson 05 (held-out loss). Labels
come from :mod:`course_utils.data` (lesson 03's response-only rule); nothing here trains.
"""

from __future__ import annotations

from pathlib import Path

import torch

from course_utils.data import IGNORE_INDEX, tokenize_record


def prepare_examples(
    records: list[dict], processor, max_seq_length: int, base_dir: Path | None = None, progress: bool = True
) -> list[dict]:
    """Template, tokenize and label every record (response-only), with a progress bar."""
    from tqdm.auto import tqdm

    return [
        tokenize_record(r, processor, base_dir, max_seq_length)
        for r in tqdm(records, desc="tokenizing", disable=not progress)
    ]


def trained_token_ids(examples: list[dict]) -> list[int]:
    """Every token id that appears in a label: the embedding rows worth training on a random base."""
    return sorted({t for ex in examples for t in ex["labels"] if t != IGNORE_INDEX})


class VisionTextCollator:
    """Pads text (right), labels (-100) and images (zeros up to the largest; ``image_sizes`` keeps the
    real sizes) so text rows and image rows can share a batch."""

    def __init__(self, pad_token_id: int = 11):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict]) -> dict:
        length = max(len(e["input_ids"]) for e in examples)
        batch = {
            "input_ids": torch.full((len(examples), length), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(examples), length), dtype=torch.long),
            "labels": torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long),
        }
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            batch["input_ids"][i, :n] = torch.tensor(e["input_ids"])
            batch["attention_mask"][i, :n] = 1
            batch["labels"][i, :n] = torch.tensor(e["labels"])
        pixels = [e["pixel_values"] for e in examples if "pixel_values" in e]
        if pixels:
            images = [p for block in pixels for p in block]  # each block: (n_images, 3, H, W)
            height = max(p.shape[-2] for p in images)
            width = max(p.shape[-1] for p in images)
            stacked = torch.zeros((len(images), 3, height, width), dtype=images[0].dtype)
            for k, p in enumerate(images):
                stacked[k, :, : p.shape[-2], : p.shape[-1]] = p
            batch["pixel_values"] = stacked
            batch["image_sizes"] = torch.cat([e["image_sizes"] for e in examples if "image_sizes" in e])
        return batch


def response_only_loss(model, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
    """Cross-entropy on the labelled (reply) positions only — the lm_head runs on those alone."""
    labels = inputs["labels"]
    core = model.get_base_model() if hasattr(model, "get_base_model") else model  # under peft's wrapper
    forward = {k: v for k, v in inputs.items() if k != "labels"}
    if "pixel_values" in forward:
        forward["pixel_values"] = forward["pixel_values"].to(next(core.parameters()).dtype)
    hidden = core.model(**forward, use_cache=False).last_hidden_state[:, :-1]
    target = labels[:, 1:]
    keep = target != -100  # -100: not trained on (prompt, images, padding)
    logits = core.lm_head(hidden[keep]).float()
    total = torch.nn.functional.cross_entropy(logits, target[keep], reduction="sum")
    denominator = num_items_in_batch if num_items_in_batch is not None else keep.sum()
    return total / torch.as_tensor(denominator, device=total.device).clamp(min=1)
