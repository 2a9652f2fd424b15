"""pangu_moe: PanGu-Sigma-style sparse MoE language models with locality-aware routing, on MindSpore."""
__version__ = "0.1.0"
