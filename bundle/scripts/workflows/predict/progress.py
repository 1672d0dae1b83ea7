"""ignite's ProgressBar, with log lines printed above the bar instead of through it.

Per-image messages (done, skipped, failed) are logged while the bar is drawn; without this, a terminal shows them
glued to half-drawn bars.  tqdm's own logging redirect is switched on for the run only.
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
        for event in (Events.COMPLETED, Events.EXCEPTION_RAISED, Events.TERMINATE):
            engine.add_event_handler(event, self._stop_redirect)

    def _start_redirect(self, _: Engine) -> None:
        self._stop_redirect(_)
        self._redirect = contextlib.ExitStack()
        self._redirect.enter_context(logging_redirect_tqdm(loggers=[logging.root]))

    def _stop_redirect(self, _: Engine, *__: Any) -> None:
        if self._redirect is not None:
            self._redirect.close()
            self._redirect = None
