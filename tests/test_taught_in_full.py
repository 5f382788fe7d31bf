"""Taught once, then imported: where a lesson shows a function in full, it is the package's function,
character for character, so the lesson and ``course_utils`` can never drift apart."""

import ast
import importlib
import inspect
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

TAUGHT = [
    ("02_vision_prompting.py", "course_utils.chat", "JSONExtractionError"),
    ("02_vision_prompting.py", "course_utils.chat", "extract_json"),
    ("03_data_formatting.py", "course_utils.data", "response_only_labels"),
    ("04_qlora_training.py", "course_utils.loss", "response_only_loss"),
    ("04_qlora_training.py", "course_utils.train", "ResponseOnlyTrainer"),
    ("05_evaluation.py", "course_utils.evaluate", "field_scores"),
]


def definitions_in(source: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            found.setdefault(node.name, []).append(ast.get_source_segment(source, node))
    return found


@pytest.mark.parametrize(("lesson", "module", "name"), TAUGHT, ids=[t[2] for t in TAUGHT])
def test_the_lesson_shows_the_package_function_verbatim(lesson, module, name):
    assert_taught_verbatim((ROOT / "lessons" / lesson).read_text(), lesson, module, name)


def assert_taught_verbatim(source: str, lesson: str, module: str, name: str) -> None:
    shown = definitions_in(source).get(name)
    assert shown, f"{lesson} no longer shows {name} in full"
    assert len(shown) == 1, f"{lesson} defines {name} {len(shown)} times: teach it once"
    package = inspect.getsource(getattr(importlib.import_module(module), name)).rstrip("\n")
    assert shown[0] == package, f"{lesson}'s {name} differs from {module}.{name}: edit both, or import it"


def test_a_changed_body_is_caught():
    lesson = (ROOT / "lessons" / "03_data_formatting.py").read_text()
    edited = lesson.replace("inside = False", "inside = None", 1)
    assert edited != lesson
    with pytest.raises(AssertionError, match="differs"):
        assert_taught_verbatim(edited, "03", "course_utils.data", "response_only_labels")


def test_the_lessons_labels_cell_reads_small_4s_ids_and_agrees_with_the_package(stand_in_dir):
    """Lesson 03's labels cell run on the Small 4 stand-in's processor: the ids it reads from the
    tokenizer ([THINK] included) label a reasoning reply after tool results as the package does."""
    from transformers import AutoProcessor

    from course_utils import data

    source = (ROOT / "lessons" / "03_data_formatting.py").read_text()
    cell = source.split('"copy:labels"]\n', 1)[1].split("\n# %%", 1)[0]
    processor = AutoProcessor.from_pretrained(stand_in_dir / "tiny-mistral-small-4")
    namespace = {"processor": processor}
    exec(cell, namespace)
    assert (namespace["THINK_ID"], namespace["TOOL_RESULTS_END_ID"]) == (
        data.THINK_ID,
        data.TOOL_RESULTS_END_ID,
    )
    call = {"id": "abc123def", "type": "function", "function": {"name": "rate", "arguments": "{}"}}
    messages = [
        {"role": "user", "content": "Total in USD?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "abc123def", "content": "1.1"},
        {"role": "assistant", "reasoning_content": "7 x 1.1", "content": "7.70 USD"},
    ]
    tools = [{"type": "function", "function": {"name": "rate", "description": "r", "parameters": {}}}]
    ids = processor.apply_chat_template(
        messages, tools=tools, tokenize=True, return_dict=True, return_tensors="pt"
    )
    ids = ids["input_ids"][0].tolist()
    for train_on_thinking in (True, False):
        lesson = namespace["response_only_labels"](ids, train_on_thinking=train_on_thinking)
        assert lesson == data.response_only_labels(ids, train_on_thinking=train_on_thinking)
    answer_only = [t for t in lesson if t != data.IGNORE_INDEX]
    assert processor.tokenizer.decode(answer_only).endswith("</s>7.70 USD</s>")
