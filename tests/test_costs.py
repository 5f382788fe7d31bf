import json
import subprocess
import sys

import pytest

from course_utils.costs import (
    CPU,
    CPU_SECONDS,
    CPU_TOKENS,
    GPUS,
    PRICES,
    QWEN14B_SECONDS_PER_STEP,
    DoesNotFit,
    PlanError,
    check_article_claim,
    measure_tokens_per_row,
    mfu,
    plan_training,
    throughput_check,
)


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "course_utils", "plan", *args], capture_output=True, text=True, timeout=300
    )


def qwen_mfu(method, length):
    """MFU of one published Qwen-14B point, by hand: 8 sequences per step, 6 FLOPs/param/token, A100."""
    seconds = QWEN14B_SECONDS_PER_STEP[method][length]
    return 8 * length / seconds * 6 * 14e9 / 312e12


def test_hours_and_cost_are_tokens_times_epochs_over_speed_times_price():
    plan = plan_training(
        "mistral-small-3.2",
        "A100-80GB",
        3000,
        tokens_per_row=500,
        epochs=2,
        tokens_per_second=1000,
        price_per_hour=2.5,
    )
    hours = 3000 * 500 * 2 / 1000 / 3600  # 0.8333 h
    assert plan.training_tokens == 3_000_000
    assert plan.hours == pytest.approx(hours)
    assert plan.cost_usd == pytest.approx(hours * 2.5)
    assert plan.price_source == "your price"
    assert any("0.83 h" in line for line in plan.arithmetic)  # the arithmetic is shown, not just the result


def test_several_gpus_divide_the_hours_and_multiply_the_price():
    one = plan_training("mistral-small-3.2", "H100-80GB", tokens=2e6, tokens_per_second=1500)
    two = plan_training("mistral-small-3.2", "H100-80GB", tokens=2e6, tokens_per_second=1500, gpus=2)
    assert two.hours == pytest.approx(one.hours / 2)
    assert two.cost_usd == pytest.approx(one.cost_usd)  # linear scaling: same GPU-hours
    assert one.usd_per_hour == PRICES["H100-80GB"][0].usd_per_hour


def test_mfu_is_read_off_the_published_qwen_speeds():
    for method in ("qlora", "lora"):
        for length in (256, 1024, 4096):
            assert mfu(method, length) == pytest.approx(qwen_mfu(method, length))
    # halfway between 512 and 1024 tokens in log2 is the mean of the two MFUs
    assert mfu("qlora", 2**9.5) == pytest.approx((qwen_mfu("qlora", 512) + qwen_mfu("qlora", 1024)) / 2)
    assert mfu("qlora", 10) == pytest.approx(qwen_mfu("qlora", 256))  # held at the ends
    assert mfu("qlora", 10**6) == pytest.approx(qwen_mfu("qlora", 8192))
    assert mfu("qlora", 2048) < mfu("lora", 2048)  # dequantising the base costs time
    with pytest.raises(ValueError, match="qlora and lora"):
        mfu("full", 2048)


def test_derived_speed_by_hand_for_small_3_2_on_an_a100():
    # 2 rows of >= 2048 tokens per micro-batch are capped at seq 2048: 4096 tokens per micro-batch
    plan = plan_training("mistral-small-3.2", "A100-80GB", 1000, tokens_per_row=3000, price_per_hour=2)
    rate = 312e12 * qwen_mfu("qlora", 4096) / (6 * 24e9)
    assert plan.tokens_per_second == pytest.approx(rate)
    assert plan.hours == pytest.approx(1000 * 3000 / rate / 3600)
    assert "derived" in plan.throughput_source and "Qwen" in plan.throughput_source
    h100 = plan_training("mistral-small-3.2", "H100-80GB", 1000, tokens_per_row=3000)
    assert h100.tokens_per_second / plan.tokens_per_second == pytest.approx(989 / 312)


def test_the_cpu_figure_is_the_courses_measurement():
    plan = plan_training("tiny-mistral-small-3", CPU, 600, tokens_per_row=258.4)
    assert plan.tokens_per_second == pytest.approx(CPU_TOKENS / CPU_SECONDS)
    assert plan.cost_usd == 0 and "measured by the course" in plan.throughput_source


def test_the_cpu_figure_matches_the_committed_reference_run():
    """The constant is the reference run's throughput — the one lesson 04's committed output shows — not a
    run on a busier machine."""
    import ast
    from pathlib import Path

    lesson_04 = Path(__file__).resolve().parents[1] / "notebooks" / "04_qlora_training.ipynb"
    notebook = json.loads(lesson_04.read_text())
    shown = [
        ast.literal_eval(line)
        for cell in notebook["cells"]
        for output in cell.get("outputs", [])
        for line in "".join(output.get("text", "")).splitlines()
        if line.startswith("{'step'") and "tokens_per_s" in line
    ]
    assert shown, "lesson 04's committed outputs no longer show the throughput history"
    assert shown[-1]["num_input_tokens_seen"] == CPU_TOKENS
    assert CPU_TOKENS / CPU_SECONDS == pytest.approx(shown[-1]["tokens_per_s"], rel=0.05)


def test_a_run_that_does_not_fit_is_refused_with_what_would_fit():
    with pytest.raises(DoesNotFit) as refused:
        plan_training("mistral-small-3.2", "L4", 3000, tokens_per_row=300, method="lora")
    message = str(refused.value)
    assert f"{GPUS['L4'].memory_gib:.1f} GiB" in message and "1× A100-80GB" in message
    # Small 4 with its 3-D experts left 16-bit (transformers' plain 4-bit loading) needs several cards
    with pytest.raises(DoesNotFit, match="H200"):
        plan_training("mistral-small-4", "A100-80GB", 3000, tokens_per_row=300, quantize_moe_experts=False)


def test_small_4_fits_one_80gb_card_only_with_axolotls_recipe():
    plan = plan_training("mistral-small-4", "A100-80GB", 3000, tokens_per_row=300)
    assert plan.backend == "transformers" and plan.lora_r == 32 and plan.batch_size == 1
    assert 60 < plan.peak_gib_per_gpu < GPUS["A100-80GB"].memory_gib  # axolotl measured ~68 GiB
    alternative = next(n for n in plan.notes if "without quantize_moe_experts" in n)
    assert "2× H200" in alternative and "$" in alternative
    assert any("MoE" in n for n in plan.notes)


def test_bad_input_is_a_plan_error():
    with pytest.raises(PlanError, match="choose one of: .*A100-80GB"):
        plan_training("mistral-small-3.2", "A10G", 3000, tokens_per_row=100)
    with pytest.raises(PlanError, match="unknown model"):
        plan_training("gpt-5", "L4", 3000, tokens_per_row=100)
    with pytest.raises(PlanError, match="CPU"):
        plan_training("mistral-small-3.2", CPU, 3000, tokens_per_row=100)
    with pytest.raises(PlanError, match="rows"):
        plan_training("mistral-small-3.2", "L4")
    with pytest.raises(PlanError, match="> 0"):
        plan_training("mistral-small-3.2", "L4", 10, tokens_per_row=-1)


@pytest.mark.parametrize(
    "hours, verdict", [(0.5, "overstated"), (5, "holds"), (20, "holds"), (30, "understated")]
)
def test_the_article_claim_verdict_follows_the_arithmetic(hours, verdict):
    # 3000 rows x 1000 tokens at a speed chosen so the run takes `hours`
    rate = 3000 * 1000 / hours / 3600
    plan = plan_training("mistral-small-3.2", "A100-80GB", 3000, tokens_per_row=1000, tokens_per_second=rate)
    lines = check_article_claim(plan)
    assert lines[-1].split()[1] == verdict
    assert f"${2 * hours:.2f}–{4 * hours:.2f}" in "\n".join(lines)


def test_the_published_runs_check_the_derivation():
    rows = {row["run"].split(",")[0]: row for row in throughput_check()}
    assert abs(rows["Qwen-72B Q-LoRA"]["error_pct"]) < 5  # the 14B-derived MFU predicts the 72B run
    assert all(isinstance(row["error_pct"], float) for row in rows.values())


def test_tokens_per_row_are_measured_with_the_real_tokenizer(processor):
    from course_utils.data import count_tokens
    from course_utils.receipts import load_local, local_dir, mix_modalities

    text_only = measure_tokens_per_row("tiny-mistral-small-3", image_fraction=0.0)
    records = mix_modalities(load_local("train"), 0.0, seed=0)
    assert text_only.rows == len(records) == 600
    assert text_only.tokens == sum(count_tokens(r, processor, local_dir()) for r in records)
    mixed = measure_tokens_per_row("mistral-small-3.2")  # half image rows at Small 3.2's image grid
    assert mixed.rows == 600 and "Tekken" in mixed.source
    assert 100 < mixed.per_row < mixed.max_tokens <= 2048


def test_cli_prints_hours_dollars_and_the_verdict():
    out = run_cli(
        "--model", "mistral-small-3.2", "--rows", "3000", "--gpu", "A100-80GB", "--tokens-per-row", "240"
    )
    assert out.returncode == 0, out.stderr
    assert " h × 1 GPU × $1.39/h = $" in out.stdout and "TFLOPS × MFU" in out.stdout
    assert "verdict" in out.stdout and "$10–50" in out.stdout
    data = json.loads(
        run_cli("--model", "mistral-small-4", "--tokens", "1e6", "--gpu", "H200", "--json").stdout
    )
    assert data["plans"][0]["gpu"] == "H200" and data["plans"][0]["cost_usd"] > 0


def test_cli_refuses_and_rejects_with_one_line():
    refused = run_cli(
        "--model",
        "mistral-small-3.2",
        "--rows",
        "10",
        "--tokens-per-row",
        "99",
        "--gpu",
        "T4",
        "--method",
        "lora",
    )
    assert refused.returncode == 1 and "does not fit" in refused.stdout
    for args in (("--model", "mistral-small-3.2", "--gpu", "A10G"), ("--model", "gpt-5", "--gpu", "L4")):
        bad = run_cli(*args, "--rows", "10", "--tokens-per-row", "99")
        assert bad.returncode == 2 and bad.stdout == ""
        assert len(bad.stderr.strip().splitlines()) == 1 and "choose one of" in bad.stderr
        assert "Traceback" not in bad.stderr


def test_a_profile_brings_its_method_backend_and_preset():
    from course_utils.profiles import PROFILES
    from course_utils.train import PRESETS

    plan = plan_training("mistral-small-3.2", "A100-80GB", 3000, tokens_per_row=240, profile="gpu-80gb")
    preset = PRESETS["gpu-80gb"]
    assert (plan.method, plan.backend) == (PROFILES["gpu-80gb"].method, PROFILES["gpu-80gb"].backend)
    assert (plan.batch_size, plan.seq_len, plan.lora_r) == (
        preset.per_device_train_batch_size,
        preset.max_seq_length,
        preset.lora_r,
    )
    with pytest.raises(PlanError, match="trains mistral-small-3.2, not ministral-3-8b"):
        plan_training("ministral-3-8b", "H200", 3000, tokens_per_row=240, profile="gpu-80gb")


def test_every_gpu_and_price_carries_a_source():
    for name, gpu in GPUS.items():
        assert "https://" in gpu.source and gpu.peak_tflops > 0 and gpu.memory_gib > 0, name
        assert PRICES[name] and all(p.source.startswith("https://") and p.as_of for p in PRICES[name]), name


@pytest.mark.parametrize(
    "field", ["epochs", "tokens_per_row", "tokens", "price_per_hour", "tokens_per_second"]
)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_and_infinity_are_plan_errors_not_nan_dollars(field, value):
    kwargs = dict(tokens_per_row=500.0)
    if field == "tokens":
        kwargs = dict(tokens=value)
    else:
        kwargs[field] = value
    with pytest.raises(PlanError, match=field.replace("_", "[-_]")):
        plan_training("mistral-small-3.2", "L4", 1000, **kwargs)


def test_small_4_plans_on_the_rung_that_holds_it_with_its_own_recipe():
    plan = plan_training("mistral-small-4", "H100-80GB", 1000, tokens_per_row=500.0, profile="gpu-80gb")
    assert (plan.method, plan.backend, plan.lora_r, plan.seq_len) == ("qlora", "transformers", 32, 2048)
    with pytest.raises(PlanError, match="gpu-24gb cannot hold mistral-small-4.*gpu-80gb"):
        plan_training("mistral-small-4", "L4", 1000, tokens_per_row=500.0, profile="gpu-24gb")


def test_numpy_numbers_are_numbers_to_the_planner():
    import numpy as np

    plan = plan_training(
        "mistral-small-3.2", "L4", 1000, tokens_per_row=np.float64(500.0), epochs=np.int64(2)
    )
    assert plan.hours > 0
    with pytest.raises(PlanError, match="epochs"):
        plan_training("mistral-small-3.2", "L4", 1000, tokens_per_row=500.0, epochs=True)
