"""Chunked evaluation of the objective from hidden states and output heads."""

from .chunked import Head, chunked_objective, default_chunk_size, score_target

__all__ = ["Head", "chunked_objective", "default_chunk_size", "score_target"]
