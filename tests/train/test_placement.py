"""Expert placement in training (pangu_moe/train/placement.py): moving experts between ranks moves bytes, never the
math; a resume across a move is exact; LocMoE's locality target follows the experts; bad maps are refused."""
import os
import shutil
import threading

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from pangu_moe.config import ConfigError
from pangu_moe.dispatch.placement import rows_after_move, slots_from_ranks
from pangu_moe.dispatch.topology import Topology
from pangu_moe.model.pangu import build_model, extract_domain, in_expert_order
from pangu_moe.train import checkpoint, convert
from pangu_moe.train.checkpoint import remove
from pangu_moe.train.restore import restore, run_config
from pangu_moe.train.steps import make_gradient
from pangu_moe.train.metrics import read
from pangu_moe.train.placement import moved_rows
from pangu_moe.train.trainer import Trainer
from tests.conftest import tiny_config

# 2 nodes x 2 devices, one expert a rank, each node's rows from its own domain (where placement can pay)
PLACED = ("parallel.nodes=2", "parallel.devices_per_node=2", "moe.num_groups=1", "data.mixture=by_node",
          "train.steps=6", "train.eval_every=6", "train.checkpoint_every=3")
MOVING = ("parallel.placement_every=2", "parallel.placement_hysteresis=0")
SAME_MATH = ("loss", "lm_loss", "aux_loss", "z_loss", "grad_norm", "val_loss")
SAME_COUNTS = ("tokens_per_rank_expert", "kept_per_rank", "kept_per_expert", "dropped", "capacity")


def _train(run_dir, *overrides, resume=False):
    Trainer(tiny_config(*PLACED, *overrides), str(run_dir), log=lambda line: None).train(resume)
    return read(os.path.join(run_dir, "metrics.jsonl"))


@pytest.fixture(scope="module")
def unplaced(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("unplaced"))


@pytest.fixture(scope="module")
def moving_simulated(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("moving_simulated")
    return run_dir, _train(run_dir, *MOVING, "parallel.dispatch=simulated")


def _assert_same_run(records, reference):
    assert len(records) == len(reference) == 6
    for got, want in zip(records, reference):
        for key in SAME_MATH:
            assert got.get(key) == want.get(key), (got["step"], key)  # bitwise: == on the floats
        for layer_got, layer_want in zip(got["layers"], want["layers"]):
            for key in SAME_COUNTS:
                assert layer_got[key] == layer_want[key], (got["step"], key)


def _moves(records):
    return sum(sum(event["moved"]) for r in records for event in r.get("placements", []))


def test_moving_experts_on_simulated_changes_no_loss_gradient_norm_or_drop(unplaced, moving_simulated):
    _, records = moving_simulated
    assert _moves(records) > 0
    _assert_same_run(records, unplaced)


def test_moving_experts_on_local_changes_no_loss_gradient_norm_or_drop(unplaced, tmp_path):
    records = _train(tmp_path, *MOVING)
    assert _moves(records) > 0
    _assert_same_run(records, unplaced)


def test_moves_are_logged_with_their_bytes_and_the_accounting_follows_the_map(unplaced, moving_simulated):
    _, records = moving_simulated
    events = [event for r in records for event in r.get("placements", [])]
    assert [e["step"] for e in events] == [2, 4, 6]
    expert_bytes = 3 * 2 * 32 * 64 * 4  # w_in and w_out (H 32, F 64) and both Adam moments, fp32
    previous = [np.arange(4), np.arange(4)]
    for event in events:
        new = [np.array(ranks) for ranks in event["expert_rank"]]
        moved = [int(np.sum(o != n)) for o, n in zip(previous, new)]
        inter = sum(int(np.sum(o // 2 != n // 2)) for o, n in zip(previous, new))  # 2 devices a node
        assert event["moved"] == moved
        assert (event["move_bytes_inter"], event["move_bytes_intra"]) == (inter * expert_bytes,
                                                                          (sum(moved) - inter) * expert_bytes)
        previous = new
    # steps 1 and 2 ran on the contiguous placement; after the first move the same kept choices travel elsewhere
    split = ("tokens_local", "tokens_intra", "tokens_inter", "bytes_inter")
    for got, want in zip(records[:2], unplaced[:2]):
        assert [[layer[k] for k in split] for layer in got["layers"]] == \
            [[layer[k] for k in split] for layer in want["layers"]]
    assert any([[layer[k] for k in split] for layer in got["layers"]] !=
               [[layer[k] for k in split] for layer in want["layers"]] for got, want in zip(records[2:], unplaced[2:]))


def test_placement_gathers_each_domains_experts_on_its_node(tmp_path):
    # two domain groups (experts 0, 1 for domain 0 on node 0; 2, 3 for domain 1 on node 1), started scattered:
    # experts 1 and 2 on the wrong node, so half of every node's choices cross. One window shows where the
    # demand is; the first placement swaps them and from then on nothing crosses.
    records = _train(tmp_path, "moe.num_groups=2", "parallel.placement=[0, 2, 1, 3]", *MOVING)
    assert all(layer["tokens_inter"] > 0 for r in records[:2] for layer in r["layers"])
    assert records[1]["placements"][0]["expert_rank"] == [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert all(layer["tokens_inter"] == 0 for r in records[2:] for layer in r["layers"])
    assert [sum(e["moved"]) for r in records for e in r.get("placements", [])] == [4, 0, 0]


def test_resume_across_a_move_reproduces_the_uninterrupted_run(moving_simulated, tmp_path):
    run_dir, records = moving_simulated
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed)
    remove(str(resumed / "checkpoints" / "step_000006"))  # as if killed after step 3, between two moves
    os.remove(resumed / "summary.json")
    again = _train(resumed, *MOVING, "parallel.dispatch=simulated", resume=True)
    timing = ("tokens_per_s", "compile_seconds", "compiled_steps")
    assert [{k: v for k, v in r.items() if k not in timing} for r in again] == \
        [{k: v for k, v in r.items() if k not in timing} for r in records]  # losses, counts, moves, maps


def test_a_move_is_made_when_it_saves_more_than_it_sends(tmp_path):
    trainer = Trainer(tiny_config(*PLACED, "parallel.placement_every=2"), str(tmp_path), log=lambda line: None)
    placement = trainer.placement
    expert_bytes = 3 * 2 * 32 * 64 * 4  # w_in, w_out (H 32, F 64) and both Adam moments, fp32
    assert (placement.saved_per_choice, placement.cost_per_move) == (2 * 32 * 4, expert_bytes)
    w_in = trainer.model.moe_blocks[1].moe.experts.w_in.asnumpy().copy()  # asnumpy shares the memory
    moment = placement.moments[trainer.model.moe_blocks[1].moe.experts.w_in.name][0]
    moment.set_data(Tensor(np.arange(4, dtype=np.float32).reshape(4, 1, 1) * np.ones(moment.shape, np.float32)))

    def window(count):
        kept = np.zeros((2, 4, 4), np.int64)  # (L, W, E)
        kept[:, :2, 3] = count // 2  # node 0's ranks keep `count` choices of expert 3 (on node 1)
        kept[:, 2:, 0] = count // 2  # node 1's ranks keep `count` choices of expert 0 (on node 0)
        return kept
    # 2 x 190 choices would save 97,280 bytes, less than the 98,304 of two moves: nothing moves
    placement.observe(window(190))
    placement.after_step(1)  # not a placement step: the window keeps counting
    assert placement.events == [] and trainer.model.moe_blocks[1].moe.placement_window.asnumpy().sum() == 380
    placement.after_step(2)
    assert placement.events[-1]["moved"] == [0, 0] and placement.slots(1).tolist() == [0, 1, 2, 3]
    assert trainer.model.moe_blocks[1].moe.placement_window.asnumpy().sum() == 0  # the window starts again
    placement.observe(window(194))  # 2 x 194 x 256 = 99,328 bytes saved > 98,304: swap experts 0 and 3
    placement.after_step(4)
    assert placement.events[-1] == {"step": 4, "expert_rank": [[3, 1, 2, 0]] * 2, "moved": [2, 2],
                                    "move_bytes_intra": 0, "move_bytes_inter": 4 * expert_bytes}
    assert placement.slots(1).tolist() == [3, 1, 2, 0]
    np.testing.assert_array_equal(trainer.model.moe_blocks[1].moe.experts.w_in.asnumpy(), w_in[[3, 1, 2, 0]])
    assert moment.asnumpy()[:, 0, 0].tolist() == [3, 1, 2, 0]


def _gradients(*overrides):
    """{name: gradient} of one batch of a tiny model built from seed 7 (PyNative, no trainer)."""
    ms.set_seed(7)
    model = build_model(tiny_config(*PLACED, *overrides))
    params = model.trainable_params()
    ids = np.random.default_rng(0).integers(0, 256, (4, 32)).astype(np.int32)
    domains = np.repeat(np.array([[0], [0], [1], [1]], np.int32), 32, 1)  # by node: 2 nodes x 2 ranks
    grads = make_gradient(model, params, 10)(Tensor(ids), Tensor(np.roll(ids, -1, 1)), Tensor(domains))[5]
    return {p.name: g.asnumpy() for p, g in zip(params, grads)}


def test_gradients_are_the_unplaced_ones_in_slot_order():
    ranks = [3, 1, 0, 2]  # one expert a rank: expert e in slot ranks[e]
    unplaced, placed = _gradients(), _gradients(f"parallel.placement={ranks}")
    assert placed.keys() == unplaced.keys()
    for name, g in placed.items():
        want = unplaced[name]
        if ".experts." in name:
            np.testing.assert_array_equal(g[ranks], want, err_msg=name)
            assert not np.array_equal(g, want)
        else:
            np.testing.assert_array_equal(g, want, err_msg=name)


def test_locmoe_locality_target_moves_with_the_experts(tmp_path):
    overrides = (*PLACED, *MOVING, "moe.router=locmoe", "moe.locmoe.locality_coeff=0.5")
    trainer = Trainer(tiny_config(*overrides), str(tmp_path / "moving"), log=lambda line: None)
    model, capacity = trainer.model, trainer.capacity
    input_ids, _, domain_ids = next(trainer.batches(0))
    inputs = (Tensor(input_ids), Tensor(domain_ids))

    @ms.jit  # compiled once, run again after the move: it must read the moved Parameters
    def losses(ids, domains):
        return model(ids, domains, capacity, True)[1]

    before = losses(*inputs).asnumpy()
    ranks = [2, 3, 0, 1]  # swap the nodes' experts
    new = slots_from_ranks(ranks, 4)
    for layer in range(2):
        trainer.placement.move(layer, trainer.placement.slots(layer), new)
    router = model.moe_blocks[0].moe.router
    np.testing.assert_array_equal(router.local_mask.asnumpy(),
                                  Topology(2, 2, 4, tuple(new.tolist())).local_expert_mask().astype(np.float32))
    after = losses(*inputs).asnumpy()
    # a model built with that placement from the start, holding the same weights, scores the same locality loss
    fresh = build_model(tiny_config(*overrides, f"parallel.placement={ranks}"))
    weights = {p.name: p for p in model.get_parameters()}
    for p in fresh.get_parameters():
        p.set_data(Tensor(weights[p.name].asnumpy()))
    expected = fresh(*inputs, capacity, True)[1].asnumpy()
    np.testing.assert_allclose(after, expected, rtol=1e-6)
    assert after[2] != before[2]  # the locality loss: its target moved to the other node
    np.testing.assert_allclose(after[:2], before[:2], rtol=1e-6)  # aux and z do not read the placement


@pytest.mark.parametrize("overrides,message", [
    (("parallel.placement=[0, 0, 1, 2]",), r"parallel.placement \[0, 0, 1, 2\]: ranks host \[2, 1, 1, 0\] experts; "
                                          r"each must host exactly E / W = 1"),
    (("parallel.placement=[0, 1, 2]",), r"parallel.placement = \[0, 1, 2\]: must list 4 ranks, one per expert"),
    (("parallel.placement=[0, 1, 2, 4]",), r"must list one rank in \[0, 4\) per expert"),
    (("parallel.nodes=4", "parallel.devices_per_node=2", "train.batch_size=8", "parallel.placement_every=5"),
     r"parallel.placement_every = 5: must be 0 when W = 8 ranks does not divide moe.num_experts=4"),
    (("moe.router=deepseek", "moe.deepseek.node_limit=1", "moe.top_k=2", "parallel.placement=[1, 0, 2, 3]"),
     r"parallel.placement = \[1, 0, 2, 3\]: must be \[\] with moe.deepseek.node_limit > 0"),
])
def test_a_placement_that_cannot_be_is_refused_in_one_line(overrides, message):
    base = ("parallel.nodes=2", "parallel.devices_per_node=2", "moe.num_groups=1")
    with pytest.raises(ConfigError, match=message) as error:
        tiny_config(*base, *overrides)
    assert "\n" not in str(error.value)


def test_resharding_a_placed_run_keeps_its_slots_and_moves_its_masks(moving_simulated, tmp_path):
    run_dir, _ = moving_simulated
    source = checkpoint.step_path(str(run_dir), 6)
    target = convert.reshard(source, str(tmp_path / "ep2"), 2)
    cfg = run_config(target)
    assert (cfg.parallel.nodes, cfg.parallel.devices_per_node) == (2, 1)
    before, _, _ = restore(source, run_config(source))
    after, _, _ = restore(target, cfg)
    for old, new in zip(before.moe_blocks, after.moe_blocks):
        slots = old.moe.expert_slot.asnumpy()
        np.testing.assert_array_equal(new.moe.expert_slot.asnumpy(), slots)
        assert new.moe.placement_window.asnumpy().tolist() == [[0] * 4] * 2
        np.testing.assert_array_equal(new.moe.experts.w_in.asnumpy(), old.moe.experts.w_in.asnumpy())


def test_a_new_layout_recomputes_the_masks_and_restarts_the_window():
    slots = np.array([3, 0, 1, 2], np.int32)  # expert 0 in slot 3 (rank 1 of 2), expert 1 in slot 0 (rank 0), ...
    shared = {"moe_blocks.0.moe.expert_slot": slots, "moe_blocks.0.moe.placement_window": np.ones((4, 4), np.int32),
              "moe_blocks.0.moe.router.local_mask": np.ones((4, 4), np.float32), "embedding": np.ones(3)}
    moved = convert._placement_for_layout(shared, Topology(2, 1, 4))
    assert moved["moe_blocks.0.moe.expert_slot"] is slots and moved["embedding"] is shared["embedding"]
    assert moved["moe_blocks.0.moe.placement_window"].tolist() == [[0] * 4] * 2
    assert moved["moe_blocks.0.moe.router.local_mask"].tolist() == [[0, 1, 1, 0], [1, 0, 0, 1]]
    assert moved["moe_blocks.0.moe.router.local_mask"].dtype == np.float32


def test_a_domain_cut_from_a_placed_model_is_the_unplaced_models(tmp_path):
    # TINY's 2 groups: domain 1's experts are 2 and 3; the placement puts them in slots 3 and 0
    base = ("parallel.nodes=2", "parallel.devices_per_node=2")
    ms.set_seed(7)
    placed = build_model(tiny_config(*base, "parallel.placement=[1, 2, 3, 0]"))
    ms.set_seed(7)
    unplaced = build_model(tiny_config(*base))
    assert not np.array_equal(placed.moe_blocks[0].moe.experts.w_in.asnumpy(),
                              unplaced.moe_blocks[0].moe.experts.w_in.asnumpy())
    for domain in (0, 1):
        got = {p.name: p.asnumpy() for p in extract_domain(placed, domain).get_parameters()}
        want = {p.name: p.asnumpy() for p in extract_domain(unplaced, domain).get_parameters()}
        assert got.keys() == want.keys()
        for name in got:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    moment = "adam_m.moe_blocks.1.moe.experts.w_out"
    rows = np.arange(4.0).reshape(4, 1)  # slot-ordered rows of a moment: row s is the expert in slot s
    assert in_expert_order({moment: rows, "adam_m.embedding": rows}, placed)[moment][:, 0].tolist() == [1, 2, 3, 0]
    assert in_expert_order({moment: rows, "adam_m.embedding": rows}, placed)["adam_m.embedding"] is rows


def _in_processes(rows, source, world):
    """`moved_rows` run by `world` threads standing for one process a rank each, their sum over ranks a real sum;
    returns the rows the ranks hold after the move, concatenated in rank order."""
    held = len(rows) // world
    # a timeout: a rank that fails before the sum must not leave the others waiting for it forever
    barrier, posted, out = threading.Barrier(world, timeout=30), [None] * world, [None] * world

    def sum_over_ranks(rank, array):
        posted[rank] = array
        barrier.wait()
        total = sum(posted)
        barrier.wait()
        return total

    def rank_work(rank):
        out[rank] = moved_rows(rows[rank * held:(rank + 1) * held], source, rank, lambda a: sum_over_ranks(rank, a))
    threads = [threading.Thread(target=rank_work, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return np.concatenate(out)


def test_moving_rows_between_processes_equals_the_gather_in_one():
    rng = np.random.default_rng(0)
    for world, held in ((2, 1), (4, 1), (4, 2), (2, 3)):
        experts = world * held
        rows = rng.standard_normal((experts, 3, 2)).astype(np.float32)
        for _ in range(5):
            source = rows_after_move(rng.permutation(experts), rng.permutation(experts))
            want = moved_rows(rows, source)
            assert want.tobytes() == rows[source].tobytes()
            assert _in_processes(rows, source, world).tobytes() == want.tobytes(), (world, held, source)


def test_no_move_sends_nothing():
    def refuse(array):
        raise AssertionError("a collective for no move")
    rows = np.arange(8, dtype=np.float32).reshape(8, 1)  # W = 4 ranks of 2 slots each
    assert moved_rows(rows[2:4], np.arange(8), 1, refuse).tobytes() == rows[2:4].tobytes()
