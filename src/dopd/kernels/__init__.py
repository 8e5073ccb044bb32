"""Chunked evaluation of the objective from hidden states and output heads (docs/scale.md, "Memory")."""

from ..types import Head
from .chunked import chunked_objective
from .scores import default_chunk_size, score_target

__all__ = ["Head", "chunked_objective", "default_chunk_size", "score_target"]
