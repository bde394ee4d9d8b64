"""The record types every part of prefopt exchanges.

Loaders, the synthetic annotator, the trainers and the evaluation harness all speak in these
few plain types, so a dataset only has to be adapted once (in ``prefopt.data.io``) and every
downstream stage can rely on the invariants documented here instead of re-validating rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from prefopt.errors import PrefoptError

Message = dict[str, str]
"""One chat turn, ``{"role": ..., "content": ...}`` (the shape chat templates expect)."""

Prompt = str | list[Message]
"""A prompt is either plain text or a conversation ending before the assistant's reply."""


@dataclass(frozen=True)
class PreferencePair:
    """One human/simulated judgement: ``chosen`` was preferred over ``rejected`` for ``prompt``.

    ``chosen`` and ``rejected`` are only the *response* text (for conversational data: the
    content of the final assistant message), never prompt + response, so a trainer can apply
    its own chat template and both DPO and the reward model see exactly the same split between
    prompt and completion.  ``margin`` is an optional strength of preference (e.g. a rating
    gap); ``meta`` carries every other column untouched so nothing in the source is lost.
    """

    prompt: Prompt
    chosen: str
    rejected: str
    margin: float | None = None
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class PromptRecord:
    """A prompt to generate from (RL rollouts, evaluation), with its source columns in ``meta``."""

    prompt: Prompt
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Demonstration:
    """A response to imitate (the SFT stage): ``response`` is the text only, like a pair's ``chosen``; ``meta``
    may say ``response_eos: false`` for a response that was cut (no EOS is learned then)."""

    prompt: Prompt
    response: str
    meta: dict = field(default_factory=dict)


class DataError(PrefoptError):
    """A user-facing input error.

    ``str(e)`` is always ONE line naming the file, the line or row, the field and what to do,
    so the CLI can print it verbatim instead of a traceback: a bad row in a 100k-line file is
    useless to report without its location.
    """


def prompt_key(prompt: Prompt) -> str:
    """Return a stable string identity for ``prompt``.

    Used to deduplicate prompts and to keep evaluation prompts out of training data; message
    lists are serialised with sorted keys so two equal conversations always give the same key
    regardless of dict insertion order.
    """
    if isinstance(prompt, str):
        return prompt
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)
