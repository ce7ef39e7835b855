"""Stream transport: teacher ranks send packets to student ranks by torch.distributed point-to-point, one world.

What is sent, to whom and in which order is the caller's (topology.stream_jobs: every sample once, job p from
teacher p % T in lockstep rounds); this module moves messages.
Wire: per message a fixed HEADER_BYTES uint8 header (magic, kind, JSON meta: stage, index, binding digest, the
tensor layout), then each tensor as a flat uint8 view of its storage (no copy; bool and bf16 travel on gloo and
NCCL alike). Messages of one link arrive in the order sent.
Window: at most `window` packets per link are outstanding (sent, not yet taken by the student); the teacher then
waits for the oldest, and that wait is its idle time, so a fast teacher cannot fill memory. Student side double
buffering: when packet i of a stage arrives, the receives of packet i+1 (same layout) are posted at once, so its
transfer overlaps the student's work on i while the teacher computes i+2.
Failure: every wait has a deadline (transport.timeout_s). gloo reports a dead peer at once (connection reset); a
stuck one trips the deadline; both raise StreamError naming the peer. A failing teacher sends ERROR (its
message) to every student before it re-raises; each link ends with END (the teacher's counters in its meta).
Legend: B rows, T tokens; tensors as in transport/schema.py.
"""
from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from semalign_ds.transport import schema

HEADER_BYTES = 4096
MAGIC = b"SAPK"
DATA, END, ERROR, HELLO = 1, 2, 3, 4
KIND_NAMES = {DATA: "packet", END: "end of data", ERROR: "error", HELLO: "hello"}


class StreamError(RuntimeError):
    """The other side of the stream failed, hung, or broke the protocol."""


# ---------------------------------------------------------------- header


def encode_header(kind: int, meta: dict, device) -> torch.Tensor:
    body = json.dumps(meta, sort_keys=True).encode()
    if len(body) > HEADER_BYTES - 9:
        raise StreamError(f"a stream header of {len(body)} bytes exceeds {HEADER_BYTES - 9}; send it as tensors")
    raw = bytearray(HEADER_BYTES)
    raw[:9] = MAGIC + bytes([kind]) + len(body).to_bytes(4, "little")
    raw[9:9 + len(body)] = body
    return torch.frombuffer(raw, dtype=torch.uint8).to(device)


def decode_header(buf: torch.Tensor, src: int) -> tuple[int, dict]:
    raw = bytes(buf.cpu().numpy())
    if raw[:4] != MAGIC:
        raise StreamError(f"the stream from rank {src} is out of step (no header where one was due)")
    size = int.from_bytes(raw[5:9], "little")
    return raw[4], json.loads(raw[9:9 + size])


def _broken(peer: str, err: Exception) -> StreamError:
    first = (str(err).splitlines() or [""])[0][:200]
    return StreamError(f"the link to {peer} broke: the process died or failed; see its log ({first})")


def _post(op, tensor: torch.Tensor, rank: int, peer: str):
    """isend/irecv, a dead link reported as StreamError."""
    try:
        return op(tensor, rank)
    except RuntimeError as err:
        raise _broken(peer, err) from None


def _wait(work, deadline: float, peer: str, timeout_s: float) -> None:
    """Wait for one p2p operation until the deadline; StreamError naming the peer on timeout or a broken link."""
    remaining = max(deadline - time.monotonic(), 0.001)
    try:
        work.wait(timeout=timedelta(seconds=remaining))
    except RuntimeError as err:
        text = str(err)
        if "imed out" in text or "imeout" in text:
            raise StreamError(f"no progress with {peer} for {timeout_s:g} s (transport.timeout_s): it stopped or "
                              f"is stuck; see its log (raise transport.timeout_s if it is only slow)") from None
        raise _broken(peer, err) from None


# ---------------------------------------------------------------- teacher side


@dataclass
class _Outgoing:
    works: list
    tensors: list  # kept alive until the sends complete


@dataclass
class PacketSender:
    """Sends packets to student ranks (global ranks) with at most `window` outstanding per link."""

    window: int
    timeout_s: float
    device: torch.device
    bytes_sent: int = 0
    idle_s: float = 0.0
    packets: int = 0
    _pending: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.window < 1:
            raise ValueError(f"transport.window={self.window} must be >= 1 (packets in flight per link)")

    def send(self, dst: int, kind: int, meta: dict, flat: dict[str, torch.Tensor] | None = None) -> None:
        flat = flat or {}
        layout = schema.layout_of(flat)
        self._make_room(dst)
        header = encode_header(kind, {**meta, "layout": layout}, self.device)
        tensors = [header] + [schema.as_bytes(flat[name].to(self.device)) for name, _, _ in layout]
        works = [_post(dist.isend, t, dst, f"student rank {dst}") for t in tensors]
        self._pending.setdefault(dst, deque()).append(_Outgoing(works, tensors))
        self.bytes_sent += sum(t.numel() for t in tensors)
        self.packets += int(kind == DATA)

    def _make_room(self, dst: int) -> None:
        queue = self._pending.get(dst)
        while queue and len(queue) >= self.window:
            t0 = time.perf_counter()
            self._complete(dst, queue.popleft())
            self.idle_s += time.perf_counter() - t0

    def _complete(self, dst: int, out: _Outgoing) -> None:
        deadline = time.monotonic() + self.timeout_s
        for work in out.works:
            _wait(work, deadline, f"student rank {dst}", self.timeout_s)

    def drain(self) -> None:
        """Wait until every student took every packet sent (deadline per packet); counted as idle time."""
        t0 = time.perf_counter()
        for dst, queue in self._pending.items():
            while queue:
                self._complete(dst, queue.popleft())
        self.idle_s += time.perf_counter() - t0

    def fail(self, dsts, message: str) -> None:
        """Best effort: tell every student why this teacher stops (does not wait for them)."""
        header = encode_header(ERROR, {"message": message[-3000:], "layout": []}, self.device)
        for dst in dsts:
            try:
                work = dist.isend(header, dst)
                _wait(work, time.monotonic() + min(self.timeout_s, 5.0), f"student rank {dst}", self.timeout_s)
            except Exception:  # the link may be the thing that broke
                pass


# ---------------------------------------------------------------- student side


@dataclass
class _Posted:
    src: int
    header: torch.Tensor
    layout: list
    buffers: dict
    works: list


@dataclass
class PacketReceiver:
    """Receives messages from teacher ranks; `recv(src, prefetch)` posts the next packet's receives early."""

    timeout_s: float
    device: torch.device
    bytes_received: int = 0
    _posted: _Posted | None = None

    def _post(self, src: int, layout: list) -> _Posted:
        header = torch.empty(HEADER_BYTES, dtype=torch.uint8, device=self.device)
        buffers = schema.alloc_layout(layout, self.device)
        peer = f"teacher rank {src}"
        works = [_post(dist.irecv, header, src, peer)]
        works += [_post(dist.irecv, schema.as_bytes(buffers[n]), src, peer) for n, _, _ in layout]
        return _Posted(src, header, layout, buffers, works)

    def _finish(self, posted: _Posted, deadline: float) -> tuple[int, dict]:
        _wait(posted.works[0], deadline, f"teacher rank {posted.src}", self.timeout_s)
        kind, meta = decode_header(posted.header, posted.src)
        if kind == ERROR:
            raise StreamError(f"teacher rank {posted.src} failed: {meta.get('message', '?')}")
        if posted.layout and meta.get("layout") != posted.layout:
            raise StreamError(f"teacher rank {posted.src} sent a {KIND_NAMES.get(kind, kind)} with layout "
                              f"{meta.get('layout')} where a packet like the previous one was due")
        for work in posted.works[1:]:
            _wait(work, deadline, f"teacher rank {posted.src}", self.timeout_s)
        return kind, meta

    def recv(self, src: int, prefetch: int | None = None) -> tuple[int, dict, dict[str, torch.Tensor]]:
        """(kind, meta, tensors) of the next message from teacher rank `src`; then, if `prefetch` is a rank,
        post the receives of the following packet (same layout) from it."""
        deadline = time.monotonic() + self.timeout_s
        posted, self._posted = self._posted, None
        if posted is not None and posted.src != src:
            raise StreamError(f"internal: receives posted for rank {posted.src}, next message due from {src}")
        if posted is None:
            posted = self._post(src, [])
            kind, meta = self._finish(posted, deadline)
            if meta["layout"]:
                posted = self._post_tensors(posted, meta["layout"])
                self._finish_tensors(posted, deadline)
        else:
            kind, meta = self._finish(posted, deadline)
        self.bytes_received += HEADER_BYTES + schema.flat_nbytes(posted.buffers)
        if prefetch is not None:
            self._posted = self._post(prefetch, meta["layout"])
        return kind, meta, posted.buffers

    def _post_tensors(self, posted: _Posted, layout: list) -> _Posted:
        buffers = schema.alloc_layout(layout, self.device)
        peer = f"teacher rank {posted.src}"
        works = [_post(dist.irecv, schema.as_bytes(buffers[n]), posted.src, peer) for n, _, _ in layout]
        return _Posted(posted.src, posted.header, layout, buffers, [posted.works[0], *works])

    def _finish_tensors(self, posted: _Posted, deadline: float) -> None:
        for work in posted.works[1:]:
            _wait(work, deadline, f"teacher rank {posted.src}", self.timeout_s)

    def expect(self, src: int, kind: int, prefetch: int | None = None) -> tuple[dict, dict]:
        got, meta, flat = self.recv(src, prefetch)
        if got != kind:
            raise StreamError(f"expected {KIND_NAMES[kind]} from teacher rank {src}, got {KIND_NAMES.get(got, got)}")
        return meta, flat
