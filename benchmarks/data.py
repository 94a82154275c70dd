"""The trainer's data path at 10 M and 200 M tokens: raw *.jsonl (tokenized at every start) against prepared
token shards (memory-mapped, trainer/tokens.py). For each, a fresh process does what a rank does before its
first step, the model left out: imports, `load_tokens`, the block dataset, the first step's batches.

Prints the time from process start to the first batch, the data path's own part of it, and the data path's
resident memory (peak RSS above the RSS after imports) against the shard bytes. Targets with shards: start to
first step grows less than 20% from 10 M to 200 M tokens; the data path's memory stays below 5% of the shard
bytes. Raw text above the trainer's limit (64 MiB) is refused, as the trainer refuses it.

    .venv/bin/python benchmarks/data.py [--sizes 10000000 200000000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "trainer"))

PROBE = r"""
import sys, time, json
sys.path.insert(0, sys.argv[1])
from pathlib import Path
import numpy as np, torch
from transformers import AutoTokenizer
import data
def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
folder, model_dir = sys.argv[2], sys.argv[3]
tokenizer = AutoTokenizer.from_pretrained(model_dir)
before = status("VmRSS")
Path("/proc/self/clear_refs").write_text("5")
started = time.perf_counter()
try:
    dataset = data.BlockDataset(data.load_tokens(folder, tokenizer, model_dir=model_dir), 2048, seed=1234)
except data.DataError as error:
    print(json.dumps({"refused": str(error)}))
    sys.exit(0)
batch = dataset.batch(0, 8 * 4)  # the first step of 8 ranks x 4 sequences
data_seconds = time.perf_counter() - started
print(json.dumps({"data_seconds": data_seconds, "rss_before": before, "peak": status("VmHWM"),
                  "tokens": len(dataset.tokens), "batch": list(batch.shape)}))
"""


def make_tokenizer(folder: Path) -> Path:
    from spot_training.local.tiny import corpus, make_model_dir

    return make_model_dir(folder, text_corpus=corpus(400))


def write_shards(folder: Path, tokens: int, model_dir: Path) -> int:
    import numpy as np

    from tokens import ShardWriter, tokenizer_fingerprint

    writer = ShardWriter(folder, vocab_size=96, tokens_per_shard=2**26)
    generator = np.random.default_rng(0)
    left = tokens
    while left:
        n = min(left, 2**24)
        writer.add(generator.integers(0, 96, n, dtype=np.uint16))
        left -= n
    writer.finish(tokenizer=tokenizer_fingerprint(model_dir), vocab_size=96, eos_token_id=1, documents=0, sources=[])
    return sum(p.stat().st_size for p in folder.glob("shard-*.npy"))


def write_jsonl(folder: Path, tokens: int, model_dir: Path) -> int:
    """Text of about `tokens` tokens under the tiny tokenizer (measured on a sample)."""
    from transformers import AutoTokenizer

    from spot_training.local.tiny import WORDS

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    sample = [" ".join(rng.choice(WORDS) for _ in range(200)) for _ in range(50)]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    per_document = sum(len(tokenizer(t)["input_ids"]) + 1 for t in sample) / len(sample)
    documents = int(tokens / per_document) + 1
    with (folder / "part-000.jsonl").open("w") as out:
        for i in range(documents):
            out.write(json.dumps({"text": sample[i % len(sample)]}) + "\n")
    return (folder / "part-000.jsonl").stat().st_size


def probe(folder: Path, model_dir: Path) -> dict:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PROBE, str(ROOT / "trainer"), str(folder), str(model_dir)],
                          capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"probe failed: {done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall"] = wall
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000_000, 200_000_000])
    parser.add_argument("--keep", help="work in this folder and keep it")
    args = parser.parse_args()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="data-bench-"))
    model_dir = make_tokenizer(work / "model")
    rows = {}
    for size in args.sizes:
        shard_bytes = write_shards(work / f"shards-{size}", size, model_dir)
        text_bytes = write_jsonl(work / f"jsonl-{size}", size, model_dir)
        for kind, folder, nbytes in (("jsonl", work / f"jsonl-{size}", text_bytes),
                                     ("shards", work / f"shards-{size}", shard_bytes)):
            result = probe(folder, model_dir)
            rows[(kind, size)] = result
            label = f"{kind:<6} {size / 1e6:>5.0f} M tokens ({nbytes / 2**20:,.0f} MiB)"
            if "refused" in result:
                print(f"{label}: refused by the trainer: {result['refused'].split(': ', 1)[1]}")
                continue
            data_rss = result["peak"] - result["rss_before"]
            share = f", {data_rss / shard_bytes:.2%} of the shard bytes" if kind == "shards" else ""
            print(f"{label}: start to first batch {result['wall']:.2f} s (data path {result['data_seconds']:.3f} s), "
                  f"data path memory {data_rss / 2**20:,.1f} MiB{share}")
    small, large = min(args.sizes), max(args.sizes)
    a, b = rows[("shards", small)], rows[("shards", large)]
    growth = b["wall"] / a["wall"] - 1
    memory_share = (b["peak"] - b["rss_before"]) / (large * 2)
    print(f"shards, {small / 1e6:.0f} M -> {large / 1e6:.0f} M tokens: start to first batch {growth:+.1%} "
          f"(target < +20%); data path memory {memory_share:.2%} of the shard bytes (target < 5%)")
    return 0 if growth < 0.20 and memory_share < 0.05 else 1


if __name__ == "__main__":
    sys.exit(main())
