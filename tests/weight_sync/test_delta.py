"""Delta weight sync (`weight_sync.delta`): only changed elements travel, each bucket is checked on the engine, a lost
bucket or an engine holding something else is caught, and a failed delta sync falls back to a full one. The
encoder and receiver are checked on hand-made tensors; the end-to-end test trains a TP=2 actor (two gloo
processes) and compares an engine fed deltas with one fed full syncs, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lcot_mega.weight_sync.delta import (
    HEADER,
    INDEX,
    MASK,
    VALUE,
    DeltaEncoder,
    DeltaError,
    DeltaReceiver,
    pack_bits,
    tensor_checksum,
    unpack_bits,
)


def _reference_checksum(t: torch.Tensor) -> int:
    """numpy's view of the same rule: little-endian int64 words summed mod 2^64, tail bytes by place, + byte count."""
    raw = t.contiguous().view(torch.uint8).numpy().tobytes()
    head = len(raw) // 8 * 8
    words = np.frombuffer(raw[:head], dtype="<u8").astype(object) if head else []
    tail = sum(b << (8 * i) for i, b in enumerate(raw[head:]))
    return (int(sum(words)) + tail + len(raw)) % 2**64


@pytest.mark.parametrize("dtype, n", [(torch.float32, 10), (torch.bfloat16, 7), (torch.float16, 1), (torch.int8, 13)])
def test_checksum_is_the_byte_sum_worked_in_numpy(dtype, n):
    t = (torch.randn(n) * 50).to(dtype)
    assert tensor_checksum(t) == _reference_checksum(t)


def test_checksum_sees_one_ulp_and_the_sign_of_zero():
    t = torch.zeros(64, dtype=torch.bfloat16)
    base = tensor_checksum(t)
    t[37] = -0.0
    assert tensor_checksum(t) != base  # equal as numbers, different bits: the engine holds other bytes
    u = torch.full((64,), 0.02, dtype=torch.bfloat16)
    v = u.clone()
    v.view(torch.int16)[5] += 1  # one bf16 ulp up
    assert tensor_checksum(v) != tensor_checksum(u)


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(40, 30, generator=g).to(torch.bfloat16),
        "b.weight": torch.randn(100, generator=g).to(torch.bfloat16),
        "c.bias": torch.randn(8, generator=g).to(torch.bfloat16),
    }


def _buckets(state: dict[str, torch.Tensor]) -> list[list[tuple[str, torch.Tensor]]]:
    """Two buckets: a, then b and c (fp32 on the wire, as the actor's weights are)."""
    return [[("a.weight", state["a.weight"].float())], [(n, state[n].float()) for n in ("b.weight", "c.bias")]]


def _apply(receiver: DeltaReceiver, engine: dict[str, torch.Tensor], buckets, version: int) -> None:
    for named in buckets:
        if any(n == HEADER for n, _ in named):
            receiver.apply(named, engine, version)
        else:
            for n, t in named:
                engine[n].copy_(t)


def _synced_pair() -> tuple[DeltaEncoder, DeltaReceiver, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """An encoder with a baseline at version 1 and an engine holding it."""
    trainer, engine = _state(0), _state(1)
    enc, rec = DeltaEncoder(torch.bfloat16), DeltaReceiver()
    first = list(enc.encode(_buckets(trainer)))
    assert all(HEADER not in dict(b) for b in first)  # no baseline: whole tensors, no records, as a full sync
    _apply(rec, engine, first, 0)
    enc.commit(1)
    assert all(torch.equal(engine[n], trainer[n]) for n in trainer)
    return enc, rec, trainer, engine


def test_a_delta_sends_exactly_the_changed_elements_and_the_engine_ends_equal():
    enc, rec, trainer, engine = _synced_pair()
    flat = trainer["a.weight"].view(-1)
    for i in (3, 700, 1199):
        flat[i] = flat[i] + 1.0
    trainer["c.bias"][:] = trainer["c.bias"] * 2  # every element: whole tensor is smaller than 8 x (4 + 2) bytes
    out = list(enc.encode(_buckets(trainer)))
    first = dict(out[0])
    assert first[f"a.weight{INDEX}"].tolist() == [3, 700, 1199] and first[f"a.weight{INDEX}"].dtype == torch.int32
    assert torch.equal(first[f"a.weight{VALUE}"], flat[[3, 700, 1199]])
    second = dict(out[1])
    assert "c.bias" in second and f"b.weight{INDEX}" in second and second[f"b.weight{INDEX}"].numel() == 0
    assert out[2] == [(HEADER, out[2][0][1])] and out[2][0][1].tolist() == [1, -1, 2]  # commit: 2 buckets
    # bytes by hand: a: 3 x (4 + 2); b: empty; c: 8 x 2 whole; records of 3 + 1 (a), 3 + 2 (b, c), 3 int64 words
    assert enc.stats.sent_bytes == 3 * 6 + 0 + 16 + (3 + 1) * 8 + (3 + 2) * 8 + 3 * 8
    assert enc.stats.full_bytes == (1200 + 100 + 8) * 2 and enc.stats.changed == 3 + 8
    _apply(rec, engine, out, 1)
    assert all(torch.equal(engine[n], trainer[n]) for n in trainer)


def test_bitmaps_pack_as_numpy_packbits_little_and_unpack_back():
    mask = torch.rand(77, generator=torch.Generator().manual_seed(3)) < 0.3
    packed = pack_bits(mask)
    assert packed.tolist() == np.packbits(mask.numpy(), bitorder="little").tolist()
    assert torch.equal(unpack_bits(packed, 77), mask)


def test_a_tensor_with_many_changes_travels_as_bitmap_and_values():
    """a: 1200 bf16 elements, 300 changed: indices 300 x 6 = 1800 B, bitmap 150 + 600 = 750 B, whole 2400 B."""
    enc, rec, trainer, engine = _synced_pair()
    flat = trainer["a.weight"].view(-1)
    flat[::4] = flat[::4] + 1.0
    out = list(enc.encode(_buckets(trainer)))
    first = dict(out[0])
    assert set(first) == {f"a.weight{MASK}", f"a.weight{VALUE}", HEADER}
    assert first[f"a.weight{MASK}"].tolist() == [0b00010001] * 150 and first[f"a.weight{VALUE}"].numel() == 300
    _apply(rec, engine, out, 1)
    assert all(torch.equal(engine[n], trainer[n]) for n in trainer)
    short = [(n, t[:-1] if n.endswith(VALUE) else t) for n, t in out[0]]
    with pytest.raises(DeltaError, match="300 places for 299 values"):
        DeltaReceiver().apply(short, engine, 1)


def test_a_lost_bucket_is_detected_in_the_middle_and_at_the_end():
    enc, rec, trainer, engine = _synced_pair()
    trainer["a.weight"][0, 0] += 1
    out = list(enc.encode(_buckets(trainer)))
    rec.apply(out[0], engine, 1)
    with pytest.raises(DeltaError, match=r"bucket was lost|received 1"):
        rec.apply(out[2], engine, 1)  # bucket 1 never came: the commit counts one bucket
    enc2, rec2, trainer2, engine2 = _synced_pair()
    out = list(enc2.encode(_buckets(trainer2)))
    with pytest.raises(DeltaError, match="bucket 1 arrived, bucket 0 was next"):
        rec2.apply(out[1], engine2, 1)


def test_an_engine_holding_other_weights_fails_the_checksum_and_a_wrong_version_is_refused():
    enc, rec, trainer, engine = _synced_pair()
    engine["b.weight"][50] += 1  # e.g. a restarted server loaded something else; version still 1
    trainer["b.weight"][7] += 1
    out = list(enc.encode(_buckets(trainer)))
    rec.apply(out[0], engine, 1)
    with pytest.raises(DeltaError, match=r"b\.weight differs"):
        rec.apply(out[1], engine, 1)
    with pytest.raises(DeltaError, match="against weight version 1, but this engine holds version 0"):
        rec.apply(out[0], engine, 0)


def test_a_malformed_delta_is_refused_before_any_write():
    enc, rec, trainer, engine = _synced_pair()
    trainer["a.weight"][1, 1] += 1
    out = list(enc.encode(_buckets(trainer)))
    bad = [(n, t.clone() + 5000 if n.endswith(INDEX) else t) for n, t in out[0]]
    before = engine["a.weight"].clone()
    with pytest.raises(DeltaError, match="outside its 1200 elements"):
        rec.apply(bad, engine, 1)
    assert torch.equal(engine["a.weight"], before)
    with pytest.raises(DeltaError, match="not a parameter"):
        rec.apply([("zzz", torch.zeros(2)), out[0][-1]], engine, 1)


def test_reset_drops_the_baseline_and_the_next_sync_is_whole():
    enc, _, trainer, _ = _synced_pair()
    enc.reset()
    out = list(enc.encode(_buckets(trainer)))
    assert [n for b in out for n, _ in b] == ["a.weight", "b.weight", "c.bias"]
    assert enc.version is None  # no baseline until the engines confirmed this sync


# ----------------------------------------------------------------------------------- end to end, TP=2 actor


class _DropSecondDeltaBucket:
    """A transport that loses bucket 1 of a delta sync on its way to the engine (full buckets all arrive)."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def push(self, buckets, version: int) -> tuple[int, int]:
        old, n = self.engine.weight_version, 0
        for i, bucket in enumerate(buckets):
            bucket = list(bucket)
            if not (i == 1 and any(name == HEADER for name, _ in bucket)):
                self.engine.update_weights(bucket, old)
            n += 1
        self.engine.update_weights((), version)
        return 0, n


def _run(rank: int, world: int, a_dir: str, b_dir: str) -> dict:
    from helpers.train_batches import random_train_batch
    from transformers import AutoConfig

    from lcot_mega.actor import megatron_adapter as ma
    from lcot_mega.actor.actor import MegatronActor
    from lcot_mega.bridge.arch import arch_from_hf_config
    from lcot_mega.config import ActorConfig, AlgoConfig
    from lcot_mega.rollout import EmbeddedEngine
    from lcot_mega.weight_sync import sync_weights

    torch.set_num_threads(1)
    arch = arch_from_hf_config(AutoConfig.from_pretrained(a_dir))
    actor = MegatronActor(arch, ActorConfig(tensor_parallel=2, lr=1e-5), AlgoConfig(), a_dir)
    by_delta = EmbeddedEngine(b_dir, dtype=torch.bfloat16) if rank == 0 else None
    by_full = EmbeddedEngine(b_dir, dtype=torch.bfloat16) if rank == 0 else None
    encoder = DeltaEncoder(torch.bfloat16)
    out: dict = {"equal": [], "sent_frac": [], "fallback": []}

    def sync(step: int, transport=None) -> None:
        report = sync_weights(actor.chunks, arch, [by_delta] if by_delta else [], step, bucket_bytes=20_000,
                              delta=encoder, transport=transport)  # fmt: skip
        sync_weights(actor.chunks, arch, [by_full] if by_full else [], step)
        if rank == 0:
            a, b = by_delta.parameter_views(), by_full.parameter_views()
            out["equal"].append(all(torch.equal(a[n], b[n]) for n in b) and by_delta.weight_version == step)
            out["sent_frac"].append(report.metrics()["sync/delta_sent_frac"])
            out["fallback"].append(report.delta_fallback)

    sync(0)
    for step in range(1, 5):
        actor.train_step(random_train_batch(step))
        sync(step, _DropSecondDeltaBucket(by_delta) if step == 3 and rank == 0 else None)
    ma.destroy_parallel()
    return out


@pytest.fixture(scope="module")
def delta_run(tmp_path_factory) -> dict:
    pytest.importorskip("megatron.core")
    from helpers.distributed_harness import run_gloo
    from helpers.tiny_models import make_tiny_hf

    tmp = tmp_path_factory.mktemp("delta")
    a_dir = make_tiny_hf(tmp / "a", "qwen2", seed=0)
    b_dir = make_tiny_hf(tmp / "b", "qwen2", seed=1)
    return run_gloo(_run, 2, str(a_dir), str(b_dir))[0]


def test_an_engine_fed_deltas_holds_bit_for_bit_what_full_syncs_give(delta_run):
    assert delta_run["equal"] == [True] * 5
    assert delta_run["sent_frac"][0] == 1.0  # the first sync has no baseline: full
    assert all(0.0 < f < 0.8 for f in (delta_run["sent_frac"][i] for i in (1, 2, 4)))


def test_a_lost_bucket_makes_the_sync_fall_back_to_full_and_delta_resumes_after(delta_run):
    assert delta_run["fallback"] == [False, False, False, True, False]
    assert delta_run["sent_frac"][3] == 1.0 and delta_run["sent_frac"][4] < 0.8


# ------------------------------------------------------------------------------------------------ config


def test_delta_sync_is_refused_where_no_delta_can_travel_naming_the_keys():
    from lcot_mega.config import ConfigError, load_config
    from lcot_mega.trainer.preflight import sync_mode_errors

    def errors(*overrides: str) -> list[str]:
        return sync_mode_errors(load_config(None, ["rollout.sync=delta", *overrides]))

    (local,) = errors()  # the in-process engine is written in place
    assert "rollout.served = false" in local and "rollout.sync=full" in local
    (colocated,) = errors("cluster.mode=colocated")
    assert "cluster.mode = 'colocated'" in colocated
    (sglang,) = errors("rollout.engine=sglang")
    assert "only the embedded engine applies" in sglang and "rollout.engine = 'sglang'" in sglang
    assert errors("rollout.served=true") == errors("cluster.mode=disaggregated") == []
    assert sync_mode_errors(load_config(None, [])) == []
    with pytest.raises(ConfigError, match=r"rollout\.sync"):
        load_config(None, ["rollout.sync=sparse"])
