import subprocess

import pytest
from conftest import gpu

from course_utils.hardware import (
    NvidiaSmi,
    PreflightError,
    describe_profiles,
    detect,
    detect_environment,
    nvidia_smi,
    preflight,
    unusable_gpu_message,
)
from course_utils.profiles import PROFILES, resolve_profile


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


def _fake_smi(listing: str, header: str, returncode: int = 0):
    def run(cmd, **kwargs):
        out = listing if "--query-gpu=name,driver_version" in cmd else header
        return subprocess.CompletedProcess(cmd, returncode, stdout=out, stderr="")

    return run


def test_nvidia_smi_is_read_from_its_own_output():
    run = _fake_smi(
        "NVIDIA GeForce RTX 4090, 550.54.15\nNVIDIA GeForce RTX 4090, 550.54.15\n",
        "| NVIDIA-SMI 550.54.15   Driver Version: 550.54.15   CUDA Version: 12.4     |",
    )
    smi = nvidia_smi(run)
    assert smi == NvidiaSmi(("NVIDIA GeForce RTX 4090",) * 2, "550.54.15", "12.4")
    assert nvidia_smi(_fake_smi("", "", returncode=9)) is None  # no GPU / driver not loaded


def test_a_driver_older_than_torchs_cuda_says_which_pair_works():
    smi = NvidiaSmi(("NVIDIA GeForce RTX 4090",), "550.54.15", "12.4")
    msg = unusable_gpu_message(smi, "2.14.1+cu130", "13.0")
    assert "RTX 4090" in msg and "550.54.15" in msg and "CUDA 13.0" in msg
    assert "≥ 580.65.06" in msg  # CUDA 13.0's minimum driver (NVIDIA's release notes)
    assert "torch==2.14.1 --index-url https://download.pytorch.org/whl/cu124" in msg


def test_auto_refuses_a_gpu_torch_cannot_use_instead_of_running_on_cpu(monkeypatch):
    import course_utils.hardware as hardware

    monkeypatch.setattr(
        hardware,
        "nvidia_smi",
        lambda: NvidiaSmi(("NVIDIA A40",), "535.104.05", "12.2"),
    )
    monkeypatch.delenv("COURSE_PROFILE", raising=False)
    hw = hardware.detect()
    if hw.accelerator == "cuda":
        pytest.skip("torch can use this GPU")
    assert hw.unusable_gpu and "NVIDIA A40" in hw.unusable_gpu
    with pytest.raises(ValueError, match="auto' refused: nvidia-smi sees NVIDIA A40"):
        resolve_profile("auto", hardware=hw)
    assert resolve_profile("cpu-tiny", hardware=hw).name == "cpu-tiny"  # an explicit choice still works


def test_doctor_fails_loudly_on_a_gpu_torch_cannot_use(monkeypatch, capsys):
    import course_utils.hardware as hardware
    from course_utils.cli import main

    monkeypatch.setattr(hardware, "nvidia_smi", lambda: NvidiaSmi(("Tesla V100-SXM2-32GB",), "535.1", "12.2"))
    monkeypatch.delenv("COURSE_PROFILE", raising=False)  # `run` tests set it in this process
    if hardware.detect().accelerator == "cuda":
        pytest.skip("torch can use this GPU")
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] GPU" in out and "Tesla V100" in out and "[FAIL] profile" in out


def test_preflight_of_small_4_on_a_rung_too_small_says_to_change_the_model_not_the_rung():
    """The L4 resolves to gpu-24gb; with MODEL='mistral-small-4' the advice was 'Pick gpu-24gb' — the
    profile it had just refused."""
    from course_utils.profiles import profile_for_model

    for rung, vram in (("gpu-24gb", 22.16), ("t4-16gb", 14.7)):
        small4 = profile_for_model(PROFILES[rung], "mistral-small-4")
        with pytest.raises(PreflightError) as refused:
            preflight(small4, gpu(vram, disk=500.0))
        message = str(refused.value)
        assert "MODEL = 'mistral-small-3.2'" in message and f"Pick {rung!r}" not in message


def test_a_new_enough_driver_is_not_blamed_when_torch_sees_no_gpu(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    smi = NvidiaSmi(("NVIDIA H100 80GB HBM3",), "580.65.06", "13.0")
    msg = unusable_gpu_message(smi, "2.9.0+cu128", "12.8")
    assert "driver is ≥" not in msg and "580.65.06" in msg
    assert "CUDA_VISIBLE_DEVICES" in msg and "MIG" in msg
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-deadbeef")
    assert "CUDA_VISIBLE_DEVICES='GPU-deadbeef'" in unusable_gpu_message(smi, "2.9.0+cu128", "12.8")


@pytest.mark.parametrize("hidden", ["", "-1"])
def test_gpus_hidden_on_purpose_are_a_cpu_run_not_a_refusal(monkeypatch, hidden):
    import course_utils.hardware as hardware

    monkeypatch.setattr(hardware, "nvidia_smi", lambda: NvidiaSmi(("NVIDIA A40",), "535.104.05", "12.2"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
    hw = hardware.detect()
    if hw.accelerator == "cuda":
        pytest.skip("torch can use this GPU")
    assert hw.unusable_gpu is None and resolve_profile("auto", hardware=hw).name == "cpu-tiny"


def test_detect_without_torch_reports_a_cpu_and_why(monkeypatch):
    import builtins

    import course_utils.hardware as hardware

    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("No module named 'torch'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    monkeypatch.setattr(hardware, "nvidia_smi", lambda: None)
    hw = hardware.detect()
    assert hw.accelerator == "cpu" and "torch" in (hw.note or "")
