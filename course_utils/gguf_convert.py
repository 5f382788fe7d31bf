"""Run llama.cpp's converters with two upstream fixes (used by :mod:`course_utils.gguf_export`).

Backs lesson 06.

Usage: ``python -m course_utils.gguf_convert LLAMA_CPP_DIR MODEL_DIR [converter options…]``
       ``python -m course_utils.gguf_convert --lora LLAMA_CPP_DIR ADAPTER_DIR --base BASE_DIR [options…]``

The fix: for Pixtral / Mistral 3 vision projectors (``--mmproj``), the converter's ``MmprojModel``
drops every ``language_model.*`` tensor before ``LlavaVisionModel`` can copy the ``[IMG_BREAK]`` row
out of the token embeddings, so ``v.token_embd.img_break`` is missing and llama.cpp fails with
"Failed to load mtmd context". Letting the embedding through (and nothing else) restores it. The
converter then runs unchanged, with its own bundled ``gguf-py`` (PyPI's ``gguf`` does not match it).

The LoRA fix: ``Mistral3ForConditionalGeneration``'s converter class is a wrapper that hands every
step to an inner model (``self.impl``), so ``convert_lora_to_gguf.py``'s subclass of it never sees the
tensors and writes the *base model* instead of an adapter. Handing the LoRA converter the inner class
(Ministral3 / Mistral4, chosen from the base config as the wrapper would) makes it write the adapter.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    if argv[:1] == ["--lora"]:
        return lora_main(argv[1:])
    if len(argv) < 2:
        raise SystemExit(__doc__)
    root = Path(argv[0])
    script = root / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise SystemExit(
            f"{script} not found: point at a llama.cpp folder (course_utils.gguf_export.llama_cpp_tools())"
        )
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


def lora_main(argv: list[str]) -> None:
    import json

    if len(argv) < 2 or "--base" not in argv:
        raise SystemExit(__doc__)
    root = Path(argv[0])
    script = root / "convert_lora_to_gguf.py"
    sys.path[:0] = [str(root), str(root / "gguf-py")]
    sys.modules.pop("gguf", None)
    config = json.loads((Path(argv[argv.index("--base") + 1]) / "config.json").read_text())
    text_type = config.get("text_config", {}).get("model_type", config.get("model_type"))

    import conversion

    original = conversion.get_model_class

    def get_model_class(name, mmproj=False):
        cls = original(name, mmproj)
        if not mmproj and name == "Mistral3ForConditionalGeneration":
            return cls.Mistral4Model if text_type == "mistral4" else cls.Ministral3Model
        return cls

    conversion.get_model_class = get_model_class
    sys.argv = [str(script), *argv[1:]]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
