"""``python -m course_utils train``: the lesson-04 run as a script, alone or as N accelerate processes."""

import hashlib
import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import yaml
from conftest import gpu

from course_utils.launch import (
    ADAPTER_FOLDER,
    CPU_FSDP_NOTE,
    FSDP_CONFIG_NAME,
    RANKS_FOLDER,
    accelerate_command,
    plan_launch,
    steps_for_epochs,
    worker_args,
)

ROOT = Path(__file__).resolve().parent.parent
ROWS = 16  # 16 rows, batch 2: one epoch is 8 steps alone, 4 steps per rank with 2 ranks


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    from course_utils.receipts import load_local, mix_modalities

    rows = mix_modalities(load_local("train")[:ROWS], image_fraction=0.5, seed=0)
    assert {bool(r.get("images")) for r in rows} == {True, False}  # image and text rows, as in lesson 04
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_argv(out, train_file, stand_in_dir, *extra) -> list[str]:
    return [
        "train",
        "--profile",
        "cpu-tiny",
        "--out",
        str(out),
        "--train-file",
        str(train_file),
        "--eval-rows",
        "0",
        "--batch-size",
        "2",
        "--stand-in-dir",
        str(stand_in_dir),
        *extra,
    ]


def run_cli(argv: list[str], tmp_path: Path, timeout: int = 420) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "COURSE_OUTPUTS": str(tmp_path / "outputs"),
    }
    env.pop("COURSE_PROFILE", None)
    return subprocess.run(
        [sys.executable, "-m", "course_utils", *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def rank_records(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / RANKS_FOLDER).glob("rank-*.json"))]


def adapters_in(out: Path) -> list[Path]:
    """Folders holding a complete adapter (config + safetensors weights)."""
    return sorted(
        p.parent
        for p in out.rglob("adapter_model.safetensors")
        if (p.parent / "adapter_config.json").is_file()
    )


def test_two_processes_train_disjoint_batches_and_rank_0_saves_one_adapter(
    train_file, stand_in_dir, tmp_path
):
    out = tmp_path / "run"
    argv = train_argv(out, train_file, stand_in_dir, "--max-steps", "4", "--processes", "2")
    result = run_cli(argv, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes trained" in result.stdout
    assert CPU_FSDP_NOTE in result.stdout  # why it is DDP and not FSDP on a CPU, said where it happens
    records = rank_records(out)
    assert [r["rank"] for r in records] == [0, 1]
    assert len({r["run_id"] for r in records}) == 1  # both from this run, not stale files
    for record in records:
        assert record["world_size"] == 2 and record["global_step"] == 4
        assert record["samples_trained"] == 4 * 2  # 4 steps of 2 rows, on each rank
        # really one distributed run (gloo), not two processes each training alone
        assert record["distributed_type"] == "MULTI_CPU"
        assert record["model_wrapper"] == "DistributedDataParallel"
    # DDP all-reduced the gradients: both ranks end with the same weights although their rows differed
    assert records[0]["trained_weights_sha256"] == records[1]["trained_weights_sha256"]
    first, second = (set(r["record_ids"]) for r in records)
    assert len(first) == len(second) == 8 and not first & second  # each rank its own half of the rows
    # one adapter, saved by rank 0 only (no checkpoint either: they come every --save-steps, 55 here)
    assert adapters_in(out) == [out / ADAPTER_FOLDER] and not list(out.glob("checkpoint-*"))
    assert "step 4/4 · loss" in result.stdout  # progress lines, also in a short run
    card = json.loads((out / ADAPTER_FOLDER / "training_card.json").read_text())
    assert card["processes"] == 2 and card["samples_trained_per_rank"] == [8, 8]


def test_resume_continues_from_the_checkpoint_and_a_finished_adapter_is_never_replaced_silently(
    train_file, stand_in_dir, tmp_path, capsys
):
    from course_utils.cli import main

    out = tmp_path / "run"
    first = run_cli(
        train_argv(out, train_file, stand_in_dir, "--max-steps", "2", "--save-steps", "2"), tmp_path
    )
    assert first.returncode == 0, first.stderr[-3000:]
    assert "1 process trained" in first.stdout and "step 2/2" in first.stdout  # progress lines
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()
    first_rows = set(rank_records(out)[0]["record_ids"])
    weights = out / ADAPTER_FOLDER / "adapter_model.safetensors"
    before = hashlib.sha256(weights.read_bytes()).hexdigest()

    # the finished adapter is in the way: one clear line, nothing trained, nothing replaced
    resume = train_argv(out, train_file, stand_in_dir, "--max-steps", "4", "--resume")
    assert main(resume) == 2
    err = capsys.readouterr().err
    assert "already holds a finished adapter" in err and "--overwrite" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == before
    assert main(train_argv(out, train_file, stand_in_dir, "--max-steps", "2")) == 2  # a fresh run too
    assert "already holds a finished adapter" in capsys.readouterr().err

    resumed = run_cli([*resume, "--overwrite", "--save-steps", "2"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from checkpoint-2" in resumed.stdout
    record = rank_records(out)[0]
    assert record["resumed_from"] == "checkpoint-2" and record["global_step"] == 4
    # steps 3-4 only (a restart would train 4 steps), on the rows that come after the first run's
    assert record["samples_trained"] == 2 * 2
    assert not set(record["record_ids"]) & first_rows
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    card = json.loads((out / ADAPTER_FOLDER / "training_card.json").read_text())
    assert card["resumed_from"] == "checkpoint-2" and card["global_step"] == 4
    assert hashlib.sha256(weights.read_bytes()).hexdigest() != before


def test_bad_options_and_a_missing_checkpoint_are_one_line_errors(train_file, stand_in_dir, tmp_path, capsys):
    from course_utils.cli import main

    cases = [
        (train_argv(tmp_path / "a", train_file, stand_in_dir, "--resume"), "no checkpoint-N folder"),
        (train_argv(tmp_path / "b", train_file, stand_in_dir, "--processes", "0"), "--processes"),
        (train_argv(tmp_path / "c", train_file, stand_in_dir, "--max-steps", "0"), "--max-steps"),
        (train_argv(tmp_path / "d", tmp_path / "missing.jsonl", stand_in_dir), "missing.jsonl: no such file"),
    ]
    interrupted = tmp_path / "f"  # an earlier run's checkpoint, no finished adapter
    (interrupted / "checkpoint-3").mkdir(parents=True)
    (interrupted / "checkpoint-3" / "trainer_state.json").write_text('{"global_step": 3}')
    cases.append((train_argv(interrupted, train_file, stand_in_dir), "pass --resume to continue it"))
    cases.append(
        (
            train_argv(interrupted, train_file, stand_in_dir, "--resume", "--max-steps", "3"),
            "checkpoint-3 is already at step 3 >= --max-steps 3",
        )
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\n{not json\n')
    cases.append((train_argv(tmp_path / "e", bad, stand_in_dir), "bad.jsonl:2: not JSON"))
    for argv, expected in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1, err


def args_for(**values) -> Namespace:
    defaults = dict(
        profile="cpu-tiny",
        out="runs/x",
        train_file=None,
        val_file=None,
        rows=None,
        eval_rows=None,
        max_steps=4,
        epochs=None,
        lr=1e-4,
        lora_r=None,
        lora_alpha=None,
        batch_size=None,
        grad_accum=None,
        seq_len=None,
        save_steps=None,
        logging_steps=None,
        seed=None,
        stand_in_dir=None,
        resume=True,
        overwrite=False,
        processes=2,
        launched=None,
    )
    return Namespace(**{**defaults, **values})


def test_the_accelerate_command_is_an_argument_list_with_the_chosen_flags():
    forwarded = worker_args(args_for(), "run1")
    assert forwarded == [
        "--profile",
        "cpu-tiny",
        "--out",
        "runs/x",
        "--max-steps",
        "4",
        "--lr",
        "0.0001",
        "--resume",
        "--launched",
        "run1",
    ]  # the user's options, without --processes (the ranks must not launch again)
    cpu = accelerate_command(2, forwarded, cuda=False)
    assert all(isinstance(part, str) for part in cpu)
    assert cpu[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    tail = ["-m", "course_utils", "train", *forwarded]
    assert cpu[-len(tail) :] == tail
    flags = cpu[3 : -len(tail)]
    # --cpu would start one process (accelerate's simple_launcher): the torch.distributed.run launcher
    # starts N, and the ranks choose gloo themselves (use_cpu=True)
    assert "--cpu" not in flags and "--multi_gpu" in flags and "--use_fsdp" not in flags
    pairs = dict(zip(flags, flags[1:], strict=False))
    assert pairs["--num_processes"] == "2" and pairs["--num_machines"] == "1"
    assert pairs["--main_process_port"] == "0"  # a free port, so two runs on one machine do not collide
    gpu = accelerate_command(4, forwarded, cuda=True, config_file=Path("out/accelerate-fsdp.yml"))
    assert gpu[3:5] == ["--config_file", "out/accelerate-fsdp.yml"] and "--multi_gpu" not in gpu
    assert gpu[gpu.index("--num_processes") + 1] == "4"
    with pytest.raises(ValueError):
        accelerate_command(1, forwarded, cuda=False)
    with pytest.raises(ValueError):
        accelerate_command(2, forwarded, cuda=True)  # FSDP needs its config


def test_on_cuda_the_launch_writes_an_fsdp_config_with_the_models_own_layers(
    stand_in_dir, tmp_path, cpu_hardware
):
    args = args_for(out=str(tmp_path), stand_in_dir=str(stand_in_dir), processes=2, resume=False)
    plan = plan_launch(args, "run1", hardware=gpu(80))
    assert plan.strategy == "fsdp" and plan.config_file == tmp_path / FSDP_CONFIG_NAME
    config = yaml.safe_load(plan.config_file.read_text())
    assert config["distributed_type"] == "FSDP" and config["num_processes"] == 2
    # read from the stand-in's own _no_split_modules (built on the meta device), not a typed-in list
    assert config["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] == (
        "MistralDecoderLayer,PixtralAttentionLayer"
    )
    assert plan.command[plan.command.index("--config_file") + 1] == str(plan.config_file)
    cpu_plan = plan_launch(args, "run1", hardware=cpu_hardware)
    assert cpu_plan.strategy == "ddp" and cpu_plan.config_file is None and CPU_FSDP_NOTE in cpu_plan.notes


def test_epochs_become_steps_over_all_processes():
    assert steps_for_epochs(1, rows=16, batch_size=2, grad_accum=1, world_size=1) == 8
    assert steps_for_epochs(1, rows=16, batch_size=2, grad_accum=1, world_size=2) == 4
    assert steps_for_epochs(2, rows=17, batch_size=2, grad_accum=2, world_size=2) == 6  # ceil(5 / 2) * 2


def test_options_override_the_profiles_preset():
    from course_utils.launch import resolve_preset

    preset = resolve_preset(
        args_for(lora_r=8, lr=1e-3, max_steps=None, epochs=1.0, batch_size=2), "cpu-tiny", 16, 2
    )
    assert (preset.lora_r, preset.lora_alpha) == (8, 16)  # cpu-tiny's alpha / r = 2 is kept
    assert preset.learning_rate == 1e-3 and preset.per_device_train_batch_size == 2
    assert preset.max_steps == 4  # 1 epoch of 16 rows, 2 per batch, 2 processes
    explicit = resolve_preset(args_for(lora_r=8, lora_alpha=8, max_steps=7, epochs=3.0), "cpu-tiny", 16, 1)
    assert (explicit.lora_alpha, explicit.max_steps) == (8, 7)  # --max-steps wins over --epochs


def test_a_multi_gpu_launch_checks_what_its_ranks_will_load_before_starting_them(tmp_path, monkeypatch):
    from course_utils.hardware import PreflightError

    monkeypatch.delenv("COURSE_MODEL", raising=False)
    # gpu-24gb trains one GPU from a 4-bit upload (≈ 17 GiB to fetch); FSDP ranks fetch the 16-bit
    # release (≈ 50 GiB): a 40 GiB disk holds the first, not the second — refused here, not in each rank
    args = args_for(out=str(tmp_path), profile="gpu-24gb", processes=2, resume=False)
    with pytest.raises(PreflightError, match="GiB"):
        plan_launch(args, "run1", hardware=gpu(24, disk=40))
    monkeypatch.setenv("COURSE_MODEL", "mistral-small-4")
    args = args_for(out=str(tmp_path), profile="gpu-80gb", processes=2, resume=False)
    with pytest.raises(ValueError, match="axolotl"):
        plan_launch(args, "run1", hardware=gpu(80))
