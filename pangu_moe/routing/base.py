"""The router contract and the routing vocabulary.

Vocabulary (docs/architecture.md, Vocabulary), used in code, YAML and logs:
- `T` tokens in one routing group, `H` hidden, `E` experts, `G` level-1 groups, `E_g = E // G`
  experts per group, `K` choices per token, `C` capacity (slots per expert per routing group).
- *logits* [T, E_g] fp32: level-2 router output for the token's own group, before the score function.
- *scores* [T, E_g] fp32: after the score function (softmax for top-k).
- *expert_index* [T, K] int32: global expert ids, `group * E_g + local id`.
- *gate* [T, K] fp32: combine weight; *keep* [T, K] bool: survived capacity;
  *slot* [T, K] int32: position inside the expert's buffer (valid where keep);
  *requested* [T, K] bool: the choices the token asked for (all, except for routers that pick a
  variable number of experts per token: LocMoE+ with a score threshold, Expert Choice); keep implies
  requested, and demand counts requested choices.
- *affinity* [T, K] fp32: the router's own ranking of a choice, used by the affinity slot policy
  (cosine for the GrAP routers, the logit otherwise).
- *log_prob* [T, K] fp32: log pi(choice | x) for routers that sample their choice and learn by
  REINFORCE (their `Router.objective`); zeros otherwise.
- *tokens_per_expert* [E]: demand before dropping; *kept_per_expert* [E].
- *losses* [3] fp32: the router's weighted auxiliary losses in the order of `LOSS_NAMES`; the model
  sums them over layers and adds them to the LM loss, the trainer logs each by name.

Multi-level routing (PanGu-Σ): level 1 maps `group_id` (the token's domain) to an expert group;
level 2 is the router restricted to that group's `E_g` experts. With `G = 1` it is the plain
router. The composition lives in this base class rather than in a wrapper router: every level-2
rule must score within a group anyway (its parameters are per group, so a domain's sub-model can be
cut out), and the base class adds the group offset and assigns slots over all E experts.
Routers never communicate and know nothing of the rank layout.

A router is a scoring rule (`score`, the subclass's part) plus a slot-assignment policy
(`routing.slots`, chosen by name; a router with its own keep rule overrides `assign`). Graph-mode cells return plain tuples; `Routing` names the fields for Python
callers of the pure-function API `route`.
"""
from collections import namedtuple

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, initializer

from pangu_moe.config import ConfigError
from pangu_moe.ops import make_op
from pangu_moe.precision import kl_dtype, operand
from pangu_moe.routing.slots import assign_slots

LOSS_NAMES = ("aux_loss", "z_loss", "locality_loss")
FUSED_SLOT_POLICIES = ("position", "none")
NOISE_PREFIX = "noise_"
ROUTERS = {}  # registry name (the value of moe.router) -> Router class, filled by `register`
LOSS_COEFFS = {"aux": "aux_loss_coeff", "z": "z_loss_coeff"}  # the shared moe.* loss weights a router may honour


def register(cls):
    """Class decorator: make a Router subclass available as `moe.router: <cls.name>`."""
    if not cls.name or cls.name in ROUTERS:
        raise ValueError(f"register: router name {cls.name!r} is empty or already taken")
    ROUTERS[cls.name] = cls
    return cls


def is_noise_buffer(name):
    """True for a router's fed-noise buffer (`Router.enable_fed_noise`): state of one step, not of the run,
    so checkpoints leave it out."""
    return name.rsplit(".", 1)[-1].startswith(NOISE_PREFIX)


class Routing(namedtuple("Routing", "expert_index gate keep slot requested losses log_prob")):
    """A router's outputs by name; `aux_loss`, `z_loss`, `locality_loss` index `losses`."""
    __slots__ = ()

    def __getattr__(self, name):
        if name in LOSS_NAMES:
            return self.losses[LOSS_NAMES.index(name)]
        raise AttributeError(name)


def stack_losses(aux_loss, z_loss, locality_loss):
    """The `losses` vector [3] fp32 from its named parts (weighted scalars)."""
    return ops.stack((aux_loss, z_loss, locality_loss))


class Router(nn.Cell):
    """Base router: `construct` = level-1 group offset + subclass `score` + slot policy.

    Args:
        num_experts: E (all groups).
        num_groups: G; `E % G == 0`.
        top_k: K.
        slot_policy: a `routing.slots.SLOT_POLICIES` name.
    """

    name = None  # the registry name, the value of moe.router (`register`)
    max_top_k = None  # the largest K it routes with (None: any K up to the experts per group)
    own_slots = False  # True: it keeps its own choices under capacity, so moe.slot_policy must stay "position"
    causal = True  # in evaluation the routing of token t reads no later token (generation needs this)
    loss_terms = ("aux", "z")  # which of moe.aux_loss_coeff / moe.z_loss_coeff it honours (`LOSS_COEFFS`)
    gating_mode = None  # an `ops.gating` mode if `score` is moe_gating's score function (see `use_kernels`)
    logits_dtype = ms.float32  # dtype of the linear logits matmul (`logits`)
    bf16_operands = False  # its operands rounded to bf16 (the CPU bf16 form, `precision.compute_form`)

    @classmethod
    def from_config(cls, model_cfg, moe_cfg, layer, topology):
        """The router of MoE layer `layer` (0-based) from `config.ModelConfig`, `config.MoEConfig` (its own
        section moe.<name>) and the read-only `dispatch.topology.Topology`."""
        raise NotImplementedError

    @classmethod
    def check(cls, cfg):
        """Raise `ConfigError` (one line) if `cfg` (a `config.RunConfig`) breaks one of this router's rules.

        The base rules follow from the class facts; a subclass adds its own and calls this one.
        """
        moe = cfg.moe
        if cls.max_top_k is not None and moe.top_k > cls.max_top_k:
            raise ConfigError(f"moe.top_k = {moe.top_k}: must be at most {cls.max_top_k} for router {cls.name}")
        if cls.own_slots and moe.slot_policy != "position":
            raise ConfigError(f"moe.slot_policy = {moe.slot_policy!r}: must be position (the default) for router "
                              f"{cls.name}, which assigns its own slots")
        for term, key in LOSS_COEFFS.items():
            value, default = getattr(moe, key), type(moe).__dataclass_fields__[key].default
            if term not in cls.loss_terms and value not in (0.0, default):
                raise ConfigError(f"moe.{key} = {value!r}: router {cls.name} has no such loss; leave it at "
                                  f"{default} (the default) or 0")
        if moe.capacity_mode == "locmoe_bound" and cls.propose_capacity is Router.propose_capacity:
            proposers = [name for name, c in ROUTERS.items() if c.propose_capacity is not Router.propose_capacity]
            raise ConfigError(f"moe.capacity_mode = {moe.capacity_mode!r}: must be factor unless moe.router is one "
                              f"that proposes a capacity ({', '.join(proposers)})")

    # Lifecycle, host side: the trainer calls these on every router and knows no router by name.
    # `layer_input` is a callable returning this layer's router input (x [T, H] fp32, token_ids [T] int32,
    # group_ids [T] int32) for the batch at hand; the forward pass behind it runs at most once per step for
    # all routers, and only if one calls it.

    def start(self, static_capacity):
        """Before the first step of a run (fresh or resumed), with the planned training capacity C."""

    def propose_capacity(self, layer_input, static_capacity):
        """A training capacity for this layer, measured on the step-0 batch under the initial weights (only
        with moe.capacity_mode = locmoe_bound; `capacity.plan_capacities` takes the largest proposal).

        Returns (C int, report dict of floats for summary.json)."""
        return static_capacity, {}

    def before_step(self, step, layer_input):
        """Before training step `step` (0-based) on the batch behind `layer_input`. Returns a report dict to
        log, or None."""
        return None

    def after_step(self, tokens_per_expert):
        """After each applied training step, with the layer's demand [E] summed over ranks (numpy int)."""

    def live_capacity(self):
        """The capacity in force at the next step if the router lowered it below the static one, else None.

        The trainer sizes the buffers by it (`capacity.capacity_bucket`); the router still keeps at most this
        many choices per expert when the bucket is larger."""
        return None

    # Inside the compiled step.

    def combine(self, dispatcher, expert_out, flat_index, gate, keep, log_prob):
        """Expert outputs back to the tokens (`dispatch.dispatcher.Dispatcher.combine`), weighted by the gate.

        Args: expert_out [R*E, C, H] and flat_index [T*K] (or, from `ops.shipped.CompactDispatcher`, rows
            [T*K, H] and the row of each choice [T*K]); gate [T, K] fp32, keep [T, K] bool as routed;
            log_prob [T, K] fp32 (the routing's, zeros unless the router samples).
        Returns: y [T, H], policy_term [T] fp32: the router's per-token input to `objective` (zeros here).
        """
        return dispatcher.combine(expert_out, flat_index, gate, keep), ops.zeros(gate.shape[:1], ms.float32)

    def objective(self, token_loss, policy_term):
        """An extra training-loss term from this layer's router, or None (the default: the router learns from
        the LM loss through its gates and from its weighted `losses`).

        Args: token_loss [T_all] fp32 per-token LM loss of the batch; policy_term [T_all] fp32 from `combine`.
        """
        return None

    def update_state(self, lm_loss, applied):
        """After the update of a training step, inside the compiled step: lm_loss fp32 scalar (mean over
        ranks), applied bool scalar (False when the step changed nothing: non-finite, or a dropless step rerun
        with larger buffers)."""

    def __init__(self, num_experts, num_groups, top_k, slot_policy="position"):
        super().__init__()
        self.num_experts = num_experts
        self.num_groups = num_groups
        self.experts_per_group = num_experts // num_groups
        self.top_k = top_k
        self.slot_policy = slot_policy
        self.gating = None
        self.kl_dtype = kl_dtype()  # the locality loss's (`precision.kl_dtype`)
        self.fed_noise = ()  # names of the noise buffers the trainer fills each step
        self.sum_over_ranks = None  # moe.aux_scope = global, one rank per process (`sum_counts_over_ranks`)

    def sum_counts_over_ranks(self, cell):
        """moe.aux_scope = global on a backend with one rank per process: the load-balancing loss takes its
        counts f over all ranks through `cell` (counts [G, E_g + 1] fp32 -> summed over ranks), see
        `losses.load_balancing_loss`. The in-process backends route all ranks' tokens at once instead
        (`model.moe_layer.MoELayer.route`)."""
        self.sum_over_ranks = cell

    def follow_placement(self):
        """Hold `local_mask` (routers that read where experts live: [W, E] fp32, `Topology.local_expert_mask`) in a
        Parameter that `place` updates when experts move (`train.placement`). Call before the router joins its
        parent cell (the Parameter's name gets the cell's prefix then)."""
        mask = getattr(self, "local_mask", None)
        if mask is not None:
            delattr(self, "local_mask")
            self.local_mask = Parameter(Tensor(mask.asnumpy()), name="local_mask", requires_grad=False)

    def place(self, topology):
        """Read the experts' placement from `topology` (a `Topology` with its `expert_slots`), after a move."""
        if getattr(self, "local_mask", None) is not None:
            # assign, not set_data: a compiled step keeps reading the Parameter's original memory
            ops.assign(self.local_mask, Tensor(topology.local_expert_mask().astype(np.float32)))

    def noise_shapes(self, tokens):
        """{name: shape} of the U[0, 1) noise this router draws in training, per routing group of `tokens`."""
        return {"slot_keys": (tokens, self.top_k)} if self.slot_policy == "random" else {}

    def enable_fed_noise(self, world, tokens):
        """Take training noise from buffers [W, tokens, ...] that `feed_noise` refills before every step,
        instead of MindSpore's stateful random ops, whose state a checkpoint cannot hold. The noise of a
        step is then a function of the seed and the step: a resumed run draws what the uninterrupted one
        did, and every backend gives rank r the same noise. Call before the router joins its parent cell
        (the buffers' names get the cell's prefix then)."""
        shapes = self.noise_shapes(tokens)
        for name, shape in shapes.items():
            setattr(self, NOISE_PREFIX + name, Parameter(Tensor(np.zeros((world, *shape), np.float32)),
                                                         name=NOISE_PREFIX + name, requires_grad=False))
        self.fed_noise = tuple(shapes)

    def feed_noise(self, rng):
        """Fill every noise buffer from numpy Generator `rng` (host side, before a training step)."""
        for name in self.fed_noise:
            buffer = getattr(self, NOISE_PREFIX + name)
            # assign, not set_data: a compiled step keeps reading the buffer's original memory
            ops.assign(buffer, Tensor(rng.random(buffer.shape, dtype=np.float32)))

    def uniform_noise(self, name, shape, rank):
        """U[0, 1) fp32 noise of `shape` for training: rank `rank`'s part of this step's fed buffer (all ranks'
        for rank None), or MindSpore's stateful draw for a router without fed noise (used outside the trainer)
        or called on another shape."""
        if name in self.fed_noise:
            buffer = getattr(self, NOISE_PREFIX + name)
            fed = buffer.reshape((-1,) + tuple(buffer.shape[2:])) if rank is None else buffer[rank]  # (T, ...)
            if tuple(fed.shape) == tuple(shape):
                return fed
        return ops.uniform(shape, Tensor(0.0, ms.float32), Tensor(1.0, ms.float32))

    def use_kernels(self, backend):
        """Route through the fused moe_gating op of kernel `backend` (an `ops.KERNEL_BACKENDS` name).

        Only routers whose scoring is moe_gating's (a `gating_mode`, with `gating_logits` and
        `gating_losses`) under a slot policy the op implements (position; none, whose capacity is T)
        can use it; the others keep their reference path, as do all routers under ascend_builtin (MindSpore's shipped
        gating op computes none of our routers' losses). Returns True if the op is used.
        """
        if backend in ("reference", "ascend_builtin") or self.gating_mode is None or \
                self.slot_policy not in FUSED_SLOT_POLICIES:
            return False
        self.gating = make_op("moe_gating", backend, self.top_k, self.num_experts, self.gating_mode)
        return True

    def gating_logits(self, x, group_ids, training, rank=None):
        """moe_gating's input [T, E_g] fp32 (routers with a `gating_mode`); `rank` as in `score`."""
        raise NotImplementedError

    def gating_losses(self, x, logits, scores, local_index, group_ids, rank):
        """The weighted losses [3] fp32 from the gating input and outputs (routers with a `gating_mode`)."""
        raise NotImplementedError

    def score(self, x, token_ids, group_ids, training, rank=None):
        """Level-2 choice inside the token's group.

        `rank`: the source rank whose tokens x holds (a python int), or None for the tokens of all W ranks in
        rank-major blocks; only routers with a rank-dependent loss (LocMoE's locality loss) read it.
        Returns (local_index [T,K] int32 in [0, E_g), gate [T,K] fp32, affinity [T,K] fp32,
        requested [T,K] bool or None for all, losses [3] fp32 from `stack_losses`, already weighted).
        """
        raise NotImplementedError

    def assign(self, expert_index, gate, affinity, requested, capacity, training, rank=None):
        """Slots under capacity by `slot_policy`: returns (slot [T,K] int32, keep [T,K] bool)."""
        keys = self.uniform_noise("slot_keys", expert_index.shape, rank) \
            if self.slot_policy == "random" and training else None
        return assign_slots(self.slot_policy, expert_index, gate, affinity, self.num_experts, capacity, training,
                            requested, keys)

    def construct(self, x, token_ids, group_ids, capacity, training, rank=None):
        """Route T tokens: one routing group (one rank's tokens under expert parallelism).

        Args:
            x: [T, H] router input (any float dtype; router math is fp32).
            token_ids: [T] int32 input vocabulary ids.
            group_ids: [T] int32 level-1 group of each token (its domain, or 0 when G = 1).
            capacity: python int C.
            training: python bool; enables training-only noise.
            rank: python int, the source rank of these tokens, or None (see `score`).
        Returns:
            (expert_index [T,K] int32, gate [T,K] fp32, keep [T,K] bool, slot [T,K] int32,
             requested [T,K] bool, losses [3] fp32, log_prob [T,K] fp32).
        """
        offset = (group_ids * self.experts_per_group).reshape(-1, 1)  # (T, 1): the level-1 group's first expert
        if self.gating is not None:
            logits = self.gating_logits(x, group_ids, training, rank)
            scores, expert_index, gate, slot, keep, _ = self.gating(logits, group_ids, capacity)
            losses = self.gating_losses(x, logits, scores, expert_index - offset, group_ids, rank)
            requested = ops.ones_like(keep)
            return expert_index, gate, keep, slot, requested, losses, ops.zeros_like(gate)
        local_index, gate, affinity, requested, losses = self.score(x, token_ids, group_ids, training, rank)
        expert_index = local_index + offset
        slot, keep = self.assign(expert_index, gate, affinity, requested, capacity, training, rank)
        if requested is None:
            requested = ops.ones_like(keep)
        return expert_index, gate, keep, slot, requested, losses, ops.zeros_like(gate)


class LearnedRouter(Router):
    """A router with a learned linear scorer, one [H, E_g] weight per group (stored as [G, H, E_g]).

    Per-group weights make a token's logits bit-identical to those of the extracted domain sub-model,
    whose router is that group's slice (`model.pangu.extract_domain` slices the Parameter `weight`).

    Args: hidden H; init_std of the normal init; the rest as `Router`.
    """

    def __init__(self, hidden, num_experts, num_groups, top_k, init_std=0.02, slot_policy="position"):
        super().__init__(num_experts, num_groups, top_k, slot_policy)
        shape = (num_groups, hidden, self.experts_per_group)
        self.weight = Parameter(initializer(Normal(init_std), shape, ms.float32), name="weight")

    def logits(self, x, group_ids):
        """x [T, H] (any float dtype), group_ids [T] int32 -> logits [T, E_g] fp32 over the token's group.

        The matmul runs in `logits_dtype`: fp32, or the low dtype of the router-precision ablation
        (`moe.router_dtype: low`, set by `PanguModel.use_precision`).
        """
        dt, bf16 = self.logits_dtype, self.bf16_operands
        # (G, T, E_g) <- (T, H) @ (G, H, E_g)
        logits_all = ops.matmul(operand(x, dt, bf16), operand(self.weight, dt, bf16))
        return group_logits(logits_all.astype(ms.float32), group_ids, self.experts_per_group)


def route(router, x, token_ids, group_ids, capacity, training=False):
    """Call a router outside a model and name its outputs: returns a `Routing`."""
    return Routing(*router(x, token_ids, group_ids, capacity, training))


def group_logits(logits_all, group_ids, experts_per_group):
    """Select each token's own group from per-group logits.

    Args:
        logits_all: [G, T, E_g] fp32, every group's logits for every token.
        group_ids: [T] int32.
    Returns:
        [T, E_g] fp32. A gather, so the values are bit-identical to the group's own matmul.
    """
    num_groups = logits_all.shape[0]
    if num_groups == 1:
        return logits_all[0]
    per_token = logits_all.transpose(1, 0, 2)  # (T, G, E_g) <- (G, T, E_g)
    index = ops.broadcast_to(group_ids.reshape(-1, 1, 1), (per_token.shape[0], 1, experts_per_group))  # (T, 1, E_g)
    return ops.gather_elements(per_token, 1, index).reshape(-1, experts_per_group)  # (T, E_g)


def global_probs(scores, group_ids, num_groups):
    """Scatter group-restricted scores into the global expert axis.

    Args:
        scores: [T, E_g] fp32; group_ids: [T] int32.
    Returns:
        [T, G*E_g] fp32, zero outside each token's group.
    """
    num_tokens, experts_per_group = scores.shape
    if num_groups == 1:
        return scores
    onehot = ops.one_hot(group_ids, num_groups, ops.ones((), scores.dtype), ops.zeros((), scores.dtype))  # (T, G)
    spread = onehot.reshape(num_tokens, num_groups, 1) * scores.reshape(num_tokens, 1, experts_per_group)
    return spread.reshape(num_tokens, num_groups * experts_per_group)  # (T, E) <- (T, G, E_g)
