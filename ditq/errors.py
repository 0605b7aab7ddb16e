"""The one error type users see: a bad input, reported as one line with exit code 2."""


class DitqError(Exception):
    """Bad input (file, model, recipe, option). The CLI prints ``ditq: error: <message>`` and exits 2."""


def shown(value: object, limit: int = 80) -> str:
    """``repr(value)`` for an error message, cut to about ``limit`` characters: user input echoed in a
    message can be megabytes long, or an integer too long for Python to print."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 4 * limit:
        return f"<an integer of about {int(value.bit_length() * 0.30103) + 1} digits>"
    if isinstance(value, str) and len(value) > limit:
        return repr(value[:limit]) + f"... ({len(value)} characters)"
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # holds an integer too long to print, or is nested too deeply
        return f"<a {type(value).__name__}>"
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"
