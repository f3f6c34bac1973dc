"""Text augmentation applied to raw records before tokenization: `EDA` and its synonym sources."""

from lit_bigmodel.augmentation.eda import EDA, ENGLISH_STOP_WORDS
from lit_bigmodel.augmentation.synonyms import SynonymSource, WordNetSynonyms

__all__ = ["EDA", "ENGLISH_STOP_WORDS", "SynonymSource", "WordNetSynonyms"]
