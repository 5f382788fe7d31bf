import subprocess
import sys

import pytest
from conftest import gpu

from course_utils.hardware import PreflightError
from course_utils.models import SKIP_QUANTIZATION, choose_backend, load
from course_utils.profiles import PROFILES


def test_backend_is_decided_from_hardware_before_any_import(cpu_hardware):
    assert choose_backend(PROFILES["gpu-24gb"], gpu(24))[0] == "unsloth"
    backend, why = choose_backend(PROFILES["cpu-tiny"], cpu_hardware)
    assert backend == "transformers" and "not imported" in why


def test_cpu_load_never_imports_unsloth(stand_in_dir):
    code = (
        "import sys; from course_utils.models import load; "
        f"m = load('cpu-tiny', stand_in_dir={str(stand_in_dir)!r}); "
        "print(type(m.model).__name__, m.backend, 'unsloth' in sys.modules, 'trl' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-4:] == ["Mistral3ForConditionalGeneration", "transformers", "False", "False"]


def test_load_describes_what_was_chosen_and_why(stand_in_dir, cpu_hardware):
    loaded = load(
        "cpu-tiny", stand_in="tiny-mistral-small-4", stand_in_dir=stand_in_dir, hardware=cpu_hardware
    )
    model, processor, description = loaded
    assert model.config.text_config.model_type == "mistral4"
    assert (
        "cpu-tiny" in description
        and "tiny-mistral-small-4" in description
        and "random weights" in description
    )
    assert not model.training


def test_load_takes_safetensors_only(stand_in_dir, cpu_hardware, tmp_path):
    """A checkpoint with only a pickled pytorch_model.bin (unpickling can run code) is refused."""
    import shutil

    import torch
    from safetensors.torch import load_file

    pickled = tmp_path / "tiny-mistral-small-3"
    shutil.copytree(stand_in_dir / "tiny-mistral-small-3", pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    with pytest.raises(OSError, match="safetensors"):
        load("cpu-tiny", stand_in="tiny-mistral-small-3", stand_in_dir=tmp_path, hardware=cpu_hardware)


def test_gpu_profile_refuses_on_cpu_before_downloading(cpu_hardware):
    with pytest.raises(PreflightError, match="before any download"):
        load("gpu-24gb", hardware=cpu_hardware)


def test_quantization_keeps_vision_and_head_in_16_bit():
    # full module names: a bare "vision_tower" would not match inside Mistral3's wrapper
    assert SKIP_QUANTIZATION == ["model.vision_tower", "model.multi_modal_projector", "lm_head"]


def test_generate_and_stream_agree_and_are_deterministic(stand_in_dir, cpu_hardware):
    from course_utils.chat import generate, stream, user_message

    loaded = load("cpu-tiny", stand_in_dir=stand_in_dir, hardware=cpu_hardware)
    messages = [user_message("Extract the total from: Coffee 3.50 EUR")]
    first = generate(loaded.model, loaded.processor, messages, max_new_tokens=12)
    again = generate(loaded.model, loaded.processor, messages, max_new_tokens=12)
    pieces = list(stream(loaded.model, loaded.processor, messages, max_new_tokens=12))
    assert first == again == "".join(pieces)
    assert len(pieces) > 1  # it really streamed
    assert len(loaded.processor.tokenizer(first, add_special_tokens=False)["input_ids"]) <= 12


def test_generate_with_an_image(stand_in_dir, cpu_hardware):
    from PIL import Image

    from course_utils.chat import generate, user_message

    loaded = load("cpu-tiny", stand_in_dir=stand_in_dir, hardware=cpu_hardware)
    reply = generate(
        loaded.model,
        loaded.processor,
        [user_message("What is this?", [Image.new("RGB", (64, 48))])],
        max_new_tokens=5,
    )
    assert isinstance(reply, str)


def test_fsdp_qlora_stores_4bit_weights_in_the_compute_dtype():
    """FSDP shards one dtype: under accelerate's FSDP launch the packed NF4 weights are bf16-stored."""
    import torch

    from course_utils.models import _quantization_config

    single = _quantization_config({})
    assert single.bnb_4bit_quant_storage == torch.uint8
    fsdp = _quantization_config({"ACCELERATE_USE_FSDP": "true"})  # what accelerate launch sets
    assert fsdp.bnb_4bit_quant_storage == fsdp.bnb_4bit_compute_dtype == torch.bfloat16


def test_each_launched_process_loads_onto_its_own_gpu():
    from course_utils.models import _device_map

    assert _device_map({}) == {"device_map": "auto"}  # one process: all GPUs
    ddp = {"WORLD_SIZE": "2", "LOCAL_RANK": "1"}
    assert _device_map(ddp) == {"device_map": {"": 1}}  # not every process on every GPU
    assert _device_map({**ddp, "ACCELERATE_USE_FSDP": "true"}) == {}  # FSDP places the shards itself


def _lesson_cell(lesson: str, tag: str) -> str:
    """The source of the lesson cell tagged ``tag`` (jupytext percent format)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "lessons" / lesson).read_text()
    start = text.index(f'"{tag}"]\n')
    body = text[start:].split("\n", 1)[1]
    return body.split("\n# %%", 1)[0]


def test_lesson_02_image_prompt_runs_unchanged_on_small_4(stand_in_dir, cpu_hardware):
    """Lesson 02's image-prompt cell, as written, with MODEL = "mistral-small-4": the stand-in's v15
    format puts the image where mistral-common does, and the reply is what the course's helper gives."""
    from PIL import Image

    from course_utils.chat import generate, reference_token_ids, user_message
    from course_utils.models import model_source
    from course_utils.receipts import load_local

    source = model_source(
        "cpu-tiny", model="mistral-small-4", stand_in_dir=stand_in_dir, hardware=cpu_hardware
    )
    model, processor, _ = load(source.profile, stand_in_dir=stand_in_dir, hardware=cpu_hardware)
    assert model.config.text_config.model_type == "mistral4"
    image_path = load_local("test")[0]["images"][0]
    namespace = {"model": model, "processor": processor, "IMAGE_PATH": image_path}
    exec(_lesson_cell("02_vision_prompting.py", "copy:image-prompt"), namespace)

    assert namespace["image_tokens"] > 10
    expected = reference_token_ids(namespace["messages"], processor, tekken_file=source.tekken_file)
    assert namespace["inputs"]["input_ids"][0].tolist() == expected
    question = "What is the name of the shop on this receipt?"
    image = Image.open(image_path).convert("RGB")
    assert namespace["reply"] == generate(
        model, processor, [user_message(question, [image])], max_new_tokens=24
    )
