"""User-facing errors: expected mistakes print one clear message instead of a traceback."""

import functools
import sys
from collections.abc import Callable


class UserError(Exception):
    """A mistake the user can fix (bad config, missing file, wrong layer name). The message says how."""


def exit_on_user_error(main: Callable) -> Callable:
    """Run `main`; a UserError prints `error: <message>` and exits with status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper
