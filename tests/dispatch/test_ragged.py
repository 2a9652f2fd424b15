"""The ragged exchange (pangu_moe/dispatch/ragged.py): packing exact on hand-built blocks, AlltoAllV's contract
emulated on the padded primitive, the hccl path against an emulation of AlltoAllV, the rows that travel equal
the kept choices (intra/inter split by node), and a MoE layer equal to the padded one in output and gradients."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn

from pangu_moe.accounting.traffic import exchange_bytes
from pangu_moe.dispatch.collectives import SimulatedAllToAll
from pangu_moe.dispatch.ragged import (EmulatedAlltoAllV, HcclAlltoAllV, RaggedExchange, node_rows, pack, positions,
                                      unpack)
from pangu_moe.dispatch.topology import Topology
from pangu_moe.model.pangu import build_moe_layer
from tests.conftest import tiny_config

# 1 source rank, 2 destinations, blocks of S = 3 slots: block 0 holds slots 0 and 2, block 1 slot 1.
OCC = np.array([[[1, 0, 1], [0, 1, 0]]], np.int32)
X = np.arange(1, 7, dtype=np.float32).reshape(1, 2, 3, 1) * 10  # slot values 10..60, H = 1


def test_pack_puts_the_occupied_rows_first_in_slot_order_and_unpack_inverts_it():
    contiguous = pack(Tensor(X), Tensor(OCC), True).asnumpy()[0, :, 0]
    assert contiguous.tolist() == [10, 30, 50, 0, 0, 0]  # block 1's row follows block 0's two rows
    strided = pack(Tensor(X), Tensor(OCC), False).asnumpy()[0, :, 0]
    assert strided.tolist() == [10, 30, 0, 50, 0, 0]  # each block at q * S
    for layout, packed in ((True, contiguous), (False, strided)):
        back = unpack(Tensor(packed.reshape(1, 6, 1)), Tensor(OCC), layout).asnumpy()
        assert back[..., 0].tolist() == (X[..., 0] * OCC).tolist()
    assert positions(Tensor(OCC))[1].asnumpy().tolist() == [[2, 1]]


def test_emulated_alltoallv_keeps_alltoallvs_contract():
    # 3 ranks, blocks of 2: rank r sends counts[r, q] rows to q, contiguous; rank q receives them source by source.
    counts = np.array([[1, 0, 2], [2, 1, 0], [0, 1, 1]], np.int32)
    x = np.zeros((3, 6, 1), np.float32)
    for r in range(3):
        x[r, :counts[r].sum(), 0] = [100 * r + 10 * q + i for q in range(3) for i in range(counts[r, q])]
    out = EmulatedAlltoAllV(SimulatedAllToAll("world", 1, 3))(Tensor(x), Tensor(counts), Tensor(counts.T.copy()))
    for q in range(3):
        want = [100 * r + 10 * q + i for r in range(3) for i in range(counts[r, q])]
        assert out.asnumpy()[q, :, 0].tolist() == want + [0] * (6 - len(want))


class _AlltoAllVTable:
    """AlltoAllV's documented semantics for W ranks held in this test: rank r's call returns, source by source,
    the recv_numel elements each source addressed to r (reads every rank's input from `inputs`)."""

    def __init__(self, inputs, send_counts):
        self.inputs, self.send_counts, self.rank = inputs, send_counts, 0

    def __call__(self, flat, send_numel, recv_numel):
        w = len(self.inputs)
        pieces = []
        for s in range(w):
            start = int(self.send_counts[s, :self.rank].sum()) * self.h
            pieces.append(self.inputs[s][start:start + int(self.send_counts[s, self.rank]) * self.h])
        assert [p.size for p in pieces] == recv_numel.asnumpy().tolist()
        assert send_numel.asnumpy().tolist() == (self.send_counts[self.rank] * self.h).tolist()
        return Tensor(np.concatenate(pieces))


def test_hccl_path_equals_the_emulation_with_alltoallv_emulated():
    rng = np.random.default_rng(0)
    w, block, h = 4, 3, 2
    counts = rng.integers(0, block + 1, (w, w)).astype(np.int32)
    x = np.zeros((w, w * block, h), np.float32)
    for r in range(w):
        x[r, :counts[r].sum()] = rng.normal(size=(counts[r].sum(), h))
    want = EmulatedAlltoAllV(SimulatedAllToAll("world", 1, w))(Tensor(x), Tensor(counts),
                                                                Tensor(counts.T.copy())).asnumpy()
    hccl = HcclAlltoAllV()
    table = _AlltoAllVTable([x[r].reshape(-1) for r in range(w)], counts)
    table.h = h
    object.__setattr__(hccl, "all_to_all_v", table)
    for r in range(w):
        table.rank = r
        got = hccl(Tensor(x[r:r + 1]), Tensor(counts[r:r + 1]), Tensor(counts[:, r].reshape(1, w).copy()))
        np.testing.assert_array_equal(got.asnumpy()[0], want[r])


def _slots(slot_token, tokens):
    """send [R, W, S, H]: each slot holds the row of its token (slot_token [R, W, S], 1-based, 0 empty)."""
    r = np.arange(slot_token.shape[0]).reshape(-1, 1, 1)
    with_zero = np.concatenate((np.zeros_like(tokens[:, :1]), tokens), 1)
    return with_zero[r, slot_token]


@pytest.mark.parametrize("algorithm", ["flat", "hierarchical"])
def test_the_rows_that_travel_are_the_kept_choices(algorithm):
    # 2 nodes x 2 devices, E = 4 (expert q on rank q), C = 3: rank r keeps kept[r, q] choices for expert q, in
    # scattered slots, each a different token. The packed send buffer holds exactly those rows, and the exchange
    # delivers each to its slot.
    topology = Topology(2, 2, 4)
    kept = np.array([[3, 1, 2, 0], [0, 2, 0, 1], [1, 1, 1, 1], [0, 0, 3, 0]])
    slot_token = np.zeros((4, 4, 3), np.int32)
    rng = np.random.default_rng(1)
    for r in range(4):
        token = iter(rng.permutation(12) + 1)
        for q in range(4):
            for slot in rng.choice(3, kept[r, q], replace=False):
                slot_token[r, q, slot] = next(token)
    tokens = rng.normal(size=(4, 12, 5)).astype(np.float32)
    send = _slots(slot_token, tokens)
    exchange = RaggedExchange("simulated", algorithm, 0, 2, 2)
    occ = (slot_token > 0).astype(np.int32)
    packed = pack(Tensor(send), Tensor(occ), exchange.contiguous).asnumpy()
    rows_sent = (np.abs(packed).sum(-1) > 0).sum(1)  # (R,) rows a rank packs
    np.testing.assert_array_equal(rows_sent, kept.sum(1))
    assert positions(Tensor(occ))[1].asnumpy().tolist() == kept.tolist()
    received, (_, received_occ), inter_rows = exchange.dispatch(Tensor(send), Tensor(slot_token), Tensor(tokens))
    np.testing.assert_array_equal(received.asnumpy(), send.transpose(1, 0, 2, 3))
    np.testing.assert_array_equal(received_occ.asnumpy(), occ.transpose(1, 0, 2))
    # every slot holds another token here, so the stage-1 rows to the other node are the choices crossing to it
    crossing = [kept[r, 2:].sum() if r < 2 else kept[r, :2].sum() for r in range(4)]
    assert (inter_rows is None) if algorithm == "flat" else inter_rows.asnumpy().tolist() == crossing
    # the bytes the metrics report: rows both ways by tier plus each remote block's occupancy
    moved = exchange_bytes(kept, 3, topology, 5, 4)["ragged"]
    assert moved == {"intra": 248, "inter": 296}  # 5 rows each, x 2 ways x 5 values x 4 bytes, + 4 or 8 blocks of 3
    # hierarchical, if the stage-1 messages carried 3 rows to other nodes (ranks 0, 1, 2 one each): inter-node 3
    # dispatch + 5 combine rows x 20 bytes + 8 slot maps of 3 x 4 bytes; intra-node 6 choices between different
    # local ranks (0->1, 2->1, 2->3, 3->2 x 3) x 2 ways x 20 bytes + 4 ranks x 1 other local rank x 2 nodes' blocks
    # of 3 occupancies x 4 bytes
    moved = exchange_bytes(kept, 3, topology, 5, 4, inter_rows=[1, 1, 1, 0])["ragged"]
    assert moved == {"intra": 6 * 2 * 20 + 4 * 1 * 2 * 3 * 4, "inter": (3 + 5) * 20 + 8 * 3 * 4}


def test_the_hierarchical_exchange_sends_each_token_once_per_node():
    # 2 nodes x 2 devices, 3 tokens a rank, K = 2, S = 2 slots a block (E_loc = 2 experts of C = 1). Rank 0's
    # token 1 chose ranks 2 and 3 (both on node 1), token 2 ranks 1 and 3, token 3 ranks 0 and 2; rank 3's token 1
    # chose both experts of rank 2.
    slot_token = np.zeros((4, 4, 2), np.int32)
    slot_token[0] = [[3, 0], [2, 0], [1, 3], [2, 1]]
    slot_token[3] = [[0, 0], [0, 0], [1, 1], [0, 0]]  # rank 3: token 1 twice on rank 2
    slot_row, message, rows = node_rows(Tensor(slot_token), 3, 2, 2)
    # node 1 gets tokens 1, 2, 3 from rank 0 (3 rows for its 4 slots), node 0 tokens 2, 3; rank 3 sends 1 row
    assert rows.asnumpy().tolist() == [[2, 3], [0, 0], [0, 0], [0, 1]]
    assert message.asnumpy()[0].tolist() == [[2, 3, 0], [1, 2, 3]]
    assert slot_row.asnumpy()[0].tolist() == [[2, 0, 1, 0], [1, 3, 2, 1]]  # node 1's slots: tokens 1, 3, 2, 1
    rng = np.random.default_rng(2)
    tokens = rng.normal(size=(4, 3, 5)).astype(np.float32)
    send = _slots(slot_token, tokens)
    received, (_, received_occ), inter_rows = RaggedExchange("simulated", "hierarchical", 0, 2, 2).dispatch(
        Tensor(send * 0), Tensor(slot_token), Tensor(tokens))  # the send buffer is not read
    assert inter_rows.asnumpy().tolist() == [3, 0, 0, 0]  # rank 0's 3 rows to node 1; rank 3's 1 row stays home
    np.testing.assert_array_equal(received.asnumpy(), send.transpose(1, 0, 2, 3))
    np.testing.assert_array_equal(received_occ.asnumpy(), (slot_token > 0).transpose(1, 0, 2))


@pytest.fixture(scope="module")
def layers():
    """Simulated MoE layers with the same weights, K = 2, W = 4 (2 x 2), E = 8 (two experts a rank, so a token's
    two choices can share a rank or a node): ragged flat, ragged hierarchical (deduplicated) and padded."""
    cfg = tiny_config("moe.top_k=2", "moe.num_groups=1", "moe.num_experts=8", "model.hidden=16", "parallel.nodes=2",
                      "parallel.devices_per_node=2")
    built = {}
    for name, exchange, layout in (("ragged", "flat", "ragged"), ("ragged_hierarchical", "hierarchical", "ragged"),
                                   ("padded", "flat", "padded")):
        ms.set_seed(5)
        built[name] = build_moe_layer(cfg.model, cfg.moe, 0, 0.02, Topology(2, 2, 8), "simulated", exchange,
                                      exchange_layout=layout)
    return built


class _Loss(nn.Cell):
    def __init__(self, layer, capacity):
        super().__init__()
        self.layer, self.capacity = layer, capacity

    def construct(self, x, ids):
        y, losses = self.layer(x, ids, ids, self.capacity, True)[:2]
        return (y * y).sum() + losses.sum()


@pytest.mark.parametrize("capacity", [1, 16])  # 1 drops most choices; 16 = a rank's 8 tokens x K holds every one
def test_ragged_layers_equal_padded_in_output_and_gradients(layers, capacity):
    rng = np.random.default_rng(capacity)
    x = Tensor(rng.normal(size=(32, 16)).astype(np.float32))
    ids = Tensor(np.zeros(32, np.int32))
    results, inter_rows = {}, {}
    for name, layer in layers.items():
        loss = _Loss(layer, capacity)
        grad = ms.grad(loss, grad_position=0, weights=layer.trainable_params())
        out = layer(x, ids, ids, capacity, True)
        results[name] = (out[0].asnumpy(), out[3].asnumpy(), grad(x, ids))
        inter_rows[name] = out[5].asnumpy().tolist()
    # some token sends both choices to one node (expert e lives on node e // 4): the hierarchical exchange
    # then carries it once
    routing = layers["padded"].route(x, ids, ids, capacity, True)
    experts, keep = routing[0].asnumpy(), routing[2].asnumpy()
    assert ((experts[:, 0] // 4) == (experts[:, 1] // 4)).any()
    # the rows each rank (8 tokens, node r // 2) sends to the other node: one per kept choice on the flat exchange,
    # one per token on the hierarchical one
    choices, tokens = [0] * 4, [0] * 4
    for t in range(32):
        remote = [e // 4 for e, k in zip(experts[t], keep[t]) if k and e // 4 != t // 8 // 2]
        choices[t // 8] += len(remote)
        tokens[t // 8] += len(set(remote))
    assert inter_rows["ragged"] == inter_rows["padded"] == choices and inter_rows["ragged_hierarchical"] == tokens
    assert sum(tokens) < sum(choices)
    y_p, kept_p, (gx_p, gw_p) = results["padded"]
    for name in ("ragged", "ragged_hierarchical"):
        y_r, kept_r, (gx_r, gw_r) = results[name]
        assert kept_r.sum() == kept_p.sum() and (kept_r.sum() < 64) == (capacity == 1)
        np.testing.assert_allclose(y_r, y_p, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(gx_r.asnumpy(), gx_p.asnumpy(), rtol=1e-5, atol=1e-8)
        for a, b in zip(gw_r, gw_p):
            np.testing.assert_allclose(a.asnumpy(), b.asnumpy(), rtol=1e-5, atol=1e-8)
    assert np.abs(y_p).sum() > 0
