"""Progress bars for the long jobs (eval, fit, localize): on stderr, and only when it is a terminal.

A log file or a pipe gets no bar, so scripted runs and their captured output stay clean; without
tqdm installed there is no bar either, and the results are the same.
"""

from __future__ import annotations

import sys
from types import TracebackType

__all__ = ["Progress"]


class Progress:
    """A bar of `total` steps labelled `desc`; silent unless `enabled` and stderr is a terminal."""

    def __init__(self, total: int, desc: str, unit: str = "batch", enabled: bool = True) -> None:
        self.bar = None
        if enabled and total > 0 and sys.stderr.isatty():
            try:
                from tqdm import tqdm  # type: ignore[import-untyped,unused-ignore]
            except ImportError:
                return
            self.bar = tqdm(total=total, unit=unit, desc=desc, file=sys.stderr, leave=False)

    def step(self, what: str = "", n: int = 1) -> None:
        if self.bar is not None:
            if what:
                self.bar.set_postfix_str(what, refresh=False)
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()
