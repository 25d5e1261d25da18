"""AUTOMATIC1111's prompt emphasis syntax, so evaluation prompts mean what they mean in A1111.

``(text)`` multiplies the attention of ``text`` by 1.1, ``[text]`` divides it by 1.1, ``(text:1.5)``
sets it to 1.5 times, and brackets nest by multiplying. ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are
literal characters. A bracket never closed still applies to the rest of the prompt; a closing
bracket without an opening one is plain text, as in A1111. ``BREAK`` (upper case, a word of its own) ends the
current 75-token chunk.
"""

from __future__ import annotations

import re

from lorafactory.train.text import BREAK, Fragments

EMPHASIS = 1.1

_TOKENS = re.compile(
    r"""\\[()\[\]\\]           # an escaped bracket or backslash
    | \\                        # a lone backslash
    | [(\[]                     # an opening bracket
    | :\s*([+-]?[.\d]+)\s*\)    # an explicit weight closing a round bracket
    | [)\]]                     # a closing bracket
    | [^\\()\[\]:]+             # plain text
    | :                         # a colon that is only text
    """,
    re.VERBOSE,
)
_BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*")


def parse_attention(prompt: str) -> Fragments:
    """The prompt as (text, weight) fragments, neighbours of equal weight merged; BREAK as ``("BREAK", BREAK)``."""
    fragments: list[list] = []  # [text, weight]
    open_round: list[int] = []  # where each still-open bracket's fragments start
    open_square: list[int] = []

    def scale(start: int, factor: float) -> None:
        for fragment in fragments[start:]:
            if fragment[1] != BREAK:
                fragment[1] *= factor

    for match in _TOKENS.finditer(prompt):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            fragments.append([token[1:] or token, 1.0])
        elif token == "(":
            open_round.append(len(fragments))
        elif token == "[":
            open_square.append(len(fragments))
        elif weight is not None and open_round:
            scale(open_round.pop(), _number(weight))
        elif token == ")" and open_round:
            scale(open_round.pop(), EMPHASIS)
        elif token == "]" and open_square:
            scale(open_square.pop(), 1 / EMPHASIS)
        else:  # text, including a closing bracket or weight that closes nothing
            for index, part in enumerate(_BREAK_WORD.split(token)):
                if index:
                    fragments.append(["BREAK", BREAK])
                fragments.append([part, 1.0])
    for start in open_round:
        scale(start, EMPHASIS)
    for start in open_square:
        scale(start, 1 / EMPHASIS)
    merged: list[tuple[str, float]] = []
    for text, weight in fragments:
        if not text:
            continue
        if merged and merged[-1][1] == weight and weight != BREAK:
            merged[-1] = (merged[-1][0] + text, weight)
        else:
            merged.append((text, weight))
    return merged or [("", 1.0)]


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return 1.0


def plain_text(prompt: str) -> str:
    """The prompt's words without emphasis syntax (for tag matching and CLIP alignment)."""
    return "".join(text if weight != BREAK else ", " for text, weight in parse_attention(prompt))
