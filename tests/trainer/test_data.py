"""Data at scale: the preparation step (trainer/prepare.py) tokenizes once into uint16/uint32 shards with a
manifest, skips unchanged work, and stops on bad data with one line; the trainer reads the shards
memory-mapped through an index, in the same order as before, and refuses large raw text."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from spot_training.local.tiny import make_job
from tests.trainer.harness import ROOT, Run

sys.path.insert(0, str(ROOT / "trainer"))
import data  # noqa: E402
import prepare  # noqa: E402
import tokens  # noqa: E402


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    return make_job(tmp_path_factory.mktemp("job"))


@pytest.fixture(scope="module")
def prepared(job, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    channels = {"train": job["train_dir"], "validation": job["validation_dir"]}
    result = prepare.prepare(job["model_dir"], dict(channels), out, None, tokens_per_shard=1024)
    return out, result


def _reference(job, split):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(job["model_dir"])
    return np.asarray(data.load_tokens(str(job[f"{split}_dir"]), tokenizer)[:], dtype=np.int64)


def test_preparation_writes_uint16_shards_with_a_manifest_holding_the_tokens_the_trainer_would_make(job, prepared):
    out, result = prepared
    assert result["skipped"] is False and result["tokens"]["train"] > 3 * 1024  # several shards
    folder = out / "train"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["dtype"] == "uint16" and manifest["tokenizer"] == tokens.tokenizer_fingerprint(job["model_dir"])
    assert [s["tokens"] for s in manifest["shards"][:-1]] == [1024] * (len(manifest["shards"]) - 1)
    assert manifest["sources"][0]["name"] == "part-000.jsonl" and len(manifest["sources"][0]["sha256"]) == 64
    sequence = data.load_tokens(str(folder), model_dir=str(job["model_dir"]), vocab_size=96)
    reference = _reference(job, "train")
    assert len(sequence) == len(reference) and np.array_equal(np.asarray(sequence[:], dtype=np.int64), reference)
    assert all(isinstance(a, np.memmap) and a.dtype == np.uint16 for a in sequence.arrays)  # mapped, not widened
    for start in (0, 1000, 1020, 2047, 3000):  # slices inside a shard and across shard boundaries
        assert np.array_equal(sequence[start:start + 33], reference[start:start + 33])
        # read(): a copy, with the mapped pages given back (madvise DONTNEED): the same tokens
        assert np.array_equal(sequence.read(start, start + 33), reference[start:start + 33])


def test_blocks_come_in_the_same_order_from_shards_as_from_the_raw_text(job, prepared):
    out, result = prepared
    folder = out / "train"
    from_shards = data.BlockDataset(data.load_tokens(str(folder)), 32, seed=1234)
    from_array = data.BlockDataset(_reference(job, "train"), 32, seed=1234)
    for first in (0, 5, 200, 10_000):
        assert np.array_equal(from_shards.batch(first, 4).numpy(), from_array.batch(first, 4).numpy())


def test_unchanged_sources_and_tokenizer_skip_the_work_and_a_changed_source_does_not(job, prepared, tmp_path):
    out, first = prepared
    again = prepare.prepare(job["model_dir"], {"train": job["train_dir"], "validation": job["validation_dir"]},
                            tmp_path / "again", out / "manifests", tokens_per_shard=1024)
    assert again == {"key": first["key"], "tokenizer": first["tokenizer"], "data_fingerprint": "unlisted",
                     "skipped": True}
    assert not (tmp_path / "again" / "train").exists()
    changed = tmp_path / "train"
    changed.mkdir()
    (changed / "part-000.jsonl").write_text((job["train_dir"] / "part-000.jsonl").read_text() + '{"text": "new"}\n')
    other = prepare.prepare(job["model_dir"], {"train": changed}, tmp_path / "other", out / "manifests",
                            tokens_per_shard=1024)
    assert other["skipped"] is False and other["key"] != first["key"]


BAD_TEXT = [
    (b"", "train/part-000.jsonl: empty file"),
    (b'{"text": "fine"}\n{"text": "caf\xe9"}\n', "train/part-000.jsonl:2: invalid UTF-8 at byte column 14"),
    (b'{"text": "fine"}\n{"title": "no text"}\n', "train/part-000.jsonl:2: no `text` string in the object"),
    (b'["a", "list"]\n', "train/part-000.jsonl:1: a JSON object with a `text` string expected, got list"),
    (b'{"text": "fine"}\n{"text": \n', "train/part-000.jsonl:2: not JSON (Expecting value at column 10)"),
]


@pytest.mark.parametrize("content, message", BAD_TEXT)
def test_bad_text_stops_the_step_with_one_line_naming_the_object_and_the_line(job, tmp_path, monkeypatch, capsys,
                                                                              content, message):
    folder = tmp_path / "train"
    folder.mkdir()
    (folder / "part-000.jsonl").write_bytes(content)
    exit_message = tmp_path / "opt-ml-output" / "message"
    exit_message.parent.mkdir()
    monkeypatch.setattr(prepare, "EXIT_MESSAGE", exit_message)
    code = prepare.main(["--model_dir", str(job["model_dir"]), "--train_dir", str(folder), "--output_dir",
                         str(tmp_path / "out")])
    assert code == 1
    assert capsys.readouterr().err == f"error: {message}\n"
    assert exit_message.read_text() == f"error: {message}"  # DescribeProcessingJob's ExitMessage
    assert not (tmp_path / "out" / "result.json").exists()


@pytest.mark.parametrize("content, message", BAD_TEXT)
def test_the_trainers_small_data_path_refuses_bad_text_with_the_same_line(job, tmp_path, content, message):
    """Raw *.jsonl read by the trainer (prepare_data=false) goes through the same checks as the preparation
    step: the same one line, not a UnicodeDecodeError or KeyError traceback on every rank."""
    from transformers import AutoTokenizer

    folder = tmp_path / "train"
    folder.mkdir()
    (folder / "part-000.jsonl").write_bytes(content)
    with pytest.raises(tokens.DataError) as refused:
        data.load_tokens(str(folder), AutoTokenizer.from_pretrained(job["model_dir"]))
    assert str(refused.value) == f"{tmp_path}/{message}"


def test_the_run_s_data_fingerprint_is_recorded_in_the_result(job, tmp_path):
    code = prepare.main(["--model_dir", str(job["model_dir"]), "--train_dir", str(job["train_dir"]),
                         "--output_dir", str(tmp_path / "out"), "--data_fingerprint", "0f" * 16])
    assert code == 0
    assert json.loads((tmp_path / "out" / "result.json").read_text())["data_fingerprint"] == "0f" * 16


def test_a_validation_folder_without_text_stops_the_step_in_one_line(job, tmp_path, capsys):
    """--validation_dir given means the pipeline has a validation channel: nothing there is an error, not a
    silently missing validation set."""
    empty = tmp_path / "validation"
    empty.mkdir()
    code = prepare.main(["--model_dir", str(job["model_dir"]), "--train_dir", str(job["train_dir"]),
                         "--validation_dir", str(empty), "--output_dir", str(tmp_path / "out")])
    assert code == 1
    assert capsys.readouterr().err == (f"error: {empty}: no *.jsonl files (each line a JSON object with a `text` "
                                       "string)\n")


def test_prepared_shards_of_another_tokenizer_or_truncated_are_refused(job, prepared, tmp_path):
    out, result = prepared
    source = out / "train"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    for item in source.iterdir():
        (foreign / item.name).write_bytes(item.read_bytes())
    manifest = json.loads((foreign / "manifest.json").read_text())
    (foreign / "manifest.json").write_text(json.dumps({**manifest, "tokenizer": "f" * 64}))
    with pytest.raises(tokens.DataError, match=r"manifest.json: shards written by tokenizer ffffffffffff, the "
                                               r"model's is [0-9a-f]{12}; prepare the data again"):
        prepare.prepare(job["model_dir"], {"train": foreign}, tmp_path / "o1", None, tokens_per_shard=1024)
    (foreign / "manifest.json").write_text(json.dumps(manifest))
    shard = foreign / "shard-00001.npy"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(tokens.DataError, match=r"shard-00001.npy: 1000 bytes, the manifest says \d+ \(truncated at "
                                               r"byte 1000\)"):
        prepare.prepare(job["model_dir"], {"train": foreign}, tmp_path / "o2", None, tokens_per_shard=1024)


def test_raw_text_above_the_limit_is_refused_in_one_line(tmp_path):
    big = tmp_path / "part-000.jsonl"
    with big.open("wb") as handle:
        handle.truncate(data.MAX_JSONL_BYTES + 1)  # sparse: the size is what is checked
    with pytest.raises(tokens.DataError, match=r"^.*: 64 MiB of \*\.jsonl; raw text above 64 MiB must go through "
                                               r"the preparation step"):
        data.load_tokens(str(tmp_path), tokenizer=object())


def test_training_on_prepared_shards_gives_the_losses_of_training_on_the_text(job, prepared, tmp_path):
    out, result = prepared
    folder = out
    on_text = Run(job, tmp_path / "text", max_steps=3)
    on_text.run()
    on_shards = Run({**job, "train_dir": folder / "train", "validation_dir": folder / "validation"},
                    tmp_path / "shards", max_steps=3)
    on_shards.run()
    assert on_shards.losses() == on_text.losses() and len(on_text.losses()) == 3
