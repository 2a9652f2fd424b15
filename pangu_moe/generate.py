"""`pangu-moe generate`: sample tokens from a trained checkpoint and record where every token was routed.

Decisions (the issue leaves them open):
- One process, every expert: the run's config with `parallel.dispatch=local` and its topology, so a
  sharded multi-process checkpoint is joined (as `pangu-moe eval` does) and each expert keeps its node.
- The context window holds up to `model.seq_len` tokens from position 0, right-padded to seq_len so one
  shape serves every pass (causal attention: padding never reaches an earlier position). When a new
  token would overflow it, the window restarts with its newest seq_len / 2 tokens (one full pass over
  them refills the cache). The prompt may hold at most seq_len tokens.
- Each new token is decoded from a per-layer key/value cache (`model.decode`): attention over the cached
  positions instead of recomputing the window. `kv_cache=False` recomputes the window for every token;
  both give the same tokens and trace (tested).
- Capacity is dropless (C = the routing group's tokens, seq_len / W): at inference no token should lose
  its expert to a capacity that exists for training throughput. So each token's routing depends only on
  the tokens before it, and the trace equals one routing pass over the finished text (while it fits in
  one window; beyond that, each token's routing is the one of its window when it was the newest).
- A token's routing is recorded when it is the newest token of the context; the prompt's from the
  first pass. Routers that are not causal (Expert Choice picks tokens by the whole sequence) are refused.
- Sampling: logits over the tokenizer's ids (the 256 byte values with bytes) in float64, divided by the
  temperature, restricted to the top-k (ties at the cut kept), from `numpy.random.default_rng(seed)`;
  temperature 0 is greedy (lowest id on ties). The same checkpoint, prompt, domain and seed give the same
  tokens.
"""
import numpy as np
import mindspore as ms
from mindspore import Tensor

from pangu_moe.config import ConfigError
from pangu_moe.data.source import check_tokenizer, run_tokenizer
from pangu_moe.dispatch.topology import Topology
from pangu_moe.model import decode
from pangu_moe.routing.registry import router_class
from pangu_moe.train.checkpoint import run_dir_of
from pangu_moe.train.restore import restore, run_config

BYTES = 256


def load_model(checkpoint_path, overrides=()):
    """(cfg, model, tokenizer): the model in evaluation mode from a checkpoint, with every expert in this process,
    and the run's tokenizer (`data.source.run_tokenizer`).

    Args: checkpoint_path: a checkpoint folder or a consolidated .ckpt file; overrides: "section.key=value".
    Raises: CheckpointError / ConfigError with one line naming the problem.
    """
    cfg = run_config(checkpoint_path, overrides)
    if not router_class(cfg.moe.router).causal:
        raise ConfigError(f"generate: moe.router = {cfg.moe.router} routes each token by the whole sequence (not "
                          f"causal); generation needs a token-choice router")
    tokenizer = run_tokenizer(cfg, run_dir_of(checkpoint_path))
    check_tokenizer(run_dir_of(checkpoint_path), tokenizer, "generate")
    return cfg, restore(checkpoint_path, cfg)[0], tokenizer


def sample_next(logits, rng, temperature, top_k, vocab=BYTES):
    """The next token from one position's logits.

    Args:
        logits: float array [V >= vocab] (only the tokenizer's `vocab` ids are candidates); rng: numpy Generator;
        temperature: >= 0 (0 = greedy); top_k: 0 (all) or the number of most likely tokens kept.
    Returns: int in [0, vocab).
    """
    z = np.asarray(logits[:vocab], np.float64)
    if temperature == 0:
        return int(np.argmax(z))
    z = z / temperature
    if top_k:
        z = np.where(z >= np.sort(z)[-top_k], z, -np.inf)
    p = np.exp(z - z.max())
    return int(rng.choice(vocab, p=p / p.sum()))


def check_arguments(cfg, prompt_ids, domain, max_bytes, temperature, top_k, vocab=BYTES):
    """One-line errors for arguments the model cannot use; returns the domain id."""
    if len(prompt_ids) == 0:
        raise ConfigError("--prompt: empty; give at least one character")
    if len(prompt_ids) > cfg.model.seq_len:
        raise ConfigError(f"--prompt: {len(prompt_ids)} tokens; the model's context is model.seq_len = "
                          f"{cfg.model.seq_len} tokens")
    if domain is not None and domain not in cfg.data.domains:
        raise ConfigError(f"--domain {domain!r}: must be one of {', '.join(cfg.data.domains)}")
    if max_bytes < 1:
        raise ConfigError(f"--max-bytes = {max_bytes}: must be >= 1")
    if not (temperature >= 0 and np.isfinite(temperature)):
        raise ConfigError(f"--temperature = {temperature}: must be a finite number >= 0 (0 = greedy)")
    if not 0 <= top_k <= vocab:
        raise ConfigError(f"--top-k = {top_k}: must be in [0, {vocab}] (0 = all tokens)")
    world = cfg.parallel.nodes * cfg.parallel.devices_per_node
    if cfg.model.seq_len % world:
        raise ConfigError(f"model.seq_len = {cfg.model.seq_len}: generation routes one sequence over the run's "
                          f"{world} ranks, so it must be a multiple of {world}")
    return cfg.data.domains.index(domain) if domain is not None else 0


def generate(cfg, model, tok, prompt, domain=None, max_bytes=200, temperature=1.0, top_k=0, seed=0, progress=None,
             kv_cache=True):
    """Sample tokens after `prompt` until they decode to at least `max_bytes` UTF-8 bytes (the last token may pass
    it by the rest of its bytes; with the byte tokenizer exactly `max_bytes` tokens) and trace their routing.

    Args:
        cfg, model, tok: from `load_model`; prompt: str; domain: a `data.domains` name (default the first);
        progress: callable(done, total) after each token, or None; kv_cache: decode each token from the
            key/value cache (`model.decode`); False recomputes the whole window for every token (the reference
            the cache is tested against; the same tokens and trace).
    In the trace "bytes" are the run tokenizer's tokens (bytes with the byte tokenizer) and "token_bytes" their
    UTF-8 bytes.

    Returns:
        (generated token ids: list of ints, trace dict: `report.trace` format, covering prompt and generated tokens).
    """
    prompt_ids = [int(b) for b in tok.encode(prompt)]
    domain_id = check_arguments(cfg, prompt_ids, domain, max_bytes, temperature, top_k, tok.vocab_size)
    seq_len = cfg.model.seq_len
    p = cfg.parallel
    topology = Topology(p.nodes, p.devices_per_node, cfg.moe.num_experts)
    rng = np.random.default_rng(seed)
    group_id = domain_id if cfg.moe.num_groups > 1 else 0
    window = Window(model, group_id, seq_len // topology.world_size, cfg.runtime.mode == "graph")
    ids, start = list(prompt_ids), 0  # the window holds ids[start:]
    routed = window.prefill(ids, 0)  # per traced token: [(expert_index [K], keep [K]) per MoE layer]
    produced = 0  # UTF-8 bytes of the generated tokens; every token has at least one, so max_bytes tokens suffice
    while produced < max_bytes:
        ids.append(sample_next(window.last_logits, rng, temperature, top_k, tok.vocab_size))
        produced += max(1, len(tok.piece(ids[-1])))
        restart = len(ids) - start > seq_len
        if restart:
            start = len(ids) - seq_len // 2  # a full window restarts at its newest half
        if kv_cache and not restart:
            routed += window.step(ids[-1], len(ids) - 1 - start)
        else:
            routed += window.prefill(ids[start:], len(ids) - 1 - start)
        if progress:
            progress(min(produced, max_bytes), max_bytes)
    layers = len(model.moe_blocks)
    trace = {"router": cfg.moe.router, "top_k": cfg.moe.top_k, "num_experts": cfg.moe.num_experts,
             "num_groups": cfg.moe.num_groups,
             "expert_node": [int(n) for n in topology.expert_node()], "domain": cfg.data.domains[domain_id],
             "prompt_bytes": len(prompt_ids), "bytes": ids, "token_bytes": [list(tok.piece(i)) for i in ids],
             "expert_index": [[token[layer][0] for token in routed] for layer in range(layers)],
             "keep": [[token[layer][1] for token in routed] for layer in range(layers)],
             "sampling": {"seed": seed, "temperature": temperature, "top_k": top_k, "max_bytes": max_bytes}}
    return ids[len(prompt_ids):], trace


class Window:
    """The model over one context window of up to S tokens and its key/value cache (`model.decode`).

    Args: model: in evaluation mode; group_id: the level-1 group of every token; capacity: S / W slots a routing
    group (dropless); graph: compile the prefill and the step with `ms.jit`.
    """

    def __init__(self, model, group_id, capacity, graph):
        self.seq_len = model.model_cfg.seq_len
        self.keys, self.values = decode.empty_cache(model)
        self.last_logits = None  # [V] fp32: the newest token's
        self.groups = Tensor(np.full((1, self.seq_len), group_id, np.int32))
        self.group = Tensor(np.full((1, 1), group_id, np.int32))

        def prefill(tokens, groups, keys, values):
            return decode.cached_forward(model, tokens, groups, Tensor(0, ms.int32), keys, values, capacity)

        def step(token, group, position, keys, values):
            return decode.cached_forward(model, token, group, position, keys, values, 1)

        self._prefill, self._step = (ms.jit(prefill), ms.jit(step)) if graph else (prefill, step)

    def prefill(self, window, first):
        """Run `window` (ids, at most S) right-padded to S; returns the routing of its positions first.. (the
        list `generate` traces). Padding never reaches an earlier position (causal attention, causal routers)."""
        tokens = np.zeros((1, self.seq_len), np.int32)
        tokens[0, :len(window)] = window
        logits, self.keys, self.values, index, keep = self._prefill(Tensor(tokens), self.groups, self.keys,
                                                                    self.values)
        self.last_logits = logits[0, len(window) - 1].asnumpy()
        return _routing(index.asnumpy(), keep.asnumpy(), range(first, len(window)))

    def step(self, token, position):
        """Decode token id `token` at window position `position` from the cache; returns its routing (a list of
        one)."""
        logits, self.keys, self.values, index, keep = self._step(
            Tensor([[token]], ms.int32), self.group, Tensor(position, ms.int32), self.keys, self.values)
        self.last_logits = logits[0, 0].asnumpy()
        return _routing(index.asnumpy(), keep.asnumpy(), [0])


def _routing(index, keep, positions):
    """[(expert_index [K], keep [K]) per MoE layer] for each of `positions`; index, keep: [L, n, K]."""
    return [[(i[position].tolist(), k[position].tolist()) for i, k in zip(index, keep)] for position in positions]
