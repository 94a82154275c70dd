"""Runs the trainer under torchrun the way SageMaker's torch_distributed launcher does, on CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from spot_training.local.processes import free_port, signal_tree

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ROOT / "trainer" / "train.py"
SLOW_IO = Path(__file__).resolve().parent / "slow_io"

# About 0.1 s per step on a 2-core machine: slow enough for a kill to land between steps 5 and 16.
TINY_RUN = {"max_steps": 16, "warmup_ratio": 0.125, "per_device_batch_size": 4, "gradient_accumulation_steps": 4,
            "sequence_length": 32, "learning_rate": 1e-3, "checkpoint_every_steps": 4,
            "checkpoint_interval_minutes": 0, "keep_checkpoints": 3}


class Run:
    """One job's folders (inputs shared, outputs its own) and the launches made on them."""

    def __init__(self, job: dict[str, Path], root: Path, **overrides) -> None:
        self.job, self.root = job, root
        self.settings = {**TINY_RUN, **overrides}
        self.outputs = {"checkpoint_dir": root / "checkpoints", "output_model_dir": root / "model",
                        "output_data_dir": root / "output"}
        self.logs: list[str] = []

    def command(self, nproc: int, **overrides) -> list[str]:
        args = {**{k: str(v) for k, v in self.job.items()}, **{k: str(v) for k, v in self.outputs.items()},
                **{k: str(v) for k, v in {**self.settings, **overrides}.items()}}
        return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--max-restarts=0", str(TRAIN),
                *[part for k, v in args.items() for part in (f"--{k}", v)]]

    def start(self, nproc: int = 2, env: dict[str, str] | None = None, **overrides) -> subprocess.Popen:
        return subprocess.Popen(self.command(nproc, **overrides), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True, env={**os.environ, **(env or {})})

    def run(self, nproc: int = 2, timeout: float = 240, **overrides) -> str:
        return self.run_with_env({}, nproc, timeout, **overrides)

    def run_with_env(self, env: dict[str, str], nproc: int = 2, timeout: float = 240, **overrides) -> str:
        process = self.start(nproc, env=env, **overrides)
        out, _ = process.communicate(timeout=timeout)
        self.logs.append(out)
        assert process.returncode == 0, out[-4000:]
        return out

    def kill_when(self, process: subprocess.Popen, ready, timeout: float = 240) -> None:
        """SIGKILL the whole job (every rank at once, like a reclaimed instance) once `ready()` holds."""
        deadline = time.monotonic() + timeout
        while not ready():
            assert process.poll() is None, f"job ended before the kill point: {process.communicate()[0][-3000:]}"
            assert time.monotonic() < deadline, "kill point never reached"
            time.sleep(0.005)
        signal_tree(process.pid, signal.SIGKILL)
        out, _ = process.communicate()
        self.logs.append(out)

    def kill_at_step(self, process: subprocess.Popen, step: int) -> None:
        """Kill once the job reached `step` and has a complete checkpoint to come back to."""
        self.kill_when(process, lambda: self.last_step() >= step and self.complete_checkpoints())

    def complete_checkpoints(self) -> list[str]:
        return [name for name in self.checkpoints()
                if (self.outputs["checkpoint_dir"] / name / "COMPLETE.json").exists()]

    def metrics(self) -> list[dict]:
        path = self.outputs["output_data_dir"] / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def last_step(self) -> int:
        steps = [m["step"] for m in self.metrics() if "loss" in m]
        return max(steps, default=0)

    def losses(self) -> dict[int, float]:
        """Per-step training loss, the latest record winning (a resumed run redoes some steps)."""
        return {m["step"]: m["loss"] for m in self.metrics() if "loss" in m}

    def resumed_from(self) -> list[int | None]:
        return [m["resumed_from"] for m in self.metrics() if "loss" in m]

    def parameters(self) -> dict[str, torch.Tensor]:
        return load_file(self.outputs["output_model_dir"] / "model.safetensors")

    def checkpoints(self) -> list[str]:
        folder = self.outputs["checkpoint_dir"]
        return sorted((p.name for p in folder.glob("step-*")), key=lambda n: int(n.split("-")[1]))


def same_parameters(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
