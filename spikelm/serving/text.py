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


def _compile(template: str):
    """template compiled once, in a sandbox set up as transformers' apply_chat_template sets up its own (None when
    it uses something beyond that: apply_chat_template then renders it)."""
    try:
        from jinja2 import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        return None

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except TemplateError:
        return None


class ChatFormat:
    """Renders OpenAI-style messages with the tokenizer's chat template (CHAT_TEMPLATE when it has none).

    CHAT_TEMPLATE renders every message on its own, so a conversation is rendered message by message
    (O(messages)); another template is rendered at every prefix of the conversation (O(messages^2)
    text) to find what each message adds.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.template = getattr(tokenizer, "chat_template", None) or CHAT_TEMPLATE
        self.per_message = self.template == CHAT_TEMPLATE
        self._compiled = _compile(self.template)
        self._tokens = dict(getattr(tokenizer, "special_tokens_map", {}) or {})

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        if not messages and not add_generation_prompt:
            return ""
        if self._compiled is not None:
            return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         tools=None, documents=None, **self._tokens)
        return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def _pieces(self, messages: list[dict], add_generation_prompt: bool) -> list[str]:
        """The text each message adds to the rendering (then the generation prompt's); ValueError when the
        template's rendering of a conversation does not start with that of its first messages."""
        if self.per_message:
            pieces = [self._render([m], False) for m in messages]
            return pieces + [self._render([], True)] if add_generation_prompt else pieces
        pieces, done = [], ""
        for k in range(1, len(messages) + 1):
            text = self._render(messages[:k], False)
            if not text.startswith(done):
                raise ValueError("the template is not incremental")
            pieces.append(text[len(done):])
            done = text
        if add_generation_prompt:
            text = self._render(messages, True)
            if not text.startswith(done):
                raise ValueError("the template is not incremental")
            pieces.append(text[len(done):])
        return pieces

    def prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> ChatPrompt:
        """The token ids of messages (+ the assistant's header) with the position of every message boundary.

        A template that looks ahead (its rendering of a conversation does not start with the rendering
        of its first messages) is encoded as one text: no boundaries.
        """
        try:
            pieces = self._pieces(messages, add_generation_prompt)
        except Exception:  # noqa: BLE001  (a template may refuse a partial conversation: render it whole)
            return ChatPrompt(encode(self.tokenizer, self._render(messages, add_generation_prompt)), [], None)
        encoded = self.tokenizer([p for p in pieces if p], add_special_tokens=False)["input_ids"] if any(pieces) else []
        parts = iter(encoded)
        ids: list[int] = []
        boundaries: list[int] = []
        for k, piece in enumerate(pieces):
            if piece:
                ids += next(parts)
            if k < len(messages):
                boundaries.append(len(ids))
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
