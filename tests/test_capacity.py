import pytest

from pangu_moe.capacity import expert_capacity


@pytest.mark.parametrize("args, expected", [
    ((4096, 8, 1, 1.25), 640),
    ((4096, 8, 1, 1.1), 564),    # 4505.6 / 8 = 563.2 -> 564
    ((4096, 8, 2, 1.25), 1280),
    ((100, 8, 1, 1.0), 13),      # 12.5 -> 13
    ((40, 4, 1, 1.1), 11),       # exactly 11 with rational arithmetic (float gives 11.000000000000002)
    ((10, 4, 1, 0.01), 4),       # min_capacity default in the call below
    ((10, 2, 2, 8.0), 10),       # capped at T
])
def test_expert_capacity_exact(args, expected):
    assert expert_capacity(*args, min_capacity=4) == expected


def test_expert_capacity_rejects_bad_arguments():
    with pytest.raises(ValueError, match="factor=0"):
        expert_capacity(10, 2, 1, 0)
