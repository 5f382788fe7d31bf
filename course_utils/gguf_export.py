"""GGUF files from a merged model: llama.cpp's converters (fetched, never cloned or built), conversion
of the language model, the vision projector and LoRA adapters, quantization, and reading GGUF metadata.

Backs lessons 06 and 07.

The converters come from the ``llama-cpp-python`` source distribution on PyPI (it vendors
``convert_hf_to_gguf.py``, ``convert_lora_to_gguf.py`` and their ``gguf-py``) and run through
:mod:`course_utils.gguf_convert` (two upstream fixes); K-quants come from ``llama_cpp.llama_model_quantize``
in the installed wheel — the same code as ``llama-quantize``. Every file is written under a temporary name
and renamed when complete (:func:`course_utils.paths.staged`); an existing file is never replaced unless
``overwrite=True``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from course_utils.export import QUANT_TYPES, ExportError
from course_utils.paths import outputs_dir, staged

LLAMA_CPP_PYTHON = "0.3.36"  # keep equal to requirements.txt (a test checks)
TOOLS_ENV_VAR = "LLAMA_CPP_DIR"


# --- llama.cpp's converters, without cloning -----------------------------------------------------

_WANTED = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "LICENSE", "conversion/", "gguf-py/")


def llama_cpp_tools(
    cache_dir: str | os.PathLike | None = None, sdist: str | os.PathLike | None = None
) -> Path:
    """A folder with llama.cpp's converters (``convert_hf_to_gguf.py`` + ``conversion/`` + ``gguf-py``).

    Order: ``$LLAMA_CPP_DIR`` (your own llama.cpp checkout), the cache
    (``outputs/tools/llama.cpp-<version>``), else the converters are extracted from the
    ``llama-cpp-python`` sdist — ``sdist`` if given, otherwise ``pip download`` fetches it from the
    package index (≈ 77 MB, once).
    """
    if os.environ.get(TOOLS_ENV_VAR):
        own = Path(os.environ[TOOLS_ENV_VAR])
        if not (own / "convert_hf_to_gguf.py").is_file():
            raise ExportError(f"${TOOLS_ENV_VAR}={own} has no convert_hf_to_gguf.py")
        return own
    target = Path(cache_dir) if cache_dir else default_tools_dir()
    if (target / "convert_hf_to_gguf.py").is_file():
        if not (target / "llama-quantize").is_file():  # a cache from before the shim existed
            write_quantize_shim(target)
        return target
    with (
        # the course's own cache: a folder there without the converter is an unfinished extraction
        staged(target, overwrite=True, folder=True) as staging,
        tempfile.TemporaryDirectory(dir=target.parent, prefix=".llama.cpp-") as tmp,
    ):
        archive = Path(sdist) if sdist else _download_sdist(Path(tmp))
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
        with tarfile.open(archive) as tar:
            members = []
            for member in tar.getmembers():
                if member.name.startswith(prefix) and member.name[len(prefix) :].startswith(_WANTED):
                    member.name = member.name[len(prefix) :]
                    members.append(member)
            if not any(m.name == "convert_hf_to_gguf.py" for m in members):
                raise ExportError(f"{archive} holds no vendor/llama.cpp/convert_hf_to_gguf.py")
            tar.extractall(staging, members=members, filter="data")
        write_quantize_shim(staging)
    return target


def default_tools_dir() -> Path:
    """Where :func:`llama_cpp_tools` keeps the converters (known before they are fetched, so Unsloth can
    be pointed at it before ``import unsloth``)."""
    return outputs_dir("tools") / f"llama.cpp-{LLAMA_CPP_PYTHON}"


QUANTIZE_SHIM = """#!{python}
# llama-quantize for a folder without llama.cpp's binaries, written by course_utils.gguf_export: the same
# llama_model_quantize function, from the installed llama-cpp-python. Unsloth's save_pretrained_gguf
# looks for this file (unsloth_zoo.llama_cpp.check_llama_cpp) and calls `llama-quantize IN OUT TYPE N`.
import ctypes
import sys

TYPES = {types}
USAGE = "usage: llama-quantize INPUT.gguf OUTPUT.gguf TYPE [NTHREADS]   TYPE: " + ", ".join(TYPES)


def main(argv):
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if len(argv) not in (3, 4) or any(a.startswith("-") for a in argv):
        print(USAGE + " (no --options here: build llama.cpp's own llama-quantize for those)", file=sys.stderr)
        return 2
    src, dst, qtype = argv[0], argv[1], argv[2].upper()
    if qtype not in TYPES:
        print(f"unknown type {{argv[2]!r}}; " + USAGE, file=sys.stderr)
        return 2
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = TYPES[qtype]
    params.nthread = int(argv[3]) if len(argv) == 4 else 0
    return 1 if llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)) else 0


sys.exit(main(sys.argv[1:]))
"""


def write_quantize_shim(folder: str | os.PathLike) -> Path:
    """An executable ``llama-quantize`` in ``folder`` that runs llama-cpp-python's quantizer, so tools
    that expect llama.cpp's binary (Unsloth's ``save_pretrained_gguf``) work offline without a build."""
    types = {name: code for name, (code, _) in QUANT_TYPES.items()}
    path = Path(folder) / "llama-quantize"
    with staged(path, overwrite=True) as tmp:
        tmp.write_text(QUANTIZE_SHIM.format(python=sys.executable, types=types))
    path.chmod(0o755)
    return path


def _local_sdist() -> Path | None:
    """The sdist in a wheelhouse pip already points at (``PIP_FIND_LINKS``, INSTRUCTOR.md): ``pip
    download`` would insist on building its metadata, which needs build tools a wheelhouse lacks."""
    for link in os.environ.get("PIP_FIND_LINKS", "").split():
        folder = Path(link.removeprefix("file://"))
        candidate = folder / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
        if candidate.is_file():
            return candidate
    return None


def _download_sdist(folder: Path) -> Path:
    local = _local_sdist()
    if local is not None:
        return local
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        f"llama-cpp-python=={LLAMA_CPP_PYTHON}",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--quiet",
        "-d",
        str(folder),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(folder.glob("llama_cpp_python-*.tar.gz"))
    if done.returncode != 0 or not found:
        raise ExportError(
            "could not download the llama-cpp-python source distribution (needs the package index; "
            f"or set ${TOOLS_ENV_VAR} to a llama.cpp checkout):\n{done.stderr[-800:]}"
        )
    return found[0]


# --- Convert and quantize ------------------------------------------------------------------------


def _run(cmd: list[str], step: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise ExportError(f"{step} failed (exit {done.returncode}):\n{tail}")
    return done.stderr


def convert_to_gguf(
    model_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    outtype: str = "f16",
    mmproj: bool = False,
    tools: Path | None = None,
    overwrite: bool = False,
) -> Path:
    """llama.cpp's ``convert_hf_to_gguf.py`` on a saved HF model: the language model, or with
    ``mmproj=True`` the vision tower + projector. ``outtype``: f32, f16, bf16 or q8_0."""
    out_path = Path(out_path)
    with staged(out_path, overwrite) as tmp:  # refuses an existing out_path first
        tools = tools or llama_cpp_tools()
        _run(
            [
                sys.executable,
                "-m",
                "course_utils.gguf_convert",
                str(tools),
                str(model_dir),
                "--outfile",
                str(tmp),
                "--outtype",
                outtype,
            ]
            + (["--mmproj"] if mmproj else []),
            f"convert_hf_to_gguf ({'projector' if mmproj else 'model'}, {outtype})",
        )
    return out_path


def convert_lora_to_gguf(
    adapter_dir: str | os.PathLike,
    base_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    outtype: str = "f16",
    tools: Path | None = None,
    overwrite: bool = False,
) -> Path:
    """The adapter alone as a GGUF LoRA (``llama-server --lora``), the alternative to merging.

    Runs llama.cpp's ``convert_lora_to_gguf.py`` through :mod:`course_utils.gguf_convert` (which fixes
    it for Mistral 3), and refuses any result that is not an adapter GGUF. LoRA on the language model
    only: trainable token rows (``trainable_token_indices``, the stand-in's trick) are not LoRA tensors.
    """
    out_path = Path(out_path)
    with staged(out_path, overwrite) as tmp:  # refuses an existing out_path first
        tools = tools or llama_cpp_tools()
        if not Path(base_dir).is_dir():  # a Hub id: the converter needs only the base's config files
            from huggingface_hub import snapshot_download

            base_dir = snapshot_download(str(base_dir), allow_patterns=["*.json"])
        _run(
            [
                sys.executable,
                "-m",
                "course_utils.gguf_convert",
                "--lora",
                str(tools),
                str(adapter_dir),
                "--base",
                str(base_dir),
                "--outfile",
                str(tmp),
                "--outtype",
                outtype,
            ],
            "convert_lora_to_gguf",
        )
        kind = read_gguf_kv(tmp, "general.type")
        if kind != "adapter":
            raise ExportError(
                f"convert_lora_to_gguf wrote a {kind!r} GGUF, not an adapter, for {adapter_dir}: "
                "llama.cpp's LoRA converter does not handle this architecture — merge instead"
            )
    return out_path


def quantize(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    qtype: str = "Q4_K_M",
    overwrite: bool = False,
    nthread: int = 0,
    log: list | None = None,
) -> Path:
    """Quantize a GGUF with llama.cpp's quantizer (``llama_model_quantize``, as ``llama-quantize``).

    llama.cpp's per-tensor report is captured (appended to ``log`` when given) instead of flooding the
    output. Tensors whose rows are not a multiple of 256 cannot use K-quants; llama.cpp falls back to
    q5_1/q8_0 for them and says so in that report (:func:`fallback_count`).
    """
    import ctypes

    import llama_cpp

    if qtype not in QUANT_TYPES:
        raise ValueError(f"unknown quantization {qtype!r}; choose one of {', '.join(QUANT_TYPES)}")
    dst = Path(dst)
    with staged(dst, overwrite) as tmp:  # refuses an existing dst first
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = QUANT_TYPES[qtype][0]
        params.nthread = nthread
        with _captured_fds() as captured:
            status = llama_cpp.llama_model_quantize(
                str(src).encode(), str(tmp).encode(), ctypes.byref(params)
            )
        if log is not None:
            log.append(captured.text)
        if status != 0:
            raise ExportError(
                f"llama_model_quantize({qtype}) returned {status} for {src}:\n{captured.text[-800:]}"
            )
    return dst


def fallback_count(quantize_log: str) -> int:
    """How many tensors llama.cpp had to quantize with a fallback type (0 on real model sizes)."""
    match = re.search(r"(\d+) of \d+ tensor\(s\) required fallback", quantize_log)
    return int(match.group(1)) if match else 0


_LOG_CALLBACK = None  # kept referenced while llama.cpp holds it


def _tolerant_llama_log(on: bool) -> None:
    """While on, llama.cpp's log lines go to ``sys.stderr`` decoded with ``errors="replace"``.

    llama-cpp-python's own callback decodes strictly, and llama.cpp cuts long metadata values (the chat
    template) at a byte count — sometimes inside a UTF-8 character, which raises inside a ctypes callback
    ("Exception ignored on calling ctypes callback function").
    """
    global _LOG_CALLBACK
    import ctypes

    import llama_cpp
    from llama_cpp import _logger

    if on and _LOG_CALLBACK is None:

        @llama_cpp.llama_log_callback
        def callback(level, text, user_data):
            print(text.decode("utf-8", "replace"), end="", file=sys.stderr)

        _LOG_CALLBACK = callback
    llama_cpp.llama_log_set(_LOG_CALLBACK if on else _logger.llama_log_callback, ctypes.c_void_p(0))


class _captured_fds:
    """Capture what llama.cpp writes: to file descriptors 1 and 2 (C code) and, through
    llama-cpp-python's log callback, to ``sys.stderr``."""

    def __enter__(self):
        import io

        sys.stdout.flush()
        sys.stderr.flush()
        self._python = io.StringIO()
        self._streams = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = self._python
        self._file = tempfile.TemporaryFile(mode="w+b")
        self._saved = [os.dup(1), os.dup(2)]
        for fd in (1, 2):
            os.dup2(self._file.fileno(), fd)
        self.text = ""
        _tolerant_llama_log(True)
        return self

    def __exit__(self, *exc):
        _tolerant_llama_log(False)
        for fd, saved in zip((1, 2), self._saved):
            os.dup2(saved, fd)
            os.close(saved)
        sys.stdout, sys.stderr = self._streams
        self._file.seek(0)
        self.text = self._file.read().decode("utf-8", "replace") + self._python.getvalue()
        self._file.close()
        return False


# --- Reading GGUF metadata -----------------------------------------------------------------------

_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def read_gguf_kv(path: str | os.PathLike, wanted: str | None = None) -> dict | object:
    """The key/value header of any GGUF (model, projector or adapter) — arrays other than short ones are
    reported by length. With ``wanted``, just that value (``None`` if absent)."""
    import struct

    def read(fmt):
        size = struct.calcsize("<" + fmt)
        return struct.unpack("<" + fmt, f.read(size))[0]

    def value(kind):
        if kind == 8:
            return f.read(read("Q")).decode("utf-8", "replace")
        if kind == 9:
            item, count = read("I"), read("Q")
            items = [value(item) for _ in range(count)]
            return items if count <= 16 else f"[{count} items]"
        return read(_GGUF_SCALARS[kind])

    out = {}
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ExportError(f"{path} is not a GGUF file")
        read("I"), read("Q")
        for _ in range(read("Q")):
            key = f.read(read("Q")).decode("utf-8")
            out[key] = value(read("I"))
            if wanted is not None and key == wanted:
                return out[key]
    return None if wanted is not None else out


def gguf_metadata(path: str | os.PathLike, keys: tuple[str, ...] | None = None) -> dict:
    """Scalar and string metadata of a GGUF (arrays other than strings are summarised by length)."""
    from llama_cpp import Llama

    llm = Llama(str(path), vocab_only=True, verbose=False)
    try:
        meta = dict(llm.metadata)
    finally:
        llm.close()
    return {k: v for k, v in meta.items() if keys is None or k in keys}
