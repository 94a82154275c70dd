"""The evaluation step: held-out loss and perplexity of the base and the fine-tuned model, on the same data.

    python evaluate.py --base_model_dir B --model_dir M --data_dir D --sequence_length T --output_dir OUT
                       [--holdout_fraction F] [--max_sequences N] [--batch_size K] [--data_fingerprint X]

The data is read exactly as the trainer reads it (data.load_tokens, BlockDataset): prepared shards checked
against the base tokenizer, blocks of `sequence_length + 1` tokens. With `holdout_fraction` > 0 (no validation
channel) the evaluated blocks are the ones the trainer held out of the training data (`BlockDataset.split`),
so neither model trained on them. The first `max_sequences` of those blocks, in stream order, are evaluated;
every token's next-token cross-entropy is summed in fp32 and divided by the token count (a token-weighted
mean, not a mean of per-batch means), perplexity = exp(loss).

A base folder without weights is initialised as the trainer initialises it (modeling.init_random with the
trainer's seed), so the comparison is with the model training started from.

Output: OUT/evaluation.json, the pipeline's property file:
    {"metrics": {"base": {"loss", "perplexity"}, "fine_tuned": {...}}, "improvement": base loss - fine-tuned
     loss, "sequences", "tokens", "sequence_length", "data": {"source", "fingerprint"}, "base_model"}
The report, which only the execution role writes, is what later runs compare with (not the package's
CustomerMetadataProperties, which UpdateModelPackage can change).
A loss that is not finite, or data with no full sequence, stops the step with one line (written to
/opt/ml/output/message too, which DescribeProcessingJob returns as ExitMessage).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

EXIT_MESSAGE = Path(os.environ.get("PREPARE_EXIT_MESSAGE", "/opt/ml/output/message"))
REPORT = "evaluation.json"


class EvaluationError(ValueError):
    """Input the evaluation cannot use; the message names it."""


def first_line(error: BaseException) -> str:
    """An exception's first non-empty line (its type's name when it has no message): one-line errors."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def evaluation_blocks(data_dir: str, base_model_dir: str, sequence_length: int, holdout_fraction: float,
                      max_sequences: int, seed: int):
    """The blocks to evaluate (a BlockDataset) and where they come from, as the trainer would read them."""
    import modeling
    from data import BlockDataset, load_tokens

    config = modeling.read_config(base_model_dir)
    tokens = load_tokens(data_dir, modeling.load_tokenizer(base_model_dir), model_dir=base_model_dir,
                         vocab_size=config.vocab_size)
    blocks = BlockDataset(tokens, sequence_length, seed)
    source = "the validation channel"
    if holdout_fraction > 0:
        _, blocks = blocks.split(holdout_fraction)
        if blocks is None:
            raise EvaluationError(f"data_dir={data_dir}: one block of {sequence_length + 1} tokens; nothing is held "
                                  "out of it to evaluate on")
        source = f"held out of train ({holdout_fraction:g}, as the trainer holds it out)"
    count = blocks.num_blocks if not max_sequences else min(max_sequences, blocks.num_blocks)
    return BlockDataset(tokens, sequence_length, seed, blocks.first_block, count), source


def load_model(model_dir: str, seed: int, device):
    """A model folder as the trainer starts from it: its safetensors, or, without weights, the trainer's seeded
    random initialisation."""
    import torch
    from transformers import AutoModelForCausalLM

    import modeling

    if modeling.weight_files(model_dir):
        kwargs = {"dtype": torch.bfloat16, "device_map": "auto"} if device.type == "cuda" else {"dtype": torch.float32}
        from safetensors import SafetensorError

        try:
            model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, **kwargs)
        except (OSError, SafetensorError) as error:  # a truncated or half-copied model folder
            raise EvaluationError(f"{model_dir}: its weights cannot be loaded ({first_line(error)[:400]})") from None
    else:
        with modeling.no_init_warnings():
            model = modeling.empty_model(modeling.read_config(model_dir))
        modeling.materialize(model, device)
        modeling.init_random(model, seed)
    return model.eval()


LOSS_CHUNK_TOKENS = 512  # positions whose logits are cast to fp32 at once (bounds the loss's memory)


def mean_loss(model, blocks, batch_size: int, device) -> tuple[float, int]:
    """Token-weighted mean next-token cross-entropy over `blocks` (in stream order) and the token count: over
    the trained targets of instruction data (its answers), attending within each packed example as in training.

    Memory: the forward keeps no KV cache (use_cache=False) and returns logits in the model's dtype (bf16 on
    GPU); they are cast to fp32 LOSS_CHUNK_TOKENS positions at a time, so the loss adds batch x chunk x vocab
    x 4 bytes (1 x 512 x 128,256 x 4 = 263 MB for Llama 3) instead of a full fp32 copy and its log-softmax
    (batch 4 x 2048 x 128,256 x 4 = 4.2 GB each, which does not fit beside an 8B model on a 24 GB A10G)."""
    import torch

    import modeling

    total, tokens = 0.0, 0
    with torch.no_grad():
        for first in range(0, blocks.num_blocks, batch_size):
            count = min(batch_size, blocks.num_blocks - first)
            batch, trained, positions = blocks.read_blocks(
                [blocks.first_block + i for i in range(first, first + count)])
            batch = batch.to(device)
            inputs = {"input_ids": batch[:, :-1], "use_cache": False}
            if positions is not None:  # packed instruction examples: each attends only within itself
                positions = positions.to(device)
                inputs.update(position_ids=positions, attention_mask=modeling.packed_attention_mask(
                    positions, next(model.parameters()).dtype))
            logits = model(**inputs).logits
            labels = batch[:, 1:].to(logits.device)
            weights = trained.to(logits.device) if trained is not None else torch.ones_like(labels, dtype=torch.bool)
            for at in range(0, labels.size(1), LOSS_CHUNK_TOKENS):
                chunk = logits[:, at:at + LOSS_CHUNK_TOKENS].float()
                losses = torch.nn.functional.cross_entropy(chunk.reshape(-1, chunk.size(-1)),
                                                           labels[:, at:at + LOSS_CHUNK_TOKENS].reshape(-1),
                                                           reduction="none")
                total += float((losses * weights[:, at:at + LOSS_CHUNK_TOKENS].reshape(-1)).sum())
                del chunk, losses
            tokens += int(weights.sum())  # the trained targets only (all of them for text)
            del logits
    if not tokens:
        raise EvaluationError("the evaluated data has no trained tokens (every example's answer was cut or empty)")
    return total / tokens, tokens


def evaluate(args: argparse.Namespace) -> dict:
    import torch

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    blocks, source = evaluation_blocks(args.data_dir, args.base_model_dir, args.sequence_length,
                                       args.holdout_fraction, args.max_sequences, args.seed)
    metrics, tokens = {}, 0
    for name, folder in (("base", args.base_model_dir), ("fine_tuned", args.model_dir)):
        started = time.perf_counter()
        model = load_model(folder, args.seed, device)
        loss, tokens = mean_loss(model, blocks, args.batch_size, device)
        del model
        if not math.isfinite(loss):
            raise EvaluationError(f"the {name.replace('_', '-')} model ({folder}): validation loss is {loss}; it "
                                  "cannot be compared (a diverged run?)")
        metrics[name] = {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}
        print(f"[evaluate] {name}: loss {loss:.6f} perplexity {metrics[name]['perplexity']:.4f} over {tokens} tokens "
              f"in {time.perf_counter() - started:.1f} s", flush=True)
    return {"metrics": metrics, "improvement": metrics["base"]["loss"] - metrics["fine_tuned"]["loss"],
            "sequences": blocks.num_blocks, "tokens": tokens, "sequence_length": args.sequence_length,
            "data": {"source": source, "fingerprint": args.data_fingerprint}, "base_model": args.base_model_uri}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--base_model_dir", required=True, help="the model training started from")
    parser.add_argument("--model_dir", required=True, help="the fine-tuned model (the training job's output)")
    parser.add_argument("--data_dir", required=True, help="validation data, or the training data with --holdout_fraction")
    parser.add_argument("--sequence_length", type=int, required=True, help="tokens per sequence, as in training")
    parser.add_argument("--holdout_fraction", type=float, default=0.0,
                        help="evaluate the last blocks the trainer held out of --data_dir (its validation_holdout_fraction)")
    parser.add_argument("--max_sequences", type=int, default=0, help="at most this many sequences (0: all)")
    parser.add_argument("--batch_size", type=int, default=1, help="sequences per forward (memory: see mean_loss)")
    parser.add_argument("--seed", type=int, default=1234, help="the trainer's seed (random init of a base without weights)")
    parser.add_argument("--data_fingerprint", default="unlisted", help="recorded in the report")
    parser.add_argument("--base_model_uri", default="", help="where the base model came from, recorded in the report")
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)
    from modeling import ModelError
    from tokens import DataError

    message, report = None, None
    try:
        for name in ("sequence_length", "batch_size"):
            if getattr(args, name) < 1:
                raise EvaluationError(f"{name}={getattr(args, name)}: must be at least 1")
        if not 0.0 <= args.holdout_fraction <= 0.5 or args.max_sequences < 0:
            raise EvaluationError(f"holdout_fraction={args.holdout_fraction}, max_sequences={args.max_sequences}: "
                                  "the fraction must be from 0 to 0.5 and the count at least 0")
        report = evaluate(args)
    except (EvaluationError, DataError, ModelError) as error:
        message = f"error: {error}"
    except RuntimeError as error:  # torch.OutOfMemoryError is one; so are CUDA and shape errors
        first = first_line(error)
        if "out of memory" in str(error).lower():
            message = (f"error: out of memory evaluating with batch_size={args.batch_size}, sequence_length="
                       f"{args.sequence_length}: use an evaluation_instance_type with more GPU memory ({first[:300]})")
        else:
            message = f"error: the evaluation failed: {type(error).__name__}: {first[:600]}"
    except OSError as error:  # an unreadable model folder (from_pretrained), a full disk
        message = f"error: {first_line(error)}"[:900]
    if report is None:
        print(message, file=sys.stderr)
        if EXIT_MESSAGE.parent.is_dir():
            EXIT_MESSAGE.write_text(message[:1024], encoding="utf-8")
        return 1
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT).write_text(json.dumps(report, indent=1))
    print(f"[evaluate] improvement {report['improvement']:.6f} (base loss - fine-tuned loss); wrote {out / REPORT}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
