"""Fine-tuning: presets per profile, one ``build_trainer``, live plots, resume and a training card.

Backs lesson 04 (whose cells show the same LoRA and trainer calls as plain library code).

* CUDA (``t4-16gb``, ``gpu-24gb``, ``gpu-80gb``): Unsloth ``FastVisionModel.get_peft_model`` +
  ``UnslothVisionDataCollator`` + TRL ``SFTTrainer``/``SFTConfig`` with response-only loss.
* CPU (``cpu-tiny``): transformers ``Trainer`` + peft LoRA on the stand-in, with the same
  hyper-parameter names. TRL 1.15's SFT loss always calls a Triton kernel that has no CPU driver,
  and Unsloth's CPU backend does not support vision models, so the CPU path computes the same
  response-only loss itself — only at the labelled positions, which is ≈2× faster on a CPU.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import Trainer, TrainerCallback

from course_utils.loss import VisionTextCollator, prepare_examples, response_only_loss, trained_token_ids
from course_utils.profiles import Backend

# LoRA on the language model only: a plain list of names would also hit the Pixtral tower's layers.
LANGUAGE_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
# Small 4's MLA projections have other names.
MLA_TARGETS = (
    r".*language_model.*\.(q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|gate_proj|up_proj|down_proj)"
)


@dataclass(frozen=True)
class TrainPreset:
    """Hyper-parameters; the names follow transformers/TRL so they read the same on every profile."""

    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    learning_rate: float = 2e-4
    lr_scheduler_type: str = "linear"
    warmup_ratio: float = 0.03
    per_device_train_batch_size: int = 2
    gradient_accumulation_steps: int = 4
    max_seq_length: int = 2048
    max_steps: int = 60
    num_train_epochs: float = 1.0
    optim: str = "adamw_8bit"
    weight_decay: float = 0.01
    logging_steps: int = 5
    save_steps: int = 20
    seed: int = 3407
    train_embeddings: bool = False  # only the random stand-in needs it (see lesson 04)
    train_experts: bool = False  # MoE (Small 4): LoRA on the routed experts' 3-D weights too (see add_lora)
    finetune_vision_layers: bool = False
    finetune_language_layers: bool = True
    finetune_attention_modules: bool = True
    finetune_mlp_modules: bool = True
    bf16: bool = True
    fp16: bool = False  # for cards without bf16 (T4, V100); preset_for decides from the card
    max_new_tokens_eval: int = 256

    def as_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, TrainPreset] = {
    # Measured here: 2 CPU cores, ~3 minutes. A random base cannot learn through adapters alone (its
    # frozen random lm_head cannot make a peaked distribution), so the tied embedding rows the data
    # uses are trained too, with a high learning rate and many small steps.
    "cpu-tiny": TrainPreset(
        lora_r=16,
        lora_alpha=32,
        learning_rate=3e-3,
        lr_scheduler_type="cosine",
        warmup_ratio=0.02,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        max_seq_length=512,
        max_steps=220,
        optim="adamw_torch",
        weight_decay=0.0,
        logging_steps=10,
        save_steps=55,
        seed=0,
        train_embeddings=True,
        train_experts=True,
        bf16=True,
        max_new_tokens_eval=200,
    ),
    "t4-16gb": TrainPreset(
        lora_r=16,
        lora_alpha=16,
        learning_rate=2e-4,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
        max_seq_length=2048,
        max_steps=60,
        bf16=False,
        fp16=True,  # the T4 has no bf16
    ),
    "gpu-24gb": TrainPreset(
        lora_r=16,
        lora_alpha=16,
        learning_rate=2e-4,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
        max_seq_length=2048,
        max_steps=100,
    ),
    "gpu-80gb": TrainPreset(
        lora_r=32,
        lora_alpha=32,
        learning_rate=1e-4,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_seq_length=4096,
        max_steps=200,
        optim="adamw_torch",
    ),
}


CPU_PROFILES = ("cpu-tiny",)  # bf16 there is CPU autocast, unrelated to a CUDA card's support


def cuda_bf16_supported() -> bool | None:
    """Whether this machine's CUDA card computes in bf16 (Ampere and newer); ``None`` without a card."""
    return torch.cuda.is_bf16_supported() if torch.cuda.is_available() else None


def preset_for(profile_name: str, *, bf16_supported: bool | None = None, **overrides) -> TrainPreset:
    """The preset of a profile, with any field overridden (unknown names raise ``TypeError``).

    On a GPU profile the precision follows the card: a card without bf16 (a V100 32 GB resolves to
    ``gpu-24gb``) trains in fp16 — Unsloth loads it in fp16 and its trainer raises when asked for bf16.
    ``bf16_supported``: the card's answer; ``None`` asks ``torch.cuda.is_bf16_supported()`` (no CUDA card:
    the preset is kept as written, for the card it was written for).
    """
    if profile_name not in PRESETS:
        raise KeyError(f"No preset for profile {profile_name!r}; known: {', '.join(PRESETS)}")
    preset = replace(PRESETS[profile_name], **overrides)
    if profile_name in CPU_PROFILES:
        return preset
    supported = cuda_bf16_supported() if bf16_supported is None else bf16_supported
    if supported is False and preset.bf16:
        preset = replace(preset, bf16=False, fp16=True)
    return preset


# --- Model ---------------------------------------------------------------------------------------


def expert_parameters(model) -> list[str]:
    """The routed experts' weight names for peft's ``target_parameters`` (empty for a dense model).

    transformers keeps a MoE layer's experts as 3-D ``nn.Parameter`` tensors (Small 4:
    ``mlp.experts.gate_up_proj`` (experts, 2·moe_intermediate, hidden) and ``mlp.experts.down_proj``), not
    ``nn.Linear`` modules, so ``target_modules`` cannot reach them; peft wraps them by parameter name.
    """
    suffixes = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
    names = {n for n, p in model.named_parameters() if p.ndim == 3}
    return [s for s in suffixes if any(n.endswith(s) and "language_model" in n for n in names)]


def add_lora(model, preset: TrainPreset, trainable_tokens: list[int] | None = None):
    """Wrap ``model`` with LoRA adapters on the language model (transformers + peft, the CPU path).

    With ``preset.train_experts`` a MoE model's routed experts get LoRA too (:func:`expert_parameters`).
    """
    from peft import LoraConfig, get_peft_model

    is_mla = getattr(model.config.text_config, "kv_lora_rank", None) is not None
    experts = expert_parameters(model) if preset.train_experts else []
    config = LoraConfig(
        r=preset.lora_r,
        lora_alpha=preset.lora_alpha,
        lora_dropout=preset.lora_dropout,
        target_modules=MLA_TARGETS if is_mla else LANGUAGE_TARGETS,
        target_parameters=experts or None,
        trainable_token_indices={"embed_tokens": trainable_tokens}
        if (preset.train_embeddings and trainable_tokens)
        else None,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def add_lora_unsloth(model, preset: TrainPreset):  # pragma: no cover - needs a CUDA GPU
    """The GPU path: Unsloth's get_peft_model, choosing which parts of the vision model to train."""
    from unsloth import FastVisionModel

    return FastVisionModel.get_peft_model(
        model,
        finetune_vision_layers=preset.finetune_vision_layers,
        finetune_language_layers=preset.finetune_language_layers,
        finetune_attention_modules=preset.finetune_attention_modules,
        finetune_mlp_modules=preset.finetune_mlp_modules,
        r=preset.lora_r,
        lora_alpha=preset.lora_alpha,
        lora_dropout=preset.lora_dropout,
        bias="none",
        random_state=preset.seed,
        use_gradient_checkpointing="unsloth",
    )


class ParameterCount(NamedTuple):
    trainable: int
    total: int


def count_parameters(model) -> ParameterCount:
    """Trainable and total parameters. A bitsandbytes 4-bit tensor stores two values per byte; it is
    counted as the parameters it stands for (its ``quant_state.shape``), not as stored bytes."""

    def count(param) -> int:
        state = getattr(param, "quant_state", None)
        return math.prod(state.shape) if state is not None else param.numel()

    params = list(model.parameters())
    return ParameterCount(sum(count(p) for p in params if p.requires_grad), sum(count(p) for p in params))


# --- Trainer (CPU path) --------------------------------------------------------------------------


def _base_model(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class ResponseOnlyTrainer(Trainer):
    """transformers' Trainer with the response-only loss, computed at the labelled positions only."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = response_only_loss(model, inputs, num_items_in_batch)
        return (loss, None) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with torch.no_grad():
            loss = response_only_loss(model, self._prepare_inputs(inputs))
        return loss.detach(), None, None


class DistributedResponseOnlyTrainer(ResponseOnlyTrainer):
    """:class:`ResponseOnlyTrainer` for several processes (``python -m course_utils train --processes N``).

    DDP all-reduces the gradients only of a forward that runs through its wrapper (FSDP gathers its
    shards in hooks on the forward too), and the loss above calls the model's parts directly — so the
    loss runs *as* the model's forward here. Without it, measured on 2 CPU processes, each rank kept its
    own gradients and the ranks ended with different weights. The token count is summed over the
    processes and DDP averages their gradients, so the loss is scaled by the process count, as
    transformers' own ``Trainer.compute_loss`` does.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = _as_forward_of(model, lambda core: response_only_loss(core, inputs, num_items_in_batch))
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        return (loss, None) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # through the model's forward, as in training: FSDP gathers the root module's shards (embeddings,
        # final norm, lm_head) in its forward hooks; called on the parts directly, they stay sharded
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = _as_forward_of(model, lambda core: response_only_loss(core, inputs))
        return loss.detach(), None, None


def _as_forward_of(model, loss_of):
    """``loss_of(inner_model)`` computed as ``model``'s forward — through a DDP wrapper or FSDP's hooks."""
    from torch.nn.parallel import DistributedDataParallel

    inner = model.module if isinstance(model, DistributedDataParallel) else model
    inner.forward = lambda: loss_of(inner)
    try:
        return model()
    finally:
        del inner.forward


def world_size() -> int:
    """Processes training together (``WORLD_SIZE``, set by ``accelerate launch`` / ``torchrun``)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def shared_training_kwargs(preset: TrainPreset, output_dir: str | os.PathLike) -> dict:
    """The arguments TrainingArguments (CPU path) and TRL's SFTConfig (GPU path) share."""
    return dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=preset.per_device_train_batch_size,
        per_device_eval_batch_size=preset.per_device_train_batch_size,  # transformers' default is 8
        gradient_accumulation_steps=preset.gradient_accumulation_steps,
        learning_rate=preset.learning_rate,
        lr_scheduler_type=preset.lr_scheduler_type,
        warmup_steps=math.ceil(preset.warmup_ratio * preset.max_steps),
        max_steps=preset.max_steps,
        weight_decay=preset.weight_decay,
        optim=preset.optim,
        logging_steps=preset.logging_steps,
        save_strategy="steps",
        save_steps=preset.save_steps,
        seed=preset.seed,
        report_to="none",
        remove_unused_columns=False,
    )


def training_arguments(
    preset: TrainPreset, output_dir: str | os.PathLike, use_cpu: bool, eval_steps: int | None
):
    from transformers import TrainingArguments

    return TrainingArguments(
        **shared_training_kwargs(preset, output_dir),
        eval_strategy="steps" if eval_steps else "no",
        eval_steps=eval_steps,
        bf16=preset.bf16,
        fp16=preset.fp16 and not use_cpu,
        use_cpu=use_cpu,
        data_seed=preset.seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
        include_num_input_tokens_seen=True,
        ddp_find_unused_parameters=False,  # every trainable (LoRA) weight is used in every step
    )


@dataclass
class TrainingRun:
    trainer: object
    model: object
    processor: object
    preset: TrainPreset
    backend: Backend
    output_dir: Path
    trainable_parameters: int
    total_parameters: int
    train_examples: int
    dataset_hash: str
    notes: list[str] = field(default_factory=list)


def dataset_hash(records: list[dict]) -> str:
    from course_utils.data import record_key

    return hashlib.sha256("".join(record_key(r) for r in records).encode()).hexdigest()[:16]


def build_trainer(
    model,
    processor,
    train_records: list[dict],
    eval_records: list[dict] | None,
    preset: TrainPreset,
    output_dir: str | os.PathLike,
    *,
    backend: Backend = "transformers",
    base_dir: Path | None = None,
    callbacks: list | None = None,
    progress: bool = True,
) -> TrainingRun:
    """One call for every profile: adapters, data, collator, loss and trainer.

    ``backend="unsloth"`` (CUDA) uses Unsloth + TRL; ``"transformers"`` the CPU path described above.
    """
    output_dir = Path(output_dir)
    torch.manual_seed(preset.seed)
    if backend == "unsloth":  # pragma: no cover - needs a CUDA GPU
        return _build_unsloth_trainer(
            model, processor, train_records, eval_records, preset, output_dir, callbacks, base_dir
        )
    train_examples = prepare_examples(train_records, processor, preset.max_seq_length, base_dir, progress)
    eval_examples = (
        prepare_examples(eval_records, processor, preset.max_seq_length, base_dir, progress)
        if eval_records
        else None
    )
    notes = []
    tokens = trained_token_ids(train_examples) if preset.train_embeddings else None
    if tokens:
        notes.append(f"embedding rows trained for the {len(tokens)} token ids that appear in the replies")
    peft_model = add_lora(model, preset, tokens)
    peft_model.train()
    trainable, total = count_parameters(peft_model)
    args = training_arguments(
        preset,
        output_dir,
        use_cpu=not torch.cuda.is_available(),
        eval_steps=preset.save_steps if eval_examples else None,
    )
    trainer_class = DistributedResponseOnlyTrainer if world_size() > 1 else ResponseOnlyTrainer
    trainer = trainer_class(
        model=peft_model,
        args=args,
        train_dataset=train_examples,
        eval_dataset=eval_examples,
        data_collator=VisionTextCollator(processor.tokenizer.pad_token_id),
        callbacks=callbacks or [],
    )
    return TrainingRun(
        trainer,
        peft_model,
        processor,
        preset,
        backend,
        output_dir,
        trainable,
        total,
        len(train_examples),
        dataset_hash(train_records),
        notes,
    )


def _build_unsloth_trainer(
    model, processor, train_records, eval_records, preset, output_dir, callbacks, base_dir=None
):  # pragma: no cover
    """Unsloth vision SFT: the settings its vision notebooks use (no packing, keep all columns,
    skip TRL's dataset preparation — the collator does it) plus response-only loss."""
    from trl import SFTConfig, SFTTrainer
    from unsloth import FastVisionModel
    from unsloth.trainer import UnslothVisionDataCollator

    from course_utils.data import with_images

    model = add_lora_unsloth(model, preset)
    FastVisionModel.for_training(model)

    def to_rows(records):
        return [{"messages": with_images(r, base_dir)} for r in records]  # paths relative to the data file

    bf16 = preset.bf16 and torch.cuda.is_bf16_supported()  # preset_for already chose fp16 on T4/V100
    config = SFTConfig(
        **shared_training_kwargs(preset, output_dir),
        eval_strategy="steps" if eval_records else "no",
        eval_steps=preset.save_steps if eval_records else None,
        include_num_input_tokens_seen=True,
        bf16=bf16,
        fp16=not bf16,
        dataset_text_field="",
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=preset.max_seq_length,
    )
    collator = UnslothVisionDataCollator(
        model,
        processor,
        max_seq_length=preset.max_seq_length,
        train_on_responses_only=True,
        instruction_part="[INST]",
        response_part="[/INST]",
    )
    trainer = SFTTrainer(
        model=model,
        processing_class=processor,
        data_collator=collator,
        train_dataset=to_rows(train_records),
        eval_dataset=to_rows(eval_records) if eval_records else None,
        args=config,
        callbacks=callbacks or [],
    )
    trainable, total = count_parameters(model)
    return TrainingRun(
        trainer,
        model,
        processor,
        preset,
        "unsloth",
        Path(output_dir),
        trainable,
        total,
        len(train_records),
        dataset_hash(train_records),
        ["Unsloth + TRL SFTTrainer"],
    )


# --- Callbacks -----------------------------------------------------------------------------------


def _peak_memory_gib() -> tuple[str, float]:
    if torch.cuda.is_available():
        return "peak VRAM", torch.cuda.max_memory_reserved() / 1024**3
    try:
        import resource

        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return "peak RAM", kib / 1024**2
    except ImportError:  # pragma: no cover - Windows
        import psutil

        return "RAM", psutil.Process().memory_info().rss / 1024**3


class ThroughputCallback(TrainerCallback):
    """Adds tokens/s and peak memory to every log line; keeps the history for plots."""

    def __init__(self):
        self.history: list[dict] = []
        self._tokens = 0
        self._t0 = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()
        self._tokens = state.num_input_tokens_seen or 0  # a resumed run starts with tokens already seen

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        label, gib = _peak_memory_gib()
        entry = {
            "step": state.global_step,
            **{k: v for k, v in logs.items() if isinstance(v, (int, float))},
            label: round(gib, 2),
        }
        if state.num_input_tokens_seen and self._t0:
            seen = state.num_input_tokens_seen - self._tokens
            entry["tokens_per_s"] = round(seen / (time.perf_counter() - self._t0), 1)
        self.history.append(entry)


class LivePlotCallback(TrainerCallback):
    """Redraws the train/eval loss curve in place while training runs (in a notebook)."""

    def __init__(self, source: ThroughputCallback):
        self.source = source
        self.handle = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        try:
            from IPython import get_ipython
            from IPython.display import display
        except ImportError:
            return
        if get_ipython() is None:
            return
        figure = plot_losses(self.source.history, show=False)
        if self.handle is None:
            self.handle = display(figure, display_id=True)
        else:
            self.handle.update(figure)
        import matplotlib.pyplot as plt

        plt.close(figure)


class StopAfter(TrainerCallback):
    """Ends training at ``step``, after saving a checkpoint there — an "interruption" to resume from.
    Remove it before resuming: ``trainer.remove_callback(StopAfter)``."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_save = True
            control.should_training_stop = True
        return control


def make_callbacks(plot: bool = True) -> tuple[list, ThroughputCallback]:
    """A throughput/memory logger and (in notebooks) a live train/eval loss plot."""
    throughput = ThroughputCallback()
    return [throughput] + ([LivePlotCallback(throughput)] if plot else []), throughput


def plot_losses(history: list[dict], show: bool = True):
    """Train and eval loss against steps (history entries from ``ThroughputCallback``)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if train:
        ax.plot(*zip(*train), marker=".", label="train loss")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (response tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    if show:
        plt.show()
    return fig


# --- Saving --------------------------------------------------------------------------------------


def training_card(run: TrainingRun, metrics: dict, seconds: float) -> dict:
    from importlib import metadata

    versions = {}
    for name in ("torch", "transformers", "peft", "trl", "unsloth", "mistral-common"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    label, peak = _peak_memory_gib()
    return {
        "base_model": getattr(_base_model(run.model).config, "_name_or_path", None),
        "backend": run.backend,
        "hyperparameters": run.preset.as_dict(),
        "trainable_parameters": run.trainable_parameters,
        "total_parameters": run.total_parameters,
        "train_examples": run.train_examples,
        "dataset_sha256_16": run.dataset_hash,
        "final_metrics": metrics,
        "train_seconds": round(seconds, 1),
        "hardware": {
            "machine": platform.machine(),
            "cuda": torch.cuda.is_available(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            label: round(peak, 2),
        },
        "library_versions": versions,
        "notes": run.notes,
    }


def save_adapter(
    run: TrainingRun,
    target: str | os.PathLike,
    card: dict,
    overwrite: bool = False,
    state_dict: dict | None = None,
) -> Path:
    """Save the adapter (safetensors), the processor and ``training_card.json``.

    Never over an existing one (unless ``overwrite``). ``state_dict``: the full state gathered from a
    sharded (FSDP) model — ``accelerator.get_state_dict(model)``, which every rank must call.
    """
    target = Path(target)
    if (target / "adapter_model.safetensors").exists() and not overwrite:
        raise FileExistsError(
            f"{target} already holds an adapter; pick another folder or pass overwrite=True"
        )
    from course_utils.paths import staged

    with staged(target, overwrite=overwrite, folder=True) as tmp:  # all three files, or none
        run.model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        run.processor.save_pretrained(tmp)
        (tmp / "training_card.json").write_text(json.dumps(card, indent=2) + "\n")
    return target


def train_loss_of(trainer, training_loss: float, resumed_from: str | os.PathLike | None = None) -> float:
    """The run's mean training loss per step, right after a resume too.

    transformers' ``TrainOutput.training_loss`` sums the loss of the steps run since the last (re)start
    and divides by every step of the run: after ``resume_from_checkpoint=resumed_from`` (a
    ``checkpoint-N`` folder: the run resumed at step ``N``) it
    leaves the first ``N`` steps out of the sum but not out of the count. Those steps come back
    from the checkpoint's log history, one mean per logging window, weighted here by the window's length
    (steps between the last logged window and ``N`` count at that window's mean, or at the
    resumed steps' mean when nothing was logged). Without a resume, ``training_loss`` is already right
    and is returned as is.
    """
    if not resumed_from:
        return training_loss
    resumed_at = checkpoint_step(resumed_from)
    steps = trainer.state.global_step
    after_mean = training_loss * steps / max(1, steps - resumed_at)
    before, last_step, last_loss = 0.0, 0, after_mean
    for entry in trainer.state.log_history:
        if "loss" in entry and entry["step"] <= resumed_at:
            before += entry["loss"] * (entry["step"] - last_step)
            last_step, last_loss = entry["step"], entry["loss"]
    before += last_loss * (resumed_at - last_step)
    return (before + training_loss * steps) / steps


def checkpoint_step(checkpoint: str | os.PathLike) -> int:
    """The step ``N`` of a ``checkpoint-N`` folder."""
    return int(Path(checkpoint).name.rsplit("-", 1)[-1])


def latest_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest complete ``checkpoint-N`` folder in ``output_dir`` (what ``resume_from_checkpoint``
    continues). transformers writes ``trainer_state.json`` last, so a folder without it was cut off while
    saving — resuming from it would restart at step 0 — and is passed over; so are other names
    (``checkpoint-best``), as in transformers' own ``get_last_checkpoint``."""
    folders = [
        folder
        for folder in Path(output_dir).glob("checkpoint-*")
        if re.fullmatch(r"checkpoint-\d+", folder.name)
        and folder.is_dir()
        and (folder / "trainer_state.json").is_file()
    ]
    return str(max(folders, key=checkpoint_step)) if folders else None


# --- Bigger than one GPU -------------------------------------------------------------------------


def axolotl_config(
    model_id: str,
    dataset_path: str,
    preset: TrainPreset,
    output_dir: str = "./outputs/axolotl",
    load_in_4bit: bool = True,
) -> dict:
    """The same run as an Axolotl YAML (``axolotl train config.yml``) for a dense model (Small 3.x,
    Ministral 3), e.g. on several GPUs. Small 4 has its own recipe: :func:`axolotl_small4_qlora`."""
    if "small-4" in model_id.lower():
        raise ValueError(
            f"{model_id}: Small 4 (MLA attention, 3-D experts, FP8 release) needs other targets and the "
            "BF16 re-upload; use axolotl_small4_qlora(dataset_path)."
        )
    return {
        "base_model": model_id,
        "processor_type": "AutoProcessor",
        "load_in_4bit": load_in_4bit,
        "adapter": "qlora" if load_in_4bit else "lora",
        "lora_r": preset.lora_r,
        "lora_alpha": preset.lora_alpha,
        "lora_dropout": preset.lora_dropout,
        "lora_target_modules": LANGUAGE_TARGETS,
        "chat_template": "tokenizer_default",
        "datasets": [
            {
                "path": dataset_path,
                "type": "chat_template",
                "field_messages": "messages",
                "roles_to_train": ["assistant"],
            }
        ],
        "skip_prepare_dataset": True,
        "remove_unused_columns": False,
        "sample_packing": False,  # packing is not supported for vision rows
        "sequence_len": preset.max_seq_length,
        "micro_batch_size": preset.per_device_train_batch_size,
        "gradient_accumulation_steps": preset.gradient_accumulation_steps,
        "max_steps": preset.max_steps,
        "learning_rate": preset.learning_rate,
        "lr_scheduler": preset.lr_scheduler_type,
        "warmup_ratio": preset.warmup_ratio,
        "optimizer": "adamw_bnb_8bit" if preset.optim == "adamw_8bit" else "adamw_torch",
        "bf16": "auto",
        "gradient_checkpointing": True,
        "flash_attention": True,
        "save_steps": preset.save_steps,
        "seed": preset.seed,
        "output_dir": output_dir,
    }


# axolotl's published Small 4 QLoRA recipe (axolotl-ai-cloud/axolotl, examples/mistral4/qlora-vision.yml;
# its README: "no experts ~68 GiB"). The official checkpoint is FP8, so it starts from the BF16 re-upload;
# transformers' 4-bit loading converts only nn.Linear, so the 3-D expert weights need axolotl's
# quantize_moe_experts (else ≈116B expert weights stay bf16); Cut Cross Entropy avoids the 131k-wide logits.
AXOLOTL_SMALL4_QLORA = {
    "base_model": "axolotl-ai-co/Mistral-Small-4-119B-2603-BF16",
    "processor_type": "AutoProcessor",
    "plugins": ["axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"],
    "load_in_4bit": True,
    "quantize_moe_experts": True,
    "skip_prepare_dataset": True,
    "remove_unused_columns": False,
    "sample_packing": False,
    "adapter": "qlora",
    "sequence_len": 2048,
    "lora_r": 32,
    "lora_alpha": 16,
    "lora_dropout": 0.05,
    "lora_target_modules": (
        r"model.language_model.layers.[\d]+.(mlp|cross_attn|self_attn).(up|down|gate|q|k|v|o)_proj"
    ),
    "gradient_accumulation_steps": 1,
    "micro_batch_size": 1,
    "num_epochs": 1,
    "optimizer": "adamw_bnb_8bit",
    "lr_scheduler": "cosine",
    "learning_rate": 0.0002,
    "bf16": True,
    "tf32": True,
    "gradient_checkpointing": True,
    "flash_attention": True,
    "warmup_ratio": 0.1,
    "weight_decay": 0.0,
}


def axolotl_small4_qlora(dataset_path: str, output_dir: str = "./outputs/axolotl-small4") -> dict:
    """axolotl's known-good Small 4 QLoRA recipe, trained on ``dataset_path`` (course schema rows).

    Training the routed experts too (``lora_target_parameters: [mlp.experts.gate_up_proj,
    mlp.experts.down_proj]``) is ≈ 93 GiB in axolotl's measurements; the recipe leaves them frozen.
    """
    return {
        **AXOLOTL_SMALL4_QLORA,
        "datasets": [
            {
                "path": dataset_path,
                "type": "chat_template",
                "field_messages": "messages",
                "roles_to_train": ["assistant"],
            }
        ],
        "output_dir": output_dir,
    }


def fsdp_layer_classes(model) -> tuple[str, ...]:
    """The layer classes FSDP wraps one by one: the model's own ``_no_split_modules`` (Mistral 3:
    ``MistralDecoderLayer``, Ministral 3: ``Ministral3DecoderLayer``, Small 4: ``Mistral4DecoderLayer``,
    plus the Pixtral tower's ``PixtralAttentionLayer``)."""
    return tuple(sorted(_base_model(model)._no_split_modules))


def accelerate_fsdp_config(
    num_processes: int = 2,
    cpu_offload: bool = False,
    *,
    layer_classes: Sequence[str],
    mixed_precision: str = "bf16",
) -> dict:
    """An ``accelerate launch --config_file`` config sharding the model over ``num_processes`` GPUs (FSDP).

    ``layer_classes``: :func:`fsdp_layer_classes` of the model you train — never a hard-coded list.
    ``mixed_precision``: ``"bf16"``, or ``"fp16"`` on a card without bf16 (the preset's choice).
    """
    if mixed_precision not in ("bf16", "fp16", "no"):
        raise ValueError(f"mixed_precision must be bf16, fp16 or no, not {mixed_precision!r}")
    if num_processes < 1:
        raise ValueError("num_processes must be at least 1")
    if not layer_classes:
        raise ValueError("layer_classes is empty: pass fsdp_layer_classes(model)")
    return {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "FSDP",
        "mixed_precision": mixed_precision,
        "num_machines": 1,
        "num_processes": num_processes,
        "machine_rank": 0,
        "main_training_function": "main",
        "fsdp_config": {
            "fsdp_version": 2,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_transformer_layer_cls_to_wrap": ",".join(layer_classes),
            "fsdp_state_dict_type": "SHARDED_STATE_DICT",
            "fsdp_offload_params": cpu_offload,
            "fsdp_cpu_ram_efficient_loading": True,
            "fsdp_activation_checkpointing": True,
        },
    }


def write_yaml(data: dict, path: str | os.PathLike, overwrite: bool = False) -> Path:
    import yaml

    from course_utils.paths import atomic_write

    return atomic_write(path, yaml.safe_dump(data, sort_keys=False), overwrite=overwrite)


# --- Teaching helpers ----------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantizationError:
    nf4_rmse: float
    int4_rmse: float
    bits_per_weight_nf4: float


def nf4_roundtrip_error(values: torch.Tensor, blocksize: int = 64) -> QuantizationError:
    """Quantize ``values`` to NF4 (bitsandbytes, works on CPU) and back; compare with plain int4.

    NF4's 16 levels sit at quantiles of a normal distribution, where trained weights are dense, so its
    error is lower than evenly spaced 4-bit levels at the same size.
    """
    import bitsandbytes.functional as bnbf

    flat = values.float().contiguous()
    packed, state = bnbf.quantize_4bit(flat, blocksize=blocksize, quant_type="nf4")
    nf4 = bnbf.dequantize_4bit(packed, state, quant_type="nf4").reshape(flat.shape)
    blocks = flat.reshape(-1, blocksize)
    scale = blocks.abs().amax(dim=1, keepdim=True) / 7
    int4 = (torch.clamp(torch.round(blocks / scale), -8, 7) * scale).reshape(flat.shape)

    def rmse(q):
        return torch.sqrt(torch.mean((q - flat) ** 2)).item()

    return QuantizationError(rmse(nf4), rmse(int4), 4 + 32 / blocksize)


def ensure_adapter(
    profile_name: str,
    adapter_dir: str | os.PathLike,
    train_records: list[dict],
    eval_records: list[dict],
    *,
    hardware=None,
    progress: bool = True,
    model: str | None = None,
) -> tuple[Path, str]:
    """Lesson 04's adapter when it exists; otherwise train it the same way now (≈ 3 min on cpu-tiny).

    Lets lessons 05–07 run on their own. Never replaces an existing adapter. ``model``: the notebook's
    ``MODEL`` (None: ``COURSE_MODEL``, else Mistral Small 3.2).
    """
    import time

    from course_utils.models import load
    from course_utils.paths import outputs_dir

    adapter_dir = Path(adapter_dir)
    if (adapter_dir / "adapter_model.safetensors").exists():
        return adapter_dir, f"adapter from lesson 04 ({adapter_dir.name})"
    loaded = load(profile_name, model=model, hardware=hardware)
    preset = preset_for(loaded.profile.name)
    run_dir = outputs_dir(loaded.profile.name, "runs", time.strftime("receipts-%Y%m%d-%H%M%S"))
    run = build_trainer(
        loaded.model,
        loaded.processor,
        train_records,
        eval_records,
        preset,
        run_dir,
        backend=loaded.backend,
        progress=progress,
    )
    started = time.perf_counter()
    result = run.trainer.train()
    card = training_card(run, {"train_loss": result.training_loss}, time.perf_counter() - started)
    save_adapter(run, adapter_dir, card)
    return adapter_dir, f"lesson 04's adapter not found: trained it now ({preset.max_steps} steps)"
