"""Detokenisation while streaming, and stop strings.

The text of a request is re-decoded from all its generated ids at each token (byte-level BPE can merge
bytes across tokens), and only what is new is emitted. A trailing incomplete character (decoded as U+FFFD)
is held back until the bytes that complete it arrive. When a stop string appears, the text ends before it
and nothing after it is emitted.
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
        elif token is not None and full.endswith("\ufffd"):
            return ""  # an incomplete character: wait for the rest of its bytes
        if not full.startswith(self.text):  # a merge changed earlier text: emit nothing rather than repeat
            self.text = full
            return ""
        delta, self.text = full[len(self.text):], full
        return delta

    def _stop_at(self, text: str) -> int | None:
        hits = [(text.find(s), s) for s in self.stops if s in text]
        if not hits:
            return None
        at, stop = min(hits)
        self.stopped = stop
        return at
