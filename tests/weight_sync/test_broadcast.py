"""Disaggregated weight sync over loopback: a trainer-side BroadcastSync (gloo, rank 0) pushes model A's HF
tensors into two RolloutServers holding model B (ranks 1, 2); both then score exactly like a fresh engine on A."""

from __future__ import annotations

import socket

import pytest
import torch
from helpers.tiny_models import make_tiny_hf

from lcot_mega.rollout.embedded import EmbeddedEngine
from lcot_mega.rollout.http_client import EngineHTTPError, SGLangHTTPEngine
from lcot_mega.rollout.server import RolloutServer, ServeConfig
from lcot_mega.weight_sync.broadcast import BroadcastSync
from lcot_mega.weight_sync.push import WeightSyncError

MODEL = {"initializer_range": 0.2, "max_position_embeddings": 256}
PROBE_PROMPT, PROBE_RESPONSE = [3, 5, 7], [11, 13, 17, 19, 23]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _buckets(model_dir, per_bucket: int = 5):
    from safetensors import safe_open

    tensors = []
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            tensors += [(name, st.get_tensor(name)) for name in st.keys()]  # noqa: SIM118
    return [tensors[i : i + per_bucket] for i in range(0, len(tensors), per_bucket)]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    a = make_tiny_hf(tmp_path_factory.mktemp("a"), "llama", seed=0, **MODEL)
    b = make_tiny_hf(tmp_path_factory.mktemp("b"), "llama", seed=1, **MODEL)
    return a, b


@pytest.fixture
def servers(dirs):
    _, b = dirs
    srvs = [RolloutServer(EmbeddedEngine(b), ServeConfig(port=0), model_path=str(b)).start() for _ in range(2)]
    yield srvs
    for s in srvs:
        s.shutdown()


@pytest.mark.parametrize("flatten", [True, False])
def test_broadcast_sync_matches_fresh_engine(dirs, servers, flatten):
    a, _ = dirs
    expected = EmbeddedEngine(a).score(PROBE_PROMPT, PROBE_RESPONSE)
    clients = [SGLangHTTPEngine(s.url, timeout_s=30, flattened_bucket=flatten) for s in servers]
    before = clients[0].score(PROBE_PROMPT, PROBE_RESPONSE)
    assert not torch.equal(before, expected)

    sync = BroadcastSync(clients, "127.0.0.1", _free_port(), group_name="g1", backend="gloo", timeout_s=30)
    assert sync.flatten is flatten  # from the clients
    sent = []
    real_broadcast = sync.group.broadcast
    sync.group.broadcast = lambda t: (sent.append(t.numel()), real_broadcast(t))[1]
    try:
        buckets = _buckets(a)
        assert len(buckets) > 1
        nbytes, n = sync.push(buckets, 7)
        assert n == len(buckets) and nbytes == sum(t.numel() * t.element_size() for b in buckets for _, t in b)
        per_bucket = [sum(t.numel() for _, t in b) for b in buckets]  # one collective per bucket, or per tensor
        assert sent == (per_bucket if flatten else [t.numel() for b in buckets for _, t in b])
        for c in clients:
            assert c.weight_version == 7
            torch.testing.assert_close(c.score(PROBE_PROMPT, PROBE_RESPONSE), expected, rtol=0, atol=0)
        # A bad name is refused after the broadcast (nothing hangs) and leaves the version alone.
        with pytest.raises(WeightSyncError, match="not_a_weight"):
            sync.push([[("not_a_weight", torch.zeros(2))]], 8)
        assert all(c.weight_version == 7 for c in clients)
        with pytest.raises(ValueError, match="one dtype"):  # refused before anything is received: nothing hangs
            flat = {"load_format": "flattened_bucket"}
            clients[0].update_weights_from_distributed(["a", "b"], ["float32", "bfloat16"], [[2], [2]], "g1", 8, **flat)
    finally:
        sync.close()
    # The group is gone on the servers: a new one under the same name can be created.
    again = BroadcastSync(clients, "127.0.0.1", _free_port(), group_name="g1", backend="gloo", timeout_s=30)
    again.push([], 9)
    assert all(c.weight_version == 9 for c in clients)
    again.close()


def test_port_0_listens_before_inviting_and_close_keep_asks_only_those_to_leave(dirs, servers):
    a, _ = dirs
    clients = [SGLangHTTPEngine(s.url, timeout_s=30) for s in servers]
    sync = BroadcastSync(clients, "127.0.0.1", 0, group_name="g2", backend="gloo", timeout_s=30)
    assert sync.group._store.port > 0  # chosen by the OS and bound before the servers were asked to join
    sync.push(_buckets(a), 11)
    assert [c.weight_version for c in clients] == [11, 11]
    sync.close(keep=[clients[0].base_url])  # server 1 is taken for dead: it is not asked to leave
    alone = BroadcastSync([clients[0]], "127.0.0.1", 0, group_name="g2", backend="gloo", timeout_s=30)
    alone.push([], 12)
    alone.close()
    assert [c.weight_version for c in clients] == [12, 11]
    with pytest.raises(WeightSyncError):  # server 1 still holds g2
        BroadcastSync([clients[1]], "127.0.0.1", 0, group_name="g2", backend="gloo", timeout_s=5)
    clients[1].destroy_weights_update_group("g2")


def test_distributed_endpoints_disabled(dirs):
    _, b = dirs
    srv = RolloutServer(EmbeddedEngine(b), ServeConfig(port=0, allow_weight_updates=False)).start()
    try:
        client = SGLangHTTPEngine(srv.url, timeout_s=10)
        calls = [
            lambda: client.init_weights_update_group("127.0.0.1", _free_port(), 1, 2, "g", "gloo"),
            lambda: client.update_weights_from_distributed(["x"], ["float32"], [[1]], "g", 1),
            lambda: client.destroy_weights_update_group("g"),
        ]
        for call in calls:
            with pytest.raises(EngineHTTPError) as info:
                call()
            assert info.value.status == 403
    finally:
        srv.shutdown()


def test_update_without_group_is_400(dirs, servers):
    client = SGLangHTTPEngine(servers[0].url, timeout_s=10)
    with pytest.raises(ValueError, match="no weight update group"):
        client.update_weights_from_distributed(["x"], ["float32"], [[1]], "missing", 1)
    with pytest.raises(ValueError, match="rank_offset"):
        client.init_weights_update_group("127.0.0.1", _free_port(), 0, 2, "g", "gloo")
