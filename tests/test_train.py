import json
import math

import pytest
import torch
import yaml

from course_utils.data import IGNORE_INDEX
from course_utils.loss import VisionTextCollator
from course_utils.models import load
from course_utils.receipts import load_local, mix_modalities
from course_utils.train import (
    PRESETS,
    StopAfter,
    accelerate_fsdp_config,
    axolotl_config,
    build_trainer,
    latest_checkpoint,
    make_callbacks,
    nf4_roundtrip_error,
    preset_for,
    save_adapter,
    train_loss_of,
    training_card,
    write_yaml,
)


@pytest.fixture(scope="module")
def records():
    return mix_modalities(load_local("train")[:24], image_fraction=0.5, seed=0)


def fresh_run(stand_in_dir, records, out, **overrides):
    loaded = load("cpu-tiny", stand_in_dir=stand_in_dir)
    preset = preset_for(
        "cpu-tiny",
        **{
            "max_steps": 8,
            "save_steps": 4,
            "logging_steps": 1,
            "per_device_train_batch_size": 4,
            **overrides,
        },
    )
    callbacks, history = make_callbacks(plot=False)
    run = build_trainer(
        loaded.model, loaded.processor, records, None, preset, out, callbacks=callbacks, progress=False
    )
    return run, history


def test_presets_cover_every_profile_and_override_cleanly():
    from course_utils.profiles import PROFILES

    assert set(PRESETS) == set(PROFILES)
    assert PRESETS["gpu-24gb"].optim == "adamw_8bit" and PRESETS["cpu-tiny"].train_embeddings
    assert preset_for("cpu-tiny", max_steps=3).max_steps == 3
    with pytest.raises(TypeError):
        preset_for("cpu-tiny", max_stepz=3)
    with pytest.raises(KeyError, match="known"):
        preset_for("tpu-v5")


def test_collator_mixes_text_and_image_rows(stand_in_dir, records, processor):
    from course_utils.loss import prepare_examples

    examples = prepare_examples(records[:4], processor, 512, progress=False)
    assert {("pixel_values" in e) for e in examples} == {True, False}
    batch = VisionTextCollator(11)(examples)
    n_images = sum(e["pixel_values"].shape[0] for e in examples if "pixel_values" in e)
    assert batch["pixel_values"].shape[0] == n_images == batch["image_sizes"].shape[0]
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    padded = batch["attention_mask"] == 0
    assert (batch["labels"][padded] == IGNORE_INDEX).all() and (batch["input_ids"][padded] == 11).all()
    # image tokens and prompts are never trained on
    assert (batch["labels"][batch["input_ids"] == 10] == IGNORE_INDEX).all()


def test_cpu_trainer_learns_and_only_adapters_and_used_embeddings_train(stand_in_dir, records, tmp_path):
    run, history = fresh_run(stand_in_dir, records, tmp_path / "run", max_steps=10, save_steps=100)
    assert run.trainable_parameters < 0.02 * run.total_parameters
    assert any("embedding rows" in n for n in run.notes)
    run.trainer.train()
    losses = [h["loss"] for h in history.history if "loss" in h]
    assert len(losses) == 10 and losses[-1] < losses[0] - 1.0  # it really learns
    assert all(math.isfinite(loss) for loss in losses)
    assert any("peak RAM" in h or "peak VRAM" in h for h in history.history)


def test_resume_continues_exactly_where_it_stopped(stand_in_dir, records, tmp_path):
    full, full_history = fresh_run(stand_in_dir, records, tmp_path / "full")
    full_result = full.trainer.train()
    interrupted, _ = fresh_run(stand_in_dir, records, tmp_path / "resumed")
    interrupted.trainer.add_callback(StopAfter(4))
    interrupted.trainer.train()
    assert interrupted.trainer.state.global_step == 4
    checkpoint = latest_checkpoint(tmp_path / "resumed")
    assert checkpoint.endswith("checkpoint-4")
    resumed, resumed_history = fresh_run(stand_in_dir, records, tmp_path / "resumed")
    resumed_result = resumed.trainer.train(resume_from_checkpoint=checkpoint)
    assert resumed.trainer.state.global_step == full.trainer.state.global_step == 8
    full_last = [h["loss"] for h in full_history.history if "loss" in h][-1]
    resumed_last = [h["loss"] for h in resumed_history.history if "loss" in h][-1]
    assert resumed_last == pytest.approx(full_last, rel=0.02, abs=0.02)
    # the run's loss for the card: transformers' training_loss after a resume divides the resumed steps'
    # loss by all of them (4 of 8 here: about half the real figure); the logged losses hold every step
    full_loss = full_result.training_loss
    assert train_loss_of(full.trainer, full_loss) == full_loss  # no resume: transformers' figure is right
    resumed_loss = train_loss_of(resumed.trainer, resumed_result.training_loss, resumed_from=checkpoint)
    assert resumed_loss == pytest.approx(full_loss, rel=0.02)
    assert resumed_result.training_loss < 0.75 * full_loss  # what a card recorded before


def test_the_resumed_runs_loss_counts_whole_logging_windows(stand_in_dir, records, tmp_path):
    # windows of 3 steps (the last one of 2, never logged): the steps before the resume come back from the
    # checkpoint's log history, each window weighted by its length
    full, _ = fresh_run(stand_in_dir, records, tmp_path / "full", save_steps=3, logging_steps=3)
    full_loss = full.trainer.train().training_loss
    interrupted, _ = fresh_run(stand_in_dir, records, tmp_path / "r", save_steps=3, logging_steps=3)
    interrupted.trainer.add_callback(StopAfter(6))
    interrupted.trainer.train()
    resumed, _ = fresh_run(stand_in_dir, records, tmp_path / "r", save_steps=3, logging_steps=3)
    checkpoint = latest_checkpoint(tmp_path / "r")
    assert checkpoint.endswith("checkpoint-6")
    result = resumed.trainer.train(resume_from_checkpoint=checkpoint)
    assert train_loss_of(resumed.trainer, result.training_loss, resumed_from=checkpoint) == pytest.approx(
        full_loss, rel=0.02
    )


def test_adapter_saving_writes_a_card_and_refuses_to_overwrite(stand_in_dir, records, tmp_path):
    run, _ = fresh_run(stand_in_dir, records, tmp_path / "run", max_steps=2, save_steps=100)
    run.trainer.train()
    card = training_card(run, {"train_loss": 1.0}, seconds=1.0)
    target = save_adapter(run, tmp_path / "adapter", card)
    assert (target / "adapter_model.safetensors").is_file() and not list(target.glob("*.bin"))
    saved = json.loads((target / "training_card.json").read_text())
    assert saved["hyperparameters"]["lora_r"] == 16 and saved["library_versions"]["transformers"]
    assert saved["dataset_sha256_16"] == run.dataset_hash and saved["train_examples"] == 24
    with pytest.raises(FileExistsError):
        save_adapter(run, target, card)


def test_axolotl_and_fsdp_configs_parse_back(tmp_path):
    preset = preset_for("gpu-80gb")
    path = write_yaml(
        axolotl_config("mistralai/Mistral-Small-3.2-24B-Instruct-2506", "data/train.jsonl", preset),
        tmp_path / "ax.yml",
    )
    data = yaml.safe_load(path.read_text())
    assert data["adapter"] == "qlora" and data["lora_r"] == preset.lora_r and data["sample_packing"] is False
    assert data["datasets"][0]["roles_to_train"] == ["assistant"]
    layers = ("MistralDecoderLayer", "PixtralAttentionLayer")
    fsdp = yaml.safe_load(
        write_yaml(accelerate_fsdp_config(4, layer_classes=layers), tmp_path / "fsdp.yml").read_text()
    )
    assert fsdp["distributed_type"] == "FSDP" and fsdp["num_processes"] == 4
    with pytest.raises(FileExistsError):
        write_yaml({}, path)
    with pytest.raises(ValueError):
        accelerate_fsdp_config(0, layer_classes=layers)


def test_nf4_beats_uniform_int4_on_normal_weights():
    torch.manual_seed(0)
    result = nf4_roundtrip_error(torch.randn(64 * 512) * 0.02)
    assert result.nf4_rmse < result.int4_rmse
    assert result.bits_per_weight_nf4 == 4.5


def test_qlora_on_cpu_quantizes_the_language_model_only_and_trains(stand_in_dir, records, tmp_path):
    import bitsandbytes as bnb

    loaded = load("cpu-tiny", stand_in_dir=stand_in_dir, load_in_4bit=True)
    quantized = [n for n, m in loaded.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and all("language_model" in n for n in quantized)
    assert "bitsandbytes NF4" in loaded.description
    callbacks, history = make_callbacks(plot=False)
    preset = preset_for("cpu-tiny", max_steps=4, logging_steps=1, save_steps=100, bf16=False)
    run = build_trainer(
        loaded.model,
        loaded.processor,
        records[:16],
        None,
        preset,
        tmp_path,
        callbacks=callbacks,
        progress=False,
    )
    run.trainer.train()
    losses = [h["loss"] for h in history.history if "loss" in h]
    assert len(losses) == 4 and losses[-1] < losses[0]


def test_fsdp_wraps_the_layer_classes_of_the_model_it_trains(stand_in_dir):
    from transformers import AutoConfig, AutoModelForImageTextToText

    from course_utils.train import fsdp_layer_classes

    wrapped = {}
    for name in ("tiny-mistral-small-3", "tiny-mistral-small-4"):
        config = AutoConfig.from_pretrained(stand_in_dir / name)
        model = AutoModelForImageTextToText.from_config(config)
        fsdp = accelerate_fsdp_config(2, layer_classes=fsdp_layer_classes(model))["fsdp_config"]
        wrapped[name] = fsdp["fsdp_transformer_layer_cls_to_wrap"]
    # Small 4's decoder layer is Mistral4DecoderLayer: a hard-coded MistralDecoderLayer makes accelerate
    # raise "Could not find the transformer layer class"
    assert wrapped == {
        "tiny-mistral-small-3": "MistralDecoderLayer,PixtralAttentionLayer",
        "tiny-mistral-small-4": "Mistral4DecoderLayer,PixtralAttentionLayer",
    }


def test_parameter_count_is_the_same_in_4_bit(stand_in_dir):
    from course_utils.train import count_parameters

    full = count_parameters(load("cpu-tiny", stand_in_dir=stand_in_dir).model)
    four_bit = count_parameters(load("cpu-tiny", stand_in_dir=stand_in_dir, load_in_4bit=True).model)
    # bitsandbytes packs two 4-bit values per byte: counting stored elements halves the quantized layers
    # and inflates the trainable share a learner sees
    assert four_bit.total == full.total


def test_small4_axolotl_config_is_axolotls_known_good_recipe(tmp_path):
    from course_utils.train import axolotl_small4_qlora

    config = yaml.safe_load(
        write_yaml(axolotl_small4_qlora("data/train.jsonl"), tmp_path / "a.yml").read_text()
    )
    # examples/mistral4/qlora-vision.yml (≈ 68 GiB): the BF16 re-upload (the official weights are FP8),
    # experts quantized by axolotl (transformers' bnb 4-bit converts only nn.Linear), Cut Cross Entropy
    assert config["base_model"] == "axolotl-ai-co/Mistral-Small-4-119B-2603-BF16"
    assert config["quantize_moe_experts"] is True and config["load_in_4bit"] is True
    assert config["plugins"] == ["axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"]
    assert (config["lora_r"], config["sequence_len"], config["micro_batch_size"]) == (32, 2048, 1)
    assert config["datasets"][0]["path"] == "data/train.jsonl" and config["sample_packing"] is False


def test_a_card_without_bf16_trains_in_fp16(monkeypatch):
    # a V100 32 GB resolves to gpu-24gb: Unsloth loads it in fp16 and its trainer raises when asked for bf16
    for profile in ("gpu-24gb", "gpu-80gb"):
        no_bf16 = preset_for(profile, bf16_supported=False)
        assert (no_bf16.bf16, no_bf16.fp16) == (False, True)
        ampere = preset_for(profile, bf16_supported=True)
        assert (ampere.bf16, ampere.fp16) == (True, False)
    t4 = preset_for("t4-16gb", bf16_supported=False)
    assert (t4.bf16, t4.fp16) == (False, True)
    # the CPU preset's bf16 is CPU autocast, whatever a CUDA card could do
    assert preset_for("cpu-tiny", bf16_supported=False).bf16 is True
    # asked of the card itself when not given
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    v100 = preset_for("gpu-24gb")
    assert (v100.bf16, v100.fp16) == (False, True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert preset_for("gpu-24gb").bf16 is True


def test_fsdp_config_takes_the_presets_precision():
    layers = ("MistralDecoderLayer",)
    assert (
        accelerate_fsdp_config(2, layer_classes=layers, mixed_precision="fp16")["mixed_precision"] == "fp16"
    )
    assert accelerate_fsdp_config(2, layer_classes=layers)["mixed_precision"] == "bf16"
    with pytest.raises(ValueError, match="mixed_precision"):
        accelerate_fsdp_config(2, layer_classes=layers, mixed_precision="fp8")


def test_evaluation_never_batches_more_rows_than_training():
    # transformers' default eval batch is 8: on gpu-24gb that is 4x the training micro-batch, with images,
    # at 2048 tokens — a peak the memory plan never counted
    from pathlib import Path

    from course_utils.train import shared_training_kwargs

    for name in PRESETS:
        kwargs = shared_training_kwargs(preset_for(name), "out")
        assert kwargs["per_device_eval_batch_size"] == kwargs["per_device_train_batch_size"], name
    lesson = (Path(__file__).resolve().parents[1] / "lessons" / "04_qlora_training.py").read_text()
    for config in ("SFTConfig(", "TrainingArguments("):
        call = lesson[lesson.index(config) :].split("\n    )", 1)[0]
        assert "per_device_eval_batch_size=preset.per_device_train_batch_size" in call, config


def test_lesson_04_compares_the_measured_peak_with_the_plan_for_its_own_preset():
    # the plan defaulted to adamw_8bit while gpu-80gb trains with adamw_torch (6 bytes more per weight)
    from pathlib import Path

    lesson = (Path(__file__).resolve().parents[1] / "lessons" / "04_qlora_training.py").read_text()
    after_training = lesson[lesson.index("## 4.9 After training") :]
    call = after_training[after_training.index("estimate_training_memory(") :].split("\n    )", 1)[0]
    assert "optimizer=preset.optim" in call and "backend=profile.backend" in call


def test_axolotl_config_sends_small_4_to_its_own_recipe():
    # its target list names Small 3's projections: on Small 4's MLA attention only o_proj and the shared
    # expert matched, and the FP8 checkpoint cannot load in 4-bit (the BF16 re-upload can)
    with pytest.raises(ValueError, match="axolotl_small4_qlora"):
        axolotl_config("mistralai/Mistral-Small-4-119B-2603", "data/train.jsonl", preset_for("gpu-80gb"))


def test_latest_checkpoint_skips_a_half_saved_folder_and_odd_names(tmp_path):
    """transformers writes trainer_state.json last: a crash while saving leaves checkpoint-N without it,
    and resuming from it restarts at step 0 (transformers skips a missing state silently)."""
    for step, complete in ((10, True), (20, True), (30, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (tmp_path / "checkpoint-best").mkdir()  # another tool's name: no step, not a traceback
    (tmp_path / "checkpoint-99").write_text("a file, not a checkpoint")
    assert latest_checkpoint(tmp_path).endswith("checkpoint-20")
    assert latest_checkpoint(tmp_path / "checkpoint-best") is None
