"""The memory planner (trainer/memory.py) behind strategy=auto, `spot-training size --parameters/--model-config`
and the synth check of training.model_parameters: its formula against known points and against the real
Hugging Face models' parameter counts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from spot_training.config import sizing
from spot_training.config.settings import TrainingConfig
from spot_training.trainer import memory
from tests.conftest import ROOT

GB = 10**9
LLAMA3_8B = {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": False,
             "model_type": "llama", "max_position_embeddings": 8192, "rope_theta": 500000.0}


@pytest.mark.parametrize("name, count", [("1B", 1_235_814_400), ("3B", 3_212_749_824), ("8B", 8_030_261_248),
                                         ("70B", 70_553_706_496)])
def test_llama3_parameter_counts_are_the_published_ones(name, count):
    assert memory.LLAMA3[name].parameters == count


def test_the_planner_counts_what_hugging_face_builds(tmp_path):
    """The same configs on the meta device (no memory): Llama 3 8B and a GPT-2 with tied embeddings."""
    sys.path.insert(0, str(ROOT / "trainer"))
    import modeling
    from transformers import GPT2Config, LlamaConfig

    for config in (LlamaConfig(**LLAMA3_8B), GPT2Config(n_embd=256, n_layer=3, n_head=4, vocab_size=1000, n_positions=128)):
        with modeling.no_init_warnings():
            model = modeling.empty_model(config)
        shape = memory.ModelShape.from_config(config.to_dict())
        # GPT-2 adds biases and learned positions the Llama-shaped formula leaves out: within 3% there.
        assert shape.parameters == pytest.approx(modeling.parameter_count(model), rel=0 if config.model_type ==
                                                 "llama" else 0.03)


def test_the_lora_formula_counts_the_adapters_peft_injects():
    """LoRA on all-linear, on the meta device: Llama 3 8B (r 16) and a GPT-2 (r 8), the formula against peft."""
    sys.path.insert(0, str(ROOT / "trainer"))
    import lora
    import modeling
    from transformers import GPT2Config, LlamaConfig

    for config, rank in ((LlamaConfig(**LLAMA3_8B), 16),
                         (GPT2Config(n_embd=256, n_layer=3, n_head=4, vocab_size=1000, n_positions=128), 8)):
        with modeling.no_init_warnings():
            model = modeling.empty_model(config)
        lora.inject(model, lora.config(rank, 2.0 * rank, 0.0, "all-linear"))
        injected = sum(p.numel() for name, p in model.named_parameters() if lora.is_adapter(name))
        assert memory.ModelShape.from_config(config.to_dict()).lora_parameters(rank) == injected
        assert all(p.requires_grad == lora.is_adapter(name) for name, p in model.named_parameters())
    assert memory.LLAMA3["8B"].lora_parameters(16) == 41_943_040  # 0.52% of 8.03 B


def test_lora_keeps_the_frozen_base_and_trains_state_for_the_adapters_only():
    """8B with LoRA r 16: the fp32 base stays (4 bytes per parameter plus the adapters'), gradients and AdamW
    moments exist for the adapters only, and no head or embedding gradient is made: the DDP plan drops from 208
    to 117 GiB on p4d, the FSDP plan per GPU from 28.2 to 22.6 GiB (the same as `size --method lora` prints)."""
    shape, adapters = memory.LLAMA3["8B"], memory.LLAMA3["8B"].lora_parameters(16)
    kwargs = dict(world_size=16, batch=4, sequence_length=2048, activation_checkpointing=False, accumulation=8)
    full, lora_ddp = (memory.plan(shape, strategy="ddp", lora_parameters=n, **kwargs) for n in (0, adapters))
    assert lora_ddp.parameters == 4 * (shape.parameters + adapters)
    assert (lora_ddp.gradients, lora_ddp.optimizer) == (4 * adapters, 8 * adapters)
    assert full.total - lora_ddp.total > 90 * memory.GIB
    fsdp = memory.plan(shape, strategy="fsdp", lora_parameters=adapters, **{**kwargs, "activation_checkpointing": True})
    assert fsdp.optimizer == 8 * -(-adapters // 16)
    # The sizing: a checkpoint holds 12 bytes per trained parameter, and a restart reads the bf16 base again.
    lora = sizing.Workload(model_parameters=shape.parameters, trained_parameters=adapters)
    full_run = sizing.Workload(model_parameters=shape.parameters)
    assert (lora.checkpoint_bytes, full_run.checkpoint_bytes) == (12 * adapters, 12 * shape.parameters)
    assert lora.base_read_bytes == 2 * shape.parameters and full_run.base_read_bytes == 0
    assert lora.restart_minutes < full_run.restart_minutes - 2


def test_an_8b_full_fine_tune_holds_16_bytes_per_parameter_of_state_under_ddp_and_a_share_under_fsdp():
    shape = memory.ModelShape.from_config(LLAMA3_8B)
    ddp = memory.plan(shape, strategy="ddp", world_size=16, batch=1, sequence_length=2048,
                      activation_checkpointing=False)
    assert ddp.state == 16 * 8_030_261_248 and round(ddp.state / GB, 1) == 128.5
    assert (ddp.parameters, ddp.gradients, ddp.optimizer) == (4 * 8_030_261_248, 4 * 8_030_261_248, 8 * 8_030_261_248)
    fsdp = memory.plan(shape, strategy="fsdp", world_size=16, batch=1, sequence_length=2048,
                       activation_checkpointing=False)
    assert fsdp.state == pytest.approx(ddp.state / 16, abs=16)


def test_activation_checkpointing_keeps_one_hidden_state_per_layer_instead_of_every_activation():
    shape = memory.LLAMA3["8B"]
    common = {"strategy": "fsdp", "world_size": 16, "batch": 4, "sequence_length": 2048}
    off = memory.plan(shape, activation_checkpointing=False, **common).activations
    on = memory.plan(shape, activation_checkpointing=True, **common).activations
    # 8192 tokens x 32 layers x (2 x 4096 bytes) kept, plus two layers' full activations while one recomputes.
    assert on == 8192 * (32 * 2 * 4096 + 2 * (2 * (8 * 4096 + 2 * 4096) + 2 * (5 * 4096 + 4 * 14336)))
    assert off > 8 * on


@pytest.mark.parametrize("name, gpu_gib, gpus, expected", [
    ("1B", 80, 16, "ddp"),    # 20 GB of state fits an H100
    ("8B", 40, 16, "fsdp"),   # 128 GB does not fit an A100 40 GB
    ("8B", 141, 16, "fsdp"),  # nor an H200
    ("8B", 141, 1, "ddp"),    # one GPU: nothing to shard across
])
def test_auto_picks_ddp_when_the_whole_state_fits_else_fsdp(name, gpu_gib, gpus, expected):
    assert memory.choose_strategy(memory.LLAMA3[name], world_size=gpus, batch=1, sequence_length=2048, bf16=True,
                                  gpu_bytes=gpu_gib * 2**30) == expected


def test_a_parameter_count_alone_gets_the_nearest_llama3_shape_with_the_layers_scaled():
    shape = memory.ModelShape.from_parameters(13_000_000_000)
    assert (shape.hidden_size, shape.vocab_size) == (4096, 128256)
    assert shape.parameters == pytest.approx(13e9, rel=0.02)
    with pytest.raises(memory.PlanError, match=r"^parameters=5: must be an integer of at least 1,000,000$"):
        memory.ModelShape.from_parameters(5)


def test_synth_warns_or_refuses_a_default_that_cannot_fit():
    config = TrainingConfig(model_parameters=8_000_000_000, instance_type="ml.p4d.24xlarge", strategy="ddp")
    (finding,) = config.memory_findings()
    assert finding.startswith("TrainingConfig.model_parameters=8000000000: on 2 x ml.p4d.24xlarge needs ")
    assert "(strategy ddp, batch 4 x 2048 tokens, 16 GPUs) of 40.0 GiB, 90% usable; settings that fit: " \
        "strategy=fsdp (" in finding and "\n" not in finding
    assert finding in config.guardrail_findings()
    # The defaults (2 x ml.p4d.24xlarge, strategy auto -> fsdp, batch 4 x 2048, 8 micro-steps) fit Llama 3 8B.
    assert TrainingConfig(model_parameters=8_030_261_248).memory_findings() == []
    assert TrainingConfig(model_parameters=0).memory_findings() == []
    assert TrainingConfig(model_parameters=8_000_000_000, guardrails="off", strategy="ddp").guardrail_findings() == []


def test_a_plan_that_does_not_fit_names_the_settings_that_would():
    common = {"gpus_per_instance": 8, "sequence_length": 2048, "activation_checkpointing": "auto", "bf16": True,
              "accumulation": 8, "gpu_bytes": 40 * 2**30}
    assert memory.fit_error(memory.LLAMA3["8B"], strategy="fsdp", world_size=16, batch=4, **common) is None
    longer = memory.fit_error(memory.LLAMA3["8B"], strategy="fsdp", world_size=16, batch=16, **common)
    assert longer.startswith("needs ") and "settings that fit: per_device_batch_size=4 (" in longer
    # 70B on 2 x p4d: no single change fits, a smaller batch on more instances does.
    big = memory.fit_error(memory.LLAMA3["70B"], strategy="fsdp", world_size=16, batch=4, **common)
    assert "settings that fit: per_device_batch_size=2 with instance_count=8 (" in big
    huge = memory.fit_error(memory.LLAMA3["70B"], strategy="fsdp", world_size=16, batch=4,
                            **{**common, "gpu_bytes": 4 * 2**30})
    assert huge.endswith("no change of batch, sequence length, strategy or instance count fits: a GPU with more "
                         "memory is needed")


def test_accumulating_gradients_adds_one_gradient_shard_not_a_whole_model():
    """Sharded accumulation (trainer/loop.py): the earlier micro-steps' gradients are held as shards."""
    common = {"strategy": "fsdp", "world_size": 16, "batch": 1, "sequence_length": 2048,
              "activation_checkpointing": True}
    one = memory.plan(memory.LLAMA3["8B"], accumulation=1, **common)
    eight = memory.plan(memory.LLAMA3["8B"], accumulation=8, **common)
    assert eight.total - one.total <= one.gradients  # at most 4 bytes x P / 16 more


def test_the_plan_matches_the_memory_the_trainer_really_holds(tmp_path):
    """benchmarks/planner.py at small scale: the trainer on 1-2 CPU processes (DDP, FSDP with accumulation and
    activation checkpointing, FSDP with long sequences), per-rank peak resident memory during training against
    the planner's figure for the same run: within 15%."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import planner

    copies = planner.collective_copies()
    errors = {}
    for name in planner.SUITE:
        work = tmp_path / name
        try:
            result = planner.measure(planner.CASES[name], work, copies)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(planner.report(result))
        errors[name] = result.error
        # What the sizing model's restart time downloads per checkpoint: 12 bytes per parameter.
        assert result.checkpoint_bytes_per_parameter == pytest.approx(sizing.CHECKPOINT_BYTES_PER_PARAMETER,
                                                                      rel=0.01)
    assert all(abs(error) <= 0.15 for error in errors.values()), errors


def test_the_trainer_stops_before_reading_weights_when_the_plan_does_not_fit(tmp_path):
    from spot_training.local.tiny import make_job
    from tests.trainer.harness import Run

    run = Run(make_job(tmp_path / "job"), tmp_path / "run", gpu_memory_gib=0.0001, strategy="ddp")
    process = run.start(nproc=2)
    out, _ = process.communicate(timeout=240)
    assert process.returncode != 0
    (line,) = [line for line in out.splitlines() if line.startswith("error: ")]
    assert line.startswith("error: the model does not fit GPU memory: needs ") and "GPUs) of 0.0 GiB" in line
    # torchrun prints a traceback of its own (ChildFailedError) when a rank exits non-zero; none of ours.
    assert not any(name in out for name in ("memory.py", "loop.py", "train.py\", line"))
    assert "[start]" not in out and "[model]" not in out and not (tmp_path / "run" / "checkpoints").exists()


def _size(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / ".venv" / "bin" / "spot-training"), "size", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_size_prints_memory_per_gpu_for_each_instance_type_and_strategy(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(LLAMA3_8B))
    done = _size("--model-config", str(config), "--memory-instance-type", "ml.p4d.24xlarge",
                 "--memory-instance-type", "ml.p5.48xlarge", "--batch", "1")
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith("ml.")]
    assert [(r[0], r[2], r[10]) for r in rows] == [("ml.p4d.24xlarge", "ddp", "NO"), ("ml.p4d.24xlarge", "fsdp", "yes"),
                                                    ("ml.p5.48xlarge", "ddp", "NO"), ("ml.p5.48xlarge", "fsdp", "yes")]
    assert rows[0][3:6] == ["29.9", "59.8", "29.9"]  # 4 + 8 + 4 bytes x 8.03e9 parameters, in GiB
    assert "8,030,261,248 parameters" in done.stdout


@pytest.mark.parametrize("args, message", [
    (["--parameters", "lots"], "argument --parameters: 'lots': a parameter count such as 8B, 8e9 or 8030261248"),
    (["--parameters", "10"], "argument --parameters: '10': must be from 1M to 10T parameters"),
    (["--model-config", "/nonexistent/config.json"], "error: --model-config=/nonexistent/config.json: not a "
                                                     "readable JSON file"),
])
def test_size_refuses_a_bad_model_in_one_line(args, message):
    done = _size(*args)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def test_the_readme_table_is_what_size_prints():
    done = _size("--parameters", "8030261248", "--instance-count", "2", "--batch", "1",
                 "--memory-instance-type", "ml.p4d.24xlarge", "--memory-instance-type", "ml.p4de.24xlarge",
                 "--memory-instance-type", "ml.p5.48xlarge", "--memory-instance-type", "ml.p5e.48xlarge")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() in (ROOT / "README.md").read_text()
