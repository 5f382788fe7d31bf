import pytest

from course_utils.widgets import WrongAnswer, check, choice


def test_check_tells_right_wrong_and_unanswered(capsys):
    assert check(None, 6.5, "hint A") is False
    assert check(6.5, 6.5, "hint B") is True
    assert check(7.1, 7.11, "hint D", tolerance=0.02) is True
    assert check("gpu-24gb", "gpu-24gb", "hint E") is True
    with pytest.raises(WrongAnswer, match="hint C"):  # a wrong answer fails the cell
        check(7, 6.5, "hint C")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("⏳") and "hint A" in lines[0]
    assert lines[1:] == ["✅ correct!"] * 3


def test_choice_falls_back_to_plain_code_outside_a_notebook(capsys):
    assert choice(["a", "b"], "a", "Profile") is None
    assert "edit the variable" in capsys.readouterr().out


def test_check_reads_numpy_and_torch_numbers_with_the_tolerance(capsys):
    """A learner's answer often comes out of numpy or torch: np.float32(7.1) is within 2 % of 7.11."""
    import numpy as np
    import torch

    assert check(np.float32(7.1), 7.11, "hint", tolerance=0.02) is True
    assert check(torch.tensor(7.1), 7.11, "hint", tolerance=0.02) is True
    assert check(np.int64(6), 6, "hint") is True
    with pytest.raises(WrongAnswer):
        check(np.float64(9.0), 7.11, "hint", tolerance=0.02)
    with pytest.raises(WrongAnswer):  # a bool is still no number, from numpy too
        check(np.bool_(True), 1, "hint")


def test_lesson_00s_profile_dropdown_does_what_the_profile_variable_does(monkeypatch):
    """The dropdown's callback must resolve the rung for the chosen MODEL, as the parameters cell does:
    it took PROFILES[name] (always Small 3.2), so Small 4 learners got Small 3.2's checkpoint."""
    from pathlib import Path

    from course_utils.hardware import HardwareInfo
    from course_utils.profiles import resolve_profile

    monkeypatch.delenv("COURSE_PROFILE", raising=False)
    monkeypatch.delenv("COURSE_MODEL", raising=False)
    source = (Path(__file__).resolve().parent.parent / "lessons" / "00_setup.py").read_text()
    cell = next(c for c in source.split("# %%") if "def use_profile" in c)
    hardware = HardwareInfo("cpu", "CPU", None, 16, disk_free_gib=100, cpu_count=2, environment="local")
    namespace = {"hardware": hardware, "MODEL": "mistral-small-4", "PROFILE": "auto"}
    namespace["profile"] = resolve_profile("auto", hardware=hardware, model="mistral-small-4")
    exec(compile(cell, "00_setup.py", "exec"), namespace)
    for name in ("cpu-tiny", "gpu-80gb"):
        namespace["use_profile"](name)
        assert namespace["profile"] == resolve_profile(name, hardware=hardware, model="mistral-small-4")
