"""The preparation step: tokenize the text channels once, into token shards the trainer memory-maps.

    python prepare.py --model_dir M --train_dir T [--validation_dir V] --output_dir OUT [--previous_dir P]

Each `*.jsonl` line must be a JSON object with a `text` string; documents are joined with the tokenizer's EOS.
The work is keyed: key = sha256(format, tokenizer files, every source's name, size and sha256, shard size).
Output: `OUT/train/` and `OUT/validation/` (shards and manifest, see tokens.py), `OUT/manifests/<key>.json`
(small) and `OUT/result.json` (`{"key": ..., "skipped": ...}`). When `previous_dir` (manifests of earlier
preparations) already holds `<key>.json`, nothing is tokenized or written but the result. In the pipeline the
step is skipped by Pipelines step caching instead (the job cannot see earlier outputs under network isolation).

A channel that already holds prepared shards (a `manifest.json`) is checked instead of tokenized: shards of
another tokenizer, or a truncated shard, stop the step. Any bad input stops it with one line naming the file
and the line or offset; on SageMaker that line is also written to /opt/ml/output/message, which
DescribeProcessingJob returns as ExitMessage (SageMaker developer guide, "Save and Access Metadata Information
About Your Processing Job", byoc-metadata.html).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tokens import (  # noqa: E402
    FORMAT,
    MANIFEST,
    DataError,
    ShardWriter,
    documents,
    open_shards,
    read_manifest,
    tokenizer_fingerprint,
)

# The container's /opt/ml/output/message; local-run points it at its emulated container's folder.
EXIT_MESSAGE = Path(os.environ.get("PREPARE_EXIT_MESSAGE", "/opt/ml/output/message"))
BATCH_LINES = 512


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def sources_of(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*.jsonl") if p.is_file())
    if not files:
        raise DataError(f"{folder}: no *.jsonl files (each line a JSON object with a `text` string)")
    return files


def work_key(fingerprint: str, splits: dict[str, list[dict]], tokens_per_shard: int) -> str:
    digest = hashlib.sha256(json.dumps({"format": FORMAT, "tokenizer": fingerprint, "sources": splits,
                                        "tokens_per_shard": tokens_per_shard}, sort_keys=True).encode())
    return digest.hexdigest()[:32]


def tokenize_split(folder: Path, files: list[Path], sources: list[dict], out: Path, tokenizer, fingerprint: str,
                   tokens_per_shard: int) -> dict:
    vocab_size = len(tokenizer)
    eos = tokenizer.eos_token_id
    writer = ShardWriter(out, vocab_size=vocab_size, tokens_per_shard=tokens_per_shard)
    count = 0
    for file in files:
        batch: list[str] = []
        for text in documents(file, str(file.relative_to(folder.parent))):
            batch.append(text)
            if len(batch) == BATCH_LINES:
                count += _write_batch(writer, tokenizer, batch, eos)
                batch = []
        count += _write_batch(writer, tokenizer, batch, eos)
    return writer.finish(tokenizer=fingerprint, vocab_size=vocab_size, eos_token_id=eos, documents=count,
                         sources=sources)


def _write_batch(writer: ShardWriter, tokenizer, texts: list[str], eos: int | None) -> int:
    if not texts:
        return 0
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        writer.add(ids + ([eos] if eos is not None else []))
    return len(texts)


def prepare(model_dir: Path, channels: dict[str, Path], output_dir: Path, previous_dir: Path | None,
            tokens_per_shard: int, data_fingerprint: str = "unlisted") -> dict:
    from transformers import AutoTokenizer

    fingerprint = tokenizer_fingerprint(model_dir)
    started = time.perf_counter()
    prepared = {name: folder for name, folder in channels.items() if (folder / MANIFEST).is_file()}
    for folder in prepared.values():  # already shards: check them against this model's tokenizer
        open_shards(folder, tokenizer=fingerprint)
    files = {name: sources_of(folder) for name, folder in channels.items() if name not in prepared}
    sources = {name: [{"name": str(f.relative_to(channels[name])), "bytes": f.stat().st_size, "sha256": _sha256(f)}
                      for f in found] for name, found in files.items()}
    for name, folder in prepared.items():
        manifest = read_manifest(folder)
        sources[name] = [{"prepared": manifest["tokenizer"], "shards": manifest["shards"]}]
    key = work_key(fingerprint, sources, tokens_per_shard)
    result = {"key": key, "tokenizer": fingerprint, "data_fingerprint": data_fingerprint, "skipped": False}
    if previous_dir is not None and (previous_dir / f"{key}.json").is_file():
        result["skipped"] = True
        _write_result(output_dir, result)
        print(f"[prepare] unchanged sources and tokenizer: key {key} was prepared before; nothing to do", flush=True)
        return result
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    manifests = {}
    for name, folder in channels.items():
        out = output_dir / name
        if name in prepared:
            shutil.copytree(folder, out, dirs_exist_ok=True)
            manifests[name] = read_manifest(out)
        else:
            manifests[name] = tokenize_split(folder, files[name], sources[name], out, tokenizer, fingerprint,
                                             tokens_per_shard)
        print(f"[prepare] {name}: {manifests[name]['tokens']:,} tokens in {len(manifests[name]['shards'])} "
              f"shard(s) of {manifests[name]['dtype']}", flush=True)
    (output_dir / "manifests").mkdir(parents=True, exist_ok=True)
    (output_dir / "manifests" / f"{key}.json").write_text(json.dumps(
        {"key": key, "splits": {name: {k: v for k, v in m.items() if k != "shards"} for name, m in manifests.items()}},
        indent=1))
    result["tokens"] = {name: m["tokens"] for name, m in manifests.items()}
    result["seconds"] = round(time.perf_counter() - started, 2)
    _write_result(output_dir, result)
    return result


def _write_result(output_dir: Path, result: dict) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "result.json").write_text(json.dumps(result))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--model_dir", required=True, help="the base model folder (its tokenizer is used)")
    parser.add_argument("--train_dir", required=True)
    parser.add_argument("--validation_dir", help="optional validation texts")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--previous_dir", help="manifests of earlier preparations (<key>.json)")
    parser.add_argument("--data_fingerprint", default="unlisted", help="the data objects' digest the run was "
                        "started with (a pipeline parameter, so part of the step's cache key); recorded in result.json")
    parser.add_argument("--tokens_per_shard", type=int, default=2**26, help="tokens per shard file (default 2^26: "
                        "128 MiB of uint16)")
    args = parser.parse_args(argv)
    channels = {"train": Path(args.train_dir)}
    if args.validation_dir:  # given means expected: a missing or empty folder stops here, in one line
        channels["validation"] = Path(args.validation_dir)
    try:
        if args.tokens_per_shard < 1024:
            raise DataError(f"tokens_per_shard={args.tokens_per_shard}: must be at least 1024")
        result = prepare(Path(args.model_dir), channels, Path(args.output_dir),
                         Path(args.previous_dir) if args.previous_dir else None, args.tokens_per_shard,
                         args.data_fingerprint)
    except DataError as error:
        message = f"error: {error}"
        print(message, file=sys.stderr)
        if EXIT_MESSAGE.parent.is_dir():
            EXIT_MESSAGE.write_text(message[:1024], encoding="utf-8")
        return 1
    print(f"[prepare] done: {json.dumps(result)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
