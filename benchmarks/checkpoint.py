"""Checkpoint cost of the trainer on CPU, for a model of about 100M parameters, as ratios measured in one run.

    .venv/bin/python benchmarks/checkpoint.py [--steps 4] [--folder /tmp/ckpt-bench]

Prints:
- training time blocked per checkpoint, synchronous vs asynchronous save (target: async < 10% of sync);
- synchronous save throughput vs this disk's raw sequential write of the same bytes, fsync'd (target >= 50%);
- restore time (verify + load) vs a raw read of the same files;
- a training step's overhead vs a bare PyTorch loop on the same model and batch (target < 3%).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "trainer"))
os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import GPT2Config  # noqa: E402

from checkpointing import CachedStagingWriter, Checkpointer, DefaultStager  # noqa: E402
from environment import Topology, ensure_rendezvous_defaults  # noqa: E402
import modeling  # noqa: E402
from loop import Trainer  # noqa: E402
from settings import TrainSettings  # noqa: E402

SEQUENCE, BATCH = 128, 2


def make_inputs(folder: Path) -> tuple[Path, Path]:
    model_dir, train_dir = folder / "model", folder / "train"
    model_dir.mkdir(parents=True)
    train_dir.mkdir(parents=True)
    # ~98M parameters: GPT-2 small's shape with a 16k vocabulary.
    GPT2Config(vocab_size=16384, n_positions=SEQUENCE, n_embd=768, n_layer=12, n_head=12).save_pretrained(model_dir)
    np.save(train_dir / "tokens.npy", np.random.default_rng(0).integers(0, 16384, 200_000, dtype=np.int32))
    return model_dir, train_dir


def files_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def raw_write_seconds(total: int, folder: Path) -> float:
    chunk = os.urandom(16 << 20)
    target = folder / "raw.bin"
    started = time.perf_counter()
    with target.open("wb") as out:
        written = 0
        while written < total:
            out.write(chunk[: min(len(chunk), total - written)])
            written += min(len(chunk), total - written)
        out.flush()
        os.fsync(out.fileno())
    seconds = time.perf_counter() - started
    target.unlink()
    return seconds


def raw_read_seconds(path: Path) -> float:
    started = time.perf_counter()
    for file in path.iterdir():
        with file.open("rb") as handle:
            while handle.read(16 << 20):
                pass
    return time.perf_counter() - started


def bare_step_seconds(trainer: Trainer, steps: int) -> float:
    """The same model, batch and optimizer settings, with no trainer around them."""
    model = trainer.raw_model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = trainer.data.batch(0, BATCH)
    samples = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        for _ in range(trainer.settings.gradient_accumulation_steps):
            logits = model(input_ids=batch[:, :-1]).logits
            loss = modeling.next_token_loss(logits, batch)
            (loss / trainer.settings.gradient_accumulation_steps).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples[1:])


def trainer_step_seconds(trainer: Trainer, steps: int) -> float:
    samples = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        trainer._run_step()
        trainer.checkpointer.poll(trainer.step, trainer._state, stop_requested=False)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per loop")
    parser.add_argument("--folder", default=None, help="scratch folder on the disk to measure (default: a temp dir)")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    scratch = Path(args.folder or tempfile.mkdtemp(prefix="ckpt-bench-"))
    shutil.rmtree(scratch, ignore_errors=True)
    model_dir, train_dir = make_inputs(scratch / "inputs")
    ensure_rendezvous_defaults()
    settings = TrainSettings(train_dir=str(train_dir), model_dir=str(model_dir), output_model_dir=str(scratch / "out"),
                             output_data_dir=str(scratch / "out"), checkpoint_dir=str(scratch / "ckpt"),
                             per_device_batch_size=BATCH, gradient_accumulation_steps=1, sequence_length=SEQUENCE,
                             max_steps=1000, checkpoint_interval_minutes=0, async_checkpoint=False)
    trainer = Trainer(settings, Topology.from_environment())
    parameters = sum(p.numel() for p in trainer.raw_model.parameters())
    print(f"model: {parameters / 1e6:.1f}M parameters, CPU threads {torch.get_num_threads()}, scratch {scratch}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__} (the image's: requirements-image.txt); "
          f"async staging: {'background (DefaultStager)' if DefaultStager else 'before async_save returns (torch < 2.9)'}")

    trainer._run_step()  # creates the optimizer state, so checkpoints hold it
    step_trainer = trainer_step_seconds(trainer, args.steps)
    step_bare = bare_step_seconds(trainer, args.steps)

    topology, device = trainer.topology, trainer.device
    sync = Checkpointer(str(scratch / "sync"), topology, keep=2, interval_minutes=0, every_steps=0,
                        async_save=False, device=device)
    sync.save(trainer.step, trainer._state)
    sync_blocked = sync.last_blocked_seconds
    saved = scratch / "sync" / f"step-{trainer.step}"
    total = files_bytes(saved)

    def async_saves(folder: str, *, fresh_writer: bool) -> list[float]:
        """Blocked seconds of three async saves in a row. fresh_writer: a new writer per save, so every save
        stages into newly allocated memory (torch 2.8's default, what the trainer did before)."""
        checkpointer = Checkpointer(str(scratch / folder), topology, keep=2, interval_minutes=0, every_steps=0,
                                    async_save=True, device=device)
        blocked = []
        for _ in range(3):
            if fresh_writer and checkpointer.cached_writer is not None:
                checkpointer.cached_writer = CachedStagingWriter(checkpointer.folder, pin_memory=False)
            checkpointer.save(trainer.step, trainer._state)
            checkpointer.wait_for_staging()  # what the trainer does before its next optimizer step
            checkpointer.wait()
            blocked.append(checkpointer.last_blocked_seconds)
            trainer.step += 1
        return blocked

    fresh_each = async_saves("async-fresh", fresh_writer=True)
    async_blocked_each = async_saves("async", fresh_writer=False)
    async_blocked = statistics.median(async_blocked_each[1:])

    raw_write = raw_write_seconds(total, scratch)
    started = time.perf_counter()
    manifest = sync.load_latest(trainer._state_for, trainer._apply)
    restore = time.perf_counter() - started
    assert manifest is not None
    raw_read = raw_read_seconds(saved)
    trainer.close()

    gib = total / 2**30
    print(f"checkpoint size: {gib:.2f} GiB (model + AdamW state + RNG)")
    print(f"blocked per checkpoint: sync {sync_blocked:.2f} s, async {async_blocked:.2f} s "
          f"(first async save {async_blocked_each[0]:.2f} s) -> async/sync = {async_blocked / sync_blocked:.1%} "
          "(target < 10%)")
    print("async blocked seconds per save, staging cached (the trainer): "
          + ", ".join(f"{x:.2f}" for x in async_blocked_each) + "; a fresh writer per save (torch 2.8 default): "
          + ", ".join(f"{x:.2f}" for x in fresh_each))
    print(f"sync save throughput: {gib / sync_blocked:.2f} GiB/s vs raw fsync'd write {gib / raw_write:.2f} GiB/s "
          f"-> {raw_write / sync_blocked:.1%} of raw (target >= 50%)")
    print(f"restore (verify CRC + load): {restore:.2f} s vs raw read {raw_read:.2f} s "
          f"-> {restore / raw_read:.1f}x raw read")
    print(f"training step: trainer {step_trainer:.3f} s vs bare loop {step_bare:.3f} s "
          f"-> overhead {step_trainer / step_bare - 1:+.1%} (target < 3%)")
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
