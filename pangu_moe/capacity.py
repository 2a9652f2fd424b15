"""Expert capacity: pure host-side integer functions, evaluated before graph build."""
import math
from fractions import Fraction


def expert_capacity(num_tokens, num_experts, top_k, factor, min_capacity=1):
    """Slots per expert per routing group: C = ceil(K * T * factor / E), at least `min_capacity`.

    Exact rational arithmetic on the decimal factor (1.1 means 11/10), so C never depends on float
    rounding. C is capped at T: no expert can receive a token twice.

    Args:
        num_tokens: T, tokens in the routing group.
        num_experts: E.
        top_k: K.
        factor: capacity factor (> 0).
        min_capacity: lower bound on C.
    Returns:
        int C in [1, T].
    """
    if num_tokens < 1 or num_experts < 1 or top_k < 1 or factor <= 0:
        raise ValueError(f"expert_capacity: need T, E, K >= 1 and factor > 0, got "
                         f"T={num_tokens}, E={num_experts}, K={top_k}, factor={factor}")
    slots = math.ceil(Fraction(str(factor)) * top_k * num_tokens / num_experts)
    return max(1, min(num_tokens, max(min_capacity, slots)))
