"""The wandb writer: one wandb run per run dir, continued by every segment, no step logged twice."""

from __future__ import annotations

import json
import os
import struct
import sys
import uuid
import zlib
from collections.abc import Iterator
from typing import Any

from disttrain import fs, rundir
from disttrain.config import Config, to_dict
from disttrain.secrets import argv_redacted, redact_text, secret_values
from disttrain.writers.base import Writer, read_jsonl
from disttrain.writers.staging import Staging

STEP_KEY = "trainer/step"  # the x-axis of every metric in wandb: the global optimizer step


class WandbWriter(Writer):
    """Weights & Biases: one wandb run per run dir. Its id is created once (RUN_DIR/wandb_id.txt) and
    every segment resumes it (resume="allow"), online or with WANDB_MODE=offline (files under
    RUN_DIR/wandb/; for a remote run dir they are staged locally and copied up, see Staging).

    Each (metric, step) reaches wandb once, in order, across segments. Metrics are plotted against
    `trainer/step` (define_metric) rather than wandb's own `_step`, which only grows: so an eval that a
    stop cut short, and that the next segment redoes at a step whose train metrics wandb already has,
    can still be logged. Per metric, the floor is the last step wandb holds durably, read from earlier
    segments' .wandb logs (online runs keep one too). Steps up to it are not logged again: wandb keeps
    the first value, which exact resume reproduces. Steps between the floor and the checkpoint resumed
    from, which wandb lost (it writes its log in 32 KiB blocks, so a kill -9 loses the tail), are
    re-sent from metrics.jsonl. wandb's rewind (`resume_from=`) is not used: it needs the server, so
    it cannot serve offline runs."""

    def __init__(self, cfg: Config, run_dir: str, resumed_step: int, fallback_floor: int | None = None):
        import wandb  # lazy: heavy, and only rank 0 of a run with log.wandb needs it

        self._errors: tuple[type[BaseException], ...] = (wandb.errors.Error, OSError)
        self.stage = Staging(fs.join(run_dir, rundir.WANDB))
        self.run_id = wandb_run_id(run_dir)
        self.floors, self.default_floor = _logged_floors(self.stage.target, self.run_id, fallback_floor)
        try:
            self.run = _init_wandb(wandb, cfg, run_dir, self.run_id, os.path.dirname(self.stage.local))
        except wandb.errors.Error as err:
            raise RuntimeError(
                f"log.wandb: wandb could not start ({err}); run `wandb login` or set WANDB_API_KEY, "
                "or set WANDB_MODE=offline to log without network"
            ) from err
        resent = self._backfill(run_dir, resumed_step)
        mode = getattr(getattr(self.run, "settings", None), "mode", "disabled")
        notes = [f"re-sent {resent} logged steps wandb had lost"] if resent else []
        notes += [f"staged in {self.stage.local}, copied to {self.stage.target}"] if self.stage.remote else []
        print(f"wandb: run {self.run_id} ({mode})" + "".join(f"; {n}" for n in notes), flush=True)

    def _backfill(self, run_dir: str, resumed_step: int) -> int:
        """Re-send what metrics.jsonl holds up to resumed_step above the floors; returns how many steps."""
        steps = set()
        for row in read_jsonl(fs.join(run_dir, rundir.METRICS)):
            step = row.pop("step", None)
            if isinstance(step, int) and step <= resumed_step and self._fresh(step, row):
                self.log(step, {k: v for k, v in row.items() if v is not None})
                steps.add(step)
        return len(steps)

    def _fresh(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in metrics.items() if step > self.floors.get(k, self.default_floor)}

    def log(self, step: int, metrics: dict[str, float]) -> None:
        fresh = self._fresh(step, metrics)
        if self.run is None or not fresh:
            return
        try:
            self.run.log({**fresh, STEP_KEY: step})
        except self._errors as err:  # wandb's service died (e.g. killed with the job): training goes on
            print(f"disttrain: wandb logging stopped: {err}", file=sys.stderr)
            self.run = None
        self.stage.maybe_sync()

    def close(self) -> None:
        import wandb

        try:
            if self.run is not None:
                self.run.finish()
            # finish() returns before wandb's service has written the whole .wandb log; teardown waits
            # for it, so the copy to a remote run dir (and the next segment's floors) sees every row.
            wandb.teardown()
        except self._errors as err:
            print(f"disttrain: wandb did not finish cleanly: {err}", file=sys.stderr)
        finally:
            self.run = None
            self.stage.close()


def _init_wandb(wandb: Any, cfg: Config, run_dir: str, run_id: str, parent: str) -> Any:
    """wandb.init for this run dir, with the redacted config and nothing secret in what wandb records.
    The config is sent once per segment, at init, with the same values: wandb merges it into the one
    run config, and an offline segment synced on its own still carries it."""
    secrets = secret_values(cfg)
    config = json.loads(redact_text(json.dumps(to_dict(cfg), default=str), secrets))
    with argv_redacted(secrets):  # wandb records sys.argv, where key=value overrides live
        run = wandb.init(
            project=cfg.log.wandb_project,
            entity=cfg.log.wandb_entity,
            tags=cfg.log.wandb_tags or None,
            name=cfg.name or fs.basename(run_dir),
            id=run_id,
            resume="allow",
            dir=parent,
            config=config,
            settings=wandb.Settings(console="off", silent=True, save_code=False, disable_job_creation=True),
        )
    run.define_metric(STEP_KEY)
    run.define_metric("*", step_metric=STEP_KEY)
    return run


def wandb_run_id(run_dir: str) -> str:
    """The wandb run id of `run_dir`: created by the first segment (rank 0, atomic write), then reused."""
    path = fs.join(run_dir, rundir.WANDB_ID)
    if fs.exists(path) and (run_id := fs.read_text(path).strip()):
        return run_id
    run_id = uuid.uuid4().hex[:12]
    fs.atomic_write(path, run_id + "\n")
    return run_id


def _logged_floors(wandb_dir: str, run_id: str, fallback: int | None) -> tuple[dict[str, int], int]:
    """Per metric, the highest step earlier segments of this wandb run hold in their .wandb logs; and
    the floor for metrics not seen there (-1, or metrics.jsonl's last step when a log is unreadable)."""
    floors: dict[str, int] = {}
    default = -1
    for path in fs.walk_files(wandb_dir):
        if fs.basename(path) != f"run-{run_id}.wandb":
            continue
        try:
            rows = wandb_history(fs.read_bytes(path))
        except ValueError as err:  # a future wandb changed its log format: fall back to metrics.jsonl
            print(f"disttrain: cannot read {path} ({err}); using metrics.jsonl's last step", file=sys.stderr)
            default = max(default, fallback if fallback is not None else -1)
            continue
        for wandb_step, row in rows:
            step = int(row.get(STEP_KEY, wandb_step))
            for key in row:
                if not key.startswith("_") and key != STEP_KEY:
                    floors[key] = max(floors.get(key, -1), step)
    return floors, default


_WANDB_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)  # ident, magic, version 0
_BLOCK = 32768


def wandb_history(data: bytes) -> list[tuple[int, dict[str, Any]]]:
    """(step, {key: value}) for every history row of a `.wandb` transaction log, in file order.

    The log is wandb's LevelDB-style record file: 32 KiB blocks of chunks, each with a 7-byte header
    (CRC32 of type byte + payload, length, type FULL/FIRST/MIDDLE/LAST), together holding protobuf
    `Record`s. wandb >= 0.19 writes it from Go and ships no Python reader, hence this one. A torn tail
    (kill -9) ends the scan: nothing after it was ever durable."""
    from wandb.proto import wandb_internal_pb2 as pb  # lazy: protobuf

    if not data.startswith(_WANDB_HEADER):
        raise ValueError("not a version-0 .wandb log")
    rows = []
    for payload in _wandb_records(data):
        record = pb.Record()  # type: ignore[attr-defined]  # generated protobuf: no stub names it
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "history":
            items = record.history.item
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}
            rows.append((int(record.history.step.num), row))
    return rows


def _wandb_records(data: bytes) -> Iterator[bytes]:
    pos, parts = len(_WANDB_HEADER), list[bytes]()
    while pos + 7 <= len(data):
        if _BLOCK - pos % _BLOCK < 7:  # too little room left in the block for a header: padding
            pos += _BLOCK - pos % _BLOCK
            continue
        crc, length, kind = struct.unpack_from("<IHB", data, pos)
        payload = data[pos + 7 : pos + 7 + length]
        if kind not in (1, 2, 3, 4) or len(payload) < length or zlib.crc32(bytes([kind]) + payload) != crc:
            return
        pos += 7 + length
        parts = [payload] if kind in (1, 2) else [*parts, payload]
        if kind in (1, 4):
            yield b"".join(parts)
