"""Bad input, told apart from bugs.

`BadInput` is what a user can fix: a flag, a preset field, a file, the data, an
output folder. Its message names the thing and says what was expected. Validation,
the data sources, the configuration guards and weights loading raise it (or a
subclass); the command lines print it as `error: ...` and exit with status 2
(`exit_on_bad_input`). Anything else is a bug and keeps its traceback (exit 1).

It subclasses ValueError, so code that catches ValueError around a bad value keeps
working; only the command lines are strict about which errors they swallow.
"""
from __future__ import annotations

import functools
import sys
from typing import Callable


class BadInput(ValueError):
    """Input the user can fix; the message names it and what was expected."""


class DataError(BadInput):
    """Bad or missing data: the message says what was found and what was expected."""


def exit_on_bad_input(main: Callable[..., int]) -> Callable[..., int]:
    """A command line's `main`: BadInput prints `error: ...` and returns 2; any other
    exception propagates with its traceback."""
    @functools.wraps(main)
    def wrapped(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except BadInput as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return wrapped
