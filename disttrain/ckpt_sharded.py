"""The sharded checkpoint format (trainer.strategy=fsdp, with or without parallel.tp), and loading any
checkpoint into any layout.

A sharded step directory holds, besides `state.pt` and `ranks.pt` (as in the replicated format):

    shard_00000.safetensors ...   one per rank: its pieces of every sharded tensor, under
                                  `model/<name>` and `optim/<param name>/<state>` (exp_avg, ...)

and its `manifest.json` (format 2) records the layout as JSON: for every sharded tensor its global
shape, dtype and the pieces each rank saved. A piece is `{"file", "rows": [a, b)}` (rows of dim 0, whole
other dims: fsdp over one mesh dim, the layout disttrain always wrote) or `{"file", "key", "box"}` (a
box, per-dim [start, stop), under its own key in the file: a tp x dp layout, or one run of a strided
shard; ckpt_boxes). A replica (a tensor not cut over tp) is saved by the ranks at coordinate 0 of that
mesh dim only, so the pieces tile each tensor exactly once. For every tied name (two state_dict keys of one
Parameter: GPT-2's `lm_head.weight` is `transformer.wte.weight`) the name it is saved under,
`{"tied_to": "model/transformer.wte.weight"}`: a tied tensor is saved once (safetensors refuses two
names for one memory) and loads back into the one shared Parameter. Nothing in it is pickled;
`state.pt` (optimizer hyper-parameters by parameter name, scheduler, trainer, hooks, unsharded
buffers) is loaded only with `torch.load(weights_only=True)` after its sha256 matched, like every
other file.

`SavedState` reads either format and hands out any box of any tensor, so a checkpoint loads into the
same layout (each rank reads only its own shard file), another world size or tp degree (boxes are cut
from the saved pieces that overlap), or another strategy (a replicated checkpoint into fsdp or tp and
back).

Ties, in both formats: a reader gets every state_dict key (an alias reads its canonical tensor), and
per-parameter optimizer state is keyed by the canonical name, the first name `named_parameters()`
gives the Parameter (torch's distributed checkpoint keys it so too, and transformers'
`save_pretrained` keeps GPT-2's under `transformer.wte.weight`). The replicated format's
model.safetensors stores a tied key as a copy of its own (its writer sees host copies only, which no
longer share memory after an async snapshot); loading copies both into the one Parameter, so the tie
holds there too. Checkpoints written before tie records existed have none and load as before.
"""

from __future__ import annotations

from typing import Any

import safetensors.torch
import torch
from torch import nn

from disttrain import ckpt_boxes as boxes
from disttrain import ckpt_format as fmt
from disttrain import dist, fs
from disttrain.errors import CheckpointError

State = dict[str, Any]
FORMAT = 2


def shard_name(rank: int) -> str:
    return f"shard_{rank:05d}.safetensors"


# ----------------------------------------------------------------------------------------- save


def split_state(
    module: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], State, State]:
    """(this rank's rows of every sharded tensor, their layout, the plain rest) of model + optimizer.

    The plain rest is what every rank holds whole (buffers, the optimizer's step counts and
    hyper-parameters): rank 0 saves it in state.pt. Optimizer state is keyed by parameter name, not
    index, so that it can be resharded into another layout."""
    rows: dict[str, torch.Tensor] = {}
    layout: State = {}
    plain_model: State = {}
    ties = tied_names(module)
    for name, t in module.state_dict().items():
        canonical = ties.get(name)
        if canonical is not None and f"model/{canonical}" in layout:  # a sharded tensor saved once
            layout[f"model/{name}"] = {"tied_to": f"model/{canonical}"}
        else:  # an unsharded tie (a shared buffer) stays in state.pt, where torch.save keeps it one storage
            _put(f"model/{name}", t, rows, layout, plain_model, name)
    by_name = named_optimizer_state(optimizer.state_dict(), parameter_names(module, optimizer))
    plain_state: State = {}
    for pname, entries in by_name["state"].items():
        for key, value in entries.items():
            target = plain_state.setdefault(pname, {})
            _put(f"optim/{pname}/{key}", value, rows, layout, target, key)
    optim_plain = {"param_groups": by_name["param_groups"], "state": plain_state}
    return rows, layout, {"model": plain_model, "optimizer": optim_plain}


def _put(key: str, t: Any, rows: dict, layout: State, plain: State, plain_key: str) -> None:
    if not (isinstance(t, torch.Tensor) and boxes.is_dtensor(t)):
        plain[plain_key] = t
        return
    entry: State = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), "pieces": []}
    layout[key] = entry
    if not boxes.owns(t):  # a replica: the rank at coordinate 0 of that mesh dim writes it
        return
    parts = boxes.pieces(t)
    whole_rows = len(parts) == 1 and all(d == [0, n] for d, n in zip(parts[0][0][1:], t.shape[1:]))
    if whole_rows:  # rows of dim 0 (FSDP over one mesh dim): the layout every disttrain so far wrote
        rows[key] = parts[0][1]
        entry["pieces"].append({"rows": parts[0][0][0] if t.dim() else [0, 1]})
        return
    for i, (box, view) in enumerate(parts):  # a box of a 2-D layout (tp x dp), or runs of a strided shard
        rows[f"{key}#{i}"] = view
        entry["pieces"].append({"key": f"{key}#{i}", "box": box})


def tied_names(module: nn.Module) -> dict[str, str]:
    """{alias: canonical} of the module's state_dict keys that are one tensor object (tied weights, a
    shared buffer); the canonical name is the first key of the object. FSDP2 keeps a Parameter shared
    by two modules of one shard unit as one DTensor, so the ties read the same sharded or not."""
    first: dict[int, str] = {}
    ties: dict[str, str] = {}
    for name, t in module.state_dict(keep_vars=True).items():
        if isinstance(t, torch.Tensor):
            canonical = first.setdefault(id(t), name)
            if canonical != name:
                ties[name] = canonical
    return ties


def write_shard(work: str, rank: int, rows: dict[str, torch.Tensor]) -> tuple[str, State]:
    """Write this rank's rows to its shard file; returns (file name, {bytes, sha256})."""
    # Ties are saved once already (split_state); own_storage still copies any other two keys on one
    # storage (views of one buffer), which safetensors would refuse.
    data = safetensors.torch.save(fmt.own_storage(rows))
    name = shard_name(rank)
    return name, fmt.put(fs.join(work, name), data)


def merge_layouts(per_rank: list[State]) -> State:
    """Rank 0: one layout from every rank's, each tensor with the pieces (rows or boxes) each rank wrote."""
    merged: State = {}
    for rank, layout in enumerate(per_rank):
        for key, entry in layout.items():
            if "tied_to" in entry:  # the module's ties, the same on every rank
                merged[key] = {"tied_to": entry["tied_to"]}
                continue
            into = merged.setdefault(key, {"shape": entry["shape"], "dtype": entry["dtype"], "shards": []})
            pieces = entry["pieces"] if "pieces" in entry else [{"rows": entry["rows"]}]  # one run of rows
            into["shards"].extend({"file": shard_name(rank), **piece} for piece in pieces)
    return merged


# ----------------------------------------------------------------------------------------- load


class SavedState:
    """A verified checkpoint of either format, handing out rows of its tensors by name.

    `plain` is state.pt with the optimizer state keyed by parameter name. Shard files are read (whole,
    hashed, then parsed: safetensors runs no code) only when a requested row range overlaps them."""

    def __init__(self, path: str, manifest: State, plain: State, names: list[str] | None):
        self.path, self.manifest = path, manifest
        self.sharded = int(manifest.get("format", 1)) >= FORMAT
        layout: State = manifest.get("layout") or {}
        self.ties = _ties(layout)  # {alias: canonical} of tensors saved once
        self.layout: State = {k: e for k, e in layout.items() if k not in self.ties}
        self._files: dict[str, dict[str, torch.Tensor]] = {}
        if self.sharded:
            self.plain = plain
        else:  # the replicated format: full weights (model.safetensors, read already), optimizer by index
            model = plain["model"]
            self.layout = {f"model/{k}": _whole(fmt.FILES[0], k, v) for k, v in model.items()}
            self._files[fmt.FILES[0]] = {f"model/{k}": v for k, v in model.items()}
            optim = named_optimizer_state(plain["optimizer"], names) if names is not None else None
            self.plain = {**plain, "model": {}, "optimizer": optim}

    def shapes(self, prefix: str) -> dict[str, tuple[int, ...]]:
        """{name: global shape} of the saved tensors under `prefix` (e.g. "model/"), tied and plain too."""
        keys = [k for k in [*self.layout, *self.ties] if k.startswith(prefix)]
        out = {k.removeprefix(prefix): tuple(self.layout[self._key(k)]["shape"]) for k in keys}
        plain = self.plain.get(prefix.rstrip("/")) or {}
        return {**out, **{k: tuple(v.shape) for k, v in plain.items() if isinstance(v, torch.Tensor)}}

    def has(self, key: str) -> bool:
        return key in self.layout or key in self.ties

    def _key(self, key: str) -> str:
        """The key a tensor is saved under: a tied alias's canonical key, else `key` itself."""
        return self.ties.get(key, key)

    def box(self, key: str, box: boxes.Box) -> torch.Tensor:
        """The part `box` of the saved tensor `key`, cut from the saved pieces that overlap it (rows of
        an fsdp checkpoint, boxes of a tp x dp one, whole tensors of a replicated one)."""
        key = self._key(key)
        entry = self.layout[key]
        out = torch.empty([b - a for a, b in box], dtype=getattr(torch, entry["dtype"]))
        filled = 0
        for shard in entry["shards"]:
            saved_box = (
                shard["box"] if "box" in shard else [shard["rows"], *([0, n] for n in entry["shape"][1:])]
            )
            common = boxes.overlap(saved_box, box) if box else saved_box  # a 0-d tensor: its one value
            if common is None:
                continue
            data = self._file(shard["file"])[shard.get("key", key)]
            if not box:
                return data.reshape(())
            boxes.view_of(out, common, box).copy_(boxes.view_of(data, common, saved_box))
            filled += boxes.volume(common)
        if filled != boxes.volume(box):  # the owner rule writes each element once: a gap is a broken layout
            raise CheckpointError(
                f"{self.path}: {key} holds {filled} of the {boxes.volume(box)} values asked for"
            )
        return out

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of the saved tensor `key`."""
        shape = self.layout[self._key(key)]["shape"]
        return self.box(key, [[start, stop], *([0, n] for n in shape[1:])])

    def full(self, key: str) -> torch.Tensor:
        key = self._key(key)
        entry = self.layout[key]
        shards = entry["shards"]
        if (
            len(shards) == 1 and "rows" in shards[0]
        ):  # whole in one file (a replicated checkpoint, or one rank)
            return self._file(shards[0]["file"])[key]
        return self.box(key, [[0, n] for n in entry["shape"]])

    def _file(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self._files:
            data = fmt.read_verified(self.path, name, self.manifest)
            try:
                self._files[name] = safetensors.torch.load(data)
            except Exception as err:  # the safetensors parser's own error types
                raise CheckpointError(f"{fs.join(self.path, name)}: not a safetensors file ({err})") from None
        return self._files[name]


def _ties(layout: State) -> dict[str, str]:
    """{alias: canonical} from a sharded layout's tie records (none in checkpoints from before them;
    read_manifest checked that each names a tensor the layout holds)."""
    return {k: e["tied_to"] for k, e in layout.items() if isinstance(e, dict) and "tied_to" in e}


def _whole(file: str, key: str, t: torch.Tensor) -> State:
    rows = t.shape[0] if t.dim() else 1
    return {
        "shape": list(t.shape),
        "dtype": str(t.dtype).removeprefix("torch."),
        "shards": [{"file": file, "rows": [0, rows]}],
    }


def load_model(module: nn.Module, saved: SavedState, source: str) -> None:
    """Fill the model's tensors (sharded or whole) from `saved`, in this rank's layout. A tied Parameter
    is loaded in place, so it stays one Parameter; its names all get the canonical one's saved value."""
    ties = tied_names(module)
    out: State = {}
    for name, t in module.state_dict().items():
        key = f"model/{name}"
        if name in ties and ties[name] in out:
            out[name] = out[ties[name]]  # the same Parameter: one read, one value
        elif saved.has(key):
            out[name] = _cut(saved, key, t)
        elif name in saved.plain.get("model", {}):
            out[name] = saved.plain["model"][name]
        else:
            raise CheckpointError(f"{source} has no tensor {name!r} for the model")
    module.load_state_dict(out)


def load_optimizer(optimizer: torch.optim.Optimizer, module: nn.Module, saved: SavedState) -> None:
    """Give the optimizer its saved state, matched by parameter name and cut to this rank's layout.

    A tied Parameter's state is found under any of its names (saved under the canonical one)."""
    names = parameter_names(module, optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    ties = tied_names(module)
    by_name = saved.plain["optimizer"]
    plain = {ties.get(n, n): entries for n, entries in by_name["state"].items()}
    sharded: dict[str, dict[str, str]] = {}
    for key in (k for k in saved.layout if k.startswith("optim/")):
        pname, entry = key.removeprefix("optim/").rsplit("/", 1)
        sharded.setdefault(ties.get(pname, pname), {})[entry] = key
    state: dict[int, State] = {}
    for index, (name, param) in enumerate(zip(names, params)):
        entries = {k: _cut_plain(v, param) for k, v in plain.get(name, {}).items()}
        entries.update({entry: _cut(saved, key, param) for entry, key in sharded.get(name, {}).items()})
        if entries:
            state[index] = entries
    groups = [
        {**g, "params": [names.index(ties.get(n, n)) for n in g["params"]]} for g in by_name["param_groups"]
    ]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _cut(saved: SavedState, key: str, like: torch.Tensor) -> torch.Tensor:
    """The saved tensor `key` in the layout of `like`: this rank's pieces if `like` is a DTensor."""
    if not boxes.is_dtensor(like):
        return saved.full(key)
    local = torch.empty_like(like.to_local())  # type: ignore[attr-defined]
    for box, view in boxes.pieces(like, local):
        view.copy_(saved.box(key, box))
    return dist.sharded_like(like, local)


def _cut_plain(value: Any, param: torch.Tensor) -> Any:
    """A whole per-parameter state tensor (from a replicated checkpoint) cut to a sharded parameter's pieces."""
    if not (isinstance(value, torch.Tensor) and boxes.is_dtensor(param) and value.shape == param.shape):
        return value
    local = torch.empty_like(param.to_local())  # type: ignore[attr-defined]
    for box, view in boxes.pieces(param, local):
        view.copy_(value[tuple(slice(a, b) for a, b in box)])
    return dist.sharded_like(param, local)


def parameter_names(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The module's name of every optimizer parameter, in the optimizer's order (its state's indices)."""
    # named_parameters() gives a tied Parameter once, under its first (canonical) name.
    names = {id(p): n for n, p in module.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def named_optimizer_state(sd: State, names: list[str]) -> State:
    """An optimizer state_dict keyed by parameter index, re-keyed by parameter name."""
    state = {names[int(i)]: dict(entries) for i, entries in sd["state"].items()}
    groups = [{**g, "params": [names[int(i)] for i in g["params"]]} for g in sd["param_groups"]]
    return {"state": state, "param_groups": groups}


def consolidate(path: str, manifest: State) -> dict[str, torch.Tensor]:
    """Every model tensor of a sharded checkpoint, whole (export: no process group, any world size)."""
    plain = fmt.read_state(path, manifest)
    saved = SavedState(path, manifest, plain, names=None)
    model = {k.removeprefix("model/"): saved.full(k) for k in saved.layout if k.startswith("model/")}
    # Every state_dict key, as the replicated format holds them: a tied alias is its canonical tensor
    # (one object: `ckpt export` writes it as a copy, `export_pretrained` ties it again).
    model.update({a.removeprefix("model/"): model[c.removeprefix("model/")] for a, c in saved.ties.items()})
    return {**model, **plain.get("model", {})}
