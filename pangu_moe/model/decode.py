"""Incremental decoding with a key/value cache per attention layer (`pangu-moe generate`).

`cached_forward` runs the model over a chunk of n consecutive positions [p0, p0 + n) of one sequence: each
attention layer writes the chunk's keys and values into its cache at those positions and attends over the
cached positions up to the query's own. A prefill is a whole window (p0 = 0, n = S); a decoding step is one
token (n = 1), whose attention costs O(S·H) per layer where recomputing the window costs O(S²·H + S·H²).

Routing is that of a full pass over the window, for every causal router: such a router routes a token by the
token itself and by its routing group (rank), and generation's capacity is dropless. In a window, rank r
holds positions [r·S/W, (r+1)·S/W) (`model.moe_layer.MoELayer`); a single token at position p is routed as
rank p // (S/W): the layer, which splits its input into W groups, gets one copy of the token per group and
the copy of that rank is kept.
"""
import mindspore as ms
from mindspore import ops

NEG_INF = -1e9  # the additive mask of `model.attention.causal_mask`


def empty_cache(model):
    """Zero keys and values [A, 1, nh, S, hd] in the model's compute dtype, A = every attention layer (dense blocks,
    MoE blocks, query layer)."""
    m = model.model_cfg
    layers = m.num_dense_layers + m.num_moe_layers + 1
    shape = (layers, 1, m.num_heads, m.seq_len, m.hidden // m.num_heads)
    return ops.zeros(shape, model.compute_dtype), ops.zeros(shape, model.compute_dtype)


def cached_forward(model, token_ids, group_ids, start, keys, values, capacity):
    """One chunk of a sequence through `model` (evaluation mode) with its key/value cache.

    Args:
        model: `model.pangu.PanguModel`; token_ids, group_ids: [1, n] int32 (group_ids: level-1 groups);
        start: int32 scalar Tensor p0, with p0 + n <= S; keys, values: [A, 1, nh, S, hd] (`empty_cache`);
        capacity: python int, the slots per expert of one routing group (S / W for a window, 1 for one token).
    Returns:
        logits [1, n, V] fp32, keys and values with the chunk written, expert_index [L, n, K] int32 and
        keep [L, n, K] bool of the L MoE layers.
    """
    n, seq_len = token_ids.shape[1], keys.shape[3]
    positions = start + ops.arange(n, dtype=ms.int32)  # (n,)
    slots = ops.arange(seq_len, dtype=ms.int32).reshape(1, seq_len)
    write = (slots == positions.reshape(n, 1)).astype(keys.dtype)  # (n, S): row i writes position p0 + i
    mask = ops.where(slots <= positions.reshape(n, 1), 0.0, NEG_INF).astype(ms.float32)  # (n, S)
    h = ops.gather(model.embedding, token_ids, 0) + ops.gather(model.position_embedding, positions, 0)  # (1, n, H)
    new_keys, new_values, index, keep = (), (), (), ()
    layer = 0
    for block in model.dense_blocks:
        a = block.ln1(h)
        out, k, v = _attend(block.attn, a, a, keys[layer], values[layer], write, mask)
        h = h + out
        h = h + block.mlp(block.ln2(h))
        new_keys, new_values, layer = new_keys + (k,), new_values + (v,), layer + 1
    for block in model.moe_blocks:
        a = block.ln1(h)
        out, k, v = _attend(block.attn, a, a, keys[layer], values[layer], write, mask)
        h = h + out
        new_keys, new_values, layer = new_keys + (k,), new_values + (v,), layer + 1
        y, layer_index, layer_keep = _moe(block.moe, block.router_input(h), token_ids.reshape(-1),
                                          group_ids.reshape(-1), capacity, start // (seq_len // block.moe.num_ranks))
        h = h + y.reshape(h.shape)  # (1, n, H) <- (n, H)
        index, keep = index + (layer_index,), keep + (layer_keep,)
    query = model.query_layer
    a = query.ln1(h)
    out, k, v = _attend(query.attn, ops.gather(model.query_embedding, positions, 0), a, keys[layer], values[layer],
                        write, mask)
    h = h + out
    h = h + query.mlp(query.ln2(h))
    new_keys, new_values = new_keys + (k,), new_values + (v,)
    return model.logits(h), ops.stack(new_keys), ops.stack(new_values), ops.stack(index), ops.stack(keep)


def _attend(attn, query_in, kv_in, keys, values, write, mask):
    """Write the chunk's keys and values (kv_in [1, n, H]) into this layer's cache [1, nh, S, hd] at the rows
    of `write` [n, S], then attend from query_in over the cache. Returns (out [1, n, H], keys, values)."""
    k, v = attn.keys_values(kv_in)  # (1, nh, n, hd)
    untouched = (1 - write.sum(0)).reshape(1, 1, -1, 1)  # (1, 1, S, 1)
    scatter = ops.broadcast_to(write.T, (1, k.shape[1], write.shape[1], write.shape[0]))  # (1, nh, S, n)
    keys = keys * untouched + ops.matmul(scatter, k.astype(keys.dtype))  # a 0/1 product copies exactly
    values = values * untouched + ops.matmul(scatter, v.astype(values.dtype))
    return attn.attend(query_in, keys, values, mask), keys, values


def _moe(moe, x, token_ids, group_ids, capacity, rank):
    """The MoE layer over a chunk: x [n, H] -> (y [n, H], expert_index [n, K], keep [n, K]). One token goes to
    every routing group and rank `rank`'s copy is kept (module docstring)."""
    if x.shape[0] == 1 and moe.num_ranks > 1:
        ranks = moe.num_ranks
        x = ops.broadcast_to(x, (ranks, x.shape[1]))  # (W, H): one copy per routing group
        token_ids, group_ids = ops.broadcast_to(token_ids, (ranks,)), ops.broadcast_to(group_ids, (ranks,))
        routing = moe.route(x, token_ids, group_ids, capacity, False)
        y = moe.apply(x, routing, capacity)[0]
        row = rank.reshape(1)
        return (ops.gather(y, row, 0), ops.gather(routing[0], row, 0),
                ops.gather(routing[2].astype(ms.int32), row, 0).astype(ms.bool_))
    routing = moe.route(x, token_ids, group_ids, capacity, False)
    return moe.apply(x, routing, capacity)[0], routing[0], routing[2]
