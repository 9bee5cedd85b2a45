"""`python -m mergeability` and the `mergeability` console script.

An entry point that imports nothing but the package (the OpenMP policy, the error type) before it is running, so
that an interrupt while the command line tool itself loads (typer, rich, then torch inside a command: seconds)
is the same one line and exit 130 as an interrupt later, not a traceback.
"""

import sys


def main() -> None:
    try:
        from mergeability import cli  # deferred: loading it is what an early interrupt interrupts

        cli.main()
    except KeyboardInterrupt:  # before cli.main handles them itself, or between its handlers
        print("interrupted", file=sys.stderr)
        sys.exit(130)  # cli.INTERRUPTED, which may not have loaded


if __name__ == "__main__":
    main()
