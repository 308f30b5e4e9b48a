"""Faster first calls of Taichi kernels in a process: the same source positions, built cheaper.

At the first call of each kernel in a process, Taichi 1.7.4 walks the kernel's Python AST
(also when the compiled kernel then comes from its offline cache) and, for every statement,
formats an error-message snippet: the source line and a ``^^^`` hint under it, each passed
through ``textwrap.TextWrapper(width=80).wrap``. Measured with cProfile on the 2-core Xeon,
the wrapping was 0.67 s of the 1.65 s that the first splat forward + backward took. Nearly
every line is shorter than 80 characters, and for such a line ``wrap`` only drops the trailing
spaces. :class:`OneLineWrapper` returns that at once and hands anything else (longer lines,
tabs or other whitespace characters, non-default options) to ``TextWrapper`` itself, so the
snippets Taichi stores are unchanged (``tests/test_launch.py`` compares both on every line of
the engine's kernel sources and on edge cases).

:func:`install` puts it in place of the ``TextWrapper`` that Taichi's AST transformer uses.
Like the cached launch of :mod:`.launch`, it is on only for the Taichi version it was
written against, and ``RGS_TAICHI_LAUNCH=taichi`` leaves Taichi untouched.
"""
from __future__ import annotations

import re
import textwrap

from . import launch

_OTHER_WHITESPACE = re.compile("[\t\n\x0b\x0c\r]")  # what TextWrapper expands or replaces by spaces


class OneLineWrapper(textwrap.TextWrapper):
    """``TextWrapper`` with a shortcut for a line that needs no wrapping (see the module)."""

    def wrap(self, text: str) -> list[str]:
        simple = (len(text) <= self.width and not _OTHER_WHITESPACE.search(text)
                  and self.drop_whitespace and not self.initial_indent and self.max_lines is None)
        if not simple:
            return super().wrap(text)
        line = text.rstrip(" ")
        return [line] if line else []


def install() -> bool:
    """Use :class:`OneLineWrapper` in Taichi's AST transformer; whether it was installed."""
    if not launch.enabled():
        return False
    from taichi.lang.ast import ast_transformer_utils

    ast_transformer_utils.TextWrapper = OneLineWrapper
    return True
