"""Companion package for the Mistral Small fine-tuning & self-hosting course.

One module per concern, each docstring naming the lesson it backs — the README has the table of
lesson → modules → the library calls each lesson shows as plain code.
"""

__version__ = "0.1.0"

import logging as _logging


class _DropMessages(_logging.Filter):
    """Drops a logger's records that contain one of ``fragments``; everything else still passes."""

    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: _logging.LogRecord) -> bool:
        return not any(fragment in record.getMessage() for fragment in self.fragments)


# Two log lines a learner cannot act on, dropped at their source (only these messages):
# - torch 2.14 warns that libraries imported with transformers (torchao) register Enum subclasses as
#   pytree constants, a deprecation for those libraries' authors;
# - bitsandbytes 0.50 on CPUs with AVX-512 BF16 tries an optional Hub kernel (the `kernels` package,
#   which needs the internet) and logs that it is absent; its built-in CPU kernel is used instead.
_logging.getLogger("torch.utils._pytree").addFilter(_DropMessages("is an Enum subclass"))
_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropMessages("from kernels-community"))
