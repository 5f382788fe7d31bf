"""The model switch (issue 16): ``MODEL`` / ``COURSE_MODEL`` pick Small 3.2 or Small 4 — the matching
stand-in on ``cpu-tiny``, the real checkpoint on a GPU rung that holds it, a refusal before any
download on one that does not."""

import json
import sys
from pathlib import Path

import pytest
from conftest import gpu

from course_utils.hardware import PreflightError
from course_utils.models import model_source
from course_utils.profiles import (
    COURSE_MODELS,
    MODEL_ENV_VAR,
    PROFILES,
    profile_for_model,
    resolve_model,
    resolve_profile,
)


@pytest.fixture(autouse=True)
def no_model_env(monkeypatch):
    # set (empty = unset) rather than deleted, so whatever a test or `run` writes is undone after it
    monkeypatch.setenv(MODEL_ENV_VAR, "")
    monkeypatch.setenv("COURSE_PROFILE", "")


def test_default_is_small_3_2_and_the_environment_wins(monkeypatch):
    assert resolve_model() == "mistral-small-3.2"
    assert resolve_model("mistral-small-4") == "mistral-small-4"
    monkeypatch.setenv(MODEL_ENV_VAR, "mistral-small-4")
    assert resolve_model("mistral-small-3.2") == "mistral-small-4"
    assert resolve_model(environ={}) == "mistral-small-3.2"


def test_unknown_model_is_one_clear_line_naming_where_it_came_from(monkeypatch):
    with pytest.raises(
        ValueError, match=r"^Unknown model 'mistral-small-5' \(from MODEL\)\. Choose one of: "
    ):
        resolve_model("mistral-small-5")
    monkeypatch.setenv(MODEL_ENV_VAR, "small4")
    with pytest.raises(ValueError, match=r"from COURSE_MODEL.*mistral-small-3\.2, mistral-small-4\.$"):
        resolve_model()


def test_cpu_tiny_picks_the_matching_stand_in(cpu_hardware):
    assert resolve_profile("cpu-tiny").model_key == "tiny-mistral-small-3"
    small4 = resolve_profile("cpu-tiny", model="mistral-small-4")
    assert (small4.name, small4.model, small4.model_key, small4.is_stand_in) == (
        "cpu-tiny",
        "mistral-small-4",
        "tiny-mistral-small-4",
        True,
    )
    assert small4.outputs_name != PROFILES["cpu-tiny"].outputs_name == "cpu-tiny"
    # and back: the default model gives the registry's own profile
    assert profile_for_model(small4, "mistral-small-3.2") is PROFILES["cpu-tiny"]


def test_model_source_builds_the_small_4_stand_in(stand_in_dir, cpu_hardware, monkeypatch):
    source = model_source(
        "cpu-tiny", model="mistral-small-4", stand_in_dir=stand_in_dir, hardware=cpu_hardware
    )
    config = json.loads((stand_in_dir / "tiny-mistral-small-4" / "config.json").read_text())
    assert source.model_id == str(stand_in_dir / "tiny-mistral-small-4")
    assert config["text_config"]["model_type"] == "mistral4"
    assert source.tekken_file == stand_in_dir / "tiny-mistral-small-4" / "tekken.json"
    # COURSE_MODEL alone switches a lesson that passes no model (lessons 04-08 call load(PROFILE, ...))
    monkeypatch.setenv(MODEL_ENV_VAR, "mistral-small-4")
    assert (
        model_source("cpu-tiny", stand_in_dir=stand_in_dir, hardware=cpu_hardware).model_id == source.model_id
    )
    monkeypatch.setenv(MODEL_ENV_VAR, "")
    small3 = model_source("cpu-tiny", stand_in_dir=stand_in_dir, hardware=cpu_hardware)
    assert small3.model_id.endswith("tiny-mistral-small-3") and small3.tekken_file is None


def test_the_80_gb_rung_loads_the_real_small_4_checkpoint():
    source = model_source("gpu-80gb", model="mistral-small-4", hardware=gpu(80))
    assert source.model_id == "axolotl-ai-co/Mistral-Small-4-119B-2603-BF16"
    assert source.load_in_4bit and source.profile.model_key == "mistral-small-4"
    assert (
        model_source("gpu-80gb", hardware=gpu(80)).model_id == "mistralai/Mistral-Small-3.2-24B-Instruct-2506"
    )


@pytest.mark.parametrize("rung, vram", [("gpu-24gb", 24.0), ("t4-16gb", 15.0), ("gpu-24gb", 80.0)])
def test_small_4_is_refused_before_any_download_where_it_does_not_fit(rung, vram, monkeypatch):
    downloads = []
    monkeypatch.setattr("huggingface_hub.hf_hub_download", lambda *a, **k: downloads.append(a))
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda *a, **k: downloads.append(a))
    with pytest.raises(PreflightError, match=r"before any download: Mistral Small 4 .* needs ≈ \d+ GiB"):
        model_source(rung, model="mistral-small-4", hardware=gpu(vram))
    assert downloads == []
    # the same rung runs Small 3.2
    assert model_source(rung, hardware=gpu(vram)).profile.model == "mistral-small-3.2"


def test_auto_on_an_80_gb_gpu_runs_small_4():
    assert resolve_profile("auto", hardware=gpu(80), model="mistral-small-4").load_id == (
        "axolotl-ai-co/Mistral-Small-4-119B-2603-BF16"
    )


def test_every_notebook_has_the_model_parameter_and_uses_it():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    from build_notebooks import PARAMETERS, VERSIONS

    namespace: dict = {}
    exec(PARAMETERS, namespace)
    assert (namespace["PROFILE"], namespace["MODEL"]) == ("auto", "mistral-small-3.2")
    assert namespace["MODEL"] in COURSE_MODELS
    assert "model=MODEL" in VERSIONS
    import nbformat

    notebooks = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert len(notebooks) >= 9
    for path in notebooks:
        sources = [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
        assert PARAMETERS in sources, f"{path.name}: no parameters cell"
        assert any("model=MODEL" in s for s in sources[sources.index(PARAMETERS) :]), (
            f"{path.name}: MODEL is never used after the parameters cell"
        )


def test_run_sets_course_model_for_the_notebooks(tmp_path, monkeypatch):
    import nbformat

    from course_utils import cli

    nbs = tmp_path / "nbs"
    nbs.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import os\nprint(os.environ['COURSE_MODEL'])")]
    nbformat.write(nb, nbs / "00_a.ipynb")
    code = cli.main(
        [
            "run",
            "--profile",
            "cpu-tiny",
            "--model",
            "mistral-small-4",
            "--notebooks",
            str(nbs),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 0
    executed = nbformat.read(tmp_path / "o" / "00_a.ipynb", as_version=4)
    assert executed.cells[0].outputs[0]["text"].strip() == "mistral-small-4"


@pytest.mark.slow
def test_lessons_04_to_06_run_on_the_small_4_stand_in(tmp_path):
    """Lessons 04-06 on the Small 4 stand-in (MoE + MLA), as the learner runs them: lesson 04 asserts
    itself that training reaches ≥ 0.9 valid JSON, 06 that each GGUF is within the logit tolerance."""
    import os
    import subprocess

    out = tmp_path / "runs"
    command = [sys.executable, "-m", "course_utils", "run", "--profile", "cpu-tiny"]
    command += ["--model", "mistral-small-4", "--only", "04", "--only", "05", "--only", "06"]
    done = subprocess.run(
        [*command, "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "OMP_NUM_THREADS": "2"},
        timeout=2400,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    rows = json.loads((out / "summary.json").read_text())
    assert [(r["notebook"][:2], r["status"]) for r in rows] == [("04", "ok"), ("05", "ok"), ("06", "ok")]
