"""Run llama.cpp's ``convert_hf_to_gguf.py`` with one upstream fix (used by :mod:`course_utils.export`).

Usage: ``python -m course_utils.gguf_convert LLAMA_CPP_DIR MODEL_DIR [converter options…]``

The fix: for Pixtral / Mistral 3 vision projectors (``--mmproj``), the converter's ``MmprojModel``
drops every ``language_model.*`` tensor before ``LlavaVisionModel`` can copy the ``[IMG_BREAK]`` row
out of the token embeddings, so ``v.token_embd.img_break`` is missing and llama.cpp fails with
"Failed to load mtmd context". Letting the embedding through (and nothing else) restores it. The
converter then runs unchanged, with its own bundled ``gguf-py`` (PyPI's ``gguf`` does not match it).
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit(__doc__)
    root = Path(argv[0])
    script = root / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise SystemExit(f"{script} not found: point at a llama.cpp folder (course_utils.export.llama_cpp_tools())")
    sys.path[:0] = [str(root), str(root / "gguf-py")]
    sys.modules.pop("gguf", None)  # make sure the converter's own gguf-py is the one imported

    from conversion.base import MmprojModel
    from conversion.llava import LlavaVisionModel

    def filter_tensors(cls, item):
        if item[0].endswith("embed_tokens.weight"):
            return item  # LlavaVisionModel.modify_tensors keeps only the [IMG_BREAK] row of it
        return MmprojModel.filter_tensors.__func__(cls, item)

    LlavaVisionModel.filter_tensors = classmethod(filter_tensors)
    sys.argv = [str(script), *argv[1:]]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
