"""The sharded start (trainer/modeling.py) on the image's torch: weights read into FSDP2 shards exactly as
from_pretrained reads them, no rank holding the whole model, random init independent of rank count and
strategy, the export in Hugging Face files, and bad model folders refused in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from spot_training.local.processes import free_port
from spot_training.local.tiny import make_job, make_llama_model_dir
from tests.trainer.harness import ROOT, TRAIN

SCRIPT = Path(__file__).resolve().parent / "sharded_start.py"
sys.path.insert(0, str(ROOT / "trainer"))
import modeling  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    job = make_job(root / "job", documents=60)
    return {"random": job["model_dir"],
            "tied": make_llama_model_dir(root / "tied", tokenizer_dir=job["model_dir"]),
            "untied": make_llama_model_dir(root / "untied", tokenizer_dir=job["model_dir"], tied=False,
                                           max_shard_size="20KB")}


def _start(model_dir: Path, strategy: str, nproc: int, out: Path, max_file_bytes: int = 10**9):
    out.mkdir(parents=True)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                           f"--master_port={free_port()}", str(SCRIPT), str(model_dir), strategy, str(out),
                           str(max_file_bytes)], capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]
    return reports, torch.load(out / "full.pt")


def _from_pretrained(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)


@pytest.mark.parametrize("name", ["tied", "untied"])
def test_fsdp_reads_the_weights_into_the_shards_exactly_as_from_pretrained(models, name, tmp_path):
    reports, full = _start(models[name], "fsdp", 2, tmp_path / "run", max_file_bytes=30_000)
    reference = _from_pretrained(models[name])
    expected = reference.state_dict()
    assert full.keys() == expected.keys()
    assert all(torch.equal(full[k], expected[k]) for k in expected), "a loaded shard differs from from_pretrained"
    total = reports[0]["total"]
    assert all(r["held"] <= total / 2 + 64 for r in reports), [r["held"] for r in reports]  # each rank: its half
    assert all(r["tied"] == (name == "tied") for r in reports)
    rotary = {k: v for k, v in reference.named_buffers()}
    assert all(torch.equal(torch.tensor(reports[0]["buffers"][k]), rotary[k]) for k in rotary)  # rotary tables
    # The export: Hugging Face files in pieces (an index when more than one), readable by from_pretrained.
    export = tmp_path / "run" / "export"
    files = reports[0]["files"]
    assert len(files) > 1 and (export / "model.safetensors.index.json").is_file()
    written = {k: v for f in files for k, v in load_file(export / f).items()}
    assert all(v.dtype == torch.bfloat16 for v in written.values())  # the base model's dtype
    assert all(torch.equal(written[k].float(), full[k]) for k in written)
    assert set(full) - set(written) == ({"lm_head.weight"} if name == "tied" else set())


def test_random_init_is_the_same_on_any_rank_count_and_strategy(models, tmp_path):
    """FSDP on 2 ranks (each initialising its shards) against the whole model initialised in this process, as
    DDP does on any rank: the same weights, bit for bit."""
    import torch.distributed

    _, sharded = _start(models["random"], "fsdp", 2, tmp_path / "fsdp2")
    config = modeling.read_config(str(models["random"]))
    with modeling.no_init_warnings():
        model = modeling.empty_model(config)
    modeling.materialize(model, torch.device("cpu"))
    modeling.init_random(model, seed=1234)
    assert not torch.distributed.is_initialized()
    whole = model.state_dict()
    assert sharded.keys() == whole.keys()
    assert all(torch.equal(sharded[k], whole[k]) for k in whole)
    weights = [v for k, v in whole.items() if k.endswith("weight") and v.dim() == 2]
    assert all(0.01 < float(w.std()) < 0.03 for w in weights)  # initializer_range 0.02, not zeros or garbage


def test_a_folder_with_only_pytorch_pickles_is_refused_in_one_line(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(modeling.ModelError, match=r"^model_dir=.*: holds pytorch_model\*\.bin weights only; the "
                                                  r"trainer reads safetensors"):
        modeling.weight_files(str(tmp_path))


def test_weights_that_do_not_match_the_config_stop_the_job_with_one_line(models, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in models["tied"].iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    weights = load_file(broken / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    job = {"train_dir": models["random"].parent / "train"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1",
                           f"--master_port={free_port()}", str(TRAIN), "--model_dir", str(broken),
                           "--train_dir", str(job["train_dir"]), "--output_model_dir", str(tmp_path / "model"),
                           "--output_data_dir", str(tmp_path / "out"), "--checkpoint_dir", str(tmp_path / "ckpt"),
                           "--strategy", "fsdp", "--max_steps", "1"],
                          capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode != 0
    assert errors == [f"error: model_dir={broken}: the safetensors files lack model.layers.1.mlp.up_proj.weight; "
                      "they do not match config.json"], done.stderr[-2000:]
    # torchrun itself prints a traceback of its own (ChildFailedError) when a rank exits non-zero; none of ours.
    assert not any(name in done.stderr for name in ("modeling.py", "loop.py", "train.py\", line"))


def test_the_gpu_mixed_precision_policy_trains_with_fp32_master_shards(models, tmp_path):
    """What runs on GPU, on CPU: FSDP2 with MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) (bf16
    gathers and compute, no autocast), activation checkpointing; the checkpoint keeps fp32 master weights."""
    from torch.distributed.checkpoint import FileSystemReader

    from tests.trainer.harness import Run

    job = {"model_dir": models["tied"], "train_dir": models["random"].parent / "train",
           "validation_dir": models["random"].parent / "validation"}
    run = Run(job, tmp_path, strategy="fsdp", mixed_precision="bf16", max_steps=4)
    out = run.run()
    assert "strategy fsdp (set), activation checkpointing on, bf16, weights from 1 safetensors file(s)" in out
    losses = run.losses()
    assert len(losses) == 4 and all(0 < v < 20 for v in losses.values())
    metadata = FileSystemReader(str(run.outputs["checkpoint_dir"] / "step-4")).read_metadata()
    dtypes = {k: m.properties.dtype for k, m in metadata.state_dict_metadata.items()
              if k.startswith("model.") and hasattr(m, "properties")}
    assert dtypes and set(dtypes.values()) == {torch.float32}


@pytest.mark.parametrize("name", ["tied", "untied"])
def test_embeddings_and_head_are_fsdp_units_of_their_own_unless_tied(models, name):
    """torchtitan's grouping: the input embeddings alone, the final norm with the head; a tied head stays in
    the root with its embeddings (one parameter cannot be in two units)."""
    with modeling.no_init_warnings():
        model = modeling.empty_model(modeling.read_config(str(models[name])))
    embeddings, head = modeling.edge_units(model)
    if name == "tied":
        assert (embeddings, head) == ([], [])
    else:
        assert embeddings == [model.model.embed_tokens] and head == [model.model.norm, model.lm_head]
