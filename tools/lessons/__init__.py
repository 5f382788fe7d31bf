"""Lesson sources: each module defines NAME, TITLE, INTRO, OBJECTIVES and CELLS."""


def md(source: str):
    return ("markdown", source.strip("\n"), {})


def code(source: str, *tags: str):
    return ("code", source.strip("\n"), {"tags": list(tags)} if tags else {})
