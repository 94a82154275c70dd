"""Tiny models and data built locally (tests and `local-run`): nothing is downloaded.

Needs the trainer's packages (`trainer/requirements.txt`: torch, transformers, which brings tokenizers)."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ("spot capacity returns checkpoint shard gradient rank node token batch model loss step resume "
         "interrupt save load train write read marker epoch sample seed").split()


# A chat template in the style of the common ones: a role header, the content, an end-of-turn token (here EOS).
CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' }} {{ m['content'] }}<eos>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]


def make_model_dir(folder: Path, *, text_corpus: list[str], vocab_size: int = 96, dropout: float = 0.1,
                   chat: bool = False, chat_template: str = CHAT_TEMPLATE) -> Path:
    """A randomly initialised GPT-2 shaped config (no weights) and a BPE tokenizer trained on the corpus; with
    `chat`, the tokenizer has role tokens and `chat_template`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(text_corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<eos>", *(CHAT_TOKENS if chat else [])]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", unk_token="<unk>",
                                   **({"chat_template": chat_template} if chat else {}))
    fast.save_pretrained(folder)
    config = GPT2Config(vocab_size=len(fast), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                        bos_token_id=fast.eos_token_id, eos_token_id=fast.eos_token_id)
    config.save_pretrained(folder)
    return folder


def corpus(documents: int = 400, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40))) for _ in range(documents)]


def conversations(count: int = 200, seed: int = 11, *, turns: int = 1) -> list[dict]:
    """Chat examples: a system line, then `turns` user/assistant exchanges of words from the corpus vocabulary; each
    answer repeats the question's first words, something a model can learn."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        messages = [{"role": "system", "content": "answer"}]
        for _ in range(turns):
            question = [rng.choice(WORDS) for _ in range(rng.randint(2, 6))]
            messages += [{"role": "user", "content": " ".join(question)},
                         {"role": "assistant", "content": " ".join(question[:3])}]
        out.append({"messages": messages})
    return out


def make_jsonl_channel(folder: Path, records: list[dict], name: str = "part-000.jsonl") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / name).open("w") as out:
        for record in records:
            out.write(json.dumps(record) + "\n")
    return folder


def make_text_channel(folder: Path, documents: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "part-000.jsonl").open("w") as out:
        for text in documents:
            out.write(json.dumps({"text": text}) + "\n")
    return folder


def make_job(root: Path, *, documents: int = 400) -> dict[str, Path]:
    texts = corpus(documents)
    return {"model_dir": make_model_dir(root / "model", text_corpus=texts),
            "train_dir": make_text_channel(root / "train", texts[:-40]),
            "validation_dir": make_text_channel(root / "validation", texts[-40:])}


def make_llama_model_dir(folder: Path, *, tokenizer_dir: Path, seed: int = 3, tied: bool = True,
                         max_shard_size: str = "5GB", layers: int = 2) -> Path:
    """A tiny Llama with real weights: bf16 safetensors written by save_pretrained (tied embeddings, rotary
    tables), the tokenizer of `tokenizer_dir`. The sharded start must read it exactly as from_pretrained does."""
    import shutil

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tied, bos_token_id=tokenizer.eos_token_id,
                         eos_token_id=tokenizer.eos_token_id, torch_dtype="bfloat16")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True, max_shard_size=max_shard_size)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, folder / name)
    return folder
