"""Pre-LN transformer blocks: dense, sparse (MoE FFN), and the PanGu-α query layer."""
from mindspore import nn

from pangu_moe.model.attention import Attention
from pangu_moe.model.mlp import DenseMLP


class DenseBlock(nn.Cell):
    """h + Attn(LN(h)), then + FFN(LN(h)). [B, S, H] -> [B, S, H]."""

    def __init__(self, hidden, num_heads, ffn_hidden, init_std, out_std):
        super().__init__()
        self.ln1 = nn.LayerNorm((hidden,))
        self.attn = Attention(hidden, num_heads, init_std, out_std)
        self.ln2 = nn.LayerNorm((hidden,))
        self.mlp = DenseMLP(hidden, ffn_hidden, init_std, out_std)

    def construct(self, h, mask):
        """h [B, S, H]; mask [S, S] additive -> [B, S, H]."""
        a = self.ln1(h)
        h = h + self.attn(a, a, mask)
        return h + self.mlp(self.ln2(h))


class MoEBlock(nn.Cell):
    """A sparse block: attention, then an MoE FFN over the B*S tokens of the micro-batch."""

    def __init__(self, hidden, num_heads, moe_layer, init_std, out_std):
        super().__init__()
        self.ln1 = nn.LayerNorm((hidden,))
        self.attn = Attention(hidden, num_heads, init_std, out_std)
        self.ln2 = nn.LayerNorm((hidden,))
        self.moe = moe_layer

    def attend(self, h, mask):
        """The attention half: h [B, S, H] -> h + Attn(LN(h)) [B, S, H]."""
        a = self.ln1(h)
        return h + self.attn(a, a, mask)

    def router_input(self, h):
        """The MoE layer's input: LN(h) [T, H] <- h [B, S, H]."""
        b, s, hidden = h.shape
        return self.ln2(h).reshape(b * s, hidden)  # (T, H) <- (B, S, H)

    def sparse_ffn(self, h, token_ids, group_ids, capacity, training):
        """The MoE half: h [B, S, H] -> (h + MoE(LN(h)), losses [3], tokens_per_expert, kept_per_expert,
        policy_term [T], inter_rows [R]) (see `MoELayer.apply`)."""
        y, losses, tokens_per_expert, kept_per_expert, policy_term, inter_rows = self.moe(
            self.router_input(h), token_ids.reshape(-1), group_ids.reshape(-1), capacity, training)  # ids: (T,)
        return (h + y.reshape(h.shape), losses, tokens_per_expert, kept_per_expert, policy_term,  # (B, S, H) <- (T, H)
                inter_rows)

    def construct(self, h, token_ids, group_ids, mask, capacity, training):
        """h [B, S, H]; token_ids, group_ids [B, S] int32 -> (h, losses [3], tokens_per_expert, kept_per_expert,
        policy_term [T], inter_rows [R])."""
        return self.sparse_ffn(self.attend(h, mask), token_ids, group_ids, capacity, training)


class QueryLayer(DenseBlock):
    """PanGu-α top query layer: a dense block whose attention query is a learned position embedding [S, H]."""

    def construct(self, h, query_embedding, mask):
        """h [B, S, H]; query_embedding [S, H]; mask [S, S] -> [B, S, H]."""
        h = h + self.attn(query_embedding, self.ln1(h), mask)
        return h + self.mlp(self.ln2(h))
