import pytest
from conftest import gpu

from course_utils.profiles import MODELS, PROFILES, model_spec, pick_profile, resolve_profile


@pytest.mark.parametrize(
    "accelerator, vram, expected",
    [
        ("cpu", None, "cpu-tiny"),
        ("mps", None, "cpu-tiny"),
        ("cuda", 8.0, "cpu-tiny"),  # too small for any GPU rung: the stand-in, not a crash
        ("cuda", 15.0, "t4-16gb"),  # a T4 reports ~14.7 GiB
        ("cuda", 23.6, "gpu-24gb"),  # RTX 4090 / L4
        ("cuda", 39.4, "gpu-24gb"),
        ("cuda", 79.2, "gpu-80gb"),  # A100/H100 80 GB
        ("cuda", 139.8, "gpu-80gb"),  # H200
    ],
)
def test_auto_picks_the_largest_rung_that_fits(accelerator, vram, expected):
    assert pick_profile(accelerator, vram) == expected


def test_env_var_overrides_auto_but_not_an_explicit_choice(monkeypatch, cpu_hardware):
    monkeypatch.setenv("COURSE_PROFILE", "gpu-24gb")
    assert resolve_profile("auto", hardware=cpu_hardware).name == "gpu-24gb"
    assert resolve_profile("t4-16gb", hardware=cpu_hardware).name == "t4-16gb"
    monkeypatch.setenv("COURSE_PROFILE", "")
    assert resolve_profile("auto", hardware=gpu(80)).name == "gpu-80gb"


def test_unknown_profile_lists_the_valid_ones(monkeypatch, cpu_hardware):
    monkeypatch.setenv("COURSE_PROFILE", "gpu-12gb")
    with pytest.raises(ValueError, match=r"COURSE_PROFILE.*cpu-tiny, t4-16gb, gpu-24gb, gpu-80gb"):
        resolve_profile("auto", hardware=cpu_hardware)


def test_kv_cache_per_token_gqa_vs_mla():
    # Small 3.2: 40 layers x (K and V) x 8 kv heads x 128 dims x 2 bytes
    assert model_spec("mistral-small-3.2").kv_cache_bytes_per_token() == 40 * 2 * 8 * 128 * 2 == 163840
    # Small 4: 36 layers x (256 latent + 64 rope key) x 2 bytes — 7x less per token than Small 3.2
    assert model_spec("mistral-small-4").kv_cache_bytes_per_token() == 36 * (256 + 64) * 2 == 23040
    # 128k tokens of Small 3.2 cache in 16-bit is 20 GiB
    assert model_spec("mistral-small-3.2").kv_cache_bytes_per_token() * 131072 / 1024**3 == 20.0


def test_ladder_facts_are_the_honest_ones():
    small4, small32 = MODELS["mistral-small-4"], MODELS["mistral-small-3.2"]
    assert (small4.total_params_b, small4.active_params_b, small4.attention) == (119.0, 6.5, "MLA")
    assert (small4.num_experts, small4.experts_per_token, small4.context_length) == (128, 4, 262144)
    assert (small32.total_params_b, small32.attention, small32.context_length) == (24.0, "GQA", 131072)
    assert small32.num_attention_heads // small32.num_key_value_heads == 4
    assert small4.ollama_tags == ()  # no official tag yet
    assert all(MODELS[p.model_key] for p in PROFILES.values() if not p.is_stand_in)


def test_unknown_model_key_names_the_known_ones():
    with pytest.raises(KeyError, match="mistral-small-3.2"):
        model_spec("mistral-small-24b")


def test_weights_size_scales_with_precision():
    spec = model_spec("mistral-small-3.2")
    assert spec.weights_gib(16) == pytest.approx(24e9 * 2 / 1024**3)
    assert spec.weights_gib(4.5) < spec.weights_gib(8) < spec.weights_gib(16)


def test_auto_needs_the_detected_hardware_and_profiles_import_no_hardware_code(monkeypatch):
    import ast
    import inspect

    import course_utils.profiles as profiles

    monkeypatch.delenv("COURSE_PROFILE", raising=False)
    with pytest.raises(ValueError, match="hardware=detect"):
        resolve_profile("auto")
    assert resolve_profile("t4-16gb").name == "t4-16gb"  # a name needs no detection
    imported = {
        node.module
        for node in ast.walk(ast.parse(inspect.getsource(profiles)))
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert "course_utils.hardware" not in imported  # one direction only: hardware imports profiles


def test_fsdp_ranks_load_a_16_bit_checkpoint_bitsandbytes_can_quantize():
    # the Unsloth rungs load pre-quantized (gpu-24gb) or FP8 (t4-16gb) checkpoints: transformers keeps a
    # checkpoint's own quantization (bnb_4bit_quant_storage=bf16, which FSDP needs, would be dropped) and
    # refuses a BitsAndBytesConfig over FP8 — so the FSDP ranks load the 16-bit release instead
    from course_utils.profiles import PROFILES, fsdp_profile, profile_for_model

    for name in ("t4-16gb", "gpu-24gb", "gpu-80gb"):
        switched = fsdp_profile(PROFILES[name])
        assert switched.backend == "transformers" and switched.model_key == PROFILES[name].model_key
        assert "bnb-4bit" not in switched.load_id and "unsloth/" not in switched.load_id
    assert fsdp_profile(PROFILES["t4-16gb"]).load_id == "mistralai/Ministral-3-8B-Instruct-2512-BF16"
    assert fsdp_profile(PROFILES["gpu-24gb"]).load_id == "mistralai/Mistral-Small-3.2-24B-Instruct-2506"
    # Small 4 under plain transformers 4-bit keeps its experts in bf16 (≈ 216 GiB): refused with the way out
    with pytest.raises(ValueError, match="axolotl"):
        fsdp_profile(profile_for_model(PROFILES["gpu-80gb"], "mistral-small-4"))


def test_ministral_3_is_served_from_its_fp8_release():
    from course_utils.serve import vllm_memory

    plan = vllm_memory("ministral-3-8b", max_model_len=8192)
    assert plan["weights_gib"] < 9  # 8.8B weights at one byte each (it planned 16.4 GiB at bf16)
