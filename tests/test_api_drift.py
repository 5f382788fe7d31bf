"""The Unsloth / TRL / transformers calls the lessons make still exist with the arguments we pass.

Unsloth's GPU loader cannot be imported on a CPU (its CPU backend replaces it), so its signature is
read from the installed source with ``ast`` — the check runs everywhere and never skips.
"""

import ast
import importlib.util
import inspect
from pathlib import Path

import pytest


def unsloth_function(relative_file, class_name, method):
    spec = importlib.util.find_spec("unsloth")
    if spec is None:
        pytest.fail("unsloth is not installed — it is part of the course's pinned set")
    path = Path(spec.submodule_search_locations[0]) / relative_file
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            bases = [b.id for b in node.bases if isinstance(b, ast.Name)]
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == method:
                    return item, bases
            return None, bases
    pytest.fail(f"{class_name} not found in unsloth/{relative_file}")


def arg_defaults(fn):
    args = fn.args.args
    defaults = [None] * (len(args) - len(fn.args.defaults)) + list(fn.args.defaults)
    return {
        a.arg: (ast.literal_eval(d) if isinstance(d, ast.Constant) else d) for a, d in zip(args, defaults)
    }


def test_fast_vision_model_from_pretrained_takes_what_models_load_passes():
    fn, bases = unsloth_function("models/loader.py", "FastVisionModel", "from_pretrained")
    assert fn is None and bases == ["FastModel"], "FastVisionModel should inherit FastModel.from_pretrained"
    fn, _ = unsloth_function("models/loader.py", "FastModel", "from_pretrained")
    args = arg_defaults(fn)
    for name in ("model_name", "max_seq_length", "load_in_4bit", "use_gradient_checkpointing"):
        assert name in args, f"FastModel.from_pretrained lost {name!r}"
    assert args["trust_remote_code"] is False


def test_transformers_calls_used_by_the_course():
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig, PixtralProcessor
    from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer

    assert {"tokenizer_file", "chat_template"} <= set(inspect.signature(convert_tekken_tokenizer).parameters)
    assert {"patch_size", "spatial_merge_size", "chat_template"} <= set(
        inspect.signature(PixtralProcessor).parameters
    )
    assert "llm_int8_skip_modules" in inspect.signature(BitsAndBytesConfig).parameters
    assert callable(AutoModelForImageTextToText.from_pretrained)


def _find_class_method(package: str, class_name: str, method: str):
    """Search an installed package's source for ``class_name.method`` (ast only, nothing imported)."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        pytest.fail(f"{package} is not installed — it is part of the course's pinned set")
    for path in sorted(Path(spec.submodule_search_locations[0]).rglob("*.py")):
        text = path.read_text(errors="ignore")
        if f"class {class_name}" not in text:
            continue
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.name == class_name:
                for item in node.body:
                    if isinstance(item, ast.FunctionDef) and item.name == method:
                        return item
    pytest.fail(f"{package}: {class_name}.{method} not found")


def test_unsloth_get_peft_model_takes_the_layer_choices_train_py_passes():
    args = arg_defaults(_find_class_method("unsloth", "FastBaseModel", "get_peft_model"))
    for name in (
        "finetune_vision_layers",
        "finetune_language_layers",
        "finetune_attention_modules",
        "finetune_mlp_modules",
        "r",
        "lora_alpha",
        "lora_dropout",
        "bias",
        "random_state",
        "use_gradient_checkpointing",
    ):
        assert name in args, f"FastBaseModel.get_peft_model lost {name!r}"


def test_unsloth_vision_collator_takes_response_only_arguments():
    args = arg_defaults(_find_class_method("unsloth_zoo", "UnslothVisionDataCollator", "__init__"))
    for name in (
        "model",
        "processor",
        "max_seq_length",
        "train_on_responses_only",
        "instruction_part",
        "response_part",
    ):
        assert name in args, f"UnslothVisionDataCollator lost {name!r}"


def test_trl_sft_config_and_trainer_take_what_train_py_passes():
    from trl import SFTConfig, SFTTrainer

    config_fields = set(inspect.signature(SFTConfig).parameters)
    for name in (
        "dataset_text_field",
        "dataset_kwargs",
        "remove_unused_columns",
        "max_length",
        "optim",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "save_steps",
        "bf16",
        "fp16",
    ):
        assert name in config_fields, f"SFTConfig lost {name!r}"
    trainer_params = set(inspect.signature(SFTTrainer).parameters)
    assert {
        "model",
        "args",
        "data_collator",
        "train_dataset",
        "eval_dataset",
        "processing_class",
        "callbacks",
    } <= trainer_params


def test_transformers_trainer_and_peft_calls_used_on_cpu():
    from peft import LoraConfig
    from transformers import Trainer, TrainingArguments

    assert {"trainable_token_indices", "target_modules", "lora_alpha"} <= set(
        inspect.signature(LoraConfig).parameters
    )
    assert {"use_cpu", "include_num_input_tokens_seen", "save_strategy", "eval_strategy", "data_seed"} <= set(
        inspect.signature(TrainingArguments).parameters
    )
    assert "resume_from_checkpoint" in inspect.signature(Trainer.train).parameters
    assert "num_items_in_batch" in inspect.signature(Trainer.compute_loss).parameters
