"""Packet schema, binding hashes, stream header and routing (pure functions, no process group)."""
from __future__ import annotations

import shutil

import pytest
import torch

from semalign_ds.transport import schema, stream
from semalign_ds.transport.packet import SupervisionPacket


def packet(full_logits: bool = False) -> SupervisionPacket:
    g = torch.Generator().manual_seed(0)
    p = SupervisionPacket(ids_BT=torch.randint(0, 50, (2, 5), generator=g),
                          mask_BT=torch.rand(2, 5, generator=g) > 0.2, sample_ids_B=torch.tensor([7, 3]),
                          targets={2: torch.randn(2, 5, 4, generator=g).bfloat16(),
                                   1: torch.randn(2, 5, 4, generator=g)})
    if full_logits:
        p.full_logits_BTV = torch.randn(2, 5, 50, generator=g)
    else:
        p.top_values_BTK = torch.randn(2, 5, 3, generator=g)
        p.top_idx_BTK = torch.randint(0, 50, (2, 5, 3), generator=g)
        p.tail_BT = torch.rand(2, 5, generator=g)
    return p


@pytest.mark.parametrize("full_logits", [False, True])
def test_packet_round_trips_through_flat_tensors(full_logits):
    p = packet(full_logits)
    flat = schema.packet_to_flat(p)
    assert set(flat) == ({"ids", "mask", "sample_ids", "target.1", "target.2"}
                         | ({"full_logits"} if full_logits else {"top_values", "top_idx", "tail"}))
    if not full_logits:
        assert flat["top_idx"].dtype == torch.int32  # narrowed for the wire and the disk
    back = schema.packet_from_flat(flat)
    for name in ("ids_BT", "mask_BT", "sample_ids_B", "top_values_BTK", "top_idx_BTK", "tail_BT", "full_logits_BTV"):
        a, b = getattr(p, name), getattr(back, name)
        assert (a is None and b is None) or (torch.equal(a, b) and a.dtype == b.dtype), name
    assert back.targets.keys() == {1, 2} and back.targets[2].dtype == torch.bfloat16
    assert all(torch.equal(back.targets[k], p.targets[k]) for k in (1, 2))
    layout = schema.layout_of(flat)
    assert [row[0] for row in layout] == sorted(flat)
    empty = schema.alloc_layout(layout, "cpu")
    spec = lambda d: {n: (t.dtype, list(t.shape)) for n, t in d.items()}  # noqa: E731
    assert spec(empty) == spec(flat)


def test_a_flat_dict_without_the_core_tensors_is_refused():
    with pytest.raises(ValueError, match="lacks the tensors"):
        schema.packet_from_flat({"ids": torch.zeros(1, 1, dtype=torch.long)})


def test_binding_check_names_every_differing_key():
    ours = {"schema": "1", "teacher": "a", "data": "b", "method": "c"}
    schema.check_binding(ours, {**ours, "map": "only-theirs"}, "spool X", "fix it")  # keys in one side only: fine
    with pytest.raises(ValueError) as err:
        schema.check_binding(ours, {**ours, "data": "B", "method": "C"}, "spool X", "fix it")
    text = str(err.value)
    assert "spool X was produced for a different configuration" in text and "fix it" in text
    assert "data (data.*" in text and "method (method.*" in text and "teacher (" not in text
    with pytest.raises(ValueError, match="packet schema 99"):
        schema.check_binding(ours, {**ours, "schema": "99"}, "spool X", "fix it")


def test_digests_follow_content_and_dtype(tmp_path):
    x = torch.arange(6.0)
    assert schema.tensor_digest(x) == schema.tensor_digest(x.clone())
    assert schema.tensor_digest(x) != schema.tensor_digest(x.double())
    assert schema.digest({"a": 1, "b": 2}) == schema.digest({"b": 2, "a": 1})
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text('{"a": 1, "b": 2}')
    (model / "model.safetensors").write_bytes(b"x" * 3000)
    first = schema.model_fingerprint(model, "float32")
    other = tmp_path / "m2"
    shutil.copytree(model, other)
    (other / "config.json").write_text('{"b": 2,  "a": 1}')  # same JSON, other formatting
    assert schema.model_fingerprint(other, "float32") == first
    assert schema.model_fingerprint(model, "bfloat16") != first
    (other / "model.safetensors").write_bytes(b"x" * 2999 + b"y")
    assert schema.model_fingerprint(other, "float32") != first


@pytest.mark.parametrize("cross, uld", [(False, False), (True, False), (False, True)])
def test_the_specs_packet_layout_is_the_schemas_flat_packet(cross, uld):
    """spec.PacketLayout (what plan and run say a token costs) lists exactly the tensors packet_to_flat writes."""
    from semalign_ds.spec import PacketLayout

    B, T, D, K = 2, 5, 6, 3
    mask = torch.ones(B, T, dtype=torch.bool)
    packet = SupervisionPacket(ids_BT=torch.zeros(B, T, dtype=torch.long), mask_BT=mask, sample_ids_B=torch.arange(B),
                               targets={1: torch.zeros(B, T, D).bfloat16(), 3: torch.zeros(B, T, D).bfloat16()},
                               top_values_BTK=torch.zeros(B, T, K), top_idx_BTK=None if uld else torch.zeros(
                                   B, T, K, dtype=torch.long), tail_BT=torch.zeros(B, T),
                               state_mask_BT=mask if cross else None, out_mask_BT=mask if cross else None)
    flat = schema.packet_to_flat(packet)
    layout = PacketLayout(T, (1, 3), D, "bfloat16", K, 100, True, True, not uld, cross)
    per_token = {name: (schema.DTYPE_NAMES[t.dtype], t[0].numel() // T) for name, t in flat.items()
                 if name != "sample_ids"}
    assert per_token == {name: (dtype, n) for name, dtype, n in layout.tensors()}
    assert schema.flat_nbytes(flat) == B * layout.bytes_per_sample


def test_stream_header_round_trip_and_guard():
    buf = stream.encode_header(stream.DATA, {"stage": 3, "layout": [["ids", "int64", [2, 5]]]}, "cpu")
    assert buf.dtype == torch.uint8 and buf.numel() == stream.HEADER_BYTES
    assert stream.decode_header(buf, 0) == (stream.DATA, {"stage": 3, "layout": [["ids", "int64", [2, 5]]]})
    with pytest.raises(stream.StreamError, match="out of step"):
        stream.decode_header(torch.zeros(stream.HEADER_BYTES, dtype=torch.uint8), 4)
    with pytest.raises(stream.StreamError, match="exceeds"):
        stream.encode_header(stream.DATA, {"x": "y" * stream.HEADER_BYTES}, "cpu")


@pytest.mark.parametrize("N, S", [(48, 1), (48, 2), (50, 3), (23, 2)])
def test_stream_jobs_send_every_sample_once_in_the_first_epochs_order(N, S):
    from semalign_ds import data as datamod
    from semalign_ds.run.topology import stream_jobs

    jobs = stream_jobs(N, 4, S, seed=7)
    sent = torch.cat([ids for _, ids in jobs]).tolist()
    assert sorted(sent) == list(range(N))  # every sample once
    for s in range(S):
        mine = [ids for t, ids in jobs if t == s]
        assert all(i % S == s for ids in mine for i in ids.tolist())  # to the rank that owns it
        first = [datamod.micro_batch_ids(N, 4, S, s, 7, m) for m in range(datamod.micro_batches_per_epoch(N, 4, S))]
        assert all(torch.equal(a, b) for a, b in zip(mine, first))  # what the first stage trains on first
