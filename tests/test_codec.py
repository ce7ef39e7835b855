"""Packet codecs (transport/codec.py): exact where they must be, bounded where they quantize, refused by name where
a reader cannot decode."""
from __future__ import annotations

import json

import pytest
import torch

from semalign_ds.method.objectives import kl_topk
from semalign_ds.spec import PacketLayout, id_bytes
from semalign_ds.transport import codec as codecmod, schema, spool
from semalign_ds.transport.codec import BasisFit, Codec, fit_bases, pack_ids, unpack_ids
from semalign_ds.transport.packet import SupervisionPacket

B, T, D, K, V = 3, 16, 24, 8, 5000


def low_rank_targets(r: int, seed: int = 0, noise: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(D, r, generator=g))[0]
    x = torch.randn(B, T, r, generator=g) * torch.linspace(3, 1, r) @ basis.T + 0.5
    return x + noise * torch.randn(B, T, D, generator=g)


def packet(targets: dict[int, torch.Tensor], seed: int = 0) -> SupervisionPacket:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * 3
    values, idx = logits.topk(K, dim=-1)
    tail = 1 - torch.softmax(logits, -1).gather(-1, idx).sum(-1)
    return SupervisionPacket(ids_BT=torch.randint(0, V, (B, T), generator=g), mask_BT=torch.ones(B, T, dtype=torch.bool),
                             sample_ids_B=torch.arange(B), targets=targets, top_values_BTK=values, top_idx_BTK=idx,
                             tail_BT=tail)


def fitted(targets: dict[int, torch.Tensor], rank: int, energy=None, target_bits=8, logit_bits=8) -> Codec:
    fit = BasisFit()
    fit.add(targets, torch.ones(B, T, dtype=torch.bool))
    ranks, means, bases, explained = fit_bases(fit, rank, energy)
    return Codec("compact", target_bits, logit_bits, id_bytes(V), ranks, means, bases, explained)


@pytest.mark.parametrize("vocab", [200, 5000, 70000, 262144, 2**31])
def test_ids_take_the_fewest_bytes_and_round_trip(vocab):
    ids = torch.tensor([0, 1, vocab // 2, vocab - 1], dtype=torch.int64)
    n = id_bytes(vocab)
    assert n == {200: 1, 5000: 2, 70000: 3, 262144: 3, 2**31: 4}[vocab]
    packed = pack_ids(ids, n)
    assert packed.dtype == torch.uint8 and packed.shape == (4, n) and torch.equal(unpack_ids(packed), ids)


def test_lossless_is_the_schema_flat_unchanged():
    flat = schema.packet_to_flat(packet({1: low_rank_targets(4)}))
    out = Codec().encode(flat)
    assert out is flat and Codec().decode(out, torch.float32) is flat


def test_a_target_in_the_fitted_subspace_comes_back_up_to_the_quantization():
    t = low_rank_targets(6)
    for bits, tol in ((8, 0.02), (16, 1e-3)):
        codec = fitted({2: t}, rank=6, target_bits=bits)
        enc = codec.encode({"target.2": t})
        assert set(enc) == ({"target.2.q", "target.2.scale"} if bits == 8 else {"target.2.c16"})
        back = codec.decode(enc, torch.float32)["target.2"]
        assert ((back - t).norm() / t.norm()) < tol


def test_the_energy_threshold_picks_the_smallest_rank_that_explains_it():
    t = low_rank_targets(6, noise=0.01)
    assert fitted({1: t}, rank=20).ranks == {1: 20}  # no threshold: the rank asked for
    codec = fitted({1: t}, rank=20, energy=0.99)
    assert 3 <= codec.ranks[1] <= 6 and codec.energy[1] >= 0.99
    assert fitted({1: t}, rank=2, energy=0.99).ranks == {1: 2}  # capped by target_rank


def test_logits_keep_their_ids_and_distribution():
    p = packet({})
    flat = schema.packet_to_flat(p)
    for bits, tol in ((8, 2e-3), (16, 5e-4)):  # the tail travels in float16 either way
        codec = fitted({1: low_rank_targets(3)}, rank=3, logit_bits=bits)
        back = schema.packet_from_flat(codec.decode(codec.encode(flat), torch.float32))
        assert torch.equal(back.ids_BT, p.ids_BT) and torch.equal(back.top_idx_BTK, p.top_idx_BTK)
        assert torch.allclose(back.tail_BT, p.tail_BT, atol=1e-3)
        zs = torch.randn(B, T, V)
        exact = kl_topk(zs, p.top_values_BTK, p.top_idx_BTK, p.tail_BT)
        assert abs(float(kl_topk(zs, back.top_values_BTK, back.top_idx_BTK, back.tail_BT)) - float(exact)) < tol


def test_the_layout_the_spec_plans_is_the_encoded_packet():
    t = {1: low_rank_targets(5), 3: low_rank_targets(5, seed=1)}
    codec = fitted(t, rank=5)
    enc = codec.encode(schema.packet_to_flat(packet(t)))
    layout = PacketLayout(T, (1, 3), D, "float32", K, V, True, True, True, False, "compact", 5, 8, 8, id_bytes(V))
    per_token = {n: (schema.DTYPE_NAMES[x.dtype], x[0].numel() // T) for n, x in enc.items() if n != "sample_ids"}
    assert per_token == {n: (d, k) for n, d, k in layout.tensors()}
    assert schema.flat_nbytes(enc) == B * layout.bytes_per_sample
    # per token: ids 2 + mask 1 + 2 layers x (5 + 2) + values 8 + scale 2 + tail 2 + ids 8 x 2
    assert layout.bytes_per_token == 2 + 1 + 2 * 7 + 8 + 2 + 2 + 16


def test_a_spool_carries_its_codec_and_refuses_one_it_does_not_know(tmp_path):
    t = {1: low_rank_targets(4)}
    codec = fitted(t, rank=4)
    spool.write_codec(tmp_path, codec)
    manifest = {"codec": codec.describe(), "binding": {"codec": codec.digest()}}
    back = spool.read_codec(tmp_path, manifest)
    assert back.digest() == codec.digest() and back.ranks == {1: 4}
    for change, needle in (({"name": "zstd"}, "codec 'zstd'"), ({"version": 9}, "version 9"),
                           ({"target_bits": 4}, "target_bits 4"), ({"ranks": {"1": 5}}, "layer 1 has rank 5")):
        with pytest.raises(ValueError, match=needle):
            spool.read_codec(tmp_path, {**manifest, "codec": {**codec.describe(), **change}})
    other = fitted({1: low_rank_targets(4, seed=3)}, rank=4)
    spool.write_codec(tmp_path, other)  # the basis file swapped under the manifest
    with pytest.raises(ValueError, match="not the codec its packets were written with"):
        spool.read_codec(tmp_path, manifest)
    assert json.loads(json.dumps(codec.describe())) == codec.describe()
    assert codecmod.BASIS_FILE == "codec.safetensors"
