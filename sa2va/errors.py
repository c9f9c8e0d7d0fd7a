"""One error type for everything a user can fix: bad input, bad config, missing files.

Entrypoints catch it and print a single line (no traceback) with a non-zero exit.
"""

from __future__ import annotations

import sys
from typing import Callable, NoReturn


class UserError(Exception):
    """A problem with the user's input; the message names the file or key."""


def fail(message: str, code: int = 2) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def run_cli(main: Callable[[], int | None]) -> None:
    """Run an entrypoint's main(); turn UserError into one line and exit code 2."""
    try:
        code = main()
    except UserError as err:
        fail(str(err))
    except KeyboardInterrupt:
        fail("interrupted", code=130)
    raise SystemExit(code or 0)
