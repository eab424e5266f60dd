"""The Gradio studio: `build_app(model)` assembles one module per tab (see app.py)."""

from .app import build_app

__all__ = ["build_app"]
