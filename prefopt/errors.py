"""One root for every user-facing error, mapped once at the CLI edge to one line and exit code 1.

``str(e)`` of a :class:`PrefoptError` is always ONE line that names the file / line / field (or config path) at
fault and says what to do; the CLI prints it verbatim instead of a traceback.
"""

from __future__ import annotations


class PrefoptError(Exception):
    """A user-facing error: bad input, bad config, a model or judge that cannot be loaded, a bad output place."""


class ConfigError(PrefoptError, ValueError):
    """A config file, preset or ``--set`` override that cannot be turned into a valid config."""


class RunError(PrefoptError):
    """An output location or run folder problem (not writable, not a prefopt run, incomplete, mismatched)."""


def one_line(exc: BaseException, limit: int = 300) -> str:
    """Condense any exception to one bounded line (for wrapping library errors into a PrefoptError)."""
    detail = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run whose progress was kept: ``kept`` is the folder the same command continues from."""

    def __init__(self, kept):
        super().__init__(str(kept))
        self.kept = kept
