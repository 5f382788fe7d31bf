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
    return {a.arg: (ast.literal_eval(d) if isinstance(d, ast.Constant) else d) for a, d in zip(args, defaults)}


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
    assert {"patch_size", "spatial_merge_size", "chat_template"} <= set(inspect.signature(PixtralProcessor).parameters)
    assert "llm_int8_skip_modules" in inspect.signature(BitsAndBytesConfig).parameters
    assert callable(AutoModelForImageTextToText.from_pretrained)
