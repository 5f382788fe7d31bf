"""Merge → GGUF → quantize → verify → Ollama Modelfile, offline (lesson 06).

Where learners' exports die, and what this module does about each:

- *llama.cpp clone/build fails* — nothing is cloned or built at run time. llama.cpp's own converters
  come from the ``llama-cpp-python`` source distribution on PyPI (it vendors ``convert_hf_to_gguf.py``,
  ``convert_lora_to_gguf.py`` and their ``gguf-py``), and K-quants come from
  ``llama_cpp.llama_model_quantize`` in the installed wheel — the same code as ``llama-quantize``.
- *out of disk while merging* — :func:`disk_preflight` refuses before writing, and says how much.
- *vision lost* — the Pixtral projector is written with ``--mmproj``, with the upstream
  ``img_break`` bug worked around (:mod:`course_utils.gguf_convert`), and checked by loading it.
- *template mismatch → runaway generations* — the GGUF carries the training template; llama.cpp's
  rendering is compared token for token with transformers', and the Ollama TEMPLATE is derived from
  the same template, not typed by hand.

Every file is written under a temporary name and renamed when complete; existing exports are never
replaced unless ``overwrite=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

LLAMA_CPP_PYTHON = "0.3.36"  # keep equal to requirements.txt (a test checks)
TOOLS_ENV_VAR = "LLAMA_CPP_DIR"

# llama.cpp file types (llama_ftype) and approximate bits per weight for planning disk space.
QUANT_TYPES = {
    "F16": (1, 16.0),
    "BF16": (32, 16.0),
    "Q8_0": (7, 8.5),
    "Q5_K_M": (17, 5.7),
    "Q4_K_M": (15, 4.9),
}

# Logit parity tolerances per file type, relative to the spread (std) of the reference logits, and the
# share of positions whose top-1 token must agree. Measured on the stand-in (lesson 06) with margin.
TOLERANCES = {
    "F16": {"rel_mean_abs": 0.005, "top1": 0.98},
    "BF16": {"rel_mean_abs": 0.02, "top1": 0.95},
    "Q8_0": {"rel_mean_abs": 0.03, "top1": 0.95},
    "Q5_K_M": {"rel_mean_abs": 0.15, "top1": 0.85},
    "Q4_K_M": {"rel_mean_abs": 0.25, "top1": 0.75},
}


class ExportError(RuntimeError):
    """An export step failed; the message says which step and why."""


class DiskSpaceError(ExportError):
    """Not enough free disk for the planned export."""


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


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
    from course_utils.paths import outputs_dir

    if os.environ.get(TOOLS_ENV_VAR):
        own = Path(os.environ[TOOLS_ENV_VAR])
        if not (own / "convert_hf_to_gguf.py").is_file():
            raise ExportError(f"${TOOLS_ENV_VAR}={own} has no convert_hf_to_gguf.py")
        return own
    target = Path(cache_dir) if cache_dir else outputs_dir("tools") / f"llama.cpp-{LLAMA_CPP_PYTHON}"
    if (target / "convert_hf_to_gguf.py").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".llama.cpp-") as tmp:
        archive = Path(sdist) if sdist else _download_sdist(Path(tmp))
        staging = Path(tmp) / "tree"
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
        if not target.exists():
            os.replace(staging, target)
    return target


def _download_sdist(folder: Path) -> Path:
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


# --- Disk planning -------------------------------------------------------------------------------


@dataclass
class ExportPlan:
    parameters: int
    files: dict[str, int]  # artifact → estimated bytes

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())

    def rows(self) -> list[dict]:
        return [{"artifact": k, "estimated size": _gib(v)} for k, v in self.files.items()] + [
            {"artifact": "total (+10 % margin)", "estimated size": _gib(self.total_bytes * 1.1)}
        ]


def plan_export(
    parameters: int,
    quantizations: tuple[str, ...] = ("F16", "Q8_0", "Q4_K_M"),
    merged_bytes_per_param: float = 2.0,
) -> ExportPlan:
    """Bytes each artifact will take: merged safetensors (16-bit), then one GGUF per type."""
    files = {"merged safetensors": int(parameters * merged_bytes_per_param)}
    for q in quantizations:
        files[f"GGUF {q}"] = int(parameters * QUANT_TYPES[q][1] / 8)
    return ExportPlan(parameters, files)


def disk_preflight(folder: str | os.PathLike, needed_bytes: float, free_bytes: int | None = None) -> int:
    """Refuse (:class:`DiskSpaceError`) unless ``folder``'s disk has ``needed_bytes`` + 10 % free.

    ``free_bytes`` replaces the measured free space (tests simulate a full disk with it).
    """
    folder = Path(folder)
    probe = folder if folder.exists() else next(p for p in folder.parents if p.exists())
    free = shutil.disk_usage(probe).free if free_bytes is None else free_bytes
    needed = int(needed_bytes * 1.1)
    if free < needed:
        raise DiskSpaceError(
            f"not enough disk at {folder}: the export needs about {_gib(needed)} "
            f"(estimate + 10 %), {_gib(free)} is free. Free space, pick another folder, "
            "or export fewer quantizations."
        )
    return free


def _refuse_existing(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose another name or pass overwrite=True")


class _staged:
    """``with _staged(path) as tmp:`` write ``tmp``; it becomes ``path`` only if the block succeeds."""

    def __init__(self, path: Path):
        self.path, self.tmp = path, path.with_name(f".{path.name}.partial")

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type, *exc) -> bool:
        try:
            if exc_type is None:
                os.replace(self.tmp, self.path)
        finally:
            self.tmp.unlink(missing_ok=True)
        return False


# --- Merge ---------------------------------------------------------------------------------------


def merge_adapter(
    model,
    processor,
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    overwrite: bool = False,
    free_bytes: int | None = None,
) -> Path:
    """Fold a LoRA adapter into a 16/32-bit base model and save safetensors + processor + template.

    ``model`` must be loaded unquantized (``models.load(..., load_in_4bit=False)``): merging into 4-bit
    weights would round the update away. On a GPU with Unsloth, ``model.save_pretrained_merged(out,
    tokenizer, save_method="merged_16bit")`` does the same.
    """
    from peft import PeftModel

    out_dir = Path(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out_dir} exists and is not empty; choose another folder or pass overwrite=True"
        )
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_quantized", False):
        raise ExportError(
            "the base model is loaded in 4-bit; load it in 16-bit to merge "
            "(models.load(profile, load_in_4bit=False))"
        )
    element = next(model.parameters()).element_size()
    disk_preflight(out_dir.parent, model.num_parameters() * element, free_bytes)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        merged.save_pretrained(staging, safe_serialization=True)
        processor.save_pretrained(staging)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


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
    _refuse_existing(out_path, overwrite)
    tools = tools or llama_cpp_tools()
    with _staged(out_path) as tmp:
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
    _refuse_existing(out_path, overwrite)
    tools = tools or llama_cpp_tools()
    if not Path(base_dir).is_dir():  # a Hub id: the converter needs only the base's config files
        from huggingface_hub import snapshot_download

        base_dir = snapshot_download(str(base_dir), allow_patterns=["*.json"])
    with _staged(out_path) as tmp:
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
    _refuse_existing(dst, overwrite)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[qtype][0]
    params.nthread = nthread
    with _staged(dst) as tmp:
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


def open_gguf(
    model_path: str | os.PathLike,
    mmproj: str | os.PathLike | None = None,
    n_ctx: int = 4096,
    n_threads: int | None = None,
    logits_all: bool = False,
    seed: int = 0,
):
    """A ``llama_cpp.Llama`` for an exported model; with ``mmproj``, images work in chat completions.

    Threads: one fewer than the CPU cores (at least 1) — on a 2-core machine llama.cpp's OpenMP
    threads otherwise fight the rest of the process and run several times slower.
    """
    from llama_cpp import Llama

    threads = n_threads or max(1, (os.cpu_count() or 2) - 1)
    handler = None
    if mmproj is not None:
        handler = vision_chat_handler(model_path, mmproj)
    return Llama(
        str(model_path),
        n_ctx=n_ctx,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=logits_all,
        chat_handler=handler,
        verbose=False,
        seed=seed,
    )


def vision_chat_handler(model_path: str | os.PathLike, mmproj: str | os.PathLike):
    """llama-cpp-python's multimodal (mtmd) handler, driven by the GGUF's own chat template."""
    return vision_handler_class(model_path)(clip_model_path=str(mmproj), verbose=False)


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


# --- Verification --------------------------------------------------------------------------------


def logit_parity(llm, model, processor, conversations: list[list[dict]]) -> dict:
    """Next-token logits of llama.cpp (``llm`` opened with ``logits_all=True``) vs transformers, on the
    same token ids, over every position of every conversation."""
    import numpy as np
    import torch

    diffs, agree, spread, positions = [], 0, [], 0
    for conversation in conversations:
        ids = processor.apply_chat_template(
            conversation, tokenize=True, return_dict=True, return_tensors="pt"
        )["input_ids"]
        with torch.no_grad():
            reference = model(input_ids=ids.to(model.device)).logits[0].float().cpu().numpy()
        llm.reset()
        llm.eval(ids[0].tolist())
        got = np.asarray(llm.scores[: ids.shape[1]], dtype=np.float32)
        diffs.append(np.abs(got - reference).ravel())
        spread.append(reference.std())
        agree += int((got.argmax(-1) == reference.argmax(-1)).sum())
        positions += ids.shape[1]
    diff = np.concatenate(diffs)
    return {
        "positions": positions,
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "rel_mean_abs": float(diff.mean() / np.mean(spread)),
        "top1": agree / positions,
    }


def gguf_replies(
    llm, records: list[dict], max_new_tokens: int = 200, progress: bool = True, details: list | None = None
) -> list[str]:
    """Greedy chat completions from llama.cpp for each record's prompt (its messages minus the reply),
    images sent as data URIs — the same requests a server would get. With ``details`` (a list), each
    reply's ``finish_reason``, ``prompt_tokens`` and ``completion_tokens`` are appended to it."""
    from tqdm.auto import tqdm

    from course_utils.chat import openai_messages
    from course_utils.evaluate import prompts_of

    replies = []
    for prompt in tqdm(prompts_of(records), desc="llama.cpp", disable=not progress):
        out = llm.create_chat_completion(
            messages=openai_messages(prompt), max_tokens=max_new_tokens, temperature=0.0
        )
        replies.append(out["choices"][0]["message"]["content"] or "")
        if details is not None:
            details.append(
                {
                    "finish_reason": out["choices"][0]["finish_reason"],
                    "prompt_tokens": out["usage"]["prompt_tokens"],
                    "completion_tokens": out["usage"]["completion_tokens"],
                }
            )
    return replies


def served_replies(
    model_path: str | os.PathLike,
    records: list[dict],
    mmproj: str | os.PathLike | None = None,
    max_new_tokens: int = 200,
    n_ctx: int = 2048,
    progress: bool = True,
    details: list | None = None,
) -> list[str]:
    """Like :func:`gguf_replies`, but the GGUF is served by its own llama.cpp server process
    (``serve.llama_server``: 127.0.0.1, the model's template, images through ``mmproj``) and asked over
    the OpenAI-compatible API — the way lesson 07 serves it. One process per model: nothing of one
    model's C state (its projector context above all) outlives it or meets the next model's. Decoding is
    plain greedy (``repeat_penalty`` 1.0, not the server's default 1.1), so replies equal
    :func:`gguf_replies` on the same file."""
    from tqdm.auto import tqdm

    from course_utils import serve
    from course_utils.chat import openai_messages
    from course_utils.evaluate import prompts_of

    replies = []
    with serve.llama_server(model_path, mmproj=mmproj, alias="eval", n_ctx=n_ctx) as server:
        api = serve.client(server.url + "/v1", timeout=600)
        for prompt in tqdm(
            prompts_of(records), desc=f"llama.cpp server {Path(model_path).name}", disable=not progress
        ):
            # llama_cpp.server (like Ollama) applies repeat_penalty 1.1 unless told otherwise:
            # plain greedy here, as in lesson 05 and in gguf_replies
            out = api.chat.completions.create(
                model="eval",
                messages=openai_messages(prompt),
                max_tokens=max_new_tokens,
                temperature=0.0,
                extra_body={"repeat_penalty": 1.0},
            )
            replies.append(out.choices[0].message.content or "")
            if details is not None:
                details.append(
                    {
                        "finish_reason": out.choices[0].finish_reason,
                        "prompt_tokens": out.usage.prompt_tokens,
                        "completion_tokens": out.usage.completion_tokens,
                    }
                )
    return replies


def within_tolerance(parity: dict, qtype: str) -> bool:
    limits = TOLERANCES[qtype.upper()]
    return parity["rel_mean_abs"] <= limits["rel_mean_abs"] and parity["top1"] >= limits["top1"]


def llama_cpp_prompt_ids(llm, conversation: list[dict]) -> list[int]:
    """Token ids llama-cpp-python feeds the model for a chat completion with the GGUF's embedded
    template (its own ``Jinja2ChatFormatter``, special-token texts and BOS rule — as ``Llama`` and
    ``python -m llama_cpp.server`` do)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    formatter = Jinja2ChatFormatter(
        llm.metadata["tokenizer.chat_template"],
        eos_token=llm._model.token_get_text(llm.token_eos()),
        bos_token=llm._model.token_get_text(llm.token_bos()),
    )
    result = formatter(messages=conversation)
    return llm.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True)


def template_parity(llm, processor, conversations: list[list[dict]]) -> list[dict]:
    """Conversations whose llama.cpp token ids differ from transformers' (empty = parity)."""
    mismatches = []
    for i, conversation in enumerate(conversations):
        expected = processor.apply_chat_template(
            _as_parts(conversation), tokenize=True, return_dict=True, return_tensors="pt"
        )["input_ids"][0].tolist()
        got = llama_cpp_prompt_ids(llm, conversation)
        if got != expected:
            first = next(
                (j for j, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected))
            )
            mismatches.append(
                {
                    "conversation": i,
                    "first_difference": first,
                    "llama_cpp": got[first : first + 5],
                    "transformers": expected[first : first + 5],
                }
            )
    return mismatches


def _as_parts(conversation: list[dict]) -> list[dict]:
    """Plain-string contents as text parts (the processor's template takes both; be explicit)."""
    return [
        dict(m, content=[{"type": "text", "text": m["content"]}]) if isinstance(m["content"], str) else m
        for m in conversation
    ]


# --- Ollama --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TemplateParts:
    """The literal pieces of a chat template around each role's content."""

    bos: str
    system_prefix: str
    system_suffix: str
    user_prefix: str
    user_suffix: str
    assistant_suffix: str

    def render(self, messages: list[dict]) -> str:
        """The prompt these parts build — compared with the Jinja template by the tests."""
        out = self.bos
        for m in messages:
            content = (
                m["content"]
                if isinstance(m["content"], str)
                else "\n\n".join(p["text"] for p in m["content"] if p.get("type") == "text")
            )
            if m["role"] == "system":
                out += self.system_prefix + content + self.system_suffix
            elif m["role"] == "user":
                out += self.user_prefix + content + self.user_suffix
            else:
                out += content.rstrip(" ") + self.assistant_suffix
        return out


def template_parts(processor) -> TemplateParts:
    """Derive the pieces by rendering the processor's (training) template around sentinel strings."""
    s, u, a, u2 = "\x00SYS\x00", "\x00USER\x00", "\x00ASSISTANT\x00", "\x00USER2\x00"
    text = processor.apply_chat_template(
        _as_parts(
            [
                {"role": "system", "content": s},
                {"role": "user", "content": u},
                {"role": "assistant", "content": a},
                {"role": "user", "content": u2},
            ]
        ),
        tokenize=False,
    )
    bos_and_sys_prefix, rest = text.split(s)
    sys_suffix_user_prefix, rest = rest.split(u)
    user_suffix, rest = rest.split(a)
    assistant_suffix_user_prefix, user_suffix_2 = rest.split(u2)
    # the user prefix is what precedes a user turn in both places; the rest belongs to system/assistant
    user_prefix = os.path.commonprefix([sys_suffix_user_prefix[::-1], assistant_suffix_user_prefix[::-1]])[
        ::-1
    ]
    bos = (
        processor.tokenizer.bos_token
        if bos_and_sys_prefix.startswith(processor.tokenizer.bos_token or "\x01")
        else ""
    )
    if user_suffix != user_suffix_2:
        raise ExportError(
            "the template renders user turns differently by position; write the TEMPLATE by hand"
        )
    return TemplateParts(
        bos=bos,
        system_prefix=bos_and_sys_prefix[len(bos) :],
        system_suffix=sys_suffix_user_prefix[: len(sys_suffix_user_prefix) - len(user_prefix)],
        user_prefix=user_prefix,
        user_suffix=user_suffix,
        assistant_suffix=assistant_suffix_user_prefix[: len(assistant_suffix_user_prefix) - len(user_prefix)],
    )


def ollama_template(parts: TemplateParts, bos_in_template: bool = True) -> str:
    """An Ollama (Go text/template) TEMPLATE with the same pieces as the training template.

    BOS belongs in the template only when the GGUF's tokenizer does not add it itself: pass
    ``bos_in_template=not read_gguf_kv(gguf, "tokenizer.ggml.add_bos_token")``. The course's GGUFs do not
    add it (the training template writes ``<s>``); a GGUF that does would start with two."""
    return (
        (parts.bos if bos_in_template else "") + "{{- range $i, $_ := .Messages }}\n"
        f'{{{{- if eq .Role "system" }}}}{parts.system_prefix}{{{{ .Content }}}}{parts.system_suffix}\n'
        f'{{{{- else if eq .Role "user" }}}}{parts.user_prefix}{{{{ .Content }}}}{parts.user_suffix}\n'
        f'{{{{- else if eq .Role "assistant" }}}}{{{{ .Content }}}}{parts.assistant_suffix}\n'
        "{{- end }}\n{{- end }}"
    )


def modelfile(
    gguf_name: str,
    parts: TemplateParts,
    system: str | None = None,
    num_ctx: int = 8192,
    temperature: float = 0.15,
    projector: str | None = None,
    stop: tuple[str, ...] | None = None,
    repeat_penalty: float = 1.0,
    bos_in_template: bool = True,
) -> str:
    """An Ollama Modelfile for an exported GGUF. ``stop`` defaults to the end-of-turn piece and the
    next-turn marker of the template, so a model that forgets ``</s>`` still stops. ``repeat_penalty``
    1.0 switches off Ollama's default 1.1, which the model was never evaluated with (and which pushes
    against the repeated quotes and braces JSON is made of)."""
    stops = stop or tuple(
        dict.fromkeys(x for x in (parts.assistant_suffix.strip(), parts.user_prefix.strip()) if x)
    )
    lines = [
        "# Generated by course_utils.export from the training chat template. Files are next to this file.",
        f"FROM ./{gguf_name}",
    ]
    if projector:
        lines += [
            "# Vision projector: Ollama >= 0.30.4 reads a second FROM as the image projector.",
            f"FROM ./{projector}",
        ]
    lines += ['TEMPLATE """' + ollama_template(parts, bos_in_template) + '"""']
    if system:
        lines.append('SYSTEM """' + system + '"""')
    lines += [
        f"PARAMETER temperature {temperature}",
        f"PARAMETER num_ctx {num_ctx}",
        f"PARAMETER repeat_penalty {repeat_penalty}",
    ]
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"


def ollama_commands(name: str, modelfile_path: str | os.PathLike) -> dict[str, list[str]]:
    """Argument lists for ``ollama create`` / ``ollama run`` (run them only where ``ollama`` exists)."""
    return {
        "create": ["ollama", "create", name, "-f", str(modelfile_path)],
        "run": ["ollama", "run", name, "Extract: Café Nord, 2 tea 1.50 EUR, total 3.00"],
    }


# --- Unsloth (GPU) -------------------------------------------------------------------------------


def unsloth_llama_cpp_env(tools: Path) -> dict[str, str]:
    """Variables that make Unsloth's ``save_pretrained_gguf`` use this local llama.cpp instead of
    cloning and building one from GitHub.

    unsloth_zoo reads ``UNSLOTH_LLAMA_CPP_PATH`` when it is imported: set these in ``os.environ``
    *before* ``import unsloth``. Without built llama.cpp binaries, ask Unsloth for ``f16``/``q8_0``
    (converter only) and make K-quants with :func:`quantize`.
    """
    return {
        "UNSLOTH_LLAMA_CPP_PATH": str(tools),
        "UNSLOTH_LLAMA_CPP_SCRIPTS_DIR": str(tools),
        "UNSLOTH_LLAMA_CPP_OFFLINE": "1",
    }


# --- Manifest ------------------------------------------------------------------------------------


def sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(
    export_dir: str | os.PathLike,
    files: list[str | os.PathLike],
    extra: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """``manifest.json``: every exported file's size and sha256 (plus ``extra``), written atomically."""
    from course_utils.paths import atomic_write

    export_dir = Path(export_dir)
    entries = []
    for f in files:
        p = Path(f)
        entries.append(
            {
                "file": p.relative_to(export_dir).as_posix() if p.is_relative_to(export_dir) else str(p),
                "bytes": p.stat().st_size,
                "sha256": sha256(p),
            }
        )
    payload = {"files": entries, **(extra or {})}
    return atomic_write(
        export_dir / "manifest.json", json.dumps(payload, indent=1, default=str), overwrite=overwrite
    )


def verify_manifest(manifest_path: str | os.PathLike) -> list[str]:
    """Files whose size or checksum no longer match (empty = all good)."""
    manifest_path = Path(manifest_path)
    bad = []
    for entry in json.loads(manifest_path.read_text())["files"]:
        p = manifest_path.parent / entry["file"]
        if not p.exists():
            bad.append(f"{entry['file']}: missing")
        elif p.stat().st_size != entry["bytes"] or sha256(p) != entry["sha256"]:
            bad.append(f"{entry['file']}: changed (size or sha256 differs)")
    return bad
