"""``python -m llama_cpp.server`` with the course's vision chat format (used by :mod:`course_utils.serve`).

Backs lessons 06 and 07.

Usage: the same options as ``python -m llama_cpp.server``. With ``--clip_model_path`` (the exported
projector), image requests are formatted with the model's own embedded chat template instead of
LLaVA-1.5's: llama-cpp-python's server picks its multimodal handler by ``--chat_format``, so this
wrapper installs the course's handler under the ``llava-1-5`` name before the server starts.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> None:
    import llama_cpp.llama_chat_format as chat_format

    if "--clip_model_path" in argv:
        from course_utils.export import vision_handler_class

        model = argv[argv.index("--model") + 1]
        chat_format.Llava15ChatHandler = vision_handler_class(model)
        if "--chat_format" not in argv:
            argv = [*argv, "--chat_format", "llava-1-5"]
    sys.argv = ["llama_cpp.server", *argv]
    from llama_cpp.server.__main__ import main as server_main

    server_main()


if __name__ == "__main__":
    main(sys.argv[1:])
