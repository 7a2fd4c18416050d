"""The local checkpoint tier (DESIGN.md section 7a): every rank keeps its own copy of its state in
node-local storage (`checkpoint.local.dir`, by default tmpfs under /dev/shm), so that a restart inside
the allocation (`torchrun --max-restarts`) resumes from a step at most `checkpoint.local.every_steps`
old instead of the last durable checkpoint.

    LOCAL_DIR/rank_00001/step_00000012/   rank 1's piece of step 12; manifest.json written last
    LOCAL_DIR/peer_00003/step_00000012/   a copy of rank 3's piece, kept here for rank 3 (another node)

A piece is what that rank needs to continue exactly, and nothing another rank holds:
- ddp: the replicated weights, optimizer and scaler (identical on every rank: DDP keeps the replicas in
  step), this rank's copy of the shared state (schedule, progress, data cursor, hooks) and its own rank
  state (RNG streams, a stream's position, the log window) -- the durable format, with one rank in
  ranks.pt;
- fsdp: this rank's shard (rows of every sharded tensor, the same layout as a durable shard file), the
  unsharded rest and shared state, and its rank state.

On resume the shared state comes from rank 0's piece (one broadcast), as a durable resume takes it from
rank 0's files; each rank's weights, optimizer state and RNG come from its own. The same discipline as
durable checkpoints: each file's size and sha256 in a manifest written last, a temporary directory
renamed into place, the newest `keep_last` kept, every file hashed before it is parsed and `.pt` files
unpickled only after, with `weights_only=True`.

Writes happen in a background thread of each rank, from a host copy taken at the step (the step blocks
only for that copy); no collective on the training group is involved, so a rank that dies mid-write
leaves only a `.tmp-` directory, never a piece that looks whole. A write that fails (tmpfs full) warns
once and training goes on: the durable tier still covers.

Peer copies (`checkpoint.local.replicas`, local_peers): when the job spans more than one node, the same
thread then sends the piece's bytes to the rank(s) that keep copies of it on other nodes, over a gloo
group of its own, and writes the copies it receives under `peer_RANK`. Every rank trades at every local
step, with a piece or with "none" (its own write failed), so no trade waits for a message never sent.

Resume: one rank per node lists every piece its folder holds (own or copies; their manifests judged for
world size, rank and strategy), and one all-gather gives every rank the same map. The step is the newest,
newer than the newest durable checkpoint, of which every rank's piece has a source; each rank reads its
own node's copy when there is one, else the rank of a node holding one sends it over and it is kept as
this rank's own. Every file is verified by the reader before use; a piece that fails is ruled out and the
plan made again (the next source, an older step, or the durable tier), each failure a note that
`tier_fallback` records. The tier served is `local` when every rank read its node's storage, `peer` when
some piece came from another node.

Only a restarted attempt (a torchrun restart, a SLURM requeue: restart count > 0) reads the tier; a
first attempt clears this rank's folder and the copies it keeps, so a run dir deleted and started again
never picks up an old run's state. A resume at another world size or strategy skips the tier (its pieces
are per rank) and uses the durable one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import secrets
import sys
import tempfile
import threading
from dataclasses import dataclass
from typing import Any

from disttrain import ckpt_format as fmt
from disttrain import ckpt_sharded, dist, fs, local_peers
from disttrain.ckpt_read import Loaded, read_dir
from disttrain.cluster import host_name
from disttrain.config import LocalTierConfig
from disttrain.errors import CheckpointError
from disttrain.local_peers import Topology
from disttrain.manifest import build as build_manifest
from disttrain.manifest import read as read_manifest
from disttrain.rundir import is_committed, step_name, step_of

log = logging.getLogger("disttrain.checkpoint")
State = dict[str, Any]
Shards = tuple[dict[str, Any], State]
TIER = "local"  # served from the node's own storage
PEER_TIER = "peer"  # some rank's piece came from a copy on another node
OWN, PEER = "rank_", "peer_"  # folder prefixes: a rank's own pieces; copies kept for a rank elsewhere
_FOLDER = re.compile(r"(rank_|peer_)(\d{5,})")


def default_dir(run_dir: str) -> str:
    """/dev/shm/disttrain/<run id>/<host>: the run id is the run dir's name and a hash of its full path
    (or URL), so two runs never share a folder and the same run finds its own again after a restart."""
    root = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    where = run_dir.rstrip("/")
    full = where if "://" in where else os.path.abspath(where)
    name = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(full)) or "run"
    digest = hashlib.sha256(full.encode()).hexdigest()[:12]
    return os.path.join(root, "disttrain", f"{name}-{digest}", host_name())


@dataclass(frozen=True)
class Source:
    """Where a copy of one rank's piece of one step lies: a node and a folder in that node's storage."""

    node: int
    folder: str  # rank_RRRRR (that rank's own, or fetched for it) or peer_RRRRR (kept for it)


Held = dict[tuple[int, int], dict[Source, "str | None"]]  # (owner, step) -> source -> why unusable
Plan = tuple[int, dict[int, Source]]  # a step, and where each rank's piece of it comes from


class LocalTier:
    """This rank's local pieces, and copies of other ranks' pieces (local_peers). Construction and
    `restore` must be called on all ranks; `save` on all ranks at the same steps."""

    def __init__(
        self, cfg: LocalTierConfig, run_dir: str, meta: State, strategy: str, *, first_attempt: bool
    ):
        self.cfg, self.meta, self.strategy = cfg, meta, strategy
        self.node_dir = cfg.dir or default_dir(run_dir)
        self.dir = self._folder(OWN, dist.rank())
        self.last_step: int | None = None  # the step this rank last wrote (or resumed from)
        self._thread: threading.Thread | None = None
        # The last piece's host copy, kept for the next save to copy into (no allocation in the step)
        self._previous: tuple[State, State, Shards | None] | None = None
        self._warned = False
        self._tidied = False
        self.first_attempt = first_attempt
        self.topology = Topology(((host_name(), self.node_dir),), 0)
        self._group: Any = None
        if not self.on:
            return
        keys = dist.all_gather_objects((host_name(), os.path.abspath(self.node_dir)))
        self.topology = Topology(tuple(tuple(k) for k in keys), cfg.replicas)
        if len(self.topology.nodes()) > 1:  # pieces travel between nodes: copies, and fetches on resume
            self._group = dist.new_gloo_group()
        if first_attempt:  # another run's pieces, or a deleted run dir's: never ours
            for owner in [dist.rank(), *self.topology.owners(dist.rank())]:
                fs.remove(self._folder(PEER if owner != dist.rank() else OWN, owner), recursive=True)

    @property
    def on(self) -> bool:
        return self.cfg.every_steps > 0

    def due(self, step: int) -> bool:
        return self.on and step % self.cfg.every_steps == 0 and step != self.last_step

    def _folder(self, kind: str, owner: int) -> str:
        return os.path.join(self.node_dir, f"{kind}{owner:05d}")

    # -------------------------------------------------------------------------------------- write

    def save(self, step: int, shared: State, mine: State, shards: Shards | None) -> None:
        """Copy this rank's state to host memory now; write it (and trade copies with this rank's peers)
        in the background. No collective on the training group."""
        self._join()  # one write in flight per rank: the previous piece's host copy is free again
        old = self._previous or ({}, {}, None)
        self._previous = None
        try:
            host = fmt.host_copy(shared, "app_state", into=old[0])
            own = fmt.host_copy(mine, "rank_state", into=old[1])
            rows = None
            if shards is not None:
                rows = (fmt.host_copy(shards[0], "shards", into=old[2] and old[2][0]), shards[1])
            piece: tuple[State, State, Shards | None] | None = (host, own, rows)
            self._previous = piece
        except CheckpointError as err:
            self._warn(step, err)
            piece = None  # still trades: the peers wait for this rank's message ("none")
        self.last_step = step
        self._thread = threading.Thread(
            target=self._write, args=(step, piece), name="disttrain-local-save", daemon=True
        )  # a daemon: a kill or an exit mid-write leaves a .tmp- dir, which is no piece
        self._thread.start()

    def _write(self, step: int, piece: tuple[State, State, Shards | None] | None) -> None:
        published = piece is not None and self._publish(step, *piece)
        if not self._tidied:
            self._tidied = True
            self._tidy()
        if self._group is not None and self.topology.copies():
            self._trade(step, self._path(step) if published else None)

    def _publish(self, step: int, host: State, mine: State, rows: Shards | None) -> bool:
        work = os.path.join(self.dir, f"{step_name(step)}.tmp-{secrets.token_hex(4)}")
        try:
            self._clean_stale(self.dir)
            meta = self.meta
            if rows is None:
                files = fmt.write_files(work, host, [mine])
            else:  # one shard file: this rank's rows, under the same layout record a durable save keeps
                fs.makedirs(work)
                name, digest = ckpt_sharded.write_shard(work, 0, rows[0])
                files = {**fmt.write_files(work, host, [mine], model=False), name: digest}
                layout = ckpt_sharded.merge_layouts([rows[1]])
                meta = {**meta, "format": ckpt_sharded.FORMAT, "strategy": "fsdp", "layout": layout}
            meta = {**meta, "tier": TIER, "rank": dist.rank()}
            fmt.publish(work, self._path(step), build_manifest(step, dist.world_size(), files, meta))
            self._retain(self.dir)
            return True
        except Exception as err:  # tmpfs full, a folder not writable: the durable tier still covers
            fs.remove(work, recursive=True)
            self._warn(step, err)
            return False

    def _trade(self, step: int, path: str | None) -> None:
        """Send this rank's piece of `step` to the ranks that keep its copies; keep the copies of the
        ranks this one holds for. Every rank trades at every local step, with or without a piece."""
        me = dist.rank()
        try:
            packed = local_peers.pack(path) if path is not None else None
        except OSError as err:
            self._warn(step, err)
            packed = None
        try:
            outgoing: dict[int, local_peers.Packed | None] = dict.fromkeys(self.topology.holders(me), packed)
            got = local_peers.transfer(outgoing, self.topology.owners(me), self._group)
        except Exception as err:  # a peer gone: the run fails on its next collective and restarts
            self._warn(step, err)
            return
        for owner, copy in got.items():
            if copy is None:
                continue
            folder = self._folder(PEER, owner)
            work = os.path.join(folder, f"{step_name(step)}.tmp-{secrets.token_hex(4)}")
            try:
                self._clean_stale(folder)
                local_peers.unpack(copy, work, os.path.join(folder, step_name(step)))
                self._retain(folder)
            except (OSError, ValueError) as err:
                fs.remove(work, recursive=True)
                self._warn(step, err, f"rank {owner}'s copy")

    def _warn(self, step: int, err: Exception, what: str = "") -> None:
        text = f"local checkpoint step {step}{' (' + what + ')' if what else ''} in {self.node_dir} failed: "
        text += fs.first_line(err)
        log.warning("%s", text)
        if not self._warned:  # one line per process, not one a save: training goes on without it
            self._warned = True
            print(
                f"disttrain: rank {dist.rank()}: warning: {text}; training goes on, the durable tier "
                "(checkpoint.every_steps) still covers a restart",
                file=sys.stderr,
                flush=True,
            )

    def wait(self) -> None:
        self._join()

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def steps(self, folder: str | None = None) -> list[int]:
        """Committed pieces in a folder (this rank's own by default), newest first (a manifest makes a
        piece, as in the run dir)."""
        where = folder or self.dir
        found = [s for s in map(step_of, fs.listdir(where)) if s is not None]
        return sorted((s for s in found if is_committed(os.path.join(where, step_name(s)))), reverse=True)

    def _path(self, step: int) -> str:
        return os.path.join(self.dir, step_name(step))

    @staticmethod
    def _clean_stale(folder: str) -> None:
        """What a killed write left: `.tmp-` dirs (only one thread writes to a folder)."""
        for name in fs.listdir(folder):
            if step_of(name) is None and name.startswith("step_"):
                fs.remove(os.path.join(folder, name), recursive=True)

    def _retain(self, folder: str) -> None:
        for step in self.steps(folder)[self.cfg.keep_last :]:
            path = os.path.join(folder, step_name(step))
            fs.remove(os.path.join(path, "manifest.json"))  # first: never half a piece
            fs.remove(path, recursive=True)

    def _mine(self) -> list[str]:
        """The folders this rank writes: its own and the copies it keeps."""
        me = dist.rank()
        return [self.dir, *(self._folder(PEER, owner) for owner in self.topology.owners(me))]

    def _tidy(self) -> None:
        """On a node's lowest rank, at its first write: remove the folders no rank writes any more (copies kept for ranks that moved after a restart, or of a larger world)."""
        me = dist.rank()
        if not self.topology.lowest_on_node(me):
            return
        # Every rank writing into this folder, whatever its host (a `checkpoint.local.dir` shared by nodes).
        here = [r for r, key in enumerate(self.topology.keys) if key[1] == self.topology.keys[me][1]]
        keep = {f"{OWN}{r:05d}" for r in here}
        keep |= {f"{PEER}{o:05d}" for r in here for o in self.topology.owners(r)}
        for name in fs.listdir(self.node_dir):
            if _FOLDER.fullmatch(name) and name not in keep:
                fs.remove(os.path.join(self.node_dir, name), recursive=True)

    def discard(self) -> None:
        """Remove this rank's pieces and the copies it keeps (the run finished and its final checkpoint
        is durable): tmpfs is memory. The node's folder goes too once its last rank left it."""
        self._join()
        self._previous = None
        for folder in self._mine():
            fs.remove(folder, recursive=True)
        if self.cfg.dir:
            return  # the user's folder stays
        for folder in (self.node_dir, os.path.dirname(self.node_dir)):
            try:
                os.rmdir(folder)  # only when empty: another rank of this node may still be here
            except OSError:
                return

    # --------------------------------------------------------------------------------------- read

    def restore(self, durable_step: int | None) -> tuple[Loaded | None, list[State]]:
        """The pieces of the newest step every rank can restore -- from its own node's storage, else a
        copy on another node sent over -- when that step is newer than `durable_step` (the newest
        committed durable checkpoint); else None. The notes say why a faster source did not serve (a
        piece missing or failing verification), in the order it was tried. Must be called on all ranks
        (the tier being on is config: every rank sees the same)."""
        if not self.on:
            return None, []
        # Not gated on the restart count: a replacement node's torchrun counts no restart while the
        # others do, and every rank must reach the all-gather. One rank per node lists the node's pieces.
        listed = [] if self.first_attempt or not self.topology.lowest_on_node(dist.rank()) else self._list()
        reports = dist.all_gather_objects((listed, self.first_attempt))
        if all(first for _, first in reports):
            return None, []  # a fresh start everywhere: nothing was lost
        held: Held = {}
        for rank, (entries, _) in enumerate(reports):
            for owner, step, folder, problem in entries:
                held.setdefault((owner, step), {})[Source(self.topology.node_of(rank), folder)] = problem
        notes: list[State] = []
        for _ in range(1 + sum(len(sources) for sources in held.values())):  # each round rules one out
            plan, why = plan_restore(held, durable_step, dist.world_size(), self.topology)
            if plan is None:
                return None, notes + ([why] if why else [])
            loaded, problem, tier = self._fetch(*plan)
            outcomes = dist.all_gather_objects((problem, tier))
            failed = [(rank, p) for rank, (p, _) in enumerate(outcomes) if p is not None]
            if not failed:
                self.last_step = plan[0]
                assert loaded is not None
                served = PEER_TIER if any(t == PEER_TIER for _, t in outcomes) else TIER
                return dataclasses.replace(loaded, tier=served), notes
            for rank, problem in failed:
                source = plan[1][rank]
                held[(rank, plan[0])][source] = problem
                tier = TIER if source.node == self.topology.node_of(rank) else PEER_TIER
                notes.append(_note(plan[0], f"rank {rank} ({self.topology.host(rank)}): {problem}", tier))
        return None, notes

    def _list(self) -> list[tuple[int, int, str, str | None]]:
        """Every piece in this node's storage: (owner rank, step, folder, why it cannot serve or None),
        judged from its manifest (the files are verified when read)."""
        out = []
        for name in fs.listdir(self.node_dir):
            match = _FOLDER.fullmatch(name)
            if match is None:
                continue
            owner = int(match.group(2))
            for step in self.steps(os.path.join(self.node_dir, name)):
                path = os.path.join(self.node_dir, name, step_name(step))
                out.append((owner, step, name, self._unfit(path, owner)))
        return out

    def _unfit(self, path: str, owner: int) -> str | None:
        try:
            m = read_manifest(path)
        except CheckpointError as err:
            return str(err)
        if int(m["world_size"]) != dist.world_size() or m.get("rank") != owner:
            return f"{path} is rank {m.get('rank')}'s of {m['world_size']}: the world size changed"
        if m.get("strategy", "ddp") != self.strategy:
            return f"{path} was written under trainer.strategy={m.get('strategy', 'ddp')}"
        return None

    def _fetch(self, step: int, sources: dict[int, Source]) -> tuple[Loaded | None, str | None, str]:
        """This rank's piece of `step`: read from this node's storage, or received from the rank of the
        node that holds it (which sends it here in the same call). All ranks."""
        me, topo = dist.rank(), self.topology
        remote = {o: topo.server(s.node, o) for o, s in sources.items() if s.node != topo.node_of(o)}
        outgoing: dict[int, local_peers.Packed | None] = {}
        for owner, server in remote.items():
            if server == me:
                outgoing[owner] = self._packed(
                    os.path.join(self.node_dir, sources[owner].folder, step_name(step))
                )
        incoming = [remote[me]] if me in remote else []
        got = local_peers.transfer(outgoing, incoming, self._group) if remote else {}
        if me not in remote:
            return *self._read(os.path.join(self.node_dir, sources[me].folder, step_name(step))), TIER
        copy = got[remote[me]]
        if copy is None:
            return None, f"the copy on {topo.host(remote[me])} could not be read there", PEER_TIER
        work = os.path.join(self.dir, f"{step_name(step)}.tmp-{secrets.token_hex(4)}")
        try:  # kept as this rank's own piece: the next restart finds it here
            local_peers.unpack(copy, work, self._path(step))
        except (OSError, ValueError) as err:
            fs.remove(work, recursive=True)
            return None, f"the copy from {topo.host(remote[me])}: {fs.first_line(err)}", PEER_TIER
        loaded, problem = self._read(self._path(step))
        return loaded, (f"the copy from {topo.host(remote[me])}: {problem}" if problem else None), PEER_TIER

    @staticmethod
    def _packed(path: str) -> local_peers.Packed | None:
        try:
            return local_peers.pack(path)
        except (OSError, ValueError) as err:
            log.warning("local copy %s not sent: %s", path, err)
            return None

    def _read(self, path: str) -> tuple[Loaded | None, str | None]:
        """The piece at `path`, every file verified before it is parsed or unpickled."""
        if not is_committed(path):
            return None, f"no local copy in {path}"
        try:
            m, app, ranks = read_dir(path)
        except CheckpointError as err:
            return None, str(err)
        if int(m["world_size"]) != dist.world_size() or m.get("rank") != dist.rank() or len(ranks) != 1:
            return None, f"{path} is rank {m.get('rank')}'s of {m['world_size']}: the world size changed"
        if m.get("strategy", "ddp") != self.strategy:
            return None, f"{path} was written under trainer.strategy={m.get('strategy', 'ddp')}"
        return Loaded(path, m, app, ranks[0], tier=TIER), None


def plan_restore(
    held: Held, durable_step: int | None, world: int, topology: Topology
) -> tuple[Plan | None, State | None]:
    """The newest step newer than `durable_step` of which every rank's piece has a usable source, each
    rank's own node preferred; else None and why (nothing when nothing was lost: the durable tier is at
    least as new as any piece, or as new as the newest step every rank has)."""
    steps = sorted({step for _, step in held}, reverse=True)
    if not steps:
        return None, _note(
            None, f"rank 0 ({topology.host(0)}) has no verified local copy: none kept on any node"
        )
    newer = [s for s in steps if durable_step is None or s > durable_step]
    if not newer:
        return None, None
    lacking: tuple[int, int, str] | None = None
    for step in steps:
        sources: dict[int, Source] = {}
        for owner in range(world):
            found = held.get((owner, step), {})
            usable = [s for s, problem in found.items() if problem is None]
            if not usable:
                if lacking is None and step in newer:
                    why = "; ".join(p for p in found.values() if p) or "none kept on any node"
                    lacking = (owner, step, why)
                break
            home = topology.node_of(owner)
            sources[owner] = min(usable, key=lambda s: (s.node != home, not s.folder.startswith(OWN), s.node))
        else:
            if step in newer:
                return (step, sources), None
            return None, None  # every rank has the durable step's state locally too: nothing was lost
    assert lacking is not None
    owner, step, why = lacking
    return None, _note(step, f"rank {owner} ({topology.host(owner)}) has no verified local copy: {why}")


def _note(step: int | None, reason: str, tier: str = TIER) -> State:
    return {"tier": tier, "step": step, "reason": reason}
