"""``python -m llama_cpp.server`` with the course's vision chat format (used by :mod:`course_utils.serve`),
and that format's pieces (used in process by :mod:`course_utils.gguf_verify`).

Backs lessons 06 and 07.

Usage: the same options as ``python -m llama_cpp.server``. With ``--clip_model_path`` (the exported
projector), image requests are formatted with the model's own embedded chat template instead of
LLaVA-1.5's: llama-cpp-python's server picks its multimodal handler by ``--chat_format``, so this
wrapper installs the course's handler under the ``llava-1-5`` name before the server starts.
"""

from __future__ import annotations

import os
import re
import sys

from course_utils.export import ExportError


def main(argv: list[str]) -> None:
    import llama_cpp.llama_chat_format as chat_format

    if "--clip_model_path" in argv:
        model = argv[argv.index("--model") + 1]
        chat_format.Llava15ChatHandler = vision_handler_class(model)
        if "--chat_format" not in argv:
            argv = [*argv, "--chat_format", "llava-1-5"]
    sys.argv = ["llama_cpp.server", *argv]
    from llama_cpp.server.__main__ import main as server_main

    server_main()


# --- Serving template: the training template, with images as media markers -------------------------


def serving_template(chat_template: str, bos_text: str = "<s>", eos_text: str = "</s>") -> str:
    """The training template for llama.cpp's multimodal handler: generation markers removed (plain
    Jinja has no ``{% generation %}``), image parts rendered as their URL — which llama-cpp-python
    swaps for its media marker and then for the image embeddings — and BOS/EOS written as their token
    texts (that handler passes ``detokenize(bos)``, which is empty for control tokens, so the prompt
    would silently lose its ``<s>``)."""
    out = re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", chat_template)
    out = out.replace("bos_token", repr(bos_text)).replace("eos_token", repr(eos_text))
    image = "{{- '[IMG]' -}}"
    if image not in out:
        raise ExportError("the chat template has no image placeholder to adapt")
    return out.replace(
        image, "{{- chunk['image_url']['url'] if chunk['image_url'] is mapping else chunk['image_url'] -}}"
    )


def vision_handler_class(model_path: str | os.PathLike):
    """A ``Llava15ChatHandler`` subclass whose prompt format is the GGUF's embedded (training) template."""
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Llava15ChatHandler

    vocab = Llama(str(model_path), vocab_only=True, verbose=False)
    try:
        template = vocab.metadata.get("tokenizer.chat_template")
        bos, eos = (
            vocab._model.token_get_text(vocab.token_bos()),
            vocab._model.token_get_text(vocab.token_eos()),
        )
    finally:
        vocab.close()
    if not template:
        raise ExportError(f"{model_path} carries no tokenizer.chat_template")

    class MistralVisionChatHandler(Llava15ChatHandler):
        DEFAULT_SYSTEM_MESSAGE = None  # the template decides; no LLaVA default prompt
        CHAT_FORMAT = serving_template(template, bos, eos)

    return MistralVisionChatHandler


if __name__ == "__main__":
    main(sys.argv[1:])
