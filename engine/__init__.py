"""SparCode serving: the code-keyed index, batched search and the command line."""

from .engine import Engine, SearchResult
from .index import CodeIndex

__all__ = ["CodeIndex", "Engine", "SearchResult"]
