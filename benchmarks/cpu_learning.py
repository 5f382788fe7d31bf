"""Does the CPU stand-in learn the receipt *values*, not only the JSON format? (issue 15, lesson 04/05)

Trains a variant of the ``tiny-mistral-small-3`` stand-in the way lesson 04 does on ``cpu-tiny``
(transformers ``Trainer`` + peft LoRA + trained embedding rows, response-only loss), then generates
greedy replies for the test split as lesson 05 does and prints one JSON line per variant:
JSON-valid and field F1 on the text rows and on the image rows, training wall seconds and training
CPU seconds (user + system of this process: the machine may be shared, wall time alone misleads).

Variants change the stand-in's text-model sizes (built with ``course_utils.tiny``'s own build code
into ``outputs/experiments/stand-ins``, never into the course's cache), the preset
(:class:`course_utils.train.TrainPreset` fields), which rows train and in what order, and which
parameters train::

    OMP_NUM_THREADS=2 python benchmarks/cpu_learning.py --variant baseline
    OMP_NUM_THREADS=2 python benchmarks/cpu_learning.py --list

Measured on the 2-core CPU box (2026-11, ``--eval-limit 50`` unless noted; target: text field F1 ≥ 0.5
with text JSON-valid ≥ 0.9 and training ≤ 4 min). None reached it; the course keeps the baseline:

=========================  =======  ==========  ===============  =======  ============================
variant                    train s  final loss  text JSON-valid  text F1  note
=========================  =======  ==========  ===============  =======  ============================
baseline (lesson 04)       ≈ 150    0.85        1.00             ≈ 0.02   lesson 05's full test split
l4-lora-rope1e4            1440*    0.87        1.00             0.021    * machine shared by 3 jobs
b1-880-lr5e-3-textonly     247      0.86        0.18             0.008    1 row/step: worse
rope1e4                    153      0.82        0.61             0.006    digits run on
rope1e4-330                227      0.72        0.71             0.017    lower loss, still no copying
l4-full-textheavy          —        1.14 @130   —                —        stopped: above baseline
embmean                    157      0.89        1.00             0.015    rows share a direction
=========================  =======  ==========  ===============  =======  ============================

The loss floor (≈ 0.7-0.85 nats per reply token) is the values: the stand-in writes the JSON skeleton and
a plausible value of the right kind, not the one in the receipt — copying needs induction heads, which a
random 2-layer model does not form in a few hundred steps here. Teaching the stand-in to copy before the
course uses it (synthetic copying tasks at build time) formed no induction within minutes either:
``copy_pretraining.py``. ``tool_learning.py`` has lesson 08's side.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
EXPERIMENTS = ROOT / "outputs" / "experiments"


@dataclass(frozen=True)
class Variant:
    """One experiment: stand-in text sizes, preset overrides, data order and what trains."""

    text: dict = field(default_factory=dict)  # overrides of the tiny-mistral-small-3 text recipe
    preset: dict = field(default_factory=dict)  # overrides of preset_for("cpu-tiny")
    rows: str = "mixed"  # mixed: lesson 04's rows; text-heavy, text-first, text-only: see ordered_rows
    train: str = "lora"  # lora: lesson 04 (LoRA + embedding rows); full: every language-model weight
    embed_shared: float = 0.0  # add a direction every embedding row shares, this times the mean row norm
    note: str = ""


def _dims(hidden: int, layers: int, heads: int, kv: int, ffn: int) -> dict:
    return dict(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=hidden // heads,
        intermediate_size=ffn,
    )


L4 = _dims(128, 4, 4, 2, 512)  # today's width, four layers
W256 = _dims(256, 4, 4, 2, 768)  # K-quant-friendly width, four layers
# The real Small 3 RoPE base (1e9) barely rotates over a few hundred positions: with head_dim 32 only
# the first two or three frequency pairs tell neighbouring tokens apart. A tiny model learning to copy
# needs positions (previous-token and induction heads); 1e4 is the classic base. A hypothesis that
# the variants below test, not a finding.
ROPE_1E4 = dict(rope_parameters={"rope_type": "default", "rope_theta": 10_000.0})

VARIANTS: dict[str, Variant] = {
    "baseline": Variant(note="today's stand-in and cpu-tiny preset"),
    "probe": Variant(preset=dict(max_steps=20), note="20 steps: cost probe only"),
    "l4-full": Variant(text=L4, train="full", note="128 wide, 4 layers, every language weight trains"),
    "l4-full-textheavy": Variant(text=L4, train="full", rows="text-heavy", note="+ text rows twice"),
    "l4-lora-rope1e4": Variant(text={**L4, **ROPE_1E4}, note="128 wide, 4 layers, RoPE base 1e4, LoRA"),
    "l4-lora": Variant(text=L4, note="128 wide, 4 layers, lesson 04's LoRA"),
    "l4-lora-r64": Variant(text=L4, preset=dict(lora_r=64, lora_alpha=64), note="LoRA r64"),
    "embmean": Variant(embed_shared=1.0, note="embedding rows share one direction (as trained ones do)"),
    "l2-full": Variant(train="full", note="today's sizes, every language weight trains"),
    "w256-l4-full": Variant(text=W256, train="full", note="256 wide, 4 layers, full"),
    "w256-l4-lora": Variant(text=W256, note="256 wide, 4 layers, lesson 04's LoRA"),
    "rope1e4": Variant(text=ROPE_1E4, note="today's sizes and preset, RoPE base 1e4"),
    "rope1e4-330": Variant(text=ROPE_1E4, preset=dict(max_steps=330), note="RoPE base 1e4, 330 steps"),
    "rope1e5": Variant(
        text=dict(rope_parameters={"rope_type": "default", "rope_theta": 1e5}), note="RoPE base 1e5"
    ),
    "rope1e6": Variant(
        text=dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6}), note="RoPE base 1e6"
    ),
    "rope1e4-textheavy": Variant(text=ROPE_1E4, rows="text-heavy", note="RoPE base 1e4, text rows twice"),
    "b1-880-lr5e-3": Variant(
        preset=dict(per_device_train_batch_size=1, max_steps=880, learning_rate=5e-3),
        note="same rows seen as the baseline, one per step: 4x the updates",
    ),
    "b1-880-lr5e-3-textonly": Variant(
        preset=dict(per_device_train_batch_size=1, max_steps=880, learning_rate=5e-3),
        rows="text-only",
        note="one row per step, text rows only",
    ),
}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def build_variant(name: str, variant: Variant) -> Path:
    """The stand-in for ``variant`` under outputs/experiments/stand-ins (reused when its recipe matches)."""
    from course_utils import tiny
    from course_utils.paths import staged

    base = tiny.RECIPES["tiny-mistral-small-3"]
    # same sizes, same folder: a short digest of the overrides names it
    dims = (
        hashlib.sha256(json.dumps(variant.text, sort_keys=True).encode()).hexdigest()[:8]
        if variant.text
        else ""
    )
    recipe = replace(
        base, name=f"{base.name}-{dims}" if dims else base.name, text={**base.text, **variant.text}
    )
    target = EXPERIMENTS / "stand-ins" / recipe.name
    info = target / tiny.BUILD_INFO_FILE
    if info.is_file() and json.loads(info.read_text()).get("fingerprint") == recipe.fingerprint():
        return target
    with staged(target, overwrite=True, folder=True) as tmp:
        tiny._build_into(recipe, tmp)  # the same build code as the course's stand-ins
    return target


def ordered_rows(rows: list[dict], how: str) -> list[dict]:
    if how == "mixed":
        return rows
    if how == "text-first":
        return [r for r in rows if not r.get("images")] + [r for r in rows if r.get("images")]
    if how == "text-heavy":  # every text row twice, every image row once, shuffled with a fixed seed
        import random

        text = [r for r in rows if not r.get("images")]
        mixed = text + rows
        random.Random(0).shuffle(mixed)
        return mixed
    if how == "text-only":
        return [r for r in rows if not r.get("images")]
    raise ValueError(f"unknown rows {how!r}: use mixed, text-first or text-only")


def make_full(model) -> None:
    """Every language-model weight (and the tied embedding) trains; the vision tower stays frozen."""
    for name, param in model.named_parameters():
        param.requires_grad = "language_model" in name or "lm_head" in name


def evaluate(model, processor, test_rows: list[dict], max_new_tokens: int) -> dict:
    from course_utils.chat import generate_batch
    from course_utils.evaluate import prompts_of, targets_of, task_metrics
    from course_utils.receipts import RECEIPT_SCHEMA

    model.eval()
    replies = generate_batch(
        model, processor, prompts_of(test_rows), max_new_tokens=max_new_tokens, batch_size=16, progress=False
    )
    targets = targets_of(test_rows)
    out = {}
    for kind in ("text", "image"):
        keep = [i for i, r in enumerate(test_rows) if bool(r.get("images")) == (kind == "image")]
        m = task_metrics([replies[i] for i in keep], [targets[i] for i in keep], RECEIPT_SCHEMA)
        out[kind] = {
            "n": m["n"],
            "json_valid": round(m["json_valid"], 3),
            "field_f1": round(m["field_f1"], 3),
            "per_field_f1": {k: v["f1"] for k, v in m["per_field"].items()},
        }
    out["sample_text_reply"] = next(
        (replies[i][:160] for i, r in enumerate(test_rows) if not r.get("images")), ""
    )
    from course_utils.evaluate import validity

    out["invalid_text_replies"] = [
        replies[i]
        for i, r in enumerate(test_rows)
        if not r.get("images") and not validity([replies[i]])["json_valid"]
    ][:2]
    return out


def run(name: str, variant: Variant, eval_limit: int | None) -> dict:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from course_utils.receipts import lesson_splits
    from course_utils.train import build_trainer, count_parameters, preset_for

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    source = build_variant(name, variant)
    train_rows, _, test_rows, _ = lesson_splits("cpu-tiny")
    if eval_limit:
        test_rows = test_rows[:eval_limit]
    train_rows = ordered_rows(train_rows, variant.rows)
    preset = preset_for("cpu-tiny", **variant.preset)
    processor = AutoProcessor.from_pretrained(source)
    model = AutoModelForImageTextToText.from_pretrained(source, dtype=torch.float32)
    if variant.embed_shared:
        embed = model.get_input_embeddings().weight
        with torch.no_grad():
            shared = torch.randn(embed.shape[1], generator=torch.Generator().manual_seed(0))
            embed += shared / shared.norm() * embed.norm(dim=1).mean() * variant.embed_shared
    out_dir = EXPERIMENTS / "runs" / name
    if variant.train == "lora":
        training = build_trainer(model, processor, train_rows, None, preset, out_dir, progress=False)
        trainer, model = training.trainer, training.model
    else:
        training = build_trainer(
            model,
            processor,
            train_rows,
            None,
            replace(preset, train_embeddings=False),
            out_dir,
            progress=False,
        )
        trainer = training.trainer
        model = training.model.get_base_model()
        make_full(model)
    trainer.args.save_strategy = "no"
    if variant.rows in ("text-first",):  # keep the given order instead of shuffling
        from torch.utils.data import SequentialSampler

        trainer._get_train_sampler = lambda *a, **k: SequentialSampler(trainer.train_dataset)
    trainable, total = count_parameters(model)
    wall0, cpu0 = time.perf_counter(), cpu_seconds()
    result = trainer.train()
    train_wall, train_cpu = time.perf_counter() - wall0, cpu_seconds() - cpu0
    wall1 = time.perf_counter()
    metrics = evaluate(model, processor, test_rows, preset.max_new_tokens_eval)
    return {
        "variant": name,
        "note": variant.note,
        "text": {k: v for k, v in variant.text.items()},
        "preset": variant.preset,
        "rows": variant.rows,
        "train": variant.train,
        "params_total": total,
        "params_trainable": trainable,
        "train_loss": round(result.training_loss, 4),
        "train_wall_s": round(train_wall, 1),
        "train_cpu_s": round(train_cpu, 1),
        "eval_wall_s": round(time.perf_counter() - wall1, 1),
        "text_json_valid": metrics["text"]["json_valid"],
        "text_field_f1": metrics["text"]["field_f1"],
        "image_json_valid": metrics["image"]["json_valid"],
        "image_field_f1": metrics["image"]["field_f1"],
        "text_per_field_f1": metrics["text"]["per_field_f1"],
        "sample_text_reply": metrics["sample_text_reply"],
        "invalid_text_replies": metrics["invalid_text_replies"],
        "loss_curve": [(h["step"], round(h["loss"], 3)) for h in trainer.state.log_history if "loss" in h],
    }


def run_variants(parser, variants: dict, describe, run_one, argv: list[str] | None = None) -> int:
    """The variant runner both learning benchmarks share: ``--list``, ``--variant`` (repeatable), one
    JSON line per variant printed and appended to ``--out``. ``run_one(name, variant, args)`` runs one."""
    parser.add_argument("--variant", action="append", help="run this variant (repeatable); default: all")
    parser.add_argument("--list", action="store_true", help="list the variants and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, variant in variants.items():
            print(f"{name:22s} {describe(variant)}")
        return 0
    names = args.variant or list(variants)
    unknown = [n for n in names if n not in variants]
    if unknown:
        print(f"error: unknown variant {', '.join(unknown)}; --list shows them", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for name in names:
        line = json.dumps(run_one(name, variants[name], args), ensure_ascii=False)
        print(line, flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N test rows only")
    parser.add_argument("--out", default=str(EXPERIMENTS / "results.jsonl"), help="append results here")
    return run_variants(
        parser, VARIANTS, lambda v: v.note, lambda name, v, args: run(name, v, args.eval_limit), argv
    )


if __name__ == "__main__":
    raise SystemExit(main())
