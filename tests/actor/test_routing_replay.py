"""Routing replay (R3) on the actor: given experts per token and layer, the actor's log-probs equal transformers'
`Qwen3MoeForCausalLM` forced onto the same experts (its gate weights still its own probabilities there), at EP1,
EP2 and with packed sequences; the moe/ metrics count what a hand count over the same forward finds."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.distributed_harness import run_gloo
from helpers.tiny_models import ONE_ROUTING_BY_DEFAULT, make_tiny_hf

from lcot_mega.actor.routing import route_targets

pytest.importorskip("megatron.core")

MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, initializer_range=0.2)
SEQUENCES = [([1, 5, 9, 13], [20, 30, 40, 50, 60]), ([2, 6, 10], [70, 80, 11, 12]), ([7], [3, 4, 5, 6, 8, 9])]
LAYERS, TOP_K, EXPERTS = 2, 2, 4


def _forced_routes(seed: int) -> list[torch.Tensor | None]:
    """Random distinct top-k experts for every token an engine would have run (all but the last); the second
    sequence gets none (an injected offline sample: the actor routes it itself)."""
    g = torch.Generator().manual_seed(seed)
    out: list[torch.Tensor | None] = []
    for i, (prompt, response) in enumerate(SEQUENCES):
        n = len(prompt) + len(response) - 1
        routes = torch.stack([torch.randperm(EXPERTS, generator=g)[:TOP_K] for _ in range(n * LAYERS)])
        out.append(None if i == 1 else routes.reshape(n, LAYERS * TOP_K).to(torch.int32))
    return out


def _hf_forced(hf_dir: str, routes: list[torch.Tensor | None]) -> tuple[list[torch.Tensor], dict[str, float]]:
    """transformers' log-probs with each MoE gate forced onto `routes` where given, and the moe/ metrics counted
    by hand over the same forwards."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    norm = model.config.norm_topk_prob
    counts = {"tokens": 0, "replayed": 0, "differs": 0, "entropy": 0.0, "load": torch.zeros(LAYERS, EXPERTS)}
    state: dict = {}

    def gate_forward(layer: int, gate, hidden: torch.Tensor):
        logits = torch.nn.functional.linear(hidden.reshape(-1, gate.hidden_dim), gate.weight)
        probs = torch.softmax(logits, dim=-1)
        own = torch.topk(probs, TOP_K, dim=-1).indices
        forced, n = state["forced"], state["forced_len"]
        chosen = own.clone()
        if forced is not None:
            chosen[:n] = forced[:, layer].long()
            counts["replayed"] += n
            counts["differs"] += int((own[:n].sort(-1).values != chosen[:n].sort(-1).values).any(-1).sum())
        counts["tokens"] += logits.shape[0]
        counts["entropy"] += float(-(probs * probs.log()).sum())
        counts["load"][layer] += torch.bincount(chosen.reshape(-1), minlength=EXPERTS).double()
        weights = probs.gather(1, chosen)
        if norm:
            weights = weights / weights.sum(-1, keepdim=True)
        return logits, weights.to(logits.dtype), chosen

    for j, layer in enumerate(model.model.layers):
        layer.mlp.gate.forward = lambda h, j=j, gate=layer.mlp.gate: gate_forward(j, gate, h)
    logprobs = []
    for (prompt, response), route in zip(SEQUENCES, routes, strict=True):
        state["forced"] = None if route is None else route.reshape(-1, LAYERS, TOP_K)
        state["forced_len"] = 0 if route is None else route.shape[0]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + response])).logits[0, :-1]
        logp = torch.log_softmax(logits, -1)[len(prompt) - 1 :].gather(-1, torch.tensor(response)[:, None])[:, 0]
        logprobs.append(logp)
    load = counts["load"]
    metrics = {
        "moe/expert_load_max": float((load.max(-1).values / (load.sum(-1) / EXPERTS)).max()),
        "moe/router_entropy": counts["entropy"] / counts["tokens"],
        "moe/replayed_fraction": counts["replayed"] / counts["tokens"],
        "moe/replay_mismatch": counts["differs"] / max(counts["replayed"], 1),
    }
    return logprobs, metrics


def _actor_replay(
    rank: int, world: int, hf_dir: str, ep: int, packed: bool, routes: list, cp: int = 1, tp: int = 1
) -> dict:
    from transformers import AutoConfig

    from lcot_mega.actor.actor import MegatronActor
    from lcot_mega.actor.train_step import TrainBatch
    from lcot_mega.bridge.arch import arch_from_hf_config
    from lcot_mega.config import ActorConfig, AlgoConfig

    torch.set_num_threads(1)
    arch = arch_from_hf_config(AutoConfig.from_pretrained(hf_dir))
    cfg = ActorConfig(
        expert_parallel=ep, pack_sequences=packed, context_parallel=cp, tensor_parallel=tp, sequence_parallel=tp > 1
    )
    actor = MegatronActor(arch, cfg, AlgoConfig(), hf_dir)
    out = {
        "replayed": actor.compute_logprobs(SEQUENCES, routing=routes),
        "own": actor.compute_logprobs(SEQUENCES),
    }
    batch = TrainBatch([p for p, _ in SEQUENCES], [r for _, r in SEQUENCES], [1.0, -1.0, 0.5], routing=routes)
    out["metrics"] = actor.train_step(batch)
    return out


@pytest.fixture(scope="module", params=[True, False], ids=["norm_topk", "no_norm_topk"])
def moe_dir(request, tmp_path_factory):
    shape = dict(MOE, num_hidden_layers=LAYERS, norm_topk_prob=request.param)
    return str(make_tiny_hf(tmp_path_factory.mktemp("replay"), "qwen3_moe", **shape))


SLOW = pytest.mark.slow


# The routing normalization changes what the replay forces (the probabilities of the given experts), not the layout
# path: both routings run at EP1 by default, the layouts with one of them (the rest in the slow tier).
@pytest.mark.parametrize(
    ("moe_dir", "ep", "packed", "cp", "tp"),
    [
        pytest.param(True, 1, False, 1, 1, id="norm_topk-ep1"),
        pytest.param(False, 1, False, 1, 1, id="no_norm_topk-ep1"),
        pytest.param(True, 2, False, 1, 1, id="norm_topk-ep2"),
        pytest.param(False, 2, False, 1, 1, id="no_norm_topk-ep2", marks=SLOW),
        pytest.param(True, 1, True, 1, 1, id="packed", marks=SLOW),  # tp2-sp-packed covers packing too
        pytest.param(True, 1, False, 2, 1, id="norm_topk-cp2"),
        pytest.param(False, 1, False, 2, 1, id="no_norm_topk-cp2", marks=SLOW),
        pytest.param(True, 1, False, 1, 2, id="norm_topk-tp2-sp"),
        pytest.param(False, 1, False, 1, 2, id="no_norm_topk-tp2-sp", marks=SLOW),
        pytest.param(True, 1, True, 1, 2, id="norm_topk-tp2-sp-packed"),
        pytest.param(False, 1, True, 1, 2, id="no_norm_topk-tp2-sp-packed", marks=SLOW),
    ],
    indirect=["moe_dir"],
)
def test_replayed_routing_gives_transformers_forced_logprobs(moe_dir, ep, packed, cp, tp):
    """cp2: each of two ranks runs half of every sequence; tp2-sp: sequence parallelism hands each router half of
    the (padded or packed) tokens. The replayed experts are cut the same way."""
    routes = _forced_routes(seed=ep + 2 * packed)
    want, counted = _hf_forced(moe_dir, routes)
    own, _ = _hf_forced(moe_dir, [None] * len(SEQUENCES))
    for out in run_gloo(_actor_replay, max(ep, cp) * tp, moe_dir, ep, packed, routes, cp, tp):
        for got, ref in zip(out["replayed"], want, strict=True):
            assert torch.allclose(got, ref, atol=1e-4), (got - ref).abs().max()
        # the forced experts matter: without replay the log-probs are transformers' own routing's
        assert max((a - b).abs().max() for a, b in zip(out["own"], own, strict=True)) < 1e-4
        assert max((a - b).abs().max() for a, b in zip(out["replayed"], own, strict=True)) > 1e-2
        m = out["metrics"]
        assert m["actor/update_ok"] == 1.0
        for key, value in counted.items():
            assert math.isclose(m[key], value, rel_tol=1e-4, abs_tol=1e-6), (key, m[key], value)


def test_route_targets_lay_tokens_out_as_the_routers_see_them():
    """Padded [b, s]: the routers see position-major order (position * rows + row); packed: the sequences end to
    end. A sequence's last token and the padding are not replayed; a sequence without routes is not either."""
    routes = [torch.arange(3 * 2).reshape(3, 2), None, torch.arange(100, 104).reshape(2, 2)]
    lengths = [4, 2, 3]
    padded = route_targets((2, 4), [0, 2], lengths, None, routes, num_layers=1, top_k=2)
    assert padded.valid.tolist() == [True, True, True, True, True, True, True, False]
    assert padded.replay.tolist() == [True, True, True, True, True, False, False, False]
    assert padded.experts[:, 0].tolist()[:6] == [[0, 1], [100, 101], [2, 3], [102, 103], [4, 5], [0, 0]]
    packed = route_targets((1, 9), [0, 1, 2], lengths, torch.tensor([0, 4, 6, 9]), routes, num_layers=1, top_k=2)
    assert packed.valid.all() and packed.replay.tolist() == [1, 1, 1, 0, 0, 0, 1, 1, 0]
    assert packed.experts[6:8, 0].tolist() == [[100, 101], [102, 103]]


def _step_with_replay(rank: int, world: int, hf_dir: str, recompute: str, routes: list) -> dict:
    """One step at PP2 with one sequence per micro-batch: the 1F1B schedule runs a later micro-batch's forward
    before an earlier one's backward, so a recompute that took the latest targets would route wrongly."""
    from transformers import AutoConfig

    from lcot_mega.actor.actor import MegatronActor
    from lcot_mega.actor.train_step import TrainBatch
    from lcot_mega.bridge.arch import arch_from_hf_config
    from lcot_mega.config import ActorConfig, AlgoConfig

    torch.set_num_threads(1)
    arch = arch_from_hf_config(AutoConfig.from_pretrained(hf_dir))
    cfg = ActorConfig(recompute=recompute, lr=1e-2, pipeline_parallel=2, micro_batch_tokens=10)
    actor = MegatronActor(arch, cfg, AlgoConfig(), hf_dir)
    batch = TrainBatch([p for p, _ in SEQUENCES], [r for _, r in SEQUENCES], [1.0, -1.0, 0.5], routing=routes)
    metrics = actor.train_step(batch)
    assert metrics["actor/micro_batches"] == 3
    return {"metrics": metrics, "after": actor.compute_logprobs(SEQUENCES, routing=routes)}


@ONE_ROUTING_BY_DEFAULT
def test_replay_under_full_activation_recompute_trains_like_without(moe_dir):
    """With actor.recompute=full each layer runs again in the backward; the recompute takes back the experts its
    micro-batch's forward replayed (not the last micro-batch's, nor its own top-k): the same gradients, the same
    step, the same counts as without recompute."""
    routes = _forced_routes(seed=7)
    plain = run_gloo(_step_with_replay, 2, moe_dir, "none", routes)[1]  # the last stage reports
    recomputed = run_gloo(_step_with_replay, 2, moe_dir, "full", routes)[1]
    for key in ("actor/grad_norm", "moe/replay_mismatch", "moe/expert_load_max", "moe/router_entropy"):
        assert recomputed["metrics"][key] == pytest.approx(plain["metrics"][key], rel=1e-5), key
    for got, want in zip(recomputed["after"], plain["after"], strict=True):
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
