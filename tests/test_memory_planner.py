"""The memory planner (trainer/memory.py) behind strategy=auto, `spot-training size --parameters/--model-config`
and the synth check of training.model_parameters: its formula against known points and against the real
Hugging Face models' parameter counts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from spot_training.config import TrainingConfig
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
    assert finding.startswith("TrainingConfig.model_parameters=8000000000: needs ") and "strategy ddp on 2 x " \
        "ml.p4d.24xlarge (40 GiB GPUs, 90% usable)" in finding
    assert finding in config.guardrail_findings()
    fitting = TrainingConfig(model_parameters=8_000_000_000, instance_type="ml.p5.48xlarge", per_device_batch_size=1)
    assert fitting.memory_findings() == []  # auto -> fsdp with activation checkpointing fits
    assert TrainingConfig(model_parameters=0).memory_findings() == []
    assert TrainingConfig(model_parameters=8_000_000_000, guardrails="off", strategy="ddp").guardrail_findings() == []


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
    assert [(r[0], r[2], r[-1]) for r in rows] == [("ml.p4d.24xlarge", "ddp", "NO"), ("ml.p4d.24xlarge", "fsdp", "yes"),
                                                    ("ml.p5.48xlarge", "ddp", "NO"), ("ml.p5.48xlarge", "fsdp", "yes")]
    assert rows[0][3:6] == ["29.9", "29.9", "59.8"]  # 4 + 4 + 8 bytes x 8.03e9 parameters, in GiB
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
