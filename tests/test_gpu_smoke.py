"""benchmarks/gpu_smoke.py without a GPU: the dry-run plan, its refusals, and its pure helpers."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from course_utils.profiles import MODELS

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_smoke.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_smoke", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_smoke"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


smoke = _load_script()


def run_script(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **(env or {})},
        timeout=240,
    )


def output_lines(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]


def dense_layer_parameters(key: str) -> int:
    """One GQA decoder layer from the config numbers: q/o (h × heads·d), k/v (h × kv·d), gate/up/down
    (h × i) and two RMSNorm weights."""
    s = MODELS[key]
    q, kv = s.num_attention_heads * s.head_dim, s.num_key_value_heads * s.head_dim
    return (
        2 * s.hidden_size * q
        + 2 * s.hidden_size * kv
        + 3 * s.hidden_size * s.intermediate_size
        + 2 * s.hidden_size
    )


def mla_moe_layer_parameters(key: str) -> int:
    """One Small 4 layer: MLA (q_a, q_b, kv_a with the RoPE part, kv_b, o + two latent norms), the router,
    128 routed experts and the shared one (gate, up, down of width i each), two RMSNorm weights."""
    s = MODELS[key]
    h, heads, i = s.hidden_size, s.num_attention_heads, s.intermediate_size
    attention = (
        h * s.q_lora_rank
        + s.q_lora_rank
        + s.q_lora_rank * heads * (s.qk_nope_head_dim + s.qk_rope_head_dim)
        + h * (s.kv_lora_rank + s.qk_rope_head_dim)
        + s.kv_lora_rank
        + s.kv_lora_rank * heads * (s.qk_nope_head_dim + s.v_head_dim)
        + heads * s.v_head_dim * h
    )
    experts = s.num_experts * 3 * h * i + s.num_experts * h + s.shared_experts * 3 * h * i
    return attention + experts + 2 * h


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dry-run") / "report.json"
    done = run_script("--dry-run", "--out", str(out))
    return done, out


def test_dry_run_prints_the_plan_with_parameter_counts_from_the_configs(dry_run):
    dry_run, out = dry_run
    assert not out.exists()  # a plan writes nothing
    assert dry_run.returncode == 0, dry_run.stderr[-2000:]
    assert "Traceback" not in dry_run.stdout + dry_run.stderr
    for stage in smoke.STAGES:
        assert re.search(rf"^\s+{re.escape(stage)}\s", dry_run.stdout, re.M), stage
    per_layer = {
        "mistral-small-3.2": dense_layer_parameters("mistral-small-3.2"),
        "ministral-3-8b": dense_layer_parameters("ministral-3-8b"),
        "mistral-small-4": mla_moe_layer_parameters("mistral-small-4"),
    }
    assert per_layer["mistral-small-3.2"] == 555_755_520  # 52,428,800 attention + 503,316,480 MLP + norms
    for key, count in per_layer.items():
        block = dry_run.stdout.split(f"model {key}:")[1].split("[gpu-smoke]")[0]
        assert f"per decoder layer: {count:,}" in block, (key, block)
        assert (
            f"{smoke.SMOKE_LAYERS[key]} of {MODELS[key].num_layers} layers"
            in dry_run.stdout.split(f"model {key}:")[1].splitlines()[0]
        )
        # the built widths, taken to the full depth, give the size the model card publishes (±3 %)
        full, registry = re.search(r"at full depth: ([\d.]+)B \(registry: ([\d.]+)B\)", block).groups()
        assert abs(float(full) - float(registry)) / float(registry) < 0.03, (key, full, registry)
        assert (
            len(re.findall(r"VRAM planner, (unsloth|peft)\s+at 2048 tokens: full depth [\d.]+ GiB", block))
            == 2
        )


def test_the_plan_sizes_the_models_the_chosen_stages_need():
    assert smoke.models_for(("build",)) == list(smoke.SMOKE_LAYERS)
    assert smoke.models_for(("export", "train-peft:mistral-small-4")) == [
        "mistral-small-3.2",
        "mistral-small-4",
    ]


def test_without_a_gpu_it_exits_2_with_one_line(tmp_path):
    out = tmp_path / "report.json"
    done = run_script("--out", str(out))
    lines = output_lines(done)
    assert done.returncode == 2
    assert len(lines) == 1, lines
    assert "CUDA" in lines[0] and "--dry-run" in lines[0]
    assert "Traceback" not in done.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    "args, words",
    [
        (["--stages", "build,trian-peft:mistral-small-3.2"], ["trian-peft:mistral-small-3.2", "--stages"]),
        (["--stages", "train-peft"], ["'train-peft'", "choose from"]),
        (["--steps", "1"], ["--steps", "at least 2"]),
        (["--bogus"], ["--bogus"]),
    ],
)
def test_bad_arguments_exit_2_with_one_clear_line(args, words):
    done = run_script(*args)
    lines = output_lines(done)
    assert done.returncode == 2
    assert len(lines) == 1, lines
    assert "Traceback" not in done.stderr
    for word in words:
        assert word in lines[0]


def test_an_existing_report_is_not_overwritten(tmp_path):
    out = tmp_path / "report.json"
    out.write_text("{}")
    done = run_script("--out", str(out))
    assert done.returncode == 2
    assert output_lines(done) == [f"gpu_smoke.py: error: {out} exists; pass --overwrite or another --out"]
    assert out.read_text() == "{}"


# --- Pure helpers ----------------------------------------------------------------------------------


def test_parse_stages_keeps_run_order_and_rejects_unknown_names():
    assert smoke.parse_stages(None) == smoke.STAGES
    assert smoke.parse_stages("all") == smoke.STAGES
    assert smoke.parse_stages("export, build") == ("build", "export")  # run order, not typed order
    with pytest.raises(smoke.UsageError, match="'nope'"):
        smoke.parse_stages("build,nope")


def test_stage_parts():
    assert smoke.stage_parts("train-unsloth:mistral-small-4") == ("train", "unsloth", "mistral-small-4")
    assert smoke.stage_parts("export") == ("export", None, None)


def test_extrapolation_to_full_depth_by_hand():
    # 10 GiB measured with 3 of 40 layers, 0.5 GiB per layer: 10 + 37 × 0.5 = 28.5 GiB
    assert smoke.extrapolate_to_full_depth(10 * smoke.GiB, 3, 40, 0.5 * smoke.GiB) == 28.5 * smoke.GiB
    assert smoke.extrapolate_to_full_depth(7.0, 36, 36, 123.0) == 7.0  # already full depth
    with pytest.raises(ValueError):
        smoke.extrapolate_to_full_depth(1.0, 5, 4, 1.0)
    with pytest.raises(ValueError):
        smoke.extrapolate_to_full_depth(1.0, 0, 4, 1.0)


def test_relative_error_and_steady_throughput_by_hand():
    assert smoke.relative_error_pct(12.0, 10.0) == pytest.approx(20.0)
    assert smoke.relative_error_pct(8.0, 10.0) == pytest.approx(-20.0)
    steps = [{"seconds": 5.0, "tokens": 10}, {"seconds": 1.0, "tokens": 100}, {"seconds": 1.0, "tokens": 300}]
    assert smoke.steady_tokens_per_s(steps) == 200.0  # the first (compiling) step left out: 400 / 2
    assert smoke.steady_tokens_per_s(steps[:1]) == 2.0  # one step: nothing to leave out


def test_backend_ratios_by_hand():
    unsloth = {
        "tokens_per_s": 300.0,
        "seconds_per_step": 0.5,
        "peak_reserved_gib": 6.0,
        "full_depth": {"extrapolated_gib": 18.0},
    }
    peft = {"tokens_per_s": 100.0, "seconds_per_step": 1.5, "peak_reserved_gib": 12.0, "full_depth": None}
    assert smoke.backend_ratios(unsloth, peft) == {
        "speedup_tokens_per_s": 3.0,
        "time_per_step_peft_over_unsloth": 3.0,
        "peak_reserved_unsloth_over_peft": 0.5,
        "full_depth_unsloth_over_peft": None,
    }


def test_interleaved_rows_give_every_batch_of_two_an_image_and_a_text_row():
    rows = [{"id": i, "images": [f"{i}.png"]} for i in range(6)]
    mixed = smoke.interleave_modalities(rows, lambda r: {"id": r["id"], "images": []})
    assert [r["id"] for r in mixed] == list(range(6))
    for start in range(0, 6, 2):
        assert sorted(bool(r["images"]) for r in mixed[start : start + 2]) == [False, True]


def test_smoke_recipe_has_the_registry_widths_at_reduced_depth():
    small3 = smoke.smoke_recipe("mistral-small-3.2")
    assert small3.text["hidden_size"] == 5120 and small3.text["intermediate_size"] == 32768
    assert (small3.text["num_attention_heads"], small3.text["num_key_value_heads"]) == (32, 8)
    assert small3.text["vocab_size"] == 131072 and small3.text["num_hidden_layers"] == 3
    assert small3.vision == smoke.PIXTRAL_VISION
    small4 = smoke.smoke_recipe("mistral-small-4", layers=2)
    assert small4.text["model_type"] == "mistral4" and small4.text["num_hidden_layers"] == 2
    assert (small4.text["n_routed_experts"], small4.text["num_experts_per_tok"]) == (128, 4)
    assert small4.text["kv_lora_rank"] == 256 and small4.chat_format == "v15"  # the stand-in's format
    assert smoke.smoke_recipe("ministral-3-8b").text["model_type"] == "ministral3"


def test_layer_memory_counts_weights_gradients_and_optimizer_state():
    layers = torch.nn.ModuleList([torch.nn.Linear(4, 4, bias=False), torch.nn.Linear(4, 4, bias=False)])
    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.language_model = torch.nn.Module()
    model.model.language_model.layers = layers
    layers[0].weight.requires_grad_(False)
    trained = layers[1].weight  # 16 fp32 values: 64 bytes
    optimizer = SimpleNamespace(
        optimizer=SimpleNamespace(
            state={trained: {"exp_avg": torch.zeros(16), "exp_avg_sq": torch.zeros(16)}}
        )
    )
    # frozen: its 64 bytes; trained: 64 weight + 64 gradient + 2 × 64 moments = 256
    assert smoke.layer_memory_bytes(model, optimizer) == [64, 256]
    assert smoke.experts_quantized(model)  # dense: nothing to quantize


def test_quant_state_bytes_include_the_nested_scales():
    nested = SimpleNamespace(absmax=torch.zeros(2), code=torch.zeros(256), offset=None, state2=None)
    state = SimpleNamespace(absmax=torch.zeros(8, dtype=torch.uint8), code=torch.zeros(16), state2=nested)
    assert smoke.quant_state_bytes(state) == 8 + 64 + (8 + 1024)


def test_processor_files_leave_the_model_behind(tmp_path):
    for name in ("config.json", "generation_config.json", "model.safetensors", "course_stand_in.json"):
        (tmp_path / name).write_text("x")
    for name in ("tokenizer.json", "processor_config.json", "chat_template.jinja", "tekken.json"):
        (tmp_path / name).write_text("x")
    assert [f.name for f in smoke.processor_files(tmp_path)] == [
        "chat_template.jinja",
        "processor_config.json",
        "tekken.json",
        "tokenizer.json",
    ]


@pytest.mark.slow
def test_ensure_model_builds_bf16_weights_with_the_stand_in_processor_and_reuses_them(tmp_path, monkeypatch):
    from transformers import AutoConfig

    import course_utils.tiny as tiny

    family = tiny.RECIPES["tiny-mistral-small-3"]
    stand_in = tmp_path / "stand-in"  # what build_stand_in leaves: model, processor files, build record
    stand_in.mkdir()
    processor = {"tokenizer.json": "{tok}", "chat_template.jinja": "{{ bos }}", "processor_config.json": "{}"}
    for name, text in {**processor, "config.json": "{}", "model.safetensors": "w"}.items():
        (stand_in / name).write_text(text)
    (stand_in / tiny.BUILD_INFO_FILE).write_text(json.dumps({"fingerprint": "f1"}))
    monkeypatch.setattr(tiny, "build_stand_in", lambda name: stand_in)
    recipe = replace(family, name="smoke-test-1l", text={**family.text, "num_hidden_layers": 1})
    monkeypatch.setattr(smoke, "smoke_recipe", lambda key, layers=None: recipe)

    target, built = smoke.ensure_model("mistral-small-3.2", tmp_path / "work", device="cpu")
    assert built and target == tmp_path / "work" / "models" / "smoke-test-1l"
    config = AutoConfig.from_pretrained(target)  # the model's own config, not the stand-in's
    assert config.text_config.num_hidden_layers == 1 and str(config.dtype).endswith("bfloat16")
    assert config.text_config.hidden_size == family.text["hidden_size"]
    assert {name: (target / name).read_text() for name in processor} == processor
    assert json.loads((target / tiny.BUILD_INFO_FILE).read_text())["stand_in"] == "stand-in"

    assert smoke.ensure_model("mistral-small-3.2", tmp_path / "work", device="cpu") == (target, False)
    monkeypatch.setattr(smoke, "smoke_recipe", lambda key, layers=None: replace(recipe, seed=7))
    assert smoke.ensure_model("mistral-small-3.2", tmp_path / "work", device="cpu") == (target, True)
    (stand_in / tiny.BUILD_INFO_FILE).write_text(json.dumps({"fingerprint": "f2"}))  # a rebuilt stand-in
    assert smoke.ensure_model("mistral-small-3.2", tmp_path / "work", device="cpu") == (target, True)


def test_merge_deltas_compare_the_updates_of_two_merges(tmp_path):
    from safetensors.torch import save_file

    name = "model.language_model.layers.0.self_attn.q_proj.weight"
    base = torch.ones(4, 4)
    update = torch.arange(16, dtype=torch.float32).reshape(4, 4) / 100
    for folder, tensor in {
        "base": base,
        "a": base + update,
        "b": base + 2 * update,
        "c": base - update,
    }.items():
        (tmp_path / folder).mkdir()
        save_file(
            {name: tensor, "lm_head.weight": tensor.clone()}, str(tmp_path / folder / "model.safetensors")
        )
    same_direction = smoke.merge_deltas(tmp_path / "base", tmp_path / "a", tmp_path / "b")
    assert same_direction["compared"] == 1  # lm_head is not a decoder projection
    assert same_direction["tensors"][0]["cosine"] == pytest.approx(1.0, abs=1e-4)
    assert same_direction["tensors"][0]["norm_ratio"] == pytest.approx(0.5, abs=1e-4)
    opposite = smoke.merge_deltas(tmp_path / "base", tmp_path / "a", tmp_path / "c")
    assert opposite["tensors"][0]["cosine"] == pytest.approx(-1.0, abs=1e-4)


def test_a_stage_past_its_time_is_stopped_and_recorded_as_failed(tmp_path):
    record = smoke.run_stage_process("build", tmp_path, 2, timeout=0.5)
    assert record["status"] == "failed" and "timed out after" in record["error"]
    assert record["result"] == {}
    assert not (tmp_path / "stage-results" / "build.json").exists()  # stopped before it could write


def test_summary_pairs_the_two_backends_of_a_model():
    unsloth = {"tokens_per_s": 200.0, "seconds_per_step": 1.0, "peak_reserved_gib": 3.0, "full_depth": None}
    peft = {"tokens_per_s": 100.0, "seconds_per_step": 2.0, "peak_reserved_gib": 6.0, "full_depth": None}
    records = [
        {"name": "train-unsloth:mistral-small-3.2", "status": "ok", "result": unsloth},
        {"name": "train-peft:mistral-small-3.2", "status": "ok", "result": peft},
        {"name": "train-unsloth:mistral-small-4", "status": "ok", "result": unsloth},
        {"name": "train-peft:mistral-small-4", "status": "failed", "result": {}},
    ]
    ratios = smoke.summarize(records)["unsloth_vs_peft"]
    assert list(ratios) == ["mistral-small-3.2"]  # Small 4's peft run failed: no pair
    assert ratios["mistral-small-3.2"]["speedup_tokens_per_s"] == 2.0
    assert ratios["mistral-small-3.2"]["peak_reserved_unsloth_over_peft"] == 0.5


def test_the_activation_probe_records_the_forward_pass_not_the_recomputation():
    allocated = {"bytes": 0}

    class Layer(torch.nn.Module):
        def __init__(self, keeps):
            super().__init__()
            self.keeps = keeps

        def forward(self, x):
            allocated["bytes"] += self.keeps  # what the layer leaves allocated for its backward
            return x

    class LanguageModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([Layer(100), Layer(300)])

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.language_model = LanguageModel()
    probe = smoke.LayerActivationProbe(model, memory_allocated=lambda: allocated["bytes"])
    model.model.language_model(torch.zeros(1))
    model.model.language_model.layers[1](torch.zeros(1))  # a checkpoint recomputation: not a forward pass
    with torch.no_grad():
        model.model.language_model(torch.zeros(1))  # generation / evaluation: nothing kept, not recorded
    assert probe.per_forward == [200.0]  # (100 + 300) / 2 layers
    probe.close()
    model.model.language_model(torch.zeros(1))
    assert probe.per_forward == [200.0]  # hooks removed


def test_the_ministral_smoke_model_runs_a_forward_pass():
    """The H200 run (2026-11-29) failed train-peft:ministral-3-8b in its first step: the recipe kept the
    Small 3 family's RoPE settings, and Ministral 3's attention divides by the YaRN window it lacked."""
    from transformers import AutoConfig, AutoModelForCausalLM

    text = dict(smoke.smoke_recipe("ministral-3-8b", layers=1).text)
    text.update(vocab_size=512, hidden_size=64, intermediate_size=128, head_dim=16)
    text.update(num_attention_heads=4, num_key_value_heads=2)
    config = AutoConfig.for_model(text.pop("model_type"), **text)
    model = AutoModelForCausalLM.from_config(config)
    logits = model(input_ids=torch.tensor([[1, 5, 9, 2]])).logits
    assert logits.shape == (1, 4, 512) and torch.isfinite(logits).all()
    assert config.rope_parameters["original_max_position_embeddings"] == 16384  # the real 2512 config's


def test_merge_deltas_cosine_stays_within_one_on_large_tensors(tmp_path):
    """The H200 run reported cosines of 1.0076-1.0264 between two merges: float32 sums over 167M
    elements drift; the comparison now accumulates in float64."""
    from safetensors.torch import save_file

    name = "model.language_model.layers.0.mlp.up_proj.weight"
    generator = torch.Generator().manual_seed(0)
    base = torch.zeros(4096, 4096)
    update = torch.randn(4096, 4096, generator=generator) * 1e-3
    for folder, tensor in {"base": base, "a": base + update, "b": base + 1.0001 * update}.items():
        (tmp_path / folder).mkdir()
        save_file({name: tensor}, str(tmp_path / folder / "model.safetensors"))
    cosine = smoke.merge_deltas(tmp_path / "base", tmp_path / "a", tmp_path / "b")["tensors"][0]["cosine"]
    assert 0.9999 <= cosine <= 1.0
