"""The trainer's hyperparameters: one typed dataclass, parsed from `--name value` arguments.

SageMaker passes each pipeline hyperparameter as `--name value`; every path also has a flag so the same
entry point runs on a laptop. Bad values raise `SettingsError` with one line naming the field.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Sequence

from environment import DEFAULT_PATHS, default_path


class SettingsError(ValueError):
    """A hyperparameter the trainer cannot run with; the message is for the user as is."""


def _doc(text: str, **extra):
    return {"doc": text, **extra}


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainSettings:
    # Paths (SageMaker defaults from the environment; flags override).
    train_dir: str = dataclasses.field(default="", metadata=_doc(
        "Training data: *.jsonl files with a `text` field per line, and/or *.npy arrays of token ids."))
    validation_dir: str = dataclasses.field(default="", metadata=_doc(
        "Optional validation data, same formats; empty: hold out validation_holdout_fraction of train."))
    model_dir: str = dataclasses.field(default="", metadata=_doc(
        "Base model: a Hugging Face folder (config.json, safetensors weights, tokenizer). Without weights "
        "the model is initialised randomly from config.json (seeded)."))
    output_model_dir: str = dataclasses.field(default="", metadata=_doc(
        "Where rank 0 writes the fine-tuned model (safetensors); SageMaker uploads it, uncompressed, to <output path>/<job>/output/model/."))
    output_data_dir: str = dataclasses.field(default="", metadata=_doc(
        "Where rank 0 writes metrics.jsonl (one line per step)."))
    checkpoint_dir: str = dataclasses.field(default="/opt/ml/checkpoints", metadata=_doc(
        "Checkpoint folder, synced to S3 by SageMaker; never the model dir."))
    # Optimisation.
    max_steps: int = dataclasses.field(default=1000, metadata=_doc("Optimizer steps to run.", min=1))
    learning_rate: float = dataclasses.field(default=2e-5, metadata=_doc("Peak learning rate.", min=0.0, open=True))
    min_learning_rate_ratio: float = dataclasses.field(default=0.1, metadata=_doc(
        "Cosine floor as a fraction of the peak.", min=0.0, max=1.0))
    warmup_ratio: float = dataclasses.field(default=0.03, metadata=_doc(
        "Linear warmup over this fraction of max_steps, then cosine decay.", min=0.0, max=0.5))
    weight_decay: float = dataclasses.field(default=0.1, metadata=_doc("AdamW weight decay.", min=0.0))
    max_grad_norm: float = dataclasses.field(default=1.0, metadata=_doc(
        "Gradient clipping norm; 0 disables clipping.", min=0.0))
    per_device_batch_size: int = dataclasses.field(default=4, metadata=_doc("Sequences per device per micro-step.", min=1))
    gradient_accumulation_steps: int = dataclasses.field(default=8, metadata=_doc("Micro-steps per optimizer step.", min=1))
    sequence_length: int = dataclasses.field(default=2048, metadata=_doc("Tokens per training sequence.", min=2))
    seed: int = dataclasses.field(default=1234, metadata=_doc("Seed of model init, data order and dropout.", min=0))
    strategy: str = dataclasses.field(default="auto", metadata=_doc(
        "`ddp` replicates the model; `fsdp` shards it (FSDP2 fully_shard per decoder block); `auto` takes ddp "
        "when the memory planner (memory.py) says the whole model's state fits each GPU, else fsdp.",
        choices=("auto", "ddp", "fsdp")))
    activation_checkpointing: str = dataclasses.field(default="auto", metadata=_doc(
        "Recompute each decoder block's activations in the backward pass instead of keeping them: `true`, "
        "`false`, or `auto` (on with fsdp).", choices=("auto", "true", "false")))
    mixed_precision: str = dataclasses.field(default="auto", metadata=_doc(
        "`bf16` autocast, `no`, or `auto` (bf16 on GPU, fp32 on CPU).", choices=("auto", "bf16", "no")))
    deterministic: bool = dataclasses.field(default=False, metadata=_doc(
        "GPU runs as reproducible as torch allows: deterministic kernels (strict), a fixed cuBLAS workspace, no "
        "cuDNN autotuning; slower (see README, Exactness). CPU runs are bit-exact without it."))
    gpu_memory_gib: float = dataclasses.field(default=0.0, metadata=_doc(
        "Plan memory for GPUs of this many GiB (strategy auto and the fit check before loading weights); 0: the "
        "device's own memory (CPU runs: not checked).", min=0.0))
    # What is trained.
    method: str = dataclasses.field(default="full", metadata=_doc(
        "`full` trains every weight; `lora` freezes the base weights and trains low-rank adapters (peft): checkpoints "
        "then hold only the adapters and their optimizer state, and the output is the merged model plus the "
        "adapter in peft's format (`adapter/`).", choices=("full", "lora")))
    lora_rank: int = dataclasses.field(default=16, metadata=_doc("LoRA rank r.", min=1))
    lora_alpha: float = dataclasses.field(default=32.0, metadata=_doc(
        "LoRA alpha: the adapters' update is scaled by alpha / r.", min=0.0, open=True))
    lora_dropout: float = dataclasses.field(default=0.05, metadata=_doc("Dropout on the adapters' input.", min=0.0,
                                                                         max=0.9))
    lora_target_modules: str = dataclasses.field(default="all-linear", metadata=_doc(
        "Modules that get adapters: `all-linear` (every linear layer but the output head) or comma-separated module "
        "names (q_proj,v_proj)."))
    # Checkpoints.
    checkpoint_interval_minutes: float = dataclasses.field(default=10.0, metadata=_doc(
        "Save when this much wall-clock time passed since the last save; 0 disables time-based saves.", min=0.0))
    checkpoint_every_steps: int = dataclasses.field(default=0, metadata=_doc(
        "Also save every N steps; 0 disables step-based saves.", min=0))
    keep_checkpoints: int = dataclasses.field(default=2, metadata=_doc(
        "Complete checkpoints to keep (at least 2: the newest may be mid-upload). SageMaker restores all of them "
        "to every instance on each restart: 12 bytes per parameter each.", min=2))
    async_checkpoint: bool = dataclasses.field(default=True, metadata=_doc(
        "Write checkpoints in the background (torch.distributed.checkpoint.async_save)."))
    # Reporting.
    log_every_steps: int = dataclasses.field(default=1, metadata=_doc("Log a metrics line every N steps.", min=1))
    eval_every_steps: int = dataclasses.field(default=0, metadata=_doc(
        "Validate every N steps (needs validation_dir); 0 validates only at the end.", min=0))
    eval_batches: int = dataclasses.field(default=8, metadata=_doc("Batches per validation.", min=1))
    mlflow_tracking_uri: str = dataclasses.field(default="", metadata=_doc(
        "Log parameters, metrics and checkpoint events to MLflow (a SageMaker tracking server ARN or any "
        "MLflow URI); empty: off."))
    mlflow_experiment: str = dataclasses.field(default="spot-training", metadata=_doc("MLflow experiment name."))
    validation_holdout_fraction: float = dataclasses.field(default=0.02, metadata=_doc(
        "Without validation_dir, the last blocks of the training data held out for validation (0: none).",
        min=0.0, max=0.5))

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value, rules = getattr(self, f.name), f.metadata
            if isinstance(value, float) and not math.isfinite(value):
                raise SettingsError(f"{f.name}={value}: must be a finite number")
            if "choices" in rules and value not in rules["choices"]:
                raise SettingsError(f"{f.name}={value}: must be one of {', '.join(rules['choices'])}")
            if "min" in rules and (value < rules["min"] or (rules.get("open") and value == rules["min"])):
                bound = f"> {rules['min']}" if rules.get("open") else f">= {rules['min']}"
                raise SettingsError(f"{f.name}={value}: must be {bound}")
            if "max" in rules and value > rules["max"]:
                raise SettingsError(f"{f.name}={value}: must be <= {rules['max']}")
        if not self.train_dir:
            raise SettingsError("train_dir: not set; pass --train_dir or run where SM_CHANNEL_TRAIN is set")

    @property
    def warmup_steps(self) -> int:
        return round(self.warmup_ratio * self.max_steps)


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


def parse_settings(argv: Sequence[str] | None = None) -> TrainSettings:
    """Parse `--name value` arguments (SageMaker's form) into validated settings."""
    parser = argparse.ArgumentParser(description="Multi-node causal LM fine-tuning with spot-safe checkpoints.",
                                     allow_abbrev=False)
    converters = {"int": int, "float": float, "bool": _parse_bool, "str": str}
    for f in dataclasses.fields(TrainSettings):
        default = f.default
        if f.name in DEFAULT_PATHS:
            default = default_path(f.name)
        parser.add_argument(f"--{f.name}", type=converters[f.type], default=default, help=f.metadata["doc"])
    args = parser.parse_args(argv)
    return TrainSettings(**vars(args))
