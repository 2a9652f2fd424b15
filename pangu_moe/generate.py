"""`pangu-moe generate`: sample bytes from a trained checkpoint and record where every byte was routed.

Decisions (the issue leaves them open):
- One process, every expert: the run's config with `parallel.dispatch=local` and its topology, so a
  sharded multi-process checkpoint is joined (as `pangu-moe eval` does) and each expert keeps its node.
- The context is the last `model.seq_len` bytes, right-padded to seq_len so one shape serves every
  step (causal attention: padding never reaches an earlier position). The prompt may hold at most
  seq_len bytes.
- Capacity is dropless (C = the routing group's tokens, seq_len / W): at inference no byte should lose
  its expert to a capacity that exists for training throughput. So each byte's routing depends only on
  the bytes before it, and the trace equals one routing pass over the finished text (while it fits in
  one window; beyond that, each byte's routing is the one of its own window).
- A byte's routing is recorded when it is the newest byte of the context; the prompt's from the
  first pass. Routers that are not causal (Expert Choice picks tokens by the whole sequence) are refused.
- Sampling: logits over the 256 byte values in float64, divided by the temperature, restricted to the
  top-k (ties at the cut kept), from `numpy.random.default_rng(seed)`; temperature 0 is greedy (lowest
  byte on ties). The same checkpoint, prompt, domain and seed give the same bytes.
"""
import numpy as np
import mindspore as ms
from mindspore import Tensor, ops

from pangu_moe.config import ConfigError
from pangu_moe.data.source import check_tokenizer, run_tokenizer
from pangu_moe.dispatch.topology import Topology
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


def traced_step(model, capacity, graph):
    """step(token_ids [1, S] int32, domain_ids [1, S] int32) -> (logits [1, S, V] fp32, expert_index [L, T, K]
    int32, keep [L, T, K] bool): `PanguModel.forward_traced`, compiled with `ms.jit` when `graph`."""

    def step(token_ids, domain_ids):
        logits, layers = model.forward_traced(token_ids, domain_ids, capacity)
        index, keep = (), ()
        for layer in layers:
            index += (layer[3][0],)
            keep += (layer[3][2],)
        return logits, ops.stack(index), ops.stack(keep)

    return ms.jit(step) if graph else step


def check_arguments(cfg, prompt_ids, domain, max_bytes, temperature, top_k, vocab=BYTES):
    """One-line errors for arguments the model cannot use; returns the domain id."""
    if len(prompt_ids) == 0:
        raise ConfigError("--prompt: empty; give at least one character")
    if len(prompt_ids) > cfg.model.seq_len:
        raise ConfigError(f"--prompt: {len(prompt_ids)} bytes; the model's context is model.seq_len = "
                          f"{cfg.model.seq_len} bytes")
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


def generate(cfg, model, tok, prompt, domain=None, max_bytes=200, temperature=1.0, top_k=0, seed=0, progress=None):
    """Sample `max_bytes` bytes after `prompt` and trace their routing.

    Args:
        cfg, model, tok: from `load_model`; prompt: str; domain: a `data.domains` name (default the first);
        progress: callable(done, total) after each byte, or None.
    With a BPE run "bytes" are the run tokenizer's tokens throughout.

    Returns:
        (generated byte values: list of ints, trace dict: `report.trace` format, covering prompt and generated bytes).
    """
    prompt_ids = [int(b) for b in tok.encode(prompt)]
    domain_id = check_arguments(cfg, prompt_ids, domain, max_bytes, temperature, top_k, tok.vocab_size)
    seq_len = cfg.model.seq_len
    p = cfg.parallel
    topology = Topology(p.nodes, p.devices_per_node, cfg.moe.num_experts)
    capacity = seq_len // topology.world_size  # dropless: every token of a routing group fits any expert
    rng = np.random.default_rng(seed)
    step = traced_step(model, capacity, cfg.runtime.mode == "graph")
    domains = Tensor(np.full((1, seq_len), domain_id, np.int32))
    ids = list(prompt_ids)
    routed = []  # per traced byte: [(expert_index [K], keep [K]) per MoE layer]

    def forward(first):
        window = ids[-seq_len:]
        tokens = np.zeros((1, seq_len), np.int32)
        tokens[0, :len(window)] = window
        logits, index, keep = (o.asnumpy() for o in step(Tensor(tokens), domains))  # index, keep: (L, T, K)
        for position in range(first, len(window)):
            routed.append([(i[position].tolist(), k[position].tolist()) for i, k in zip(index, keep)])
        return logits[0, len(window) - 1]

    logits = forward(0)
    for done in range(1, max_bytes + 1):
        ids.append(sample_next(logits, rng, temperature, top_k, tok.vocab_size))
        logits = forward(min(len(ids), seq_len) - 1)
        if progress:
            progress(done, max_bytes)
    layers = len(model.moe_blocks)
    trace = {"router": cfg.moe.router, "top_k": cfg.moe.top_k, "num_experts": cfg.moe.num_experts,
             "expert_node": [int(n) for n in topology.expert_node()], "domain": cfg.data.domains[domain_id],
             "prompt_bytes": len(prompt_ids), "bytes": ids, "token_bytes": [list(tok.piece(i)) for i in ids],
             "expert_index": [[byte[layer][0] for byte in routed] for layer in range(layers)],
             "keep": [[byte[layer][1] for byte in routed] for layer in range(layers)],
             "sampling": {"seed": seed, "temperature": temperature, "top_k": top_k, "max_bytes": max_bytes}}
    return ids[len(prompt_ids):], trace
