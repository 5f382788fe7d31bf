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
