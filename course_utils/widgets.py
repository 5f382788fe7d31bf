"""ipywidgets front-ends for choices made in notebooks, each with a plain-code fallback.

Used by the exercises and viewers of every lesson.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def choice(
    options: Sequence[str], value: str, description: str, on_change: Callable[[str], None] | None = None
):
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
    dropdown = widgets.Dropdown(
        options=list(options), value=value, description=description, style={"description_width": "initial"}
    )
    if on_change is not None:
        dropdown.observe(lambda change: on_change(change["new"]), names="value")
    display(dropdown)
    return dropdown


class WrongAnswer(AssertionError):
    """An exercise answer that is not right yet: the cell fails, with what is wrong and a hint."""


def _plain(value):
    """A numpy or torch scalar (``np.float32(7.1)``, ``torch.tensor(7.1)``) as the Python number it holds;
    anything else unchanged."""
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "ndim", None) == 0 and not isinstance(value, (str, bytes)):
        try:
            return item()
        except (TypeError, ValueError, RuntimeError):
            return value
    return value


def check(answer, expected, hint: str, *, tolerance: float = 0.0, label: str = "") -> bool:
    """Tell the learner whether an exercise answer is right.

    Right: prints ✅ and returns ``True``. ``None`` (the TODO untouched): prints ⏳ "not answered yet"
    and returns ``False`` — "Run all" keeps going. Wrong: raises :class:`WrongAnswer` with the hint,
    so the cell fails where the learner is looking. Numbers match within ``tolerance`` (relative to the
    expected value, at least 1); anything else must be equal. The expected value is never printed.
    """
    prefix = f"{label}: " if label else ""
    if answer is None:
        print(f"⏳ {prefix}not answered yet — replace None. Hint: {hint}")
        return False
    answer = _plain(answer)
    numbers = (int, float)
    if isinstance(answer, bool) != isinstance(expected, bool):
        ok = False  # True == 1 in Python, but True is no answer to "how many"
    elif isinstance(answer, numbers) and isinstance(expected, numbers):
        ok = abs(float(answer) - float(expected)) <= tolerance * max(1.0, abs(float(expected)))
    else:
        ok = answer == expected
    if not ok:
        raise WrongAnswer(f"❌ {prefix}not yet ({answer!r}). Hint: {hint}")
    print(f"✅ {prefix}correct!")
    return True


def example_viewer(examples: list[dict], images: list | None = None, start: int = 0):
    """Page through evaluation examples (image, expected, each model's reply) with a slider.

    ``examples`` are ``Comparison.examples``; ``images`` holds an image path (or ``None``) per example.
    Without ipywidgets it prints example ``start`` and returns ``None``; call ``render_example`` for others.
    """
    try:
        import ipywidgets as widgets
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        widgets = None
    if widgets is None or get_ipython() is None or not examples:
        print(
            render_example(examples[start], images[start] if images else None) if examples else "no examples"
        )
        return None
    import html
    from pathlib import Path

    slider = widgets.IntSlider(value=start, min=0, max=len(examples) - 1, description="example")
    picture = widgets.Image(format="png", width=260)
    text = widgets.HTML()

    def update(change=None):
        i = slider.value
        path = images[i] if images else None
        picture.value = Path(path).read_bytes() if path else b""
        picture.layout.display = None if path else "none"
        text.value = (
            f"<pre style='white-space: pre-wrap'>{html.escape(render_example(examples[i], path))}</pre>"
        )

    slider.observe(update, names="value")
    update()
    box = widgets.VBox([slider, widgets.HBox([picture, text])])
    display(box)
    return box


def render_example(example: dict, image: str | None = None) -> str:
    """One example as text: row, image, expected JSON and every model's reply with its F1."""
    import json

    lines = [
        f"row {example['index']}" + (f" · image {image}" if image else " · text row"),
        "expected: " + json.dumps(example["expected"], ensure_ascii=False),
    ]
    for name, reply in example["replies"].items():
        valid = "JSON" if example["json_valid"][name] else "no JSON"
        lines.append(f"{name} ({valid}, F1 {example['f1'][name]:.2f}): {reply[:400]}")
    return "\n".join(lines)
