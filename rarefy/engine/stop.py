"""Stop strings and streaming: where generated text ends, and how much of it is safe to show."""

from __future__ import annotations


def cut_at_stop(text: str, stops) -> tuple[str, bool]:
    """text up to the earliest stop string, and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stops) if i != -1]
    return (text[:min(cuts)], True) if cuts else (text, False)


def visible_length(text: str, stops) -> int:
    """How much of an unfinished row's text can be shown: hold back an incomplete UTF-8
    sequence, and any tail that could still grow into a stop string."""
    visible = len(text.rstrip("\ufffd")) if text.endswith("\ufffd") else len(text)
    for s in stops:
        for k in range(min(len(s) - 1, visible), 0, -1):
            if text[:visible].endswith(s[:k]):
                visible -= k
                break
    return visible
