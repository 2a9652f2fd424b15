"""The PanGu-Σ-style decoder: dense blocks, MoE blocks, query layer, tied LM head."""
from pangu_moe.model.pangu import PanguModel, build_model, extract_domain

__all__ = ["PanguModel", "build_model", "extract_domain"]
