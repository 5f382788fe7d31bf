from course_utils.widgets import check, choice


def test_check_tells_right_wrong_and_unanswered(capsys):
    check(None, 6.5, "hint A")
    check(6.5, 6.5, "hint B")
    check(7, 6.5, "hint C")
    check(7.1, 7.11, "hint D", tolerance=0.02)
    check("gpu-24gb", "gpu-24gb", "hint E")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("⏳") and "hint A" in lines[0]
    assert lines[1] == "✅ Correct!" and lines[3] == "✅ Correct!" and lines[4] == "✅ Correct!"
    assert lines[2].startswith("❌") and "hint C" in lines[2]


def test_choice_falls_back_to_plain_code_outside_a_notebook(capsys):
    assert choice(["a", "b"], "a", "Profile") is None
    assert "edit the variable" in capsys.readouterr().out
