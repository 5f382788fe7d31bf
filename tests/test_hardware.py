import pytest
from conftest import gpu

from course_utils.hardware import PreflightError, describe_profiles, detect, detect_environment, preflight
from course_utils.profiles import PROFILES


def test_detect_reports_this_machine():
    hw = detect()
    assert hw.accelerator in {"cpu", "cuda", "mps"}
    assert hw.ram_gib > 0 and hw.disk_free_gib > 0 and hw.cpu_count >= 1
    assert hw.accelerator.upper() in hw.summary()


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"COLAB_RELEASE_TAG": "x"}, "colab"),
        ({"RUNPOD_POD_ID": "a"}, "runpod"),
        ({"KAGGLE_KERNEL_RUN_TYPE": "i"}, "kaggle"),
        ({"HOME": "/root"}, "local"),
    ],
)
def test_detect_environment(env, expected):
    assert detect_environment(env) == expected


def test_stand_in_fits_any_cpu(cpu_hardware):
    assert preflight(PROFILES["cpu-tiny"], cpu_hardware)["memory_gib"] <= 1


def test_gpu_profile_on_a_cpu_refuses_with_what_when_and_what_instead(cpu_hardware):
    with pytest.raises(PreflightError) as err:
        preflight(PROFILES["gpu-24gb"], cpu_hardware)
    msg = str(err.value)
    assert "before any download" in msg and "≥ 22 GiB" in msg and "CPU" in msg
    assert "Pick 'cpu-tiny'" in msg


def test_too_little_vram_suggests_the_rung_that_fits():
    with pytest.raises(PreflightError, match=r"has 15.0 GiB.*Pick 't4-16gb'"):
        preflight(PROFILES["gpu-24gb"], gpu(15.0))


def test_too_little_disk_refuses_even_with_enough_vram():
    with pytest.raises(PreflightError, match=r"only 5.0 GiB is free"):
        preflight(PROFILES["gpu-24gb"], gpu(24.0, disk=5.0))
    need = preflight(PROFILES["gpu-24gb"], gpu(24.0, disk=100.0))
    # 24B parameters at 4.5 bits are ~12.6 GiB to download, plus headroom
    assert 12 < need["disk_gib"] < 20


def test_profile_table_marks_what_fits():
    rows = {r["profile"]: r for r in describe_profiles(gpu(24.0))}
    assert rows["gpu-24gb"]["fits"] and rows["t4-16gb"]["fits"] and rows["cpu-tiny"]["fits"]
    assert not rows["gpu-80gb"]["fits"] and "75 GiB" in rows["gpu-80gb"]["why"]


def test_only_the_unactionable_library_log_lines_are_dropped(caplog):
    import logging

    import course_utils  # noqa: F401  (installs the filters)

    pytree, bnb = logging.getLogger("torch.utils._pytree"), logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        pytree.warning("%s is an Enum subclass and is now natively supported by torch.compile", "<enum 'X'>")
        bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "no module")
        pytree.warning("a pytree warning that matters")
        bnb.warning("a bitsandbytes warning that matters")
    assert [r.getMessage() for r in caplog.records] == [
        "a pytree warning that matters",
        "a bitsandbytes warning that matters",
    ]
