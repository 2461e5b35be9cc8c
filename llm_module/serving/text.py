"""A row's text as its tokens arrive: incremental decoding and stop strings.

Decoding each new token alone breaks words and multi-byte characters (a token may hold half a
UTF-8 character, and sentencepiece drops a leading space at the start of a decode), so each step
decodes a short window: the last few tokens already turned into text plus the new ones, and
keeps what the new ones added (the method of text-generation-inference and vLLM). Text that could
still be the start of a stop string is held back, so a stream never shows a stop string.
"""

from __future__ import annotations


class TextAssembler:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.text = ""  # the decoded text so far (cut at a stop string once one appeared)
        self.emitted = 0  # characters of ``text`` handed out as pieces
        self.stopped = False  # a stop string appeared: the row is done
        self._prefix_offset = 0  # window start
        self._read_offset = 0  # tokens already turned into text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        """Add one token; return the text that is now final (may be empty)."""
        self.ids.append(token)
        window = self.ids[self._prefix_offset:]
        before = self._decode(self.ids[self._prefix_offset:self._read_offset])
        after = self._decode(window)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
            self._check_stop()
        return self._piece()

    def finish(self) -> str:
        """The row ended: flush what was held back (an unfinished character, a possible stop start)."""
        if not self.stopped and self._read_offset < len(self.ids):
            before = self._decode(self.ids[self._prefix_offset:self._read_offset])
            after = self._decode(self.ids[self._prefix_offset:])
            self.text += after[len(before):]
            self._read_offset = len(self.ids)
            self._check_stop()
        piece = self.text[self.emitted:]
        self.emitted = len(self.text)
        return piece

    def _check_stop(self) -> None:
        for stop in self.stop:
            index = self.text.find(stop)
            if index != -1:
                self.text = self.text[:index]
                self.stopped = True

    def _piece(self) -> str:
        end = len(self.text) - (0 if self.stopped else self._held_back())
        piece = self.text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return piece

    def _held_back(self) -> int:
        """Characters at the end of the text that could begin a stop string."""
        longest = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
