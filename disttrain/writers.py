"""Where metrics and lifecycle events go. Rank roles are decided once, here: rank 0 gets real writers,
every other rank gets NullWriter, so the loop never asks "am I rank 0?".

Writers continue across segments of one run (requeue, restart): the resumed step is passed in, and a
step logged before an interruption and replayed after the resume is never shown twice.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import os
import shutil
import struct
import sys
import tempfile
import time
import uuid
import zlib
from collections.abc import Iterator
from typing import Any

from disttrain import dist, fs
from disttrain.config import REDACTED, SECRET_KEY_PATTERN, Config, ConfigError, to_dict


class Writer:
    """Receives `{"train/loss": ..., ...}` at a global optimizer step."""

    # Highest step an earlier segment wrote to metrics.jsonl (before the resume dropped replayed lines):
    # where the interruption happened. None when unknown or on a fresh run.
    logged_through: int | None = None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


class NullWriter(Writer):
    """What ranks other than 0 write to."""


class MultiWriter(Writer):
    def __init__(self, writers: list[Writer]):
        self.writers = writers
        self.logged_through = max(
            (w.logged_through for w in writers if w.logged_through is not None), default=None
        )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for w in self.writers:
            w.log(step, metrics)

    def close(self) -> None:
        for w in self.writers:
            w.close()


class JsonlWriter(Writer):
    """RUN_DIR/metrics.jsonl: one object a line, `{"step": N, "train/loss": ...}`.

    On resume from step S, lines after S (written after the checkpoint, before the interruption) are
    dropped first: the resumed run recomputes those steps, and a reader must never see a step twice.
    """

    def __init__(self, run_dir: str, resumed_step: int):
        self.path = fs.join(run_dir, "metrics.jsonl")
        if fs.exists(self.path):
            self.logged_through = truncate_after(self.path, resumed_step)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        fs.append_text(self.path, json.dumps({"step": step, **_finite(metrics)}) + "\n")


def truncate_after(path: str, step: int) -> int | None:
    """Keep only the records of `path` whose step is at most `step` (atomically). Returns the highest
    step the file held before (None if it held none)."""
    lines = [line for line in fs.read_text(path).splitlines() if line.strip()]
    kept = [line for line in lines if _step_of(line) <= step]
    if len(kept) != len(lines):
        fs.atomic_write(path, "".join(line + "\n" for line in kept))
    return max((_step_of(line) for line in lines), default=None)


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 0  # a torn last line from a kill -9: keep position, reader skips it


class ConsoleWriter(Writer):
    """Plain metric lines on stdout; through tqdm.write when a progress bar owns the terminal."""

    def __init__(self, max_steps: int, use_tqdm: bool):
        self.max_steps = max_steps
        self.use_tqdm = use_tqdm
        self._first: tuple[int, float] | None = None

    def _eta(self, step: int) -> str:
        now = time.monotonic()
        if self._first is None:
            self._first = (step, now)
            return ""
        done, elapsed = step - self._first[0], now - self._first[1]
        if done <= 0:
            return ""
        left = elapsed / done * (self.max_steps - step)
        return f"eta {int(left // 60)}m{int(left % 60):02d}s"

    def log(self, step: int, metrics: dict[str, float]) -> None:
        parts = [f"step {step}/{self.max_steps}"] + [f"{k} {_fmt(v)}" for k, v in metrics.items()]
        if any(k.startswith("train/") for k in metrics) and (eta := self._eta(step)):
            parts.append(eta)
        line = " | ".join(parts)
        if self.use_tqdm:
            from tqdm import tqdm

            tqdm.write(line)
        else:
            print(line, flush=True)


def _fmt(value: float) -> str:
    if isinstance(value, float) and (abs(value) >= 1e4 or (0 < abs(value) < 1e-3)):
        return f"{value:.3e}"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _finite(metrics: dict[str, float]) -> dict[str, Any]:
    # JSON has no NaN/Infinity; write null so every line stays parseable by strict readers.
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in metrics.items()}


# ------------------------------------------------------------------------------------ staging


class _Staging:
    """A local folder for libraries that only write local files (TensorBoard, wandb). For a local
    run dir it is the target itself; for a remote one (s3://) a temporary folder whose files `sync`
    copies up, every `every_s` seconds from `maybe_sync` and at close. A kill -9 loses what changed
    since the last sync."""

    def __init__(self, target: str, every_s: float = 60.0):
        self.target, self.every_s = target, every_s
        self.remote = not fs.is_local(target)
        self._tmp = tempfile.mkdtemp(prefix="disttrain-stage-") if self.remote else None
        self.local = (
            os.path.join(self._tmp, fs.basename(target)) if self._tmp else target.removeprefix("file://")
        )
        os.makedirs(self.local, exist_ok=True)
        self._sent: dict[str, tuple[float, int]] = {}
        self._last = time.monotonic()

    def maybe_sync(self) -> None:
        if self.remote and time.monotonic() - self._last > self.every_s:
            self.sync()

    def sync(self) -> None:
        """Copy new or changed files up whole (object stores cannot append)."""
        if not self.remote:
            return
        self._last = time.monotonic()
        for root, _, names in os.walk(self.local):
            for name in names:
                path = os.path.join(root, name)
                if os.path.islink(path):
                    continue  # wandb's latest-run / debug.log shortcuts
                stat = os.stat(path)
                if self._sent.get(path) == (stat.st_mtime, stat.st_size):
                    continue
                rel = os.path.relpath(path, self.local).replace(os.sep, "/")
                with open(path, "rb") as fh:
                    fs.write_bytes(fs.join(self.target, rel), fh.read())
                self._sent[path] = (stat.st_mtime, stat.st_size)

    def close(self) -> None:
        self.sync()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------ tensorboard


class TensorBoardWriter(Writer):
    """RUN_DIR/tb/: one event file per segment. `purge_step=resumed_step + 1` writes a session-start
    marker that makes TensorBoard discard what earlier files hold from that step on: the steps an
    interrupted segment logged after its last checkpoint, which this segment logs again."""

    def __init__(self, run_dir: str, resumed_step: int):
        from torch.utils.tensorboard import SummaryWriter  # lazy: pulls tensorboard and protobuf

        self.stage = _Staging(fs.join(run_dir, "tb"))
        self.tb = SummaryWriter(self.stage.local, purge_step=resumed_step + 1)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                self.tb.add_scalar(key, value, step)
        self.tb.flush()  # like metrics.jsonl: a kill -9 loses at most the lines of this step
        self.stage.maybe_sync()

    def close(self) -> None:
        self.tb.close()
        self.stage.close()


# ------------------------------------------------------------------------------------ wandb


STEP_KEY = "trainer/step"  # the x-axis of every metric in wandb: the global optimizer step


class WandbWriter(Writer):
    """Weights & Biases: one wandb run per run dir. Its id is created once (RUN_DIR/wandb_id.txt) and
    every segment resumes it (resume="allow"), online or with WANDB_MODE=offline (files under
    RUN_DIR/wandb/; for a remote run dir they are staged locally and copied up, see _Staging).

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
        self.stage = _Staging(fs.join(run_dir, "wandb"))
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
        for row in read_jsonl(fs.join(run_dir, "metrics.jsonl")):
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
    with _argv_redacted(secrets):  # wandb records sys.argv, where key=value overrides live
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
    path = fs.join(run_dir, "wandb_id.txt")
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
        record = pb.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "history":
            items = record.history.item
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}
            rows.append((int(record.history.step.num), row))
    return rows


def _wandb_records(data: bytes) -> Iterator[bytes]:
    pos, parts = len(_WANDB_HEADER), []
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


# ------------------------------------------------------------------------------------ secrets


def secret_values(cfg: Config | None = None) -> list[str]:
    """Values that must never be written: those of credential-looking environment variables
    (WANDB_API_KEY, AWS_SECRET_ACCESS_KEY, HF_TOKEN, ...) and config values under secret-looking keys
    (SECRET_KEY_PATTERN). Values under 8 characters are left alone: too common to mask."""
    found = [value for name, value in os.environ.items() if SECRET_KEY_PATTERN.search(name)]
    if cfg is not None:
        found += _secret_config_values(to_dict(cfg, redact=False))
    return sorted({v for v in found if len(v) >= 8}, key=len, reverse=True)


def _secret_config_values(node: Any, secret: bool = False) -> list[str]:
    if isinstance(node, dict):
        return [v for k, child in node.items() for v in _secret_config_values(child, secret or _is_secret(k))]
    if isinstance(node, list):
        return [v for child in node for v in _secret_config_values(child, secret)]
    return [str(node)] if secret and node not in (None, "") else []


def _is_secret(key: Any) -> bool:
    return bool(SECRET_KEY_PATTERN.search(str(key)))


def redact_text(text: str, secrets: list[str]) -> str:
    for value in secrets:
        text = text.replace(value, REDACTED)
    return text


def redact_argv(argv: list[str], secrets: list[str]) -> list[str]:
    """`pipeline.args.api_token=X`, `--token=X` and `--token X` with X masked, plus any known secret."""
    out: list[str] = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if eq and value and _is_secret(key):
            arg = f"{key}={REDACTED}"
        elif out and out[-1].startswith("-") and "=" not in out[-1] and _is_secret(out[-1]):
            arg = REDACTED
        out.append(redact_text(arg, secrets))
    return out


@contextlib.contextmanager
def _argv_redacted(secrets: list[str]) -> Iterator[None]:
    saved = sys.argv
    sys.argv = redact_argv(list(saved), secrets)
    try:
        yield
    finally:
        sys.argv = saved


# ------------------------------------------------------------------------------------ curves


class CurvesWriter(Writer):
    """Draws RUN_DIR/curves.png whenever a segment ends (log.plot), so a stopped run has current curves."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir

    def close(self) -> None:
        try:
            write_curves(self.run_dir)
        except (ImportError, OSError, ValueError) as err:  # a missing plot must not fail the run
            print(f"disttrain: curves.png not drawn: {err}", file=sys.stderr)


def write_curves(run_dir: str, out: str | None = None, metrics: list[str] | None = None) -> str:
    """Draw metrics.jsonl, one panel per metric, with a dashed line at every resume and a shaded band
    over the steps redone after an interruption. Writes a PNG (default RUN_DIR/curves.png); returns
    its path. Raises ValueError when there is nothing (or no such metric) to draw."""
    rows = read_jsonl(fs.join(run_dir, "metrics.jsonl"))
    if not rows:
        raise ValueError(f"{fs.join(run_dir, 'metrics.jsonl')} holds no metrics yet")
    present = list(dict.fromkeys(k for row in rows for k, v in row.items() if k != "step" and v is not None))
    missing = [k for k in metrics or [] if k not in present]
    if missing:
        raise ValueError(f"no metric {', '.join(missing)} in metrics.jsonl; it has {', '.join(present)}")
    events = read_jsonl(fs.join(run_dir, "events.jsonl"))
    png = _draw(metrics or present, rows, resume_spans(events), fs.basename(run_dir))
    out = out or fs.join(run_dir, "curves.png")
    fs.atomic_write(out, png)
    return out


def resume_spans(events: list[dict[str, Any]]) -> list[tuple[int, int, str]]:
    """(resumed from, interrupted at, cause) for every resume. `interrupted at` is the resume event's
    `interrupted_at` when the trainer recorded it, else the highest step the segment before reported."""
    spans: list[tuple[int, int, str]] = []
    previous = current = -1  # highest step of the segment before / of the one being read
    for event in events:
        step = int(event.get("step") or 0)
        if event.get("event") == "start":
            previous, current = current, step
        elif event.get("event") == "resume":
            end = event.get("interrupted_at")
            spans.append(
                (step, max(step, previous if end is None else int(end)), str(event.get("cause", "")))
            )
        else:
            current = max(current, step)
    return spans


def _draw(
    keys: list[str], rows: list[dict[str, Any]], spans: list[tuple[int, int, str]], title: str
) -> bytes:
    from matplotlib.figure import Figure  # lazy; a bare Figure renders with Agg, no pyplot or display

    cols = 1 if len(keys) == 1 else 2
    fig = Figure(figsize=(6 * cols, 2.8 * -(-len(keys) // cols)), layout="constrained")
    axes = fig.subplots(-(-len(keys) // cols), cols, squeeze=False).ravel()
    last_step = max(int(r.get("step", 0)) for r in rows)
    for ax, key in zip(axes, keys):
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        ax.plot(*zip(*points), marker="." if len(points) < 40 else None, lw=1.2)
        for start, end, cause in spans:
            ax.axvline(start, color="tab:red", ls="--", lw=1, label=f"resumed from {start} ({cause})")
            if end > start:
                ax.axvspan(start, end, color="tab:red", alpha=0.12, label=f"redone {start + 1}-{end}")
        ax.set_xlim(0, last_step * 1.02 + 1)  # one x range for all panels, even a metric seen once
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes[len(keys) :]:
        ax.set_visible(False)
    if spans:
        axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """The records of a JSONL file; [] when missing. A torn last line (kill -9) is skipped."""
    if not fs.exists(path):
        return []
    rows = []
    for line in fs.read_text(path).splitlines():
        with contextlib.suppress(ValueError):
            if isinstance(record := json.loads(line), dict):
                rows.append(record)
    return rows


# ------------------------------------------------------------------------------------ build


_EXTRAS = {"wandb": ("wandb", "wandb"), "tensorboard": ("tensorboard", "tensorboard")}


def check_writers(cfg: Config) -> None:
    """Refuse a config whose writers are not installed (cheap: no import). Raises ConfigError."""
    for key, (module, extra) in _EXTRAS.items():
        if getattr(cfg.log, key) and importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"log.{key}=true but {module} is not installed: pip install 'disttrain[{extra}]', "
                f"or set log.{key}=false"
            )


def build_writer(cfg: Config, run_dir: str, *, resumed_step: int, use_tqdm: bool) -> Writer:
    """The writers the config asks for on rank 0; NullWriter on every other rank."""
    if not dist.is_main():
        return NullWriter()
    check_writers(cfg)
    writers: list[Writer] = []
    if cfg.log.jsonl:
        writers.append(JsonlWriter(run_dir, resumed_step))
    logged_through = writers[0].logged_through if writers else None
    if cfg.log.console:
        writers.append(ConsoleWriter(cfg.trainer.max_steps, use_tqdm))
    if cfg.log.tensorboard:
        writers.append(TensorBoardWriter(run_dir, resumed_step))
    if cfg.log.wandb:
        writers.append(WandbWriter(cfg, run_dir, resumed_step, fallback_floor=logged_through))
    if cfg.log.plot:
        writers.append(CurvesWriter(run_dir))
    return MultiWriter(writers)


class EventLog:
    """RUN_DIR/events.jsonl: start, resume, signal, checkpoint, requeue, finish, error (DESIGN §3).

    Free text (an error message) can carry a credential; known secret values are masked first."""

    def __init__(self, run_dir: str, job_id: str = "", restart_count: int = 0, cfg: Config | None = None):
        self.path = fs.join(run_dir, "events.jsonl")
        self.job_id = job_id
        self.restart_count = restart_count
        self.enabled = dist.is_main()
        self.secrets = secret_values(cfg) if self.enabled else []

    def emit(self, event: str, **fields: Any) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), "event": event, "job_id": self.job_id}
        record["restart_count"] = self.restart_count
        record.update(fields)
        try:
            fs.append_text(self.path, redact_text(json.dumps(record, default=str), self.secrets) + "\n")
        except OSError as err:  # an event must never take the run down; say so on stderr
            print(f"disttrain: could not write {self.path}: {err}", file=sys.stderr)
