"""SparCode serving: the code-keyed index, batched search and the command line."""

from .hugepages import request_huge_pages

request_huge_pages()  # before any CPU tensor exists: torch reads the setting once

from .engine import Engine, SearchResult  # noqa: E402
from .index import CodeIndex  # noqa: E402

__all__ = ["CodeIndex", "Engine", "SearchResult"]
