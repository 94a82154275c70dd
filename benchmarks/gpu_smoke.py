"""One-GPU smoke check: bf16 fine-tuning steps of a ~1B-parameter random Llama-shaped model for about a
minute, printing tokens/s and model FLOPs utilisation, then a DCP save/load round trip with its timings.

    python benchmarks/gpu_smoke.py [--seconds 60] [--peak-tflops 989]

MFU = 6 * parameters * tokens/s / peak bf16 FLOP/s (dense; H100/H200 SXM: 989 TFLOP/s, NVIDIA datasheet).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))
import modeling  # noqa: E402  (the trainer's loss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--sequence", type=int, default=2048)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device; this check needs one GPU")
    device = torch.device("cuda")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5504, num_hidden_layers=16,
                         num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=args.sequence)
    model = LlamaForCausalLM(config).to(device)
    parameters = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    batch = torch.randint(0, config.vocab_size, (args.batch, args.sequence + 1), device=device)
    print(f"device {torch.cuda.get_device_name()}, model {parameters / 1e9:.2f}B parameters, "
          f"batch {args.batch} x {args.sequence} tokens, torch {torch.__version__}")

    def step() -> float:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(input_ids=batch[:, :-1]).logits
        loss = modeling.next_token_loss(logits, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(3):
        step()  # warm-up: kernels, allocator
    torch.cuda.synchronize()
    steps, started = 0, time.perf_counter()
    while time.perf_counter() - started < args.seconds:
        loss = step()
        steps += 1
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    tokens_per_second = steps * args.batch * args.sequence / elapsed
    mfu = 6 * parameters * tokens_per_second / (args.peak_tflops * 1e12)
    print(f"{steps} steps in {elapsed:.1f} s, last loss {loss:.4f}: {tokens_per_second:,.0f} tokens/s, "
          f"MFU {mfu:.1%} of {args.peak_tflops:.0f} TFLOP/s")

    folder = tempfile.mkdtemp(prefix="dcp-smoke-")
    state = {"model": model.state_dict(), "optim": optimizer.state_dict()}
    torch.cuda.synchronize()
    started = time.perf_counter()
    dcp.save(state, checkpoint_id=folder, no_dist=True)
    saved = time.perf_counter() - started
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)) / 2**30
    reference = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for p in model.parameters():
        p.data.zero_()
    started = time.perf_counter()
    dcp.load(state, checkpoint_id=folder, no_dist=True)
    model.load_state_dict(state["model"])
    torch.cuda.synchronize()
    loaded = time.perf_counter() - started
    exact = all(torch.equal(reference[k], v) for k, v in model.state_dict().items())
    print(f"DCP round trip: {size:.2f} GiB saved in {saved:.1f} s ({size / saved:.2f} GiB/s), "
          f"loaded in {loaded:.1f} s ({size / loaded:.2f} GiB/s), parameters identical: {exact}")
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
