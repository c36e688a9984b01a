"""tools/gpu/gpu_suite.sh: the one prepared command for a lent GPU, proven here by its CPU smoke run, and
tools/gpu/environment.py, its probe of the machine."""
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tools.gpu import environment
from tools.gpu.gpu_suite import SMOKE
from tests.helpers import ROOT

SECTIONS = ["Environment", "CUDA tests", "Packed attention backends", "Training throughput", "Sampling throughput",
            "The command-line path", "FSDP"]


ENV = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "HOME": "/tmp"}
# This checks that every step runs and reports, not how fast (tools/gpu/README.md has the timings): generous
# time boxes, so a machine busy with other work does not fail it.
GENEROUS = ["--budget", "900", *(arg for key, box in SMOKE.timeouts.items() for arg in ("--timeout", f"{key}={4 * box}"))]


def suite(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "tools/gpu/gpu_suite.sh", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def sections(report: str) -> dict[str, str]:
    parts = re.split(r"^## \d\. ", report, flags=re.M)[1:]
    return {part.splitlines()[0]: part for part in parts}


def table_rows(text: str, first_cell: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith(f"| {first_cell}")]


def smoke_run(out: Path, *extra: str) -> tuple[subprocess.CompletedProcess, Path]:
    run = suite("--smoke", "--out", str(out), *GENEROUS, *extra)
    reports = list(out.glob("cpu-smoke-*.md"))
    assert len(reports) == 1, run.stdout + run.stderr
    return run, reports[0]


def check_smoke_report(run: subprocess.CompletedProcess, report_path: Path, compiled: bool) -> None:
    report = report_path.read_text()
    assert run.returncode == 0, report
    assert "- state: **finished**" in report
    time_boxes = next(line for line in report.splitlines() if "time box per command" in line)
    assert ("cli_compile" in time_boxes and "train_compile" in time_boxes) == compiled
    summary = table_rows(report.split("\n## ")[0], "")
    assert [row[1] for row in summary[1:]] == ["ok"] * 7, summary
    found = sections(report)
    assert [next(t for t in found if t.startswith(s)) for s in SECTIONS]  # all seven, in order
    body = {s: next(v for t, v in found.items() if t.startswith(s)) for s in SECTIONS}
    assert table_rows(body["Environment"], "torch") and table_rows(body["Environment"], "float32 matmul")
    assert "skipped" in body["CUDA tests"] and "test_kv_cached_sampling_equals_a_full_forward" in body["CUDA tests"]
    assert {r[0] for r in table_rows(body["Packed attention backends"], "")} >= {"sdpa", "padded"}
    train = table_rows(body["Training throughput"], "DGPT-tiny")
    assert len(train) == 1 + compiled and all("x (" in row[-1] for row in train)  # eager [and --compile] vs GPT
    assert "compile False" in body["Training throughput"]
    assert ("compile True" in body["Training throughput"]) == compiled
    assert ("left out (--no-compile)" in body["Training throughput"]) != compiled
    cli_title = next(t for t in found if t.startswith("The command-line path"))
    assert cli_title.endswith("DPAR eager and compiled -> samples" if compiled else "DPAR eager -> samples")
    cli = body["The command-line path"]
    runs = {row[0]: row for row in table_rows(cli, "eager") + table_rows(cli, "compiled")}
    assert set(runs) == ({"eager", "compiled"} if compiled else {"eager"}) and runs["eager"][1] != ""
    assert runs["eager"][1] == runs.get("compiled", runs["eager"])[1]  # as many steps compiled as eager
    assert float(runs["eager"][4]) > 1.0  # DPAR trained on real patches, not one token each
    assert re.search(r"16 images of 4 classes", cli)
    for png in ("samples", "patches"):
        assert (report_path.parent / f"{report_path.stem}-{png}.png").stat().st_size > 0
    log = report_path.with_suffix(".log").read_text()
    assert "train_global_model.py" in log and ("--train.compile true" in log) == compiled
    fsdp = table_rows(body["FSDP"], "fsdp")  # trained sharded, resumed for a second epoch, sampled
    assert len(fsdp) == 1 and int(fsdp[0][1]) == 2 * 96 // 16, body["FSDP"]
    assert "sharded (FSDP)" in log and "resuming" in log and "--train.fsdp true" in log


@pytest.mark.slow  # runs the suite's steps
def test_smoke_run_fills_every_section(tmp_path):
    """Without the torch.compile commands: on a CPU they are most of the run (the next test has them)."""
    check_smoke_report(*smoke_run(tmp_path, "--no-compile"), compiled=False)


@pytest.mark.slow  # about 3.5 min on 2 CPU cores, two thirds of it inductor compiling
def test_full_smoke_run_fills_every_section(tmp_path):
    check_smoke_report(*smoke_run(tmp_path), compiled=True)


@pytest.mark.slow  # runs the suite's steps
def test_a_command_past_its_time_box_is_killed_and_the_suite_goes_on(tmp_path):
    run = suite("--smoke", "--out", str(tmp_path), "--only", "sample", "env", "--timeout", "sample=1")
    report = next(tmp_path.glob("cpu-smoke-*-env-sample.md")).read_text()  # a rerun's own file
    assert run.returncode == 1
    statuses = {row[0]: row[1] for row in table_rows(report.split("\n## ")[0], "")[1:]}
    assert statuses == {"1. Environment": "ok",  # in the suite's order
                        "2. Sampling throughput": "timed out after 1 s (its sample time box)"}
    section = sections(report)["Sampling throughput"]
    # what it printed before the kill, for the finding: its table's first lines, other output's tail, or a "nothing"
    assert "| model |" in section or "Last" in section or "It printed nothing." in section


@pytest.mark.parametrize("args,message", [
    (["--smoke", "--timeout", "cli"], "--timeout 'cli': expected NAME=SECONDS"),
    (["--smoke", "--timeout", "nope=3"], "NAME one of env, cuda_tests"),
    (["--smoke", "--budget", "0"], "argument --budget: must be > 0; got '0'"),
    (["--smoke", "--budget", "nan"], "argument --budget: must be a finite number > 0; got 'nan'"),
    (["--smoke", "--timeout", "cli=\u00b2"], "SECONDS a positive integer"),
    (["--smoke", "--out", ""], "--out is empty"),
    (["--smoke", "--out", "/tmp/" + "x" * 300], "bytes, the file system allows"),
    (["--smoke", "--only", "nope"], "argument --only: invalid choice: 'nope'"),
    ([], "no CUDA device here"),
])
def test_bad_arguments_stop_with_one_line_before_any_report(tmp_path, args, message):
    run = suite(*args, *([] if "--out" in args else ["--out", str(tmp_path / "out")]))
    assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr
    assert run.stderr.startswith("error: ") and run.stderr.count("\n") == 1, run.stderr  # no usage block
    assert not (tmp_path / "out").exists() and not list((ROOT / "benchmarks" / "results").glob("cpu-smoke-*"))


@pytest.mark.parametrize("argv,named", [
    (["--device", "tpu"], "--device"),
    (["--json", ""], "--json is empty"),
    (["--json", "/"], "--json / must be a file, but it is a folder"),
    (["--json", "/tmp/" + "j" * 300], "--json .* bytes, the file system allows"),
])
def test_environment_flags_are_checked_before_anything_runs(argv, named, capsys):
    from dpar.errors import UserError
    with pytest.raises(UserError, match=named):
        environment.main(argv)
    assert capsys.readouterr().out == ""  # nothing measured or printed first


def test_an_output_path_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    run = suite("--smoke", "--out", str(tmp_path / "file"))
    assert run.returncode == 2 and "is a file" in run.stderr


def test_an_output_folder_that_cannot_be_made_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    run = suite("--smoke", "--out", str(tmp_path / "file" / "sub"))
    assert run.returncode == 2 and f"({tmp_path / 'file'} is a file)" in run.stderr and "Traceback" not in run.stderr


def _running(marker: str) -> list[int]:
    """Processes whose command line contains ``marker``."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.mark.slow  # runs the suite's train step
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_a_killed_suite_takes_its_running_command_along_and_the_report_says_so(tmp_path, signum):
    process = subprocess.Popen(["bash", "tools/gpu/gpu_suite.sh", "--smoke", "--only", "train", "--out", str(tmp_path),
                                "--timeout", "train=300"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not _running("benchmarks/train_throughput.py") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _running("benchmarks/train_throughput.py"), "the train step never started"
        report_file = next(tmp_path.glob("*.md"))
        assert "- state: **running**" in report_file.read_text() and "running since" in report_file.read_text()
        os.kill(process.pid, signum)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    deadline = time.monotonic() + 30  # the kernel delivers the child's parent-death signal
    while _running("benchmarks/train_throughput.py") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _running("benchmarks/train_throughput.py")
    work = Path(re.search(r"work (\S+)", process.stdout.read()).group(1))
    assert work.exists() == (signum == signal.SIGKILL)  # only a SIGKILL leaves the scratch folder
    shutil.rmtree(work, ignore_errors=True)
    report = report_file.read_text()
    if signum == signal.SIGTERM:
        assert process.returncode == 128 + signal.SIGTERM
        assert "- state: **interrupted by SIGTERM" in report and "| 1. Training throughput | interrupted |" in report
    else:  # no chance to write: the report still says it was running, never "ok"
        assert "- state: **running**" in report and "| 1. Training throughput | running |" in report
