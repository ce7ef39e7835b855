"""Transports for supervision packets; the student sees one PacketSource whichever feeds it.

packet.py  the packet type and the in-process source (colocated)
schema.py  versioned flat-tensor form of a packet and the hashes binding it to a configuration
stream.py  torch.distributed point-to-point teacher ranks -> student ranks (disaggregated)
spool.py   safetensors shards + JSON manifest on disk (`semalign teach` / `semalign train --from-spool`)
Transport knows no engine: semalign_ds/topology.py connects it to the teacher and student loops.
"""
