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
