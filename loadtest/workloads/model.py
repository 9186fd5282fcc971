"""What a workload is: conversations of turns, each turn one request, plus optional arrival times.

A single-shot workload is a list of one-turn conversations. A multi-turn conversation's
later turns depend on the server's reply to the earlier ones, so the request body of a
turn is only built when it is sent (``render``), from the history the runner keeps.

This module owns the request shapes; it refuses to own sending (``loadtest.runner``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Api = Literal["completions", "chat"]


@dataclass(frozen=True)
class Turn:
    """One request: a user text (chat / text completions) or a token-id prompt (traces)."""

    text: str | None = None
    token_ids: tuple[int, ...] | None = None
    max_tokens: int = 16


@dataclass(frozen=True)
class Conversation:
    """Turns sent one after another, each after the previous reply arrived.

    ``system`` opens the history; ``arrival_s`` is the first turn's send time from the
    start of the run when the workload carries its own clock (traces), else None.
    """

    id: int
    turns: tuple[Turn, ...]
    system: str | None = None
    arrival_s: float | None = None


@dataclass
class History:
    """The growing conversation as the runner saw it: user turns and the replies returned."""

    conversation: Conversation
    replies: list[str] = field(default_factory=list)

    def body(self, turn_index: int, api: Api, model: str) -> tuple[str, dict[str, Any]]:
        """(endpoint path, JSON body) of turn ``turn_index``, including every earlier reply."""
        turn = self.conversation.turns[turn_index]
        if turn.token_ids is not None:
            return "/v1/completions", {"model": model, "prompt": list(turn.token_ids), "max_tokens": turn.max_tokens}
        if api == "chat":
            return "/v1/chat/completions", {
                "model": model, "messages": self.messages(turn_index), "max_tokens": turn.max_tokens}
        return "/v1/completions", {"model": model, "prompt": self.prompt(turn_index), "max_tokens": turn.max_tokens}

    def messages(self, turn_index: int) -> list[dict[str, str]]:
        conv = self.conversation
        out: list[dict[str, str]] = []
        if conv.system is not None:
            out.append({"role": "system", "content": conv.system})
        for i in range(turn_index + 1):
            out.append({"role": "user", "content": conv.turns[i].text or ""})
            if i < turn_index:
                out.append({"role": "assistant", "content": self.replies[i]})
        return out

    def prompt(self, turn_index: int) -> str:
        """A plain-text transcript; a one-turn conversation is just system + question."""
        conv = self.conversation
        if len(conv.turns) == 1:
            return "\n\n".join(p for p in (conv.system, conv.turns[0].text) if p)
        parts = [conv.system or ""]
        for i in range(turn_index + 1):
            parts.append(f"\nUser: {conv.turns[i].text}\nAssistant:")
            if i < turn_index:
                parts.append(" " + self.replies[i])
        return "".join(parts)


@dataclass(frozen=True)
class Workload:
    """A named, seeded, finite list of conversations."""

    name: str
    seed: int
    conversations: tuple[Conversation, ...]
    params: dict[str, Any]

    @property
    def n_requests(self) -> int:
        return sum(len(c.turns) for c in self.conversations)

    @property
    def timed(self) -> bool:
        """True when every conversation carries its own arrival time (trace replay)."""
        return bool(self.conversations) and all(c.arrival_s is not None for c in self.conversations)
