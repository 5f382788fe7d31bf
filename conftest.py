"""pytest settings for the whole checkout: the unit tests in tests/ and the notebooks under nbval."""

NBVAL_OUTPUT_TIMEOUT_S = 60


def pytest_collection_modifyitems(items):
    """nbval waits a hard-coded 5 s for a cell's remaining output messages once the kernel has replied.
    On a 2-core CI machine, lesson 06's task-check cell (three llama.cpp servers started and stopped)
    once went past that in a clean-clone run and failed with "Timeout of 5 seconds exceeded waiting
    for output" although the cell itself had finished. Waiting longer changes no result."""
    for item in items:
        if type(item).__name__ == "IPyNbCell" and hasattr(item, "output_timeout"):
            item.output_timeout = NBVAL_OUTPUT_TIMEOUT_S
