"""A quick check of the benchmark harness (bench/): statistics, result rows, the interleaving, the report,
the CLI's section selection and one tiny checkpoint measurement. The benchmarks run with `python -m bench`."""

from __future__ import annotations

import pytest

from bench import ckpt, step
from bench.common import Section, median, ratio_row, ratios, spread
from bench.report import write_report
from bench.run import parse


def test_ratio_row_pairs_interleaved_repetitions():
    row = ratio_row("x", [2.0, 4.0, 3.0], [1.0, 2.0, 3.0], "ms", "<= 1.5", lambda r: r <= 1.5)
    assert ratios([2.0, 4.0, 3.0], [1.0, 2.0, 3.0]) == [2.0, 2.0, 1.0]
    assert row.ratio == 2.0 and row.met is False
    assert row.value == 3.0 and row.baseline == 2.0
    assert row.spread == "1.000-2.000 (n=3)"
    assert ratio_row("c", [1.0], [1.0], "s", "(context)", None).met is None
    assert median([]) != median([])  # nan for no data
    assert spread([3.0, 1.0]) == (1.0, 3.0)


def test_step_runs_rotate_and_group():
    assert step._sequence("ABC", 3) == list("ABCBCACAB")
    runs = [{"variant": v, "i": i} for i, v in enumerate(step._sequence("ABC", 2))]
    assert [{v: r["i"] for v, r in g.items()} for g in step._groups(runs, 3)] == [
        {"A": 0, "B": 1, "C": 2}, {"B": 3, "C": 4, "A": 5}]  # fmt: skip
    assert all(order[0] in "AB" and sorted(order) == sorted(step.VARIANTS) for order in step.ORDERS)
    assert step.p10([5.0, 1.0, 3.0, 2.0, 4.0]) == 1.0


def test_report_has_machine_command_and_tables_only(tmp_path):
    sec = Section("ckpt", "2. Checkpoint write")
    sec.rows.append(ratio_row("local 10 MB", [100.0], [200.0], "MB/s", ">= 0.70", lambda r: r >= 0.70))
    info = {"date": "today", "nproc": 2, "host_cpus": 2, "cpu_model": "CPU", "ram_gib": 24, "python": "3",
            "torch": "t", "accelerate": "a", "safetensors": "s", "s3fs": "f", "moto": "m", "numpy": "n",
            "platform": "p", "git_commit": "c", "total_seconds": 1, "load_avg_at_start": (1.0, 1.0, 1.0),
            "load_avg_at_end": (1.0, 1.0, 1.0)}  # fmt: skip
    out = tmp_path / "RESULTS.md"
    write_report(str(out), [sec], info, "python -m bench --quick", quick=True)
    text = out.read_text()
    assert "`python -m bench --quick`" in text and "2 CPUs usable" in text and "bench/README.md" in text
    assert "| 2 | local 10 MB | 0.500 | >= 0.70 | **missed** |" in text  # goals at a glance
    assert "| local 10 MB | 100 MB/s | 200 MB/s | 0.500 | >= 0.70 | **missed** |" in text
    assert "## 6. GPU" in text and "python -m bench --gpu" in text


def test_cli_selects_sections():
    assert parse([]).section_list == ["step", "ckpt", "async", "resume", "data", "fsdp", "stream", "features"]
    assert parse(["--gpu"]).section_list == ["gpu"]
    assert parse(["--gpu"]).out.endswith("RESULTS_GPU.md")
    assert parse(["--sections", "ckpt,gpu", "--gpu"]).section_list == ["ckpt", "gpu"]
    with pytest.raises(SystemExit):
        parse(["--sections", "nope"])


def test_checkpoint_measurements_on_a_tiny_state(tmp_path):
    app, ranks = ckpt.make_state(3 * ckpt.MB)
    assert abs(sum(t.nbytes for t in ckpt.host_tensors(app)) - 3 * ckpt.MB) < 16
    m = ckpt.measure_io(app, ranks, 1, str(tmp_path))
    assert set(m) == {"save", "raw_write", "load", "raw_read"}
    a = ckpt.measure_async(app, ranks, 1, str(tmp_path))
    assert set(a) == {"async_block", "async_total", "sync"}
    assert all(len(v) == 1 and v[0] > 0 for v in [*m.values(), *a.values()])
    assert list(tmp_path.iterdir()) == []  # every repetition cleans up after itself
    figures = [r.figure for r in ckpt.io_rows("x", 3e6, m)]
    assert figures == ["x: save (sync) vs raw write", "x: load vs raw read"]


def test_sections_other_commands_own_survive_a_rewrite_and_are_replaced_in_place(tmp_path):
    from bench.sections import replace_section

    out = tmp_path / "RESULTS.md"
    replace_section(out, "goodput", "## Goodput\nfirst")
    replace_section(out, "startup", "## Start-up\nonly")
    replace_section(out, "goodput", "## Goodput\nsecond")
    text = out.read_text()
    assert text.count("<!-- goodput:start -->") == 1 and "second" in text and "first" not in text
    assert text.index("## Goodput") < text.index("## Start-up")  # replaced where it was
    info = {"date": "today", "nproc": 2, "host_cpus": 2, "cpu_model": "CPU", "ram_gib": 24, "python": "3",
            "torch": "t", "accelerate": "a", "safetensors": "s", "s3fs": "f", "moto": "m", "numpy": "n",
            "platform": "p", "git_commit": "c", "total_seconds": 1, "load_avg_at_start": (1.0, 1.0, 1.0),
            "load_avg_at_end": (1.0, 1.0, 1.0)}  # fmt: skip
    write_report(str(out), [Section("ckpt", "2. Checkpoint write")], info, "python -m bench", quick=False)
    text = out.read_text()
    assert (
        text.startswith("# disttrain benchmarks")
        and "## Goodput\nsecond" in text
        and "## Start-up\nonly" in text
    )


def test_new_sections_judge_their_goals_from_the_measured_numbers():
    """bench.localtier and bench.lightning_resume: the verdicts follow the figures (a ratio over the goal
    is `missed`, under it `met`), from repetitions shaped as their workers return them."""
    from bench import lightning_resume, localtier

    info = {"date": "d", "nproc": 2, "cpu_model": "cpu", "load_avg_at_start": [0.0] * 3,
            "load_avg_at_end": [0.0] * 3, "git_commit": "c", "torch": "t"}  # fmt: skip

    def run(step_s: float, blocked_s: float) -> dict:
        return {"step_s": step_s, "blocked_s": blocked_s, "copy_s": 0.01, "waited_s": 0.0, "state_bytes": 3e8}

    results = {m: {"off": [run(1.0, 0)], "every step": [run(1.5, 0.011)], "every 20 steps": [run(1.01, 0.02)]}
               for m in localtier.MODELS}  # fmt: skip
    text = localtier.report({"info": info, "reps": 1, "results": results})
    assert (
        "| 1.500 (1.500-1.500) | <= 1.02 **missed** |" in text
        and "| 1.10 (1.10-1.10) | <= 1.2: **met** |" in text
    )
    assert "| 2.00 (2.00-2.00) | <= 1.2: **missed** |" in text

    def worker(fresh: float, resumed: float) -> dict:
        return {"fresh": [fresh] * 3, "resumed": [resumed] * 3, "bytes": 3e8, "version": "2.6"}

    data = {"info": info, "reps": 3, "rounds": 1,
            "results": {"disttrain": [worker(1.0, 1.2)], "lightning": [worker(1.0, 1.1)]}}  # fmt: skip
    assert "disttrain's added time / Lightning's: **2.00**" in lightning_resume.report(data)
    assert "goal <= 1.0: **missed**" in lightning_resume.report(data)
