"""Mixture-of-experts routing on the actor: routing replay (R3) and the router's statistics.

Routing replay (`actor.routing_replay: rollout`; "R3", Ma et al. 2025, "Stabilizing MoE Reinforcement Learning by
Aligning Training and Inference Routers"): the rollout engine reports the top-k experts each token was sent to
(SGLang's `return_routed_experts`: for prompt + response tokens but the last, which the engine never ran), and the
actor's forward for old log-probs and training uses those experts instead of its own top-k. The gate weights are
still the actor's router probabilities at those experts (gathered), so the router keeps its gradient. Tokens the
engine did not route (the last one, padding, injected offline samples) keep the actor's own choice.

One `RouterTap` sits in every MoE layer's router (megatron-core's `router_replay` hook, which its top-k routing
calls with the scores and its own top-k function). It replays where told to and counts, per layer: tokens, tokens
per expert, the router's entropy, and how often the actor's own top-k set differs from the replayed one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

RouteList = Sequence[torch.Tensor | None]
"""Per sequence: the engine's routed experts [tokens, layers * top_k] (or [tokens, layers, top_k]), or None."""


@dataclass(frozen=True)
class RouteTargets:
    """One micro-batch's routing, in the order the routers see its tokens (sequence-major: position * rows + row)."""

    valid: torch.Tensor
    """[N] bool: a real token (not padding)."""
    experts: torch.Tensor | None = None
    """[N, layers, top_k] int64: the engine's experts, where `replay`; None: no replay."""
    replay: torch.Tensor | None = None
    """[N] bool: the token's routing is replayed (the engine routed it)."""

    def cut(self, positions: Callable[[torch.Tensor], torch.Tensor], rows: int) -> RouteTargets:
        """The targets of some positions of each row (context parallelism): `positions` takes a [s, rows, ...]
        tensor to its [s', rows, ...] part, as the model input is cut."""

        def part(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            return _flat(positions(t.reshape(-1, rows, *t.shape[1:])))

        return RouteTargets(part(self.valid), part(self.experts), part(self.replay))

    def to(self, device: torch.device | str) -> RouteTargets:
        move = [None if t is None else t.to(device) for t in (self.experts, self.replay)]
        return RouteTargets(self.valid.to(device), *move)


def route_targets(
    input_shape: tuple[int, int],
    indices: Sequence[int],
    lengths: Sequence[int],
    cu_seqlens: torch.Tensor | None,
    routes: RouteList | None,
    num_layers: int,
    top_k: int,
) -> RouteTargets:
    """The `RouteTargets` of a micro-batch with input [b, s] (right-padded rows `indices`, or one packed row laid
    out by `cu_seqlens`); `routes` indexed like the caller's sequences, `lengths` their prompt + response tokens."""
    b, s = input_shape
    valid = torch.zeros(s, b, dtype=torch.bool)  # [s, b]: the routers' order once flattened
    experts = torch.zeros(s, b, num_layers, top_k, dtype=torch.long) if routes is not None else None
    replay = torch.zeros(s, b, dtype=torch.bool) if routes is not None else None
    for row, i in enumerate(indices):
        start, col = (int(cu_seqlens[row]), 0) if cu_seqlens is not None else (0, row)
        valid[start : start + lengths[i], col] = True
        route = None if routes is None else routes[i]
        if route is None:
            continue
        route = route.reshape(route.shape[0], num_layers, top_k)
        n = min(route.shape[0], lengths[i])  # the engine routes all tokens but the last
        experts[start : start + n, col] = route[:n].long()
        replay[start : start + n, col] = True
    return RouteTargets(_flat(valid), _flat(experts), _flat(replay))


def _flat(t: torch.Tensor | None) -> torch.Tensor | None:
    """[s, b, ...] -> [s * b, ...]: the routers' token order."""
    return None if t is None else t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])


class RouterTap:
    """megatron-core's `router_replay` hook of one MoE layer: replays `RouteTargets` and keeps routing counts."""

    def __init__(self, layer: int, num_experts: int, pre_softmax: bool) -> None:
        self.layer, self.num_experts, self.pre_softmax = layer, num_experts, pre_softmax
        self.targets: RouteTargets | None = None
        self.counting = False
        """Within a training step (`start_counting` .. `moe_metrics`): count, and pair recomputes with forwards."""
        self._pending: list[RouteTargets | None] = []
        self.reset()

    def reset(self) -> None:
        """Zero the counts: tokens, replayed tokens, replayed tokens whose own top-k differs, entropy, load."""
        self.counts = torch.zeros(4 + self.num_experts, dtype=torch.float64)

    def get_replay_topk(
        self,
        scores: torch.Tensor,
        topk: int,
        num_groups: int | None = None,
        group_topk: int | None = None,
        default_compute_topk: Callable | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        values, own = default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)
        t, recomputing = self._targets_now()
        usable = t is not None and t.valid.numel() == scores.shape[0]  # targets for other tokens: none used
        replay = usable and t.experts is not None
        if replay:
            chosen = torch.where(t.replay[:, None], t.experts[:, self.layer].to(own.device), own)
            values, indices = scores.gather(1, chosen), chosen
        else:
            indices = own
        if self.counting and not recomputing:
            self._count(scores, own, indices, t if usable else None, replay)
        return values, indices

    def _targets_now(self) -> tuple[RouteTargets | None, bool]:
        """(the targets of the forward now running, whether it is a recompute). Under activation recompute
        (actor.recompute full) a training step's first forward of a layer runs without autograd (inside megatron's
        CheckpointFunction) and is run again, with it, in the backward, micro-batch by micro-batch in the order of
        the forwards: the first forward queues its targets, the recompute takes them back in that order."""
        if not self.counting:  # log-prob passes: no backward
            return self.targets, False
        if not torch.is_grad_enabled():
            self._pending.append(self.targets)
            return self.targets, False
        if self._pending:
            return self._pending.pop(0), True
        return self.targets, False

    @torch.no_grad()
    def _count(
        self, scores: torch.Tensor, own: torch.Tensor, used: torch.Tensor, t: RouteTargets | None, replay: bool
    ) -> None:
        valid = t.valid.to(scores.device) if t is not None else scores.new_ones(scores.shape[0], dtype=torch.bool)
        probs = scores.float() if self.pre_softmax else torch.softmax(scores.float(), dim=-1)
        entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)  # [N]
        load = torch.bincount(used[valid].reshape(-1), minlength=self.num_experts)
        counts = [valid.sum(), 0, 0, entropy[valid].sum()]
        if replay:
            replayed = t.replay.to(scores.device) & valid
            differs = (own.sort(-1).values != t.experts[:, self.layer].to(own.device).sort(-1).values).any(-1)
            counts[1], counts[2] = replayed.sum(), (differs & replayed).sum()
        self.counts += torch.cat([torch.tensor([float(c) for c in counts], dtype=torch.float64), load.double().cpu()])


def _moe_layers(chunk: torch.nn.Module) -> list[tuple[torch.nn.Module, int]]:
    """(router, global layer index) of every MoE layer of one (possibly wrapped) GPTModel chunk."""
    from lcot_mega.actor import megatron_adapter as ma

    layers = getattr(getattr(ma.unwrap(chunk), "decoder", None), "layers", [])
    out = []
    for layer in layers:
        router = getattr(getattr(layer, "mlp", None), "router", None)
        if router is not None:
            out.append((router, layer.layer_number - 1))
    return out


def install_taps(chunks: Sequence[torch.nn.Module], num_experts: int, pre_softmax: bool) -> int:
    """A `RouterTap` in every MoE router of `chunks`; returns how many."""
    routers = [(router, layer) for chunk in chunks for router, layer in _moe_layers(chunk)]
    for router, layer in routers:
        router.router_replay = RouterTap(layer, num_experts, pre_softmax)
    return len(routers)


def with_targets(
    chunks: Sequence[torch.nn.Module], micro_batches: list, sequences: Sequence, routes: RouteList | None
) -> list:
    """`micro_batches` (`batching.MicroBatch`) with their `RouteTargets` where `chunks` are a mixture of experts
    (unchanged otherwise); `routes` per sequence, or None to route as the actor does (the counts still run)."""
    from dataclasses import replace

    from lcot_mega.actor import megatron_adapter as ma

    if not taps(chunks):
        if routes is not None and any(r is not None for r in routes):
            raise ValueError("routed experts were given for a model without mixture-of-experts layers")
        return micro_batches
    if routes is not None and len(routes) != len(sequences):
        raise ValueError(f"{len(routes)} routed-expert entries for {len(sequences)} sequences")
    config = ma.unwrap(chunks[0]).config
    lengths = [len(p) + len(r) for p, r in sequences]
    out = []
    for mb in micro_batches:
        cu = None if mb.packed is None else mb.packed.cu_seqlens.cpu()
        shape = tuple(mb.input_ids.shape)
        targets = route_targets(shape, mb.indices, lengths, cu, routes, config.num_layers, config.moe_router_topk)
        out.append(replace(mb, routing=targets.to(mb.input_ids.device)))
    return out


def sequence_parallel_part(chunk: torch.nn.Module, targets: RouteTargets, rows: int) -> RouteTargets:
    """`targets` of the tokens this rank's routers see: under sequence parallelism the embedding hands each
    tensor-parallel rank a contiguous 1 / TP of the (context-parallel rank's) sequence; all of them otherwise."""
    from lcot_mega.actor import megatron_adapter as ma

    if not ma.unwrap(chunk).config.sequence_parallel:
        return targets
    group = ma.tensor_parallel_group()
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    return targets.cut(lambda t: t.chunk(size, dim=0)[rank], rows)


def taps(chunks: Sequence[torch.nn.Module]) -> list[RouterTap]:
    return [
        r.router_replay
        for chunk in chunks
        for r, _ in _moe_layers(chunk)
        if isinstance(getattr(r, "router_replay", None), RouterTap)
    ]


def set_targets(chunk: torch.nn.Module, targets: RouteTargets | None) -> None:
    """The routing of the micro-batch `chunk` runs next (None: its own top-k, nothing counted per token)."""
    for tap in taps([chunk]):
        tap.targets = targets


def start_counting(chunks: Sequence[torch.nn.Module]) -> None:
    """Zero every tap's counts and megatron-core's per-layer aux-loss tracker; count from the next forward on."""
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

    clear_aux_losses_tracker()
    for tap in taps(chunks):
        tap.reset()
        tap._pending.clear()
        tap.counting = True


_AUX_LOSSES = {"load_balancing_loss": "moe/aux_loss", "z_loss": "moe/z_loss"}
"""megatron-core's tracker names (values without their coefficients) -> our metric keys."""


def _aux_losses(micro_batches: int, num_layers: int) -> dict[str, float]:
    """The aux and z losses megatron-core tracked since `start_counting` (per layer, summed over micro-batches),
    as means over layers, micro-batches and the ranks that hold each layer (collective)."""
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    from lcot_mega.actor import megatron_adapter as ma

    tracker = get_moe_layer_wise_logging_tracker()
    table = torch.zeros(len(_AUX_LOSSES), num_layers, dtype=torch.float64)
    present = torch.zeros(len(_AUX_LOSSES), dtype=torch.float64)
    for i, name in enumerate(_AUX_LOSSES):
        if name in tracker:
            table[i] = tracker[name]["values"][:num_layers].detach().double().cpu()
            present[i] = 1.0
    flat = torch.cat([table.reshape(-1), present])
    if dist.is_initialized() and dist.get_world_size() > 1:
        moved = flat.to(ma.compute_device())
        dist.all_reduce(moved)
        flat = moved.cpu()
    table, present = flat[: table.numel()].reshape(table.shape), flat[table.numel() :]
    world = dist.get_world_size() if dist.is_initialized() else 1
    ranks_per_layer = world / ma.current_layout().pp_size
    return {
        key: float(table[i].sum() / (num_layers * micro_batches * ranks_per_layer))
        for i, key in enumerate(_AUX_LOSSES.values())
        if present[i] > 0
    }


def moe_metrics(
    chunks: Sequence[torch.nn.Module], num_layers: int, num_experts: int, micro_batches: int = 1
) -> dict[str, float]:
    """The counts since `start_counting`, summed over every rank (collective; each rank's tokens and layers are its
    own), as metrics: `moe/expert_load_max` (the busiest expert's tokens over the mean, worst layer: 1 is balanced,
    E / k is every token on the same k experts), `moe/router_entropy` (nats, mean over layers and tokens; log E is
    uniform), `moe/replayed_fraction` and `moe/replay_mismatch` (of replayed tokens, those whose own top-k set
    differs from the engine's; 0 when none was replayed), and, when their coefficients are on, `moe/aux_loss` and
    `moe/z_loss` (megatron-core's load-balancing and z losses without their coefficients, mean per layer and
    micro-batch; `micro_batches` is how many each rank ran)."""
    table = torch.zeros(num_layers, 4 + num_experts, dtype=torch.float64)
    for tap in taps(chunks):
        table[tap.layer] += tap.counts
        tap.counting = False
        tap.targets = None
        tap._pending.clear()
    if dist.is_initialized() and dist.get_world_size() > 1:
        from lcot_mega.actor import megatron_adapter as ma

        moved = table.to(ma.compute_device())
        dist.all_reduce(moved)
        table = moved.cpu()
    aux = _aux_losses(micro_batches, num_layers)
    tokens, replayed, differs, entropy, load = table[:, 0], table[:, 1], table[:, 2], table[:, 3], table[:, 4:]
    seen = tokens > 0
    if not bool(seen.any()):
        return aux
    mean_load = load[seen].sum(-1) / num_experts
    out = {
        "moe/expert_load_max": float((load[seen].max(-1).values / mean_load).max()),
        "moe/router_entropy": float(entropy[seen].sum() / tokens[seen].sum()),
        "moe/router_entropy_max": math.log(num_experts),
    }
    out["moe/replayed_fraction"] = float(replayed.sum() / tokens.sum())
    out["moe/replay_mismatch"] = float(differs.sum() / replayed.sum()) if float(replayed.sum()) > 0 else 0.0
    return out | aux
