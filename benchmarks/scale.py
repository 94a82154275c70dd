"""The sharded start at a real size, on CPU: a Llama-shaped model of at least 0.5 B parameters with real
safetensors weights (random, bf16, two files, written here: nothing is downloaded), started by the trainer
(trainer/train.py under torchrun, FSDP, gloo) on 4 processes.

Prints, per rank, the peak resident memory during start-up above what the process held before the model was
built, as a fraction of the full fp32 model (target <= 0.35 with 4 ranks; a whole-model load is >= 1.0), the
start-up time against a raw read of the safetensors files, each rank's peak resident memory during training
(run twice, --accumulation 1 and 4, for what gradient accumulation adds), and the step time.

    .venv/bin/python benchmarks/scale.py [--layers 17] [--processes 4] [--accumulation 1] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "trainer"))


def write_model(folder: Path, layers: int) -> tuple[int, int]:
    """A Llama-shaped config and random bf16 weights in two safetensors files, one tensor at a time per file.
    Returns (parameters, bytes on disk)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from spot_training.local.tiny import corpus, make_model_dir

    make_model_dir(folder, text_corpus=corpus(200))  # a tokenizer (its GPT-2 config is replaced below)
    config = LlamaConfig(vocab_size=32000, hidden_size=1536, intermediate_size=4096, num_hidden_layers=layers,
                         num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048,
                         tie_word_embeddings=False, torch_dtype="bfloat16")
    config.save_pretrained(folder)
    h, i, kv, v = 1536, 4096, 512, 32000
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for n in range(layers):
        prefix = f"model.layers.{n}"
        shapes.update({f"{prefix}.self_attn.q_proj.weight": (h, h), f"{prefix}.self_attn.k_proj.weight": (kv, h),
                       f"{prefix}.self_attn.v_proj.weight": (kv, h), f"{prefix}.self_attn.o_proj.weight": (h, h),
                       f"{prefix}.mlp.gate_proj.weight": (i, h), f"{prefix}.mlp.up_proj.weight": (i, h),
                       f"{prefix}.mlp.down_proj.weight": (h, i), f"{prefix}.input_layernorm.weight": (h,),
                       f"{prefix}.post_attention_layernorm.weight": (h,)})
    names = list(shapes)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    generator = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for index, group in enumerate(halves, 1):
        file = f"model-{index:05d}-of-00002.safetensors"
        tensors = {}
        for name in group:
            shape = shapes[name]
            tensors[name] = (torch.ones(shape) if len(shape) == 1 else
                             torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
            weight_map[name] = file
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        total += sum(t.numel() for t in tensors.values())
        del tensors
    size = sum((folder / f).stat().st_size for f in set(weight_map.values()))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": size},
                                                                     "weight_map": weight_map}))
    return total, size


def raw_read_seconds(folder: Path) -> float:
    started = time.perf_counter()
    for file in sorted(folder.glob("*.safetensors")):
        with file.open("rb") as handle:
            while handle.read(1 << 24):
                pass
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=17, help="decoder layers (17: 0.53 B parameters)")
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--accumulation", type=int, default=1, help="gradient accumulation steps (micro-steps)")
    parser.add_argument("--keep", help="work in this folder and keep it (default: a temporary one)")
    args = parser.parse_args()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="scale-"))
    try:
        return run(args, work)
    finally:
        if not args.keep:  # the disk is shared: a benchmark leaves nothing behind
            shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> int:
    model_dir = work / "model"
    parameters, file_bytes = write_model(model_dir, args.layers)
    from spot_training.local.tiny import make_text_channel

    make_text_channel(work / "train", [" ".join(["spot capacity returns checkpoint shard"] * 60)] * 400)
    full_fp32 = 4 * parameters
    print(f"model: Llama-shaped, {parameters:,} parameters, {file_bytes / 2**30:.2f} GiB of bf16 safetensors "
          f"(2 files); full fp32 model {full_fp32 / 2**30:.2f} GiB")
    raw = raw_read_seconds(model_dir)
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.processes}",
               "--master_port=29561", str(ROOT / "trainer" / "train.py"), "--model_dir", str(model_dir),
               "--train_dir", str(work / "train"), "--output_model_dir", str(work / "out" / "model"),
               "--output_data_dir", str(work / "out" / "data"), "--checkpoint_dir", str(work / "out" / "ckpt"),
               "--strategy", "fsdp", "--max_steps", str(args.steps), "--per_device_batch_size", "1",
               "--gradient_accumulation_steps", str(args.accumulation), "--sequence_length", "128", "--warmup_ratio", "0",
               "--checkpoint_interval_minutes", "0", "--validation_holdout_fraction", "0", "--async_checkpoint",
               "false"]
    # glibc keeps freed blocks below its mmap threshold in the heap, so RSS would hold the high-water mark of
    # every allocation pattern; with large blocks mmap'ed (and trimmed) RSS follows the live tensors (mallopt(3):
    # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, set through their environment variables).
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.processes)),
           "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        print(done.stdout[-3000:] + done.stderr[-3000:], file=sys.stderr)
        return 1
    ranks = {int(m["rank"]): m for m in re.finditer(r"\[startup\] rank=(?P<rank>\d+) seconds=(?P<seconds>[\d.]+) "
                                                     r"rss_before_bytes=(?P<before>\d+) peak_rss_bytes=(?P<peak>\d+)",
                                                     done.stdout)}
    fractions = []
    if len(ranks) != args.processes:
        print(f"error: {len(ranks)} of {args.processes} ranks reported their start-up", file=sys.stderr)
        return 1
    print("start-up per rank (peak RSS during start-up above RSS before the model was built, / full fp32 model):")
    for rank in sorted(ranks):
        r = ranks[rank]
        above = int(r["peak"]) - int(r["before"])
        fractions.append(above / full_fp32)
        print(f"  rank {rank}: {above / 2**30:.2f} GiB = {above / full_fp32:.3f} of the model "
              f"(absolute peak {int(r['peak']) / 2**30:.2f} GiB, {int(r['before']) / 2**30:.2f} GiB before), "
              f"{float(r['seconds']):.1f} s")
    startup = max(float(r["seconds"]) for r in ranks.values())
    print(f"worst rank: {max(fractions):.3f} of the full fp32 model (target <= 0.35 with {args.processes} ranks)")
    print(f"start-up {startup:.1f} s (slowest rank: build, shard, read weights) vs raw read of the safetensors "
          f"files {raw:.1f} s ({file_bytes / 2**30 / max(raw, 1e-9):.2f} GiB/s, page cache warm)")
    training = {int(m["rank"]): int(m["peak"]) for m in re.finditer(
        r"\[memory\] rank=(?P<rank>\d+) training_peak_rss_bytes=(?P<peak>\d+)", done.stdout)}
    print(f"training peak RSS per rank ({args.accumulation} micro-step(s) per step): " + ", ".join(
        f"rank {rank} {peak / 2**30:.2f} GiB = {peak / full_fp32:.3f} of the model"
        for rank, peak in sorted(training.items())))
    metrics = [json.loads(line) for line in (work / "out" / "data" / "metrics.jsonl").read_text().splitlines()]
    tokens = args.processes * 128
    steps = [tokens / m["tokens_per_second"] for m in metrics if "tokens_per_second" in m]
    print(f"step time: median {statistics.median(steps):.1f} s over {len(steps)} steps ({tokens} tokens per step, "
          f"FSDP + activation checkpointing, fp32 on CPU); whole job {wall:.0f} s")
    print(f"exported: {sorted(p.name for p in (work / 'out' / 'model').glob('*.safetensors'))}")
    return 0 if max(fractions) <= 0.35 else 1


if __name__ == "__main__":
    sys.exit(main())
