"""Final-answer extraction from a model response, as in the study's (DeepScaleR-style) verifier.

The answer is the content of the LAST `\\boxed{...}` (or `\\fbox{...}`, or `\\boxed x` without braces);
only when there is no box are the named fallbacks tried. Everything here runs in time linear in the
response length: responses are untrusted model output (100 kB, binary garbage, thousands of braces).
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType

__all__ = ["FALLBACKS", "extract_answer", "validate_fallbacks"]

_THINK_CLOSE = "</think>"
# A box command not followed by a letter (`\boxedfoo` is another macro).
_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
# A backslash escapes the next character (`\{`, `\}`, `\\`), so only bare braces count.
_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.DOTALL)
_BARE_TOKEN = re.compile(r"[ \t]+([^\s{}$]+)")
_SPACE = re.compile(r"\s*")
_ANSWER_ANCHOR = re.compile(r"\banswer\b[*_]*(?:\s+is\b|\s*:)[*_]*:?", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(?:\s|$)")
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_DECORATION = " \t*_`$"


def extract_answer(response: str, *, require_think_close: bool = False, fallbacks: Sequence[str] = ()) -> str | None:
    """The final answer in `response`, or None when there is none.

    With `require_think_close`, only the text after the last `</think>` counts (no `</think>` -> None).
    `fallbacks` (names from `FALLBACKS`, tried in order) apply only when the text holds no usable box.
    """
    order = validate_fallbacks(fallbacks)
    text = response
    if require_think_close:
        cut = text.rfind(_THINK_CLOSE)
        if cut < 0:
            return None
        text = text[cut + len(_THINK_CLOSE) :]
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    for name in order:
        found = FALLBACKS[name](text)
        if found is not None:
            return found
    return None


def validate_fallbacks(fallbacks: Sequence[str]) -> tuple[str, ...]:
    """`fallbacks` as a tuple; raises ValueError naming the allowed names for an unknown one."""
    if isinstance(fallbacks, str):
        raise ValueError(f"fallbacks must be a sequence of names, not the string {fallbacks!r}")
    for name in fallbacks:
        if name not in FALLBACKS:
            raise ValueError(f"unknown answer fallback {name!r}; allowed: {sorted(FALLBACKS)}")
    return tuple(fallbacks)


def last_boxed(text: str) -> str | None:
    """Content of the last box whose braces balance (stripped); unbalanced boxes are skipped."""
    starts = [m.end() for m in _BOX.finditer(text)]
    if not starts:
        return None
    closing = _match_braces(text, starts[0])
    for start in reversed(starts):
        content = _box_content(text, start, closing)
        if content is not None:
            return content.strip()
    return None


def _match_braces(text: str, begin: int) -> dict[int, int]:
    """Index of each bare `{` from `begin` on -> index of its matching `}`, in one pass with a stack.

    Iterative on purpose: a recursive matcher overflows on thousands of nested braces.
    """
    stack: list[int] = []
    closing: dict[int, int] = {}
    for m in _BRACE_TOKEN.finditer(text, begin):
        tok = m.group()
        if tok == "{":
            stack.append(m.start())
        elif tok == "}" and stack:
            closing[stack.pop()] = m.start()
    return closing


def _box_content(text: str, start: int, closing: dict[int, int]) -> str | None:
    """The argument of the box command ending at `start`: `{...}` or a single bare token."""
    i = _SPACE.match(text, start).end()
    if text.startswith("{", i):
        end = closing.get(i)
        return None if end is None else text[i + 1 : end]
    bare = _BARE_TOKEN.match(text, start)
    return bare.group(1) if bare else None


def _answer_is(text: str) -> str | None:
    """The rest of the line after the last "answer is" / "Answer:", up to the end of its sentence."""
    last = _last_match(_ANSWER_ANCHOR, text)
    if last is None:
        return None
    newline = text.find("\n", last.end())
    line = text[last.end() : newline if newline >= 0 else len(text)]
    end = _SENTENCE_END.search(line)
    answer = _strip_decoration(line[: end.start()] if end else line)
    return answer or None


def _last_match(pattern: re.Pattern[str], text: str) -> re.Match[str] | None:
    tail = deque(pattern.finditer(text), maxlen=1)  # keeps only the last match: constant memory
    return tail[0] if tail else None


def _strip_decoration(s: str) -> str:
    """Drop markdown emphasis, `$` math delimiters and a trailing period around an answer."""
    return s.rstrip(_DECORATION + ".").lstrip(_DECORATION)


def _last_number(text: str) -> str | None:
    """The last integer, decimal or fraction in the text, thousands separators removed."""
    last = _last_match(_NUMBER, text)
    return last.group().replace(",", "") if last else None


FALLBACKS: Mapping[str, Callable[[str], str | None]] = MappingProxyType(
    {"answer_is": _answer_is, "last_number": _last_number}
)
"""Answer fallbacks by name, for responses without a box."""
