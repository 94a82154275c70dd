"""Instruction tuning on CPU: the packing efficiency of chat data, and full fine-tuning against LoRA on the same
model (checkpoint bytes, training time blocked per save, adapter parameters).

    .venv/bin/python benchmarks/instructions.py [--examples 4000] [--rank 16] [--folder /tmp/instructions-bench]

Prints:
- per sequence length: examples, blocks, trained tokens per sequence token (the packing efficiency), examples cut;
- for a ~98M-parameter GPT-2 shape (random weights, one rank): the parameters each method trains, one synchronous
  checkpoint's bytes and the training time it blocks, full against LoRA, and the formula's bytes (12 per trained
  parameter) beside the measured ones.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "trainer"))
os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import GPT2Config  # noqa: E402

import prepare  # noqa: E402
from checkpointing import Checkpointer  # noqa: E402
from environment import Topology, ensure_rendezvous_defaults  # noqa: E402
from loop import Trainer  # noqa: E402
from settings import TrainSettings  # noqa: E402

from spot_training.local.tiny import WORDS, corpus, make_jsonl_channel, make_model_dir  # noqa: E402


def chats(count: int, seed: int = 5) -> list[dict]:
    """Conversations of one to three exchanges, questions of 5 to 60 words, answers of 2 to 120: the spread of
    lengths packing has to fit."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        messages = [{"role": "system", "content": "answer briefly"}]
        for _ in range(rng.randint(1, 3)):
            messages.append({"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60)))})
            messages.append({"role": "assistant",
                             "content": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 120)))})
        out.append({"messages": messages})
    return out


def packing(scratch: Path, examples: int) -> None:
    model = make_model_dir(scratch / "chat-model", text_corpus=corpus(300), chat=True)
    train = make_jsonl_channel(scratch / "chats", chats(examples))
    print(f"packing {examples} conversations (1 to 3 exchanges), tiny BPE tokenizer with a chat template:")
    for length in (512, 1024, 2048):
        out = scratch / f"packed-{length}"
        result = prepare.prepare(model, {"train": train}, out, None, tokens_per_shard=1 << 20, sequence_length=length,
                                 contract=prepare.Contract(max_truncated_fraction=1.0))
        (stats,) = result["contract"]["train"]
        manifest = prepare.read_manifest(out / "train")
        print(f"  sequence length {length}: {manifest['blocks']} blocks, packing efficiency "
              f"{result['packing_efficiency']['train']:.1%} trained tokens per sequence token, "
              f"{manifest['tokens'] and stats['tokens'] / manifest['tokens']:.1%} of the sequence tokens are examples' "
              f"(the rest padding), {stats['truncated_examples']} examples cut")


def checkpoints(scratch: Path, rank: int) -> None:
    model_dir, train_dir = scratch / "model", scratch / "train"
    model_dir.mkdir(parents=True)
    train_dir.mkdir(parents=True)
    GPT2Config(vocab_size=16384, n_positions=128, n_embd=768, n_layer=12, n_head=12).save_pretrained(model_dir)
    np.save(train_dir / "tokens.npy", np.random.default_rng(0).integers(0, 16384, 200_000, dtype=np.int32))
    ensure_rendezvous_defaults()
    rows = []
    for method in ("full", "lora"):
        settings = TrainSettings(train_dir=str(train_dir), model_dir=str(model_dir), output_model_dir=str(scratch / "out"),
                                 output_data_dir=str(scratch / "out"), checkpoint_dir=str(scratch / f"ckpt-{method}"),
                                 per_device_batch_size=2, gradient_accumulation_steps=1, sequence_length=128,
                                 max_steps=1000, checkpoint_interval_minutes=0, async_checkpoint=False, method=method,
                                 lora_rank=rank, lora_alpha=2.0 * rank)
        trainer = Trainer(settings, Topology.from_environment())
        trained = sum(p.numel() for p in trainer.raw_model.parameters() if p.requires_grad)
        total = sum(p.numel() for n, p in trainer.raw_model.named_parameters() if ".lora_" not in n)
        trainer._run_step()  # the optimizer state exists from here on, so the checkpoint holds it
        saver = Checkpointer(str(scratch / f"sync-{method}"), trainer.topology, keep=2, interval_minutes=0,
                             every_steps=0, async_save=False, device=trainer.device)
        blocked = []
        for _ in range(3):
            saver.save(trainer.step, trainer._state)
            blocked.append(saver.last_blocked_seconds)
            trainer.step += 1
        folder = scratch / f"sync-{method}" / f"step-{trainer.step - 1}"
        size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
        rows.append((method, total, trained, size, sorted(blocked)[1]))
        trainer.close()
    print(f"full fine-tuning vs LoRA rank {rank} on all-linear, {rows[0][1] / 1e6:.1f}M-parameter GPT-2 shape, one rank:")
    for method, total, trained, size, blocked in rows:
        print(f"  {method:<4}: {trained:>11,} trained parameters ({trained / total:.2%}), checkpoint {size / 2**20:8.1f} MiB "
              f"(formula 12 x trained: {12 * trained / 2**20:8.1f} MiB), blocked {blocked:.3f} s per synchronous save")
    print(f"  LoRA / full: checkpoint bytes {rows[1][3] / rows[0][3]:.2%}, blocked seconds {rows[1][4] / rows[0][4]:.2%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=4000)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--folder", default=None, help="scratch folder (default: a temp dir, deleted at the end)")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    scratch = Path(args.folder or tempfile.mkdtemp(prefix="instructions-bench-"))
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        packing(scratch, args.examples)
        checkpoints(scratch, args.rank)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
