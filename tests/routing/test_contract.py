"""The Router contract (pangu_moe/routing/base.py), checked on every registered router.

Adding a router = its module, its config section, and one line in CASES: the settings it needs on the
tiny setting below (G = 2 groups of 4 experts, 2 nodes x 1 device, two 8-token sequences per rank).
"""
import numpy as np
import mindspore as ms
import pytest
from mindspore import Tensor

from pangu_moe.dispatch.topology import Topology
from pangu_moe.model.pangu import build_moe_layer
from pangu_moe.routing import ROUTERS, router_class
from tests.conftest import tiny_config

CASES = {
    "topk": ["moe.top_k=2"],
    "topk-sigmoid-k1": ["moe.router=topk", "moe.topk.score_function=sigmoid"],
    "rre": [],
    "locmoe": ["moe.locmoe.locality_coeff=0.1"],
    "locmoe_plus": ["moe.top_k=2", "moe.locmoe_plus.score_threshold=0.6"],
    "expert_choice": [],
    "sinkhorn": ["moe.top_k=2"],
    "deepseek": ["moe.deepseek.node_limit=1"],  # K = 1: the raw sigmoid gate must train the router
    "deepseek-k2": ["moe.router=deepseek", "moe.top_k=2", "moe.deepseek.node_limit=1"],
    "base": [],
    "kool_skip": ["moe.slot_policy=random"],
}
SETTING = ["moe.num_experts=8", "moe.num_groups=2", "model.hidden=16", "model.seq_len=8", "train.batch_size=4",
           "parallel.nodes=2", "parallel.devices_per_node=1", "runtime.mode=pynative"]
WORLD, TOKENS, CAPACITY = 2, 16, 3  # ranks, tokens per rank, a binding capacity


def _config(case):
    overrides = CASES[case]
    router = [] if any(o.startswith("moe.router=") for o in overrides) else [f"moe.router={case}"]
    return tiny_config(*SETTING, *router, *overrides)


def _inputs(cfg, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((TOKENS, cfg.model.hidden)).astype(np.float32)
    token_ids = rng.integers(0, cfg.model.vocab_size, TOKENS).astype(np.int32)
    group_ids = np.repeat(np.array([0, 1], np.int32), TOKENS // 2)  # one sequence per domain
    return x, token_ids, group_ids


def _route(router, x, token_ids, group_ids, capacity, training, rank):
    return [o.asnumpy() for o in router(Tensor(x), Tensor(token_ids), Tensor(group_ids), capacity, training, rank)]


def _router(cfg):
    topology = Topology(cfg.parallel.nodes, cfg.parallel.devices_per_node, cfg.moe.num_experts)
    return router_class(cfg.moe.router).from_config(cfg.model, cfg.moe, 0, topology)


def test_every_built_in_router_has_a_case():
    built_in = {name for name, cls in ROUTERS.items() if cls.__module__.startswith("pangu_moe.")}
    covered = {_config(case).moe.router for case in CASES}
    assert built_in <= covered, f"add a line to CASES for {sorted(built_in - covered)}"


def check_routing(outputs, group_ids, num_experts, experts_per_group, capacity):
    """The contract's invariants on one rank's routing tuple (numpy); raises AssertionError."""
    expert_index, gate, keep, slot, requested, losses, log_prob = outputs
    tokens, columns = expert_index.shape
    for name, value, dtype in (("expert_index", expert_index, np.int32), ("gate", gate, np.float32),
                               ("keep", keep, np.bool_), ("slot", slot, np.int32), ("requested", requested, np.bool_),
                               ("log_prob", log_prob, np.float32)):
        assert value.shape == (tokens, columns) and value.dtype == dtype, name
    assert losses.shape == (3,) and losses.dtype == np.float32 and np.isfinite(losses).all()
    assert np.isfinite(gate).all() and np.isfinite(log_prob).all()
    assert not (keep & ~requested).any(), "a kept choice was not requested"
    group = np.broadcast_to(group_ids.reshape(-1, 1), expert_index.shape)
    assert (expert_index[requested] // experts_per_group == group[requested]).all(), "expert outside its group"
    for e in range(num_experts):
        slots = np.sort(slot[keep & (expert_index == e)])
        assert len(slots) <= capacity, f"expert {e} keeps {len(slots)} > C = {capacity}"
        assert slots.tolist() == list(range(len(slots))), f"expert {e}: kept slots {slots} not 0..n-1"
    for t in range(tokens):
        chosen = expert_index[t][requested[t]]
        assert len(set(chosen.tolist())) == len(chosen), f"token {t} requests an expert twice"


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("training", [True, False])
def test_routing_invariants(case, training):
    cfg = _config(case)
    router = _router(cfg)
    for rank in range(WORLD):
        x, token_ids, group_ids = _inputs(cfg, seed=rank)
        outputs = _route(router, x, token_ids, group_ids, CAPACITY, training, rank)
        check_routing(outputs, group_ids, cfg.moe.num_experts, cfg.moe.num_experts // cfg.moe.num_groups, CAPACITY)


@pytest.mark.parametrize("case", CASES)
def test_causal_routers_ignore_future_tokens(case):
    """Evaluation routing: a router that declares itself causal, routed without dropping (as generation
    does), routes tokens 0..t to the same experts with the same gates whatever follows t; one that does not (Expert Choice) changes them
    under a binding capacity, so its flag is not a formality either."""
    cfg = _config(case)
    router = _router(cfg)
    capacity = TOKENS if router.causal else CAPACITY
    x, token_ids, group_ids = _inputs(cfg)
    before = _route(router, x, token_ids, group_ids, capacity, False, 0)
    cut = 5
    x2, ids2 = x.copy(), token_ids.copy()
    x2[cut + 1:] = np.random.default_rng(9).standard_normal(x2[cut + 1:].shape) * 3
    ids2[cut + 1:] = (ids2[cut + 1:] + 17) % cfg.model.vocab_size
    after = _route(router, x2, ids2, group_ids, capacity, False, 0)
    # expert_index, gate, keep, requested; not slot: with K > 1 every first choice takes its slot before any
    # second choice, so a later token's first choice moves an earlier second choice inside the buffer.
    fields = (0, 1, 2, 4)
    same = all(np.array_equal(before[i][:cut + 1], after[i][:cut + 1]) for i in fields)
    assert same == router.causal


def _layer_gradients(cfg, seed=0):
    """Gradients of an LM-style loss through the layer output only (no router losses) w.r.t. the router's
    trainable weights, on W = 2 ranks held in one process (simulated backend)."""
    topology = Topology(cfg.parallel.nodes, cfg.parallel.devices_per_node, cfg.moe.num_experts)
    layer = build_moe_layer(cfg.model, cfg.moe, 0, 0.02, topology, "simulated")
    weights = layer.router.trainable_params()
    rng = np.random.default_rng(seed)
    x, token_ids, group_ids = (np.concatenate(parts) for parts in zip(*(_inputs(cfg, r) for r in range(WORLD))))
    target = Tensor(rng.standard_normal(x.shape).astype(np.float32))

    def loss_fn(inputs):
        y, _, _, _, policy_term, _ = layer(inputs, Tensor(token_ids), Tensor(group_ids), CAPACITY, True)
        token_loss = ((y - target) ** 2).sum(1)  # (T,): a per-token stand-in for the LM loss
        loss = token_loss.mean()
        objective = layer.router.objective(token_loss, policy_term)
        return loss if objective is None else loss + objective

    grads = ms.grad(loss_fn, None, weights)(Tensor(x)) if weights else ()
    return weights, grads


@pytest.mark.parametrize("case", CASES)
def test_learned_routers_get_a_gradient_from_the_lm_loss(case):
    cfg = _config(case)
    weights, grads = _layer_gradients(cfg)
    if not weights:
        pytest.skip(f"{cfg.moe.router} has no trainable weights")
    largest = {w.name: float(np.abs(g.asnumpy()).max()) for w, g in zip(weights, grads)}
    assert all(np.isfinite(list(largest.values())))
    # Honest routers reach 1e-3 here; a gradient that is zero in exact arithmetic (a K = 1 gate s / s) leaves
    # rounding noise of about 1e-10.
    assert max(largest.values()) > 1e-6, f"no gradient reaches the router weights: {largest}"
