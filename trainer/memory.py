"""How much GPU memory a fine-tuning run needs per GPU, by strategy: the planner behind `strategy=auto`,
`spot-training size --model-config` and the synth-time check of `training.model_parameters`.

Pure Python (no torch): the trainer, the CLI and synth use the same numbers. Bytes per GPU, for a decoder-only
transformer (Llama/Mistral/Qwen shapes; GPT-2 maps onto it), P parameters, N GPUs in the job, b sequences of
s tokens per GPU (T = b*s tokens), hidden size h, MLP size i, L layers, vocabulary V, with AdamW:

  state        fp32 weights (4 P) and AdamW moments (8 P) on every GPU under DDP, a 1/N shard under FSDP; fp32
               gradients (4 P, or their shard) once the step's first backward made them (DDP keeps them in
               its buckets always; FSDP before the first backward only with accumulation > 1)
  activations  per layer and token, with SDPA (no s*s term): two RMSNorms (fp32 input and normalised copies
               plus the output: 8h + a*h each) and a*(5h + 4i) for the attention inputs/outputs and the four
               SwiGLU MLP tensors (2i for GPT-2's two-matrix MLP), a = 2 bytes in bf16 (4 in fp32). With
               activation checkpointing only each block's input (a*h) stays for all L layers, plus two layers'
               worth while one is recomputed; without it, all L layers' worth
  logits       T*V*(a + 12): the logits, their fp32 copy and log-softmax, and the fp32 gradient
  working      what else is alive at the moment of the step that peaks (`plan` takes the largest):
               loss            DDP: autocast's bf16 weight copies (2 P) and the largest gradient made apart
                               before it is copied into its bucket; FSDP: the head unit gathered and the
                               next block prefetched, with activations and logits
               head gradients  FSDP: the head unit gathered, its unsharded gradient and the fp32
                               reduce-scatter input, with the activations
               embedding gradients  FSDP: the same for the embedding unit, every gradient shard made
               optimizer step  the foreach AdamW temporary the size of the weights (CUDA)
               FSDP units (trainer/modeling.py): each decoder block, the embeddings, the final norm with the
               head; a tied head stays in the root with its embeddings. Gathered weights take a bytes each.

Measured against the trainer on CPU (benchmarks/planner.py; tests/test_memory_planner.py runs its small
cases): within 15% of each rank's peak resident memory.

Known points (tests/test_memory_planner.py): Llama 3 8B has 8,030,261,248 parameters and holds 16 bytes
each of state, 128.5 GB, under DDP on every GPU; 70B has 70,553,706,496.

A GPU fits when the total is at most `USABLE_FRACTION` of its memory (the CUDA context, NCCL buffers and
allocator fragmentation take the rest).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

GIB = 2**30
USABLE_FRACTION = 0.90


class PlanError(ValueError):
    """A model description the planner cannot use; the message names the input."""


@dataclasses.dataclass(frozen=True)
class ModelShape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    layers: int
    heads: int
    kv_heads: int
    tied_embeddings: bool
    gated_mlp: bool = True  # SwiGLU (gate, up, down: Llama, Mistral, Qwen); False: GPT-2's two matrices

    @property
    def mlp_matrices(self) -> int:
        return 3 if self.gated_mlp else 2

    @property
    def kv_size(self) -> int:
        return self.hidden_size * self.kv_heads // self.heads

    @property
    def block_parameters(self) -> int:
        h, i, kv = self.hidden_size, self.intermediate_size, self.kv_size
        return 2 * h * h + 2 * h * kv + self.mlp_matrices * h * i + 2 * h

    @property
    def root_parameters(self) -> int:
        """Embeddings, the final norm and the output head (once when tied)."""
        return self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2) + self.hidden_size

    @property
    def parameters(self) -> int:
        return self.layers * self.block_parameters + self.root_parameters

    def lora_parameters(self, rank: int) -> int:
        """Adapter parameters of LoRA rank `rank` on every linear layer of the blocks (peft's all-linear: not the
        head): r x (inputs + outputs) per adapted matrix. Llama: q, o (h -> h), k, v (h -> kv), gate, up
        (h -> i), down (i -> h); GPT-2: c_attn (h -> 3h), c_proj (h -> h), c_fc (h -> i), c_proj (i -> h).
        tests/trainer/test_lora.py checks it against peft's own count."""
        h, i, kv = self.hidden_size, self.intermediate_size, self.kv_size
        if self.gated_mlp:
            per_block = 2 * (h + h) + 2 * (h + kv) + 3 * (h + i)
        else:
            per_block = (h + 3 * h) + (h + h) + 2 * (h + i)
        return rank * per_block * self.layers

    @classmethod
    def from_config(cls, config: Mapping[str, Any], source: str = "config.json") -> ModelShape:
        """From a Hugging Face config.json: Llama-style keys, or GPT-2's (n_embd, n_layer, n_head, n_inner)."""
        def need(*keys: str, default: Any = None) -> int:
            for key in keys:
                value = config.get(key)
                if value is not None:
                    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                        raise PlanError(f"{source}: {key}={value!r} must be a positive integer")
                    return value
            if default is not None:
                return default
            raise PlanError(f"{source}: none of {', '.join(keys)}; not a decoder-only transformer config")

        hidden = need("hidden_size", "n_embd", "d_model")
        heads = need("num_attention_heads", "n_head")
        return cls(vocab_size=need("vocab_size"), hidden_size=hidden,
                   intermediate_size=need("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden),
                   layers=need("num_hidden_layers", "n_layer"), heads=heads,
                   kv_heads=need("num_key_value_heads", default=heads),
                   tied_embeddings=bool(config.get("tie_word_embeddings", True)),
                   gated_mlp="n_embd" not in config and config.get("model_type") not in ("gpt2", "gpt_neox", "opt"))

    @classmethod
    def from_parameters(cls, count: int) -> ModelShape:
        """A Llama 3 shaped model of about `count` parameters: the nearest Llama 3 size's width and vocabulary,
        with the layer count scaled to the count (activations depend on the shape, so a config.json is better)."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 10**6:
            raise PlanError(f"parameters={count!r}: must be an integer of at least 1,000,000")
        nearest = min(LLAMA3.values(), key=lambda shape: abs(shape.parameters - count))
        layers = max(1, round((count - nearest.root_parameters) / nearest.block_parameters))
        return dataclasses.replace(nearest, layers=layers)


# Llama 3 / 3.1 / 3.2 shapes from their config.json files (meta-llama on the Hugging Face Hub).
LLAMA3 = {
    "1B": ModelShape(vocab_size=128256, hidden_size=2048, intermediate_size=8192, layers=16, heads=32, kv_heads=8,
                     tied_embeddings=True),
    "3B": ModelShape(vocab_size=128256, hidden_size=3072, intermediate_size=8192, layers=28, heads=24, kv_heads=8,
                     tied_embeddings=True),
    "8B": ModelShape(vocab_size=128256, hidden_size=4096, intermediate_size=14336, layers=32, heads=32, kv_heads=8,
                     tied_embeddings=False),
    "70B": ModelShape(vocab_size=128256, hidden_size=8192, intermediate_size=28672, layers=80, heads=64,
                      kv_heads=8, tied_embeddings=False),
}


@dataclasses.dataclass(frozen=True)
class Plan:
    """Bytes per GPU. `parameters`, `gradients` and `optimizer` are the run's state (this GPU's shard under
    FSDP); the other terms, and `gradients_held`, are those of `phase`, the moment of the step that peaks."""
    strategy: str
    parameters: int      # fp32 weights (this GPU's shard under FSDP)
    gradients: int       # fp32 gradients (shard), once the backward has made them
    optimizer: int       # AdamW moments (shard)
    phase: str           # where the step peaks: loss, head gradients, embedding gradients, optimizer step
    gradients_held: int  # gradients alive at that moment (none before the first backward of a step)
    working: int         # gathered weights, unsharded gradients, collective and optimizer buffers then
    activations: int
    logits: int
    gpu_bytes: int | None

    @property
    def state(self) -> int:
        return self.parameters + self.gradients + self.optimizer

    @property
    def total(self) -> int:
        return self.parameters + self.optimizer + self.gradients_held + self.working + self.activations + self.logits

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_bytes is None else self.total <= USABLE_FRACTION * self.gpu_bytes


def activation_bytes(shape: ModelShape, *, tokens: int, activation_checkpointing: bool, bf16: bool) -> int:
    """What the forward keeps for the backward, all layers (see the module docstring)."""
    a = 2 if bf16 else 4
    h, i = shape.hidden_size, shape.intermediate_size
    per_layer = 2 * (8 * h + a * h) + a * (5 * h + (2 * shape.mlp_matrices - 2) * i)
    if activation_checkpointing:
        return tokens * (shape.layers * a * h + 2 * per_layer)
    return tokens * shape.layers * per_layer


def plan(shape: ModelShape, *, strategy: str, world_size: int, batch: int, sequence_length: int,
         activation_checkpointing: bool, bf16: bool = True, accumulation: int = 1, gpu_bytes: int | None = None,
         gather_copies: float = 0.0, reduce_copies: float = 0.0, foreach_optimizer: bool = True,
         lora_parameters: int = 0) -> Plan:
    """Bytes per GPU of one configuration at the moment its step peaks (see the module docstring).

    `gather_copies` / `reduce_copies`: extra buffers, in multiples of the collective's tensor, that the
    process group allocates during an all-gather / a reduce-scatter: 0 for NCCL, which works in the buffers it
    is given; gloo (CPU) copies (benchmarks/planner.py measures it). `foreach_optimizer`: torch's AdamW on
    CUDA takes the foreach path, which allocates one temporary the size of the weights it updates
    (`_multi_tensor_adamw`: `exp_avg_sq_sqrt = torch._foreach_sqrt(...)`); on CPU it updates one tensor at a
    time.

    `lora_parameters` (LoRA): the base stays as the trainer stores it (fp32, frozen) and the adapters add their
    own weights; only the adapters get gradients and AdamW moments, and no head or embedding gradient exists."""
    if strategy not in ("ddp", "fsdp"):
        raise PlanError(f"strategy={strategy!r}: must be ddp or fsdp")
    p = shape.parameters
    shard = (lambda n: n) if strategy == "ddp" else (lambda n: -(-n // world_size))  # FSDP: this GPU's shard
    held, trained = shard(p + lora_parameters), shard(lora_parameters or p)
    weights, gradients, optimizer = 4 * held, 4 * trained, 8 * trained
    tokens = batch * sequence_length
    activations = activation_bytes(shape, tokens=tokens, activation_checkpointing=activation_checkpointing,
                                   bf16=bf16)
    a = 2 if bf16 else 4
    logits = tokens * shape.vocab_size * (a + 12)   # logits, their fp32 copy and log-softmax, the fp32 gradient
    step_buffer = 4 * trained if foreach_optimizer else 0
    frozen_edges = bool(lora_parameters)  # LoRA: the embeddings and the head make no gradient
    # phase -> (gradients held, working, activations, logits)
    if strategy == "ddp":
        # Gradients live in DDP's buckets from the first backward on; the first gradient of a tensor is made
        # apart and then copied into its bucket, the largest (the embeddings) transiently twice.
        largest = 0 if frozen_edges else shape.vocab_size * shape.hidden_size
        phases = {"loss": (gradients, (2 * p if bf16 else 0) + 4 * largest, activations, logits),
                  "optimizer step": (gradients, step_buffer, 0, 0)}
    else:
        w = a                      # bytes of a gathered weight (compute dtype)
        unit_gradient = 0 if frozen_edges else w + 4  # the unsharded gradient and its fp32 reduce-scatter input
        block = shape.block_parameters
        tied = shape.tied_embeddings
        head = shape.root_parameters if tied else shape.vocab_size * shape.hidden_size + shape.hidden_size
        embeddings = 0 if tied else shape.vocab_size * shape.hidden_size
        accumulated = gradients if accumulation > 1 else 0  # earlier micro-steps' sharded gradients
        prefetched = w * block * (1 + gather_copies)          # the next block's all-gather, issued early
        phases = {
            "loss": (accumulated, w * head + prefetched, activations, logits),
            "head gradients": (accumulated, (w + unit_gradient) * head + 4 * head * reduce_copies + prefetched,
                               activations, 0),
            "optimizer step": (gradients, step_buffer, 0, 0),
        }
        if tied:  # the root (embeddings and head in one) reduces last, its unsharded gradient kept until then
            phases["head gradients"] = (gradients, (w + unit_gradient) * head + 4 * head * reduce_copies, 0, 0)
        else:
            phases["embedding gradients"] = (gradients, (w + unit_gradient) * embeddings
                                             + 4 * embeddings * reduce_copies, 0, 0)
    phase, (held_gradients, working, live_activations, live_logits) = max(phases.items(), key=lambda kv: sum(kv[1]))
    return Plan(strategy=strategy, parameters=weights, gradients=gradients, optimizer=optimizer, phase=phase,
                gradients_held=held_gradients, working=working, activations=live_activations, logits=live_logits,
                gpu_bytes=gpu_bytes)


def choose_strategy(shape: ModelShape, *, world_size: int, batch: int, sequence_length: int, bf16: bool,
                    gpu_bytes: int, activation_checkpointing: str = "auto", accumulation: int = 1,
                    lora_parameters: int = 0) -> str:
    """`ddp` when the whole model's state fits every GPU (DDP is faster: no per-block gathers), else `fsdp`."""
    ddp = plan(shape, strategy="ddp", world_size=world_size, batch=batch, sequence_length=sequence_length,
               activation_checkpointing=activation_checkpointing == "true", bf16=bf16, accumulation=accumulation,
               gpu_bytes=gpu_bytes, lora_parameters=lora_parameters)
    return strategy_for(ddp, world_size)


def checkpointing_on(setting: str, strategy: str) -> bool:
    """What `activation_checkpointing` (true, false, auto) means for `strategy`: auto is on with FSDP."""
    return setting == "true" or (setting == "auto" and strategy == "fsdp")


def strategy_for(ddp: Plan, world_size: int) -> str:
    """The choice `choose_strategy` makes, from its DDP plan (for a caller that reports that plan too)."""
    return "ddp" if ddp.fits or world_size == 1 else "fsdp"


class DoesNotFit(ValueError):
    """A configuration whose plan exceeds the GPU; the message is one line that names settings which fit."""


def fit_error(shape: ModelShape, *, strategy: str, world_size: int, gpus_per_instance: int, batch: int,
              sequence_length: int, activation_checkpointing: str, bf16: bool, accumulation: int,
              gpu_bytes: int, lora_parameters: int = 0) -> str | None:
    """None when the plan fits `gpu_bytes`; else one line: what it needs, and each single change of batch,
    sequence length, strategy, activation checkpointing or instance count that would fit (the first fitting
    value of each), or that none does."""
    def plan_for(strategy: str = strategy, world_size: int = world_size, batch: int = batch,
                 sequence_length: int = sequence_length, checkpointing: str = activation_checkpointing) -> Plan:
        return plan(shape, strategy=strategy, world_size=world_size, batch=batch, sequence_length=sequence_length,
                    activation_checkpointing=checkpointing_on(checkpointing, strategy), bf16=bf16,
                    accumulation=accumulation, gpu_bytes=gpu_bytes, lora_parameters=lora_parameters)

    def first_fitting(value: int, floor: int, make) -> tuple[int, Plan] | None:
        """The first of value/2, value/4, ... down to `floor` whose plan fits."""
        smaller = value // 2
        while smaller >= floor:
            candidate = make(smaller)
            if candidate.fits:
                return smaller, candidate
            smaller //= 2
        return None

    current = plan_for()
    if current.fits:
        return None
    options: list[tuple[str, Plan]] = []
    if strategy == "ddp" and world_size > 1:
        options.append(("strategy=fsdp", plan_for(strategy="fsdp")))
    if not checkpointing_on(activation_checkpointing, strategy):
        options.append(("activation_checkpointing=true", plan_for(checkpointing="true")))
    for knob, found in (("per_device_batch_size", first_fitting(batch, 1, lambda v: plan_for(batch=v))),
                        ("sequence_length", first_fitting(sequence_length, 256,
                                                          lambda v: plan_for(sequence_length=v)))):
        if found:
            options.append((f"{knob}={found[0]}", found[1]))
    instances = world_size // max(1, gpus_per_instance)
    for factor in (2, 4, 8):
        candidate = plan_for(strategy="fsdp", world_size=world_size * factor)
        if candidate.fits:
            change = f"instance_count={instances * factor}" + (" with strategy=fsdp" if strategy != "fsdp" else "")
            options.append((change, candidate))
            break
    fitting = [f"{change} ({option.total / GIB:.1f} GiB)" for change, option in options if option.fits]
    for factor in (1, 2, 4, 8) if not fitting else ():  # two changes: a smaller batch on as many instances
        found = first_fitting(batch, 1, lambda v, f=factor: plan_for(strategy="fsdp", world_size=world_size * f,
                                                                      batch=v))
        if found:
            fitting.append(f"per_device_batch_size={found[0]} with instance_count={instances * factor}"
                           + (" and strategy=fsdp" if strategy != "fsdp" else "") + f" ({found[1].total / GIB:.1f} GiB)")
            break
    return (f"needs {current.total / GIB:.1f} GiB per GPU at the {current.phase} (strategy {strategy}, batch {batch} "
            f"x {sequence_length} tokens, {world_size} GPUs) of {gpu_bytes / GIB:.1f} GiB, {USABLE_FRACTION:.0%} "
            "usable; " + ("settings that fit: " + ", ".join(fitting) if fitting else
                          "no change of batch, sequence length, strategy or instance count fits: a GPU with more "
                          "memory is needed"))
