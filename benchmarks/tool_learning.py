"""How fast does the CPU stand-in learn well-formed tool calls? (issue 18, lesson 08)

Trains the ``tiny-mistral-small-3`` stand-in on ``data/tools`` the way lesson 08 does
(:func:`course_utils.tools.build_tool_trainer`: LoRA + the embedding rows the replies use, labels on the
call and the final answer) with preset overrides, then generates greedy replies for held-out rows and
prints one JSON line per variant: the well-formed-call rate (parseable JSON after ``[TOOL_CALLS]``, a
known tool, schema-valid arguments), the right-tool rate, training wall and CPU seconds::

    OMP_NUM_THREADS=2 python benchmarks/tool_learning.py --variant lesson08
    OMP_NUM_THREADS=2 python benchmarks/tool_learning.py --list

Measured on the 2-core CPU box (2026-11, all 30 held-out rows; target ≥ 0.9 well formed in ≤ 3 min):

=============================  =======  ==========  ===========  ==========
variant                        train s  final loss  well formed  right tool
=============================  =======  ==========  ===========  ==========
lesson08 (160 × 4)             —        2.11        0.0 (10)     —
b2-300-lr5e-3                  116      1.44        0.0          0.0
b2-300-lr5e-3-rope1e4          131      1.37        0.667        0.2
b2-300-lr5e-3-rope1e5          106      1.48        0.0          0.267
b2-300-lr5e-3-rope1e6          107      1.40        0.0          0.0
b2-500-lr5e-3                  179      1.28        0.733        0.6         ← tools.TOOL_PRESETS
b2-500-lr5e-3-seed1            166      1.11        0.667        0.6
b2-500-lr5e-3-seed2            198      1.12        0.433        0.333
b2-500-lr5e-3-seed3            171      1.13        0.233        0.233
b2-500-lr5e-3-seed4            221      1.19        0.467        0.367
b2-500-lr8e-3                  191      1.23        0.0          0.0
b2-600-lr5e-3                  205      1.15        0.0          0.0         keys repeat again
b2-700-lr4e-3                  236      1.05        0.967        0.633       over the 3-min budget
b2-700-lr4e-3-seed1            252      1.08        0.433        0.433
b2-500-lr5e-3-fp32             157      1.28        0.733        0.6         bf16 off: the same run
b2-500-lr5e-3-rope1e4          170      1.19        1.0          0.867
b2-500-lr5e-3-rope1e4-seed1    173      1.19        0.0          0.0         the same recipe, seed 1
b2-500-lr5e-3-callonly-seed1   164      1.36        0.0          0.0         labels on the call only
b2-500-lr5e-3-embmean-seed1    166      1.17        0.4          0.4         rows share a direction
b2-500-lr5e-3-alltokens-seed1  257*     1.11        0.733        0.733       * machine shared
b2-500-lr5e-3-unfreeze         178      1.69        0.0          0.0         attention weights train
b2-500-lr5e-3-hd128            187      3.52        0.0          0.0         head_dim 128, new attention
b2-500-lr5e-3-lp16-seed1       168      4.86        0.0          0.0         LoRA+, B at 16 × the lr
b2-500-lr2e-3-lp16-seed1       166      3.27        0.0          0.0         LoRA+ 16, lr 2e-3
b2-500-lr5e-3-lp4-seed1        253*     2.69        0.0          0.0         LoRA+ 4; * machine shared
=============================  =======  ==========  ===========  ==========

The rates above were measured before the metric required the trained shape — a JSON *list* after
``[TOOL_CALLS]`` and an *object* of arguments (2026-11-30); the lesson's seed gives 0.733 under both, and
none of its 22 well-formed replies carries a valid 9-character id (``tools.call_ids_valid_rate``: 0 %;
servers replace ids, so the metric counts them apart).

Well-formedness is a threshold, not a slope: replies either keep the key/value order or repeat keys, and
the seed moves it as much as the recipe does. The course's preset over seeds 0-4: 0.733, 0.667, 0.433,
0.233, 0.467 well formed (mean 0.51; seeds 2-4 measured 2026-11-30). 700 steps at 4e-3 gave 0.967 with
seed 0 and 0.433 with seed 1 — a mean of 0.70, the same as 500 steps on those two seeds, for 40 % more
time. The course keeps the 500-step preset.
A RoPE base of 1e4 (more rotation pairs that tell neighbouring positions apart) gave 1.0 with seed 0 and
0.0 with seed 1; neither training the attention's own weights (5e-3 is too much for them), nor a 128-wide
head, nor labels on the call alone, nor giving every embedding row a shared direction, nor training every
prompt token's row fixed seed 1 (0.0-0.73, around its 0.67 baseline). LoRA+ (peft's
``create_loraplus_optimizer``: the B matrices at 4-16 × the learning rate) made the loss worse at every
ratio tried (2.7-4.9 against 1.11) and no call well-formed. What fails is the previous-token
information (`"id": "id": "id"`, `1.9.9`): a random 2-layer model forms that attention in some runs only.
Lesson 08 therefore also shows the serving-side guarantee, ``tool_choice="required"`` (a grammar from the
tools' schemas), which made 10 of 10 served calls well-formed where ``auto`` made 8.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
EXPERIMENTS = ROOT / "outputs" / "experiments"

# preset overrides on top of lesson 08's (preset_for("cpu-tiny", max_steps=…, max_seq_length=1024)); a name
# ending in -rope<base> (-rope1e4) loads the stand-in with that RoPE base instead of its recipe's (the
# weights are random, so no learned behaviour depends on the base: a question about the stand-in's recipe)
VARIANTS: dict[str, dict] = {
    "lesson08": dict(max_steps=160),
    "b1-600-lr5e-3": dict(max_steps=600, per_device_train_batch_size=1, learning_rate=5e-3),
    "b2-300-lr5e-3": dict(max_steps=300, per_device_train_batch_size=2, learning_rate=5e-3),
    "b2-500-lr5e-3": dict(max_steps=500, per_device_train_batch_size=2, learning_rate=5e-3),
    "b2-500-lr8e-3": dict(max_steps=500, per_device_train_batch_size=2, learning_rate=8e-3),
    "b2-300-lr5e-3-rope1e4": dict(max_steps=300, per_device_train_batch_size=2, learning_rate=5e-3),
    "b2-300-lr5e-3-rope1e5": dict(max_steps=300, per_device_train_batch_size=2, learning_rate=5e-3),
    "b2-300-lr5e-3-rope1e6": dict(max_steps=300, per_device_train_batch_size=2, learning_rate=5e-3),
    "b2-300-lr5e-3-rope1e9": dict(max_steps=300, per_device_train_batch_size=2, learning_rate=5e-3),
    "b4-250-lr5e-3": dict(max_steps=250, per_device_train_batch_size=4, learning_rate=5e-3),
    "b2-500-lr5e-3-seed1": dict(max_steps=500, per_device_train_batch_size=2, learning_rate=5e-3, seed=1),
    **{  # the lesson's preset across seeds: the spread issue 18's learned rate has to be read with
        f"b2-500-lr5e-3-seed{seed}": dict(
            max_steps=500, per_device_train_batch_size=2, learning_rate=5e-3, seed=seed
        )
        for seed in (2, 3, 4)
    },
    "b2-700-lr4e-3": dict(max_steps=700, per_device_train_batch_size=2, learning_rate=4e-3),
    "b2-700-lr4e-3-seed1": dict(max_steps=700, per_device_train_batch_size=2, learning_rate=4e-3, seed=1),
    "b2-600-lr5e-3": dict(max_steps=600, per_device_train_batch_size=2, learning_rate=5e-3),
    "b2-500-lr5e-3-rope1e4": dict(max_steps=500, per_device_train_batch_size=2, learning_rate=5e-3),
    "b2-500-lr5e-3-hd128": dict(max_steps=500, per_device_train_batch_size=2, learning_rate=5e-3),
    "b2-500-lr5e-3-hd128-seed1": dict(
        max_steps=500, per_device_train_batch_size=2, learning_rate=5e-3, seed=1
    ),
    "b2-500-lr5e-3-rope1e4-seed1": dict(
        max_steps=500, per_device_train_batch_size=2, learning_rate=5e-3, seed=1
    ),
    "b2-500-lr5e-3-callonly": dict(max_steps=500, per_device_train_batch_size=2, learning_rate=5e-3),
    "b2-500-lr5e-3-callonly-seed1": dict(
        max_steps=500, per_device_train_batch_size=2, learning_rate=5e-3, seed=1
    ),
    "b2-500-lr5e-3-embmean-seed1": dict(
        max_steps=500, per_device_train_batch_size=2, learning_rate=5e-3, seed=1
    ),
    "b2-500-lr5e-3-embmean": dict(max_steps=500, per_device_train_batch_size=2, learning_rate=5e-3),
    "b2-500-lr5e-3-alltokens-seed1": dict(
        max_steps=500, per_device_train_batch_size=2, learning_rate=5e-3, seed=1
    ),
    "b2-500-lr5e-3-unfreeze": dict(max_steps=500, per_device_train_batch_size=2, learning_rate=5e-3),
    "b2-300-lr5e-3-unfreeze": dict(max_steps=300, per_device_train_batch_size=2, learning_rate=5e-3),
    "b2-500-lr5e-3-fp32": dict(max_steps=500, per_device_train_batch_size=2, learning_rate=5e-3, bf16=False),
    "b2-500-lr5e-3-fp32-seed1": dict(
        max_steps=500, per_device_train_batch_size=2, learning_rate=5e-3, bf16=False, seed=1
    ),
    # LoRA+ (Hayou et al. 2024, arXiv:2402.12354): the B matrices learn ratio × faster than A (-lp<ratio>)
    "b2-500-lr5e-3-lp16": dict(max_steps=500, per_device_train_batch_size=2, learning_rate=5e-3),
    "b2-500-lr5e-3-lp16-seed1": dict(
        max_steps=500, per_device_train_batch_size=2, learning_rate=5e-3, seed=1
    ),
    "b2-500-lr2e-3-lp16": dict(max_steps=500, per_device_train_batch_size=2, learning_rate=2e-3),
    "b2-500-lr2e-3-lp16-seed1": dict(
        max_steps=500, per_device_train_batch_size=2, learning_rate=2e-3, seed=1
    ),
    "b2-500-lr5e-3-lp4": dict(max_steps=500, per_device_train_batch_size=2, learning_rate=5e-3),
    "b2-500-lr5e-3-lp4-seed1": dict(max_steps=500, per_device_train_batch_size=2, learning_rate=5e-3, seed=1),
    "b1-600-lr5e-3-r64": dict(
        max_steps=600, per_device_train_batch_size=1, learning_rate=5e-3, lora_r=64, lora_alpha=128
    ),
}


def run(name: str, overrides: dict, held_out: int) -> dict:
    import torch
    from cpu_learning import cpu_seconds

    from course_utils import tools
    from course_utils.models import load
    from course_utils.train import preset_for

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    loaded = load("cpu-tiny")
    tokenizer = loaded.processor.tokenizer
    if "-rope" in name or "-hd" in name:
        from transformers import AutoConfig, AutoModelForImageTextToText

        config = AutoConfig.from_pretrained(loaded.source)
        for part in name.split("-"):
            if part.startswith("rope"):  # -rope1e4: another RoPE base
                theta = float(part[4:])
                config.text_config.rope_parameters = {"rope_type": "default", "rope_theta": theta}
            if part.startswith("hd"):  # -hd128: another head_dim (the attention weights start new, random)
                config.text_config.head_dim = int(part[2:])
        torch.manual_seed(0)
        loaded.model = AutoModelForImageTextToText.from_pretrained(
            loaded.source, config=config, dtype=torch.float32, ignore_mismatched_sizes=True
        )
    preset = preset_for("cpu-tiny", **{"max_seq_length": 1024, "save_steps": 10**6, **overrides})
    if (
        "-embmean" in name
    ):  # a direction every embedding row shares (a trained model's rows do; random ones not)
        embed = loaded.model.get_input_embeddings().weight
        with torch.no_grad():
            shared = torch.randn(embed.shape[1], generator=torch.Generator().manual_seed(0))
            embed += shared / shared.norm() * embed.norm(dim=1).mean()
    rows_tokens = contextlib.nullcontext()
    if "-alltokens" in name:  # every token id of the rows (prompt too) gets a trained embedding row
        rows = tools.load_tool_split("train")
        every = sorted({t for r in rows for t in tools.render_ids(tokenizer, r["messages"], r["tools"])})
        # for this variant's trainer only (the next variant in the same process gets the course's rule)
        rows_tokens = mock.patch("course_utils.loss.trained_token_ids", lambda examples: every)
    with rows_tokens:
        trainer = tools.build_tool_trainer(
            loaded.model, tokenizer, tools.load_tool_split("train"), preset, EXPERIMENTS / "tool-runs" / name
        )
    trainer.args.save_strategy = "no"
    if "-callonly" in name:  # labels on the call only: the final answer (after the first </s>) is not trained
        for example in trainer.train_dataset:
            first_eos = example["labels"].index(tokenizer.eos_token_id)
            example["labels"] = example["labels"][: first_eos + 1] + [-100] * (
                len(example["labels"]) - first_eos - 1
            )
    if "-unfreeze" in name:  # the attention's own (frozen, random) weights train too, beside their LoRA
        for pname, param in trainer.model.named_parameters():
            if "language_model" in pname and "self_attn" in pname and pname.endswith("base_layer.weight"):
                param.requires_grad_(True)
    for part in name.split("-"):
        if part.startswith("lp"):  # -lp16: LoRA+ with that B/A learning-rate ratio (peft's own optimizer)
            from peft.optimizers import create_loraplus_optimizer

            trainer.optimizer = create_loraplus_optimizer(
                trainer.model,
                torch.optim.AdamW,
                lr=preset.learning_rate,
                loraplus_lr_ratio=float(part[2:]),
                loraplus_weight_decay=preset.weight_decay,  # peft sets every group's decay from this
            )
    wall0, cpu0 = time.perf_counter(), cpu_seconds()
    result = trainer.train()
    train_wall, train_cpu = time.perf_counter() - wall0, cpu_seconds() - cpu0
    model = trainer.model.eval()
    rows = tools.load_tool_split("test")[:held_out]
    prompts = [(tools.prompt_messages(r), r["tools"]) for r in rows]
    replies = tools.generate_raw_batch(model, tokenizer, prompts, max_new_tokens=72)  # = generate_raw's
    wanted = [tools.wanted_tool(r) for r in rows]
    called = [[c["name"] for c in tools.parse_tool_calls(x).calls] for x in replies]
    return {
        "variant": name,
        "preset": overrides,
        "train_loss": round(result.training_loss, 4),
        "train_wall_s": round(train_wall, 1),
        "train_cpu_s": round(train_cpu, 1),
        "held_out": len(rows),
        "well_formed": round(tools.well_formed_rate(replies, tools.TOOLS), 3),
        "ids_valid": round(tools.call_ids_valid_rate(replies), 3),
        "right_tool": round(sum(w in c for w, c in zip(wanted, called)) / len(rows), 3),
        "sample_reply": replies[0][:200],
        "loss_curve": [(h["step"], round(h["loss"], 3)) for h in trainer.state.log_history if "loss" in h],
    }


def main(argv: list[str] | None = None) -> int:
    from cpu_learning import run_variants  # this folder's shared variant runner

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--held-out", type=int, default=30, help="test rows to generate for")
    parser.add_argument("--out", default=str(EXPERIMENTS / "tool_results.jsonl"), help="append results here")
    return run_variants(parser, VARIANTS, str, lambda name, v, args: run(name, v, args.held_out), argv)


if __name__ == "__main__":
    raise SystemExit(main())
