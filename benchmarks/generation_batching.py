"""Batched vs one-at-a-time generation on the same prompts — run by hand, never in CI.

    python benchmarks/generation_batching.py [--n 64] [--batch-size 16] [--new-tokens 32]

Uses the profile's model (the stand-in on a CPU) and the course's test receipts (half image, half
text rows). Prints both timings and the ratio measured in this one run.

Measured on the 2-core CPU box, 2026-11-30 (``--profile cpu-tiny``, the defaults)::

    64 prompts, 32 new tokens each, profile cpu-tiny
    batched (batch 16): 3.7 s   one at a time: 51.2 s
    ratio: 13.90x faster batched; identical replies: 64/64
"""

from __future__ import annotations

import argparse
import time


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--profile", default="auto")
    args = parser.parse_args()

    from course_utils.chat import generate, generate_batch
    from course_utils.evaluate import prompts_of
    from course_utils.models import load
    from course_utils.receipts import load_local, mix_modalities

    loaded = load(args.profile)
    records = mix_modalities((load_local("test") + load_local("val"))[: args.n], 0.5, seed=0)
    prompts = prompts_of(records)
    generate_batch(loaded.model, loaded.processor, prompts[:2], max_new_tokens=2, progress=False)  # warm-up

    t0 = time.perf_counter()
    batched = generate_batch(
        loaded.model,
        loaded.processor,
        prompts,
        max_new_tokens=args.new_tokens,
        batch_size=args.batch_size,
        progress=False,
    )
    batched_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    single = [generate(loaded.model, loaded.processor, p, max_new_tokens=args.new_tokens) for p in prompts]
    single_s = time.perf_counter() - t0
    same = sum(a == b for a, b in zip(batched, single))
    print(f"{len(prompts)} prompts, {args.new_tokens} new tokens each, profile {loaded.profile.name}")
    print(f"batched (batch {args.batch_size}): {batched_s:.1f} s   one at a time: {single_s:.1f} s")
    print(f"ratio: {single_s / batched_s:.2f}x faster batched; identical replies: {same}/{len(prompts)}")


if __name__ == "__main__":
    main()
