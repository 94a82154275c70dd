"""Training data: a token stream cut into fixed-length blocks, read in a seeded, resumable order.

Formats of a channel folder:
- prepared shards (`manifest.json` and `shard-*.npy`, written by the pipeline's preparation step, prepare.py):
  memory-mapped through an index over shards (tokens.py); checked against the model's tokenizer;
- `*.npy`: one-dimensional arrays of token ids, memory-mapped the same way (no concatenation);
- `*.jsonl`, small data only (at most MAX_JSONL_BYTES in all): one JSON object with a `text` field per line,
  tokenized here on every rank at every start, each document followed by the EOS token. Anything larger goes
  through the preparation step, which tokenizes once.

Instruction data (format 2, prepared only: instructions.py) comes packed in blocks of the run's sequence length
+ 1, with which targets are trained and each token's position within its example (`BlockDataset.batch_parts`).

The order is a pure function of (seed, sample index): sample i of the run is block
`permutation(seed + epoch)[i mod blocks]` with `epoch = i div blocks`. A checkpoint stores how many samples
the job consumed, so a resumed run reads exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tokens import (
    MANIFEST,
    DataError,
    TokenSequence,
    documents,
    open_shards,
    open_streams,
    random_access,
    read_manifest,
    token_dtype,
    tokenizer_fingerprint,
)

# Raw text is tokenized in Python on every rank at every (re)start: fine for tens of MB, hours of GPU time for a
# corpus of GBs. Above this the trainer refuses and points at the preparation step.
MAX_JSONL_BYTES = 64 * 2**20

__all__ = ["MAX_JSONL_BYTES", "BlockDataset", "DataError", "load_tokens"]


def load_tokens(folder: str, tokenizer=None, *, model_dir: str | None = None,
                vocab_size: int | None = None) -> TokenSequence:
    path = Path(folder)
    if (path / MANIFEST).is_file():
        tokens = open_shards(path, tokenizer=tokenizer_fingerprint(model_dir) if model_dir else None,
                             vocab_size=vocab_size)
        tokens.streams = open_streams(path)  # instruction data: mask and positions, packed in blocks
        tokens.packed_block = read_manifest(path).get("block")
        tokens.folder = str(path)
        return tokens
    files = sorted(p for p in path.glob("*") if p.suffix in (".jsonl", ".npy"))
    if not files:
        raise DataError(f"{folder}: no prepared shards ({MANIFEST}), *.jsonl or *.npy files")
    text_bytes = sum(f.stat().st_size for f in files if f.suffix == ".jsonl")
    if text_bytes > MAX_JSONL_BYTES:
        raise DataError(f"{folder}: {text_bytes / 2**20:.0f} MiB of *.jsonl; raw text above "
                        f"{MAX_JSONL_BYTES // 2**20} MiB must go through the preparation step (prepare.py), which "
                        "tokenizes once into memory-mapped shards")
    parts = []
    for file in files:
        if file.suffix == ".npy":
            array = np.load(file, mmap_mode="r")
            random_access(array)
            if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
                raise DataError(f"{file}: must be a one-dimensional integer array of token ids")
            parts.append(array)
        else:
            if tokenizer is None:
                raise DataError(f"{file}: text data needs a tokenizer in the model folder")
            parts.append(_tokenize_jsonl(file, tokenizer))
    return TokenSequence(parts)


def _tokenize_jsonl(file: Path, tokenizer) -> np.ndarray:
    """The same checked reading as the preparation step (tokens.documents), so bad text gets the same one line
    on either path."""
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for text in documents(file, str(file)):
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    return np.asarray(ids, dtype=token_dtype(len(tokenizer)))


class BlockDataset:
    """Blocks of `sequence_length + 1` tokens (inputs and shifted labels) in a seeded order; optionally
    only the blocks `[first_block, first_block + num_blocks)` of the stream."""

    def __init__(self, tokens: np.ndarray, sequence_length: int, seed: int, first_block: int = 0,
                 num_blocks: int | None = None) -> None:
        self.tokens, self.block, self.seed = tokens, sequence_length + 1, seed
        packed = getattr(tokens, "packed_block", None)
        if packed is not None and packed != self.block:
            raise DataError(f"{getattr(tokens, 'folder', 'data')}: instruction data packed for SequenceLength "
                            f"{packed - 1}, the run's is {sequence_length}; prepare it again with this sequence length")
        self.streams = getattr(tokens, "streams", {})
        available = len(tokens) // self.block - first_block
        self.first_block = first_block
        self.num_blocks = available if num_blocks is None else min(num_blocks, available)
        if self.num_blocks <= 0:
            raise DataError(f"{len(tokens)} tokens: fewer than one sequence of {self.block}")
        self._epoch, self._order = -1, None

    def split(self, fraction: float) -> tuple[BlockDataset, BlockDataset | None]:
        """(train, held-out validation): the last `fraction` of the blocks, at least one, are held out."""
        held = max(1, int(self.num_blocks * fraction)) if fraction > 0 and self.num_blocks > 1 else 0
        if not held:
            return self, None
        train = BlockDataset(self.tokens, self.block - 1, self.seed, self.first_block, self.num_blocks - held)
        validation = BlockDataset(self.tokens, self.block - 1, self.seed, self.first_block + self.num_blocks - held,
                                  held)
        return train, validation

    def block_index(self, sample: int) -> int:
        epoch, position = divmod(sample, self.num_blocks)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            # An int64 array, 8 bytes per block (a Python list would take about 36)
            self._epoch, self._order = epoch, torch.randperm(self.num_blocks, generator=generator).numpy()
        return self.first_block + int(self._order[position])

    def batch(self, first_sample: int, count: int) -> torch.Tensor:
        return self.batch_parts(first_sample, count)[0]

    def batch_parts(self, first_sample: int, count: int) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                  torch.Tensor | None]:
        """(tokens [count, block], trained targets [count, block - 1] bool, input positions [count, block - 1]):
        the last two None for text, where every target is trained and attention spans the block."""
        return self.read_blocks([self.block_index(i) for i in range(first_sample, first_sample + count)])

    def read_blocks(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """`batch_parts` of blocks by index (stream order for the evaluation)."""
        starts = [index * self.block for index in indices]

        def rows(sequence) -> np.ndarray:
            read = sequence.read if isinstance(sequence, TokenSequence) else (lambda start, stop: sequence[start:stop])
            return np.stack([read(start, start + self.block) for start in starts]).astype(np.int64)

        tokens = torch.from_numpy(rows(self.tokens))
        if not self.streams:
            return tokens, None, None
        trained = torch.from_numpy(rows(self.streams["mask"])[:, 1:] != 0)
        positions = torch.from_numpy(rows(self.streams["position"])[:, :-1])
        return tokens, trained, positions
