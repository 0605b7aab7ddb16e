"""The one error type users see: a bad input, reported as one line with exit code 2; and the two helpers
that cut what a message repeats (a user's value, an exception's text) to a sane length."""

import json


class DitqError(Exception):
    """Bad input (file, model, recipe, option). The CLI prints ``ditq: error: <message>`` and exits 2."""


def shown(value: object, limit: int = 80, *, quote: bool = True, as_json: bool = False, kinds: bool = False) -> str:
    """``value`` for an error message, cut to about ``limit`` characters: user input echoed in a message
    can be megabytes long, or an integer too long for Python to print. A cut value ends in
    ``... (N characters)``; an integer of more than ``4 * limit`` bits is named by its number of digits.

    ==================  ==========================================================================
    spelling            ``shown('a')``, ``shown(None)``, ``shown([1, 2])``
    ==================  ==========================================================================
    default             ``repr``: ``'a'``, ``None``, ``[1, 2]``
    ``quote=False``     a string (or path) as it is: ``a``; other values as ``str``
    ``as_json=True``    as a JSON file writes it: ``"a"``, ``null``, ``[1, 2]`` (``repr`` if not JSON)
    ``kinds=True``      a JSON value in a type error: an object or array by its kind (``a JSON
                        array``), null, booleans and numbers as JSON writes them, strings as ``quote``
    ==================  ==========================================================================
    """
    if kinds and isinstance(value, (dict, list)):
        return "a JSON object" if isinstance(value, dict) else "a JSON array"
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 4 * limit:
        return f"<an integer of about {int(value.bit_length() * 0.30103) + 1} digits>"
    if isinstance(value, str):  # cut before quoting: the repr of megabytes is megabytes
        head = value[:limit]
        text = json.dumps(head) if as_json else repr(head) if quote else head
        return text if len(value) <= limit else f"{text}... ({len(value)} characters)"
    try:
        text = json.dumps(value) if as_json or kinds else repr(value) if quote else str(value)
    except (TypeError, ValueError, RecursionError):  # not JSON, holds an integer too long to print, or too deep
        try:
            text = repr(value)
        except (ValueError, RecursionError):
            return f"<a {type(value).__name__}>"
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def one_line(message: object, limit: int = 300) -> str:
    """``message`` (an exception, or text) on one line, cut to about ``limit`` characters keeping its start
    and its end (where parsers and ONNX Runtime put the cause); an exception without text is named by its
    type."""
    text = " ".join(str(message).split())
    if not text and isinstance(message, BaseException):
        text = type(message).__name__
    keep = max(limit // 2 - 3, 1)
    return text if len(text) <= limit else f"{text[:keep]} ... {text[-keep:]}"
