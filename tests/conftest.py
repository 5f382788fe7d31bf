import os
import warnings

import pytest

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

    return HardwareInfo("cpu", "test CPU", None, ram_gib=24, disk_free_gib=100, cpu_count=2, environment="local")


def gpu(vram, disk=500):
    from course_utils.hardware import HardwareInfo

    return HardwareInfo("cuda", "test GPU", vram, ram_gib=64, disk_free_gib=disk, cpu_count=8, environment="local")
