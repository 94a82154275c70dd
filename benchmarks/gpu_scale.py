"""One-GPU check of the trainer's start path at real widths: a 1B-shaped (Llama 3.2 1B) and an 8B-shaped
(Llama 3 8B width: hidden 4096, MLP 14336, 32 heads / 8 KV heads, vocabulary 128256) model built the way the
trainer builds it (trainer/modeling.py: meta device, FSDP2 with MixedPrecisionPolicy(bf16, fp32 reduce),
per-block activation checkpointing, seeded per-module init), then bf16 training steps with AdamW.

A full 8B fine-tune holds 16 bytes per parameter (128.5 GB) and does not fit one GPU; the 8B shape keeps the
8B's width with as many layers as the planner (trainer/memory.py) says fit this GPU and as its checkpoint
(12 bytes per parameter) fits half the free disk (the lent H200 has 64 GB: a full-depth checkpoint there
would be 78 GB). Prints per model: tokens/s, MFU, peak GPU memory (torch.cuda.max_memory_allocated) against
the planner's figure and phase, and a DCP save/resume round trip (parameters identical). Every checkpoint
folder is removed, on failure too. About 4 minutes on an H200 with the defaults.

    torchrun --nproc_per_node 1 benchmarks/gpu_scale.py [--seconds 40] [--peak-tflops 989]
    python benchmarks/gpu_scale.py --device cpu --tiny     # the same path on CPU in seconds (no figures)

MFU = (6 + 2 for the activation-checkpointing recompute) * parameters * tokens/s / peak bf16 FLOP/s counts
the work done; the customary 6 * N * tokens/s figure is printed too (H100/H200 SXM dense bf16: 989 TFLOP/s,
NVIDIA datasheet).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))
import memory  # noqa: E402
import modeling  # noqa: E402


def hf_config(shape: memory.ModelShape, sequence: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
                       intermediate_size=shape.intermediate_size, num_hidden_layers=shape.layers,
                       num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                       tie_word_embeddings=shape.tied_embeddings, max_position_embeddings=sequence, use_cache=False)


def layers_that_fit(shape: memory.ModelShape, gpu_bytes: int, batch: int, sequence: int, disk_bytes: int) -> int:
    """The most layers whose plan fits the GPU and whose checkpoint fits half of `disk_bytes`."""
    for layers in range(shape.layers, 0, -1):
        candidate = dataclasses.replace(shape, layers=layers)
        fits_disk = 12 * candidate.parameters <= disk_bytes // 2
        if fits_disk and memory.plan(candidate, strategy="fsdp", world_size=1, batch=batch, sequence_length=sequence,
                                     activation_checkpointing=True, gpu_bytes=gpu_bytes).fits:
            return layers
    return 1


def run(name: str, shape: memory.ModelShape, args: argparse.Namespace, device: torch.device) -> None:
    bf16 = device.type == "cuda"
    config = hf_config(shape, args.sequence)
    with modeling.no_init_warnings():
        model = modeling.empty_model(config)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = modeling.shard(model, bf16=bf16)
    modeling.materialize(model, device)
    modeling.init_random(model, seed=0)
    parameters = modeling.parameter_count(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batch = torch.randint(0, config.vocab_size, (args.batch, args.sequence + 1), device=device)
    estimate = memory.plan(shape, strategy="fsdp", world_size=1, batch=args.batch, sequence_length=args.sequence,
                           activation_checkpointing=True, bf16=bf16, foreach_optimizer=bf16)

    def step() -> float:
        logits = model(input_ids=batch[:, :-1]).logits
        loss = modeling.next_token_loss(logits, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(2):
        step()
    if bf16:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    steps, started = 0, time.perf_counter()
    while steps < 2 or time.perf_counter() - started < args.seconds:
        loss = step()
        steps += 1
    if bf16:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    tokens_per_second = steps * args.batch * args.sequence / elapsed
    peak = torch.cuda.max_memory_allocated() if bf16 else 0
    print(f"{name}: {parameters / 1e9:.2f}B parameters ({shape.layers} layers), batch {args.batch} x {args.sequence}, "
          f"{steps} steps in {elapsed:.1f} s, loss {loss:.3f}: {tokens_per_second:,.0f} tokens/s")
    if bf16:
        mfu = 8 * parameters * tokens_per_second / (args.peak_tflops * 1e12)
        print(f"  MFU {mfu:.1%} counting the recompute (6N: {mfu * 6 / 8:.1%}) of {args.peak_tflops:.0f} TFLOP/s; "
              f"peak GPU memory {peak / 2**30:.1f} GiB vs planner {estimate.total / 2**30:.1f} GiB at the "
              f"{estimate.phase} (planner {(estimate.total - peak) / peak:+.1%} of measured)")
    folder = tempfile.mkdtemp(prefix="gpu-scale-", dir=args.scratch)
    try:
        round_trip(model, optimizer, folder)
    finally:  # the disk is shared: never leave a checkpoint behind
        shutil.rmtree(folder, ignore_errors=True)


def round_trip(model, optimizer, folder: str) -> None:
    model_state, optim_state = get_state_dict(model, optimizer)
    started = time.perf_counter()
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=folder)
    saved = time.perf_counter() - started
    reference = {k: v.full_tensor().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    started = time.perf_counter()
    dcp.load(state, checkpoint_id=folder)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    loaded = time.perf_counter() - started
    exact = all(torch.equal(reference[k], v.full_tensor()) for k, v in model.state_dict().items())
    size = sum(f.stat().st_size for f in Path(folder).iterdir()) / 2**30
    print(f"  save/resume: {size:.1f} GiB saved in {saved:.1f} s, loaded in {loaded:.1f} s, parameters "
          f"identical: {exact}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--sequence", type=int, default=2048)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny widths (a CPU dry run of the same code)")
    parser.add_argument("--scratch", default=tempfile.gettempdir(), help="where the checkpoints go (removed)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device; this check needs one GPU (or --device cpu --tiny)", file=sys.stderr)
        return 2
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29573")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if args.tiny:
        shapes = {"1B-shaped (tiny)": memory.ModelShape(vocab_size=512, hidden_size=64, intermediate_size=128,
                                                        layers=2, heads=4, kv_heads=2, tied_embeddings=True)}
        args.sequence, args.seconds = 32, 0.0
    else:
        gpu = torch.cuda.get_device_properties(0).total_memory
        print(f"device {torch.cuda.get_device_name()}, {gpu / 2**30:.0f} GiB, torch {torch.__version__}")
        eight = memory.LLAMA3["8B"]
        free = shutil.disk_usage(args.scratch).free
        layers = layers_that_fit(eight, gpu, args.batch, args.sequence, free)
        print(f"8B-shaped: {layers} of 32 layers (GPU memory and {free / 1e9:.0f} GB free in {args.scratch})")
        shapes = {"1B": memory.LLAMA3["1B"], "8B-shaped": dataclasses.replace(eight, layers=layers)}
    for name, shape in shapes.items():
        run(name, shape, args, device)  # its model and optimizer are freed when it returns
        if device.type == "cuda":
            torch.cuda.empty_cache()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
