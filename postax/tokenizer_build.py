"""`build_tokenizer`, importable from this path as before; it lives in `postax.tokenizer.build`."""

from postax.tokenizer.build import build_tokenizer

__all__ = ["build_tokenizer"]
