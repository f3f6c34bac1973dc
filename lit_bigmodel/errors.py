"""Error types that the `lit-bigmodel` CLI reports as one clear line instead of a traceback.

Both subclass the built-in type a user would catch anyway (`ValueError`, `FileNotFoundError`), so
`except ValueError` keeps working in user code.
"""

from __future__ import annotations


class LitBigModelError(Exception):
    """Base class of the errors caused by a user's input (configuration, data, paths)."""


class ConfigurationError(LitBigModelError, ValueError):
    """An argument or a combination of arguments is invalid."""


class DataError(LitBigModelError, ValueError):
    """A data file or record is invalid; the message names the file and the line."""


class MissingPathError(LitBigModelError, FileNotFoundError):
    """A file or directory the user named does not exist."""


class OutputExistsError(LitBigModelError, FileExistsError):
    """An output directory exists and is not empty, and overwriting was not asked for."""
