import json
import subprocess
import sys

import nbformat
import pytest

from course_utils.cli import check_packages, main, read_pins


def test_read_pins_normalises_names(tmp_path):
    req = tmp_path / "r.txt"
    req.write_text(
        "# c\nunsloth_zoo==2026.10.9\nTorch==2.14.1  # cpu too\nmistral-common[opencv]==1.13.1\nloose>=1\n"
    )
    assert read_pins(req) == {"unsloth-zoo": "2026.10.9", "torch": "2.14.1", "mistral-common": "1.13.1"}


def test_a_wrong_version_is_a_fail_but_a_platform_torch_is_a_note():
    rows = {c.name: c for c in check_packages({"transformers": "0.0.1", "torch": "0.0.1"})}
    assert rows["transformers"].status == "FAIL" and "pins 0.0.1" in rows["transformers"].detail
    # Colab keeps its own CUDA torch: reported, not failed (the install cell never replaces it)
    assert rows["torch"].status == "NOTE" and rows["torch"].ok and "tested with 0.0.1" in rows["torch"].detail
    assert rows["peft"].status == "OK"


def test_doctor_passes_here_and_never_imports_unsloth():
    code = (
        "import sys; from course_utils.cli import main; rc = main(['doctor']); "
        "print('UNSLOTH', 'unsloth' in sys.modules); sys.exit(rc)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]
    assert "[FAIL]" not in out.stdout and "[OK] profile" in out.stdout
    assert "UNSLOTH False" in out.stdout


def test_tiny_command_builds_both(tmp_path, capsys):
    assert main(["tiny", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "tiny-mistral-small-3" in out and "tiny-mistral-small-4" in out
    assert (tmp_path / "tiny-mistral-small-4" / "model.safetensors").is_file()


def test_tiny_with_an_unknown_name_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["tiny", "--name", "tiny-bogus"])
    assert exited.value.code == 2
    assert "invalid choice: 'tiny-bogus'" in capsys.readouterr().err
    from course_utils.profiles import STAND_IN_OF_MODEL
    from course_utils.tiny import STAND_INS

    assert set(STAND_IN_OF_MODEL.values()) == set(STAND_INS)  # the choices offered are what tiny builds


def _notebook(path, *sources):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(s) for s in sources]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def test_run_executes_in_order_and_reports_failures(tmp_path, capsys):
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    _notebook(nbs / "00_a.ipynb", "import os\nprint(os.environ['COURSE_PROFILE'])")
    _notebook(nbs / "01_b.ipynb", "raise ValueError('broken lesson')")
    _notebook(nbs / "02_c.ipynb", "print('never reached')")
    rc = main(["run", "--notebooks", str(nbs), "--out", str(tmp_path / "runs"), "--profile", "cpu-tiny"])
    captured = capsys.readouterr()
    assert rc == 1 and "broken lesson" in captured.err
    summary = json.loads((tmp_path / "runs" / "summary.json").read_text())
    assert [(r["notebook"], r["status"]) for r in summary] == [("00_a.ipynb", "ok"), ("01_b.ipynb", "FAILED")]
    executed = nbformat.read(tmp_path / "runs" / "00_a.ipynb", as_version=4)
    assert executed.cells[0].outputs[0]["text"].strip() == "cpu-tiny"


def test_run_reports_a_dead_kernel_and_a_timeout_without_a_traceback(tmp_path, capsys):
    """A kernel killed (out of memory) or a cell past --timeout is a failed lesson in the summary, not a
    traceback that loses the executed notebook and summary.json."""
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    _notebook(nbs / "00_dies.ipynb", "print('started')", "import os\nos._exit(9)")
    _notebook(nbs / "01_slow.ipynb", "import time\ntime.sleep(30)")
    argv = ["run", "--notebooks", str(nbs), "--out", str(tmp_path / "runs"), "--profile", "cpu-tiny"]
    rc = main([*argv, "--keep-going", "--timeout", "3"])
    captured = capsys.readouterr()
    assert rc == 1
    assert "00_dies.ipynb: the kernel died" in captured.err
    assert "01_slow.ipynb: a cell ran past --timeout 3 s" in captured.err
    summary = json.loads((tmp_path / "runs" / "summary.json").read_text())
    assert [(r["notebook"], r["status"]) for r in summary] == [
        ("00_dies.ipynb", "FAILED"),
        ("01_slow.ipynb", "FAILED"),
    ]
    executed = nbformat.read(tmp_path / "runs" / "00_dies.ipynb", as_version=4)
    assert executed.cells[0].outputs[0]["text"].strip() == "started"  # what ran before is kept


def test_checkpoint_runs_the_lessons_up_to_the_one_asked_for(tmp_path, capsys):
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    marker = tmp_path / "ran.txt"
    for name in ("00_a", "01_b", "02_c"):
        _notebook(nbs / f"{name}.ipynb", f"open({str(marker)!r}, 'a').write('{name[:2]} ')")
    out = tmp_path / "runs"
    assert main(["checkpoint", "--upto", "1", "--notebooks", str(nbs), "--out", str(out)]) == 0
    assert marker.read_text().split() == ["00", "01"]  # in order, and not lesson 02
    assert "Lesson 02 can start from here." in capsys.readouterr().out
    assert main(["checkpoint", "--upto", "09", "--notebooks", str(nbs), "--out", str(out)]) == 2
    assert "choose one of 00, 01, 02" in capsys.readouterr().err
