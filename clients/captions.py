"""Live captions on a terminal: committed text is kept, the partial hypothesis is redrawn in place."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from typing import Any, TextIO, TypeVar

from streaming.client import ClientError

T = TypeVar("T")

CLEAR_LINE = "\r\x1b[2K"
DIM, RESET = "\x1b[2m", "\x1b[0m"


class Captions:
    """Prints server events as captions on ``stream``.

    On a terminal the current line shows the utterance's committed text followed by the partial (dimmed),
    redrawn with ``\\r`` and clear-line; lines that fill the width and finished utterances are kept. On
    anything else (a pipe, a file) only committed text is written, one line per utterance or full width.
    """

    def __init__(self, stream: TextIO | None = None, tty: bool | None = None,
                 width: Callable[[], int] | None = None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.color = self.tty and "NO_COLOR" not in os.environ
        self._width = width or self._terminal_width
        self._line = ""  # committed text of the current line, not yet kept
        self._partial = ""

    def __call__(self, event: dict[str, Any]) -> None:
        """Handle one server message (usable as ``stream_audio(on_event=...)``)."""
        kind = event.get("type")
        if kind == "final":
            self._line += event["text"]
            self._wrap()
        elif kind == "partial":
            self._partial = event["text"]
        elif kind == "utterance_end":
            self._keep_line()
        elif kind == "error":
            self.notice(f"server error {event.get('code')}: {event.get('message')}")
        elif kind == "warning":
            self.notice(f"server warning {event.get('code')}: {event.get('message')}")
        else:
            return
        self._redraw()

    def notice(self, text: str) -> None:
        """Print a line of its own (a warning, a status) without disturbing the captions."""
        self._write_kept(f"[{text}]")
        self._redraw()

    def close(self) -> None:
        """Keep the last committed text and clear the partial."""
        self._partial = ""
        self._keep_line()
        self._redraw()

    def run(self, prog: str, work: Callable[[], T], interrupted: str = "interrupted") -> tuple[int, T | None]:
        """Run ``work`` with these captions on screen and close them however it ends.

        Returns exit status 0 and its result; after a :class:`ClientError` (status 1) or Ctrl-C (status 130),
        the status and None, with the reason printed on stderr as ``prog: ...``.
        """
        try:
            result = work()
        except ClientError as exc:
            status, reason = 1, str(exc)
        except KeyboardInterrupt:
            status, reason = 130, interrupted
        else:
            self.close()
            return 0, result
        self.close()
        print(f"{prog}: {reason}", file=sys.stderr)
        return status, None

    def _terminal_width(self) -> int:
        try:
            return os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, ValueError, OSError):  # not a terminal, or no file descriptor
            return shutil.get_terminal_size().columns

    def _columns(self) -> int:
        return max(20, self._width() - 1)  # never write into the last column: some terminals wrap there

    def _wrap(self) -> None:
        """Keep full-width lines of committed text: the live line must fit on one terminal row."""
        columns = self._columns()
        while len(self._line.strip()) > columns:
            text = self._line.strip()
            cut = text.rfind(" ", 0, columns + 1)
            cut = cut if cut > 0 else columns
            self._write_kept(text[:cut])
            self._line = text[cut:]

    def _keep_line(self) -> None:
        if self._line.strip():
            self._write_kept(self._line.strip())
        self._line = ""

    def _write_kept(self, text: str) -> None:
        self.stream.write(f"{CLEAR_LINE if self.tty else ''}{text}\n")
        self.stream.flush()

    def _redraw(self) -> None:
        if not self.tty:
            return
        line, partial = self._line.strip(), self._partial.strip()
        room = self._columns() - len(line) - (1 if line else 0)
        if partial and room < 10:  # too little room for the partial: keep the committed text and start afresh
            self._keep_line()
            line, room = "", self._columns()
        if len(partial) > room:
            partial = "…" + partial[len(partial) - room + 1 :]
        if partial:
            partial = f"{DIM}{partial}{RESET}" if self.color else partial
            line = f"{line} {partial}" if line else partial
        self.stream.write(CLEAR_LINE + line)
        self.stream.flush()
