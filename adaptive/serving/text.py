"""Detokenisation while streaming, and stop strings.

The text of a request is re-decoded from all its generated ids at each token (byte-level BPE can merge
bytes across tokens), and only what is new is emitted. Two things are held back until later tokens settle
them: a trailing incomplete character (decoded as U+FFFD), and a tail that could be the start of a stop
string. When a stop string appears, the text ends before it and nothing after it is emitted. So the deltas
of a request, concatenated, always equal its final text.
"""

from __future__ import annotations


class TextTracker:
    def __init__(self, tokenizer, stops: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stops = stops
        self.ids: list[int] = []
        self.text = ""  # text emitted so far (never past a stop string)
        self.stopped: str | None = None

    def add(self, token: int | None) -> str:
        """Take one generated id (None: the request ends here) and return the text it adds."""
        if self.stopped is not None:
            return ""
        if token is not None:
            self.ids.append(token)
        full = self.tokenizer.decode(self.ids)
        cut = self._stop_at(full)
        if cut is not None:
            full = full[:cut]
        elif token is not None:  # more may follow: hold back what the next tokens could still change
            full = full[:len(full) - self._unsettled(full)]
        if not full.startswith(self.text):  # a merge changed emitted text: emit nothing rather than repeat
            return ""
        delta, self.text = full[len(self.text):], full
        return delta

    def _unsettled(self, text: str) -> int:
        """Length of the tail that may still change: an incomplete character, or a stop string's prefix."""
        if text.endswith("\ufffd"):
            return len(text) - len(text.rstrip("\ufffd"))
        return max((n for s in self.stops for n in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:n])), default=0)

    def _stop_at(self, text: str) -> int | None:
        hits = [(text.find(s), s) for s in self.stops if s in text]
        if not hits:
            return None
        at, stop = min(hits)
        self.stopped = stop
        return at
