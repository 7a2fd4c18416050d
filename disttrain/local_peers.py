"""Peer copies for the local tier (DESIGN.md section 7a): which rank keeps a copy of whose piece, and how
pieces travel between ranks.

A node is a (host, local folder) pair: ranks that share one node-local folder fail together, so a copy is
only worth keeping on another node. Nodes are numbered by their lowest rank. With `checkpoint.local.replicas`
= k, the piece of the i-th rank of node h is copied to the i-th rank (modulo its size) of each of nodes
h+1 .. h+k (wrapping), so losing any k nodes loses no local state. k is capped at the number of other
nodes: a one-node job keeps no copies.

On the wire a piece is its folder's raw bytes: the manifest's JSON, then every file it lists, in the
manifest's order, as uint8 tensors over a gloo group of the tier's own (point-to-point, tagged; never
pickled). The receiver writes them into its own node's folder with the manifest last and renames the
folder into place; nothing it received is parsed beyond the manifest's JSON before a reader verifies each
file's sha256 against it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from disttrain import ckpt_format as fmt
from disttrain import dist, fs, manifest
from disttrain.rundir import MANIFEST

Key = tuple[str, str]  # (host, node-local folder)


@dataclass(frozen=True)
class Topology:
    """Every rank's node and who keeps copies of whose pieces."""

    keys: tuple[Key, ...]  # per rank
    replicas: int

    def nodes(self) -> list[list[int]]:
        """Ranks per node, nodes ordered by their lowest rank."""
        grouped: dict[Key, list[int]] = {}
        for rank, key in enumerate(self.keys):
            grouped.setdefault(key, []).append(rank)
        return list(grouped.values())

    def node_of(self, rank: int) -> int:
        return next(i for i, ranks in enumerate(self.nodes()) if rank in ranks)

    def host(self, rank: int) -> str:
        return self.keys[rank][0]

    def copies(self) -> int:
        return max(0, min(self.replicas, len(self.nodes()) - 1))

    def holders(self, owner: int) -> list[int]:
        """The ranks that keep a copy of `owner`'s pieces, one per other node."""
        nodes, home = self.nodes(), self.node_of(owner)
        index = nodes[home].index(owner)
        out = []
        for j in range(1, self.copies() + 1):
            there = nodes[(home + j) % len(nodes)]
            out.append(there[index % len(there)])
        return out

    def owners(self, holder: int) -> list[int]:
        """The ranks whose pieces `holder` keeps copies of."""
        return [owner for owner in range(len(self.keys)) if holder in self.holders(owner)]

    def server(self, node: int, owner: int) -> int:
        """The rank of `node` that sends a piece it holds to `owner` (spread over the node's ranks)."""
        ranks = self.nodes()[node]
        return ranks[owner % len(ranks)]

    def lowest_on_node(self, rank: int) -> bool:
        return self.nodes()[self.node_of(rank)][0] == rank


@dataclass
class Packed:
    """A piece's folder as bytes: its manifest and its files, concatenated in the manifest's order."""

    manifest: bytes
    payload: bytes


def pack(path: str) -> Packed:
    """Read a published piece's bytes (not verified here: the receiver verifies before it parses)."""
    raw = fs.read_bytes(fs.join(path, MANIFEST))
    names = sorted(json.loads(raw)["files"])
    return Packed(raw, b"".join(fs.read_bytes(fs.join(path, name)) for name in names))


def unpack(packed: Packed, work: str, final: str) -> int:
    """Write a received piece under `work`, manifest last, and rename it to `final`; returns its step.
    Raises ValueError when the bytes do not add up to what the manifest lists."""
    m = json.loads(packed.manifest)
    problem = manifest.problem(m)
    if problem is not None:
        raise ValueError(f"the manifest received is not one: {problem}")
    names = sorted(m["files"])
    sizes = [int(m["files"][name]["bytes"]) for name in names]
    if sum(sizes) != len(packed.payload):
        raise ValueError(f"received {len(packed.payload)} bytes; the manifest lists {sum(sizes)}")
    fs.makedirs(work)  # names checked by manifest.problem: plain names, no '/', no leading '.'
    view, at = memoryview(packed.payload), 0
    for name, size in zip(names, sizes, strict=True):
        with open(os.path.join(work, name), "wb") as fh:
            fh.write(view[at : at + size])
        at += size
    fmt.publish(work, final, m)
    return int(m["step"])


def transfer(outgoing: dict[int, Packed | None], incoming: list[int], group: Any) -> dict[int, Packed | None]:
    """Send each piece in `outgoing` to its rank (None: "I have none") and receive one from each rank in
    `incoming`. Every rank named on either side must call this at the same point with matching lists."""
    sent = {dst: None if p is None else [p.manifest, p.payload] for dst, p in outgoing.items()}
    got = dist.trade_bytes(sent, incoming, 2, group)
    return {src: None if parts is None else Packed(*parts) for src, parts in got.items()}
