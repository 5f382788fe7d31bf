"""Static checks on the committed notebooks: they parse, carry no volatile output, start and end the
course's way, agree with requirements.txt, and match their sources in lessons/."""

import ast
import json
import os
import re
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
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


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.name)
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


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.name)
def test_no_volatile_outputs_committed(nb):
    assert "widgets" not in json.loads(nb.read_text())["metadata"], f"{nb.name}: widget state committed"
    for i, cell in enumerate(cells(nb)):
        if cell["cell_type"] != "code":
            continue
        outputs = json.dumps(cell.get("outputs", []))
        if "NBVAL_CHECK_OUTPUT" not in source(cell):
            assert cell.get("outputs") == [], f"{nb.name} cell {i}: output committed on an unchecked cell"
            assert cell.get("execution_count") is None, f"{nb.name} cell {i}: execution count committed"
        assert '"stderr"' not in outputs and '"ename"' not in outputs, f"{nb.name} cell {i}: stderr/error"
        assert not re.search(r"/(root|tmp|home|work)/", outputs), f"{nb.name} cell {i}: a machine path"
        assert not re.search(r"\d+(\.\d+)? ?s(ec)?\b|it/s|0x[0-9a-f]{6,}", outputs), (
            f"{nb.name} cell {i}: timing/address"
        )


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.name)
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
    assert [p.name for p in build_notebooks.build(execute=False, check=True)] == ["00_setup.ipynb"]


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
