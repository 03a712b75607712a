"""A1111 prompt-weighting syntax, parsed (pure): ``(word:1.3)``, ``(word)`` x1.1, ``[word]``
/1.1, nesting multiplies, ``\\(`` ``\\)`` ``\\[`` ``\\]`` are literal brackets.

The parser follows AUTOMATIC1111's ``parse_prompt_attention`` (modules/prompt_parser.py), so
prompts written for A1111 keep their meaning; the encoding of the weighted fragments (and of
prompts past 77 CLIP tokens, in 77-token chunks) is compel's (``worker/engine/weighting.py``).
Compel's own syntax (``word+``, ``.and()``, ``.blend()``) is not read: ``+`` and ``-`` stay
literal, as in A1111. ``BREAK`` is literal text too.
"""

from __future__ import annotations

import logging
import re

log = logging.getLogger(__name__)

ROUND, SQUARE = 1.1, 1 / 1.1  # A1111's multipliers for (x) and [x]
SYNTAX = frozenset("()[]\\")
_ATTENTION = re.compile(r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|"
                        r"[^\\()\[\]:]+|:")


def has_syntax(text: str | None) -> bool:
    """Whether ``text`` has weighting syntax (a bracket or an escape) to parse."""
    return bool(text) and not SYNTAX.isdisjoint(text)


def parse_attention(text: str) -> list[tuple[str, float]]:
    """``"a (red:1.5) [fox]"`` -> ``[("a ", 1.0), ("red", 1.5), (" ", 1.0), ("fox", 0.909)]``:
    the text in runs of equal weight; brackets left open apply to the end of the prompt."""
    parts: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for part in parts[start:]:
            part[1] *= factor

    for match in _ATTENTION.finditer(text):
        piece, weight = match.group(0), match.group(1)
        if piece.startswith("\\"):
            parts.append([piece[1:], 1.0])
        elif piece == "(":
            round_open.append(len(parts))
        elif piece == "[":
            square_open.append(len(parts))
        elif weight is not None and round_open:
            try:
                multiply(round_open.pop(), float(weight))
            except ValueError:  # ":." or "1.2.3": A1111 would fail; keep it as text
                parts.append([piece, 1.0])
        elif piece == ")" and round_open:
            multiply(round_open.pop(), ROUND)
        elif piece == "]" and square_open:
            multiply(square_open.pop(), SQUARE)
        else:
            parts.append([piece, 1.0])
    for start in round_open:
        multiply(start, ROUND)
    for start in square_open:
        multiply(start, SQUARE)
    merged: list[list] = []
    for piece, weight in parts:
        if merged and merged[-1][1] == weight:
            merged[-1][0] += piece
        else:
            merged.append([piece, weight])
    return [(piece, weight) for piece, weight in merged if piece] or [("", 1.0)]


def plain_text(text: str) -> str:
    """The prompt without its syntax: what the pooled embedding reads."""
    return "".join(piece for piece, _ in parse_attention(text))
