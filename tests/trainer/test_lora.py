"""LoRA on chat data: a tiny Llama with real weights, adapters through peft under DDP and FSDP2, checkpoints that
hold only the adapters, bit-exact resume after SIGKILL, and exports that peft and transformers load and generate
with."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from spot_training.local.tiny import conversations, corpus, make_jsonl_channel, make_llama_model_dir, make_model_dir
from tests.trainer.harness import ROOT, SLOW_IO, Run, same_parameters

sys.path.insert(0, str(ROOT / "trainer"))
import prepare  # noqa: E402

LORA = {"method": "lora", "lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.0, "learning_rate": 5e-3,
        "max_steps": 8, "validation_holdout_fraction": 0.05}


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A tiny Llama with real bf16 weights and a chat template, and chat data prepared for it."""
    root = tmp_path_factory.mktemp("lora")
    texts = corpus(200) + [m["content"] for c in conversations(50) for m in c["messages"]]
    tokenizer = make_model_dir(root / "tokenizer", text_corpus=texts, chat=True)
    model = make_llama_model_dir(root / "model", tokenizer_dir=tokenizer)
    prepare.prepare(model, {"train": make_jsonl_channel(root / "chats", conversations(240))}, root / "prepared", None,
                    tokens_per_shard=1024, sequence_length=32)
    return {"model_dir": model, "train_dir": root / "prepared" / "train"}


@pytest.fixture(scope="module")
def reference(job, tmp_path_factory):
    run = Run(job, tmp_path_factory.mktemp("reference"), **LORA)
    run.out = run.run()
    return run


def _tensor_elements(run: Run) -> int:
    """Elements of the model and optimizer tensors of a run's newest checkpoint (AdamW's step counters left out)."""
    step = run.outputs["checkpoint_dir"] / run.complete_checkpoints()[-1]
    stored = FileSystemReader(str(step)).read_metadata().state_dict_metadata
    return sum(m.size.numel() for k, m in stored.items() if hasattr(m, "size") and k.startswith(("model.", "optim."))
               and not k.endswith(".step"))


def _checkpoint_keys(run: Run) -> list[str]:
    step = run.outputs["checkpoint_dir"] / run.complete_checkpoints()[-1]
    return list(FileSystemReader(str(step)).read_metadata().state_dict_metadata)


def test_lora_trains_only_the_adapters_and_checkpoints_only_what_changes(reference):
    assert "[lora] rank 4, alpha 8, dropout 0, modules all-linear:" in reference.out
    losses = reference.losses()
    assert losses[8] < losses[1]
    model_keys = [k for k in _checkpoint_keys(reference) if k.startswith("model.")]
    assert model_keys and all(".lora_A." in k or ".lora_B." in k for k in model_keys)  # no frozen base weight
    # What a checkpoint holds, in elements: 3 per trained parameter (the fp32 weight and AdamW's two moments): the
    # formula the sizing extrapolates from (full fine-tuning's checkpoints against LoRA's, in bytes, on a 98 M model:
    # benchmarks/instructions.py).
    trainable = int(re.search(r"modules all-linear: ([\d,]+) trainable", reference.out).group(1).replace(",", ""))
    assert _tensor_elements(reference) == 3 * trainable
    total = int(re.search(r"\[model\] ([\d,]+) parameters", reference.out).group(1).replace(",", ""))
    assert trainable < total / 4


def test_a_lora_run_killed_mid_save_or_mid_run_resumes_bit_exactly_under_ddp_and_fsdp(job, reference, tmp_path):
    # DDP: killed in the middle of a checkpoint write (every rank at once): the half-written one is skipped.
    run = Run(job, tmp_path / "ddp", **LORA)
    flag = tmp_path / "writing"
    process = run.start(env={"PYTHONPATH": str(SLOW_IO), "SLOW_CHECKPOINT_FLAG": str(flag),
                             "SLOW_CHECKPOINT_SECONDS": "3"})
    run.kill_when(process, flag.exists)
    assert run.last_step() < 8
    assert not (run.outputs["checkpoint_dir"] / run.checkpoints()[-1] / "COMPLETE.json").exists(), "killed mid-write"
    resumed = run.run()
    assert "weights from 1 safetensors file(s)" in resumed  # the base is read again: the checkpoint has none of it
    assert "no completion marker" in resumed
    assert run.losses() == reference.losses()
    assert same_parameters(run.parameters(), reference.parameters())
    # On another world size the adapters' checkpoint loads and training goes on (the global batch changes with the
    # world size, so this continues rather than reproduces: as for full fine-tuning).
    shrunk = run.run(nproc=1, max_steps=10)
    assert "world size 1" in shrunk and "resuming at step 8" in shrunk and run.last_step() == 10
    fsdp_reference = Run(job, tmp_path / "fsdp-reference", strategy="fsdp", **LORA)
    fsdp_reference.run()
    fsdp = Run(job, tmp_path / "fsdp", strategy="fsdp", **LORA)
    fsdp.kill_at_step(fsdp.start(), 5)  # FSDP: killed between steps, every rank at once
    assert fsdp.last_step() < 8
    fsdp.run()
    assert fsdp.losses() == fsdp_reference.losses()
    assert same_parameters(fsdp.parameters(), fsdp_reference.parameters())


def test_the_adapter_loads_in_peft_and_the_merged_model_in_transformers_and_both_generate_the_same(job, reference):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = reference.outputs["output_model_dir"]
    adapter = out / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8)
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "spot capacity returns"}],
                                           add_generation_prompt=True, return_tensors="pt")
    base = AutoModelForCausalLM.from_pretrained(job["model_dir"], torch_dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, adapter).eval()
    merged = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        from_adapter = adapted(input_ids=prompt).logits
        from_merged = merged(input_ids=prompt).logits
        untouched = AutoModelForCausalLM.from_pretrained(job["model_dir"], torch_dtype=torch.float32)(
            input_ids=prompt).logits
    assert not torch.allclose(from_adapter, untouched, atol=1e-3)  # the adapter changes the model
    assert torch.allclose(from_adapter, from_merged, atol=2e-2)  # the merged weights are bf16, like the base
    for model in (adapted, merged):
        generated = model.generate(input_ids=prompt, max_new_tokens=5, do_sample=False,
                                   pad_token_id=tokenizer.eos_token_id)
        assert generated.shape[1] > prompt.shape[1]


def test_a_checkpoint_of_the_other_method_stops_the_run_in_one_line(job, reference, tmp_path):
    import shutil

    run = Run(job, tmp_path, **{**LORA, "method": "full"})
    shutil.copytree(reference.outputs["checkpoint_dir"], run.outputs["checkpoint_dir"])
    process = run.start()
    out, _ = process.communicate(timeout=240)
    assert process.returncode != 0
    assert "was written by a method=lora run and this run is method=full; resume with the same method" in out
    # The same method with other adapters (another rank): one line too, not a silent restart from step 0.
    process = Run(job, tmp_path, **{**LORA, "lora_rank": 8}).start()
    out, _ = process.communicate(timeout=240)
    assert process.returncode != 0 and "'rank': 4" in out and "this run's are {'rank': 8" in out


def test_target_modules_the_model_lacks_are_refused_in_one_line():
    import lora
    import modeling
    from transformers import GPT2Config

    with modeling.no_init_warnings():
        model = modeling.empty_model(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=96, n_positions=64))
    with pytest.raises(modeling.ModelError, match=r"^lora_target_modules=\{'q_proj'\}: .*q_proj") as caught:
        lora.inject(model, lora.config(4, 8.0, 0.0, "q_proj"))
    assert "\n" not in str(caught.value)
