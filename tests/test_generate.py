"""`pangu-moe generate`: deterministic for a seed, its trace is the model's routing of the same text,
greedy decoding follows the one-pass logits, and bad arguments give one-line errors."""
import json

import numpy as np
import pytest
from mindspore import Tensor

from pangu_moe import cli, generate, runtime
from pangu_moe.config import ConfigError
from pangu_moe.data.tokenizer import ByteTokenizer
from pangu_moe.model.pangu import build_model
from pangu_moe.report import trace as trace_text
from pangu_moe.train.trainer import Trainer
from tests.conftest import tiny_config

PROMPT = "def f(x):"  # 9 bytes; with 20 generated the text fits the tiny model's 32-byte context


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("gen") / "run"
    cfg = tiny_config("train.steps=4", "train.eval_every=4", "train.checkpoint_every=4", "parallel.nodes=2",
                      "parallel.devices_per_node=2", "moe.top_k=2", "moe.num_experts=8")
    Trainer(cfg, str(run_dir), log=lambda line: None).train()
    return run_dir, str(run_dir / "checkpoints" / "step_000004")


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    return generate.load_model(tiny_checkpoint[1])


def _one_pass(cfg, model, ids, domain_id):
    """Logits [n, V] and expert_index [L, n, K] of one evaluation pass over `ids` (n <= seq_len)."""
    tokens = np.zeros((1, cfg.model.seq_len), np.int32)
    tokens[0, :len(ids)] = ids
    domains = np.full((1, cfg.model.seq_len), domain_id, np.int32)
    logits, layers = model.forward_traced(Tensor(tokens), Tensor(domains), cfg.model.seq_len // 4)
    index, keep = (np.stack([layer[3][field].asnumpy() for layer in layers]) for field in (0, 2))  # (L, T, K)
    logits = logits.asnumpy()
    assert keep[:, :len(ids)].all()  # dropless: every choice of the text kept
    return logits[0, :len(ids)], index[:, :len(ids)]


def test_same_seed_same_text_and_trace(loaded):
    cfg, model, tok = loaded
    first = generate.generate(cfg, model, tok, PROMPT, "code", 20, 1.0, 0, seed=3)
    again = generate.generate(cfg, model, tok, PROMPT, "code", 20, 1.0, 0, seed=3)
    other = generate.generate(cfg, model, tok, PROMPT, "code", 20, 1.0, 0, seed=4)
    assert first == again
    assert first[0] != other[0]
    assert len(first[0]) == 20 and all(0 <= b < 256 for b in first[0])


def test_trace_equals_the_routing_of_the_finished_text(loaded):
    cfg, model, tok = loaded
    for domain in ("prose", "code"):  # two groups: the domain picks the experts a byte may use
        generated, trace = generate.generate(cfg, model, tok, PROMPT, domain, 20, 1.0, 0, seed=5)
        ids = trace["bytes"]
        assert ids == [ord(c) for c in PROMPT] + generated and trace["prompt_bytes"] == len(PROMPT)
        _, index = _one_pass(cfg, model, ids, cfg.data.domains.index(domain))
        assert np.array_equal(np.array(trace["expert_index"]), index)
        group = cfg.data.domains.index(domain)
        assert set(np.unique(index)) <= set(range(4 * group, 4 * group + 4))  # E_g = 4 experts of the domain's group
        assert trace["expert_node"] == [0, 0, 0, 0, 1, 1, 1, 1]
        assert np.array(trace["keep"]).all()


def test_greedy_decoding_follows_the_one_pass_logits(loaded):
    cfg, model, tok = loaded
    generated, trace = generate.generate(cfg, model, tok, PROMPT, None, 20, 0.0, 0)
    logits, _ = _one_pass(cfg, model, trace["bytes"], 0)
    for position, byte in enumerate(generated, start=len(PROMPT) - 1):
        assert byte == int(np.argmax(logits[position, :256]))


def test_a_text_longer_than_the_context_restarts_its_window_at_the_newest_half(loaded):
    cfg, model, tok = loaded
    generated, trace = generate.generate(cfg, model, tok, PROMPT, None, 45, 0.0, 0)
    assert len(generated) == 45 and np.array(trace["expert_index"]).shape == (2, len(PROMPT) + 45, 2)
    # Tokens 0..31 fill the 32-token window; token 32 restarts it at tokens 17..32, token 49 at 34..49.
    ids = trace["bytes"]
    for newest, start in ((31, 0), (32, 17), (48, 17), (49, 34), (52, 34)):
        logits, index = _one_pass(cfg, model, ids[start:newest + 1], 0)
        assert ids[newest + 1] == int(np.argmax(logits[-1, :256]))
        assert np.array_equal(np.array(trace["expert_index"])[:, newest], index[:, -1])


@pytest.mark.parametrize("router", [("moe.router=topk", "moe.top_k=1"), ("moe.router=topk", "moe.top_k=2"),
                                    ("moe.router=locmoe", "moe.top_k=1")])
def test_kv_cache_decoding_equals_recomputing_the_window(router):
    """Greedy and sampled, across a window restart (9 + 26 tokens > 32), with K = 1 and 2."""
    cfg = tiny_config("parallel.nodes=2", "parallel.devices_per_node=2", "moe.num_experts=8", *router)
    runtime.setup(cfg.runtime)
    model, tok = build_model(cfg), ByteTokenizer()  # its initial weights: no training to compile
    model.set_train(False)
    for temperature, seed in ((0.0, 0), (1.0, 7)):
        cached = generate.generate(cfg, model, tok, PROMPT, "code", 26, temperature, 0, seed, kv_cache=True)
        recomputed = generate.generate(cfg, model, tok, PROMPT, "code", 26, temperature, 0, seed, kv_cache=False)
        assert cached == recomputed


def test_each_cached_decoding_step_is_the_models_forward_pass_at_its_position():
    """An independent oracle for the decoding step (the cached-vs-recomputed test runs the same cache code on both
    sides): the initial-weights model's one-pass logits at every position after a 5-token prefill."""
    cfg = tiny_config("parallel.nodes=2", "parallel.devices_per_node=2", "moe.num_experts=8", "moe.top_k=2")
    runtime.setup(cfg.runtime)
    model = build_model(cfg)
    model.set_train(False)
    ids = [ord(c) for c in "def f(x):\n"]
    logits, _ = _one_pass(cfg, model, ids, 0)
    window = generate.Window(model, 0, cfg.model.seq_len // 4, False)
    window.prefill(ids[:5], 0)
    np.testing.assert_allclose(window.last_logits, logits[4], rtol=1e-5, atol=1e-5)
    for position in range(5, len(ids)):
        window.step(ids[position], position)
        np.testing.assert_allclose(window.last_logits, logits[position], rtol=1e-5, atol=1e-5)


def test_the_cached_prefill_is_the_models_forward_pass(loaded):
    cfg, model, tok = loaded
    ids = [ord(c) for c in PROMPT * 3][:cfg.model.seq_len]
    window = generate.Window(model, 1, cfg.model.seq_len // 4, False)
    routed = window.prefill(ids, 0)
    logits, index = _one_pass(cfg, model, ids, 1)
    np.testing.assert_allclose(window.last_logits, logits[-1], rtol=1e-5, atol=1e-5)
    assert np.array_equal(np.array([[layer[0] for layer in token] for token in routed]).transpose(1, 0, 2), index)


def test_sample_next_rules():
    rng = np.random.default_rng(0)
    logits = np.full(260, -5.0)
    logits[[7, 9]] = 3.0  # a tie: greedy takes the lower byte
    logits[258] = 99.0  # beyond the 256 bytes: never a candidate
    assert generate.sample_next(logits, rng, 0.0, 0) == 7
    logits[11] = 2.0
    drawn = {generate.sample_next(logits, rng, 1.0, 3) for _ in range(300)}
    assert drawn == {7, 9, 11}
    assert {generate.sample_next(logits, rng, 5.0, 2) for _ in range(100)} == {7, 9}


def test_render_without_and_with_colour():
    trace = {"bytes": [104, 105, 10], "prompt_bytes": 1, "expert_node": [0, 0, 1, 1],
             "expert_index": [[[0], [3], [2]], [[1], [1], [0]]], "keep": [[[True], [True], [False]],
                                                                         [[True], [True], [True]]]}
    assert trace_text.render(trace, colour=False).split("\n") == [
        "      h|i\u21b5", "L0    0|3x", "L1    1|10", "", "experts (e), their nodes (n): e0 n0 e1 n0 e2 n1 e3 n1"]
    grouped = trace_text.render({**trace, "num_groups": 2}, colour=False).split("\n")[-1]
    assert grouped == "experts (e), their nodes (n) and level-1 groups (g): e0 n0 g0 e1 n0 g0 e2 n1 g1 e3 n1 g1"
    coloured = trace_text.render(trace, colour=True)
    assert coloured.count("\x1b[48;2;") == 6 + 4 and "\x1b[4m" in coloured  # 6 cells, 4 legend swatches, 1 dropped


def test_a_mixed_script_trace_draws_one_cell_per_character():
    data = list("aé日🚀\n".encode())  # byte tokens: 1 + 2 + 3 + 4 + 1 = 11
    trace = {"bytes": data, "prompt_bytes": 3, "expert_node": [0, 0, 1, 1],
             "expert_index": [[[i % 4] for i in range(11)]], "keep": [[[True]] * 11]}
    assert trace_text.characters(trace) == [("a", 0), ("é", 1), ("日", 3), ("🚀", 6), ("\u21b5", 10)]
    assert trace_text.render(trace, colour=False).split("\n")[:2] == [
        "      aé|日🚀\u21b5", "L0    01|3 2 2"]  # the prompt ends after é; wide cells padded under
    assert trace_text.render(trace, colour=True).count("\x1b[48;2;") == 5 + 4  # 5 cells, 4 legend swatches
    # BPE pieces: a token may end inside a character; the character goes with the token of its first byte.
    split = {"bytes": [5, 6], "token_bytes": [[0x61, 0xc3], [0xa9, 0x78]], "prompt_bytes": 1}
    assert trace_text.characters(split) == [("a", 0), ("é", 0), ("x", 1)]
    assert trace_text.characters({"bytes": [0xff, 0x41, 0x07]}) == [("\ufffd", 0), ("A", 1), ("\u2022", 2)]


def test_cli_generate_trace_feeds_the_report(tiny_checkpoint, tmp_path, capsys):
    run_dir, path = tiny_checkpoint
    assert cli.main(["generate", "--checkpoint", path, "--prompt", PROMPT, "--max-bytes", "5", "--seed", "2",
                     "--trace", "--color", "never"]) == 0
    out = capsys.readouterr().out
    trace = json.loads((run_dir / "trace.json").read_text())
    assert out.startswith(PROMPT) and "L1    " in out and trace["sampling"]["seed"] == 2
    assert cli.main(["report", str(run_dir), "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "trace_run.png").read_bytes()[:4] == b"\x89PNG"
    assert trace["token_bytes"] == [[b] for b in trace["bytes"]]  # byte tokens: one byte each


@pytest.mark.parametrize("args, message", [
    (["--domain", "poetry"], "--domain 'poetry': must be one of prose, code"),
    (["--prompt", "x" * 33], "--prompt: 33 tokens; the model's context is model.seq_len = 32 tokens"),
    (["--temperature", "-1"], "--temperature = -1.0: must be a finite number >= 0"),
    (["--top-k", "300"], "--top-k = 300: must be in [0, 256]"),
    (["--max-bytes", "0"], "--max-bytes = 0: must be >= 1"),
    (["--prompt", ""], "--prompt: empty"),
])
def test_cli_generate_refuses_bad_arguments(tiny_checkpoint, args, message, capsys):
    argv = ["generate", "--checkpoint", tiny_checkpoint[1], "--prompt", PROMPT, *args]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_generate_refuses_missing_checkpoints_and_non_causal_routers(tmp_path, capsys):
    assert cli.main(["generate", "--checkpoint", str(tmp_path / "none.ckpt"), "--prompt", "a"]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    run = tmp_path / "ec"
    (run / "checkpoints").mkdir(parents=True)
    tiny_config("moe.router=expert_choice").save(str(run / "config.yaml"))
    (run / "checkpoints" / "step_000001").mkdir()
    (run / "checkpoints" / "step_000001" / "manifest.json").write_text("{}")  # refused before it is read
    with pytest.raises(ConfigError, match="expert_choice routes each token by the whole sequence"):
        generate.load_model(str(run / "checkpoints" / "step_000001"))
