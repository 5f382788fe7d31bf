"""Write the course notebooks from their sources in ``tools/lessons/`` (one module per lesson).

Usage: ``python tools/build_notebooks.py [--execute]``

* The shared opening cells (badge, install, parameters, versions) come from one place, so every
  lesson starts the same way and the install cell always carries requirements.txt's pins.
* With ``--execute`` each notebook is run on ``cpu-tiny`` and only the outputs of cells marked
  ``# NBVAL_CHECK_OUTPUT`` are kept (deterministic ones, which nbval then compares); every other
  output, execution count and volatile metadata is stripped — the committed notebooks stay clean.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))  # the lesson sources live beside this script (tooling only)

COURSE_REPO = "https://github.com/YOUR-ORG/mistral-small-course"
NOT_IN_INSTALL_CELL = {"pytest", "nbval", "hypothesis", "jupyterlab", "ipykernel"}  # dev/test tools, or the running kernel is already there (Colab has its own)
TORCH = {"torch", "torchvision"}


def requirement_pins() -> list[str]:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [l.split("#")[0].strip() for l in lines if re.match(r"^[A-Za-z]", l)]


def install_cell() -> str:
    pins = [p for p in requirement_pins() if p.split("==")[0] not in NOT_IN_INSTALL_CELL]
    torch_pins = [p for p in pins if p.split("==")[0] in TORCH]
    other = [p for p in pins if p.split("==")[0] not in TORCH]
    fmt = lambda items: "[\n" + "".join(f'    "{p}",\n' for p in items) + "]"
    return f'''# Install only where needed (Colab, RunPod, a fresh box). In the course's own environment this does nothing.
import importlib.util, os, site, subprocess, sys

IN_COLAB = "COLAB_" in "".join(os.environ)
COURSE_REPO = "{COURSE_REPO}"  # your fork of the course
TORCH_PINS = {fmt(torch_pins)}
PINS = {fmt(other)}  # the same pins as requirements.txt (a test checks it)
if importlib.util.find_spec("course_utils") is None:
    if not os.path.isdir("mistral-small-course"):
        subprocess.run(["git", "clone", "--depth", "1", COURSE_REPO, "mistral-small-course"], check=True)
    # Colab ships a CUDA torch: keep it instead of downloading another few GB.
    pins = PINS if IN_COLAB else TORCH_PINS + PINS
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *pins, "-e", "mistral-small-course"], check=True)
    site.addsitedir(site.getsitepackages()[0])  # pick up the editable install without a restart'''


def badge(name: str) -> str:
    url = COURSE_REPO.replace("https://github.com/", "https://colab.research.google.com/github/")
    return f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url}/blob/main/notebooks/{name})"


PARAMETERS = '''PROFILE = "auto"  # "auto" | "cpu-tiny" | "t4-16gb" | "gpu-24gb" | "gpu-80gb" (COURSE_PROFILE overrides "auto")'''

VERSIONS = '''# NBVAL_IGNORE_OUTPUT
from course_utils.hardware import detect, versions
from course_utils.profiles import resolve_profile

hardware = detect()
profile = resolve_profile(PROFILE, hardware=hardware)
print(hardware.summary())
print("profile:", profile.name, "—", profile.description)
print("  ".join(f"{name} {version}" for name, version in versions().items()))'''


def opening(name: str, title: str, intro: str, objectives: list[str]) -> list[tuple[str, str, dict]]:
    return [
        ("markdown", f"# {title}\n\n{badge(name)}\n\n{intro}\n\n## Learning objectives\n"
         + "\n".join(f"- {o}" for o in objectives), {}),
        ("code", install_cell(), {}),
        ("markdown", "**Parameters.** `auto` picks the largest rung your hardware fits; set a name to override "
                     "(or `COURSE_PROFILE=…` in the environment).", {}),
        ("code", PARAMETERS, {"tags": ["parameters"]}),
        ("code", VERSIONS, {}),
    ]


def to_notebook(cells) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
        "accelerator": "GPU",
        "colab": {"provenance": []},
    }
    for kind, source, metadata in cells:
        cell = nbformat.v4.new_markdown_cell(source) if kind == "markdown" else nbformat.v4.new_code_cell(source)
        cell.metadata = dict(metadata)
        cell.pop("id", None)
        nb.cells.append(cell)
    nb.nbformat_minor = 4  # no cell ids: fewer volatile diffs
    return nb


def clean(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Keep outputs (and counts) only for NBVAL_CHECK_OUTPUT cells; drop the rest and run metadata."""
    nb.metadata.pop("widgets", None)  # widget state: random ids and progress-bar timings
    for cell in nb.cells:
        cell.pop("id", None)
        if cell.cell_type != "code":
            continue
        cell.metadata.pop("execution", None)
        if "NBVAL_CHECK_OUTPUT" in cell.source:
            # nbval treats a cell without an execution count as never run, so checked cells keep theirs
            cell.outputs = [o for o in cell.outputs if o.get("name") != "stderr"]
        else:
            cell.execution_count = None
            cell.outputs = []
    return nb


def write_environment_yml() -> None:
    """environment.yml carries requirements.txt's pins (conda for Python, pip for the rest)."""
    path = ROOT / "environment.yml"
    head = path.read_text().split("  - pip:\n")[0]
    path.write_text(head + "  - pip:\n" + "".join(f"      - {p}\n" for p in requirement_pins()) + "      - -e .\n")


def keep_checked_outputs(nb: nbformat.NotebookNode, path: Path) -> None:
    """Without executing: reuse the outputs of checked cells whose source is unchanged in ``path``."""
    if not path.exists():
        return
    old = {c.source: c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"}
    for cell in nb.cells:
        if cell.cell_type == "code" and "NBVAL_CHECK_OUTPUT" in cell.source and cell.source in old:
            cell.outputs, cell.execution_count = old[cell.source].outputs, old[cell.source].execution_count


def build(execute: bool, only: list[str] | None = None) -> list[Path]:
    write_environment_yml()
    written = []
    lessons = sorted(p.stem for p in (ROOT / "tools" / "lessons").glob("nb[0-9][0-9]_*.py"))
    for module_name in lessons:
        module = importlib.import_module(f"lessons.{module_name}")
        name = module.NAME
        if only and not any(name.startswith(o) for o in only):
            continue
        nb = to_notebook(opening(name, module.TITLE, module.INTRO, module.OBJECTIVES) + module.CELLS)
        path = ROOT / "notebooks" / name
        if execute:
            from nbclient import NotebookClient

            os.environ["COURSE_PROFILE"] = "cpu-tiny"
            NotebookClient(nb, timeout=900, kernel_name="python3",
                           resources={"metadata": {"path": str(path.parent)}}).execute()
        else:
            keep_checked_outputs(nb, path)
        nbformat.write(clean(nb), path)
        written.append(path)
        print("wrote", path.relative_to(ROOT))
    return written


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--execute", action="store_true")
    parser.add_argument("--only", action="append")
    args = parser.parse_args()
    build(args.execute, args.only)
