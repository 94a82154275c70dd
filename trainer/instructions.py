"""Instruction data: chat and prompt/completion examples tokenized with the tokens to train on, packed whole into
the trainer's fixed blocks, and the data contract the preparation step checks before any GPU starts.

Formats, one JSON object per `*.jsonl` line:
- text: `{"text": ...}`; documents joined with EOS into one stream, every token trained (tokens.py, format 1);
- chat: `{"messages": [{"role": ..., "content": ...}, ...]}`, rendered with the base model's chat template;
  trained: each assistant turn as the template renders it, its end-of-turn token included;
- prompt_completion: `{"prompt": ..., "completion": ...}`; the prompt's tokens, then the completion's and EOS;
  trained: the completion and EOS.

How the assistant turns are found: the template renders the conversation before each assistant turn with
`add_generation_prompt=True` (what the model sees when it is asked to answer), and again with that turn; the
tokens the second rendering adds are the turn. This needs no `{% generation %}` markers (most templates have
none, and without them `return_assistant_tokens_mask` marks nothing: a run trains on nothing while its loss looks
normal), and a template whose shorter rendering is not a prefix of the longer is refused in one line.

Packing: whole examples go into blocks of `sequence_length + 1` tokens, first fit over the last `window` blocks
still open, in the order they come (a pure function of the data); an example longer than a block is cut to it
(counted as truncated); the rest of a block is EOS padding, untrained. Each token carries its position within its
example, so the trainer attends only within an example (a block-diagonal causal mask on CPU and with SDPA).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from tokens import DataError

FORMATS = ("text", "chat", "prompt_completion")
ROLES_TRAINED = ("assistant",)


def detect_format(record: dict, shown: str) -> str:
    """The format one record is in, from its keys."""
    if "messages" in record:
        return "chat"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "text" in record:
        return "text"
    raise DataError(f"{shown}: an object with `text`, `messages` or `prompt` and `completion` expected, got keys "
                    f"{', '.join(sorted(record)) or 'none'}")


@dataclasses.dataclass
class Example:
    ids: list[int]
    trained: list[bool]
    unterminated: bool = False  # an assistant turn or completion that ends without an end-of-turn token


def end_of_turn_ids(tokenizer, model_dir: Path) -> set[int]:
    """The ids that end a turn: the tokenizer's EOS and every `eos_token_id` of the model's config.json and
    generation_config.json (Llama 3 lists <|eot_id|> there)."""
    found = {tokenizer.eos_token_id} - {None}
    for name in ("config.json", "generation_config.json"):
        path = model_dir / name
        if path.is_file():
            value = json.loads(path.read_text()).get("eos_token_id")
            found.update(value if isinstance(value, list) else [value] if value is not None else [])
    return found


def check_chat_template(tokenizer, model_dir: Path) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{model_dir}: the tokenizer has no chat template (tokenizer_config.json chat_template), so "
                        "chat examples cannot be rendered; use a chat model's tokenizer, or prompt_completion data")


def _messages(record: dict, shown: str) -> list[dict]:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise DataError(f"{shown}: `messages` must be a non-empty list of objects with `role` and `content` strings")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _render(tokenizer, messages: list[dict], generation_prompt: bool, shown: str) -> list[int]:
    try:
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    except Exception as error:  # the template's own raise_exception ("roles must alternate"), Jinja errors
        reason = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise DataError(f"{shown}: the chat template refused the conversation ({reason[:200]})") from None
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


def encode_chat(tokenizer, record: dict, shown: str, end_ids: set[int]) -> Example:
    messages = _messages(record, shown)
    if messages[0]["role"] in ROLES_TRAINED:
        raise DataError(f"{shown}: the conversation starts with an assistant turn; it must start with a system or "
                        "user message (the answer needs a prompt)")
    ids = _render(tokenizer, messages, False, shown)
    trained = [False] * len(ids)
    unterminated = False
    for turn, message in enumerate(messages):
        if message["role"] not in ROLES_TRAINED:
            continue
        before = _render(tokenizer, messages[:turn], True, shown)
        after = _render(tokenizer, messages[:turn + 1], False, shown)
        if after[:len(before)] != before or ids[:len(after)] != after:
            raise DataError(f"{shown}: the chat template's rendering before assistant turn {turn} is not a prefix of "
                            "its rendering with that turn; its assistant tokens cannot be told apart")
        for i in range(len(before), len(after)):
            trained[i] = True
        # The end-of-turn token anywhere in what the turn adds: templates put text after it (ChatML's
        # "<|im_end|>\n", Gemma's "<end_of_turn>\n").
        if not any(token in end_ids for token in after[len(before):]):
            unterminated = True
    return Example(ids, _first_untrained(trained), unterminated)


def _first_untrained(trained: list[bool]) -> list[bool]:
    """An example's first token is predicted from nothing of its own (attention stops at the example): never trained."""
    return [False, *trained[1:]] if trained else trained


def encode_prompt_completion(tokenizer, record: dict, shown: str, end_ids: set[int]) -> Example:
    prompt, completion = record.get("prompt"), record.get("completion")
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise DataError(f"{shown}: `prompt` and `completion` must be strings")
    head = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    tail = tokenizer(completion, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    tail = tail + ([eos] if eos is not None else [])
    return Example(head + tail, _first_untrained([False] * len(head) + [True] * len(tail)), unterminated=eos is None)


@dataclasses.dataclass
class SourceStats:
    """What the data contract reports for one source file."""

    name: str
    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    min_trained: int | None = None
    max_trained: int = 0
    untrained_examples: int = 0      # no trained token at all (a template without assistant turns, an empty answer)
    truncated_examples: int = 0      # longer than a block: cut to it
    truncated_tokens: int = 0        # how many tokens the cuts dropped
    truncated_trained_tokens: int = 0
    unterminated_examples: int = 0   # an answer without an end-of-turn token: the model would not learn to stop

    def add(self, example: Example, dropped: int, dropped_trained: int) -> None:
        trained = sum(example.trained) - dropped_trained
        self.examples += 1
        self.tokens += len(example.ids) - dropped
        self.trained_tokens += trained
        self.min_trained = trained if self.min_trained is None else min(self.min_trained, trained)
        self.max_trained = max(self.max_trained, trained)
        self.untrained_examples += trained == 0
        self.truncated_examples += dropped > 0
        self.truncated_tokens += dropped
        self.truncated_trained_tokens += dropped_trained
        self.unterminated_examples += example.unterminated

    def as_dict(self) -> dict:
        record = dataclasses.asdict(self)
        record["trained_tokens_per_example"] = round(self.trained_tokens / self.examples, 2) if self.examples else 0.0
        return record


@dataclasses.dataclass(frozen=True)
class Contract:
    """The most of each silent failure a split may hold, as fractions of its examples (0: none at all)."""

    max_untrained_fraction: float = 0.0
    max_truncated_fraction: float = 0.05
    max_unterminated_fraction: float = 0.0

    def violations(self, split: str, sources: Sequence[SourceStats]) -> list[str]:
        out = []
        for stats in sources:
            n = stats.examples
            for count, limit, what, flag in (  # a cut is named first: it may be why an answer has no token left
                    (stats.truncated_examples, self.max_truncated_fraction,
                     f"are longer than a sequence and were cut ({stats.truncated_tokens:,} tokens dropped, "
                     f"{stats.truncated_trained_tokens:,} of them trained)", "max_truncated_fraction"),
                    (stats.untrained_examples, self.max_untrained_fraction, "have no trained token",
                     "max_untrained_fraction"),
                    (stats.unterminated_examples, self.max_unterminated_fraction,
                     "end an answer without an end-of-turn token", "max_unterminated_fraction")):
                if n and count / n > limit:
                    out.append(f"{split}/{stats.name}: {count} of {n} examples ({100 * count / n:.1f}%) {what}, above "
                               f"{flag}={limit:g}")
        return out


class Packer:
    """Whole examples into blocks of `block` tokens (see the module docstring); `emit(ids, trained, positions)` gets
    each block when it is closed, in the order blocks were opened."""

    def __init__(self, block: int, pad_id: int, emit: Callable[[list[int], list[bool], list[int]], None],
                 window: int = 16) -> None:
        self.block, self.pad_id, self.emit, self.window = block, pad_id, emit, window
        self.open: list[tuple[list[int], list[bool], list[int]]] = []
        self.blocks = 0

    def add(self, example: Example) -> tuple[int, int]:
        """Place one example; returns (tokens dropped, trained tokens dropped) by cutting it to a block."""
        ids, trained = example.ids[:self.block], example.trained[:self.block]
        dropped = (len(example.ids) - len(ids), sum(example.trained[self.block:]))
        target = next((b for b in self.open if len(b[0]) + len(ids) <= self.block), None)
        if target is None:
            if len(self.open) == self.window:
                self._close(0)
            target = ([], [], [])
            self.open.append(target)
        target[0].extend(ids)
        target[1].extend(trained)
        target[2].extend(range(len(ids)))
        if len(target[0]) == self.block:
            self._close(self.open.index(target))
        return dropped

    def _close(self, index: int) -> None:
        ids, trained, positions = self.open.pop(index)
        pad = self.block - len(ids)
        self.emit(ids + [self.pad_id] * pad, trained + [False] * pad, positions + [0] * pad)
        self.blocks += 1

    def finish(self) -> None:
        while self.open:
            self._close(0)


def encoder(data_format: str, tokenizer, model_dir: Path) -> Callable[[dict, str], Example]:
    """The function that turns one record of `data_format` into an Example (after checking the tokenizer)."""
    end_ids = end_of_turn_ids(tokenizer, model_dir)
    if data_format == "chat":
        check_chat_template(tokenizer, model_dir)
        return lambda record, shown: encode_chat(tokenizer, record, shown, end_ids)
    if data_format == "prompt_completion":
        return lambda record, shown: encode_prompt_completion(tokenizer, record, shown, end_ids)
    raise DataError(f"data_format={data_format}: not an instruction format (chat, prompt_completion)")
