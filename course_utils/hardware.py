"""What machine is this, and will the chosen model fit — answered before anything is downloaded.

Backs lesson 00 (hardware planning) and every lesson's opening cell.

Detection imports torch only (never unsloth: importing unsloth patches transformers and TRL, so the
course makes that decision once, in :mod:`course_utils.models`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from course_utils.profiles import MODELS, PROFILES, GiB, Profile, pick_profile


@dataclass(frozen=True)
class HardwareInfo:
    accelerator: str  # "cuda" | "mps" | "cpu"
    device_name: str
    vram_gib: float | None
    ram_gib: float
    disk_free_gib: float
    cpu_count: int
    environment: str  # "colab" | "runpod" | "kaggle" | "local"
    # Set when nvidia-smi sees a GPU that torch cannot use (driver older than torch's CUDA build):
    # what is wrong and which driver/torch pair would work. ``auto`` refuses instead of picking cpu-tiny.
    unusable_gpu: str | None = None
    note: str | None = None  # what else the detection could not do (torch missing or broken)

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        vram = f"{self.vram_gib:.1f} GiB VRAM" if self.vram_gib else "no GPU memory"
        return (
            f"{self.accelerator.upper()} ({self.device_name}), {vram}, {self.ram_gib:.1f} GiB RAM, "
            f"{self.disk_free_gib:.1f} GiB free disk, {self.cpu_count} CPU cores, "
            f"environment: {self.environment}" + (f" — {self.note}" if self.note else "")
        )


def detect_environment(environ: dict | None = None) -> str:
    """Colab, RunPod, Kaggle or a local box, from the variables those platforms set."""
    env = os.environ if environ is None else environ
    if any(k.startswith("COLAB_") for k in env):
        return "colab"
    if "RUNPOD_POD_ID" in env:
        return "runpod"
    if "KAGGLE_KERNEL_RUN_TYPE" in env:
        return "kaggle"
    return "local"


def _ram_gib() -> float:
    try:
        import psutil

        return psutil.virtual_memory().total / GiB
    except ImportError:  # pragma: no cover - psutil is in requirements
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB


def disk_free_gib(path: str | os.PathLike = ".") -> float:
    """Free space on the file system that holds ``path`` (the nearest existing parent)."""
    p = Path(path).resolve()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free / GiB


# Minimum Linux driver for each CUDA release (NVIDIA CUDA Toolkit release notes, "CUDA Toolkit and
# Corresponding Driver Versions", https://docs.nvidia.com/cuda/cuda-toolkit-release-notes/ , read 2026-11).
# With CUDA's minor-version compatibility a 12.x build also runs on any driver >= 525.60.13; 13.x needs 580.
MIN_DRIVER = {
    "12.0": "525.60.13",
    "12.4": "550.54.14",
    "12.6": "560.28.03",
    "12.8": "570.26",
    "12.9": "575.51.03",
    "13.0": "580.65.06",
}


@dataclass(frozen=True)
class NvidiaSmi:
    """What the driver reports, independent of torch."""

    gpus: tuple[str, ...]
    driver_version: str
    cuda_version: str | None  # the newest CUDA runtime this driver runs ("CUDA Version" in nvidia-smi)


def nvidia_smi(run=subprocess.run) -> NvidiaSmi | None:
    """Ask ``nvidia-smi`` (if installed) which GPUs and driver the machine has; ``None`` without one."""
    if run is subprocess.run and shutil.which("nvidia-smi") is None:
        return None
    try:
        listing = run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        header = run(["nvidia-smi"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    rows = [line.rsplit(",", 1) for line in listing.stdout.splitlines() if "," in line]
    if listing.returncode != 0 or not rows:
        return None
    cuda = re.search(r"CUDA Version:\s*([0-9]+\.[0-9]+)", header.stdout or "")
    return NvidiaSmi(
        gpus=tuple(name.strip() for name, _ in rows),
        driver_version=rows[0][1].strip(),
        cuda_version=cuda.group(1) if cuda else None,
    )


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v))


def unusable_gpu_message(smi: NvidiaSmi, torch_version: str, torch_cuda: str | None) -> str:
    """Why torch cannot use the GPU nvidia-smi sees, and the driver/torch pairs that would work."""
    gpu = smi.gpus[0] + (f" (+{len(smi.gpus) - 1} more)" if len(smi.gpus) > 1 else "")
    seen = f"nvidia-smi sees {gpu} with driver {smi.driver_version}" + (
        f" (runs CUDA ≤ {smi.cuda_version})" if smi.cuda_version else ""
    )
    if torch_cuda is None:
        return (
            f"{seen}, but torch {torch_version} is a CPU-only build. Install a CUDA build of torch "
            "(https://pytorch.org/get-started/locally/), then restart the kernel."
        )
    major_minor = ".".join(torch_cuda.split(".")[:2])
    need = MIN_DRIVER.get(major_minor) or MIN_DRIVER.get(f"{major_minor.split('.')[0]}.0")
    cuda_ok = not smi.cuda_version or _version_tuple(smi.cuda_version) >= _version_tuple(torch_cuda)
    if need and _version_tuple(smi.driver_version) >= _version_tuple(need) and cuda_ok:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        state = "CUDA_VISIBLE_DEVICES is unset" if visible is None else f"CUDA_VISIBLE_DEVICES={visible!r}"
        return (
            f"{seen}, and the driver is new enough for torch {torch_version} (CUDA {torch_cuda} needs "
            f"≥ {need}), yet torch.cuda.is_available() is False. The usual causes: a CUDA_VISIBLE_DEVICES "
            f"that hides it (here: {state}), MIG mode on without a GPU instance (`nvidia-smi -L` lists "
            "MIG devices), or a container started without GPU access (`docker run --gpus all`)."
        )
    fix = [f"run on a host/pod template whose driver is ≥ {need}" if need else "update the NVIDIA driver"]
    if smi.cuda_version and _version_tuple(smi.cuda_version) < _version_tuple(torch_cuda):
        tag = "cu" + "".join(smi.cuda_version.split(".")[:2])
        fix.append(
            f"or install a torch built for CUDA ≤ {smi.cuda_version} — e.g. "
            f"`pip install torch=={torch_version.split('+')[0]} --index-url "
            f"https://download.pytorch.org/whl/{tag}` if the selector at "
            "https://pytorch.org/get-started/locally/ lists that build — then restart the kernel"
        )
    return (
        f"{seen}, but torch {torch_version} (built for CUDA {torch_cuda}) cannot use it: "
        f"torch.cuda.is_available() is False. Fix: {' '.join(fix)}."
    )


def detect(path: str | os.PathLike = ".") -> HardwareInfo:
    """Detect CUDA, Apple MPS or CPU, and the memory and disk the course can use.

    GPUs hidden on purpose (``CUDA_VISIBLE_DEVICES`` set to ``""`` or ``-1``) make a CPU run; a GPU torch
    cannot use otherwise sets ``unusable_gpu``. Without an importable torch it reports a CPU and why.
    """
    try:
        import torch
    except (ImportError, OSError) as error:  # a broken install: say so, do not fail the doctor
        torch, note = None, f"torch cannot be imported ({type(error).__name__}: {str(error)[:160]})"
    else:
        note = None
    accelerator, name, vram = "cpu", "CPU", None
    if torch is None:
        pass
    elif torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        accelerator, name, vram = "cuda", props.name, props.total_memory / GiB
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        accelerator, name = "mps", "Apple GPU (MPS)"
    import platform

    unusable = None
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1")
    if accelerator == "cpu":
        name = platform.processor() or platform.machine() or "CPU"
        smi = None if hidden else nvidia_smi()
        if smi is not None and torch is None:
            unusable = f"nvidia-smi sees {smi.gpus[0]}, but {note}: pip install -r requirements.txt"
        elif smi is not None:  # a GPU is there, torch cannot use it: never fall back to CPU silently
            unusable = unusable_gpu_message(smi, torch.__version__, torch.version.cuda)
    return HardwareInfo(
        accelerator=accelerator,
        device_name=name,
        vram_gib=vram,
        ram_gib=_ram_gib(),
        disk_free_gib=disk_free_gib(path),
        cpu_count=os.cpu_count() or 1,
        environment=detect_environment(),
        unusable_gpu=unusable,
        note=note,
    )


class PreflightError(RuntimeError):
    """The chosen profile will not fit this machine; the message says what to pick instead."""


# Bits per parameter on disk and in memory for each method's base weights.
_BITS = {"qlora": 4.5, "lora": 16, "full": 16}


def required_resources(profile: Profile) -> dict[str, float]:
    """Memory and disk a profile needs, in GiB (stand-ins need next to nothing).

    Download size: weights at the loaded precision. Memory: the profile's measured VRAM floor.
    The detailed training estimate lives in ``course_utils.memory`` (lesson 04).
    """
    if profile.is_stand_in:
        return {"memory_gib": 1.0, "disk_gib": 0.5}
    spec = MODELS[profile.model_key]
    # a pre-quantized (bnb-4bit) repository downloads 4-bit weights; anything else downloads 16-bit
    # weights and quantizes them while loading (Small 4's BF16 re-upload: ≈ 220 GiB on disk)
    prequantized = profile.load_in_4bit and "bnb-4bit" in (profile.load_id or "")
    download = spec.weights_gib(_BITS["qlora"] if prequantized else _BITS["lora"])
    # Merging an adapter and exporting GGUF later writes the 16-bit model once more.
    return {"memory_gib": profile.min_vram_gib, "disk_gib": download * 1.1 + 2}


def refuse_unfit_model(prof: Profile) -> None:
    """Refuse, before any download, a rung that cannot hold its model (Small 4 below 80 GB)."""
    if prof.runs_model:
        return
    from course_utils.memory import estimate_training_memory  # imports profiles only: no cycle

    need = estimate_training_memory(
        prof.model, "qlora", 2048, 1, 32, fused_cross_entropy=True, backend="transformers"
    ).total_gib
    raise PreflightError(
        f"Preflight refused before any download: {MODELS[prof.model].display_name} needs ≈ {need:.0f} GiB "
        f"of GPU memory even as QLoRA with 4-bit experts (axolotl's recipe, r 32, 2048 tokens), more than "
        f"profile {prof.name!r} has. Set MODEL = 'mistral-small-3.2' (or COURSE_MODEL) on this GPU, or "
        "PROFILE = 'gpu-80gb' on an 80 GB one; on any CPU, PROFILE = 'cpu-tiny' runs Small 4's stand-in."
    )


def preflight(profile: Profile, hardware: HardwareInfo | None = None) -> dict[str, float]:
    """Refuse early, with what is needed, what is there and what to pick, if ``profile`` won't fit.

    A rung that cannot hold its model at all (Small 4 below 80 GB) is refused first, with the model to
    change rather than a rung to pick. Returns the requirements when everything fits.
    """
    refuse_unfit_model(profile)
    hw = hardware or detect()
    need = required_resources(profile)
    problems = []
    if profile.min_vram_gib > 0:
        if hw.accelerator != "cuda":
            problems.append(
                f"profile {profile.name!r} needs an NVIDIA GPU with ≥ {profile.min_vram_gib:.0f} GiB "
                f"(Unsloth and 4-bit kernels need CUDA), but this machine has {hw.accelerator.upper()}"
            )
        elif (hw.vram_gib or 0) < need["memory_gib"]:
            problems.append(
                f"profile {profile.name!r} needs ≥ {need['memory_gib']:.0f} GiB of GPU memory, "
                f"this GPU ({hw.device_name}) has {hw.vram_gib:.1f} GiB"
            )
    elif hw.ram_gib < need["memory_gib"]:
        problems.append(
            f"profile {profile.name!r} needs {need['memory_gib']:.1f} GiB RAM, found {hw.ram_gib:.1f}"
        )
    if hw.disk_free_gib < need["disk_gib"]:
        problems.append(
            f"profile {profile.name!r} downloads and writes about {need['disk_gib']:.0f} GiB, "
            f"but only {hw.disk_free_gib:.1f} GiB is free"
        )
    if problems:
        suggestion = pick_profile(hw.accelerator, hw.vram_gib)
        raise PreflightError(
            "Preflight refused before any download: "
            + "; ".join(problems)
            + f". Pick {suggestion!r} instead (set PROFILE = {suggestion!r} or COURSE_PROFILE={suggestion})."
        )
    return need


def describe_profiles(hw: HardwareInfo) -> list[dict]:
    """One row per profile: does it fit this machine? Used by lesson 00's table and `doctor`."""
    rows = []
    for p in PROFILES.values():
        try:
            preflight(p, hw)
            fits, why = True, "fits"
        except PreflightError as e:
            fits, why = False, str(e).split(": ", 1)[1].split(". Pick")[0]
        rows.append({"profile": p.name, "model": p.model_key, "method": p.method, "fits": fits, "why": why})
    return rows


KEY_PACKAGES = (
    "torch",
    "transformers",
    "trl",
    "peft",
    "datasets",
    "mistral-common",
    "unsloth",
    "bitsandbytes",
)


def versions(packages=KEY_PACKAGES) -> dict[str, str]:
    """Installed versions from package metadata (nothing is imported, so unsloth patches nothing)."""
    from importlib import metadata

    found = {}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def memory_report(label: str = "") -> str:
    """Process RAM and, on CUDA, reserved/peak GPU memory — Unsloth-style "memory stats" lines."""
    import torch

    parts = []
    try:
        import psutil

        parts.append(f"RAM used by this process: {psutil.Process().memory_info().rss / GiB:.2f} GiB")
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        parts.append(
            f"GPU reserved {torch.cuda.memory_reserved() / GiB:.2f} GiB, "
            f"peak {torch.cuda.max_memory_reserved() / GiB:.2f} GiB "
            f"of {torch.cuda.get_device_properties(0).total_memory / GiB:.1f} GiB"
        )
    return (f"[{label}] " if label else "") + "; ".join(parts)
