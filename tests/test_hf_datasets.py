"""Hugging Face `datasets` as the source of the text datamodules: same batches as files, errors naming the row."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

from lit_bigmodel import ConfigurationError, DataError, MissingPathError
from lit_bigmodel.datamodules import InstructionDataModule, PlainTextDataModule, TextClassificationDataModule
from tests.conftest import addition_rows, write_jsonl

datasets = pytest.importorskip("datasets")


def _batches(loader):
    return [{key: value.tolist() for key, value in batch.items()} for batch in loader]


def test_training_batches_from_a_dataset_equal_those_from_the_same_jsonl(tmp_path, char_tokenizer):
    rows = addition_rows(20)
    path = str(write_jsonl(tmp_path / "train.jsonl", rows))
    kwargs = {"val_fraction": 0.2, "batch_size": 4, "seed": 3}
    from_file = InstructionDataModule(char_tokenizer, train_file=path, **kwargs)
    from_dataset = InstructionDataModule(char_tokenizer, train_file=datasets.Dataset.from_list(rows), **kwargs)
    from_spec = InstructionDataModule(
        char_tokenizer, dataset={"path": "json", "data_files": path, "cache_dir": str(tmp_path / "hf")}, **kwargs
    )
    expected = _batches(from_file.train_dataloader())
    assert len(expected) == 4
    for dm in (from_dataset, from_spec):
        assert _batches(dm.train_dataloader()) == expected
        assert _batches(dm.val_dataloader()) == _batches(from_file.val_dataloader())


def test_dataset_dict_with_train_and_validation(tmp_path, char_tokenizer):
    train, validation = addition_rows(12, seed=0), addition_rows(5, seed=1)
    data = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(train), "validation": datasets.Dataset.from_list(validation)}
    )
    dm = InstructionDataModule(char_tokenizer, dataset=data)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 12 and len(dm.datasets["val"]) == 5  # nothing held out of train
    assert "test" not in dm.datasets
    first = char_tokenizer.decode(dm.datasets["val"][0]["input_ids"][: dm.datasets["val"][0]["prompt_length"]])
    assert first == validation[0]["prompt"]

    data.save_to_disk(str(tmp_path / "saved"))  # a folder saved with save_to_disk, by name (as from YAML)
    from_disk = InstructionDataModule(char_tokenizer, dataset=str(tmp_path / "saved"))
    from_disk.setup("fit")
    assert from_disk.datasets == dm.datasets

    renamed = datasets.DatasetDict({"main": data["train"], "dev": data["validation"], "heldout": data["validation"]})
    mapped = InstructionDataModule(
        char_tokenizer, dataset=renamed, dataset_splits={"train": "main", "val": "dev", "test": "heldout"}
    )
    mapped.setup()
    assert [len(mapped.datasets[s]) for s in ("train", "val", "test")] == [12, 5, 5]


def test_a_bad_record_names_the_split_and_row(char_tokenizer):
    rows = [*addition_rows(3), {"prompt": "1+1="}, *addition_rows(2)]  # from_list fills 'completion' with None
    data = datasets.DatasetDict({"train": datasets.Dataset.from_list(addition_rows(5)),
                                 "validation": datasets.Dataset.from_list(rows)})  # fmt: skip
    dm = InstructionDataModule(char_tokenizer, dataset=data)
    with pytest.raises(DataError, match=r"dataset split 'validation' row 3: missing key\(s\) \['completion'\]"):
        dm.setup("fit")

    labels = datasets.Dataset.from_list([{"text": "a b", "label": 0}, {"text": "c d", "label": 5}])
    with pytest.raises(DataError, match=r"dataset split 'train' row 1: label 5 is outside \[0, num_labels=2\)"):
        TextClassificationDataModule(char_tokenizer, train_file=labels, num_labels=2).validate_inputs()


def test_a_missing_column_is_one_error_naming_it(char_tokenizer):
    data = datasets.Dataset.from_list([{"prompt": "1+1=", "answer": "2"}] * 4)
    with pytest.raises(DataError, match=r"dataset split 'train' has no column\(s\) \['completion'\] \(its columns: \['prompt', 'answer'\]\)"):  # fmt: skip
        InstructionDataModule(char_tokenizer, train_file=data).setup("fit")
    reviews = datasets.Dataset.from_list([{"review": "good", "label": 1}] * 4)
    with pytest.raises(DataError, match=r"no column\(s\) \['text'\].*set `text_field`"):
        TextClassificationDataModule(char_tokenizer, train_file=reviews, num_labels=2).setup("fit")


def test_classification_from_a_dataset_with_class_labels(char_tokenizer):
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    data = datasets.Dataset.from_dict({"text": [f"t{i}" for i in range(10)], "label": [i % 2 for i in range(10)]},
                                      features=features)  # fmt: skip
    dm = TextClassificationDataModule(char_tokenizer, train_file=data.with_format("torch"), val_fraction=0.2)
    batch = next(iter(dm.train_dataloader()))
    assert dm.num_labels == 2 and sorted(set(batch["labels"].tolist())) == [0, 1]


def test_validate_inputs_with_a_dataset_writes_nothing(tmp_path, char_tokenizer):
    data = datasets.Dataset.from_list(addition_rows(10))
    dm = InstructionDataModule(char_tokenizer, train_file=data, cache_dir=str(tmp_path / "cache"))
    dm.validate_inputs()
    assert not (tmp_path / "cache").exists()
    dm.setup("fit")
    assert len(os.listdir(tmp_path / "cache")) == 1


def test_load_dataset_spec_errors(tmp_path, char_tokenizer):
    hf_cache = str(tmp_path / "hf")
    missing = {"path": "json", "data_files": str(tmp_path / "nope.jsonl"), "cache_dir": hf_cache}
    with pytest.raises(MissingPathError, match=r"nope\.jsonl"):
        InstructionDataModule(char_tokenizer, dataset=missing).validate_inputs()
    bad = str(write_jsonl(tmp_path / "bad.jsonl", [*addition_rows(2), "{oops"]))
    with pytest.raises(DataError, match=r"`dataset` .*bad\.jsonl.* does not load: .*JSON"):
        InstructionDataModule(
            char_tokenizer, dataset={"path": "json", "data_files": bad, "cache_dir": hf_cache}
        ).setup()
    with pytest.raises(MissingPathError, match="is not a folder saved with `save_to_disk`"):
        InstructionDataModule(char_tokenizer, dataset=str(tmp_path / "absent")).setup()
    splits = datasets.DatasetDict({"main": datasets.Dataset.from_list(addition_rows(4))})
    with pytest.raises(ConfigurationError, match=r"no 'train' split \(its splits: \['main'\]\)"):
        InstructionDataModule(char_tokenizer, dataset=splits).setup()
    with pytest.raises(ConfigurationError, match=r"maps 'val' to 'dev', but the dataset's splits are \['main'\]"):
        InstructionDataModule(char_tokenizer, dataset=splits, dataset_splits={"train": "main", "val": "dev"}).setup()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dataset": 3}, r"`dataset` must be a `datasets.Dataset` / `DatasetDict`.*got int"),
        ({"dataset": {"data_files": "x.jsonl"}}, "must name `path`"),
        ({"train_file": 3}, r"`train_file` must be a file path or a `datasets.Dataset`, got int"),
        ({"dataset": "folder", "train_file": "t.jsonl"}, r"give `dataset` or `train_file`, not both"),
        ({"dataset_splits": {"train": "main"}}, r"`dataset` is None"),
        ({"dataset": "folder", "dataset_splits": {"training": "main"}}, r"maps 'train' / 'val' / 'test'"),
    ],
)
def test_invalid_dataset_arguments(kwargs, message, char_tokenizer):
    with pytest.raises(ConfigurationError, match=message):
        InstructionDataModule(char_tokenizer, **kwargs)


def test_a_spec_without_datasets_installed_says_how_to_install(char_tokenizer, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "datasets" else find_spec(name, *a)
    )
    with pytest.raises(ConfigurationError, match=r"needs the Hugging Face `datasets` package: pip install datasets"):
        InstructionDataModule(char_tokenizer, dataset={"path": "json", "data_files": "train.jsonl"})
    from lit_bigmodel.datamodules._records import load_dataset_argument

    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    with pytest.raises(ConfigurationError, match="pip install datasets"):
        load_dataset_argument({"path": "json", "data_files": "train.jsonl"})


def test_plain_text_from_a_dataset(tmp_path):
    texts = [f"the king and the queen {i} went to sea." for i in range(30)]
    (tmp_path / "book.txt").write_text("".join(texts))
    from_file = PlainTextDataModule([str(tmp_path / "book.txt")], block_size=16)
    from_dataset = PlainTextDataModule(dataset=datasets.Dataset.from_dict({"body": ["".join(texts)]}),
                                       text_field="body", block_size=16)  # fmt: skip
    from_file.setup()
    from_dataset.setup()
    assert from_dataset.datasets == from_file.datasets
    with pytest.raises(DataError, match=r"dataset split 'train' row 0: 'text' must be a string, got int"):
        PlainTextDataModule(dataset=datasets.Dataset.from_dict({"text": [3, 4]}), block_size=4)


def test_the_cli_yaml_passes_a_load_dataset_spec(tmp_path, char_tokenizer):
    from jsonargparse import ArgumentParser

    path = str(write_jsonl(tmp_path / "train.jsonl", addition_rows(10)))
    parser = ArgumentParser()
    parser.add_class_arguments(InstructionDataModule, "data")
    config = parser.parse_string(
        f"data:\n  tokenizer: x\n  dataset: {{path: json, data_files: {{train: {path}}}, cache_dir: {tmp_path}/hf}}\n"
        "  dataset_splits: {train: train}\n"
    )
    kwargs = {**config.data.as_dict(), "tokenizer": char_tokenizer}
    dm = InstructionDataModule(**kwargs)
    dm.setup("fit")
    assert len(dm.datasets["train"]) + len(dm.datasets["val"]) == 10
    assert isinstance(dm.datasets["train"][0]["input_ids"], list)
    assert torch.is_tensor(next(iter(dm.train_dataloader()))["input_ids"])
