"""Static checks on the committed notebooks: they parse, carry no volatile output, start and end the
course's way, agree with requirements.txt, and match their sources in lessons/."""

import ast
import copy
import json
import os
import re
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
SOLVED = sorted((ROOT / "notebooks" / "solutions").glob("[0-9][0-9]_*.ipynb"))  # what CI executes
sys.path.insert(0, str(ROOT / "tools"))
import build_notebooks  # noqa: E402


def cells(nb_path):
    return json.loads(nb_path.read_text())["cells"]


def source(cell):
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def requirement_pins():
    return {
        pin.split("==")[0].lower(): pin.split("==")[1].strip() for pin in build_notebooks.requirement_pins()
    }


def test_there_are_notebooks_in_teaching_order():
    names = [p.name for p in NOTEBOOKS]
    assert names[:2] == ["00_setup.ipynb", "01_load_model.ipynb"]
    assert [int(n[:2]) for n in names] == list(range(len(names)))


def nb_id(path):
    return path.relative_to(ROOT / "notebooks").as_posix()


@pytest.mark.parametrize("nb", NOTEBOOKS + SOLVED, ids=nb_id)
def test_code_cells_parse_after_stripping_magics(nb):
    for i, cell in enumerate(cells(nb)):
        if cell["cell_type"] == "code":
            code = "\n".join(
                "pass" if line.lstrip().startswith(("%", "!")) else line for line in source(cell).splitlines()
            )
            try:
                ast.parse(code)
            except SyntaxError as e:
                pytest.fail(f"{nb.name} cell {i}: {e.msg} (line {e.lineno})")


@pytest.mark.parametrize("nb", NOTEBOOKS + SOLVED, ids=nb_id)
def test_no_volatile_outputs_committed(nb):
    assert "widgets" not in json.loads(nb.read_text())["metadata"], f"{nb.name}: widget state committed"
    for i, cell in enumerate(cells(nb)):
        if cell["cell_type"] != "code":
            continue
        outputs = json.dumps(without_images(cell.get("outputs", [])))
        show = nb in NOTEBOOKS and build_notebooks.SHOW_TAG in cell.get("metadata", {}).get("tags", [])
        if "NBVAL_CHECK_OUTPUT" not in source(cell):
            if not show:
                assert cell.get("outputs") == [], f"{nb.name} cell {i}: output committed on an unchecked cell"
                assert cell.get("execution_count") is None, f"{nb.name} cell {i}: execution count committed"
            else:  # nbval (lessons run as committed, e.g. on Colab) refuses outputs without a count
                assert (cell.get("execution_count") is None) == (not cell.get("outputs")), (
                    f"{nb.name} cell {i}"
                )
        assert '"stderr"' not in outputs and '"ename"' not in outputs, f"{nb.name} cell {i}: stderr/error"
        assert "widget-view" not in outputs, f"{nb.name} cell {i}: a progress bar's widget view"
        assert not re.search(r"/(root|tmp|home|work)/|0x[0-9a-f]{6,}", outputs), (
            f"{nb.name} cell {i}: a machine path or a memory address"
        )
        if not show:  # shown outputs keep the reference run's timings (the opening cells say so)
            assert not re.search(r"\d+(\.\d+)? ?s(ec)?\b|it/s", outputs), f"{nb.name} cell {i}: timing"


def without_images(outputs: list) -> list:
    """Outputs with image data left out (base64 can hold any short string)."""
    return [
        {**o, "data": {k: v for k, v in o["data"].items() if not k.startswith("image/")}}
        if "data" in o
        else o
        for o in outputs
    ]


SHOWN_IMAGES = ("04", "05", "06", "07")  # lessons whose key figure a preview must show


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=nb_id)
def test_shown_cells_carry_the_reference_runs_outputs(nb):
    shown = [
        (i, c)
        for i, c in enumerate(cells(nb))
        if build_notebooks.SHOW_TAG in c.get("metadata", {}).get("tags", [])
    ]
    assert shown or nb.name[:2] < "01", f"{nb.name}: no cell shows its output"
    empty = [i for i, c in shown if not c["outputs"]]
    assert not empty, (
        f"{nb.name}: show-output cells {empty} have no output — run python tools/build_notebooks.py --execute"
    )
    images = sum("image/png" in o.get("data", {}) for _, c in shown for o in c["outputs"])
    if nb.name[:2] in SHOWN_IMAGES:
        assert images, f"{nb.name}: no figure among its shown outputs"


def test_committed_notebooks_fit_the_size_budget():
    total = sum(p.stat().st_size for p in NOTEBOOKS + SOLVED)
    assert total <= build_notebooks.SIZE_BUDGET, f"notebooks are {total / 2**20:.1f} MiB, over the budget"


def test_scrub_keeps_what_a_reader_needs_and_drops_the_volatile_rest():
    from nbformat.v4 import new_output

    root = str(build_notebooks.ROOT)
    outputs = [
        new_output("stream", name="stderr", text="Loading weights 100%|####| 3/3\n"),
        new_output(
            "stream", name="stdout", text=f"wrote {root}/outputs/cpu-tiny/a.gguf, /tmp/tmpab12/x.png\n"
        ),
        new_output("display_data", data={"application/vnd.jupyter.widget-view+json": {"model_id": "f00"}}),
        new_output(
            "display_data",
            data={"image/png": "iVBORw0KGgo=", "text/plain": "<Figure size 700x340 with 1 Axes>"},
            metadata={"image/png": {"width": 720}},
        ),
        new_output("execute_result", data={"text/plain": "<Thing at 0x7f3a9c0d1e20>"}, execution_count=3),
    ]
    outputs.insert(
        3, new_output("display_data", data={"text/plain": "Loading weights:   0%|          | 0/53"})
    )
    outputs.append(new_output("display_data", data={"text/html": '<iframe src="http://127.0.0.1:7860/">'}))
    log = "".join(f"{{'loss': {i}}}\n" for i in range(30))
    outputs.append(new_output("stream", name="stdout", text=log[:50]))  # a reply streamed in two pieces
    outputs.append(new_output("display_data", data={"text/plain": "train:  40%|####      | 2/5"}))  # between
    outputs.append(new_output("stream", name="stdout", text=log[50:]))
    kept = build_notebooks.scrub(outputs)
    assert [o["output_type"] for o in kept] == ["stream", "display_data", "execute_result", "stream"]
    assert (
        kept[3]["text"].splitlines()[0] == "{'loss': 0}"
        and kept[3]["text"].splitlines()[-1] == "{'loss': 29}"
    )
    assert "14 lines of the reference run's log left out" in kept[3]["text"]
    assert (
        build_notebooks.scrub(copy.deepcopy(kept)) == kept
    )  # scrubbing again changes nothing (builds re-apply it)
    assert kept[0]["text"] == "wrote outputs/cpu-tiny/a.gguf, <tmp>/x.png\n"
    assert kept[1]["data"]["image/png"] == "iVBORw0KGgo=" and kept[1]["metadata"] == {
        "image/png": {"width": 720}
    }
    assert kept[2]["data"]["text/plain"] == "<Thing>"


@pytest.mark.parametrize("nb", NOTEBOOKS + SOLVED, ids=nb_id)
def test_notebook_follows_the_course_shape(nb):
    cs = cells(nb)
    first = source(cs[0])
    assert first.startswith("# ") and "## Learning objectives" in first
    assert ("colab-badge.svg" in first) == bool(build_notebooks.COURSE_REPO) and "Colab" in first
    assert "COLAB_" in source(cs[1]) and "PINS" in source(cs[1])
    params = [c for c in cs if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1 and 'PROFILE = "auto"' in source(params[0])
    markdown = "\n".join(source(c) for c in cs if c["cell_type"] == "markdown")
    assert "## Summary" in markdown and "## Exercises" in markdown
    assert markdown.count("🐢") and markdown.count("🐕") and markdown.count("🦁")
    assert "check(" in "\n".join(source(c) for c in cs[-6:])  # exercises are self-checking
    headings = [i for i, c in enumerate(cs) if c["cell_type"] == "markdown" and "## Exercises" in source(c)]
    checks = [i for i, c in enumerate(cs) if c["cell_type"] == "code" and "check(" in source(c)]
    assert len(headings) == 1 and checks and min(checks) > headings[0]  # the exercises come last...
    teardown = [
        i for i, c in enumerate(cs) if re.search(r"\.stop\(\)", source(c)) and c["cell_type"] == "code"
    ]
    assert all(i > max(checks) for i in teardown if i > headings[0])  # ...but before any server stops


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.name)
def test_install_cell_pins_equal_requirements_and_spare_colab_torch(nb):
    tree = ast.parse(source(cells(nb)[1]))
    values = {
        t.id: ast.literal_eval(n.value)
        for n in tree.body
        if isinstance(n, ast.Assign)
        for t in n.targets
        if isinstance(t, ast.Name) and t.id in ("PINS", "TORCH_PINS")
    }
    cell_pins = {p.split("==")[0].lower(): p.split("==")[1] for p in values["PINS"] + values["TORCH_PINS"]}
    expected = {k: v for k, v in requirement_pins().items() if k not in build_notebooks.NOT_IN_INSTALL_CELL}
    assert cell_pins == expected
    assert not any(
        p.startswith(("torch==", "torchvision==")) for p in values["PINS"]
    )  # Colab keeps its torch


def test_environment_yml_has_the_same_pins_as_requirements():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    pins = {p.split("==")[0].lower(): p.split("==")[1] for p in pip if "==" in p}
    assert pins == requirement_pins()


def test_notebooks_are_in_sync_with_their_lesson_sources():
    """Edit lessons/*.py and run tools/build_notebooks.py (--execute to refresh checked outputs)."""
    assert build_notebooks.build(execute=False, check=True) == []


def test_the_sync_check_sees_an_edited_source(tmp_path, monkeypatch):
    source = next(build_notebooks.LESSONS.glob("00_*.py"))
    edited = tmp_path / source.name
    edited.write_text(source.read_text() + '\n# %%\nprint("an edit nobody rebuilt")\n')
    monkeypatch.setattr(build_notebooks, "LESSONS", tmp_path)
    stale = [nb_id(p) for p in build_notebooks.build(execute=False, check=True)]
    assert stale == ["00_setup.ipynb", "solutions/00_setup.ipynb"]


def test_the_sync_check_sees_an_edited_solution(tmp_path, monkeypatch):
    source = next(build_notebooks.LESSONS.glob("00_*.py"))
    text = source.read_text()
    assert text.count("# SOLUTION: friend_profile = ") == 1
    edited = tmp_path / source.name
    edited.write_text(text.replace("# SOLUTION: friend_profile = ", "# SOLUTION: friend_profile = 1 or "))
    monkeypatch.setattr(build_notebooks, "LESSONS", tmp_path)
    stale = [nb_id(p) for p in build_notebooks.build(execute=False, check=True)]
    assert stale == ["solutions/00_setup.ipynb"]  # the learner's notebook has no answer to go stale


def test_every_lesson_has_its_solutions_notebook():
    assert [p.name for p in SOLVED] == [p.name for p in NOTEBOOKS]


def code_cells(nb):
    return [source(c) for c in cells(nb) if c["cell_type"] == "code"]


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=nb_id)
def test_learner_notebook_is_its_solutions_notebook_without_the_answers(nb):
    """CI executes the solutions only: every other line of the learner's notebook must be the same."""
    import difflib

    solved = ROOT / "notebooks" / "solutions" / nb.name
    mine, theirs = cells(nb), cells(solved)
    assert [c["cell_type"] for c in mine] == [c["cell_type"] for c in theirs]
    assert source(theirs[0]).startswith(source(mine[0]).partition("\n")[0] + "\n\n**Solutions.**")
    answered = 0
    for i, (learner, solution) in enumerate(zip(mine[1:], theirs[1:]), start=1):
        assert learner.get("metadata") == solution.get("metadata"), f"{nb.name} cell {i}"
        if "NBVAL_CHECK_OUTPUT" in source(learner):  # shown outputs are the learner notebook's only
            assert learner.get("outputs") == solution.get("outputs"), (
                f"{nb.name} cell {i}: checked outputs differ"
            )
        a, b = source(learner).splitlines(), source(solution).splitlines()
        for tag, i1, i2, _, _ in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
            if tag == "equal":
                continue
            changed = a[i1:i2]  # only a TODO answer line may differ, each replaced by its solution
            assert len(changed) == 1 and re.fullmatch(r"\s*\w+ = None  # TODO.*", changed[0]), (
                f"{nb.name} cell {i}: {tag} {changed} — only '<answer> = None  # TODO' lines may differ"
            )
            answered += 1
    assert answered >= 3, f"{nb.name}: every tier's answer is in the solutions notebook"


def exercise_calls(code):
    """The ``check("NN-id", answer, **run)`` calls of a cell."""
    return [
        node
        for node in ast.walk(ast.parse(code))
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "check"
    ]


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=nb_id)
def test_no_exercise_holds_its_expected_value(nb):
    """Each check names its exercise and the learner's answer — nothing else. The expected value is
    computed by course_utils.exercises from the run objects, never written in the learner's cell."""
    from course_utils.exercises import EXERCISES

    solved = code_cells(ROOT / "notebooks" / "solutions" / nb.name)
    used = []
    for code, solution in zip(code_cells(nb), solved):
        assert "SOLUTION" not in code and "SOLUTION" not in solution
        for call in exercise_calls(code):
            exercise_id, answer = (call.args + [None, None])[:2]
            assert len(call.args) == 2 and isinstance(exercise_id, ast.Constant), ast.unparse(call)
            assert exercise_id.value in EXERCISES and exercise_id.value.startswith(nb.name[:2] + "-"), (
                exercise_id.value
            )
            assert isinstance(answer, ast.Name), f"{ast.unparse(call)}: the answer must be a variable"
            for keyword in call.keywords:  # run objects the learner made, never a constant
                assert not any(isinstance(n, ast.Constant) for n in ast.walk(keyword.value)), ast.unparse(
                    call
                )
                assert keyword.arg in EXERCISES[exercise_id.value].needs, ast.unparse(call)
            assert re.search(rf"^{answer.id} = None  # TODO", code, re.M), f"{answer.id}: no TODO line"
            answer_lines = set(solution.splitlines()) - set(code.splitlines())
            assert answer_lines and not answer_lines & set(code.splitlines())
            used.append(exercise_id.value)
    assert sorted(used) == sorted(k for k in EXERCISES if k.startswith(nb.name[:2] + "-")), "one check each"


def test_pytest_executes_each_notebook_once_the_solutions():
    import tomllib

    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    paths = [ROOT / p for p in options["testpaths"]]
    assert ROOT / "notebooks" / "solutions" in paths and ROOT / "notebooks" not in paths
    for a in paths:  # no folder is collected twice through a parent also listed
        assert not any(a != b and b in a.parents for b in paths), a
    assert "--nbval-lax" in options["addopts"]


def test_nbval_waits_long_enough_for_a_busy_kernels_last_messages():
    import conftest as root_conftest

    class IPyNbCell:  # the shape of nbval's item: it sets output_timeout = 5 in __init__
        output_timeout = 5

    class Other:
        output_timeout = 5

    items = [IPyNbCell(), Other()]
    root_conftest.pytest_collection_modifyitems(items)
    assert [i.output_timeout for i in items] == [root_conftest.NBVAL_OUTPUT_TIMEOUT_S, 5]
    assert root_conftest.NBVAL_OUTPUT_TIMEOUT_S >= 30


def _run_install_cell(monkeypatch, tmp_path, environ: dict, installed_torch="2.9.0+cu126"):
    """Execute lesson 00's install cell as on a machine without the course: record what it runs."""
    import importlib.util
    import site
    import subprocess
    from importlib import metadata

    for key in ("COURSE_REPO", "COURSE_DIR", *[k for k in os.environ if k.startswith("COLAB_")]):
        monkeypatch.delenv(key, raising=False)
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "course_utils" else real_find_spec(n, *a)
    )
    real_version = metadata.version
    monkeypatch.setattr(metadata, "version", lambda n: installed_torch if n == "torch" else real_version(n))
    monkeypatch.setattr(site, "addsitedir", lambda *a: None)
    commands = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: commands.append(list(cmd)))
    code = source(cells(NOTEBOOKS[0])[1])
    exec(compile(code, "install-cell", "exec"), {})
    return commands


def test_install_cell_never_clones_a_placeholder(monkeypatch, tmp_path):
    with pytest.raises(SystemExit, match="Set COURSE_REPO"):
        _run_install_cell(
            monkeypatch, tmp_path, {"COLAB_RELEASE_TAG": "x", "COURSE_DIR": str(tmp_path / "none")}
        )


def test_install_cell_on_colab_keeps_colabs_torch(monkeypatch, tmp_path):
    repo = "https://example.org/me/course.git"
    target = str(tmp_path / "course")
    commands = _run_install_cell(
        monkeypatch, tmp_path, {"COLAB_RELEASE_TAG": "x", "COURSE_REPO": repo, "COURSE_DIR": target}
    )
    clone, pip = commands
    assert clone == ["git", "clone", "--depth", "1", repo, target]
    assert pip[-2:] == ["-e", target]
    assert not any(a.startswith(("torch==", "torchvision==", "xformers==", "triton==")) for a in pip)
    constraints = Path(pip[pip.index("-c") + 1]).read_text().split()
    assert "torch==2.9.0+cu126" in constraints  # pip may not replace Colab's torch
    # elsewhere (RunPod, a laptop) the tested torch is installed
    Path(target).mkdir()
    commands = _run_install_cell(monkeypatch, tmp_path, {"COURSE_REPO": repo, "COURSE_DIR": target})
    assert "torch==2.14.1" in commands[-1] and len(commands) == 1  # the clone already exists: not again
