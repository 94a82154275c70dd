"""The memory planner against what the trainer really holds: per-rank peak memory measured on CPU during
training, for a few shapes, strategies and accumulation counts, next to `trainer/memory.py`'s figure for the
same run.

Each case runs the trainer (trainer/train.py under torchrun, gloo, fp32 on CPU) on a randomly initialised
Llama-shaped model built here (nothing is downloaded) and reads what every rank prints: its resident memory
before the model was built and its peak resident memory during the training steps. Measured = peak - before
(what the run added above an idle process with torch imported). With glibc's mmap threshold lowered, freed
tensors leave the resident set as they would leave a GPU caching allocator's "allocated" bytes, so the peak
follows live tensors (mallopt(3) M_MMAP_THRESHOLD / M_TRIM_THRESHOLD). GPU-only terms (bf16 copies, the
CUDA context, NCCL buffers, allocator fragmentation) are not measured here: the planner's fp32 path is.

    .venv/bin/python benchmarks/planner.py [--case NAME ...] [--tolerance 0.15]

Also prints each run's checkpoint bytes per parameter (the sizing model's restart time uses 12: fp32 weights
and AdamW's two moments). Exits non-zero when any case is off by more than the tolerance;
tests/test_memory_planner.py runs the small cases.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "trainer"))

import memory  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    strategy: str
    processes: int
    accumulation: int
    batch: int
    sequence_length: int
    activation_checkpointing: bool
    hidden: int = 512
    intermediate: int = 1408
    layers: int = 2
    vocab: int = 32000
    heads: int = 8
    kv_heads: int = 4
    lora_rank: int = 0  # LoRA on all-linear at this rank (the frozen base, the adapters trained); 0: full

    @property
    def shape(self) -> memory.ModelShape:
        return memory.ModelShape(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
                                 layers=self.layers, heads=self.heads, kv_heads=self.kv_heads, tied_embeddings=False)

    def plan(self, copies: tuple[float, float]) -> memory.Plan:
        """The planner's figure for this run as it runs here: fp32, gloo's copies, AdamW one tensor at a time."""
        return memory.plan(self.shape, strategy=self.strategy, world_size=self.processes, batch=self.batch,
                           sequence_length=self.sequence_length, activation_checkpointing=self.activation_checkpointing,
                           bf16=False, accumulation=self.accumulation, gather_copies=copies[0],
                           reduce_copies=copies[1], foreach_optimizer=False, lora_parameters=self.lora_parameters)

    @property
    def lora_parameters(self) -> int:
        return self.shape.lora_parameters(self.lora_rank) if self.lora_rank else 0

    @property
    def trained_parameters(self) -> int:
        return self.lora_parameters or self.shape.parameters


# Small enough for the suite (2 cores, under 20 s each), big enough that the model's bytes dominate what a
# process adds while it trains (39 M parameters: 0.6 GB of fp32 state under DDP; at 20 M a fixed ~70 MiB per
# process that the planner does not count is 20% of the total).
CASES = {c.name: c for c in [
    Case("ddp-1-acc1", "ddp", 1, 1, 2, 128, False),
    Case("fsdp-2-acc2-ac", "fsdp", 2, 2, 2, 128, True),
    Case("fsdp-2-acc1-long", "fsdp", 2, 1, 1, 512, False),
    Case("fsdp-4-wide-acc4", "fsdp", 4, 4, 1, 256, True, hidden=1024, intermediate=2816, layers=8),
    Case("ddp-1-lora16", "ddp", 1, 1, 2, 128, False, lora_rank=16),
    Case("fsdp-2-acc2-ac-lora16", "fsdp", 2, 2, 2, 128, True, lora_rank=16),
]}
SUITE = ("ddp-1-acc1", "fsdp-2-acc2-ac", "fsdp-2-acc1-long")


def write_model(folder: Path, case: Case) -> None:
    from transformers import LlamaConfig

    from spot_training.local.tiny import corpus, make_model_dir

    make_model_dir(folder, text_corpus=corpus(200))  # the tokenizer; its GPT-2 config is replaced here
    LlamaConfig(vocab_size=case.vocab, hidden_size=case.hidden, intermediate_size=case.intermediate,
                num_hidden_layers=case.layers, num_attention_heads=case.heads, num_key_value_heads=case.kv_heads,
                max_position_embeddings=max(1024, case.sequence_length), tie_word_embeddings=False,
                attention_dropout=0.0).save_pretrained(folder)


@dataclasses.dataclass(frozen=True)
class Measured:
    case: Case
    per_rank: dict[int, int]   # rank -> peak RSS during training above RSS before the model was built
    planned: memory.Plan
    checkpoint_bytes: int      # the run's last checkpoint folder, every rank's files and the marker

    @property
    def checkpoint_bytes_per_parameter(self) -> float:
        """Per trained parameter: every one with full training, the adapters' with LoRA."""
        return self.checkpoint_bytes / self.case.trained_parameters

    @property
    def worst(self) -> int:
        return max(self.per_rank.values())

    @property
    def error(self) -> float:
        return self.planned.total / self.worst - 1


PROBE_BYTES = 64 * 2**20


def probe_collectives() -> None:
    """Run under torchrun (2 processes): how many extra copies of its tensor gloo allocates during an
    all-gather and a reduce-scatter of 64 MiB, from the peak resident memory (a sampling thread)."""
    import threading
    import time

    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    page = os.sysconf("SC_PAGE_SIZE")

    def resident() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * page

    peak = [0]

    def sample() -> None:
        while True:
            peak[0] = max(peak[0], resident())
            time.sleep(0.0002)

    threading.Thread(target=sample, daemon=True).start()
    n = PROBE_BYTES // 4
    results = []
    for run in ("gather", "reduce"):
        full, part = torch.ones(n), torch.ones(n // 2)
        time.sleep(0.05)
        before = peak[0] = resident()
        if run == "gather":
            dist.all_gather_into_tensor(full, part)
        else:
            dist.reduce_scatter_tensor(part, full)
        time.sleep(0.05)
        results.append((peak[0] - before) / PROBE_BYTES)
    if dist.get_rank() == 0:
        print(f"[copies] gather={results[0]:.3f} reduce={results[1]:.3f}", flush=True)
    dist.destroy_process_group()


def collective_copies(port: int = 29572) -> tuple[float, float]:
    """(all-gather, reduce-scatter) extra copies of gloo on this machine, measured by `probe_collectives`."""
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={port}", __file__, "--probe-collectives"], capture_output=True, text=True,
                          env={**os.environ, **MALLOC}, timeout=300)
    found = re.search(r"\[copies\] gather=([\d.]+) reduce=([\d.]+)", done.stdout)
    if done.returncode != 0 or not found:
        raise RuntimeError(f"the collective probe failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return float(found[1]), float(found[2])


# glibc returns large freed blocks at once (mallopt(3)), so resident memory follows the live tensors.
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def measure(case: Case, work: Path, copies: tuple[float, float], port: int = 29571) -> Measured:
    from spot_training.local.tiny import make_text_channel

    model_dir = work / "model"
    write_model(model_dir, case)
    make_text_channel(work / "train", [" ".join(["spot capacity returns checkpoint shard"] * 80)] * 200)
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={case.processes}",
               f"--master_port={port}", str(ROOT / "trainer" / "train.py"), "--model_dir", str(model_dir),
               "--train_dir", str(work / "train"), "--output_model_dir", str(work / "out" / "model"),
               "--output_data_dir", str(work / "out" / "data"), "--checkpoint_dir", str(work / "out" / "ckpt"),
               "--strategy", case.strategy, "--max_steps", "2", "--per_device_batch_size", str(case.batch),
               "--gradient_accumulation_steps", str(case.accumulation), "--sequence_length",
               str(case.sequence_length), "--activation_checkpointing", str(case.activation_checkpointing).lower(),
               "--mixed_precision", "no", "--warmup_ratio", "0", "--checkpoint_interval_minutes", "0",
               "--validation_holdout_fraction", "0", "--async_checkpoint", "false",
               *(["--method", "lora", "--lora_rank", str(case.lora_rank), "--lora_alpha", str(2 * case.lora_rank),
                  "--lora_dropout", "0"] if case.lora_rank else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **MALLOC}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1200)
    if done.returncode != 0:
        raise RuntimeError(f"case {case.name}: the trainer failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    before = {int(m[1]): int(m[2]) for m in re.finditer(r"\[startup\] rank=(\d+) \S+ rss_before_bytes=(\d+)",
                                                        done.stdout)}
    peak = {int(m[1]): int(m[2]) for m in re.finditer(r"\[memory\] rank=(\d+) training_peak_rss_bytes=(\d+)",
                                                      done.stdout)}
    if sorted(before) != list(range(case.processes)) or sorted(peak) != list(range(case.processes)):
        raise RuntimeError(f"case {case.name}: not every rank reported its memory:\n{done.stdout[-3000:]}")
    newest = max((work / "out" / "ckpt").glob("step-*"), key=lambda path: int(path.name.split("-")[1]))
    size = sum(path.stat().st_size for path in newest.rglob("*") if path.is_file())
    return Measured(case, {rank: peak[rank] - before[rank] for rank in peak}, case.plan(copies), size)


def report(result: Measured) -> str:
    c, p, mib = result.case, result.planned, 2**20
    return (f"{c.name:<18} {c.strategy} x{c.processes} acc {c.accumulation} batch {c.batch} x {c.sequence_length} "
            f"ac {'on' if c.activation_checkpointing else 'off'} ({c.shape.parameters / 1e6:.0f} M"
            + (f", LoRA r {c.lora_rank}: {c.lora_parameters / 1e6:.1f} M trained" if c.lora_rank else "") + "): measured "
            f"{result.worst / mib:,.0f} MiB (ranks " + ", ".join(f"{v / mib:,.0f}" for _, v in
                                                                sorted(result.per_rank.items())) +
            f"), planned {p.total / mib:,.0f} MiB at the {p.phase} (weights {p.parameters / mib:,.0f}, optimizer "
            f"{p.optimizer / mib:,.0f}, gradients {p.gradients_held / mib:,.0f}, working {p.working / mib:,.0f}, "
            f"activations {p.activations / mib:,.0f}, logits {p.logits / mib:,.0f}): {result.error:+.1%}; "
            f"checkpoint {result.checkpoint_bytes / 1e6:,.1f} MB = {result.checkpoint_bytes_per_parameter:.3f} "
            "bytes per trained parameter")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="run only these (default: all)")
    parser.add_argument("--tolerance", type=float, default=0.15)
    parser.add_argument("--probe-collectives", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe_collectives:
        probe_collectives()
        return 0
    copies = collective_copies()
    print(f"gloo on this machine: an all-gather allocates {copies[0]:.2f} more copies of its output, a "
          f"reduce-scatter {copies[1]:.2f} of its input (NCCL: none)")
    worst = 0.0
    for name in args.case or list(CASES):
        work = Path(tempfile.mkdtemp(prefix="memory-bench-"))
        try:
            result = measure(CASES[name], work, copies)
        finally:
            shutil.rmtree(work, ignore_errors=True)  # the disk is shared
        print(report(result), flush=True)
        worst = max(worst, abs(result.error))
    print(f"worst planner error {worst:.1%} (tolerance {args.tolerance:.0%})")
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
