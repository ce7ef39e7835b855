"""The spool files: deterministic shards, reads by sample id, and every way a spool can be wrong is named.

In-process (no teacher): shards are written from synthetic rows that are a pure function of the sample id.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from semalign_ds.transport import schema, spool
from semalign_ds.transport.packet import SupervisionPacket

BINDING = {"schema": str(schema.SCHEMA_VERSION), "data": "d1", "teacher": "t1", "map": "m1"}
N, ROWS, MICRO, T, D, K = 11, 4, 3, 5, 6, 3


def rows(first: int, count: int) -> SupervisionPacket:
    """Samples first..first+count-1; every tensor row depends only on its sample id."""
    parts = []
    for sid in range(first, first + count):
        g = torch.Generator().manual_seed(sid)
        parts.append(dict(ids=torch.randint(0, 99, (1, T), generator=g), mask=torch.rand(1, T, generator=g) > 0.1,
                          t1=torch.randn(1, T, D, generator=g).bfloat16(),
                          t2=torch.randn(1, T, D, generator=g).bfloat16(),
                          v=torch.randn(1, T, K, generator=g), i=torch.randint(0, 99, (1, T, K), generator=g),
                          tail=torch.rand(1, T, generator=g)))
    cat = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return SupervisionPacket(cat["ids"], cat["mask"], torch.arange(first, first + count), {1: cat["t1"], 2: cat["t2"]},
                             cat["v"], cat["i"], cat["tail"])


def write(directory, binding=BINDING, only=None) -> spool.SpoolPlan:
    """Write the pending shards (or only those in `only`) micro-batch by micro-batch, as the teacher does."""
    plan = spool.open_plan(directory, binding, N, ROWS, [1, 2])
    for j in plan.pending():
        if only is not None and j not in only:
            continue
        first, n = plan.rows_of(j)
        shard = None
        for a in range(0, n, MICRO):
            flat = schema.packet_to_flat(rows(first + a, min(MICRO, n - a)))
            if shard is None:
                layout = [[name, dt, [n] + shape[1:]] for name, dt, shape in schema.layout_of(flat)]
                shard = spool.ShardFile(plan.directory, j, layout, plan.metadata(j))
            shard.write(a, flat)
        shard.commit(first)
    return plan


@pytest.fixture
def written(tmp_path):
    plan = write(tmp_path / "spool")
    spool.write_manifest(plan, {"teacher_passes_per_sample": 1.0})
    return plan.directory


def shas(directory) -> dict:
    manifest = json.loads((directory / spool.MANIFEST).read_text())
    return {r["file"]: r["sha256"] for r in manifest["shards"]}


def test_shards_are_standard_safetensors_and_deterministic(tmp_path, written):
    manifest = json.loads((written / spool.MANIFEST).read_text())
    assert manifest["complete"] and manifest["num_samples"] == N and len(manifest["shards"]) == 3
    assert [r["rows"] for r in manifest["shards"]] == [4, 4, 3]
    assert manifest["bytes"] == sum((written / r["file"]).stat().st_size for r in manifest["shards"])
    st = load_file(written / "shard-00002.safetensors")  # readable by any safetensors reader
    want = schema.packet_to_flat(rows(8, 3))
    assert st.keys() == want.keys() and all(torch.equal(st[k], want[k]) for k in want)
    again = write(tmp_path / "again")
    spool.write_manifest(again, {"teacher_passes_per_sample": 1.0})
    assert shas(again.directory) == shas(written)  # same rows -> same bytes (header included)


def test_reader_returns_any_rows_in_any_order_and_only_the_asked_targets(written):
    reader = spool.SpoolReader(written, {"schema": str(schema.SCHEMA_VERSION), "data": "d1"})
    sample_ids = torch.tensor([9, 0, 5, 10, 4])
    p = reader.packet(sample_ids, [2])
    want = {int(s): rows(int(s), 1) for s in sample_ids}
    assert list(p.targets) == [2] and p.targets[2].dtype == torch.bfloat16
    for b, s in enumerate(sample_ids.tolist()):
        assert torch.equal(p.ids_BT[b], want[s].ids_BT[0]) and torch.equal(p.targets[2][b], want[s].targets[2][0])
        assert torch.equal(p.top_idx_BTK[b], want[s].top_idx_BTK[0]) and p.top_idx_BTK.dtype == torch.int64
    assert reader.bytes_read == schema.flat_nbytes(schema.packet_to_flat(p))  # target.1 was not read
    with pytest.raises(ValueError, match="holds targets for student layers"):
        reader.packet(sample_ids, [3])


def test_a_partial_spool_is_not_readable_and_a_resumed_writer_completes_it_identically(tmp_path, written):
    partial = tmp_path / "partial"
    plan = write(partial, only={0})
    first, n = plan.rows_of(1)  # a writer killed mid-shard 1: half its rows in the temporary file
    flat = schema.packet_to_flat(rows(first, MICRO))
    layout = [[name, dt, [n] + shape[1:]] for name, dt, shape in schema.layout_of(flat)]
    spool.ShardFile(partial, 1, layout, plan.metadata(1)).write(0, flat)
    assert (partial / "shard-00001.safetensors.tmp").is_file()
    with pytest.raises(ValueError, match="no manifest.json"):
        spool.SpoolReader(partial, BINDING)
    resumed = spool.open_plan(partial, BINDING, N, ROWS, [1, 2])
    assert resumed.pending() == [1, 2]  # the committed shard is kept, the partial one rewritten
    write(partial)
    spool.write_manifest(resumed, {"teacher_passes_per_sample": 1.0})
    assert shas(partial) == shas(written)
    assert not list(partial.glob("*.tmp"))


def test_a_shard_record_from_another_configuration_is_refused(tmp_path):
    write(tmp_path / "s", only={0})
    with pytest.raises(ValueError, match="holds shards of another configuration"):
        write(tmp_path / "s", binding={**BINDING, "data": "other"})


@pytest.mark.parametrize("damage, needle", [
    ("flip", r"is corrupted \(xxh3_128"),
    ("truncate", "is truncated or resized"),
    ("delete", "is missing"),
])
def test_a_damaged_shard_is_named(written, damage, needle):
    shard = written / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    if damage == "flip":
        data[-7] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif damage == "truncate":
        shard.write_bytes(bytes(data[:-100]))
    else:
        shard.unlink()
    reader = spool.SpoolReader(written, BINDING)
    reader.packet(torch.tensor([0, 3]), [1])  # shard 0 is fine
    with pytest.raises(ValueError, match=needle) as err:
        reader.packet(torch.tensor([0, 5]), [1])
    assert "shard-00001.safetensors" in str(err.value) and "semalign teach" in str(err.value)


def test_a_copied_spool_is_checked_against_its_sha256_and_old_spools_still_read(tmp_path, written):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(written, copy)
    assert spool.verify_sha256(copy) == []
    shard = copy / "shard-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0x01
    shard.write_bytes(bytes(data))
    assert spool.verify_sha256(copy) == ["shard-00002.safetensors"]
    old = tmp_path / "old"  # a spool written before xxh3: its records hold sha256 block digests
    shutil.copytree(written, old)
    manifest = json.loads((old / spool.MANIFEST).read_text())
    for record in manifest["shards"]:
        blob = (old / record["file"]).read_bytes()
        record.pop("block_hash")
        record["blocks"] = [__import__("hashlib").sha256(blob[i:i + spool.BLOCK]).hexdigest()
                            for i in range(0, len(blob), spool.BLOCK)]
    (old / spool.MANIFEST).write_text(json.dumps(manifest))
    ids = torch.tensor([0, 5, 9])
    assert torch.equal(spool.SpoolReader(old, BINDING).packet(ids, [1]).targets[1],
                       spool.SpoolReader(written, BINDING).packet(ids, [1]).targets[1])
    assert spool.verify_sha256(old) == []  # the old spool's blocks, by their sha256s
    shard = old / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x80
    shard.write_bytes(bytes(data))
    (old / "shard-00000.safetensors").write_bytes((old / "shard-00000.safetensors").read_bytes()[:-1])  # truncated
    assert spool.verify_sha256(old) == ["shard-00000.safetensors", "shard-00001.safetensors"]


def test_spool_verify_command(tmp_path, written):
    from semalign_ds import cli

    assert cli.main(["spool-verify", str(written)]) == 0
    shard = written / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[7] ^= 0x01
    shard.write_bytes(bytes(data))
    assert cli.main(["spool-verify", str(written)]) == 1
    assert cli.main(["spool-verify", str(tmp_path / "nothing")]) == cli.EXIT_USER


def test_a_shard_swapped_in_from_another_spool_is_refused(tmp_path, written):
    other = write(tmp_path / "other", binding={**BINDING, "map": "m2"})
    spool.write_manifest(other, {})
    (written / "shard-00001.safetensors").write_bytes((other.directory / "shard-00001.safetensors").read_bytes())
    manifest = json.loads((written / spool.MANIFEST).read_text())
    manifest["shards"][1] = json.loads((other.directory / "shard-00001.json").read_text())  # checksums agree now
    (written / spool.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="belongs to another spool"):
        spool.SpoolReader(written, BINDING).packet(torch.tensor([5]), [1])


def test_a_manifest_of_another_configuration_is_refused(written):
    with pytest.raises(ValueError, match=r"different configuration: data \(data\.\*"):
        spool.SpoolReader(written, {**BINDING, "data": "d2"})
    with pytest.raises(ValueError, match="different configuration"):
        spool.open_plan(written, {**BINDING, "teacher": "t2"}, N, ROWS, [1, 2])
