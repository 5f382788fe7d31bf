"""Training throughput and peak memory — run by hand, never in CI.

    python benchmarks/train_throughput.py [--steps 30] [--batch-size 4]

On a CPU: tokens/s and peak RAM of the course's CPU path (transformers + peft, response-only loss on
the labelled positions) on the stand-in, plus the same run with a plain full-vocabulary loss, and
their ratio. On a CUDA GPU it also runs Unsloth's path on the profile's model and prints
Unsloth vs transformers+peft tokens/s as a ratio measured in this one run.

Measured on the 2-core CPU box (2026-11-30, defaults: 30 steps of 4 rows on ``cpu-tiny``, one process):

=================================================  ========  =========
run                                                tokens/s  seconds
=================================================  ========  =========
labelled-position loss, bf16 flag on (course)      1566      19.3
plain full-vocabulary loss, bf16 autocast          660       45.8
labelled-position loss, bf16 flag off              1499      20.2
plain full-vocabulary loss, fp32                   628       48.1
=================================================  ========  =========

One run each, in this order (the first in the process carries any warm-up). Both in fp32, the
labelled-position loss is **2.39× faster** (1499 against 628; lesson 04, 4.6). accelerate applies CPU
autocast by wrapping the model's ``forward``; the course's loss calls the model's parts, so its bf16 flag
changes nothing on the CPU path (1.04×, noise: it trains in fp32), and on the full-vocabulary loss, which
does call the forward, bf16 autocast is no faster than fp32 (1.05×). An earlier run (1420 / 678 / 1508)
compared the course path with the autocast full-vocabulary run (2.09×) and read 0.94× as "bf16 autocast
against fp32" — both of those rows were fp32. The peak-RAM figure it prints is the process's maximum so
far, so only the first run's is its own.
"""

from __future__ import annotations

import argparse
import gc
import time

import torch


def run_once(
    profile: str,
    steps: int,
    batch_size: int,
    selective_loss: bool,
    backend: str | None = None,
    bf16: bool | None = None,
) -> dict:
    import course_utils.train as train_module
    from course_utils.models import load
    from course_utils.receipts import load_local, mix_modalities
    from course_utils.train import build_trainer, make_callbacks, preset_for

    loaded = load(profile)
    records = mix_modalities(load_local("train")[: steps * batch_size], 0.5, seed=0)
    preset = preset_for(
        loaded.profile.name,
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        save_steps=10**6,
        logging_steps=max(1, steps // 3),
        **({} if bf16 is None else {"bf16": bf16}),
    )
    callbacks, history = make_callbacks(plot=False)
    original = train_module.response_only_loss
    if not selective_loss:  # the plain loss: logits for every position, then mask

        def full_vocab_loss(model, inputs, num_items_in_batch=None):
            out = model(**{k: v for k, v in inputs.items()})
            return out.loss

        train_module.response_only_loss = full_vocab_loss
    try:
        run = build_trainer(
            loaded.model,
            loaded.processor,
            records,
            None,
            preset,
            "/tmp/course-bench",
            backend=backend or loaded.backend,
            callbacks=callbacks,
            progress=False,
        )
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        run.trainer.train()
        seconds = time.perf_counter() - t0
    finally:
        train_module.response_only_loss = original
    tokens = run.trainer.state.num_input_tokens_seen
    last = history.history[-1]
    memory = {k: v for k, v in last.items() if k.startswith("peak")}
    del run, loaded
    gc.collect()
    return {"tokens_per_s": tokens / seconds, "seconds": seconds, **memory}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--profile", default="auto")
    args = parser.parse_args()
    torch.manual_seed(0)
    if torch.cuda.is_available():
        unsloth = run_once(args.profile, args.steps, args.batch_size, True, backend="unsloth")
        plain = run_once(args.profile, args.steps, args.batch_size, True, backend="transformers")
        print(
            f"Unsloth: {unsloth['tokens_per_s']:.0f} tok/s, "
            f"transformers+peft: {plain['tokens_per_s']:.0f} tok/s, "
            f"ratio {unsloth['tokens_per_s'] / plain['tokens_per_s']:.2f}x; peaks {unsloth} / {plain}"
        )
        return
    # accelerate applies CPU autocast by wrapping the model's forward: the full-vocabulary loss calls the
    # forward (bf16 runs autocast), the course's loss calls the model's parts (it runs fp32 either way)
    selective = run_once("cpu-tiny", args.steps, args.batch_size, True)
    full = run_once("cpu-tiny", args.steps, args.batch_size, False)
    fp32 = run_once("cpu-tiny", args.steps, args.batch_size, True, bf16=False)
    full32 = run_once("cpu-tiny", args.steps, args.batch_size, False, bf16=False)
    print(f"CPU path (labelled-position loss, bf16 flag): {selective['tokens_per_s']:.0f} tok/s, {selective}")
    print(f"plain full-vocabulary loss, bf16 autocast:    {full['tokens_per_s']:.0f} tok/s, {full}")
    print(f"labelled-position loss, bf16 off:             {fp32['tokens_per_s']:.0f} tok/s, {fp32}")
    print(f"plain full-vocabulary loss, fp32:             {full32['tokens_per_s']:.0f} tok/s, {full32}")
    print(
        f"ratio: {fp32['tokens_per_s'] / full32['tokens_per_s']:.2f}x faster with the labelled-position loss "
        "(both fp32)"
    )
    print(
        f"ratio: {selective['tokens_per_s'] / fp32['tokens_per_s']:.2f}x: the course's path with its bf16 "
        "flag against without (no autocast reaches it)"
    )
    autocast = full["tokens_per_s"] / full32["tokens_per_s"]
    print(f"ratio: {autocast:.2f}x: bf16 autocast against fp32 (full-vocabulary loss)")


if __name__ == "__main__":
    main()
