"""Write the course notebooks from their sources in ``lessons/`` (jupytext percent scripts).

Usage: ``python tools/build_notebooks.py [--execute] [--only 04] [--check]``

* A lesson source is a plain Python file: ``# %%`` starts a code cell, ``# %% [markdown]`` a markdown
  cell written as comments, ``# %% tags=["copyable"]`` tags a cell. Editors, ruff and diffs see code.
  Its first cell is the lesson's title, introduction and objectives.

* The shared opening cells (badge, install, parameters, versions) come from one place, so every
  lesson starts the same way and the install cell always carries requirements.txt's pins.
* Exercises: the learner's answer line ends in ``# TODO …`` and is followed by its solution as
  ``# SOLUTION: <code>`` comment lines (one or more, indentation kept after the marker). The learner
  notebook ``notebooks/NN_*.ipynb`` drops the ``# SOLUTION:`` lines; the solutions notebook
  ``notebooks/solutions/NN_*.ipynb`` puts them in place of the TODO line. The two are otherwise
  identical (a test checks it), and CI runs the solutions under nbval, so every exercise's check passes.
* With ``--execute`` each solutions notebook is run on ``cpu-tiny`` and only the outputs of cells marked
  ``# NBVAL_CHECK_OUTPUT`` are kept (deterministic ones, which nbval then compares) — in both notebooks,
  whose checked cells are the same code; every other output, execution count and volatile metadata is
  stripped — the committed notebooks stay clean.
* Cells tagged ``show-output`` (``# %% tags=["show-output"]``) keep the reference run's outputs — tables,
  printed metrics, plots as PNG — in the learner notebook, so GitHub and Colab previews show what a
  lesson produces. Volatile bits are kept out (stderr, progress bars and widget views, memory
  addresses); timings stay, and the opening cells say they come from a 2-core CPU reference run. The
  solutions notebooks carry checked outputs only (CI runs them; showing twice would double the size).
  The budget for all committed notebooks is ``SIZE_BUDGET`` bytes (a test enforces it).
"""

from __future__ import annotations

import argparse
import ast
import copy
import os
import re
import sys
from pathlib import Path

import jupytext
import nbformat

ROOT = Path(__file__).resolve().parent.parent
LESSONS = ROOT / "lessons"
SOLUTIONS = "solutions"  # notebooks/solutions/: the same notebooks with the exercises answered
SOLUTION_MARK = "# SOLUTION:"
SHOW_TAG = "show-output"  # the reference run's outputs stay in the learner notebook
SIZE_BUDGET = 4 * 1024 * 1024  # bytes, every committed notebook (learner + solutions) together
VOLATILE_MIME = ("application/vnd.jupyter.widget-view+json",)  # progress bars: views of dead widgets
PROGRESS = re.compile(r"\d+%\|")  # tqdm's text form: "Loading weights:   0%|          | 0/53"
STREAM_KEEP = 8  # a shown cell's printed log keeps its first and last lines
ADDRESS = re.compile(r" at 0x[0-9a-fA-F]{6,}")
TMP_PATH = re.compile(r"/tmp/[^\s'\"]*/")


def unmachine(text: str) -> str:
    """A shown output's text without this machine in it: no memory addresses, no absolute paths."""
    text = ADDRESS.sub("", text).replace(str(ROOT) + "/", "").replace(str(ROOT), ".")
    return TMP_PATH.sub("<tmp>/", text.replace(str(Path.home()), "~"))


SOLUTIONS_NOTE = (
    "**Solutions.** This copy has the exercises answered; the lesson itself is "
    "`notebooks/{name}`. Try them there first."
)


def _course_repository() -> str:
    """``[tool.course] repository`` in pyproject.toml: the one place a fork names its git URL (badges and
    the install cell use it). Empty: no badge, and the install cell asks for ``COURSE_REPO``."""
    import tomllib

    return (
        tomllib.loads((ROOT / "pyproject.toml").read_text())
        .get("tool", {})
        .get("course", {})
        .get("repository", "")
    )


COURSE_REPO = _course_repository()
NOT_IN_INSTALL_CELL = {
    "pytest",
    "nbval",
    "hypothesis",
    "jupyterlab",
    "ipykernel",
    "jupytext",
    "ruff",
}  # dev/test tools, or the running kernel is already there (Colab has its own)
TORCH = {"torch", "torchvision"}


def requirement_pins() -> list[str]:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if re.match(r"^[A-Za-z]", line)]


def install_cell() -> str:
    pins = [p for p in requirement_pins() if p.split("==")[0] not in NOT_IN_INSTALL_CELL]
    torch_pins = [p for p in pins if p.split("==")[0] in TORCH]
    other = [p for p in pins if p.split("==")[0] not in TORCH]

    def fmt(items):
        return "[\n" + "".join(f'    "{p}",\n' for p in items) + "]"

    return f'''\
# Install only where needed (Colab, RunPod, a fresh box). In the course's own environment this does nothing.
import importlib.util
import os
import site
import subprocess
import sys
import tempfile
from importlib import metadata

IN_COLAB = "COLAB_" in "".join(os.environ)
# The course's git repository (your fork): set it here or as COURSE_REPO in the environment.
COURSE_REPO = os.environ.get("COURSE_REPO", "{COURSE_REPO}")
COURSE_DIR = os.environ.get("COURSE_DIR", os.path.expanduser("~/mistral-small-course"))
TORCH_PINS = {fmt(torch_pins)}
PINS = {fmt(other)}  # the same pins as requirements.txt (a test checks it)
BUILT_FOR_TORCH = ("torch", "torchvision", "triton")  # Colab's own builds: kept, never replaced
if importlib.util.find_spec("course_utils") is None:
    if not os.path.isdir(COURSE_DIR):
        if not COURSE_REPO:
            raise SystemExit(
                "Set COURSE_REPO (in this cell or the environment) to the course's git URL, "
                "e.g. https://github.com/<you>/<your-fork>, and run this cell again."
            )
        subprocess.run(["git", "clone", "--depth", "1", COURSE_REPO, COURSE_DIR], check=True)
    pins, keep = TORCH_PINS + PINS, []
    if IN_COLAB:  # keep Colab's CUDA torch; pip picks the xformers build made for it
        found = [name for name in BUILT_FOR_TORCH if importlib.util.find_spec(name)]
        keep = [f"{{name}}=={{metadata.version(name)}}" for name in found]
        pins = [p for p in PINS if not p.startswith(("xformers==", "triton=="))]
    constraints = os.path.join(tempfile.gettempdir(), "course-keep-torch.txt")
    with open(constraints, "w") as f:
        f.write("\\n".join(keep) + "\\n")
    command = [sys.executable, "-m", "pip", "install", "-q", "-c", constraints, *pins, "-e", COURSE_DIR]
    subprocess.run(command, check=True)
    site.addsitedir(site.getsitepackages()[0])  # pick up the editable install without a restart'''


def badge(name: str, folder: str = "notebooks") -> str:
    if not COURSE_REPO:
        return (
            "*Open in Colab: File → Open notebook → GitHub, paste your fork's URL "
            "(or set `repository` under `[tool.course]` in pyproject.toml for a badge).*"
        )
    url = COURSE_REPO.replace("https://github.com/", "https://colab.research.google.com/github/")
    return f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url}/blob/main/{folder}/{name})"


PARAMETERS = (
    '# "auto" | "cpu-tiny" | "t4-16gb" | "gpu-24gb" | "gpu-80gb" (COURSE_PROFILE overrides "auto")\n'
    'PROFILE = "auto"\n'
    '# "mistral-small-3.2" | "mistral-small-4" (COURSE_MODEL overrides; cpu-tiny runs its stand-in)\n'
    'MODEL = "mistral-small-3.2"'
)

VERSIONS = """# NBVAL_IGNORE_OUTPUT
from course_utils.hardware import detect, versions
from course_utils.profiles import resolve_profile

hardware = detect()
profile = resolve_profile(PROFILE, hardware=hardware, model=MODEL)
MODEL = profile.model  # COURSE_MODEL, when set, wins over the cell above
print(hardware.summary())
print("profile:", profile.name, "—", profile.description)
print("model:", MODEL, "—", profile.model_key)
print("  ".join(f"{name} {version}" for name, version in versions().items()))"""


def split_solution(code: str, where: str = "a cell") -> tuple[str, str]:
    """A code cell as (learner version, solution version): ``# SOLUTION:`` lines dropped, or put in
    place of the ``# TODO`` line just above them."""
    learner: list[str] = []
    solution: list[str] = []
    block: list[str] = []

    def close_block():
        if not block:
            return
        if not learner or "# TODO" not in learner[-1]:
            sys.exit(f"{where}: '{SOLUTION_MARK}' lines must follow the answer's '# TODO' line")
        solution[-1:] = block
        block.clear()

    for line in code.splitlines():
        stripped = line.lstrip()
        if stripped.startswith(SOLUTION_MARK):
            body = stripped[len(SOLUTION_MARK) :]
            body = body[1:] if body.startswith(" ") else body
            block.append((line[: len(line) - len(stripped)] + body).rstrip())
            continue
        close_block()
        learner.append(line)
        solution.append(line)
    close_block()
    return "\n".join(learner), "\n".join(solution)


def solution_cells(cells: list[tuple[str, str, dict]], name: str) -> list[tuple[str, str, dict]]:
    """The solutions notebook's cells: a note in the title cell, the exercises answered."""
    (_, title, meta), *rest = cells
    head, _, body = title.partition("\n")
    body = body.replace(badge(name), badge(name, f"notebooks/{SOLUTIONS}"))
    out = [("markdown", f"{head}\n\n{SOLUTIONS_NOTE.format(name=name)}\n{body}", meta)]
    for i, (kind, text, metadata) in enumerate(rest, start=1):
        out.append((kind, split_solution(text, f"{name} cell {i}")[1] if kind == "code" else text, metadata))
    return out


def learner_cells(cells: list[tuple[str, str, dict]], name: str) -> list[tuple[str, str, dict]]:
    return [
        (kind, split_solution(text, f"{name} cell {i}")[0] if kind == "code" else text, metadata)
        for i, (kind, text, metadata) in enumerate(cells)
    ]


def read_lesson(source: Path) -> list[tuple[str, str, dict]]:
    """The cells of one lesson source, with the shared opening cells after its first (title) cell
    (solution lines still in: see :func:`learner_cells` and :func:`solution_cells`)."""
    cells = [
        (c.cell_type, c.source, {"tags": list(c.metadata["tags"])} if c.metadata.get("tags") else {})
        for c in jupytext.read(source, fmt="py:percent").cells
    ]
    kind, head, _ = cells[0]
    if kind != "markdown" or not head.startswith("# "):
        sys.exit(
            f"{source.relative_to(ROOT)}: the first cell must be the markdown title cell ('# NN · Title')"
        )
    title, _, rest = head.partition("\n")
    name = source.stem + ".ipynb"
    return [("markdown", f"{title}\n\n{badge(name)}\n{rest}", {}), *opening(), *cells[1:]]


def opening() -> list[tuple[str, str, dict]]:
    return [
        ("code", install_cell(), {}),
        (
            "markdown",
            "**Parameters.** `auto` picks the largest rung your hardware fits; set a name to override "
            "(or `COURSE_PROFILE=…` in the environment). The outputs shown under some cells come from the "
            "course's reference run on `cpu-tiny` (random-weight stand-ins, 2 CPU cores): your timings "
            "differ, and on a GPU profile so does every figure.",
            {},
        ),
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
        cell = (
            nbformat.v4.new_markdown_cell(source) if kind == "markdown" else nbformat.v4.new_code_cell(source)
        )
        cell.metadata = dict(metadata)
        cell.pop("id", None)
        nb.cells.append(cell)
    nb.nbformat_minor = 4  # no cell ids: fewer volatile diffs
    return nb


def shown(cell) -> bool:
    return cell.cell_type == "code" and SHOW_TAG in cell.metadata.get("tags", [])


def coalesce_streams(outputs: list) -> list:
    """Adjacent stream outputs of one stream as one (a streamed reply arrives as one output per token)."""
    merged: list = []
    for output in outputs:
        previous = merged[-1] if merged else None
        if (
            output.get("output_type") == "stream"
            and previous is not None
            and previous.get("output_type") == "stream"
            and previous.get("name") == output.get("name")
        ):
            previous.text = "".join(previous.text) + "".join(output.text)
        else:
            merged.append(copy.deepcopy(output))
    return merged


def volatile(output) -> bool:
    """Outputs a shown cell drops whole: stderr, progress bars, inline apps of a server that is gone."""
    if output.get("name") == "stderr":
        return True
    if output.get("output_type") not in ("display_data", "execute_result"):
        return False
    data = output.get("data", {})
    if any(k in data for k in VOLATILE_MIME):
        return True  # a progress bar (its text form is a frozen frame of it)
    if set(data) == {"text/plain"} and PROGRESS.search("".join(data["text/plain"])):
        return True
    return "<iframe" in "".join(data.get("text/html", ""))


def scrub(outputs: list) -> list:
    """A shown cell's outputs without their volatile parts (see the module's docstring); scrubbing
    scrubbed outputs changes nothing."""
    kept = []
    for output in coalesce_streams([o for o in outputs if not volatile(o)]):
        if output.get("output_type") in ("display_data", "execute_result"):
            data = dict(output.data)
            for mime in ("text/plain", "text/html", "text/markdown"):
                if mime in data:
                    data[mime] = unmachine("".join(data[mime]))
            output.data = data
            output.metadata = {k: v for k, v in output.get("metadata", {}).items() if k in data}  # image size
        elif output.get("output_type") == "stream":
            lines = unmachine("".join(output.text)).splitlines(keepends=True)
            if len(lines) > 2 * STREAM_KEEP + 1:  # a long log: its head and tail say what it did
                left_out = f"… ({len(lines) - 2 * STREAM_KEEP} lines of the reference run's log left out)\n"
                lines = [*lines[:STREAM_KEEP], left_out, *lines[-STREAM_KEEP:]]
            output.text = "".join(lines)
        kept.append(output)
    return kept


def clean(nb: nbformat.NotebookNode, show: bool = False) -> nbformat.NotebookNode:
    """Keep outputs (and counts) only for NBVAL_CHECK_OUTPUT cells — and, with ``show`` (the learner
    notebook), the scrubbed outputs of ``show-output`` cells; drop the rest and run metadata."""
    nb.metadata.pop("widgets", None)  # widget state: random ids and progress-bar timings
    nb.metadata["language_info"] = {"name": "python"}  # the kernel fills in its Python version
    for cell in nb.cells:
        cell.pop("id", None)
        if cell.cell_type != "code":
            continue
        cell.metadata.pop("execution", None)
        if "NBVAL_CHECK_OUTPUT" in cell.source:
            # nbval treats a cell without an execution count as never run, so checked cells keep theirs
            cell.outputs = [o for o in cell.outputs if o.get("name") != "stderr"]
        elif show and shown(cell):  # keeps its count: nbval refuses a cell with outputs and none
            cell.outputs = scrub(cell.outputs)
            cell.execution_count = cell.execution_count if cell.outputs else None
        else:
            cell.execution_count = None
            cell.outputs = []
    return nb


def write_environment_yml() -> None:
    """environment.yml carries requirements.txt's pins (conda for Python, pip for the rest)."""
    path = ROOT / "environment.yml"
    head = path.read_text().split("  - pip:\n")[0]
    path.write_text(
        head + "  - pip:\n" + "".join(f"      - {p}\n" for p in requirement_pins()) + "      - -e .\n"
    )


def code_key(source: str) -> str:
    """What a cell computes, formatting aside: reformatting a cell (ruff format) keeps its outputs."""
    try:
        return ast.dump(ast.parse(source))
    except SyntaxError:
        return source


def keep_checked_outputs(nb: nbformat.NotebookNode, *paths: Path, show: bool = False) -> None:
    """Without executing: reuse the outputs of checked cells (and with ``show``, of shown cells) whose
    code is unchanged in ``paths`` (the first notebook that has the cell wins)."""
    old: dict[str, nbformat.NotebookNode] = {}
    for path in reversed(paths):
        if path.exists():
            cells = nbformat.read(path, as_version=4).cells
            old.update({code_key(c.source): c for c in cells if c.cell_type == "code"})
    for cell in nb.cells:
        key = code_key(cell.source)
        if cell.cell_type == "code" and "NBVAL_CHECK_OUTPUT" in cell.source and key in old:
            cell.outputs, cell.execution_count = old[key].outputs, old[key].execution_count
        elif show and shown(cell) and key in old and old[key].outputs:
            cell.outputs, cell.execution_count = old[key].outputs, old[key].execution_count


def copy_checked_outputs(source: nbformat.NotebookNode, target: nbformat.NotebookNode) -> None:
    """Give ``target``'s checked and shown cells the outputs of the same code in the executed ``source``."""
    executed = {code_key(c.source): c for c in source.cells if c.cell_type == "code"}
    for cell in target.cells:
        key = code_key(cell.source)
        if (
            cell.cell_type == "code"
            and key in executed
            and ("NBVAL_CHECK_OUTPUT" in cell.source or shown(cell))
        ):
            cell.outputs, cell.execution_count = executed[key].outputs, executed[key].execution_count


def build(execute: bool, only: list[str] | None = None, check: bool = False) -> list[Path]:
    """Write (or with ``check``, compare) every notebook and its solutions notebook; returns the
    notebooks written or out of sync."""
    if not check:
        write_environment_yml()
    written = []
    for source in sorted(LESSONS.glob("[0-9][0-9]_*.py")):
        name = source.stem + ".ipynb"
        if only and not any(name.startswith(o) for o in only):
            continue
        cells = read_lesson(source)
        path, solved_path = ROOT / "notebooks" / name, ROOT / "notebooks" / SOLUTIONS / name
        nb, solved = to_notebook(learner_cells(cells, name)), to_notebook(solution_cells(cells, name))
        pairs = ((nb, path, solved_path, True), (solved, solved_path, path, False))
        if check:
            for notebook, own, other, show in pairs:
                keep_checked_outputs(notebook, own, other, show=show)
                if not own.exists() or nbformat.writes(clean(notebook, show)) + "\n" != own.read_text():
                    print(f"{os.path.relpath(own, ROOT)} is out of sync with {os.path.relpath(source, ROOT)}")
                    written.append(own)
            continue
        if execute:
            from nbclient import NotebookClient

            os.environ["COURSE_PROFILE"] = "cpu-tiny"
            NotebookClient(
                solved, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
            ).execute()
            copy_checked_outputs(solved, nb)
        else:
            for notebook, own, other, show in pairs:
                keep_checked_outputs(notebook, own, other, show=show)
        solved_path.parent.mkdir(exist_ok=True)
        for notebook, own, _, show in pairs:
            nbformat.write(clean(notebook, show), own)
            written.append(own)
            print("wrote", own.relative_to(ROOT))
    return written


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--execute", action="store_true")
    parser.add_argument("--only", action="append")
    parser.add_argument("--check", action="store_true", help="exit 1 if a notebook differs from its source")
    args = parser.parse_args()
    stale = build(args.execute, args.only, check=args.check)
    if args.check:
        sys.exit(f"rebuild with: python tools/build_notebooks.py ({len(stale)} out of sync)" if stale else 0)
