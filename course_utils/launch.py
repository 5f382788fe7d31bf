"""``python -m course_utils train``: lesson 04's training run as a script, for tmux on a rented GPU.

Lesson 04 trains in a notebook; on a rented GPU people train in tmux, where a dropped connection does
not stop the run. This is the same run — ``preset_for`` / ``build_trainer`` / ``save_adapter`` from
``course_utils.train``, lesson 03's receipts splits — with the preset's fields as options, an output
folder, ``--resume`` from its latest checkpoint and progress lines.

``--processes N`` starts N copies of this command with ``accelerate launch`` (accelerate's launcher runs
``torch.distributed.run``, which sets ``RANK``/``WORLD_SIZE`` for each copy); the copies train one model
on disjoint batches and only rank 0 saves the adapter. On CUDA the model is sharded with the course's
FSDP config, whose wrapped layer classes are read from the model (``_no_split_modules``).

On a CPU the copies use DDP over gloo, because FSDP does not run there through accelerate. Measured here
(torch 2.14.1, accelerate 1.15.0, transformers 5.17.0, 2 processes, a transformers ``Trainer`` with
``use_cpu=True``): asked for FSDP by ``accelerate launch --use_fsdp --fsdp_version 2`` or by
``TrainingArguments(fsdp=…)``, no error is raised and none is sharded — every rank reports
``DistributedType.MULTI_CPU`` and a ``DistributedDataParallel`` model, because accelerate's
``AcceleratorState`` turns FSDP on only for GPU-type distributed types (``accelerate/state.py``).
Without ``use_cpu`` it is worse: ``DistributedType.NO``, each rank training its own copy. torch's own
``fully_shard`` does run on CPU over gloo (measured, 2 ranks); it is accelerate and the ``Trainer``
that do not take that path. ``accelerate launch --cpu --num_processes 2`` starts a single process
(measured: no ``RANK``, ``DistributedType.NO``; its ``simple_launcher``), so the launcher below uses
``--multi_gpu`` (the ``torch.distributed.run`` path) and the ranks ask for the CPU themselves.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

Strategy = Literal["ddp", "fsdp"]

ADAPTER_FOLDER = "adapter"  # <out>/adapter: the finished adapter; <out>/checkpoint-N: the Trainer's
RANKS_FOLDER = "ranks"  # <out>/ranks/rank-R.json: what each process trained (read by rank 0)
FSDP_CONFIG_NAME = "accelerate-fsdp.yml"
CPU_FSDP_NOTE = (
    "FSDP does not run on CPU through accelerate 1.15 (measured: asked for FSDP, every rank ran "
    "DistributedType.MULTI_CPU with a DistributedDataParallel model, no error): using DDP over gloo; "
    "FSDP is kept for CUDA"
)


class TrainCommandError(Exception):
    """Bad input or an output folder in the way: one line for the user, exit status 2."""


# --- Output folder -------------------------------------------------------------------------------


def _checkpoint_step(checkpoint: str | os.PathLike) -> int:
    state = Path(checkpoint) / "trainer_state.json"
    try:
        return int(json.loads(state.read_text())["global_step"])
    except (OSError, ValueError, KeyError) as exc:
        raise TrainCommandError(f"{state}: cannot read the checkpoint's global_step ({exc})") from exc


def check_output_dir(out: Path, *, resume: bool, overwrite: bool, max_steps: int | None) -> str | None:
    """Refuse what would silently replace work in ``out``; return the checkpoint to resume from.

    A finished adapter (``out/adapter``) is replaced only with ``overwrite``; checkpoints of an earlier
    run are continued with ``resume`` or, with ``overwrite``, deleted by :func:`prepare_output_dir`.
    """
    from course_utils.train import latest_checkpoint

    adapter = out / ADAPTER_FOLDER
    if (adapter / "adapter_model.safetensors").exists() and not overwrite:
        raise TrainCommandError(
            f"{adapter} already holds a finished adapter; pass --overwrite to replace it, or choose "
            "another --out"
        )
    checkpoint = latest_checkpoint(out) if out.is_dir() else None
    earlier = sorted(p.name for p in out.glob("checkpoint-*")) if out.is_dir() else []
    if resume:
        if checkpoint is None:
            cut = " (those there lack trainer_state.json: cut off while saving)" if earlier else ""
            raise TrainCommandError(f"--resume: no checkpoint-N folder in {out} to resume from{cut}")
        step = _checkpoint_step(checkpoint)
        if max_steps is not None and step >= max_steps:
            raise TrainCommandError(
                f"--resume: {Path(checkpoint).name} is already at step {step} >= --max-steps {max_steps}; "
                "raise --max-steps to train further"
            )
        return checkpoint
    if earlier and not overwrite:  # complete or cut off while saving: never written over silently
        raise TrainCommandError(
            f"{out} holds checkpoints of an earlier run ({Path(checkpoint or earlier[-1]).name}); pass "
            "--resume to continue it, or --overwrite to start over (its checkpoints are deleted)"
        )
    return None


def prepare_output_dir(out: Path, *, resume: bool) -> None:
    """Create ``out``; clear the previous run's rank records and, for a fresh run, its checkpoints."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / RANKS_FOLDER, ignore_errors=True)
    if not resume:
        for folder in out.glob("checkpoint-*"):
            if folder.is_dir():
                shutil.rmtree(folder)
            else:
                folder.unlink()


# --- Launching N processes -----------------------------------------------------------------------


def accelerate_command(
    processes: int, worker_args: list[str], *, cuda: bool, config_file: Path | None = None, port: int = 0
) -> list[str]:
    """``accelerate launch`` for ``processes`` copies of ``python -m course_utils train <worker_args>``.

    CUDA: the FSDP ``config_file`` (:func:`course_utils.train.accelerate_fsdp_config`). CPU: DDP — the
    ``--multi_gpu`` launcher (``torch.distributed.run``), since ``--cpu`` starts one process; the ranks
    pick gloo because they train with ``use_cpu=True``. ``port`` 0: accelerate picks a free port.
    """
    if processes < 2:
        raise ValueError("accelerate_command is for 2 or more processes")
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if cuda:
        if config_file is None:
            raise ValueError("FSDP on CUDA needs its config_file")
        command += ["--config_file", str(config_file)]
    else:
        command += ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += [
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--machine_rank",
        "0",
        "--main_process_port",
        str(port),
        "-m",
        "course_utils",
        "train",
        *worker_args,
    ]
    return command


# Options forwarded to every rank, in the order ``add_parser`` declares them (``--processes`` is not).
_FORWARDED = (
    ("profile", "--profile"),
    ("out", "--out"),
    ("train_file", "--train-file"),
    ("val_file", "--val-file"),
    ("rows", "--rows"),
    ("eval_rows", "--eval-rows"),
    ("max_steps", "--max-steps"),
    ("epochs", "--epochs"),
    ("lr", "--lr"),
    ("lora_r", "--lora-r"),
    ("lora_alpha", "--lora-alpha"),
    ("batch_size", "--batch-size"),
    ("grad_accum", "--grad-accum"),
    ("seq_len", "--seq-len"),
    ("save_steps", "--save-steps"),
    ("logging_steps", "--logging-steps"),
    ("seed", "--seed"),
    ("stand_in_dir", "--stand-in-dir"),
)


def worker_args(args: argparse.Namespace, run_id: str) -> list[str]:
    """The options each launched rank gets: the user's, less ``--processes``, plus the run's id."""
    out = []
    for name, flag in _FORWARDED:
        value = getattr(args, name)
        if value is not None:
            out += [flag, str(value)]
    if args.resume:
        out.append("--resume")
    if args.overwrite:
        out.append("--overwrite")
    return out + ["--launched", run_id]


def layer_classes_for(model_id: str) -> tuple[str, ...]:
    """FSDP's wrapped layer classes for ``model_id``: the ``_no_split_modules`` of the model built from
    its config on the meta device (no weights loaded, nothing on the GPU)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForImageTextToText

    from course_utils.train import fsdp_layer_classes

    config = AutoConfig.from_pretrained(model_id)
    with init_empty_weights():
        model = AutoModelForImageTextToText.from_config(config)
    return fsdp_layer_classes(model)


@dataclass(frozen=True)
class LaunchPlan:
    command: list[str]
    strategy: Strategy
    config_file: Path | None
    notes: tuple[str, ...]


def plan_launch(args: argparse.Namespace, run_id: str, *, hardware=None) -> LaunchPlan:
    """What ``--processes N`` starts: FSDP with a config written to ``<out>`` on CUDA, DDP on CPU."""
    from course_utils.hardware import detect, preflight
    from course_utils.models import model_source
    from course_utils.profiles import fsdp_profile
    from course_utils.train import accelerate_fsdp_config, preset_for, write_yaml

    hardware = hardware or detect(args.out)
    # builds the stand-in once, before the ranks start (they would race to build it)
    source = model_source(args.profile, stand_in_dir=args.stand_in_dir, hardware=hardware)
    # every rank gets the profile resolved here, so "auto" cannot resolve differently in a rank
    forwarded = worker_args(argparse.Namespace(**{**vars(args), "profile": source.profile.name}), run_id)
    if hardware.accelerator == "cuda":
        if source.profile.backend == "unsloth":  # the ranks load another checkpoint: check it now
            preflight(fsdp_profile(source.profile), hardware)  # ValueError for Small 4, disk for the rest
        preset = preset_for(source.profile.name)
        layers = layer_classes_for(source.model_id)
        config = accelerate_fsdp_config(
            args.processes,
            layer_classes=layers,
            mixed_precision="bf16" if preset.bf16 else ("fp16" if preset.fp16 else "no"),
        )
        path = write_yaml(config, Path(args.out) / FSDP_CONFIG_NAME, overwrite=True)
        command = accelerate_command(args.processes, forwarded, cuda=True, config_file=path)
        return LaunchPlan(command, "fsdp", path, (f"FSDP wraps {', '.join(layers)}",))
    command = accelerate_command(args.processes, forwarded, cuda=False)
    return LaunchPlan(command, "ddp", None, (CPU_FSDP_NOTE,))


# --- One rank ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RankRecord:
    """What one process trained, written to ``<out>/ranks/rank-R.json`` when its training ends."""

    run_id: str
    rank: int
    world_size: int
    global_step: int
    samples_trained: int  # rows this process computed the training loss on
    record_ids: list[str]  # which rows (ranks of a DDP/FSDP run see disjoint batches)
    distributed_type: str  # accelerate's: NO, MULTI_CPU, MULTI_GPU, FSDP…
    model_wrapper: str  # DistributedDataParallel under DDP, the model's own class otherwise
    trained_weights_sha256: str  # equal on every rank when the gradients were all-reduced
    resumed_from: str | None
    seconds: float


def read_rank_records(out: Path, run_id: str) -> list[RankRecord]:
    """The records of run ``run_id`` in ``out`` (stale files of an earlier run are ignored), by rank."""
    records = []
    for path in sorted((out / RANKS_FOLDER).glob("rank-*.json")):
        data = json.loads(path.read_text())
        if data.get("run_id") == run_id:
            records.append(RankRecord(**data))
    return sorted(records, key=lambda r: r.rank)


def _read_rows(path: str) -> tuple[list[dict], Path]:
    """Rows of a course-format JSONL file (``messages`` + optional ``images``) and its folder."""
    file = Path(path)
    if not file.is_file():
        raise TrainCommandError(f"{file}: no such file")
    rows = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TrainCommandError(f"{file}:{number}: not JSON ({exc.msg})") from exc
        if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
            raise TrainCommandError(f"{file}:{number}: a row needs a 'messages' list (the course's format)")
        row.setdefault("id", f"{file.name}:{number}")
        rows.append(row)
    if not rows:
        raise TrainCommandError(f"{file}: no rows")
    return rows, file.parent


def load_rows(args: argparse.Namespace, profile_name: str) -> tuple[list[dict], list[dict], Path | None, str]:
    """Training and evaluation rows: the given files, else lesson 03's receipts splits."""
    base_dir = None
    if args.train_file:
        train, base_dir = _read_rows(args.train_file)
        val = _read_rows(args.val_file)[0] if args.val_file else []
        message = f"training rows from {args.train_file}"
    else:
        from course_utils.receipts import lesson_splits

        train, val, _, message = lesson_splits(profile_name)
        if args.val_file:
            val = _read_rows(args.val_file)[0]
    if args.rows is not None:
        train = train[: args.rows]
    eval_rows = 24 if args.eval_rows is None else args.eval_rows
    return train, val[:eval_rows], base_dir, message


def resolve_preset(args: argparse.Namespace, profile_name: str, rows: int, world_size: int):
    """The profile's preset with the command's options: ``--lora-r`` alone keeps the preset's alpha / r
    (the update's scale, lesson 04 section 4.1); ``--epochs`` becomes steps over all processes."""
    from course_utils.train import preset_for

    overrides = preset_overrides(args)
    if args.lora_r is not None and args.lora_alpha is None:
        base = preset_for(profile_name)
        overrides["lora_alpha"] = max(1, round(args.lora_r * base.lora_alpha / base.lora_r))
    if args.epochs is not None and args.max_steps is None:
        sized = preset_for(profile_name, **overrides)
        overrides["max_steps"] = steps_for_epochs(
            args.epochs,
            rows,
            sized.per_device_train_batch_size,
            sized.gradient_accumulation_steps,
            world_size,
        )
    if args.logging_steps is None:  # a short run still shows a few progress lines
        sized = preset_for(profile_name, **overrides)
        overrides["logging_steps"] = min(sized.logging_steps, max(1, sized.max_steps // 4))
    return preset_for(profile_name, **overrides)


def preset_overrides(args: argparse.Namespace) -> dict:
    """The preset fields the command's options set (``--lr`` → ``learning_rate``…)."""
    names = {
        "lr": "learning_rate",
        "lora_r": "lora_r",
        "lora_alpha": "lora_alpha",
        "batch_size": "per_device_train_batch_size",
        "grad_accum": "gradient_accumulation_steps",
        "seq_len": "max_seq_length",
        "save_steps": "save_steps",
        "logging_steps": "logging_steps",
        "seed": "seed",
        "max_steps": "max_steps",
    }
    overrides = {field: getattr(args, opt) for opt, field in names.items() if getattr(args, opt) is not None}
    return overrides


def steps_for_epochs(epochs: float, rows: int, batch_size: int, grad_accum: int, world_size: int) -> int:
    """Optimizer steps for ``epochs`` passes over ``rows`` split across ``world_size`` processes."""
    import math

    per_epoch = math.ceil(math.ceil(rows / (batch_size * world_size)) / grad_accum)
    return max(1, math.ceil(epochs * per_epoch))


class _TaggingCollator:
    """Passes each row's id along with its batch, so the trainer can record which rows a rank trained."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, examples: list[dict]) -> dict:
        ids = [e.get("record_id") for e in examples]
        batch = self.inner([{k: v for k, v in e.items() if k != "record_id"} for e in examples])
        if all(ids):
            batch["record_ids"] = ids
        return batch


def _count_trained_rows(trainer, seen: list[str]) -> None:
    """Wrap ``trainer.compute_loss`` to note the rows of every training micro-batch (not evaluation)."""
    compute_loss = trainer.compute_loss

    def counted(model, inputs, *args, **kwargs):
        ids = inputs.pop("record_ids", None)
        if model.training:
            seen.extend(ids if ids is not None else ["?"] * int(inputs["input_ids"].shape[0]))
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = counted


def _trainable_digest(model) -> str:
    """A hash of this rank's trainable weights (under FSDP: of its shards)."""
    import hashlib

    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _checkpoints_every_save_steps():
    """transformers also saves a checkpoint at the last step; here checkpoints come every ``save_steps``
    only, so a finished run leaves one adapter (``out/adapter``) and no second copy in a checkpoint."""
    from transformers import TrainerCallback

    class EverySaveSteps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps and state.global_step % args.save_steps:
                control.should_save = False
            return control

    return EverySaveSteps()


def _progress_callback(max_steps: int):
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """One line per log event on rank 0: step, loss, learning rate, tokens/s, elapsed time."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()
            self.first_step = state.global_step
            self.tokens = state.num_input_tokens_seen or 0

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs or "train_loss" in logs:
                return  # (the end-of-training log: the summary says it)
            elapsed = time.perf_counter() - self.started
            parts = [f"step {state.global_step}/{max_steps}"]
            if "loss" in logs:
                parts.append(f"loss {logs['loss']:.4f}")
            if "eval_loss" in logs:
                parts.append(f"eval loss {logs['eval_loss']:.4f}")
            if "learning_rate" in logs:
                parts.append(f"lr {logs['learning_rate']:.2e}")
            if state.num_input_tokens_seen and elapsed > 0:
                rate = (state.num_input_tokens_seen - self.tokens) / elapsed
                parts.append(f"{rate:.0f} tokens/s (all ranks)")
            parts.append(f"{elapsed:.0f} s")
            print("  " + " · ".join(parts), flush=True)

    return Progress()


def run_worker(args: argparse.Namespace) -> int:
    """Train as one rank (or alone): data, model, trainer, resume, rank record; rank 0 saves and sums up."""
    import torch
    from transformers import PrinterCallback

    from course_utils.hardware import PreflightError, detect
    from course_utils.models import load
    from course_utils.profiles import fsdp_profile, resolve_profile
    from course_utils.train import (
        build_trainer,
        fsdp_layer_classes,
        make_callbacks,
        save_adapter,
        train_loss_of,
        training_card,
    )

    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    main = rank == 0
    out = Path(args.out)
    # one id for all ranks: the launching command's, else (under your own accelerate launch) the rendezvous'
    run_id = args.launched or (
        f"{os.environ.get('TORCHELASTIC_RUN_ID', '')}:{os.environ.get('MASTER_PORT', '')}"
        if world_size > 1
        else secrets.token_hex(4)
    )
    say = print if main else (lambda *a, **k: None)

    hardware = detect(out if out.exists() else out.parent)
    try:
        profile = resolve_profile(args.profile, hardware=hardware)
    except ValueError as exc:
        raise TrainCommandError(str(exc)) from exc
    checkpoint = check_output_dir(out, resume=args.resume, overwrite=args.overwrite, max_steps=args.max_steps)
    if not args.launched and main:  # (launched by this command: it prepared the folder for its ranks)
        prepare_output_dir(out, resume=args.resume)

    train_rows, eval_rows, base_dir, data_message = load_rows(args, profile.name)
    preset = resolve_preset(args, profile.name, len(train_rows), world_size)
    if args.epochs is not None and args.max_steps is None:
        say(f"{args.epochs:g} epochs of {len(train_rows)} rows = {preset.max_steps} steps")
    say(f"profile {profile.name}; {data_message}; {len(train_rows)} train / {len(eval_rows)} eval rows")
    say(
        f"preset: r {preset.lora_r}, alpha {preset.lora_alpha}, lr {preset.learning_rate:g}, batch "
        f"{preset.per_device_train_batch_size} x {preset.gradient_accumulation_steps} x {world_size} "
        f"process(es), seq {preset.max_seq_length}, {preset.max_steps} steps, "
        f"{'bf16' if preset.bf16 else 'fp16' if preset.fp16 else 'fp32'}"
    )

    if world_size > 1 and hardware.accelerator == "cuda" and profile.backend == "unsloth":  # pragma: no cover
        # FSDP shards a transformers + peft model (with bitsandbytes storing 4-bit weights in the
        # compute dtype, see course_utils.models) loaded from the 16-bit release; Unsloth's patched
        # single-GPU model is not that path
        try:
            profile = fsdp_profile(profile)
        except ValueError as exc:
            raise TrainCommandError(str(exc)) from exc
        say(
            f"note: the ranks load {profile.load_id} with transformers + peft for FSDP "
            "(Unsloth trains on one GPU)"
        )
    try:
        loaded = load(profile, stand_in_dir=args.stand_in_dir, hardware=hardware)
    except PreflightError as exc:
        raise TrainCommandError(str(exc)) from exc
    callbacks, _ = make_callbacks(plot=False)
    callbacks += [_progress_callback(preset.max_steps), _checkpoints_every_save_steps()]
    try:
        run = build_trainer(
            loaded.model,
            loaded.processor,
            train_rows,
            eval_rows or None,
            preset,
            out,
            backend=loaded.backend,
            base_dir=base_dir,
            callbacks=callbacks,
            progress=False,
        )
    except ValueError as exc:
        raise TrainCommandError(f"training data: {exc}") from exc
    trainer = run.trainer
    trainer.remove_callback(PrinterCallback)  # it prints every log dict; the progress lines say it
    if loaded.backend == "transformers":  # tokenized rows in training order: tag them with their ids
        for example, row in zip(trainer.train_dataset, train_rows, strict=True):
            example["record_id"] = str(row["id"])
        trainer.data_collator = _TaggingCollator(trainer.data_collator)
    seen: list[str] = []
    _count_trained_rows(trainer, seen)

    if checkpoint:
        say(f"resuming from {Path(checkpoint).name}")
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=checkpoint)
    seconds = time.perf_counter() - started
    accelerator = trainer.accelerator
    distributed_type = str(accelerator.distributed_type).split(".")[-1]
    record = RankRecord(
        run_id=run_id,
        rank=rank,
        world_size=world_size,
        global_step=trainer.state.global_step,
        samples_trained=len(seen),
        record_ids=sorted(set(seen)),
        distributed_type=distributed_type,
        model_wrapper=type(trainer.model_wrapped).__name__,
        trained_weights_sha256=_trainable_digest(run.model),
        resumed_from=Path(checkpoint).name if checkpoint else None,
        seconds=round(seconds, 1),
    )
    ranks = out / RANKS_FOLDER
    ranks.mkdir(parents=True, exist_ok=True)
    (ranks / f"rank-{rank}.json").write_text(json.dumps(asdict(record), indent=2) + "\n")

    state_dict = None
    if getattr(trainer, "is_fsdp_enabled", False):  # pragma: no cover - FSDP runs on CUDA only
        expected = set(fsdp_layer_classes(loaded.model))
        configured = set(filter(None, os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",")))
        if configured and configured != expected:
            say(f"warning: FSDP wrapped {sorted(configured)}; the loaded model's layers: {sorted(expected)}")
        state_dict = accelerator.get_state_dict(trainer.model)  # a collective: every rank calls it
    accelerator.wait_for_everyone()  # every rank's record is written
    if not main:
        return 0

    records = read_rank_records(out, run_id)
    if len(records) != world_size:
        raise TrainCommandError(f"{len(records)} of {world_size} ranks wrote a record in {ranks}")
    if world_size > 1 and not torch.cuda.is_available() and not args.launched:
        print(f"note: {CPU_FSDP_NOTE}")  # (launched by this command: it said so before starting)
    metrics = {"train_loss": train_loss_of(trainer, result.training_loss, checkpoint)}  # --resume too
    card = training_card(run, metrics, seconds)
    card.update(
        processes=world_size,
        distributed_type=distributed_type,
        resumed_from=record.resumed_from,
        global_step=record.global_step,
        samples_trained_per_rank=[r.samples_trained for r in records],
    )
    target = save_adapter(run, out / ADAPTER_FOLDER, card, overwrite=args.overwrite, state_dict=state_dict)
    per_rank = ", ".join(f"rank {r.rank}: {r.global_step} steps, {r.samples_trained} rows" for r in records)
    print(
        f"{world_size} process{'es' if world_size > 1 else ''} trained ({distributed_type}"
        f"{', ' + records[0].model_wrapper if world_size > 1 else ''}): {per_rank}"
    )
    print(f"train loss {metrics['train_loss']:.4f} in {seconds:.0f} s; adapter saved to {target}")
    last = Path(out) / f"checkpoint-{record.global_step}"
    if last.is_dir():
        print(f"{last.name} keeps the optimizer state: --resume --max-steps M --overwrite trains further")
    else:
        print(f"checkpoints every {preset.save_steps} steps (--save-steps); none at the last step")
    return 0


# --- The command ---------------------------------------------------------------------------------


def train_command(args: argparse.Namespace) -> int:
    """``python -m course_utils train``: launch N ranks with accelerate, or train here."""
    try:
        if args.processes < 1:
            raise TrainCommandError(f"--processes must be at least 1, not {args.processes}")
        for name in ("max_steps", "rows", "batch_size", "grad_accum", "seq_len", "lora_r", "save_steps"):
            value = getattr(args, name)
            if value is not None and value < 1:
                raise TrainCommandError(f"--{name.replace('_', '-')} must be at least 1, not {value}")
        for name in ("epochs", "lr"):
            value = getattr(args, name)
            if value is not None and value <= 0:
                raise TrainCommandError(f"--{name} must be positive, not {value}")
        if args.eval_rows is not None and args.eval_rows < 0:
            raise TrainCommandError(f"--eval-rows must be 0 or more, not {args.eval_rows}")
        if args.processes == 1 or args.launched:
            return run_worker(args)
        return _launch(args)
    except TrainCommandError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _launch(args: argparse.Namespace) -> int:
    from course_utils.hardware import PreflightError, detect
    from course_utils.profiles import resolve_profile

    out = Path(args.out)
    check_output_dir(out, resume=args.resume, overwrite=args.overwrite, max_steps=args.max_steps)
    prepare_output_dir(out, resume=args.resume)
    hardware = detect(out)
    try:
        profile = resolve_profile(args.profile, hardware=hardware)
        load_rows(args, profile.name)  # bad data files: one line here, not one per rank
        plan = plan_launch(args, secrets.token_hex(4), hardware=hardware)
    except (ValueError, PreflightError, OSError) as exc:
        raise TrainCommandError(str(exc)) from exc
    print(f"launching {args.processes} processes with accelerate ({plan.strategy.upper()})")
    for note in plan.notes:
        print(f"note: {note}")
    print("$ python " + shlex.join(plan.command[1:]), flush=True)
    returncode = subprocess.run(plan.command, check=False).returncode
    if returncode != 0:
        print(
            f"error: the {args.processes} training processes failed (exit {returncode}); see above",
            file=sys.stderr,
        )
    return returncode


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="the lesson-04 training run as a script (tmux-friendly; --processes N uses accelerate)",
        description="Train lesson 04's LoRA adapter from the command line. The adapter goes to "
        "OUT/adapter, checkpoints to OUT/checkpoint-N.",
    )
    p.add_argument("--profile", default="auto", help="auto (detect), cpu-tiny, t4-16gb, gpu-24gb, gpu-80gb")
    p.add_argument("--out", required=True, help="run folder: checkpoints, rank records and the adapter")
    p.add_argument("--train-file", help="course-format JSONL (default: lesson 03's receipts splits)")
    p.add_argument("--val-file", help="course-format JSONL for the eval loss (default: lesson 03's val)")
    p.add_argument("--rows", type=int, help="train on the first N rows only")
    p.add_argument("--eval-rows", type=int, help="evaluation rows (default 24; 0: no evaluation)")
    p.add_argument("--max-steps", type=int, help="optimizer steps (default: the preset's)")
    p.add_argument("--epochs", type=float, help="passes over the training rows (instead of --max-steps)")
    p.add_argument("--lr", type=float, help="learning rate")
    p.add_argument("--lora-r", type=int, help="LoRA rank (alpha follows unless --lora-alpha)")
    p.add_argument("--lora-alpha", type=int)
    p.add_argument("--batch-size", type=int, help="rows per process per micro-batch")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    p.add_argument("--seq-len", type=int, help="max tokens per row")
    p.add_argument("--save-steps", type=int, help="checkpoint every N steps")
    p.add_argument("--logging-steps", type=int, help="a progress line every N steps")
    p.add_argument("--seed", type=int)
    p.add_argument("--resume", action="store_true", help="continue from the latest OUT/checkpoint-N")
    p.add_argument("--overwrite", action="store_true", help="replace OUT's adapter / start over")
    p.add_argument("--processes", type=int, default=1, help="train with N processes (accelerate launch)")
    p.add_argument("--stand-in-dir", help="where the CPU stand-in is built (default: outputs/stand-ins)")
    p.add_argument("--launched", help=argparse.SUPPRESS)  # the run id, set for the ranks it launches
    p.set_defaults(func=train_command)
