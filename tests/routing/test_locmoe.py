"""LocMoE's testable claims (Lemmas 1-2, Theorem 1, the locality loss) and our readings of it."""
import numpy as np
import mindspore as ms
import pytest
from scipy.stats import chisquare
from mindspore import Tensor, ops

from pangu_moe.dispatch.topology import Topology
from pangu_moe.routing import route
from pangu_moe.routing.locmoe import LocMoERouter, grap_cosines, grap_logits, grap_weight
from pangu_moe.routing.losses import locality_loss


def _x(t, h, seed=0):
    return np.random.default_rng(seed).standard_normal((t, h)).astype(np.float32)


def test_grap_is_orthogonal_block_means():
    w = grap_weight(12, 4)
    np.testing.assert_allclose(w @ w.T, (4 / 12) * np.eye(4), rtol=1e-6)
    x = _x(5, 12)
    np.testing.assert_allclose(grap_logits(Tensor(x), 4).asnumpy(), x @ w.T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grap_logits(Tensor(x), 4).asnumpy(), x.reshape(5, 4, 3).mean(-1), rtol=1e-6)
    with pytest.raises(ValueError, match="hidden = 10 must be a multiple"):
        grap_weight(10, 4)


def test_lemma1_argmax_of_logits_is_argmax_of_cosine():
    x = Tensor(_x(1000, 64, seed=1))
    w = grap_weight(64, 8)
    cos = grap_cosines(x, 8).asnumpy()
    direct = (x.asnumpy() @ w.T) / (np.linalg.norm(x.asnumpy(), axis=1, keepdims=True) * np.linalg.norm(w, axis=1))
    np.testing.assert_allclose(cos, direct, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(cos.argmax(1), grap_logits(x, 8).asnumpy().argmax(1))


def test_lemma2_top1_frequencies_are_uniform():
    x = Tensor(_x(100_000, 32, seed=2))
    counts = np.bincount(grap_logits(x, 8).asnumpy().argmax(1), minlength=8)
    assert chisquare(counts).pvalue > 0.01


def _router(h=16, e=4, g=1, mu=0.0, variant="kl", mask=None, bias=True):
    mask = np.ones((1, e), bool) if mask is None else mask
    return LocMoERouter(h, e, g, 1, 0.01, 0.0, mu, variant, mask, use_bias=bias)


def test_with_zero_locality_weight_locmoe_is_grap_switch():
    x = _x(40, 16, seed=3)
    zeros = Tensor(np.zeros(40, np.int32))
    r = route(_router(), Tensor(x), zeros, zeros, capacity=40)
    pre = x.reshape(40, 4, 4).mean(-1)
    relu = np.maximum(pre, 0)
    probs = np.exp(relu) / np.exp(relu).sum(1, keepdims=True)
    np.testing.assert_array_equal(r.expert_index.asnumpy()[:, 0], pre.argmax(1))
    np.testing.assert_allclose(r.gate.asnumpy()[:, 0], probs[np.arange(40), pre.argmax(1)], rtol=1e-5)
    f = np.bincount(pre.argmax(1), minlength=4) / 40
    assert float(r.aux_loss.asnumpy()) == pytest.approx(0.01 * 4 * (f * probs.mean(0)).sum(), rel=1e-5)
    assert float(r.locality_loss.asnumpy()) == 0.0


def test_groups_use_per_group_biases_and_stay_in_group():
    router = _router(e=8, g=2)
    bias = np.zeros((2, 4), np.float32)
    bias[1, 3] = 100.0  # group 1 always picks its last expert
    router.bias.set_data(Tensor(bias))
    groups = Tensor((np.arange(20) % 2).astype(np.int32))
    idx = route(router, Tensor(_x(20, 16)), groups, groups, capacity=20).expert_index.asnumpy()[:, 0]
    assert (idx[1::2] == 7).all() and (idx[0::2] < 4).all()


def _loss(probs, mask, variant):
    return float(locality_loss(Tensor(np.asarray(probs, np.float32)), Tensor(np.asarray(mask, np.float32)),
                               variant, 1.0, ms.float64).asnumpy())


MASK = [[1, 1, 0, 0], [0, 0, 1, 1]]  # 2 ranks on 2 nodes, 2 experts per node


def test_locality_variant_a_is_nonnegative_and_minimal_at_the_smoothed_target():
    rng = np.random.default_rng(0)
    for _ in range(20):
        p = rng.dirichlet(np.ones(4), size=6)
        assert _loss(p, MASK, "kl") >= 0
    eps = 1e-3
    target0 = (1 - eps) * np.array([0.5, 0.5, 0, 0]) + eps / 4
    target1 = (1 - eps) * np.array([0, 0, 0.5, 0.5]) + eps / 4
    at_target = np.array([target0] * 3 + [target1] * 3)
    assert _loss(at_target, MASK, "kl") == pytest.approx(0.0, abs=1e-6)
    assert np.isfinite(_loss(np.array([[0, 0, 0, 1.0]] * 6), MASK, "kl"))


def test_locality_variant_b_is_zero_iff_all_mass_local_and_decreasing_in_local_mass():
    local = np.array([[0.5, 0.5, 0, 0]] * 3 + [[0, 0, 0.7, 0.3]] * 3)
    assert _loss(local, MASK, "mass") == pytest.approx(0.0, abs=1e-7)
    values = []
    for m in (0.2, 0.5, 0.8, 0.99):
        p = np.array([[m, 0, 1 - m, 0]] * 3 + [[1 - m, 0, m, 0]] * 3)
        values.append(_loss(p, MASK, "mass"))
    assert all(a > b > 0 for a, b in zip(values, values[1:]))


def test_locality_is_zero_on_ranks_whose_node_hosts_no_expert():
    # 2 experts over 4 one-device nodes: experts on nodes 0 and 2, none on nodes 1 and 3.
    mask = Topology(nodes=4, devices_per_node=1, num_experts=2).local_expert_mask()
    assert mask.tolist() == [[True, False], [False, False], [False, True], [False, False]]
    hosting = [[0.9, 0.1], [0.3, 0.7]]  # one token each on ranks 0 and 2
    for variant in ("kl", "mass"):
        a = _loss([hosting[0], [0.5, 0.5], hosting[1], [0.5, 0.5]], mask, variant)
        b = _loss([hosting[0], [1.0, 0.0], hosting[1], [0.0, 1.0]], mask, variant)
        alone = _loss(hosting, mask[[0, 2]], variant)  # the two hosting ranks on their own
        assert alone > 0
        assert a == pytest.approx(b, abs=1e-7) and a == pytest.approx(alone / 2, rel=1e-6)


def test_locality_loss_trains_the_input_toward_local_experts():
    mask = Topology(nodes=2, devices_per_node=1, num_experts=4).local_expert_mask()
    router = _router(mu=1.0, variant="mass", mask=mask, bias=False)
    router.aux_loss_coeff = 0.0
    zeros = Tensor(np.zeros(8, np.int32))

    def loss(x):
        return router(x, zeros, zeros, 8, True)[5][2]  # locality_loss

    grad = ms.grad(loss)(Tensor(_x(8, 16))).asnumpy()
    assert np.abs(grad).max() > 0
    # Rank 0 (tokens 0-3) is pulled toward experts 0-1, i.e. up in the first two blocks of x.
    assert grad[:4, :8].sum() < 0 < grad[:4, 8:].sum()
    assert ops.isfinite(Tensor(grad)).all()


def test_two_rank_layer_averages_each_ranks_own_locality_loss():
    """A layer holding W = 2 ranks (2 nodes x 1 device, experts 0-1 on node 0, 2-3 on node 1) in one process:
    its locality loss is the mean over ranks of KL(D_c(r) || D~_l(r)), each rank with its own tokens and its
    own node's experts (numpy oracle below)."""
    from pangu_moe.model.pangu import build_moe_layer
    from tests.conftest import tiny_config
    cfg = tiny_config("moe.router=locmoe", "moe.num_experts=4", "moe.num_groups=1", "model.hidden=16",
                      "moe.locmoe.locality_coeff=1.0", "parallel.nodes=2", "parallel.devices_per_node=1")
    layer = build_moe_layer(cfg.model, cfg.moe, 0, 0.02, Topology(2, 1, 4), "simulated")
    tokens = 12  # per rank
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2 * tokens, 16)).astype(np.float32)
    x[:tokens, :8] += 1.0  # rank 0 leans to experts 0-1, rank 1 to none in particular
    ids = Tensor(np.zeros(2 * tokens, np.int32))
    losses = layer.route(Tensor(x), ids, ids, 2 * tokens, True)[5].asnumpy()
    probs = np.exp(np.maximum(x.reshape(-1, 4, 4).mean(-1), 0))
    probs /= probs.sum(1, keepdims=True)
    per_rank = []
    for r, local in enumerate(([1, 1, 0, 0], [0, 0, 1, 1])):
        current = probs[r * tokens:(r + 1) * tokens].mean(0)
        target = 0.999 * np.array(local) / 2 + 0.001 / 4
        per_rank.append((current * np.log(current / target)).sum())
    assert per_rank[0] != pytest.approx(per_rank[1], rel=1e-2)  # the ranks' losses differ, so the test can tell
    assert float(losses[2]) == pytest.approx(np.mean(per_rank), rel=1e-5)


@pytest.mark.parametrize("router", ["locmoe", "locmoe_plus"])
def test_the_locality_smoothing_is_the_configured_eps(router):
    # the formula at eps: one rank, experts 0 and 1 local, all mass split evenly on them:
    # KL = log(0.5 / ((1 - eps) 0.5 + eps / 4))
    probs, mask = Tensor(np.array([[0.5, 0.5, 0, 0]], np.float32)), Tensor(np.array([[1, 1, 0, 0]], np.float32))
    assert float(locality_loss(probs, mask, "kl", 1.0, ms.float64, 0.1).asnumpy()) == \
        pytest.approx(np.log(0.5 / 0.475), rel=1e-6)
    assert _loss([[0.5, 0.5, 0, 0]], [[1, 1, 0, 0]], "kl") == pytest.approx(np.log(0.5 / 0.49975), rel=1e-4)
    # and the router's own locality loss follows the configured eps
    from pangu_moe.config import RunConfig
    from pangu_moe.routing.registry import build_router
    x, zeros = Tensor(_x(16, 32, seed=4)), Tensor(np.zeros(16, np.int32))
    found = []
    for eps in (0.1, 1e-3):
        cfg = RunConfig.from_dict({"model": {"hidden": 32}, "moe": {
            "router": router, "num_experts": 4, "num_groups": 1,
            router: {"locality_smoothing": eps, "locality_coeff": 1.0}}})
        built = build_router(cfg.model, cfg.moe, 0, Topology(2, 1, 4))
        found.append(float(built(x, zeros, zeros, 16, True, 0)[5][2].asnumpy()))
    assert found[0] < found[1]  # a wider smoothing is a closer target: a smaller KL
