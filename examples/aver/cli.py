"""Shared command-line behaviour: a user error is one line on stderr, not a traceback."""

from __future__ import annotations

import os
import sys
from typing import Callable

# What a wrong path, a bad option value or incompatible data raises in this example.
# RuntimeError too: a missing face cascade or MFH support is reported that way.
USER_ERRORS = (ValueError, OSError, RuntimeError)


def run_main(main: Callable[[], object]) -> None:
    """Call ``main()``; print ``error: <message>`` and exit 2 on a user error.

    Set ``AVER_TRACEBACK=1`` to get the full traceback instead (for bug reports).
    """
    try:
        main()
    except USER_ERRORS as e:
        if os.environ.get("AVER_TRACEBACK") == "1":
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
