"""Text <-> token ids for the server: chat rendering with message boundaries, incremental detokenization, stops.

Chat messages are tokenized one message at a time: the template renders the conversation up to each
message, and the text each message adds is encoded on its own. A conversation's token ids are then
the concatenation of its messages' ids, so the ids of a conversation always begin with the ids of any
earlier part of it (a BPE merge can never run across a message boundary), and the server knows the
token position of every boundary: where a saved state can be resumed.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..data.tokenizer import CHAT_TEMPLATE


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of text as the model reads it (no special tokens added)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


@dataclass
class ChatPrompt:
    """ids: the rendered conversation; boundaries: token counts at which a message ends (ascending);
    system_end: the count at which the leading system/developer messages end (None without any)."""

    ids: list[int]
    boundaries: list[int]
    system_end: int | None


class ChatFormat:
    """Renders OpenAI-style messages with the tokenizer's chat template (CHAT_TEMPLATE when it has none)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.template = getattr(tokenizer, "chat_template", None) or CHAT_TEMPLATE
        self.builtin = self.template == CHAT_TEMPLATE

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        if not messages and not add_generation_prompt:
            return ""
        return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> ChatPrompt:
        """The token ids of messages (+ the assistant's header) with the position of every message boundary.

        A template whose rendering of a conversation does not start with the rendering of its first
        messages (one that looks ahead, e.g. to the last message) is encoded as one text: no boundaries.
        """
        ids: list[int] = []
        boundaries: list[int] = []
        done = ""
        try:
            for k in range(1, len(messages) + 1):
                text = self._render(messages[:k], False)
                if not text.startswith(done):
                    raise ValueError("the template is not incremental")
                ids += encode(self.tokenizer, text[len(done):])
                done = text
                boundaries.append(len(ids))
            if add_generation_prompt:
                text = self._render(messages, True)
                if not text.startswith(done):
                    raise ValueError("the template is not incremental")
                ids += encode(self.tokenizer, text[len(done):])
        except Exception:  # noqa: BLE001  (a template may refuse a partial conversation: render it whole)
            return ChatPrompt(encode(self.tokenizer, self._render(messages, add_generation_prompt)), [], None)
        leading = 0
        while leading < len(messages) and messages[leading]["role"] in ("system", "developer"):
            leading += 1
        return ChatPrompt(ids, boundaries, boundaries[leading - 1] if leading else None)


class IncrementalDetokenizer:
    """Text of a growing list of token ids, one piece per token, without re-decoding the whole list.

    Decodes a short window (from the start of the last emitted piece) and emits what it adds, holding
    back while the text ends inside a multi-byte character (U+FFFD). Works for byte-level BPE and for
    tokenizers whose decoding of a token depends on the one before it (leading-space markers).
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # start of the window decoded for context
        self.read = 0  # ids already turned into text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip) if ids else ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        if len(self.ids) - self.read >= 8 and after.endswith("\ufffd"):  # not a character in the making
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is held back (an unfinished character comes out as U+FFFD)."""
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):]


class StopMatcher:
    """Finds the first stop string in a growing text; releases only text that cannot be the start of one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""  # text not yet released
        self.stopped = False

    def add(self, piece: str) -> str:
        """Text safe to emit after piece arrives ("" when it may still be part of a stop string)."""
        if self.stopped:
            return ""
        self.text += piece
        if not self.stops:
            out, self.text = self.text, ""
            return out
        first = min((i for i in (self.text.find(s) for s in self.stops) if i >= 0), default=-1)
        if first >= 0:
            out, self.text, self.stopped = self.text[:first], "", True
            return out
        cut = max(0, len(self.text) - self.hold)
        out, self.text = self.text[:cut], self.text[cut:]
        return out

    def flush(self) -> str:
        out, self.text = ("" if self.stopped else self.text), ""
        return out
