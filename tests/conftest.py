import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
warnings.filterwarnings("ignore", category=DeprecationWarning)


@pytest.fixture(scope="session")
def stand_in_dir(tmp_path_factory):
    """Both stand-ins, built once per test session into a private folder."""
    from course_utils.tiny import build_all

    out = tmp_path_factory.mktemp("stand-ins")
    build_all(out)
    return out


@pytest.fixture(scope="session")
def processor(stand_in_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(stand_in_dir / "tiny-mistral-small-3")


@pytest.fixture
def cpu_hardware():
    from course_utils.hardware import HardwareInfo

    return HardwareInfo(
        "cpu", "test CPU", None, ram_gib=24, disk_free_gib=100, cpu_count=2, environment="local"
    )


def gpu(vram, disk=500):
    from course_utils.hardware import HardwareInfo

    return HardwareInfo(
        "cuda", "test GPU", vram, ram_gib=64, disk_free_gib=disk, cpu_count=8, environment="local"
    )


@pytest.fixture(scope="session")
def exported(stand_in_dir, tmp_path_factory):  # used by test_export and test_serve
    """A stand-in with a non-zero LoRA adapter, merged and exported as f16 (+ projector), Q8_0, Q4_K_M."""
    from peft import LoraConfig, get_peft_model

    from course_utils import export, gguf_export
    from course_utils.models import load
    from course_utils.train import LANGUAGE_TARGETS

    out = tmp_path_factory.mktemp("export")
    tools = gguf_export.llama_cpp_tools()
    loaded = load("cpu-tiny", stand_in_dir=stand_in_dir)
    peft_model = get_peft_model(loaded.model, LoraConfig(r=4, target_modules=LANGUAGE_TARGETS))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    peft_model.save_pretrained(out / "adapter")
    fresh = load("cpu-tiny", stand_in_dir=stand_in_dir)
    merged = export.merge_adapter(fresh.model, fresh.processor, out / "adapter", out / "merged")
    files = {
        "F16": gguf_export.convert_to_gguf(merged, out / "m-f16.gguf", "f16", tools=tools),
        "mmproj": gguf_export.convert_to_gguf(
            merged, out / "mmproj-f16.gguf", "f16", mmproj=True, tools=tools
        ),
    }
    log = []
    for q in ("Q8_0", "Q4_K_M"):
        files[q] = gguf_export.quantize(files["F16"], out / f"m-{q}.gguf", q, log=log)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(merged, dtype=torch.float32).eval()
    return {
        "out": out,
        "tools": tools,
        "files": files,
        "model": model,
        "quant_log": "".join(log),
        "processor": AutoProcessor.from_pretrained(merged),
        "peft": peft_model,
        "base_dir": stand_in_dir,
    }


@pytest.fixture(scope="session")
def small4_gguf(stand_in_dir, tmp_path_factory):  # used by test_serve (Small 4's reasoning server)
    """The Small 4 stand-in (mistral4: MoE + MLA, v15 template) as an f16 GGUF."""
    import shutil

    from course_utils import gguf_export

    out = tmp_path_factory.mktemp("small4-gguf")
    # as lesson 06 converts it: a saved HF folder (with tekken.json beside it, llama.cpp's converter
    # takes the Mistral-format tokenizer path, which its mistral4 class does not support)
    model_dir = shutil.copytree(
        stand_in_dir / "tiny-mistral-small-4", out / "hf", ignore=shutil.ignore_patterns("tekken.json")
    )
    return gguf_export.convert_to_gguf(model_dir, out / "small4-f16.gguf", "f16")


# --- The notebooks under nbval (collected beside tests/ by `python -m pytest`) ---------------------
NBVAL_OUTPUT_TIMEOUT_S = 60


def pytest_collection_modifyitems(items):
    """nbval waits a hard-coded 5 s for a cell's remaining output messages once the kernel has replied.
    On a 2-core CI machine, lesson 06's task-check cell (three llama.cpp servers started and stopped)
    once went past that in a clean-clone run and failed with "Timeout of 5 seconds exceeded waiting
    for output" although the cell itself had finished. Waiting longer changes no result."""
    for item in items:
        if type(item).__name__ == "IPyNbCell" and hasattr(item, "output_timeout"):
            item.output_timeout = NBVAL_OUTPUT_TIMEOUT_S
