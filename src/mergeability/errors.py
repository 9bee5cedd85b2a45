"""User-facing errors. The CLI prints them as one line and exits 2; anything else is a bug."""


class MergeabilityError(ValueError):
    """Bad input: the message names the problem and, where there is one, the fix."""


def one_line(e: BaseException) -> str:
    """An exception's message as one line (its first), or its type's name when it has none: what a
    MergeabilityError quotes of a library's failure."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
