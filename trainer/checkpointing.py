"""Spot-safe checkpoints with torch.distributed.checkpoint (DCP).

Layout: `<checkpoint_dir>/step-<N>/` holds DCP's `.metadata` (written by rank 0) and one
`__<rank>_<i>.distcp` file per rank. Global ranks never repeat across instances, so the folders SageMaker
syncs from every instance into one S3 prefix never overwrite each other.

A checkpoint counts only once `step-<N>/COMPLETE.json` exists. Rank 0 writes it, atomically, after every
rank reported its files written and fsync'd; it lists each file with its size and CRC-32, so a truncated or
corrupted copy (a partial upload, a stale restore: sagemaker-python-sdk#3062) is recognised on load and
skipped in favour of the previous complete one. The newest complete checkpoint is never deleted.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

try:  # torch >= 2.9 stages the state in the background too (DefaultStager, AsyncSaveResponse).
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
    from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse
except ImportError:  # torch 2.8 (the default image): async_save copies the state before it returns
    DefaultStager = StagingOptions = AsyncSaveResponse = None

import log_format
from environment import Topology

MARKER = "COMPLETE.json"
PREFIX = "step-"
# What a checkpoint holds: DCP of `get_state_dict(model, optimizer)` (parameter names as in the Hugging Face
# model, whole or sharded) plus scheduler, progress and per-rank RNG. Markers without the field are layout 1
# (the same content: FSDP2, activation checkpointing and mixed precision leave the names and the fp32
# values unchanged). A newer layout stops the job instead of being skipped: starting over from step 0 would
# throw away the run.
LAYOUT = 1


class CheckpointLayoutError(RuntimeError):
    """A checkpoint this trainer cannot read; the message is one line for the job's failure reason."""
log = logging.getLogger("trainer.checkpoint")


def step_dirs(folder: Path) -> list[tuple[int, Path]]:
    """`step-N` folders, newest first."""
    found = []
    for path in folder.glob(f"{PREFIX}*"):
        suffix = path.name[len(PREFIX):]
        if path.is_dir() and suffix.isdigit():
            found.append((int(suffix), path))
    return sorted(found, reverse=True)


def marked_steps(folder: Path) -> list[int]:
    """Steps whose folder holds a completion marker (intact or not: `examine` decides that), oldest first."""
    return sorted(step for step, path in step_dirs(folder) if (path / MARKER).is_file())


def crc32_of(path: Path) -> int:
    crc = 0
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def examine(path: Path, *, verify_files: Callable[[dict[str, Any]], str | None]
            ) -> tuple[dict[str, Any] | None, str | None]:
    """(manifest, None) when `path` is complete and intact, else (manifest or None, why not)."""
    marker = path / MARKER
    if not marker.is_file():
        return None, "no completion marker (interrupted while saving)"
    try:
        manifest = json.loads(marker.read_text())
        manifest["files"], manifest["step"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        return None, f"unreadable completion marker ({error})"
    layout = manifest.get("layout", 1)
    if layout != LAYOUT:
        raise CheckpointLayoutError(f"{path}: checkpoint layout {layout}, this trainer reads layout {LAYOUT}; resume "
                                    "with the trainer version that wrote it, or start a new run (new checkpoint "
                                    "prefix)")
    return manifest, verify_files(manifest)


def keep_after_pruning(steps_complete: list[int], steps_present: list[int], keep: int) -> set[int]:
    """Which step folders survive: the newest `keep` complete ones, and anything newer than the newest
    complete one (it may be a save in progress)."""
    newest_complete = sorted(steps_complete, reverse=True)[:keep]
    if not newest_complete:
        return set(steps_present)
    return set(newest_complete) | {s for s in steps_present if s > newest_complete[0]}


@dataclasses.dataclass
class _PendingSave:
    step: int
    path: Path
    future: Any = None
    staging: Any = None
    local_files: dict[str, list[int]] | None = None
    started: float = 0.0
    blocked_seconds: float = 0.0
    error: BaseException | None = None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)


class CachedStagingWriter(dcp.FileSystemWriter):
    """torch 2.8's async_save stages synchronously through the writer's `stage` (BlockingAsyncStager): with
    a fresh writer per save and `cache_staged_state_dict=False` (the default) every save allocates new pageable
    host memory for the whole state and copies into it. This writer is made once and reused: the staged copy
    is allocated on the first save (pinned on GPU, so each later save is one device-to-host copy into it) and
    kept. torch's own cache pins unconditionally, which fails without CUDA; here pinning follows the device.
    The cache is rebuilt when the state's keys change (CompanionMismatch). Costs one copy of this rank's
    state in host memory for the job's life (12 bytes per parameter / world size)."""

    def __init__(self, path: Path, *, pin_memory: bool) -> None:
        super().__init__(str(path), sync_files=True, thread_count=2)
        self.pin_memory = pin_memory

    def stage(self, state_dict):
        from torch.distributed._state_dict_utils import CompanionMismatch, _copy_state_dict, _create_cpu_state_dict

        if self.state_dict_cache is not None:
            try:
                return _copy_state_dict(state_dict, self.state_dict_cache, type_check=self.type_check)
            except CompanionMismatch:
                self.state_dict_cache = None
        self.state_dict_cache = _create_cpu_state_dict(state_dict, pin_memory=self.pin_memory)
        return _copy_state_dict(state_dict, self.state_dict_cache, type_check=self.type_check)


class Checkpointer:
    """Decides when to save, saves (optionally in the background), marks complete, prunes, and loads the
    newest complete and intact checkpoint. Call `poll(step, stop)` once per step on every rank."""

    def __init__(self, folder: str, topology: Topology, *, keep: int, interval_minutes: float, every_steps: int,
                 async_save: bool, device: torch.device, group: dist.ProcessGroup | None = None,
                 on_complete: Callable[[int, float], None] | None = None) -> None:
        self.folder, self.topology = Path(folder), topology
        self.keep, self.interval_s, self.every_steps = keep, interval_minutes * 60, every_steps
        self.async_save, self.device = async_save, device
        # Staging (the copy of the state that training may then overwrite) runs in the background too where
        # torch has DefaultStager; the trainer waits for it only before the next optimizer step changes the
        # weights. Without it, async_save stages before returning and only the write runs in the background.
        self.stager = None if DefaultStager is None else DefaultStager(StagingOptions(
            use_pinned_memory=device.type == "cuda", use_shared_memory=False, use_async_staging=True,
            use_non_blocking_copy=device.type == "cuda"))
        # torch 2.8: one writer for the job, so its staged copy is reused (CachedStagingWriter).
        self.cached_writer = None if self.stager is not None or not async_save else \
            CachedStagingWriter(self.folder, pin_memory=device.type == "cuda")
        # Checkpoint I/O runs on its own gloo group: an async save's collectives must never interleave
        # with the training collectives (NCCL on GPU) of the main thread.
        self.group = group if group is not None else dist.new_group(backend="gloo")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.last_save_time = time.monotonic()
        self.pending: _PendingSave | None = None
        self.completed: list[int] = []
        self.last_blocked_seconds = 0.0  # of the newest completed save: save call plus any staging wait
        self.on_complete = on_complete

    # ---- saving -----------------------------------------------------------------------------------
    def poll(self, step: int, state: Callable[[], dict[str, Any]], *, stop_requested: bool,
             metadata: dict[str, Any] | None = None) -> bool:
        """Once per finished step. Returns True when any rank asked to stop (SIGTERM). Saves when due."""
        due_by_time = self.interval_s > 0 and time.monotonic() - self.last_save_time >= self.interval_s
        busy = self.pending is not None and self.pending.local_files is None and self.pending.error is None
        # One small all-reduce per step: rank 0's clock decides for everyone; any rank's SIGTERM stops all.
        flags = torch.tensor([float(due_by_time and self.topology.is_main), float(busy), float(stop_requested)],
                             device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        due_by_time, any_busy, stop = (bool(x) for x in flags.tolist())
        if self.pending is not None and not any_busy:
            self._complete(self.pending)
        due = due_by_time or (self.every_steps > 0 and step % self.every_steps == 0)
        if due and not stop:
            self.save(step, state, metadata=metadata)
        return stop

    def save(self, step: int, state: Callable[[], dict[str, Any]], *, metadata: dict[str, Any] | None = None) -> None:
        """Save `state()` as step-<step>; `metadata` (small, JSON) goes into the completion marker."""
        if step in self.completed or (self.pending is not None and self.pending.step == step):
            return
        if self.pending is not None:  # one save in flight at a time
            self.wait()
        path = self.folder / f"{PREFIX}{step}"
        if self.topology.is_local_main:
            if path.exists():  # leftovers of an interrupted save of this same step
                shutil.rmtree(path)
            path.mkdir(parents=True)
        dist.barrier(group=self.group)
        started = time.perf_counter()
        pending = _PendingSave(step=step, path=path, started=started, metadata=dict(metadata or {}))
        writer = self.cached_writer if self.cached_writer is not None else \
            dcp.FileSystemWriter(str(path), sync_files=True, thread_count=2)
        if self.async_save:
            stager = {} if self.stager is None else {"async_stager": self.stager}
            response = dcp.async_save(state(), storage_writer=writer, checkpoint_id=str(path),
                                      process_group=self.group, **stager)
            if AsyncSaveResponse is not None and isinstance(response, AsyncSaveResponse):
                pending.staging, pending.future = response.staging_completion, response.upload_completion
            else:
                pending.future = response
            pending.future.add_done_callback(lambda future: self._record_local_files(pending, future))
        else:
            dcp.save(state(), storage_writer=writer, process_group=self.group)
            pending.local_files = self._local_files(path)
        pending.blocked_seconds = time.perf_counter() - started
        self.last_save_time = time.monotonic()
        self.pending = pending
        if not self.async_save:
            self._complete(pending)

    def wait_for_staging(self) -> None:
        """Call before changing the model or optimizer state: returns once a save in flight has its copy."""
        pending = self.pending
        if pending is not None and pending.staging is not None and not pending.staging.done():
            started = time.perf_counter()
            pending.staging.result()
            pending.blocked_seconds += time.perf_counter() - started

    def wait(self) -> None:
        """Block until the save in flight (if any) is written and marked complete, on every rank."""
        if self.pending is None:
            return
        if self.pending.future is not None:
            try:
                self.pending.future.result()
            except BaseException as error:  # recorded, reported in _complete
                self.pending.error = error
        while self.pending.local_files is None and self.pending.error is None:
            time.sleep(0.01)  # the done-callback is still hashing files
        self._complete(self.pending)

    def _record_local_files(self, pending: _PendingSave, future) -> None:
        try:
            future.result()
            pending.local_files = self._local_files(pending.path)
        except BaseException as error:
            pending.error = error

    def _local_files(self, path: Path) -> dict[str, list[int]]:
        """This rank's files in `path` with size and CRC-32 (rank 0 also owns `.metadata`)."""
        mine = [p for p in path.iterdir() if p.name.startswith(f"__{self.topology.rank}_")]
        if self.topology.is_main:
            mine.append(path / ".metadata")
        return {p.name: [p.stat().st_size, crc32_of(p)] for p in mine}

    def _complete(self, pending: _PendingSave) -> None:
        """Every rank calls this together: gather the file lists, rank 0 writes the marker, all prune."""
        self.pending = None
        report = {"files": pending.local_files or {}, "error": repr(pending.error) if pending.error else None}
        reports: list[dict[str, Any] | None] = [None] * self.topology.world_size
        dist.all_gather_object(reports, report, group=self.group)
        errors = [r["error"] for r in reports if r["error"]]
        if errors:
            log.error("checkpoint step-%d failed, not marked complete: %s", pending.step, errors[0])
            return
        if self.topology.is_main:
            files = {name: meta for r in reports for name, meta in r["files"].items()}
            manifest = {**pending.metadata, "step": pending.step, "layout": LAYOUT,
                        "world_size": self.topology.world_size, "files": files, "saved_unix_time": time.time()}
            tmp = pending.path / f".{MARKER}.tmp"
            with tmp.open("w") as handle:
                json.dump(manifest, handle)
                handle.flush()
                os.fsync(handle.fileno())
            tmp.replace(pending.path / MARKER)
            _fsync_dir(pending.path)
        dist.barrier(group=self.group)
        self.completed = sorted(set(self.completed) | {pending.step})
        self.last_blocked_seconds = pending.blocked_seconds
        if self.topology.is_main:
            print(log_format.checkpoint_line(step=pending.step, blocked_seconds=pending.blocked_seconds), flush=True)
            if self.on_complete:
                self.on_complete(pending.step, pending.blocked_seconds)
            log.info("checkpoint step-%d complete (%.1f s after start)", pending.step,
                     time.perf_counter() - pending.started)
        self.prune()

    def prune(self) -> None:
        """Local-main rank of each instance removes what `keep_after_pruning` does not keep."""
        if not self.topology.is_local_main:
            return
        present = step_dirs(self.folder)
        keep = keep_after_pruning(self.completed, [s for s, _ in present], self.keep)
        for step, path in present:
            if step not in keep:
                shutil.rmtree(path, ignore_errors=True)

    # ---- loading ----------------------------------------------------------------------------------
    def load_latest(self, state_for: Callable[[dict[str, Any]], dict[str, Any]],
                    apply: Callable[[dict[str, Any], dict[str, Any]], None]) -> dict[str, Any] | None:
        """Load the newest complete, intact checkpoint into `state_for(manifest)` and `apply` it.
        Returns its manifest, or None when there is nothing to resume from."""
        for step, path in step_dirs(self.folder):
            manifest, reason = examine(path, verify_files=lambda m, p=path: self._verify_share(p, m))
            reasons: list[str | None] = [None] * self.topology.world_size
            dist.all_gather_object(reasons, reason, group=self.group)
            reason = next((r for r in reasons if r), None)
            if reason is None:
                state = state_for(manifest)
                try:
                    dcp.load(state, checkpoint_id=str(path), process_group=self.group)
                except Exception as error:  # DCP raises the same CheckpointException on every rank
                    reason = f"load failed ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
                else:
                    apply(state, manifest)
                    self.completed = marked_steps(self.folder)
                    self.last_save_time = time.monotonic()
                    if self.topology.is_main:
                        log.info("resumed from %s", path)
                    return manifest
            if self.topology.is_main:
                log.warning("skipping checkpoint %s: %s", path, reason)
        return None

    def _verify_share(self, path: Path, manifest: dict[str, Any]) -> str | None:
        """Each rank checks every world_size-th file, so verification reads each byte once."""
        names = sorted(manifest["files"])
        for name in names[self.topology.rank::self.topology.world_size]:
            size, crc = manifest["files"][name]
            file = path / name
            if not file.is_file():
                return f"{name} is missing"
            if file.stat().st_size != size:
                return f"{name} has {file.stat().st_size} bytes, expected {size} (truncated)"
            if crc32_of(file) != crc:
                return f"{name} fails its CRC-32 check (corrupted)"
        return None

