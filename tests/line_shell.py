"""A Django shell that runs one line of Python per line of standard input and answers "done"
after each: a third process that makes changes without paying for a start-up each time.

    python -m tests.line_shell
"""

from __future__ import annotations

import os
import sys

import django


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "hal0web.settings")
    django.setup()
    scope: dict[str, object] = {}
    for line in sys.stdin:
        exec(line, scope)
        print("done", flush=True)


if __name__ == "__main__":
    main()
