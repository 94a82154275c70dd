"""The preparation step: tokenize the text channels once, into token shards the trainer memory-maps.

    python prepare.py --model_dir M --train_dir T [--validation_dir V] --output_dir OUT [--previous_dir P]
                      [--data_format auto|text|chat|prompt_completion --sequence_length N]

Each `*.jsonl` line is a JSON object: `text` documents are joined with the tokenizer's EOS (format 1); `messages`
(chat) or `prompt` and `completion` examples are tokenized with the tokens to train on and packed whole into
blocks of sequence_length + 1 (format 2, instructions.py). `auto` takes the format of a split's first line and
says so; every line of a split must be in it. Instruction data is held to the data contract (instructions.py):
per source, the examples with no trained token, cut by the sequence length, or ending an answer without an
end-of-turn token, each above its threshold, stop the step in one line.
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
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from instructions import FORMATS, Contract, Packer, SourceStats, detect_format, encoder  # noqa: E402
from tokens import (  # noqa: E402
    FORMAT,
    MANIFEST,
    DataError,
    ShardWriter,
    documents,
    open_shards,
    read_manifest,
    records,
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


def work_key(fingerprint: str, splits: dict[str, list[dict]], tokens_per_shard: int, **options) -> str:
    """`options`: what else decides the output (the data format, the block, the contract)."""
    digest = hashlib.sha256(json.dumps({"format": FORMAT, "tokenizer": fingerprint, "sources": splits,
                                        "tokens_per_shard": tokens_per_shard, **options}, sort_keys=True).encode())
    return digest.hexdigest()[:32]


def split_format(folder: Path, files: list[Path], requested: str) -> str:
    """The data format of a split: `requested`, or with `auto` the format of its first line."""
    if requested != "auto":
        return requested
    first = files[0]
    try:
        number, record = next(records(first, str(first.relative_to(folder.parent))))
        found = detect_format(record, f"{first.relative_to(folder.parent)}:{number}")
    except DataError:
        return "text"  # the text reader names what is wrong with that line, as before instruction formats
    print(f"[prepare] {folder.name}: data_format auto -> {found} (the first line of {first.name})", flush=True)
    return found


def tokenize_instructions(folder: Path, files: list[Path], sources: list[dict], out: Path, tokenizer,
                          fingerprint: str, tokens_per_shard: int, *, data_format: str, model_dir: Path,
                          sequence_length: int, contract: Contract) -> dict:
    """Chat or prompt/completion examples, packed into blocks of sequence_length + 1 with their mask and
    positions; the data contract's figures per source, checked against `contract`."""
    encode = encoder(data_format, tokenizer, model_dir)
    writer = ShardWriter(out, vocab_size=len(tokenizer), tokens_per_shard=tokens_per_shard, block=sequence_length + 1)
    pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    packer = Packer(sequence_length + 1, pad, lambda ids, trained, positions: writer.add(ids, trained, positions))
    report = []
    for file in files:
        shown = str(file.relative_to(folder.parent))
        stats = SourceStats(str(file.relative_to(folder)))
        for number, record in records(file, shown):
            where = f"{shown}:{number}"
            found = detect_format(record, where)
            if found != data_format:
                raise DataError(f"{where}: a {found} example in {data_format} data (one format per split)")
            example = encode(record, where)
            stats.add(example, *packer.add(example))
        report.append(stats)
        print(f"[contract] {folder.name}/{stats.name}: {stats.examples} examples, "
              f"{stats.as_dict()['trained_tokens_per_example']} trained tokens per example (min {stats.min_trained}, "
              f"max {stats.max_trained}), {stats.untrained_examples} with none, {stats.truncated_examples} cut "
              f"({stats.truncated_tokens} tokens), {stats.unterminated_examples} without an end-of-turn token",
              flush=True)
    packer.finish()
    failures = contract.violations(folder.name, report)
    if failures:
        raise DataError(failures[0] + (f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""))
    trained = sum(s.trained_tokens for s in report)
    return writer.finish(tokenizer=fingerprint, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                         documents=sum(s.examples for s in report), sources=sources, data_format=data_format,
                         trained_tokens=trained, blocks=packer.blocks,
                         packing_efficiency=round(trained / (packer.blocks * (sequence_length + 1)), 4)
                         if packer.blocks else 0.0,
                         contract=[s.as_dict() for s in report])


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
            tokens_per_shard: int, data_fingerprint: str = "unlisted", *, data_format: str = "auto",
            sequence_length: int | None = None, contract: Contract = Contract()) -> dict:
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
    formats = {name: split_format(channels[name], found, data_format) for name, found in files.items()}
    if any(f != "text" for f in formats.values()) and not sequence_length:
        raise DataError(f"{', '.join(n for n, f in formats.items() if f != 'text')}: instruction data is packed into "
                        "sequences: pass --sequence_length (the run's SequenceLength)")
    options = {"formats": formats, "contract": dataclasses.asdict(contract),
               "block": sequence_length + 1 if sequence_length else None} if any(
        f != "text" for f in formats.values()) else {}
    key = work_key(fingerprint, sources, tokens_per_shard, **options)
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
        elif formats[name] != "text":
            manifests[name] = tokenize_instructions(folder, files[name], sources[name], out, tokenizer, fingerprint,
                                                    tokens_per_shard, data_format=formats[name], model_dir=model_dir,
                                                    sequence_length=sequence_length, contract=contract)
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
    result["contract"] = {name: m["contract"] for name, m in manifests.items() if "contract" in m}
    result["packing_efficiency"] = {name: m["packing_efficiency"] for name, m in manifests.items()
                                    if "packing_efficiency" in m}
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
    parser.add_argument("--data_format", default="auto", choices=("auto", *FORMATS),
                        help="the examples' format (default auto: the format of each split's first line)")
    parser.add_argument("--sequence_length", type=int, default=0, help="the run's SequenceLength: instruction "
                        "examples are packed into blocks of sequence_length + 1 tokens")
    for name, field in Contract.__dataclass_fields__.items():
        parser.add_argument(f"--{name}", type=float, default=field.default, help=f"data contract: {name} "
                            f"(default {field.default}), a fraction of a source's examples")
    args = parser.parse_args(argv)
    channels = {"train": Path(args.train_dir)}
    if args.validation_dir:  # given means expected: a missing or empty folder stops here, in one line
        channels["validation"] = Path(args.validation_dir)
    try:
        if args.tokens_per_shard < 1024:
            raise DataError(f"tokens_per_shard={args.tokens_per_shard}: must be at least 1024")
        for name in Contract.__dataclass_fields__:
            if not 0 <= getattr(args, name) <= 1:
                raise DataError(f"{name}={getattr(args, name)}: must be a fraction from 0 to 1")
        result = prepare(Path(args.model_dir), channels, Path(args.output_dir),
                         Path(args.previous_dir) if args.previous_dir else None, args.tokens_per_shard,
                         args.data_fingerprint, data_format=args.data_format,
                         sequence_length=args.sequence_length or None,
                         contract=Contract(**{name: getattr(args, name) for name in Contract.__dataclass_fields__}))
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
