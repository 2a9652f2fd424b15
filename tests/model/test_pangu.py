import numpy as np
import mindspore as ms
import pytest
from mindspore import Tensor, ops

from pangu_moe.model import build_model, extract_domain
from tests.conftest import tiny_config


def _batch(domain, b=3, s=32, seed=0):
    rng = np.random.default_rng(seed)
    return Tensor(rng.integers(0, 256, (b, s)).astype(np.int32)), Tensor(np.full((b, s), domain, np.int32))


def test_forward_shapes_and_exact_token_accounting():
    ms.set_seed(1)
    model = build_model(tiny_config())
    ids, dom = _batch(0)
    logits, losses, demand, kept, policy_terms, _ = model(ids, dom, 5, True)
    assert policy_terms.shape == (2, 96) and not policy_terms.asnumpy().any()  # (L, B*S); topk does not sample
    assert losses.shape == (3,) and float(losses.asnumpy()[2]) == 0.0  # topk has no locality loss
    assert logits.shape == (3, 32, 256) and logits.dtype == ms.float32
    assert demand.shape == (2, 1, 4)                        # (L, W, E) with one rank
    demand, kept = demand.asnumpy()[:, 0], kept.asnumpy()[:, 0]
    assert (demand.sum(1) == 3 * 32).all()                 # kept + dropped = T*K in every layer
    assert (kept <= np.minimum(demand, 5)).all()
    assert (demand[:, 2:] == 0).all()                       # domain 0 only reaches group 0's experts


@pytest.mark.parametrize("router", ["topk", "rre", "locmoe"])
@pytest.mark.parametrize("domain", [0, 1])
def test_extracted_domain_sub_model_gives_identical_logits(router, domain):
    ms.set_seed(2)
    model = build_model(tiny_config(f"moe.router={router}"))
    sub = extract_domain(model, domain)
    assert sub.moe_cfg.num_experts == 2 and sub.moe_cfg.num_groups == 1
    ids, dom = _batch(domain, seed=domain)
    capacity = 20  # binds: 96 tokens over 2 experts
    full = model(ids, dom, capacity, False)
    part = sub(ids, dom, capacity, False)
    np.testing.assert_array_equal(full[0].asnumpy(), part[0].asnumpy())
    lo = domain * 2
    np.testing.assert_array_equal(full[3].asnumpy()[:, :, lo:lo + 2], part[3].asnumpy())


def test_seed_fixes_the_initial_weights():
    from pangu_moe import runtime

    def weights(seed):
        cfg = tiny_config(f"runtime.seed={seed}")
        runtime.setup(cfg.runtime)
        return [p.asnumpy() for p in build_model(cfg).trainable_params()]

    a, b, c = weights(5), weights(5), weights(6)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not any(np.array_equal(u, w) for u, w in zip(a, c) if u.ndim == 2)


def test_extract_rejects_bad_domain():
    model = build_model(tiny_config())
    with pytest.raises(ValueError, match=r"domain = 2: must be in \[0, 2\)"):
        extract_domain(model, 2)


def test_router_weight_gets_gradient_from_lm_loss_alone():
    ms.set_seed(3)
    model = build_model(tiny_config("moe.aux_loss_coeff=0", "moe.z_loss_coeff=0"))
    ids, dom = _batch(1)
    labels = Tensor(np.roll(ids.asnumpy(), -1, 1))
    router_weights = [p for p in model.trainable_params() if p.name.endswith("router.weight")]

    def lm_loss():
        logits = model(ids, dom, 96, True)[0]
        return ops.cross_entropy(logits.reshape(-1, 256), labels.reshape(-1))

    grads = ms.grad(lm_loss, None, router_weights)()
    for g in grads:
        g = g.asnumpy()
        assert np.abs(g[1]).max() > 0       # the group the tokens were routed in learns
        assert np.abs(g[0]).max() == 0      # the other domain's router is untouched


def test_rre_tables_survive_a_checkpoint_round_trip(tmp_path):
    from pangu_moe.train import checkpoint
    ms.set_seed(4)
    model = build_model(tiny_config("moe.router=rre", "moe.rre.seed=1"))
    path = str(tmp_path / "m.ckpt")
    checkpoint.save_file(path, [model], {"step": 3})
    other = build_model(tiny_config("moe.router=rre", "moe.rre.seed=2"))
    tables = [p for p in model.get_parameters() if p.name.endswith("router.table")]
    others = [p for p in other.get_parameters() if p.name.endswith("router.table")]
    assert len(tables) == 2 and not np.array_equal(tables[0].asnumpy(), others[0].asnumpy())
    assert not np.array_equal(tables[0].asnumpy(), tables[1].asnumpy())  # one table per layer
    assert checkpoint.load(path, [other], ("step",)) == {"step": 3}
    for a, b in zip(tables, others):
        np.testing.assert_array_equal(a.asnumpy(), b.asnumpy())
    ids, dom = _batch(1)
    np.testing.assert_array_equal(model(ids, dom, 96, False)[0].asnumpy(), other(ids, dom, 96, False)[0].asnumpy())


def test_demand_is_counted_per_rank():
    ms.set_seed(1)
    model = build_model(tiny_config("parallel.nodes=2", "train.batch_size=4"))
    ids = Tensor(np.random.default_rng(0).integers(0, 256, (4, 32)).astype(np.int32))
    dom = Tensor(np.repeat(np.array([[0], [1], [0], [1]], np.int32), 32, 1))
    _, _, demand, kept, _, _ = model(ids, dom, 64, False)
    demand, kept = demand.asnumpy(), kept.asnumpy()
    assert demand.shape == (2, 2, 4)
    assert (demand.sum(2) == 2 * 32).all()  # each rank holds 2 sequences
    assert (kept == demand).all()           # C = 64 never binds
    assert (demand[:, :, :2].sum(2) == 32).all()  # one sequence per rank is domain 0 (group 0)


@pytest.mark.parametrize("router", ["topk", "locmoe"])
def test_changing_later_tokens_leaves_earlier_outputs_unchanged(router):
    """The model is causal: with a capacity no token can exceed (as in generation), logits at positions <= t
    do not depend on the tokens after t, through attention, routing and the query layer alike."""
    ms.set_seed(3)
    model = build_model(tiny_config(f"moe.router={router}", "moe.top_k=2"))
    ids, dom = _batch(1, b=2)
    cut = 11
    changed = ids.asnumpy().copy()
    changed[:, cut + 1:] = (changed[:, cut + 1:] + 101) % 256
    before = model(ids, dom, 64, False)[0].asnumpy()
    after = model(Tensor(changed), dom, 64, False)[0].asnumpy()
    np.testing.assert_array_equal(before[:, :cut + 1], after[:, :cut + 1])
    assert not np.allclose(before[:, cut + 1:], after[:, cut + 1:])
