"""Transports for supervision packets: in-process (colocated), stream, spool. The student sees one PacketSource."""
