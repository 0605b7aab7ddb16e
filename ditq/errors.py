"""The one error type users see: a bad input, reported as one line with exit code 2."""


class DitqError(Exception):
    """Bad input (file, model, recipe, option). The CLI prints ``ditq: error: <message>`` and exits 2."""
