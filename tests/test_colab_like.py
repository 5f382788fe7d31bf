"""A notebook opened outside the repository, as on Colab: data found from the package, lessons run."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_lessons_00_and_02_run_from_an_empty_folder_with_colabs_variables(tmp_path):
    for name in ("00_setup.ipynb", "02_vision_prompting.ipynb"):
        shutil.copy(ROOT / "notebooks" / name, tmp_path / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith("COURSE_")}
    env.update(COLAB_RELEASE_TAG="release-colab-like", COURSE_PROFILE="cpu-tiny", OMP_NUM_THREADS="2")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax"]
        + ["--nbval-current-env", "--rootdir", str(tmp_path), str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "failed" not in done.stdout
    assert not (tmp_path / "outputs").exists()  # outputs go to the course's folder, not the cwd
