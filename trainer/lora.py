"""LoRA: low-rank adapters beside frozen base weights, through peft (the image's 0.17.1).

The adapters are injected into the model itself (`peft.inject_adapter_in_model`), not behind a PeftModel, so the
model keeps its class and module tree: FSDP2 shards the same decoder blocks, and the base weights load from the
base model's files under their names (`<module>.base_layer.weight` is `<module>.weight` there). The adapters
are created on the meta device with the rest, then initialised as peft initialises them (A Kaiming-uniform with
a = sqrt(5), B zeros, so the adapted model starts as the base) from the run's seed, one full tensor at a time on
CPU and each rank keeping its shard: the same adapters at every world size.

What changes in training, and so in a checkpoint, is the adapters and their optimizer state (the base is frozen):
checkpoints hold only those (`StateDictOptions(ignore_frozen_params=True)`), and the base weights are read from
the base model at every start. The exports: the adapter in peft's format (`adapter_config.json`,
`adapter_model.safetensors`, which `PeftModel.from_pretrained(base, folder)` loads), and the merged model
(W + alpha / r x B A per adapted module) as Hugging Face safetensors, which Evaluate, the registry and serving use
as any fine-tuned model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

ADAPTER = "default"  # peft's adapter name; its saved files leave it out of the tensor names
ADAPTER_DIR = "adapter"  # the adapter's folder inside the exported model folder


def config(rank: int, alpha: float, dropout: float, target_modules: str):
    from peft import LoraConfig

    targets = "all-linear" if target_modules in ("", "all-linear") else [m.strip() for m in target_modules.split(",")]
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")


def inject(model: torch.nn.Module, lora_config) -> None:
    """Add the adapters to `model` in place (on whatever device it is) and freeze everything else."""
    from peft import inject_adapter_in_model

    from modeling import ModelError

    try:  # low_cpu_mem_usage: the adapters are made on the meta device (peft otherwise builds and initialises
        # them on CPU first: about 830 MB per rank for 70B at r 16), and init_adapters fills them after allocation.
        inject_adapter_in_model(lora_config, model, adapter_name=ADAPTER, low_cpu_mem_usage=True)
    except ValueError as error:  # target modules the model lacks
        raise ModelError(f"lora_target_modules={lora_config.target_modules}: "
                         f"{str(error).splitlines()[0][:200]}") from None
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(is_adapter(name))


def is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def has_adapters(model: torch.nn.Module) -> bool:
    return any(is_adapter(name) for name, _ in model.named_parameters())


def base_name(name: str) -> str:
    """A parameter's name in the base model's files (`x.base_layer.weight` -> `x.weight`)."""
    return name.replace(".base_layer.", ".")


@torch.no_grad()
def init_adapters(model: torch.nn.Module, seed: int, assign: Callable[[torch.Tensor, torch.Tensor], None]) -> None:
    """peft's default initialisation of every adapter, from `seed`, whatever the sharding (`assign` copies a rank's
    part of a full CPU tensor into a parameter)."""
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in model.named_parameters():
        if ".lora_A." in name:
            full = torch.empty(parameter.shape, dtype=parameter.dtype)
            bound = 1 / math.sqrt(full.shape[1])  # kaiming_uniform_(a=sqrt(5)): gain sqrt(2 / 6) x sqrt(3 / fan_in)
            full.uniform_(-bound, bound, generator=generator)
            assign(parameter, full)
        elif ".lora_B." in name:
            assign(parameter, torch.zeros(parameter.shape, dtype=parameter.dtype))


def _layers(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            yield name, module


def merged_items(model: torch.nn.Module, full: Callable[[torch.Tensor], torch.Tensor],
                 exported: list[tuple[str, torch.Tensor]]) -> list[tuple[str, int, Callable[[], torch.Tensor]]]:
    """(name in the base model's files, elements, fetch) of each exported tensor of the merged model: adapters left
    out, each adapted weight fetched as W + alpha / r x B A (transposed for GPT-2's Conv1D, which stores W as
    in x out: peft's fan_in_fan_out). `full` gathers a (sharded) tensor whole."""
    adapted = {f"{name}.base_layer.weight": module for name, module in _layers(model)}
    items = []
    for name, tensor in exported:
        if is_adapter(name):
            continue
        module = adapted.get(name)
        if module is None:
            items.append((base_name(name), tensor.numel(), lambda t=tensor: full(t)))
            continue

        def fetch(t=tensor, m=module) -> torch.Tensor:
            a, b = full(m.lora_A[ADAPTER].weight).float(), full(m.lora_B[ADAPTER].weight).float()
            delta = (b @ a) * m.scaling[ADAPTER]
            if m.fan_in_fan_out:
                delta = delta.T
            weight = full(t)
            return (weight.float() + delta).to(weight.dtype)

        items.append((base_name(name), tensor.numel(), fetch))
    return items


def export_adapter(model: torch.nn.Module, lora_config, out_dir: Path, base_model: str,
                   full: Callable[[torch.Tensor], torch.Tensor], write: bool) -> list[str]:
    """The adapter in peft's format under `out_dir` (every rank calls this: gathers are collective; `write` on one).
    Tensor names as peft saves them: `base_model.model.<module>.lora_A.weight`."""
    from safetensors.torch import save_file

    tensors = {}
    for name, parameter in model.named_parameters():
        if is_adapter(name):
            tensor = full(parameter).detach().to("cpu").contiguous()
            if write:
                tensors["base_model.model." + name.replace(f".{ADAPTER}.", ".")] = tensor
    if not write:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    lora_config.base_model_name_or_path = base_model
    lora_config.save_pretrained(str(out_dir))
    # peft records the modules it found for "all-linear"; a set is not JSON, so it is listed sorted.
    saved = json.loads((out_dir / "adapter_config.json").read_text())
    if isinstance(saved.get("target_modules"), list):
        saved["target_modules"] = sorted(saved["target_modules"])
        (out_dir / "adapter_config.json").write_text(json.dumps(saved, indent=2, sort_keys=True))
    return sorted(tensors)
