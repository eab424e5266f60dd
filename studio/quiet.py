"""Library chatter the studio's user should not see, silenced in one place (the CLI and app.py call it first).

What goes: transformers' notice that its image processors fall back to PIL without torchvision (the studio never
uses them), the libraries' INFO/WARNING logs about their own internals, and their loading progress bars (the
studio shows its own progress). What stays: every Python warning the studio raises for the user (a truncated
prompt, an empty mask...), and the libraries' errors. TRANSFORMERS_VERBOSITY / DIFFUSERS_VERBOSITY set in the
environment still win, for debugging.
"""

from __future__ import annotations

import logging
import os

# Logged while transformers is being imported, so it is filtered by name rather than by level alone.
_NOISE = ("requires torchvision (not installed)",)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in _NOISE)


def quiet_libraries() -> None:
    """Silence the libraries' chatter; call it before `pipelines` is imported (it imports diffusers and
    transformers, which log at import). Safe to call more than once."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers sets up its logger
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    logger = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(f, _DropNoise) for f in logger.filters):
        logger.addFilter(_DropNoise())

    import diffusers.utils.logging
    import transformers.utils.logging

    for library, env in ((transformers.utils.logging, "TRANSFORMERS_VERBOSITY"),
                         (diffusers.utils.logging, "DIFFUSERS_VERBOSITY")):
        library.set_verbosity(getattr(logging, os.environ[env].upper(), logging.ERROR))  # also when imported before
        library.disable_progress_bar()  # "Loading pipeline components", "Loading weights": the studio shows its own
