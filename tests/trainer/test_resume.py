"""Spot-interruption recovery on CPU: torchrun with 2 gloo processes, a tiny random GPT-2, synthetic data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests.trainer.harness import SLOW_IO, Run, same_parameters
from spot_training.local.tiny import make_job, make_llama_model_dir

# Checkpoints written by the trainer before the sharded start (commit 23397ad, torch 2.8.0, 2 ranks, TINY_RUN with
# max_steps=8), on another machine: step-4, the run's final model and its metrics. Loading them is exact anywhere;
# training on from them is compared within a tolerance (floating-point results differ between CPU generations).
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    return make_job(tmp_path_factory.mktemp("job"))


@pytest.fixture(scope="module")
def baseline(job, tmp_path_factory):
    """An uninterrupted run: the reference every interrupted run must reproduce bit for bit. It runs in
    deterministic mode (strict deterministic kernels) and the others do not: on CPU the mode changes no result,
    so every bit-exact comparison with it also proves that."""
    run = Run(job, tmp_path_factory.mktemp("baseline"), deterministic="true")
    run.run()
    return run


def test_uninterrupted_run_trains_and_writes_a_hugging_face_model(baseline):
    losses = baseline.losses()
    assert sorted(losses) == list(range(1, 17))
    assert losses[16] < losses[1]
    assert (baseline.outputs["output_model_dir"] / "model.safetensors").is_file()
    assert (baseline.outputs["output_model_dir"] / "tokenizer.json").is_file()
    assert not any(p.name.startswith("step-") for p in baseline.outputs["output_model_dir"].iterdir())
    assert "[determinism] on: CUBLAS_WORKSPACE_CONFIG=:4096:8, torch.use_deterministic_algorithms(True)" in \
        baseline.logs[0]


def test_two_interruptions_one_during_a_checkpoint_write(job, baseline, tmp_path):
    """Killed at step k (every rank at once, as a reclaimed instance), resumed, killed again in the middle of a
    checkpoint write, resumed: the same losses and parameters as the uninterrupted run."""
    run = Run(job, tmp_path)
    run.kill_at_step(run.start(), 6)
    assert 6 <= run.last_step() < 16
    flag = tmp_path / "writing"
    slow = {"PYTHONPATH": str(SLOW_IO), "SLOW_CHECKPOINT_FLAG": str(flag), "SLOW_CHECKPOINT_SECONDS": "3"}
    process = run.start(env=slow)
    run.kill_when(process, flag.exists)
    assert [r for r in run.resumed_from() if r is not None][0] in (4, 8, 12)  # the newest complete at the kill
    interrupted = run.checkpoints()[-1]
    assert not (run.outputs["checkpoint_dir"] / interrupted / "COMPLETE.json").exists(), "killed mid-write"
    final = run.run()
    assert f"skipping checkpoint {run.outputs['checkpoint_dir'] / interrupted}: no completion marker" in final
    assert run.losses() == baseline.losses()
    assert same_parameters(run.parameters(), baseline.parameters())


def test_damaged_newest_checkpoints_are_skipped_for_the_previous_complete_one(job, baseline, tmp_path):
    """A truncated newest checkpoint and a corrupted one before it (a partial upload, a stale restore): both are
    skipped, each with its reason, for the one before. (A missing completion marker: the mid-write kill above.)"""
    run = Run(job, tmp_path, max_steps=18)
    shutil.copytree(baseline.outputs["checkpoint_dir"], run.outputs["checkpoint_dir"])
    truncated = run.outputs["checkpoint_dir"] / "step-16" / "__1_0.distcp"
    truncated.write_bytes(truncated.read_bytes()[:-100])
    corrupted = run.outputs["checkpoint_dir"] / "step-12" / "__0_0.distcp"
    data = bytearray(corrupted.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = bytes(64)
    corrupted.write_bytes(bytes(data))
    out = run.run()
    assert f"skipping checkpoint {run.outputs['checkpoint_dir'] / 'step-16'}: __1_0.distcp has" in out
    assert (f"skipping checkpoint {run.outputs['checkpoint_dir'] / 'step-12'}: __0_0.distcp fails its CRC-32 check "
            "(corrupted)") in out
    assert run.resumed_from()[0] == 8
    assert sorted(run.losses()) == list(range(9, 19))


def test_checkpoint_resumes_on_a_different_world_size_both_ways(job, baseline, tmp_path):
    run = Run(job, tmp_path, max_steps=18)
    shutil.copytree(baseline.outputs["checkpoint_dir"], run.outputs["checkpoint_dir"])
    shrunk = run.run(nproc=1)  # written by 2 processes, resumed by 1
    assert "world size 1" in shrunk and "resuming at step 16" in shrunk
    assert run.resumed_from()[-1] == 16 and run.last_step() == 18
    grown = run.run(nproc=2, max_steps=20)  # written by 1 process, resumed by 2
    assert "world size 2" in grown and "resuming at step 18" in grown
    assert run.resumed_from()[-1] == 18 and run.last_step() == 20


def test_keep_last_k_keeps_the_newest_complete_checkpoints(baseline):
    assert baseline.checkpoints() == ["step-8", "step-12", "step-16"]


def test_fsdp_resumes_bit_exactly_too(job, tmp_path_factory):
    """On the sharded start with real weights: a tiny Llama (bf16 safetensors, tied embeddings, rotary tables)
    read into FSDP2 shards, activation checkpointing on (auto with fsdp)."""
    llama = {**job, "model_dir": make_llama_model_dir(tmp_path_factory.mktemp("llama"), tokenizer_dir=job["model_dir"])}
    reference = Run(llama, tmp_path_factory.mktemp("fsdp-ref"), strategy="fsdp", max_steps=12)
    out = reference.run()
    assert "strategy fsdp (set), activation checkpointing on, fp32, weights from 1 safetensors file(s)" in out
    run = Run(llama, tmp_path_factory.mktemp("fsdp-killed"), strategy="fsdp", max_steps=12)
    run.kill_at_step(run.start(), 6)
    assert run.last_step() < 12
    resumed = run.run()
    assert run.losses() == reference.losses()
    assert same_parameters(run.parameters(), reference.parameters())
    # The checkpoint overwrites every parameter: the restart did not read the base weights first.
    assert "weights from the checkpoint (the 1 base safetensors file(s) are not read)" in resumed
    _served_as_the_base_is(run.outputs["output_model_dir"], llama["model_dir"])

    # Every checkpoint damaged: nothing loads, so the base weights are read after all and the run starts over.
    fallback = Run(llama, tmp_path_factory.mktemp("fsdp-damaged"), strategy="fsdp", max_steps=12)
    shutil.copytree(reference.outputs["checkpoint_dir"], fallback.outputs["checkpoint_dir"])
    for shard in fallback.outputs["checkpoint_dir"].glob("step-*/__0_0.distcp"):
        shard.write_bytes(bytes(len(shard.read_bytes())))
    out = fallback.run()
    assert "no checkpoint could be loaded: reading the base weights now" in out
    assert fallback.losses() == reference.losses()


def _served_as_the_base_is(exported: Path, base: Path) -> None:
    """The exported folder loads with from_pretrained and generates as the base model does: with its KV cache
    (activation checkpointing turned use_cache off on the live config only) and its generation config."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    assert json.loads((exported / "config.json").read_text())["use_cache"] is True
    assert GenerationConfig.from_pretrained(exported).to_dict() == GenerationConfig.from_pretrained(base).to_dict()
    model = AutoModelForCausalLM.from_pretrained(exported)
    prompt = torch.tensor([[1, 5, 9]])
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=True)
        uncached = model.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=False)
    assert model.generation_config.use_cache is not False and torch.equal(cached, uncached)


def _previous_losses(fixture: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (fixture / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _saved_model_state(step_dir: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """The model tensors of a DCP checkpoint, read by DCP's own converter (no trainer code involved)."""
    target = tmp_path / "converted.pt"
    dcp_to_torch_save(str(step_dir), str(target))
    return torch.load(target, weights_only=False)["model"]


@pytest.mark.parametrize("fixture, strategy", [("checkpoint_v1", "ddp"), ("checkpoint_v1_fsdp", "fsdp")])
def test_a_checkpoint_of_the_previous_layout_loads_exactly_and_training_continues(job, tmp_path, fixture, strategy):
    """Loading is exact on any machine: the model the trainer exports right after resuming (max_steps = the
    checkpoint's step, so no step runs) holds the saved bytes. Training on from it is arithmetic, whose last bits
    differ between CPU generations (AVX-512/AMX or not), so the continued losses are compared with what the
    previous trainer wrote on another machine within a tolerance, never bit for bit."""
    saved = FIXTURES / fixture
    run = Run(job, tmp_path / "run", max_steps=4, strategy=strategy)
    shutil.copytree(saved / "step-4", run.outputs["checkpoint_dir"] / "step-4")
    out = run.run(nproc=1)  # written by 2 ranks, read by 1: the bytes do not depend on the sharding
    assert "resuming at step 4 of 4, world size 1" in out
    loaded, written = run.parameters(), _saved_model_state(saved / "step-4", tmp_path)
    assert loaded and set(loaded) <= set(written)
    assert [k for k in loaded if not torch.equal(loaded[k], written[k])] == []
    # The previous FSDP export also wrote the tied head; the new one leaves it out, as save_pretrained does.
    assert set(written) - set(loaded) <= {"lm_head.weight"}

    run.run(max_steps=8)
    assert run.resumed_from() == [4, 4, 4, 4]
    before, now = _previous_losses(saved), run.losses()
    assert sorted(now) == [5, 6, 7, 8]
    assert all(now[step] == pytest.approx(before[step], rel=1e-4) for step in now), (now, before)
    final, then = run.parameters(), load_file(saved / "final-model.safetensors")
    assert all(torch.allclose(final[k], then[k], rtol=1e-3, atol=1e-4) for k in final)
    assert any(not torch.equal(final[k], written[k]) for k in final)  # it trained on from the checkpoint


def test_a_checkpoint_of_an_unknown_layout_stops_the_job_in_one_line(job, tmp_path):
    run = Run(job, tmp_path, max_steps=8)
    step = run.outputs["checkpoint_dir"] / "step-4"
    shutil.copytree(FIXTURES / "checkpoint_v1" / "step-4", step)
    marker = json.loads((step / "COMPLETE.json").read_text())
    (step / "COMPLETE.json").write_text(json.dumps({**marker, "layout": 2}))
    process = run.start(nproc=1)  # the marker is read before any rank loads: one rank shows it
    out, _ = process.communicate(timeout=240)
    assert process.returncode != 0
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {step}: checkpoint layout 2, this trainer reads layout 1; resume with the trainer "
                      "version that wrote it, or start a new run (new checkpoint prefix)"]
    assert not (tmp_path / "model").exists() and run.last_step() == 0
