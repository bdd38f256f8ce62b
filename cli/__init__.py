"""The ``sparcode`` command line, above the packages it drives: the serving commands
(``info``, ``search``, ``recommend``), the training commands (``train``, ``export``,
``evaluate``, ``demo``) and ``bench``. ``sparcode.engine`` never imports it."""

from .app import build_parser, main

__all__ = ["build_parser", "main"]
