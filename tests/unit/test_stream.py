"""Streams read in one process: parts are disjoint and cover the data, a saved position resumes exactly
where the reading stopped (with a seek: the bytes before it are never read again), batches carry over
from one pass of a part to the next, and what cannot resume is refused with one line."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import pytest
import torch
from torch.utils.data import IterableDataset

from disttrain.data import StreamBatches
from disttrain.errors import ConfigError
from disttrain.stream import HFStream, JsonlStream, as_stream
from tests.conftest import FAST, run_main
from tests.unit.test_main import assert_refused


def write_jsonl(path: Path, ids: range, *, blank_every: int = 0, trailing_newline: bool = True) -> Path:
    lines = []
    for i in ids:
        lines.append(json.dumps({"id": i, "text": "x" * (i % 17)}))  # uneven lengths: uneven byte ranges
        if blank_every and i % blank_every == 0:
            lines.append("")
    path.write_text("\n".join(lines) + ("\n" if trailing_newline else ""))
    return path


@pytest.fixture
def files(tmp_path) -> list[str]:
    """Three files: one with blank lines, one without a final newline; 100 records in all."""
    return [
        str(write_jsonl(tmp_path / "a.jsonl", range(0, 40), blank_every=7)),
        str(write_jsonl(tmp_path / "b.jsonl", range(40, 41), trailing_newline=False)),
        str(write_jsonl(tmp_path / "c.jsonl", range(41, 100))),
    ]


def ids_of(pairs) -> list[int]:
    return [sample["id"] for sample, _ in pairs]


@pytest.mark.parametrize("parts", [1, 2, 3, 5, 8])
def test_parts_are_disjoint_and_cover_every_record_in_order(files, parts):
    stream = JsonlStream(files)
    got = [ids_of(stream.read(p, parts, 0, None)) for p in range(parts)]
    assert [i for part in got for i in part] == list(range(100))  # each once, in file order
    assert all(got), "no part is empty"


def test_a_part_boundary_on_a_line_start_keeps_that_line_in_the_later_part(tmp_path):
    path = tmp_path / "even.jsonl"
    path.write_text("".join(json.dumps({"id": i}) + "\n" for i in range(10)))  # 10 lines of 10 bytes
    stream = JsonlStream(str(path))
    assert stream.bounds(1, 2) == (50, 100)
    assert ids_of(stream.read(0, 2, 0, None)) == [0, 1, 2, 3, 4]
    assert ids_of(stream.read(1, 2, 0, None)) == [5, 6, 7, 8, 9]


def test_a_folder_is_its_jsonl_files_in_name_order(tmp_path, files):
    (tmp_path / "notes.txt").write_text("not data")
    assert ids_of(JsonlStream(str(tmp_path)).read(0, 1, 0, None)) == list(range(100))


def test_resuming_from_any_position_continues_with_the_next_record(files):
    stream = JsonlStream(files)
    for part in range(3):
        pairs = list(stream.read(part, 3, 0, None))
        for k, (_, position) in enumerate(pairs):
            assert ids_of(stream.read(part, 3, 0, position)) == ids_of(pairs[k + 1 :])


def test_resuming_seeks_past_what_was_read(tmp_path):
    """The bytes before a saved position are never read again: garbage there changes nothing."""
    path = write_jsonl(tmp_path / "d.jsonl", range(50))
    stream = JsonlStream(str(path))
    pairs = list(stream.read(0, 1, 0, None))
    position = pairs[29][1]
    data = path.read_bytes()
    path.write_bytes(
        b"\xff" * position["offset"] + data[position["offset"] :]
    )  # same size, consumed part ruined
    assert ids_of(JsonlStream(str(path)).read(0, 1, 0, position)) == list(range(30, 50))


def test_a_position_into_files_that_changed_is_refused(files):
    _, position = next(iter(JsonlStream(files).read(0, 1, 0, None)))
    Path(files[0]).write_text(Path(files[0]).read_text() + json.dumps({"id": 1000}) + "\n")
    with pytest.raises(ConfigError, match="bytes.*when the checkpoint was saved"):
        JsonlStream(files).check_position(0, 1, position)


def test_a_bad_line_names_the_file_and_byte(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": 0}\n{"id": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl: the line at byte 10 is not JSON"):
        list(JsonlStream(str(path)).read(0, 1, 0, None))


def batches(stream, rank, world, micro, position=None, n=None):
    reader = StreamBatches(stream, rank=rank, world_size=world, micro=micro, num_workers=0)
    if position is not None:
        reader.restore({"stream": position}, world)
        reader.check()
    return reader, reader.batches(seed=0)


def test_batches_run_on_into_the_next_pass_and_resume_exactly(tmp_path):
    """7 records in a part, batches of 3: the third batch takes 1 from pass 0 and 2 from pass 1; every
    batch boundary, saved and restored, gives the same batches as reading on."""
    path = tmp_path / "e.jsonl"
    path.write_text(
        "".join(json.dumps({"id": i, "pad": "x" * (i < 10)}) + "\n" for i in range(14))
    )  # same widths
    stream = JsonlStream(str(path))
    reader, it = batches(stream, 1, 2, 3)
    straight = [batch["id"].tolist() for batch in islice(it, 6)]
    assert straight[:3] == [[7, 8, 9], [10, 11, 12], [13, 7, 8]]
    reader, it = batches(stream, 1, 2, 3)
    for k in range(6):
        next(it)
        position = reader.position
        resumed = batches(stream, 1, 2, 3, position)[1]
        assert [b["id"].tolist() for b in islice(resumed, 6 - k - 1)] == straight[k + 1 :]
    assert reader.epoch == 2


def test_the_position_moves_when_a_batch_is_taken_not_when_it_is_read(tmp_path):
    """With a DataLoader worker reading ahead, the saved position is still the one after the last batch
    the trainer took."""
    stream = JsonlStream(str(write_jsonl(tmp_path / "f.jsonl", range(64))))
    reader = StreamBatches(stream, rank=0, world_size=1, micro=4, num_workers=2)
    it = reader.batches(seed=0)
    taken = [next(it)["id"].tolist() for _ in range(3)]  # the worker has prefetched several more by now
    assert taken == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    resumed = batches(stream, 0, 1, 4, reader.position)[1]
    assert next(resumed)["id"].tolist() == [12, 13, 14, 15]


def test_an_empty_part_is_refused(tmp_path):
    stream = JsonlStream(str(write_jsonl(tmp_path / "g.jsonl", range(1))))
    with pytest.raises(ConfigError, match="part 1 of 2 of the train stream is empty"):
        next(batches(stream, 1, 2, 1)[1])


def test_a_resume_at_another_world_size_is_refused(tmp_path):
    reader = StreamBatches(JsonlStream(str(write_jsonl(tmp_path / "h.jsonl", range(8)))), rank=0, world_size=1,
                           micro=2, num_workers=0)  # fmt: skip
    reader.restore(
        None, saved_world=2
    )  # evaluating the checkpoint (--test) needs no position: not refused yet
    with pytest.raises(
        ConfigError, match="cannot resume at world size 1.*positions of 2 parts; resume with 2"
    ):
        reader.check()


def test_an_iterable_dataset_without_positions_is_refused_with_what_to_use():
    class Numbers(IterableDataset):
        def __iter__(self):
            return iter(range(10))

    with pytest.raises(ConfigError, match="no len\\(\\) and no position.*JsonlStream"):
        as_stream(Numbers(), "train")
    assert as_stream([1, 2, 3], "train") is None  # map-style: the sampler's business


def test_a_huggingface_streaming_dataset_splits_and_resumes_with_its_own_state(tmp_path):
    from datasets import load_dataset

    shards = [str(write_jsonl(tmp_path / f"s{k}.jsonl", range(10 * k, 10 * k + 10))) for k in range(4)]
    dataset = load_dataset("json", data_files=shards, split="train", streaming=True)
    stream = as_stream(dataset, "train")
    assert isinstance(stream, HFStream)
    parts = [ids_of(stream.read(p, 2, 0, None)) for p in range(2)]
    assert sorted(parts[0] + parts[1]) == list(range(40)) and not set(parts[0]) & set(parts[1])
    pairs = list(islice(stream.read(1, 2, 0, None), 13))
    assert ids_of(stream.read(1, 2, 0, pairs[-1][1])) == parts[1][13:]


def test_stream_batches_collate_dict_samples_into_dict_batches(tmp_path):
    def sample(record):
        return {"id": torch.tensor(record["id"]), "x": torch.full((2,), float(record["id"]))}

    stream = JsonlStream(str(write_jsonl(tmp_path / "i.jsonl", range(4))), transform=sample)
    batch = next(batches(stream, 0, 1, 2)[1])
    assert set(batch) == {"id", "x"} and batch["x"].shape == (2, 2)


def test_a_run_with_an_iterable_dataset_exits_2_with_one_line_and_creates_nothing(tmp_path):
    """It used to end in a traceback: TypeError: object of type '...' has no len()."""
    run_dir = tmp_path / "run"
    proc = run_main(f"run_dir={run_dir}", "pipeline.target=tests.pipelines:PlainIterable", *FAST)
    assert_refused(proc, "the train split (Samples) has no len() and no position to resume from")
    assert not run_dir.exists()
