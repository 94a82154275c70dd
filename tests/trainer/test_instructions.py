"""Instruction data: chat and prompt/completion examples prepared with the tokens to train on, packed whole, held to
the data contract; packed examples attend only within themselves. (Training on this data: tests/trainer/test_lora.py
and the local run on chat data in tests/test_local_run.py.)"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from spot_training.local.tiny import CHAT_TEMPLATE, conversations, corpus, make_jsonl_channel, make_model_dir
from tests.trainer.harness import ROOT

sys.path.insert(0, str(ROOT / "trainer"))
import data  # noqa: E402
import instructions  # noqa: E402
import modeling  # noqa: E402
import prepare  # noqa: E402
from tokens import DataError  # noqa: E402

SEQUENCE = 32


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    texts = corpus(200) + [m["content"] for c in conversations(50) for m in c["messages"]]
    return make_model_dir(tmp_path_factory.mktemp("chat-model"), text_corpus=texts, chat=True)


@pytest.fixture(scope="module")
def tokenizer(chat_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(chat_model)


def _prepare(model, train, out, **options):
    return prepare.prepare(model, {"train": train}, out, None, tokens_per_shard=1024,
                           **{"sequence_length": SEQUENCE, **options})


@pytest.fixture(scope="module")
def chat_prepared(chat_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    train = make_jsonl_channel(root / "train", conversations(240))
    result = _prepare(chat_model, train, root / "out")
    return root / "out" / "train", result


def test_chat_examples_train_on_each_assistant_turn_with_its_end_of_turn_token_and_nothing_else(
        chat_prepared, tokenizer):
    folder, result = chat_prepared
    split = data.load_tokens(str(folder))
    ids, mask, positions = (np.asarray(x[:]) for x in (split, split.streams["mask"], split.streams["position"]))
    assert json.loads((folder / "manifest.json").read_text())["data_format"] == "chat"
    # Each example starts at position 0: decode every example and check its trained tokens are its answer + <eos>.
    starts = [i for i in np.flatnonzero(positions == 0)]
    examples = [(ids[a:b], mask[a:b]) for a, b in zip(starts, [*starts[1:], len(ids)])]
    answered = [(e, m) for e, m in examples if m.any() and e[-1] == tokenizer.eos_token_id]  # not cut
    assert len(answered) >= 200
    for example, trained in answered:
        text = tokenizer.decode(example)
        answer = text.split("<|assistant|>", 1)[1].split("<eos>", 1)[0].strip()
        assert tokenizer.decode(example[trained == 1]).replace(" ", "") == (answer + "<eos>").replace(" ", "")
        assert example[trained == 1][-1] == tokenizer.eos_token_id  # the end-of-turn token is trained
    # The figures of the contract, per source, and the packing efficiency (trained tokens per sequence token).
    (stats,) = result["contract"]["train"]
    assert stats["examples"] == 240 and stats["untrained_examples"] == 0 and stats["unterminated_examples"] == 0
    assert stats["trained_tokens"] == int(mask.sum()) and stats["min_trained"] >= 2
    assert result["packing_efficiency"]["train"] == pytest.approx(mask.sum() / len(ids), abs=1e-4)


def test_prompt_completion_trains_on_the_completion_and_eos(chat_model, tokenizer, tmp_path):
    train = make_jsonl_channel(tmp_path / "train", [{"prompt": "spot capacity", "completion": "returns checkpoint"}] * 3)
    _prepare(chat_model, train, tmp_path / "out")
    split = data.load_tokens(str(tmp_path / "out" / "train"))
    ids, mask = np.asarray(split[:]), np.asarray(split.streams["mask"][:])
    trained = tokenizer.decode(ids[mask == 1]).replace(" ", "")  # the tiny tokenizer decodes with spaces between
    assert trained == "returnscheckpoint<eos>" * 3


@pytest.mark.parametrize("case", ["no chat template", "no assistant turn", "cut", "no end of turn", "mixed formats",
                                  "assistant first", "template refuses"])
def test_the_data_contract_stops_the_silent_failures_in_one_line(case, chat_model, tmp_path):
    model, records = chat_model, conversations(20)
    expected = {
        "no chat template": "the tokenizer has no chat template",
        "no assistant turn": "train/part-000.jsonl: 20 of 20 examples (100.0%) have no trained token, above "
                             "max_untrained_fraction=0",
        "cut": "are longer than a sequence and were cut",
        "no end of turn": "20 of 20 examples (100.0%) end an answer without an end-of-turn token, above "
                          "max_unterminated_fraction=0",
        "mixed formats": "train/part-000.jsonl:21: a prompt_completion example in chat data (one format per split)",
        "assistant first": "train/part-000.jsonl:1: the conversation starts with an assistant turn",
        "template refuses": "train/part-000.jsonl:1: the chat template refused the conversation (System role not "
                            "supported)",
    }[case]
    if case == "no chat template":
        model = make_model_dir(tmp_path / "plain", text_corpus=corpus(100))
    elif case == "no assistant turn":
        records = [{"messages": [m for m in r["messages"] if m["role"] != "assistant"]} for r in records]
    elif case == "cut":
        records = [{"messages": [{"role": "user", "content": "spot " * 40}, {"role": "assistant", "content": "x"}]}]
    elif case == "no end of turn":  # a template that ends an answer with nothing: the model would never stop
        model = make_model_dir(tmp_path / "open", text_corpus=corpus(100), chat=True,
                               chat_template=CHAT_TEMPLATE.replace(" }}<eos>{% endfor", " }}{% endfor"))
    elif case == "mixed formats":
        records = records + [{"prompt": "a", "completion": "b"}]
    elif case == "assistant first":
        records = [{"messages": [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "spot"}]}]
    elif case == "template refuses":  # as Gemma's template refuses a system message
        model = make_model_dir(tmp_path / "strict", text_corpus=corpus(100), chat=True, chat_template=(
            "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
            + CHAT_TEMPLATE))
    train = make_jsonl_channel(tmp_path / "train", records)
    with pytest.raises(DataError) as caught:
        _prepare(model, train, tmp_path / "out")
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_an_end_of_turn_token_followed_by_more_template_text_still_ends_the_answer(tmp_path):
    """ChatML ("<|im_end|>\\n"), Gemma and Phi-3 put text after the end-of-turn token: the answer is terminated."""
    model = make_model_dir(tmp_path / "chatml", text_corpus=corpus(100), chat=True,
                           chat_template=CHAT_TEMPLATE.replace("<eos>{% endfor", "<eos> spot{% endfor"))
    train = make_jsonl_channel(tmp_path / "train", conversations(20))
    result = _prepare(model, train, tmp_path / "out")
    assert result["contract"]["train"][0]["unterminated_examples"] == 0


def test_the_preparation_command_fails_in_one_line_and_writes_the_exit_message(chat_model, tmp_path, monkeypatch,
                                                                               capsys):
    message = tmp_path / "message"
    monkeypatch.setattr(prepare, "EXIT_MESSAGE", message)
    train = make_jsonl_channel(tmp_path / "train", [{"messages": [{"role": "user", "content": "hi"}]}] * 4)
    code = prepare.main(["--model_dir", str(chat_model), "--train_dir", str(train), "--output_dir",
                         str(tmp_path / "out"), "--sequence_length", str(SEQUENCE)])
    assert code == 1
    assert message.read_text() == ("error: train/part-000.jsonl: 4 of 4 examples (100.0%) have no trained token, "
                                   "above max_untrained_fraction=0")
    assert "[prepare] train: data_format auto -> chat (the first line of part-000.jsonl)" in capsys.readouterr().out


def test_packed_examples_attend_only_within_themselves(tokenizer):
    """The loss of each packed example equals its loss alone, on GPT-2 and Llama, SDPA and eager attention."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    encode = instructions.encoder("prompt_completion", tokenizer, ROOT)
    examples = [encode({"prompt": p, "completion": c}, "x") for p, c in
                (("spot capacity", "returns"), ("gradient rank node", "token batch model loss"), ("seed", "epoch"))]
    ids = torch.tensor([sum((e.ids for e in examples), [])])
    positions = torch.tensor([sum((list(range(len(e.ids))) for e in examples), [])])
    torch.manual_seed(0)
    for make in (lambda impl: GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32,
                                                          n_layer=2, n_head=2, attn_implementation=impl)),
                 lambda impl: LlamaForCausalLM(LlamaConfig(
                     vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, attn_implementation=impl))):
        for impl in ("sdpa", "eager"):
            model = make(impl).eval()
            with torch.no_grad():
                packed = model(input_ids=ids, position_ids=positions,
                               attention_mask=modeling.packed_attention_mask(positions, torch.float32)).logits[0]
                at = 0
                for example in examples:
                    alone = model(input_ids=torch.tensor([example.ids])).logits[0]
                    assert torch.allclose(packed[at:at + len(example.ids)], alone, atol=1e-5), impl
                    at += len(example.ids)


def test_data_packed_for_another_sequence_length_is_refused_in_one_line(chat_prepared):
    folder, _ = chat_prepared
    with pytest.raises(DataError, match=r"packed for SequenceLength 32, the run's is 64; prepare it again"):
        data.BlockDataset(data.load_tokens(str(folder)), 64, seed=1)
