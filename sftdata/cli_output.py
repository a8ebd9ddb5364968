"""Terminal output shared by every command: one stderr console and one way to stop with an error."""

from __future__ import annotations

import sys
from typing import NoReturn

from rich.console import Console
from rich.markup import escape

# soft_wrap: rich would otherwise insert newlines at the terminal width (80 columns when not a terminal), splitting
# messages that contain long paths; tables and progress bars still lay themselves out to the width.
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def fail(message: object, exit_code: int = 1) -> NoReturn:
    """Print ``error: MESSAGE`` on stderr as one unwrapped line and exit with ``exit_code``."""
    err_console.print(f"[bold red]error:[/] {escape(str(message))}")
    sys.exit(exit_code)
