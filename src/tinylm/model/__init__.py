"""The model: layers and the transformer that stacks them."""

from tinylm.model.layers import KVCache, cache_rows
from tinylm.model.transformer import Transformer, parameter_summary

__all__ = ["Transformer", "KVCache", "cache_rows", "parameter_summary"]
