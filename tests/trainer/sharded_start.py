"""Run under torchrun by test_sharded_start.py: build a model the trainer's way (meta device, FSDP2 or whole,
weights read into the shards), then write what a test compares: the gathered parameters, the buffers, how much
of the model this rank holds, and the exported files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "trainer"))
import modeling  # noqa: E402


def main(model_dir: str, strategy: str, out: str, max_file_bytes: int) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    config = modeling.read_config(model_dir)
    with modeling.no_init_warnings():
        model = modeling.empty_model(config)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if strategy == "fsdp":
        model = modeling.shard(model, bf16=False)
    modeling.materialize(model, torch.device("cpu"))
    if modeling.weight_files(model_dir):
        modeling.load_weights(model, model_dir, None)
    else:
        modeling.init_random(model, seed=1234)
    held = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in modeling.unique_parameters(model).values())
    full = {name: (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()
            for name, t in model.state_dict().items()}
    # Every rank writes its share of the files (in parallel, as the first instance's local ranks do).
    files = modeling.export(model, config, f"{out}/export", rank=rank, writers=dist.get_world_size(),
                            max_file_bytes=max_file_bytes)
    model.train()
    batch = torch.arange(2 * 9).reshape(2, 9) % config.vocab_size
    loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
    loss.backward()
    report = {"held": held, "total": modeling.parameter_count(model), "loss": loss.item(), "files": files,
              "tied": model.lm_head.weight is model.get_input_embeddings().weight,
              "buffers": {name: b.tolist() for name, b in model.named_buffers()}}
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))
    if rank == 0:
        torch.save(full, f"{out}/full.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
