"""The Gradio studio: `build_app(model)` assembles one module per tab (see app.py)."""

from .app import CSS, build_app

__all__ = ["CSS", "build_app"]
