"""How a recipe rule's ``match`` selects torch module names.

``match`` is an ``fnmatch`` glob (``transformer_blocks.*.attn1.to_[qkv]``), or a regular expression written
``re:<pattern>`` that must match the whole name (``re.fullmatch``'s meaning). Recipes are user input,
tried on every module name, so:

- regular expressions use RE2 syntax and are matched by RE2 (``google-re2``), in time linear in the name:
  no pattern can hang the process (Python's ``re`` backtracks: ``(.*.*)*X`` never ends). RE2 has no
  backreferences or look-around, and Python's ``\\Z`` is written ``\\z``; those are refused when compiled.
  On everything else module names need (literals, ``.``, classes, ``|``, groups, ``*+?{m,n}``, ``(?i)``)
  the two agree, and what RE2 would silently read otherwise than ``re`` is refused: ``{,n}`` and counts
  over 1000 (literal text to RE2), POSIX classes inside brackets. ``\\d``, ``\\w``, ``\\s`` are ASCII in RE2;
- globs keep ``fnmatch``'s meaning; a ``[`` that no ``]`` follows (a literal) is written ``[[]``, which
  ``fnmatch`` reads the same, since its translation would rescan the rest of the pattern for each one;
- a ``match`` is at most ``MAX_MATCH_CHARS`` characters; every compile failure is one ``DitqError``
  naming the rule, with the rule cut to a readable length.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

import re2

from ditq.errors import DitqError, shown

MAX_MATCH_CHARS = 4096  # module names are tens of characters


@dataclass(frozen=True)
class NamePattern:
    """A checked ``match``: :meth:`selects` tells whether it selects a module name."""

    match: str
    _regex: Any = field(default=None, init=False, repr=False, compare=False)  # the RE2 program of ``re:``
    _glob: str = field(default="", init=False, repr=False, compare=False)  # the glob as fnmatch reads it

    def __post_init__(self) -> None:
        if not isinstance(self.match, str):
            raise DitqError(f"recipe rule match must be a string, got {shown(self.match)}")
        if len(self.match) > MAX_MATCH_CHARS:
            raise DitqError(f"recipe rule {shown(self.match)}: a match is at most {MAX_MATCH_CHARS} characters")
        if self.match.startswith("re:"):
            object.__setattr__(self, "_regex", _compile_rule_regex(self.match))
        else:
            object.__setattr__(self, "_glob", _linear_glob(self.match))

    def selects(self, name: str) -> bool:
        if self._regex is not None:
            return self._regex.fullmatch(name) is not None
        return fnmatch.fnmatchcase(name, self._glob)


def _compile_rule_regex(match: str):
    """RE2 program of a ``re:`` rule; every way compiling can fail is the rule's error."""
    differs = _reads_unlike_python(match[3:])
    if differs:
        raise DitqError(f"recipe rule {shown(match)}: bad regular expression ({differs}; RE2 syntax)")
    options = re2.Options()
    options.log_errors = False  # the reason is in the exception; RE2 would also print it to stderr
    try:
        return re2.compile(match[3:], options)
    except re2.error as e:
        why = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else str(e)
        raise DitqError(f"recipe rule {shown(match)}: bad regular expression ({shown(why)}; RE2 syntax)") from None
    except UnicodeError:  # a lone surrogate (JSON "\\ud800") has no UTF-8 form
        raise DitqError(f"recipe rule {shown(match)}: bad regular expression (not valid Unicode text)") from None
    except (RecursionError, OverflowError, ValueError) as e:
        raise DitqError(f"recipe rule {shown(match)}: bad regular expression ({type(e).__name__})") from None


_BRACE = re2.compile(r"\{([0-9]*)(,([0-9]*))?\}")


def _reads_unlike_python(pattern: str) -> str | None:
    """What RE2 would silently read otherwise than Python's ``re`` in ``pattern``, or None: a brace that
    ``re`` reads as a repeat and RE2 as literal text (``{,n}``, ``{,}``, counts over 1000), or a POSIX
    class (``[[:digit:]]``, which ``re`` reads as the characters ``[:digt`` then ``]``)."""
    i, n, class_start = 0, len(pattern), -1  # class_start: first character of the open class, -1 outside
    while i < n:
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        if class_start >= 0:
            if c == "]" and i > class_start:  # a "]" first in a class is a literal one
                class_start = -1
            elif c == "[" and pattern[i + 1 : i + 2] in (":", "=", "."):
                return f"{pattern[i : i + 2]!r} inside a class"
        elif c == "[":
            class_start = i + 1 + (pattern[i + 1 : i + 2] == "^")
        elif c == "{":
            m = _BRACE.match(pattern, i)
            if m and (m.group(1) or m.group(2)):
                counts = [g for g in (m.group(1), m.group(3)) if g]
                if not m.group(1) or any(len(g) > 4 or int(g) > 1000 for g in counts):
                    return f"repeat {shown(m.group(0), 20)}: counts are written {{m}}, {{m,}} or {{m,n}}, at most 1000"
        i += 1
    return None


def _linear_glob(pattern: str) -> str:
    """``pattern`` with each ``[`` that opens no class (no ``]`` closes it) written ``[[]``: the same glob
    for ``fnmatch`` (a class of ``[`` alone), whose translation otherwise rescans the rest of the pattern
    for every such ``[`` (quadratic in the length). Classes are delimited exactly as ``fnmatch`` does."""
    if "[" not in pattern:
        return pattern
    n = len(pattern)
    next_close = [n] * (n + 1)  # next_close[k]: index of the first "]" at or after k (n: none)
    for k in range(n - 1, -1, -1):
        next_close[k] = k if pattern[k] == "]" else next_close[k + 1]
    out, i = [], 0
    while i < n:
        if pattern[i] != "[":
            out.append(pattern[i])
            i += 1
            continue
        j = i + 1
        j += j < n and pattern[j] == "!"
        j += j < n and pattern[j] == "]"  # a "]" first in a class belongs to it
        end = next_close[j]
        out.append("[[]" if end == n else pattern[i : end + 1])
        i = i + 1 if end == n else end + 1
    return "".join(out)
