import numpy as np
import mindspore as ms
from mindspore import Tensor

from pangu_moe.routing import route
from pangu_moe.routing.rre import RandomRoutedRouter, build_rre_tables


def test_tables_are_deterministic_and_balanced():
    a = build_rre_tables(256, 5, 3, seed=(0, 1))
    b = build_rre_tables(256, 5, 3, seed=(0, 1))
    c = build_rre_tables(256, 5, 3, seed=(0, 2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    for g in range(3):
        shares = np.bincount(a[g], minlength=5)
        assert shares.sum() == 256 and shares.max() - shares.min() <= 1
    assert not np.array_equal(a[0], a[1])  # each group has its own table


def test_router_sends_tokens_into_their_group_with_gate_one():
    tables = build_rre_tables(256, 4, 2, seed=(0, 0))
    router = RandomRoutedRouter(tables, 8)
    tokens = np.arange(256, dtype=np.int32)
    groups = (tokens % 2).astype(np.int32)
    r = route(router, Tensor(np.zeros((256, 8), np.float32)), Tensor(tokens), Tensor(groups), capacity=256)
    idx = r.expert_index.asnumpy()[:, 0]
    np.testing.assert_array_equal(idx, groups * 4 + tables[groups, tokens])
    assert ((idx // 4) == groups).all()
    assert (r.gate.asnumpy() == 1).all() and float(r.aux_loss.asnumpy()) == 0.0


def test_same_token_same_expert_regardless_of_hidden_state():
    tables = build_rre_tables(256, 4, 1, seed=(0, 0))
    router = RandomRoutedRouter(tables, 4)
    tokens = Tensor(np.array([5, 5, 9, 5], np.int32))
    zeros = Tensor(np.zeros(4, np.int32))
    x = Tensor(np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32))
    idx = route(router, x, tokens, zeros, capacity=4).expert_index.asnumpy()[:, 0]
    assert idx[0] == idx[1] == idx[3] == tables[0, 5] and idx[2] == tables[0, 9]


def test_table_survives_a_checkpoint_reload(tmp_path):
    router = RandomRoutedRouter(build_rre_tables(256, 4, 2, seed=(1, 0)), 8)
    path = str(tmp_path / "r.ckpt")
    ms.save_checkpoint(router, path)
    other = RandomRoutedRouter(build_rre_tables(256, 4, 2, seed=(99, 0)), 8)
    assert not np.array_equal(other.table.asnumpy(), router.table.asnumpy())
    ms.load_param_into_net(other, ms.load_checkpoint(path))
    np.testing.assert_array_equal(other.table.asnumpy(), router.table.asnumpy())
    assert not other.table.requires_grad
