"""Q4_K_M in llama.cpp vs the same model in transformers, CPU, same prompts — run by hand, never in CI.

    python benchmarks/gguf_vs_transformers.py [--n 16] [--new-tokens 64] [--threads 1]

The model is lesson 04's adapter merged into the stand-in (or, if lesson 04 has not run, a stand-in
with a random LoRA adapter), exported to GGUF and quantized to Q4_K_M in a temporary folder. Both
sides decode greedily one prompt at a time (text rows of the test split, chat template applied) and
stop at the same token budget; tokens/s = generated tokens / wall time. Prints the ratio of this run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: cores - 1)")
    args = parser.parse_args()

    import torch

    from course_utils import export, gguf_export, gguf_verify
    from course_utils.models import load
    from course_utils.paths import outputs_dir
    from course_utils.receipts import load_local, mix_modalities

    torch.set_num_threads(max(1, torch.get_num_threads()))
    adapter = outputs_dir("cpu-tiny", "adapters") / "receipts-lora"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        loaded = load("cpu-tiny")
        if not (adapter / "adapter_model.safetensors").exists():
            from peft import LoraConfig, get_peft_model

            from course_utils.train import LANGUAGE_TARGETS

            peft_model = get_peft_model(loaded.model, LoraConfig(r=16, target_modules=LANGUAGE_TARGETS))
            peft_model.save_pretrained(tmp / "adapter")
            adapter, loaded = tmp / "adapter", load("cpu-tiny")
        merged = export.merge_adapter(loaded.model, loaded.processor, adapter, tmp / "merged")
        f16 = gguf_export.convert_to_gguf(merged, tmp / "m-f16.gguf", "f16")
        q4 = gguf_export.quantize(f16, tmp / "m-Q4_K_M.gguf", "Q4_K_M")

        from transformers import AutoModelForImageTextToText, AutoProcessor

        processor = AutoProcessor.from_pretrained(merged)
        model = AutoModelForImageTextToText.from_pretrained(merged, dtype=torch.float32).eval()
        records = mix_modalities(load_local("test"), 0.0, seed=0)[: args.n]  # text rows
        prompts = [
            processor.apply_chat_template(
                gguf_verify.as_parts(r["messages"][:-1]),
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
            )["input_ids"]
            for r in records
        ]

        def hf_one(ids):
            with torch.no_grad():
                out = model.generate(
                    input_ids=ids,
                    max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens,
                    do_sample=False,
                )
            return out.shape[1] - ids.shape[1]

        llm = gguf_verify.open_gguf(q4, n_ctx=1024, n_threads=args.threads)

        def cpp_one(ids):
            llm.reset()
            tokens = 0
            for _ in llm.generate(ids[0].tolist(), temp=0.0, reset=True):
                tokens += 1
                if tokens == args.new_tokens:
                    break
            return tokens

        hf_one(prompts[0]), cpp_one(prompts[0])  # warm-up
        results = {}
        for name, run in (("transformers fp32", hf_one), ("llama.cpp Q4_K_M", cpp_one)):
            t0 = time.perf_counter()
            tokens = sum(run(ids) for ids in prompts)
            seconds = time.perf_counter() - t0
            results[name] = tokens / seconds
            print(f"{name:18s} {tokens} tokens in {seconds:.2f} s = {tokens / seconds:,.0f} tokens/s")
        llm.close()
        print(
            f"{len(prompts)} prompts, {args.new_tokens} new tokens each, "
            f"Q4_K_M file {q4.stat().st_size / 2**20:.1f} MiB "
            f"vs f16 {f16.stat().st_size / 2**20:.1f} MiB"
        )
        print(
            f"ratio: llama.cpp Q4_K_M is {results['llama.cpp Q4_K_M'] / results['transformers fp32']:.2f}x "
            "the tokens/s of transformers"
        )


if __name__ == "__main__":
    main()
