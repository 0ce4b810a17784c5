"""Instruction data (GemmAr-style): the Gemma chat template, labels on the model's turns only, bad rows
reported and skipped, JSONL and Parquet alike, packing and batches, and Arabic through the real tokenizer."""

from __future__ import annotations

import pytest
import torch
from tiny_chat import chat_tokenizer, instruction_rows, write_jsonl

from models.instruct import (
    InstructionBatches,
    InstructionDataError,
    encode_chat,
    load_instructions,
    pack_examples,
    row_messages,
    split_examples,
)
from models.lm_loss import IGNORE_INDEX


@pytest.fixture(scope="module")
def tok():
    return chat_tokenizer()


def labelled_text(tok, example) -> list[str]:
    """The decoded runs of consecutive labelled tokens."""
    runs, current = [], []
    for token, label in zip(example.ids, example.labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tok.decode(current, skip_special_tokens=False))
            current = []
    if current:
        runs.append(tok.decode(current, skip_special_tokens=False))
    return runs


def test_instar_row_is_the_chat_template_with_a_loss_on_the_answer_only(tok):
    row = {"instruction": "what is the colour of the sky?", "input": "blue or green", "system": "answer in one word",
           "output": "blue.", "task": "closed qa", "uuid": "x"}
    example = encode_chat(tok, row_messages(row))
    text = ("<start_of_turn>user\nanswer in one word\n\nwhat is the colour of the sky?\n\nblue or green<end_of_turn>\n"
            "<start_of_turn>model\nblue.<end_of_turn>\n")
    assert text == tok.apply_chat_template(row_messages(row), add_generation_prompt=False)
    assert list(example.ids) == tok.encode(text)  # the tokens of the whole text, <bos> first
    assert labelled_text(tok, example) == ["blue.<end_of_turn>"]


def test_every_model_turn_of_a_conversation_is_trained(tok):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is red?"},
                {"role": "assistant", "content": "a colour."}, {"role": "user", "content": "and the sky?"},
                {"role": "model", "content": "blue."}]
    example = encode_chat(tok, row_messages({"messages": messages}))
    assert labelled_text(tok, example) == ["a colour.<end_of_turn>", "blue.<end_of_turn>"]
    prompt = [t for t, label in zip(example.ids, example.labels, strict=True) if label == IGNORE_INDEX]
    assert tok.decode(prompt, skip_special_tokens=False).startswith("<bos><start_of_turn>user\nbe brief\n\nwhat is red?")


BAD_ROWS = [
    "{not json",
    '["a list"]',
    {"instruction": "what is red?"},
    {"output": "an answer"},
    {"instruction": "what is red?", "output": "   "},
    {"instruction": 7, "output": "seven"},
    {"messages": [{"role": "model", "content": "hi"}, {"role": "user", "content": "hello"}]},
    {"messages": [{"role": "user", "content": "hi"}]},
    {"instruction": "what is the answer? " * 40, "output": "long"},
]
EXPECTED_REASONS = {"invalid JSON": 1, "not an object": 1, "missing output": 1, "missing instruction": 1,
                    "empty output": 1, "non-text instruction": 1, "bad messages": 2, "longer than the context": 1}


def test_bad_rows_are_counted_named_and_skipped(tok, tmp_path):
    good = instruction_rows(5)
    rows = good[:2] + BAD_ROWS + good[2:]
    examples, report = load_instructions(write_jsonl(tmp_path / "data.jsonl", rows), tok, max_len=64)
    assert (report.rows, report.used, report.skipped) == (len(rows), 5, len(BAD_ROWS))
    assert report.reasons == EXPECTED_REASONS
    assert [p.row for p in report.problems] == list(range(3, 3 + len(BAD_ROWS)))  # JSONL line numbers
    assert "longer than the context" in report.summary() and "5 of 14 rows used" in report.summary()
    assert [labelled_text(tok, e) for e in examples] == [[f"{r['output']}<end_of_turn>"] for r in good]
    assert report.label_tokens == sum(sum(t != IGNORE_INDEX for t in e.labels) for e in examples)
    with pytest.raises(InstructionDataError, match="no usable row"):
        load_instructions(write_jsonl(tmp_path / "bad.jsonl", BAD_ROWS[2:4]), tok, max_len=64)
    with pytest.raises(InstructionDataError, match="unknown data format"):
        load_instructions(write_jsonl(tmp_path / "data.csv", good), tok, max_len=64)


def test_parquet_gives_the_same_examples_as_jsonl(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = instruction_rows(4) + [{"instruction": "what is red?", "output": "", "source": None}]
    for i, row in enumerate(rows):  # a Parquet table has the same columns in every row
        row["system"] = "be brief" if i == 1 else None
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data.parquet")
    from_parquet, report = load_instructions(tmp_path / "data.parquet", tok, max_len=64)
    from_jsonl, _ = load_instructions(write_jsonl(tmp_path / "data.jsonl", rows), tok, max_len=64)
    assert from_parquet == from_jsonl and len(from_parquet) == 4
    assert report.reasons == {"empty output": 1} and report.problems[0].row == 5
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(InstructionDataError, match="unreadable Parquet"):
        load_instructions(tmp_path / "broken.parquet", tok, max_len=64)


def test_packing_and_batches(tok):
    examples = [encode_chat(tok, row_messages(r)) for r in instruction_rows(9)]
    packed = pack_examples(examples, max_len=70)
    assert all(len(row.ids) <= 70 for row in packed) and len(packed) < len(examples)
    assert [t for row in packed for t in row.ids] == [t for e in examples for t in e.ids]  # whole, in order
    assert [t for row in packed for t in row.labels] == [t for e in examples for t in e.labels]

    batches = InstructionBatches(examples, batch_size=4, pad_id=tok.pad_id)
    epoch0, again, epoch1 = batches.epoch(0, seed=3), batches.epoch(0, seed=3), batches.epoch(1, seed=3)
    assert len(batches) == len(epoch0) == 3
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(epoch0, again, strict=True))
    assert not torch.equal(epoch0[0]["input_ids"], epoch1[0]["input_ids"])  # reshuffled each epoch
    first = epoch0[0]
    lengths = first["lengths"].tolist()
    for row, length in enumerate(lengths):  # right padding with pad ids and no labels
        assert (first["input_ids"][row, length:] == tok.pad_id).all()
        assert (first["labels"][row, length:] == IGNORE_INDEX).all()
    assert batches.tokens(first) == sum(lengths)
    assert batches.weight(first) == float((first["labels"][:, 1:] != IGNORE_INDEX).sum()) > 0
    train, held = split_examples(examples, 0.25, seed=1)
    assert len(held) == 2 and len(train) == 7 and sorted(train + held) == sorted(examples)


ARABIC = [
    {"system": "أجب بإيجاز.", "instruction": "ما هي عاصمة مصر؟", "output": "القَاهِرَةُ هِيَ عَاصِمَةُ مِصْرَ."},
    {"messages": [{"role": "user", "content": "تَرْجِمْ: good morning"},
                  {"role": "assistant", "content": "صَبَاحُ الخَيْرِ 🌅"}]},
]


def test_arabic_round_trips_through_the_real_tokenizer(gemma3_270m_tokenizer):
    """Right-to-left text with diacritics and an emoji: the model-turn labels decode to the exact answer
    and the whole example to the exact template text (nothing normalised or lost)."""
    tok = gemma3_270m_tokenizer
    for row in ARABIC:
        messages = row_messages(row)
        example = encode_chat(tok, messages)
        answer = messages[-1]["content"]
        assert labelled_text(tok, example) == [f"{answer}<end_of_turn>"]
        text = tok.apply_chat_template(messages, add_generation_prompt=False)
        assert tok.decode(example.ids, skip_special_tokens=False) == "<bos>" + text
        assert list(example.ids) == tok.encode(text)
