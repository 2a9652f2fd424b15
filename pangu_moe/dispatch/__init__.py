"""Dispatch and combine: move routed tokens into per-expert buffers and back."""
from pangu_moe.dispatch.dispatcher import Dispatcher

__all__ = ["Dispatcher"]
