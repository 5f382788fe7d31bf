"""The exercises' checks (course_utils.exercises, widgets.check) and the builder's solution markers.

Each checker is given fake run objects of the kind a lesson passes (a trainer's state, a comparison,
GGUF files, a load test): a right answer passes visibly, a wrong one fails the cell with a hint, and an
untouched TODO (``None``) reports "not answered yet" without failing.
"""

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from course_utils import exercises
from course_utils.exercises import EXERCISES, check
from course_utils.widgets import WrongAnswer
from course_utils.widgets import check as check_value

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import build_notebooks  # noqa: E402

# --- widgets.check: the comparison every value exercise goes through --------------------------------


def test_check_value_passes_visibly_on_a_right_answer(capsys):
    assert check_value(6.5, 6.5, "hint B") is True
    assert check_value(7.1, 7.11, "hint D", tolerance=0.02) is True
    assert check_value("gpu-24gb", "gpu-24gb", "hint E", label="00-x") is True
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["✅ correct!", "✅ correct!", "✅ 00-x: correct!"]


def test_check_value_leaves_an_unanswered_todo_without_failing(capsys):
    assert check_value(None, 6.5, "hint A") is False
    out = capsys.readouterr().out
    assert out.startswith("⏳") and "not answered yet" in out and "hint A" in out
    assert "6.5" not in out  # the expected value is never shown


@pytest.mark.parametrize(
    ("answer", "expected", "tolerance"),
    [(7, 6.5, 0.0), (7.2, 7.11, 0.001), ("gpu-80gb", "gpu-24gb", 0.0), (True, 1, 0.0), ("6.5", 6.5, 0.0)],
)
def test_check_value_raises_with_the_hint_on_a_wrong_answer(answer, expected, tolerance):
    with pytest.raises(WrongAnswer, match="hint C") as failure:
        check_value(answer, expected, "hint C", tolerance=tolerance)
    assert isinstance(failure.value, AssertionError)  # a failed cell in Jupyter and under nbval
    assert repr(answer) in str(failure.value)


# --- exercises.check: ids, run objects, and every checker -------------------------------------------


def test_an_unknown_id_or_a_missing_run_object_is_a_clear_error():
    with pytest.raises(KeyError, match="no exercise '99-nope'"):
        check("99-nope", 1)
    with pytest.raises(TypeError, match=r"needs trainer=\.\.\."):
        check("04-best-eval-step", 10)


def test_every_lesson_has_one_exercise_per_tier_and_each_lion_reads_the_learners_run():
    lessons = sorted({key[:2] for key in EXERCISES})
    assert lessons == [f"{n:02d}" for n in range(9)]
    for lesson in lessons:
        tiers = [e.tier for key, e in EXERCISES.items() if key.startswith(lesson)]
        assert sorted(tiers) == sorted(["🐢", "🐕", "🦁"]), lesson
    for e in EXERCISES.values():
        assert (e.expected is None) != (e.judge is None), e.id
        if e.tier == "🦁":  # something the learner built or ran, never a True/False self-report
            assert e.needs or e.judge is not None, e.id


def _passes(exercise_id, answer, capsys, **run):
    assert check(exercise_id, answer, **run) is True
    assert capsys.readouterr().out.startswith(f"✅ {exercise_id}")


def _fails(exercise_id, answer, match="Hint", **run):
    with pytest.raises(WrongAnswer, match=match):
        check(exercise_id, answer, **run)


@pytest.mark.parametrize("exercise_id", sorted(EXERCISES))
def test_every_exercise_reports_none_as_not_answered_yet(exercise_id, capsys):
    run = dict.fromkeys(EXERCISES[exercise_id].needs)  # never read: the answer is None
    assert check(exercise_id, None, **run) is False
    assert "not answered yet" in capsys.readouterr().out


def test_lesson_00(capsys, monkeypatch):
    from course_utils.profiles import MODELS

    _passes("00-active-params", MODELS["mistral-small-4"].active_params_b, capsys)
    _fails("00-active-params", MODELS["mistral-small-4"].total_params_b)
    _passes("00-friend-profile", "gpu-24gb", capsys)  # 39.4 GiB: above the 24 GB rung, below 80
    _fails("00-friend-profile", "gpu-80gb")
    monkeypatch.delenv("COURSE_PROFILE", raising=False)
    t4_checkpoint = "mistralai/Ministral-3-8B-Instruct-2512"
    _passes("00-override", t4_checkpoint, capsys)
    _fails("00-override", "t4-16gb", match="keep the profile's .load_id")  # the name is in the question
    _fails("00-override", "cpu-tiny", match="set the variable before resolving")
    monkeypatch.setenv("COURSE_PROFILE", "t4-16gb")
    _fails("00-override", t4_checkpoint, match="remove it")


def test_lesson_01(capsys):
    _passes("01-kv-bytes", 40 * 2 * 8 * 128 * 2, capsys)
    _fails("01-kv-bytes", 40 * 8 * 128 * 2)  # forgot K and V
    from course_utils.profiles import MODELS

    ratio = (
        MODELS["mistral-small-3.2"].kv_cache_bytes_per_token()
        / MODELS["mistral-small-4"].kv_cache_bytes_per_token()
    )
    _passes("01-kv-ratio", round(ratio, 1), capsys)
    _fails("01-kv-ratio", round(ratio, 1) + 0.5)


class FakeProcessor:
    """Tokenizes like mistral-common unless told to drift (as a broken template would)."""

    def __init__(self, drift=False):
        self.drift = drift

    def apply_chat_template(self, messages, tokenize, return_dict):
        from course_utils.chat import reference_token_ids

        ids = reference_token_ids(messages)
        return {"input_ids": ids + [1] if self.drift else ids}


def test_lesson_01_own_conversation(capsys):
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Bye!"},
    ]
    _passes("01-own-conversation", conversation, capsys, processor=FakeProcessor())
    _fails("01-own-conversation", conversation[1:], match="want system", processor=FakeProcessor())
    _fails("01-own-conversation", conversation, match="differ", processor=FakeProcessor(drift=True))
    _fails("01-own-conversation", "Hi", match="list of", processor=FakeProcessor())


BROKEN_REPLY = (
    '{"merchant": "Bistro", "date": "2024-13-01", "currency": "eur", '
    '"items": [{"name": "Soup", "qty": 1, "unit_price": 6.5}], "subtotal": 6.5, "tax": 1.24, "total": 7.74}'
)


def test_lesson_02(capsys):
    _passes("02-screenshot-tokens", math.ceil(1024 / 28) * math.ceil(768 / 28) + math.ceil(768 / 28), capsys)
    _fails("02-screenshot-tokens", math.ceil(1024 / 28) * math.ceil(768 / 28))  # forgot the row tokens
    _passes("02-per-image-budget", 645, capsys)  # (131072 - 2048) / 200 = 645.12
    _fails("02-per-image-budget", 655)  # 131072 / 200: the text budget forgotten
    fixed = BROKEN_REPLY.replace('"eur"', '"EUR"')
    _passes("02-fixed-reply", fixed, capsys, broken_reply=BROKEN_REPLY)
    _fails("02-fixed-reply", BROKEN_REPLY, match="still rejects", broken_reply=BROKEN_REPLY)
    another = fixed.replace('"total": 7.74', '"total": 1.0')
    _fails("02-fixed-reply", another, match="total changed", broken_reply=BROKEN_REPLY)


def test_lesson_03(capsys, tmp_path):
    from PIL import Image

    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    lone = {"messages": [{"role": "assistant", "content": "x"}]}
    upload = tmp_path / "upload.jsonl"
    other = {"messages": [{"role": "user", "content": "and?"}, {"role": "assistant", "content": "no"}]}
    upload.write_text("\n".join([json.dumps(good), json.dumps(lone), "{not json", json.dumps(other)]) + "\n")
    _passes("03-invalid-rows", 2, capsys, broken_file=upload)
    _fails("03-invalid-rows", 4, broken_file=upload)

    image = Image.new("RGB", (8, 8))
    question = [{"type": "image"}, {"type": "text", "text": "Total? In JSON."}]
    fixed = {
        "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": "{}"}],
        "images": [image],
    }
    _passes("03-fixed-row", fixed, capsys)
    _fails("03-fixed-row", {**fixed, "images": []}, match="keep the row's image")
    two_users = {**fixed, "messages": [fixed["messages"][0], {"role": "user", "content": "JSON"}]}
    _fails("03-fixed-row", two_users, match="check_record still finds")

    # a multiple of 16: the lesson's printed recommendation rounds to 64, so it is not the answer
    _passes("03-keep-all", 144, capsys, lengths=[100, 130, 65])
    _fails("03-keep-all", 128, lengths=[100, 130, 65])  # cuts the 130-token row
    _fails("03-keep-all", 192, lengths=[100, 130, 65])  # rounded to 64, not 16


def fake_trainer(log_history):
    return SimpleNamespace(state=SimpleNamespace(log_history=log_history))


def test_lesson_04(capsys):
    from course_utils.memory import ARCHITECTURES, estimate_training_memory, lora_parameters

    # r = 128: not a row of the lesson's printed table (8-64), so it is computed, not read off
    _passes("04-lora-128", round(lora_parameters(ARCHITECTURES["mistral-small-3.2"], 128) / 1e6, 1), capsys)
    _fails("04-lora-128", round(lora_parameters(ARCHITECTURES["mistral-small-3.2"], 64) / 1e6, 1))
    fits = [s for s in range(1024, 131073, 1024) if estimate_training_memory(
        "mistral-small-3.2", "qlora", s, 1, 16
    ).total_gib <= 24]  # fmt: skip
    assert fits and fits[-1] < 131072
    _passes("04-longest-seq", fits[-1], capsys)
    _fails("04-longest-seq", fits[-1] + 1024)

    history = [
        {"loss": 3.0, "step": 5},
        {"eval_loss": 2.5, "step": 10},
        {"loss": 1.0, "step": 15},
        {"eval_loss": 1.2, "step": 20},
        {"eval_loss": 1.4, "step": 30},
        {"train_loss": 1.1, "step": 30},
    ]
    _passes("04-best-eval-step", 20, capsys, trainer=fake_trainer(history))
    _fails("04-best-eval-step", 30, trainer=fake_trainer(history))  # the last one, not the lowest
    _fails("04-best-eval-step", 15, trainer=fake_trainer(history))  # the lowest *train* loss
    tie = [*history, {"eval_loss": 1.2, "step": 40}]
    _passes("04-best-eval-step", 40, capsys, trainer=fake_trainer(tie))
    _fails(
        "04-best-eval-step", 20, match="logged no eval_loss", trainer=fake_trainer([{"loss": 1, "step": 1}])
    )


def test_lesson_05(capsys):
    from course_utils.evaluate import compare

    _passes("05-f1", 0.67, capsys)
    _fails("05-f1", 0.6)  # the recall, not the F1
    targets = [
        {"merchant": "A", "currency": "EUR", "total": 1.0},
        {"merchant": "B", "currency": "USD", "total": 2.0},
        {"merchant": "C", "currency": "EUR", "total": 3.0},
    ]
    comparison = compare(
        {
            "base": ["no json here", '{"merchant": "B"}', "nothing"],
            "tuned": [
                '{"merchant": "A", "currency": "EUR", "total": 9.0}',
                '{"merchant": "X", "currency": "USD", "total": 2.0}',
                "still nothing",
            ],
        },
        targets,
    )
    _passes("05-best-field", "currency", capsys, comparison=comparison)  # F1 0.8; merchant, total 0.4
    _fails("05-best-field", "total", comparison=comparison)
    _passes("05-format-fixed", 1, capsys, comparison=comparison)  # row 0 only: row 1 was valid before
    _fails("05-format-fixed", 2, comparison=comparison)


def test_lesson_06(capsys, tmp_path, monkeypatch):
    from course_utils import gguf_export

    files = {"F16": tmp_path / "m-f16.gguf", "Q4_K_M": tmp_path / "m-Q4_K_M.gguf"}
    files["F16"].write_bytes(b"\0" * 1000)
    files["Q4_K_M"].write_bytes(b"\0" * 300)
    _passes("06-q4-fraction", 0.3, capsys, files=files)
    _fails("06-q4-fraction", 0.5, files=files)
    _passes("06-small4-q4-gib", round(119e9 * 4.9 / 8 / 2**30, 1), capsys)  # Q4_K_M: 4.9 bits/weight
    _fails("06-small4-q4-gib", round(119e9 * 2 / 2**30, 1))  # that is F16

    (tmp_path / "m-Q8_0.gguf").write_bytes(b"GGUF")
    file_types = {"m-Q8_0.gguf": 7, "m-Q4_K_M.gguf": 15}
    monkeypatch.setattr(gguf_export, "read_gguf_kv", lambda path, wanted=None: file_types[Path(path).name])
    template = "[INST]{{ .Prompt }}[/INST]"
    reference = f'FROM ./m-Q4_K_M.gguf\nTEMPLATE """{template}"""\nPARAMETER num_ctx 4096\n'
    mine = tmp_path / "Modelfile.q8"
    mine.write_text(reference.replace("Q4_K_M", "Q8_0").replace("4096", "8192"))
    _passes("06-own-modelfile", mine, capsys, reference=reference)
    _fails("06-own-modelfile", tmp_path / "nothing", match="is not a file", reference=reference)
    mine.write_text(reference.replace("4096", "8192"))
    _fails("06-own-modelfile", mine, match="not the Q8_0 GGUF", reference=reference)
    mine.write_text(reference.replace("Q4_K_M", "Q8_0"))
    _fails("06-own-modelfile", mine, match="num_ctx", reference=reference)
    spaced = reference.replace("Q4_K_M", "Q8_0").replace("4096", "8192").replace("[INST]{", "[INST] {")
    mine.write_text(spaced)
    _fails("06-own-modelfile", mine, match="TEMPLATE differs", reference=reference)
    mine.write_text(reference.replace("Q4_K_M", "Q6_K"))
    _fails("06-own-modelfile", mine, match="no such file", reference=reference)


def load_result(latency, n, errors=0):
    from course_utils.serve import LoadResult

    return LoadResult([latency] * n, [latency / 4] * n, [48] * n, ["request 0: boom"] * errors, 2.0)


def test_lesson_07(capsys):
    eight_clients = load_result(1.6, 64)
    _passes("07-tokens-per-s", round(64 * 48 / 2.0, 1), capsys, result=eight_clients)
    _fails("07-tokens-per-s", 64 / 2.0, result=eight_clients)  # requests per second, not tokens
    _passes("07-small4-gpus", 4, capsys)  # 119B x 2 bytes = 222 GiB: four 80 GB cards
    _fails("07-small4-gpus", 2)  # that is FP8
    _passes("07-single-client", load_result(0.2, 16), capsys, baseline=eight_clients)
    _fails("07-single-client", load_result(0.2, 64), match="want 16", baseline=eight_clients)
    _fails("07-single-client", load_result(0.2, 15, errors=1), match="failed", baseline=eight_clients)
    _fails("07-single-client", load_result(2.0, 16), match="concurrency=1", baseline=eight_clients)
    _fails("07-single-client", 0.2, match="serve.load_test", baseline=eight_clients)


def test_lesson_08(capsys):
    from course_utils.tools import TOOLS

    table = [
        {"configuration": "base", "rows": "text", "json_valid": 0.1},
        {"configuration": "base + schema", "rows": "text", "json_valid": 1.0},
        {"configuration": "base + schema", "rows": "image", "json_valid": 0.5},
    ]
    # what the grammar adds to the base model's text rows: a difference read from two rows, not a guess
    _passes("08-base-constrained", 0.9, capsys, table=table)
    _fails("08-base-constrained", True, table=table)
    _fails("08-base-constrained", 1.0, table=table)
    table[1]["json_valid"] = 0.95
    _passes("08-base-constrained", 0.85, capsys, table=table)

    _passes("08-bad-arguments", '{"amount": 5}', capsys, tools=TOOLS)
    _fails("08-bad-arguments", "{", match="not a JSON object", tools=TOOLS)
    good = '{"amount": 5, "from_currency": "EUR", "to_currency": "USD"}'
    _fails("08-bad-arguments", good, match="schema accepts", tools=TOOLS)

    rates = {"EUR": 0.19, "USD": 0.08, "GBP": 0.20, "CHF": 0.081, "JPY": 0.10}

    def tax_rate(currency):
        return {"currency": currency, "rate": rates.get(currency, 0.2)}

    parameters = {
        "type": "object",
        "properties": {"currency": {"type": "string", "enum": list(rates)}},
        "required": ["currency"],
    }
    tool = {
        "type": "function",
        "function": {"name": "tax_rate", "description": "VAT", "parameters": parameters},
    }
    _passes("08-tax-tool", tool, capsys, function=tax_rate, tools=TOOLS)
    loose = {**tool, "function": {**tool["function"], "parameters": {**parameters, "properties": {}}}}
    _fails("08-tax-tool", loose, match="reached your function", function=tax_rate, tools=TOOLS)
    _fails("08-tax-tool", tool, match="want its rate", function=lambda currency: {"rate": 0.5}, tools=TOOLS)
    _fails("08-tax-tool", {"name": "tax_rate"}, match="tool definition", function=tax_rate, tools=TOOLS)


def test_modelfile_fields_reads_from_template_and_parameters():
    fields = exercises.modelfile_fields(
        'FROM ./a.gguf\nTEMPLATE """x\n{{ .Prompt }}"""\n# PARAMETER num_ctx 1\nPARAMETER stop "</s>"\n'
        'PARAMETER stop "[INST]"\nPARAMETER num_ctx 8192\n'
    )
    assert fields == {
        "FROM": "./a.gguf",
        "TEMPLATE": "x\n{{ .Prompt }}",
        "PARAMETER": {"stop": ['"</s>"', '"[INST]"'], "num_ctx": ["8192"]},
    }


# --- the builder's solution markers -----------------------------------------------------------------


def test_split_solution_drops_or_fills_in_the_answer():
    code = (
        "from x import check\n\n"
        "answer = None  # TODO: a number\n"
        "# SOLUTION: import math\n"
        "# SOLUTION:\n"
        "# SOLUTION: answer = math.ceil(\n"
        "# SOLUTION:     2.5\n"
        "# SOLUTION: )\n"
        'check("id", answer)\n'
        "if True:\n"
        "    other = None  # TODO\n"
        "    # SOLUTION: other = 1\n"
    )
    learner, solution = build_notebooks.split_solution(code)
    assert "SOLUTION" not in learner and "SOLUTION" not in solution
    assert learner == (
        'from x import check\n\nanswer = None  # TODO: a number\ncheck("id", answer)\n'
        "if True:\n    other = None  # TODO"
    )
    assert solution == (
        "from x import check\n\nimport math\n\nanswer = math.ceil(\n    2.5\n)\n"
        'check("id", answer)\nif True:\n    other = 1'
    )
    assert build_notebooks.split_solution("x = 1\n") == ("x = 1", "x = 1")


def test_a_solution_without_its_todo_line_is_refused():
    with pytest.raises(SystemExit, match="lesson 9 cell 3: '# SOLUTION:' lines must follow"):
        build_notebooks.split_solution("x = 1\n# SOLUTION: x = 2\n", "lesson 9 cell 3")


def test_solutions_notebook_says_so_and_links_to_itself(monkeypatch):
    monkeypatch.setattr(build_notebooks, "COURSE_REPO", "https://github.com/me/course")
    cells = [("markdown", f"# 05 · Eval\n\n{build_notebooks.badge('05_e.ipynb')}\nintro", {})]
    cells.append(("code", "a = None  # TODO\n# SOLUTION: a = 1", {}))
    solved = build_notebooks.solution_cells(cells, "05_e.ipynb")
    assert solved[0][1].startswith("# 05 · Eval\n\n**Solutions.**")
    assert "blob/main/notebooks/solutions/05_e.ipynb" in solved[0][1]
    assert solved[1][1] == "a = 1"
    assert build_notebooks.learner_cells(cells, "05_e.ipynb")[1][1] == "a = None  # TODO"


def test_execute_runs_the_solutions_and_gives_both_notebooks_the_checked_outputs(tmp_path, monkeypatch):
    """``--execute`` runs the solutions notebook (the answers must work) and copies the outputs of the
    ``NBVAL_CHECK_OUTPUT`` cells into the learner's notebook too; nothing else keeps an output."""
    import nbformat

    lessons, notebooks = tmp_path / "lessons", tmp_path / "notebooks"
    lessons.mkdir()
    notebooks.mkdir()
    (lessons / "00_tiny.py").write_text(
        "# %% [markdown]\n# # 00 · Tiny\n#\n# ## Learning objectives\n\n"
        '# %%\n# NBVAL_CHECK_OUTPUT\nprint("checked", 6 * 7)\n\n'
        '# %%\nanswer = None  # TODO: six times seven\n# SOLUTION: answer = 6 * 7\nprint("answer", answer)\n'
    )
    monkeypatch.setattr(build_notebooks, "ROOT", tmp_path)
    monkeypatch.setattr(build_notebooks, "LESSONS", lessons)
    monkeypatch.setattr(build_notebooks, "write_environment_yml", lambda: None)
    monkeypatch.setattr(build_notebooks, "opening", lambda: [])  # no install/versions cells: fast
    monkeypatch.setenv("COURSE_PROFILE", "cpu-tiny")
    written = build_notebooks.build(execute=True)
    assert [p.relative_to(tmp_path).as_posix() for p in written] == [
        "notebooks/00_tiny.ipynb",
        "notebooks/solutions/00_tiny.ipynb",
    ]
    learner, solved = (nbformat.read(p, as_version=4).cells for p in written)
    assert learner[1].outputs[0]["text"] == solved[1].outputs[0]["text"] == "checked 42\n"
    assert learner[2].outputs == solved[2].outputs == []  # unchecked: run, but nothing committed
    assert solved[2].source == 'answer = 6 * 7\nprint("answer", answer)'
    assert "SOLUTION" not in learner[2].source and "answer = None  # TODO" in learner[2].source
    assert build_notebooks.build(execute=False, check=True) == []  # and the sync check agrees
