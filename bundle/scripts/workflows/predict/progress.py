"""ignite's ProgressBar, with log lines printed above the bar instead of through it.

Per-image messages (done, skipped, failed) are logged while the bar is drawn; without this, a terminal shows them
glued to half-drawn bars.  tqdm's own logging redirect is switched on for the run only.  An exception that stops the
run still stops it: ignite gives it to the EXCEPTION_RAISED handlers instead of raising it, so this one raises it.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar
from tqdm.contrib.logging import logging_redirect_tqdm


class LoggingProgressBar(ProgressBar):
    """ProgressBar(persist, **tqdm_kwargs) that routes the console log handlers through tqdm.write while running."""

    def __init__(self, persist: bool = True, **tqdm_kwargs: Any) -> None:
        super().__init__(persist=persist, **tqdm_kwargs)
        self._redirect: contextlib.ExitStack | None = None

    def attach(self, engine: Engine, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        super().attach(engine, *args, **kwargs)
        engine.add_event_handler(Events.STARTED, self._start_redirect)
        for event in (Events.COMPLETED, Events.TERMINATE):
            engine.add_event_handler(event, self._stop_redirect)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._stop_and_raise)

    def _stop_and_raise(self, engine: Engine, error: BaseException) -> None:
        """ignite hands an exception to its EXCEPTION_RAISED handlers instead of raising it: one that returns would
        end the run as if it had completed, so this one raises it again (as MONAI's StatsHandler does)."""
        self._stop_redirect(engine)
        raise error

    def _start_redirect(self, _: Engine) -> None:
        self._stop_redirect(_)
        self._redirect = contextlib.ExitStack()
        self._redirect.enter_context(logging_redirect_tqdm(loggers=[logging.root]))

    def _stop_redirect(self, _: Engine, *__: Any) -> None:
        if self._redirect is not None:
            self._redirect.close()
            self._redirect = None
