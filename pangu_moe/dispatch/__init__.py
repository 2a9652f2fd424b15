"""Dispatch and combine: move routed tokens into per-expert buffers and back."""
from pangu_moe.dispatch.local import LocalDispatcher

__all__ = ["LocalDispatcher"]
