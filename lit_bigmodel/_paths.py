"""Path helpers shared by the model and tokenizer loaders."""

from __future__ import annotations

import os


def looks_like_local_path(name: str) -> bool:
    """True for names that can only mean a local path: ``./x``, ``/x``, ``~/x``, ``a/b/c`` or an existing path.

    Anything else (``gpt2``, ``org/model``) may be a hub id.
    """
    return name.startswith((".", "/", "~")) or name.count("/") >= 2 or os.path.exists(name)
