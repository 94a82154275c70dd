"""The model of a run, built so that no rank ever holds all of it, and written back the same way.

Start: the model is built on the meta device (parameters without storage; buffers such as rotary tables are
real, `accelerate.init_empty_weights(include_buffers=False)`), activation checkpointing is switched on, FSDP2
`fully_shard` wraps every decoder block, the embeddings, the final norm with the head, and then the root, and
only then is storage allocated, each rank for its own shards (`to_empty`). The base weights are read from the
`model` channel's safetensors straight into those shards: each rank reads only the rows it owns
(`SlicedSafetensorsReader`). A model folder without
weights is initialised randomly, one module at a time and seeded, so every rank and every world size gets the
same weights. DDP goes the same way with whole tensors. With LoRA (lora.py) the adapters are injected on the meta
device before sharding, the base weights load under their own names and the adapters are initialised from the seed.

End: the fine-tuned model is written as Hugging Face safetensors in files of at most `max_file_bytes`; each
tensor is gathered in turn and kept only by the rank that writes its file (the local ranks of the first
instance, whose /opt/ml/model SageMaker uploads), in a thread while the gathers go on, so the ranks write
their files in parallel and no process holds more than two files of it.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.tensor import DTensor, distribute_tensor

import lora

log = logging.getLogger("trainer.model")

# How many bytes of the exported model one safetensors file holds (Hugging Face's own default shard size for
# save_pretrained is 5 GB: transformers modeling_utils `max_shard_size="5GB"`).
MAX_FILE_BYTES = 5 * 10**9


class ModelError(ValueError):
    """A model folder the trainer cannot start from; the message names the folder and the problem."""


def read_config(model_dir: str):
    from transformers import AutoConfig

    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise ModelError(f"model_dir={model_dir}: no config.json (expected a Hugging Face model folder)")
    return AutoConfig.from_pretrained(folder, local_files_only=True)


def weight_files(model_dir: str) -> list[Path]:
    """The folder's safetensors files; a folder with only PyTorch pickles is refused (they cannot be read in
    slices, and unpickling runs code)."""
    folder = Path(model_dir)
    files = sorted(folder.glob("*.safetensors"))
    if not files and any(folder.glob("pytorch_model*.bin")):
        raise ModelError(f"model_dir={model_dir}: holds pytorch_model*.bin weights only; the trainer reads "
                         "safetensors (convert once with save_pretrained(..., safe_serialization=True))")
    return files


def load_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    folder = Path(model_dir)
    if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return None


def empty_model(config) -> torch.nn.Module:
    """The model with parameters on the meta device (no storage), buffers real, tied weights tied."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()
    return model


def next_token_loss(logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, in fp32, of a model's logits for `batch[:, :-1]` against `batch[:, 1:]`."""
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))


def next_token_loss_sum(logits: torch.Tensor, batch: torch.Tensor,
                        trained: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the fp32 next-token cross-entropy over the trained targets, their count): `batch[:, 1:]` against the
    logits of `batch[:, :-1]`; `trained` None trains every target."""
    losses = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1),
                                               reduction="none")
    if trained is None:
        return losses.sum(), torch.tensor(losses.numel(), device=losses.device)
    mask = trained.reshape(-1).to(losses.device)
    return (losses * mask).sum(), mask.sum()


def packed_attention_mask(positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive [batch, 1, T, T] mask of packed examples: each token attends causally within its own example
    (a new example starts where its position is 0). Hugging Face models take it as a prepared 4D mask with SDPA and
    eager attention alike (checked in tests/trainer/test_instructions.py); a boolean one is misread by eager."""
    example = torch.cumsum(positions == 0, dim=1)
    same = example[:, :, None] == example[:, None, :]
    causal = torch.ones(positions.size(1), positions.size(1), dtype=torch.bool, device=positions.device).tril()
    allowed = same & causal
    return torch.zeros(allowed.shape, dtype=dtype, device=positions.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)[:, None]


def parameter_count(model: torch.nn.Module) -> int:
    """Distinct parameters (tied ones once), from shapes: works on the meta device."""
    return sum(p.numel() for p in unique_parameters(model).values())


def unique_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """name -> parameter, each shared (tied) parameter under its first name."""
    return dict(model.named_parameters(remove_duplicate=True))


def class_name(model: torch.nn.Module) -> str:
    """The Hugging Face class of `model` (FSDP2 makes a subclass named FSDP<class>)."""
    return next(c.__name__ for c in type(model).__mro__ if not c.__name__.startswith("FSDP"))


def decoder_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated decoder layers that FSDP shards one by one (Llama `layers`, GPT-2 `h`, ...)."""
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            return list(module)
    return []


def edge_units(model: torch.nn.Module) -> tuple[list[torch.nn.Module], list[torch.nn.Module]]:
    """The modules outside the decoder blocks that FSDP shards as units of their own (torchtitan's
    `apply_fsdp`): the input embeddings, and the final norm with the output head. Left in the root they would
    stay gathered, with unsharded gradients, through the whole forward and backward (the embeddings and head
    are 1.05 B of Llama 3 8B's 8.03 B parameters). A model whose head is tied to its embeddings (GPT-2, Llama
    3.2 1B/3B) keeps both in the root: one parameter cannot belong to two units, and a unit holding both
    would stay gathered from the first module's forward to the last's anyway. Returns ([], []) then."""
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or embeddings is None or head.weight is embeddings.weight:
        return [], []
    base = model.base_model
    blocks = {id(block) for block in decoder_blocks(model)}
    finals = [child for child in base.children() if child is not embeddings
              and not isinstance(child, (torch.nn.ModuleList, torch.nn.Embedding))
              and not any(id(m) in blocks for m in child.modules()) and any(True for _ in child.parameters())]
    return [embeddings], [*finals, head]


def shard(model: torch.nn.Module, *, bf16: bool) -> torch.nn.Module:
    """FSDP2 per decoder block, the embeddings and the final norm with the head (`edge_units`), then the root.
    With bf16 the shards stay fp32 (the optimizer's master weights) while compute and all-gathers run in bf16
    and gradients are reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    for block in decoder_blocks(model):
        fully_shard(block, mp_policy=policy)
    embeddings, head = edge_units(model)
    if embeddings:
        fully_shard(embeddings, mp_policy=policy)
        # The backward starts at the head: resharding it after the forward would only gather it again at once
        # (torchtitan keeps it gathered too).
        fully_shard(head, mp_policy=policy, reshard_after_forward=False)
    return fully_shard(model, mp_policy=policy)


def materialize(model: torch.nn.Module, device: torch.device) -> None:
    """Allocate the parameters (each rank its shards) on `device` and put back the real buffers."""
    buffers = {name: buffer.detach().clone() for name, buffer in model.named_buffers()}
    model.to_empty(device=device)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])
    model.tie_weights()  # moving a meta parameter makes a new one: tie the copies again (a no-op under FSDP)


@torch.no_grad()
def init_random(model: torch.nn.Module, seed: int) -> None:
    """Hugging Face's own per-module initialisation (`_init_weights`), one module at a time on a full CPU copy of
    its parameters, each rank keeping its shard: the same weights on every rank and every world size, and
    never more than one module in full. Block-level special cases of `_init_weights` (GPT-2's scaled
    `c_proj`) are not applied; a randomly initialised model is for tests and from-scratch runs."""
    torch.manual_seed(seed)
    done: set[int] = set()
    for module in model.modules():
        own = [(name, p) for name, p in module.named_parameters(recurse=False) if id(p) not in done]
        if not own:
            continue
        originals = dict(module._parameters)
        full = {name: torch.nn.Parameter(torch.zeros(p.shape, dtype=p.dtype), requires_grad=False) for name, p in own}
        try:
            module._parameters.update(full)
            model._init_weights(module)
        finally:
            module._parameters.clear()
            module._parameters.update(originals)
        for name, parameter in own:
            _assign(parameter, full[name].data)
            done.add(id(parameter))


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A parameter whole: gathered from every rank under FSDP (collective), as is otherwise."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _assign(parameter: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's part of `full` (the whole tensor, on CPU) into `parameter`."""
    if isinstance(parameter, DTensor):
        mine = distribute_tensor(full, parameter.device_mesh, parameter.placements, src_data_rank=None).to_local()
        parameter.to_local().copy_(mine)
    else:
        parameter.copy_(full)


class SlicedSafetensorsReader(HuggingFaceStorageReader):
    """torch 2.8's HuggingFaceStorageReader (torch/distributed/checkpoint/hf_storage.py) deserializes each whole
    file into memory on every rank ("TODO: make this more efficient by doing offset reads"). This reads each
    request's slice through safetensors' memory map (`safe_open(...).get_slice`), so a rank touches only the
    rows of the shards it owns."""

    def read_data(self, plan, planner):
        from safetensors import safe_open
        from torch.futures import Future

        # One memory map per request: pages of a map count in the process's resident memory until it is
        # unmapped, so a map held over a whole file would add every slice read from it.
        for request in plan.items:
            file_name = self.storage_data[request.storage_index].relative_path
            with safe_open(file_name, framework="pt", device="cpu") as handle:
                index = tuple(slice(o, o + n) for o, n in zip(request.storage_offsets, request.lengths))
                source = handle.get_slice(request.dest_index.fqn)[index]
            target = planner.resolve_tensor(request).detach()
            target.copy_(source)
            planner.commit_tensor(request, target)
        done: Future = Future()
        done.set_result(None)
        return done


def load_weights(model: torch.nn.Module, model_dir: str, group: dist.ProcessGroup | None) -> None:
    """Read the base weights into the (sharded or whole) parameters, in place. Every parameter must be in the
    files, a tied one under any of its names; tensors in the files that the model lacks are ignored."""
    reader = SlicedSafetensorsReader(str(model_dir))
    stored = reader.read_metadata().state_dict_metadata
    names: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(lora.base_name(name))  # an adapted layer's weight: its own name
    parameters = {name: p for name, p in unique_parameters(model).items() if not lora.is_adapter(name)}
    found = {name: next((n for n in names[id(p)] if n in stored), None) for name, p in parameters.items()}
    missing = [name for name, stored_as in found.items() if stored_as is None]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ModelError(f"model_dir={model_dir}: the safetensors files lack {missing[0]}{more}; they do not "
                         "match config.json")
    state: dict[str, torch.Tensor] = {}
    for name, parameter in parameters.items():
        stored_as = found[name]
        if tuple(stored[stored_as].size) != tuple(parameter.shape):
            raise ModelError(f"model_dir={model_dir}: {stored_as} has shape {tuple(stored[stored_as].size)} in the "
                             f"files, {tuple(parameter.shape)} in config.json")
        state[stored_as] = parameter
    with torch.no_grad():
        dcp.load(state, storage_reader=reader, planner=DefaultLoadPlanner(allow_partial_load=True),
                 process_group=group)


def export_dtype(config) -> torch.dtype:
    """The exported model keeps the base model's dtype (config `torch_dtype`), fp32 when it names none."""
    named = getattr(config, "torch_dtype", None)
    if isinstance(named, str):
        named = getattr(torch, named, None)
    return named if named in (torch.bfloat16, torch.float16, torch.float32) else torch.float32


def _exported_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """What save_pretrained would write: the state dict without tied duplicates and non-persistent buffers."""
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        yield name, tensor


def plan_files(sizes: list[tuple[str, int]], max_file_bytes: int) -> list[list[str]]:
    """Consecutive tensors into files of at most `max_file_bytes` (one bigger tensor gets a file alone)."""
    files: list[list[str]] = [[]]
    used = 0
    for name, size in sizes:
        if files[-1] and used + size > max_file_bytes:
            files.append([])
            used = 0
        files[-1].append(name)
        used += size
    return files


def file_names(count: int) -> list[str]:
    """Hugging Face's names: `model.safetensors`, or `model-00001-of-0000N.safetensors` with an index."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def export(model: torch.nn.Module, config, out_dir: str, *, rank: int, writers: int,
           max_file_bytes: int = MAX_FILE_BYTES) -> list[str]:
    """Write the model as Hugging Face safetensors files, gathering one tensor at a time. Every rank calls this
    (the gathers are collective); rank r < `writers` writes files r, r + writers, ... Returns the file names."""
    from safetensors.torch import save_file

    dtype = export_dtype(config)
    exported = list(_exported_tensors(model))
    # (name, elements, fetch): with adapters, the merged model under the base model's names (lora.merged_items).
    items = lora.merged_items(model, _full, exported) if lora.has_adapters(model) else [
        (name, t.numel(), lambda t=t: _full(t)) for name, t in exported]
    element = torch.tensor([], dtype=dtype).element_size()
    layout = plan_files([(name, numel * element) for name, numel, _ in items], max_file_bytes)
    names = file_names(len(layout))
    owner = {name: (index, index % writers) for index, group in enumerate(layout) for name in group}
    out = Path(out_dir)
    if rank < writers:
        out.mkdir(parents=True, exist_ok=True)
    pending: dict[str, torch.Tensor] = {}
    # Each writer rank writes its files in a thread of its own while the gathers go on: the ranks' files are
    # written in parallel instead of one rank's write holding every rank at the next gather. A writer holds
    # at most the file being written and the one being gathered (2 x max_file_bytes of host memory).
    with ThreadPoolExecutor(max_workers=1) as pool:
        writes = []
        for name, _, fetch in items:
            full = fetch()
            index, writer = owner[name]
            if writer == rank:
                pending[name] = full.detach().to(device="cpu", dtype=dtype).contiguous()
                if name == layout[index][-1]:
                    if writes:
                        writes[-1].result()  # the previous file is out before a third one is held
                    writes.append(pool.submit(save_file, pending, str(out / names[index]), metadata={"format": "pt"}))
                    pending = {}
            del full
        for write in writes:
            write.result()
    if rank == 0 and len(names) > 1:
        weight_map = {name: names[owner[name][0]] for name, _, _ in items}
        total = sum(numel * element for _, numel, _ in items)
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return names


@contextlib.contextmanager
def no_init_warnings() -> Iterator[None]:
    """transformers logs per-module messages while building from a config; keep the job log readable."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
