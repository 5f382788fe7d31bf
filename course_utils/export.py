"""Export planning and bookkeeping: disk space, merging an adapter, the manifest, and the errors every
export step raises.

Backs lessons 06 and 07 (lesson 07 merges and converts when lesson 06 has not run).

Lesson 06's export is split by concern across sibling modules:

- :mod:`course_utils.export` (this one) — :func:`plan_export` and :func:`disk_preflight`,
  :func:`merge_adapter`, the Unsloth variables, ``manifest.json``; :class:`ExportError`.
- :mod:`course_utils.gguf_export` — llama.cpp's converters, GGUF conversion (model, projector, LoRA),
  quantization, reading GGUF metadata.
- :mod:`course_utils.gguf_verify` — is the GGUF the model you trained? Logits, chat-template token ids
  and replies (in process or served) against transformers.
- :mod:`course_utils.ollama` — the Ollama TEMPLATE and Modelfile, derived from the training template.
- :mod:`course_utils.gguf_convert` and :mod:`course_utils.llama_server` — scripts run as child
  processes: the converter with its upstream fixes, and the llama.cpp server with the vision template.

Where learners' exports die, and what these modules do about each:

- *llama.cpp clone/build fails* — nothing is cloned or built at run time. llama.cpp's own converters
  come from the ``llama-cpp-python`` source distribution on PyPI (it vendors ``convert_hf_to_gguf.py``,
  ``convert_lora_to_gguf.py`` and their ``gguf-py``), and K-quants come from
  ``llama_cpp.llama_model_quantize`` in the installed wheel — the same code as ``llama-quantize``
  (:mod:`course_utils.gguf_export`).
- *out of disk while merging* — :func:`disk_preflight` refuses before writing, and says how much.
- *vision lost* — the Pixtral projector is written with ``--mmproj``, with the upstream
  ``img_break`` bug worked around (:mod:`course_utils.gguf_convert`), and checked by loading it.
- *template mismatch → runaway generations* — the GGUF carries the training template; llama.cpp's
  rendering is compared token for token with transformers' (:mod:`course_utils.gguf_verify`), and the
  Ollama TEMPLATE is derived from the same template, not typed by hand (:mod:`course_utils.ollama`).

Every file is written under a temporary name and renamed when complete
(:func:`course_utils.paths.staged`); existing exports are never replaced unless ``overwrite=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from course_utils.paths import atomic_write, staged

# llama.cpp file types (llama_ftype, which gguf_export.quantize asks for) and approximate bits per weight
# for planning disk space.
QUANT_TYPES = {
    "F16": (1, 16.0),
    "BF16": (32, 16.0),
    "Q8_0": (7, 8.5),
    "Q5_K_M": (17, 5.7),
    "Q4_K_M": (15, 4.9),
}


class ExportError(RuntimeError):
    """An export step failed; the message says which step and why."""


class DiskSpaceError(ExportError):
    """Not enough free disk for the planned export."""


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


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


# --- Where and how to merge: planned from the profile and the machine, before anything loads --------

MergeMethod = Literal["peft-cpu", "peft-in-place", "unsloth-merged-16bit"]
GIB = 2**30


@dataclass(frozen=True)
class MergePlan:
    """Lesson 06's export on this machine. Never a second full copy of the model: on a GPU the model
    trained in lesson 04 is merged where it already is (peft, in place) or written 16-bit shard by shard
    by Unsloth (``save_pretrained_merged``), never reloaded in 16/32-bit beside it."""

    method: MergeMethod
    load_in_4bit: bool  # how the tuned model is loaded for the merge
    peak_vram_gib: float
    peak_ram_gib: float
    disk_gib: float  # downloads + merged safetensors + GGUFs, checked before anything is downloaded
    parity: Literal["in-memory", "before-after", "skip"]  # how merged = base + adapter is checked
    task_rows: int | None  # rows of the GGUF task check (None: the whole test split)
    task_quants: tuple[str, ...]
    n_gpu_layers: int  # llama.cpp offload for the task check (-1: all layers, 0: CPU)
    reasons: tuple[str, ...]

    def rows(self) -> list[dict]:
        return [{"step": k, "plan": v} for k, v in self.__dict__.items() if k != "reasons"]


def plan_merge(
    profile,
    hardware,
    quantizations: tuple[str, ...] = ("F16", "Q8_0", "Q5_K_M", "Q4_K_M"),
    llama_cpp_gpu: bool | None = None,
    gpu_task_rows: int = 16,
) -> MergePlan:
    """How lesson 06 merges, verifies and task-checks on ``hardware`` (a ``HardwareInfo``) for ``profile``.

    ``llama_cpp_gpu``: whether the installed llama-cpp-python can offload to CUDA
    (``llama_cpp.llama_supports_gpu_offload()``; asked when None). Raises :class:`ExportError` naming what
    is short — VRAM, RAM or disk — before any download.
    """
    from course_utils.profiles import MODELS

    if profile.is_stand_in:
        return MergePlan(
            "peft-cpu", False, 0.0, 1.0, 0.5, "in-memory", None, ("F16", "Q8_0", "Q4_K_M"), 0,
            ("stand-in: merged in fp32 on the CPU and compared with base + adapter in memory",),
        )  # fmt: skip
    if hardware.accelerator != "cuda":
        raise ExportError(
            f"profile {profile.name!r} exports a {MODELS[profile.model_key].total_params_b:.0f}B model: "
            "merging it needs the GPU it was trained on (this machine has none)"
        )
    params = MODELS[profile.model_key].total_params_b * 1e9
    bf16_gib = params * 2 / GIB
    gguf_gib = sum(params * QUANT_TYPES[q][1] / 8 for q in quantizations) / GIB
    vram = hardware.vram_gib or 0.0
    reasons = []
    if profile.load_in_4bit:
        # Unsloth keeps the 4-bit model on the GPU, downloads the original 16-bit shards one at a time,
        # merges each with the adapter and writes it (unsloth_zoo.saving_utils.merge_and_overwrite_lora).
        method, load_4bit = "unsloth-merged-16bit", True
        peak_vram = profile.min_vram_gib
        peak_ram = 6.0  # one ≈5 GB shard in flight, plus Python
        disk = bf16_gib * 2 + gguf_gib  # the 16-bit download + the merged copy
        reasons.append(
            "the tuned model stays 4-bit on the GPU; Unsloth writes the 16-bit merge shard by shard "
            f"(≈{bf16_gib:.0f} GiB downloaded + {bf16_gib:.0f} GiB written)"
        )
    else:
        method, load_4bit = "peft-in-place", False
        peak_vram = bf16_gib * 1.1 + 2
        peak_ram = 6.0
        disk = bf16_gib + gguf_gib
        reasons.append("the 16-bit model on the GPU is merged in place (merge_and_unload), then saved")
    # parity: merged vs base + adapter. In place: logits before and after merging, same weights in memory.
    if method == "peft-in-place":
        parity = "before-after"
    elif bf16_gib * 1.1 + 2 <= vram:
        parity = "in-memory"
        reasons.append("the merged 16-bit model fits the GPU: compared with the 4-bit tuned model's replies")
    else:
        parity = "skip"
        reasons.append(
            f"the merged model ({bf16_gib:.0f} GiB in bf16) does not fit {vram:.0f} GiB of VRAM: the logit "
            "check is left to the GGUF and task checks below"
        )
    if llama_cpp_gpu is None:
        try:
            import llama_cpp

            llama_cpp_gpu = bool(llama_cpp.llama_supports_gpu_offload())
        except Exception:  # no llama-cpp-python: the task check will say so itself
            llama_cpp_gpu = False
    if llama_cpp_gpu:
        rows, quants, layers = gpu_task_rows, ("Q8_0", "Q4_K_M"), -1
        reasons.append(f"task check: {rows} rows per file, all layers on the GPU (llama.cpp with CUDA)")
    else:
        rows, quants, layers = max(4, gpu_task_rows // 4), ("Q4_K_M",), 0
        reasons.append(
            f"task check: llama-cpp-python here has no CUDA, so {rows} rows of Q4_K_M only on the CPU "
            "(a 24B model answers at a few tokens/s there)"
        )
    problems = []
    if peak_vram > vram:
        problems.append(f"{peak_vram:.0f} GiB of GPU memory (this GPU has {vram:.0f})")
    if peak_ram > hardware.ram_gib:
        problems.append(f"{peak_ram:.0f} GiB of RAM (this machine has {hardware.ram_gib:.1f})")
    if disk * 1.1 > hardware.disk_free_gib:
        problems.append(f"{disk * 1.1:.0f} GiB of disk (+10 %; {hardware.disk_free_gib:.0f} GiB is free)")
    if problems:
        raise ExportError(
            f"exporting {profile.model_key} ({method}) needs "
            + ", ".join(problems)
            + ": free space (or set COURSE_OUTPUTS to a bigger disk) or export fewer quantizations"
        )
    return MergePlan(
        method, load_4bit, round(peak_vram, 1), peak_ram, round(disk, 1), parity, rows, quants, layers,
        tuple(reasons),
    )  # fmt: skip


# --- Merge ---------------------------------------------------------------------------------------


def merge_adapter(
    model,
    processor,
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    overwrite: bool = False,
    free_bytes: int | None = None,
    allow_other_base: bool = False,
) -> Path:
    """Fold a LoRA adapter into a 16/32-bit base model and save safetensors + processor + template.

    ``model`` must be loaded unquantized (``models.load(..., load_in_4bit=False)``): merging into 4-bit
    weights would round the update away. On a GPU with Unsloth, ``model.save_pretrained_merged(out,
    tokenizer, save_method="merged_16bit")`` does the same.

    Refuses (:class:`ExportError`, nothing written) an adapter made for another model: one whose
    ``adapter_config.json`` names another base (:func:`same_base_model`; ``allow_other_base=True`` when
    you know it is the same weights under another name), and one whose tensors do not all load into
    ``model`` — peft only warns about those, and the merge would save the base as the tuned model.
    """
    out_dir = Path(out_dir)
    with staged(out_dir, overwrite, folder=True) as staging:  # refuses a non-empty out_dir first
        if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_quantized", False):
            raise ExportError(
                "the base model is loaded in 4-bit; load it in 16-bit to merge "
                "(models.load(profile, load_in_4bit=False))"
            )
        element = next(model.parameters()).element_size()
        disk_preflight(out_dir.parent, model.num_parameters() * element, free_bytes)
        if not allow_other_base:
            _refuse_other_base(model, Path(adapter_dir))
        merged = _load_adapter_checked(model, Path(adapter_dir)).merge_and_unload()
        merged.save_pretrained(staging, safe_serialization=True)
        processor.save_pretrained(staging)
    return out_dir


def _model_name(model) -> str:
    """Where ``model`` was loaded from (a Hub id or a folder); "" when unknown."""
    config = getattr(model, "config", None)
    return str(getattr(model, "name_or_path", "") or getattr(config, "_name_or_path", "") or "")


# Suffixes that name another precision of the same weights: Unsloth's 4-bit uploads of the 16-bit release
# (lesson 04 trains on them, lesson 06/07 merge into the 16-bit one), the BF16 re-uploads of FP8 releases.
_PRECISION_SUFFIXES = ("-unsloth-bnb-4bit", "-bnb-4bit", "-bf16", "-fp16", "-fp8", "-nvfp4")


def _canonical_model_name(name: str) -> str:
    """A Hub id or model folder reduced to the model it holds: the last part of the id or path (the repo
    name inside a Hub cache's ``models--org--name/snapshots/<hash>``), lower case, precision suffix off."""
    parts = [p for p in name.replace("\\", "/").split("/") if p and p != "."]
    cached = [p for p in parts if p.startswith("models--")]
    last = cached[-1].split("--")[-1] if cached else (parts[-1] if parts else "")
    last = last.lower()
    stripped = True
    while stripped:
        stripped = False
        for suffix in _PRECISION_SUFFIXES:
            if last.endswith(suffix) and len(last) > len(suffix):
                last, stripped = last[: -len(suffix)], True
    return last


def same_base_model(recorded: str, actual: str) -> bool:
    """Whether an adapter trained on ``recorded`` (its ``base_model_name_or_path``) belongs on the model
    loaded from ``actual``. The same string or the same folder once resolved; otherwise the same model
    name, so that what only differs in spelling passes: a relative against an absolute path, a stand-in
    rebuilt in another folder (tests) or a checkout moved since lesson 04 recorded its absolute path,
    a Hub id against its cache folder, and another precision of the same release (Unsloth's
    ``…-bnb-4bit`` upload that lesson 04 trains on against the 16-bit model lessons 06/07 merge into).
    Two folders that both exist here are compared by their ``config.json`` instead: a name such as
    ``merged`` (every course export) says nothing. Another model — another size, version or stand-in —
    does not pass."""
    if recorded == actual:
        return True
    here, there = Path(recorded).expanduser(), Path(actual).expanduser()
    if here.exists() and there.exists():
        return here.resolve() == there.resolve() or _config_of(here) == _config_of(there) != {}
    return _canonical_model_name(recorded) == _canonical_model_name(actual) != ""


def _config_of(folder: Path) -> dict:
    """A model folder's ``config.json`` without what differs between copies of one model (where it was
    loaded from, the library version, the storage precision); ``{}`` when there is none."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    volatile = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "quantization_config"}
    return {key: value for key, value in config.items() if key not in volatile}


def _refuse_other_base(model, adapter_dir: Path) -> None:
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        return  # not a local adapter folder: peft says what is wrong when it loads it
    recorded = str(json.loads(config_file.read_text()).get("base_model_name_or_path") or "")
    actual = _model_name(model)
    if recorded and actual and not same_base_model(recorded, actual):
        raise ExportError(
            f"the adapter in {adapter_dir} was trained on {recorded!r} (its adapter_config.json's "
            f"base_model_name_or_path), not on the model being merged into ({actual!r}): merged into "
            "another model it makes a broken export. Load the model it was trained on, or pass "
            "allow_other_base=True if that model is the same weights under another name."
        )


def _load_adapter_checked(model, adapter_dir: Path):
    """``PeftModel.from_pretrained(model, adapter_dir)``, refusing (:class:`ExportError`) unless every
    tensor in the adapter file went into a LoRA weight of ``model`` and every LoRA weight got one.

    ``from_pretrained`` only warns ("Found missing adapter keys") and keeps the result of loading to
    itself; the LoRA weights it could not fill stay at their initial values (``lora_B`` zero), so the
    merge changes nothing. The adapter's (small) state dict is therefore set once more with
    ``set_peft_model_state_dict`` — the call ``load_adapter`` makes, with the same key mapping — which
    returns the tensors that found no place (``unexpected_keys``) and the weights that got none
    (``missing_keys``). On refusal the LoRA layers are taken out again: ``model`` is as it was passed.
    """
    from peft import PeftModel
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    key_mapping = getattr(model, "_checkpoint_conversion_mapping", None) or None  # as from_pretrained
    weights = load_peft_weights(str(adapter_dir), device="cpu", key_mapping=key_mapping)
    result = set_peft_model_state_dict(peft_model, weights, adapter_name="default")
    prefix = getattr(peft_model.base_model, "prefix", "lora_")
    unloaded = list(result.unexpected_keys)
    unfilled = [k for k in result.missing_keys if prefix in k and ".default" in k]
    if weights and not unloaded and not unfilled:
        return peft_model
    peft_model.unload()  # the LoRA layers out again, nothing merged

    def first(names: list[str]) -> str:
        return ", ".join(names[:3]) + (", …" if len(names) > 3 else "")

    if not weights:
        what = "holds no tensors"
    elif unloaded:
        what = f"has {len(unloaded)} of {len(weights)} adapter tensors that did not load ({first(unloaded)})"
    else:
        what = f"left {len(unfilled)} LoRA weights of the model without a tensor ({first(unfilled)})"
    raise ExportError(
        f"the adapter in {adapter_dir} {what}. Its tensor names do not match this model's layers: the "
        "adapter was probably trained for another model (or another version of it). Nothing was merged "
        "or written."
    )


# --- Unsloth (GPU) -------------------------------------------------------------------------------


def unsloth_llama_cpp_env(tools: Path) -> dict[str, str]:
    """Variables that make Unsloth's ``save_pretrained_gguf`` use this local llama.cpp instead of
    cloning and building one from GitHub.

    unsloth_zoo reads ``UNSLOTH_LLAMA_CPP_PATH`` once, when it is imported — so
    :func:`course_utils.models.load` sets it (to the course's tools folder) before its ``import
    unsloth``; the other two are read at each call and can be set any time. The folder needs
    ``convert_hf_to_gguf.py`` and an executable ``llama-quantize`` (Unsloth's ``check_llama_cpp``
    demands one even for f16): :func:`course_utils.gguf_export.llama_cpp_tools` writes a
    ``llama-quantize`` that runs llama-cpp-python's quantizer when there is no built binary.
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
