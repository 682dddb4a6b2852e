"""Routed experts from the rollout engines (SGLang's `return_routed_experts`): the embedded engine reports, for each
sample, the top-k experts every MoE layer chose for every token it ran (prompt + response but the last), equal to
what transformers' own forward over the finished sequence chooses; `lcot-mega serve` sends them as SGLang does
(base64 int32 in meta_info) and the HTTP client reads them back unchanged."""

from __future__ import annotations

import http.client
import json

import pytest
import torch
from helpers.tiny_models import make_tiny_hf

from lcot_mega.rollout.embedded import EmbeddedEngine
from lcot_mega.rollout.http_client import SGLangHTTPEngine
from lcot_mega.rollout.protocol import SamplingParams, decode_routed_experts, encode_routed_experts
from lcot_mega.rollout.server import RolloutServer, ServeConfig

MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, initializer_range=0.2)
PROMPTS = [[1, 5, 9], [2, 6, 10, 14, 3], [7]]


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    return make_tiny_hf(tmp_path_factory.mktemp("moe"), "qwen3_moe", **MOE)


def _own_routing(model_dir, ids: list[int]) -> torch.Tensor:
    """transformers' top-k per layer over the whole sequence, [len(ids), layers * k]."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    seen = []
    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(lambda m, a, out: seen.append(out[2]))
    with torch.no_grad():
        model(torch.tensor([ids]))
    return torch.stack(seen, dim=1).reshape(len(ids), -1)


@pytest.mark.parametrize("share_prompt_kv", [True, False])
def test_embedded_engine_reports_the_experts_of_every_token_it_ran(moe_dir, share_prompt_kv):
    engine = EmbeddedEngine(moe_dir, share_prompt_kv=share_prompt_kv)
    # stop on a few ids so that samples end at different steps (rows leave the batch mid-decode)
    params = SamplingParams(max_new_tokens=8, n=3, seed=5, stop_token_ids=(11, 23, 40), return_routed_experts=True)
    groups = engine.generate(PROMPTS, params)
    lengths = set()
    for prompt, group in zip(PROMPTS, groups, strict=True):
        for c in group:
            ids = prompt + c.token_ids
            lengths.add(len(c.token_ids))
            assert c.routed_experts.shape[0] == len(ids) - 1 and c.routed_experts.dtype == torch.int32
            assert torch.equal(c.routed_experts.long(), _own_routing(moe_dir, ids)[:-1])
    assert len(lengths) > 1  # the stops did cut samples at different lengths
    plain = engine.generate(PROMPTS, SamplingParams(max_new_tokens=4, seed=5))
    assert all(c.routed_experts is None for g in plain for c in g)


def test_asking_a_dense_model_for_routed_experts_is_refused(tmp_path):
    engine = EmbeddedEngine(make_tiny_hf(tmp_path, "qwen3"))
    with pytest.raises(ValueError, match="needs a mixture-of-experts model"):
        engine.generate([[1, 2]], SamplingParams(max_new_tokens=2, return_routed_experts=True))


def test_the_wire_format_round_trips_and_checks_its_length():
    routed = torch.randint(0, 128, (7, 12), dtype=torch.int32)
    assert torch.equal(decode_routed_experts(encode_routed_experts(routed), 7), routed)
    with pytest.raises(ValueError, match="not a whole number"):
        decode_routed_experts(encode_routed_experts(routed), 5)


def test_served_routed_experts_equal_the_engines(moe_dir):
    engine = EmbeddedEngine(moe_dir)
    server = RolloutServer(engine, ServeConfig(port=0), model_path=str(moe_dir)).start()
    try:
        client = SGLangHTTPEngine(server.url, timeout_s=60)
        params = SamplingParams(max_new_tokens=6, n=2, seed=9, return_routed_experts=True)
        local, remote = engine.generate(PROMPTS, params), client.generate(PROMPTS, params)
        for lg, rg in zip(local, remote, strict=True):
            for lc, rc in zip(lg, rg, strict=True):
                assert rc.token_ids == lc.token_ids and torch.equal(rc.routed_experts, lc.routed_experts)
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        body = {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2}, "return_routed_experts": "yes"}
        conn.request("POST", "/generate", body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 400 and "return_routed_experts must be a bool" in json.loads(resp.read())["error"]
    finally:
        server.shutdown()


def test_request_body_validates_against_sglang_schema():
    io_struct = pytest.importorskip("sglang.srt.managers.io_struct")
    params = SamplingParams(max_new_tokens=8, return_routed_experts=True)
    io_struct.GenerateReqInput(input_ids=[[1, 2]], sampling_params=params.to_sglang(), return_routed_experts=True)


def test_sglang_servers_are_started_able_to_return_routed_experts_when_replay_is_on():
    from lcot_mega.cluster.runtime import server_command
    from lcot_mega.config import Config

    cfg = Config()
    cfg.rollout.engine, cfg.model.path = "sglang", "/models/qwen3-30b-a3b"
    assert "--enable-return-routed-experts" not in server_command(cfg)(0, 30000)
    cfg.actor.routing_replay = "rollout"
    assert "--enable-return-routed-experts" in server_command(cfg)(0, 30000)


def test_a_response_continued_across_windows_carries_the_routing_of_all_its_tokens(moe_dir):
    """Partial rollout: each window re-runs the prompt and the tokens so far, so the latest window's routed experts
    cover the whole response; a stop string's cut drops the rows of the cut tokens."""
    from lcot_mega.config import Config
    from lcot_mega.trainer.partial import OpenGroup, OpenResponse, PartialRollout
    from lcot_mega.types import Prompt

    engine = EmbeddedEngine(moe_dir)
    prompt = [1, 5, 9]
    response = OpenResponse([], [], [])
    for window in range(3):
        params = SamplingParams(max_new_tokens=3, seed=window, ignore_eos=True, return_routed_experts=True)
        (completion,) = engine.generate([prompt + response.ids], params)[0]
        response.extend(completion, limit=100)
    ids = prompt + response.ids
    assert len(response.ids) == 9 and torch.equal(response.routed.long(), _own_routing(moe_dir, ids)[:-1])
    response.cut(5, "x")
    assert torch.equal(response.routed.long(), _own_routing(moe_dir, ids)[: len(prompt) + 5 - 1])
    group = OpenGroup(Prompt("p", "", "", tuple(prompt)), 1, samples=[response])
    (sample,) = PartialRollout(Config(), decode=lambda ids: "").finish(group).samples
    assert sample.routed_experts is response.routed  # the trained sample replays it
