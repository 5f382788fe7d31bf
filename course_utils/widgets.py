"""ipywidgets front-ends for choices made in notebooks, each with a plain-code fallback."""

from __future__ import annotations

from typing import Callable, Sequence


def choice(options: Sequence[str], value: str, description: str,
           on_change: Callable[[str], None] | None = None):
    """A dropdown when ipywidgets can display; otherwise ``None`` and a line saying what to edit.

    The notebook keeps a plain variable as the source of truth, so "Run all" and copying a cell into
    a script behave exactly like clicking.
    """
    try:
        import ipywidgets as widgets
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        widgets = None
    if widgets is None or get_ipython() is None:
        print(f"{description}: {value!r} (edit the variable in the cell above to change it)")
        return None
    dropdown = widgets.Dropdown(options=list(options), value=value, description=description,
                                style={"description_width": "initial"})
    if on_change is not None:
        dropdown.observe(lambda change: on_change(change["new"]), names="value")
    display(dropdown)
    return dropdown


def check(answer, expected, hint: str, *, tolerance: float = 0.0) -> None:
    """Tell the learner whether an exercise answer is right; never raises, so Run-all keeps going."""
    if answer is None:
        print(f"⏳ Not answered yet — replace None. Hint: {hint}")
        return
    try:
        ok = abs(float(answer) - float(expected)) <= tolerance * max(1.0, abs(float(expected)))
    except (TypeError, ValueError):
        ok = answer == expected
    print("✅ Correct!" if ok else f"❌ Not yet ({answer!r}). Hint: {hint}")
