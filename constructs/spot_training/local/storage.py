"""The local S3 (a folder per bucket) and SageMaker's checkpoint sync between the instances and it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any


class LocalS3:
    """`s3://bucket/key` <-> `DIR/s3/bucket/key`; also answers ListObjectsV2 through the slice of a boto3 S3
    client's interface that `operations.runs.data_fingerprint` uses, so local-run fingerprints its data with the
    code `spot-training start` runs."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, uri: str) -> Path:
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        return self.root / bucket / key

    def get_paginator(self, operation: str) -> LocalS3:
        if operation != "list_objects_v2":
            raise NotImplementedError(operation)
        return self

    def paginate(self, *, Bucket: str, Prefix: str) -> Iterator[dict[str, Any]]:  # noqa: N803 (boto3's names)
        """One page of every object under the prefix; the ETag stands in as the content's MD5 (S3's ETag of
        an object written by a single unencrypted or SSE-S3 PUT; here only its changing with the bytes counts)."""
        base = self.root / Bucket
        files = sorted(p for p in base.rglob("*") if p.is_file()) if base.is_dir() else []
        yield {"Contents": [{"Key": key, "Size": f.stat().st_size, "ETag": f'"{hashlib.md5(f.read_bytes()).hexdigest()}"'}
                            for f in files if (key := f.relative_to(base).as_posix()).startswith(Prefix)]}


class CheckpointSync:
    """SageMaker's checkpoint sync between instances' checkpoint folders and the S3 prefix, emulated: new and
    changed files are copied up, and a file deleted in the container is deleted from the prefix too (SageMaker
    developer guide, "Use checkpoints in Amazon SageMaker AI"). Folders may vanish while a pass looks at them
    (the trainer prunes old checkpoints): a pass skips what is gone and the next one sees the new state."""

    def __init__(self, sources: Sequence[Path], target: Path, period: float = 0.05) -> None:
        self.sources, self.target, self.period = list(sources), target, period
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._uploaded: dict[Path, dict[str, tuple[int, int]]] = {source: {} for source in self.sources}

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            self.sync_once()

    def sync_once(self) -> None:
        with self._lock:
            for source in self.sources:
                self._sync(source)

    def _sync(self, source: Path) -> None:
        present = _files_with_signatures(source)
        uploaded = self._uploaded[source]
        for name, signature in present.items():
            if uploaded.get(name) == signature:
                continue
            destination = self.target / name
            try:
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source / name, destination)
            except (FileNotFoundError, NotADirectoryError):
                _remove_empty_folders(self.target, destination.parent)  # deleted between listing and copy
                continue
            uploaded[name] = signature
        for name in [n for n in uploaded if n not in present]:
            del uploaded[name]
            _delete_object(self.target, name)


def _files_with_signatures(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under `root` as relative name -> (size, mtime_ns); whatever vanishes meanwhile is left out."""
    found: dict[str, tuple[int, int]] = {}
    for folder, _, names in os.walk(root):  # os.walk skips folders that disappear under it
        for name in names:
            path = Path(folder) / name
            try:
                stat = path.stat()
            except (FileNotFoundError, NotADirectoryError):
                continue
            found[path.relative_to(root).as_posix()] = (stat.st_size, stat.st_mtime_ns)
    return found


def _delete_object(root: Path, name: str) -> None:
    """Delete `root/name` and the folders it leaves empty: S3 has keys, not folders, so an emptied
    `step-N/` must not come back as an empty folder on restore."""
    path = root / name
    path.unlink(missing_ok=True)
    _remove_empty_folders(root, path.parent)


def _remove_empty_folders(root: Path, folder: Path) -> None:
    while folder != root and root in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return  # not empty, or already gone
        folder = folder.parent


def write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2))
    tmp.replace(path)
