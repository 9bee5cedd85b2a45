"""User-facing errors. The CLI prints them as one line and exits 2; anything else is a bug."""


class MergeabilityError(ValueError):
    """Bad input: the message names the problem and, where there is one, the fix."""
