"""User-facing errors: expected mistakes print one clear message instead of a traceback."""

import functools
import reprlib
import sys
from collections.abc import Callable
from typing import Any

QUOTE_LIMIT = 200  # characters of a user's value an error message repeats; a 300 MB value is not echoed back


class UserError(Exception):
    """A mistake the user can fix (bad config, missing file, wrong layer name). The message says how."""


class Interrupted(Exception):
    """The user stopped the run (Ctrl-C); the message says how to continue. Exit status 130, as a shell gives."""

    exit_code = 130


def quote(value: Any, limit: int = QUOTE_LIMIT) -> str:
    """repr(value) cut to `limit` characters; reprlib never builds a deeply shared one ("billion laughs") in full."""
    short = reprlib.Repr()  # attributes, not keywords: Python 3.10 and 3.11 take none
    short.maxlevel = 4
    short.maxlist = short.maxdict = short.maxtuple = short.maxset = 8
    short.maxstring = short.maxother = limit
    text = short.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def exit_on_user_error(main: Callable) -> Callable:
    """A UserError prints `error: <message>` and exits with status 2, Ctrl-C one line and status 130: no traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except Interrupted as e:
            print(e, file=sys.stderr)
            sys.exit(Interrupted.exit_code)
        except KeyboardInterrupt:  # outside training (start-up, an export): there is no run to continue
            print("interrupted", file=sys.stderr)
            sys.exit(Interrupted.exit_code)

    return wrapper
