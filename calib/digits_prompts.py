"""The prompts of ``digits-t2i``: short descriptions of a handwritten digit, several paraphrases per digit.

Training paraphrases and held-out paraphrases are disjoint as whole prompts and use different templates:
the held-out ones (``ditq eval``'s prompts) are never seen in training, but every word they use appears in
some training prompt (new combinations of known words), so the tokenizer maps none of them to its unknown
token and no held-out word has an untrained embedding. Torch-free.
"""

from __future__ import annotations

from functools import lru_cache

from ditq.errors import DitqError

NUM_DIGITS = 10
NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLITS = ("train", "held-out")

# {d}: the numeral ("7"), {n}: the word ("seven")
TRAIN_TEMPLATES = (
    "{d}",
    "{n}",
    "a handwritten {d}",
    "the digit {n}",
    "a {n}",
    "number {n}",
    "the number {d}",
    "a digit {d}",
    "handwritten {n}",
    "an image of a {d}",
    "a picture of a {n}",
    "a drawing of {n}",
    "{d} written",
    "{n} by hand",
)
HELD_OUT_TEMPLATES = (
    "a drawing of the number {d}",
    "{n} written by hand",
    "a picture of the digit {d}",
    "the handwritten number {n}",
    "an image of the number {n}",
)


def _check_digit(digit: int) -> int:
    if isinstance(digit, bool) or not isinstance(digit, int) or not 0 <= digit < NUM_DIGITS:
        raise DitqError(f"digit must be an integer 0..9, got {digit!r:.40}")
    return digit


def _fill(templates: tuple[str, ...], digit: int) -> tuple[str, ...]:
    d = _check_digit(digit)
    return tuple(t.format(d=d, n=NAMES[d]) for t in templates)


def train_prompts(digit: int) -> tuple[str, ...]:
    """The training paraphrases of ``digit`` (0..9)."""
    return _fill(TRAIN_TEMPLATES, digit)


def held_out_prompts(digit: int) -> tuple[str, ...]:
    """The held-out paraphrases of ``digit``: none of them a training prompt of any digit."""
    return _fill(HELD_OUT_TEMPLATES, digit)


def prompt_for(digit: int, i: int, split: str = "held-out") -> str:
    """The ``i``-th prompt of ``digit`` in ``split`` (``train`` or ``held-out``), cycling."""
    if split not in SPLITS:
        raise DitqError(f"split must be one of {', '.join(SPLITS)}, got {split!r:.40}")
    prompts = train_prompts(digit) if split == "train" else held_out_prompts(digit)
    return prompts[i % len(prompts)]


@lru_cache(maxsize=1)
def vocabulary() -> tuple[str, ...]:
    """Every word of every prompt, lower case, sorted: the tokenizer's vocabulary (besides its special tokens)."""
    words = {w for d in range(NUM_DIGITS) for p in (*train_prompts(d), *held_out_prompts(d)) for w in p.lower().split()}
    return tuple(sorted(words))
