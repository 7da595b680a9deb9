"""Stop strings: find where a row's text first contains one, decoding only the new tokens.

Stop strings need text, so with stop strings the decoding loop runs in chunks
of `stop_check_interval` steps and the host scans each active row between
chunks. A row whose text contains a stop string is marked done. Its output is
cut at the first token whose decoded prefix contains a stop string (that
token included in `token_ids` and `logprobs`); `text` ends right before the
stop string; `finish_reason` is "stop" and `stop_reason` the string. When
several stop strings occur, the one that starts first in the text wins (ties:
the smaller string). Special tokens are never in the text
(`skip_special_tokens=True`), so stop strings match the visible text only.

Incremental decoding
--------------------
The text of a row is `decode(ids[:n])`, and decoding a suffix of the ids
may differ from the suffix of that text: a character split over several
byte tokens decodes to U+FFFD until its last byte arrives, a decoder strips
the leading space of its first token, a WordPiece continuation keeps its
"##" when first. So a scanner keeps the text of the tokens it has checked
and, at each scan, decodes a window: the last `OVERLAP_TOKENS` checked
tokens (moved back over a character split at its start) plus the new ones.
The window's old text is replaced, at the end of the kept text, by its new
text; stop strings are searched only where the text changed. This equals
the full decode when the window starts a character and the new tokens
change no text before it. The scanner checks for what breaks that: the
window's old text must be non-empty (else its first rendered token, which
decoders treat apart, would be a new one), must not start with U+FFFD, and
must be how the kept text ends; the window's new text must not start with
U+FFFD (byte-fallback tokens, decoded run by run, whose run turned
invalid). Otherwise that scan decodes the row from the start. The decoders
of `tokenizers` (byte-level, byte-fallback, Metaspace, WordPiece, BPE, CTC)
render a token from its neighbours only, so the stops found, their token
counts and their texts are those of a full decode at every scan.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

OVERLAP_TOKENS = 8  # checked tokens decoded again with the new ones
REPLACEMENT = "\ufffd"  # what a decoder writes for bytes that are not (yet) a character
_MAX_CHARACTER_TOKENS = 4  # a UTF-8 character has at most 4 bytes, a token at least 1


@dataclasses.dataclass(frozen=True)
class StopHit:
    """Where a row ends on a stop string."""

    count: int  # tokens kept: the fewest whose text contains a stop string
    stop: str  # the stop string found
    text: str  # the text of those tokens, up to the stop string


class StopScanner:
    """Watches one row's growing token ids for its stop strings.

    Args:
        stops: the row's stop strings (non-empty).
        decode: ids -> text, as the Sampler shows it (special tokens skipped).
        overlap: checked tokens decoded again with the new ones.
    """

    def __init__(
        self,
        stops: Sequence[str],
        decode: Callable[[Sequence[int]], str],
        *,
        overlap: int = OVERLAP_TOKENS,
    ):
        self.stops = tuple(stops)
        self.decode = decode
        self.overlap = overlap
        self.checked = 0  # tokens whose text is known to hold no stop string
        self.text = ""  # decode(ids[:checked])

    def scan(self, ids: Sequence[int]) -> StopHit | None:
        """The first stop in `ids` (a longer prefix of the same row each call), or None.

        Only the tokens after those already checked can add a stop string.
        """
        n = len(ids)
        if n <= self.checked:
            return None
        window = self._window(ids)
        text, known = self._text(ids, n, window)
        found = self._earliest_stop(text, known)
        if found is None:
            self.checked, self.text = n, text
            return None
        for count in range(self.checked + 1, n):
            prefix, prefix_known = self._text(ids, count, window)
            early = self._earliest_stop(prefix, prefix_known)
            if early is not None:
                return StopHit(count, early[1], prefix[: early[0]])
        return StopHit(n, found[1], text[: found[0]])

    def _window(self, ids: Sequence[int]) -> tuple[int, str]:
        """(start, text of ids[start:checked]): the checked tokens decoded again with the new.

        A start of 0 means: decode from the beginning (see the module docstring).
        """
        start = max(0, self.checked - self.overlap)
        if not start:
            return 0, ""
        old = self.decode(ids[start : self.checked])
        lowest = max(1, start - _MAX_CHARACTER_TOKENS + 1)
        while start > lowest and old.startswith(REPLACEMENT):  # a character split at the start
            start -= 1
            old = self.decode(ids[start : self.checked])
        if not old or old.startswith(REPLACEMENT) or not self.text.endswith(old):
            return 0, ""
        return start, old

    def _text(self, ids: Sequence[int], count: int, window: tuple[int, str]) -> tuple[str, int]:
        """(decode(ids[:count]), how many leading characters it shares with the checked text).

        count > self.checked. The shared characters hold no stop string.
        """
        start, old = window
        if start:
            tail = self.decode(ids[start:count])
            if not tail.startswith(REPLACEMENT):
                kept = len(self.text) - len(old)
                return self.text[:kept] + tail, kept + _common_prefix_length(old, tail)
        text = self.decode(ids[:count])
        return text, len(self.text) if text.startswith(self.text) else 0

    def _earliest_stop(self, text: str, known: int) -> tuple[int, str] | None:
        """(position, stop) of the stop string that starts first in `text`, ties: the smaller.

        The first `known` characters hold none, so each search starts where an
        occurrence could first reach past them.
        """
        hits = [(text.find(stop, max(0, known - len(stop) + 1)), stop) for stop in self.stops]
        hits = [hit for hit in hits if hit[0] >= 0]
        return min(hits) if hits else None


def _common_prefix_length(a: str, b: str) -> int:
    """How many leading characters `a` and `b` share."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)
