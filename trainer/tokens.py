"""Prepared token data: fixed-size shards of token ids, read memory-mapped through an index over shards.

A prepared split folder (what the preparation step writes for `train` and `validation`) holds
`shard-00000.npy`, `shard-00001.npy`, ... (one-dimensional uint16 arrays when the vocabulary has at most
65,536 entries, else uint32; every shard `tokens_per_shard` long but the last) and `manifest.json`:

    {"format": "spot-training-tokens/1", "tokenizer": "<sha256 of the tokenizer files>", "vocab_size": ...,
     "eos_token_id": ..., "dtype": "uint16", "tokens_per_shard": ..., "tokens": ..., "documents": ...,
     "sources": [{"name": "part-000.jsonl", "bytes": ..., "sha256": ...}, ...],
     "shards": [{"file": "shard-00000.npy", "tokens": ..., "bytes": ...}, ...]}

Instruction data (chat, prompt/completion; instructions.py) is format 2: the same token shards, packed in blocks of
`block` tokens (the trainer's sequence_length + 1), and beside each shard two aligned streams: `mask-NNNNN.npy`
(uint8, 1 where the token is trained as a label) and `position-NNNNN.npy` (each token's position within its
example); the manifest adds `"block"`, `"data_format"` and, per shard, `"mask"` and `"position"` entries
({"file", "bytes"}), and `"contract"` (the data contract's figures per source).

`TokenSequence` presents the shards (or any one-dimensional integer arrays) as one sequence: `len()` and
slicing, without concatenating, copying or widening the corpus; a slice that crosses a shard boundary is the
only copy, one block long.
"""

from __future__ import annotations

import hashlib
import json
import mmap
from collections.abc import Sequence
from pathlib import Path

import numpy as np

FORMAT = "spot-training-tokens/1"
PACKED_FORMAT = "spot-training-tokens/2"
STREAMS = ("mask", "position")  # the aligned streams of format 2
MANIFEST = "manifest.json"
# The tokenizer's own files: what decides which ids a text becomes.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json")


class DataError(ValueError):
    """Unusable data; the message is one line naming the file and the line or offset."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (a vocabulary of at most 65,536 entries), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def tokenizer_fingerprint(model_dir: str | Path) -> str:
    """sha256 over the tokenizer files of a model folder (name and bytes, in name order)."""
    digest = hashlib.sha256()
    found = False
    for name in sorted(TOKENIZER_FILES):
        path = Path(model_dir) / name
        if path.is_file():
            found = True
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    if not found:
        raise DataError(f"{model_dir}: no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...)")
    return digest.hexdigest()


def random_access(array: np.ndarray) -> None:
    """Tell the kernel a memory-mapped array is read at random places (madvise MADV_RANDOM): without it each
    page fault reads ahead (typically 128 KiB or more) and a few blocks from each shard bring megabytes into
    the process's resident memory."""
    handle = getattr(array, "_mmap", None)
    if isinstance(handle, mmap.mmap) and hasattr(mmap, "MADV_RANDOM"):
        handle.madvise(mmap.MADV_RANDOM)


def release(array: np.ndarray, lo: int, hi: int) -> None:
    """Unmap the pages holding elements [lo, hi) of a memory-mapped array (their data stays in the page cache)."""
    handle = getattr(array, "_mmap", None)
    if not isinstance(handle, mmap.mmap) or not hasattr(mmap, "MADV_DONTNEED"):
        return
    base = array.offset % mmap.ALLOCATIONGRANULARITY  # where element 0 sits in the mapping (after the header)
    first = (base + lo * array.itemsize) // mmap.PAGESIZE * mmap.PAGESIZE
    last = base + hi * array.itemsize
    handle.madvise(mmap.MADV_DONTNEED, first, min(last, len(handle)) - first)


class TokenSequence:
    """Several one-dimensional integer arrays (memory-mapped shards) read as one, by index."""

    def __init__(self, arrays: Sequence[np.ndarray]) -> None:
        self.arrays = [a for a in arrays if len(a)]
        self.offsets = np.zeros(len(self.arrays) + 1, dtype=np.int64)
        np.cumsum([len(a) for a in self.arrays], out=self.offsets[1:])
        self.dtype = np.result_type(*[a.dtype for a in self.arrays]) if self.arrays else np.dtype(np.uint16)
        # Set by data.load_tokens for a prepared split: its aligned streams (format 2), block and folder.
        self.streams: dict[str, TokenSequence] = {}
        self.packed_block: int | None = None
        self.folder = ""

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _pieces(self, start: int, stop: int):
        """(array, lo, hi) for each shard that tokens [start, stop) touch, in order; start < stop."""
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        last = int(np.searchsorted(self.offsets, stop - 1, side="right")) - 1
        for i in range(first, last + 1):
            base = int(self.offsets[i])
            yield self.arrays[i], max(start, base) - base, min(stop, int(self.offsets[i + 1])) - base

    def __getitem__(self, index: slice) -> np.ndarray:
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("TokenSequence supports contiguous slices only")
        start, stop, _ = index.indices(len(self))
        if stop <= start:
            return np.empty(0, dtype=self.dtype)
        pieces = [array[lo:hi] for array, lo, hi in self._pieces(start, stop)]
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)  # a view within one shard

    def read(self, start: int, stop: int) -> np.ndarray:
        """A copy of tokens [start, stop), with the mapped pages it touched given back to the kernel (madvise
        MADV_DONTNEED; they stay in the page cache): the process's resident memory stays at what one batch
        needs however much of the corpus has been read. Without it, every page ever touched counts in the
        RSS, and kernels that map whole large folios on a fault bring in up to 2 MiB per block read."""
        copy = np.array(self[start:stop])
        if start < stop:
            for array, lo, hi in self._pieces(start, stop):
                release(array, lo, hi)
        return copy


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: unreadable manifest ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") not in (FORMAT, PACKED_FORMAT):
        raise DataError(f"{path}: format {manifest.get('format') if isinstance(manifest, dict) else None!r}, "
                        f"expected {FORMAT} or {PACKED_FORMAT}")
    return manifest


def open_shards(folder: str | Path, *, tokenizer: str | None = None, vocab_size: int | None = None) -> TokenSequence:
    """The prepared split in `folder`, memory-mapped, after checking each shard against the manifest (a
    truncated or missing shard, or shards written by another tokenizer, are refused in one line)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if tokenizer is not None and manifest["tokenizer"] != tokenizer:
        raise DataError(f"{folder / MANIFEST}: shards written by tokenizer {manifest['tokenizer'][:12]}, the model's "
                        f"is {tokenizer[:12]}; prepare the data again with this model's tokenizer")
    if vocab_size is not None and manifest["vocab_size"] > vocab_size:
        raise DataError(f"{folder / MANIFEST}: token ids up to {manifest['vocab_size'] - 1}, the model has "
                        f"{vocab_size} embeddings")
    return _open_stream(folder, manifest, None)


def open_streams(folder: str | Path) -> dict[str, TokenSequence]:
    """The aligned streams of a format-2 split (`mask`, `position`), checked like the tokens; {} for format 1."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest["format"] != PACKED_FORMAT:
        return {}
    return {name: _open_stream(folder, manifest, name) for name in STREAMS}


def _open_stream(folder: Path, manifest: dict, stream: str | None) -> TokenSequence:
    arrays = []
    for shard in manifest["shards"]:
        entry = shard if stream is None else shard[stream]
        path = folder / entry["file"]
        if not path.is_file():
            raise DataError(f"{path}: missing (listed in {MANIFEST})")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise DataError(f"{path}: {size} bytes, the manifest says {entry['bytes']} (truncated at byte {size})"
                            if size < entry["bytes"] else f"{path}: {size} bytes, the manifest says {entry['bytes']}")
        array = np.load(path, mmap_mode="r")
        random_access(array)
        dtype = np.dtype(manifest["dtype"] if stream is None else manifest["stream_dtypes"][stream])
        if array.dtype != dtype or array.ndim != 1 or len(array) != shard["tokens"]:
            raise DataError(f"{path}: {array.dtype}[{len(array)}], the manifest says {dtype}[{shard['tokens']}]")
        arrays.append(array)
    return TokenSequence(arrays)


class ShardWriter:
    """Appends token ids and writes full shards as they fill, then the manifest (`finish`)."""

    def __init__(self, folder: Path, *, vocab_size: int, tokens_per_shard: int, block: int | None = None) -> None:
        """`block`: write format 2, packed blocks of this many tokens with the mask and position streams."""
        self.folder, self.dtype, self.size = folder, token_dtype(vocab_size), tokens_per_shard
        self.folder.mkdir(parents=True, exist_ok=True)
        self.block = block
        self.dtypes = {"tokens": self.dtype}
        if block is not None:
            self.dtypes.update(mask=np.dtype(np.uint8), position=token_dtype(block))
        self.buffers = {name: np.empty(tokens_per_shard, dtype=dtype) for name, dtype in self.dtypes.items()}
        self.filled = 0
        self.shards: list[dict] = []
        self.limit = np.iinfo(self.dtype).max

    def add(self, ids: Sequence[int] | np.ndarray, mask: Sequence[bool] | None = None,
            position: Sequence[int] | None = None) -> None:
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() > self.limit):
            raise DataError(f"token id {int(ids.max())} does not fit {self.dtype}")
        parts = {"tokens": ids.astype(self.dtype, copy=False)}
        if self.block is not None:
            parts.update(mask=np.asarray(mask, dtype=np.uint8), position=np.asarray(position, dtype=self.dtypes["position"]))
        done = 0
        while done < ids.size:
            take = min(self.size - self.filled, ids.size - done)
            for name, part in parts.items():
                self.buffers[name][self.filled:self.filled + take] = part[done:done + take]
            self.filled += take
            done += take
            if self.filled == self.size:
                self._flush()

    def _flush(self) -> None:
        if not self.filled:
            return
        number = len(self.shards)
        entry: dict = {}
        for name, buffer in self.buffers.items():
            file = f"{'shard' if name == 'tokens' else name}-{number:05d}.npy"
            np.save(self.folder / file, buffer[:self.filled])
            if name == "tokens":
                entry.update(file=file, tokens=int(self.filled), bytes=(self.folder / file).stat().st_size)
            else:
                entry[name] = {"file": file, "bytes": (self.folder / file).stat().st_size}
        self.shards.append(entry)
        self.filled = 0

    def finish(self, **fields) -> dict:
        self._flush()
        packed = {"block": self.block, "stream_dtypes": {n: d.name for n, d in self.dtypes.items() if n != "tokens"}} \
            if self.block is not None else {}
        manifest = {"format": PACKED_FORMAT if self.block is not None else FORMAT, "dtype": self.dtype.name,
                    "tokens_per_shard": self.size, "tokens": sum(s["tokens"] for s in self.shards), **packed,
                    **fields, "shards": self.shards}
        tmp = self.folder / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(manifest, indent=1))
        tmp.replace(self.folder / MANIFEST)
        return manifest


def records(file: Path, shown: str, expected: str = "a JSON object", what: str = "examples"):
    """(line number, object) of each non-blank line of a `*.jsonl` file, checked: UTF-8, a JSON object (`expected`
    names it in the error), at least one (`what` names them). `shown` names the file in errors."""
    if file.stat().st_size == 0:
        raise DataError(f"{shown}: empty file")
    seen = 0
    with file.open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{shown}:{number}: invalid UTF-8 at byte column {error.start + 1}") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as error:
                raise DataError(f"{shown}:{number}: not JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{shown}:{number}: {expected} expected, got {type(record).__name__}")
            seen += 1
            yield number, record
    if not seen:
        raise DataError(f"{shown}: no {what} (only blank lines)")


def documents(file: Path, shown: str):
    """Each line's text of a `*.jsonl` file, checked: UTF-8, a JSON object, a `text` string; blank lines are
    skipped. `shown` names the file in errors. The preparation step and the trainer's small-data path read
    text through this one function."""
    for number, record in records(file, shown, "a JSON object with a `text` string", "documents"):
        text = record.get("text")
        if not isinstance(text, str):
            raise DataError(f"{shown}:{number}: no `text` string in the object"
                            + (f" (`text` is {type(text).__name__})" if "text" in record else ""))
        yield text
