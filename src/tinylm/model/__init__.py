"""The model: layers and the transformer that stacks them."""

from tinylm.model.layers import KVCache, cache_rows
from tinylm.model.transformer import Transformer, on_meta, parameter_summary

__all__ = ["Transformer", "KVCache", "cache_rows", "on_meta", "parameter_summary"]
