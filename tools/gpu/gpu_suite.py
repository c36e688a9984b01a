r"""Every CUDA check and GPU benchmark of the project in one time-boxed run, written up as one markdown report.

    bash tools/gpu/gpu_suite.sh                        # on a GPU machine: no arguments, <= 10 minutes on an H200
    bash tools/gpu/gpu_suite.sh --smoke --out /tmp/x   # the same steps at tiny sizes on a CPU, < 5 minutes
    bash tools/gpu/gpu_suite.sh --only cli --budget 240 --timeout cli_compile=200   # rerun a step, more time

The steps, in order. Each command runs in its own process group (killed with its workers at its time
box, and with the suite if the suite is killed); a step always gets its reserved share of ``--budget``
and never the shares of the steps after it; a failing step never stops the next one:

1. ``env``: GPU, driver, torch / CUDA, packages, attention backends that import, and the measured bf16
   matmul rate and copy bandwidth (tools/gpu/environment.py);
2. ``cuda_tests``: ``pytest -m cuda`` (every packed backend against the reference in bf16/fp16 forward +
   backward, DGPT-B bf16 forward/backward per backend, KV-cached sampling == full forward);
3. ``attention``: benchmarks/attention_backends.py at DGPT-L shapes (256 px, batch 64);
4. ``train``: benchmarks/train_throughput.py, DGPT-B/GPT-B and DGPT-L/GPT-L at 256 px, bf16, eager, then
   the B pair with ``--compile``; MFU against the matmul rate step 1 measured;
5. ``sample``: benchmarks/sample_throughput.py, DGPT-L (GPT-B entropy model) vs GPT-L, batch 64, CFG 2.0;
6. ``cli``: the user's commands on CUDA: synthetic images -> ``tokenizer.train_vq`` (1 epoch) ->
   ``preprocess_tokens.py`` tokens -> ``train_entropy_model.py`` -> entropies -> θ for 1.81 tokens/patch ->
   ``train_global_model.py`` DGPT-B for 48 steps eager and with ``--train.compile true`` -> ``sample_c2i.py``;
7. ``fsdp``: ``train.fsdp=true`` (FSDP2, ``fully_shard``) under ``torchrun --nproc_per_node 1`` on the step 6
   store and entropy model: DGPT-B for one epoch (8 steps), resumed for a second, then ``sample_c2i.py`` from
   its full checkpoint (needs step 6 in the same run).

``--smoke`` runs the same steps with tiny models on the CPU (the CUDA tests are collected and skip).
``--no-compile`` leaves out the ``torch.compile`` commands of steps 4 and 6 (on a CPU most of a smoke run's
time is inductor compiling), and the report says so.

The report, ``<out>/<gpu>-<YYYY-MM-DD>.md`` (``cpu-smoke-...`` for a smoke run, ``...-<steps>.md`` for an
``--only`` rerun; ``-2``, ``-3`` ... rather than replacing an earlier one), is rewritten before and after
every command: its ``state`` line says running, finished or interrupted (SIGTERM, SIGINT, SIGHUP stop the
running command and leave the report saying so). ``<report>.log`` next to it holds every command's full
output, and the sample grids of step 6 are copied next to it. Exit status: 0 when every step passed, 1
otherwise (the report says which), 2 for bad arguments (checked before anything is written), 128 + the
signal when interrupted. This file needs only the standard library; it runs its steps, and asks torch what
the device is, in child processes of the same interpreter, with the wheels carried in ``.whl/`` installed
into its scratch folder (``pip install --no-index --target``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from datetime import date, datetime
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from dpar.errors import ArgumentParser, UserError, run_main  # noqa: E402  (standard library only, like this file)
from dpar.fileio import atomic_write_text, check_output_dir  # noqa: E402  (so is this)
from dpar.launch import set_parent_death_signal  # noqa: E402  (and this)
from dpar.validation import number  # noqa: E402  (and this)

WHEELS = REPO / ".whl"
PAPER_TOKENS_PER_PATCH = 1.81  # ImageNet-256 (paper Table 6); the cli step calibrates θ to it
# an H200's bf16 8192^3 matmul rate as quoted to this project, not measured by it: the MFU peak only where the
# suite's env step measured none (the report says so)
H200_KINDS_MATMUL_TFLOPS = 788.0
TAIL_LINES = 30  # lines of each output stream kept in the report for a failed command
KILL_GRACE = 3  # seconds between SIGTERM and SIGKILL for a command past its time


@dataclass
class Sizes:
    """What the steps run on: the real shapes on a GPU, toy ones for ``--smoke`` on a CPU."""
    device: str
    budget: int  # default --budget, seconds
    attention: list[str]
    train_pairs: list[list[str]]
    train: list[str]
    sample: list[str]
    cli_images: int
    cli_image_size: int
    cli_classes: list[str]
    cli_epochs: int
    cli_batch: int
    configs: dict[str, str]
    timeouts: dict[str, int]  # seconds per command of each step
    reserves: dict[str, float]  # fraction of the budget no earlier step may use, per step


GPU = Sizes(
    device="cuda", budget=590,
    attention=["--model", "DGPT-L", "--image-size", "256", "--downsample", "16", "--batch-size", "64"],
    train_pairs=[["DGPT-B", "GPT-B"], ["DGPT-L", "GPT-L"]],
    train=["--image-size", "256", "--downsample", "16", "--vocab", "16384", "--num-classes", "1000",
           "--batch-size", "64", "--steps", "10", "--warmup", "3"],
    sample=["--models", "DGPT-L", "GPT-L", "--entropy-model", "GPT-B", "--image-size", "256", "--downsample", "16",
            "--vocab", "16384", "--num-classes", "1000", "--batch-sizes", "64", "--cfg-scale", "2.0",
            "--dtype", "bfloat16", "--repeats", "2"],
    cli_images=512, cli_image_size=256, cli_classes=["0", "1", "2", "3"], cli_epochs=6, cli_batch=64,
    configs={"tokenizer": "configs/tokenizer/vq_16.yaml", "entropy": "configs/entropy_model/gpt_b_256.yaml",
             "global": "configs/patching_modes/global_model_entropy_row_break.yaml"},
    # Measured on an H200 (benchmarks/results/nvidia-h200-2026-12-04*.md): cuda_tests 50-57 s, attention 27 s, the
    # two eager train pairs 48 s, compiling the B pair 100+ s with a cold inductor cache, sample 86 s, cli 190 s;
    # fsdp not yet run on a GPU: its three commands are boxed at 40 s each, its share is 59 s.
    timeouts={"env": 30, "cuda_tests": 90, "attention": 45, "train": 35, "train_compile": 150, "sample": 120,
              "cli": 60, "cli_compile": 150, "fsdp": 40},
    reserves={"env": 0.02, "cuda_tests": 0.1, "attention": 0.05, "train": 0.28, "sample": 0.15, "cli": 0.33,
              "fsdp": 0.1},
)
SMOKE = Sizes(
    device="cpu", budget=300,
    attention=["--batch-size", "8", "--repeats", "2"],
    train_pairs=[["DGPT-tiny", "GPT-tiny"]],
    train=["--image-size", "32", "--downsample", "4", "--vocab", "64", "--num-classes", "4", "--batch-size", "8",
           "--steps", "2", "--warmup", "1"],
    sample=["--image-size", "32", "--downsample", "4", "--vocab", "64", "--num-classes", "4", "--batch-sizes", "2",
            "--repeats", "1"],
    cli_images=96, cli_image_size=32, cli_classes=["0", "1", "2", "3"], cli_epochs=2, cli_batch=16,
    configs={"tokenizer": "configs/tokenizer/vq_tiny.yaml", "entropy": "configs/tiny/entropy_model.yaml",
             "global": "configs/tiny/global_model_entropy_row_break.yaml"},
    timeouts={"env": 30, "cuda_tests": 60, "attention": 30, "train": 30, "train_compile": 90, "sample": 30,
              "cli": 40, "cli_compile": 90, "fsdp": 40},
    reserves={"env": 0.03, "cuda_tests": 0.03, "attention": 0.03, "train": 0.1, "sample": 0.05, "cli": 0.21,
              "fsdp": 0.15},
)


@dataclass
class CommandResult:
    argv: list[str]
    status: str          # ok | failed (exit N) | timed out ... | stopped ... | skipped: reason | interrupted
    seconds: float
    stdout: str
    stderr: str
    show: str            # how the report shows a good run: "markdown" (stdout as is) or "tail" (last lines, fenced)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class StepReport:
    name: str
    title: str
    commands: list[CommandResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    state: str = "not run"  # not run | running | finished | interrupted
    error: str = ""  # why the step stopped when no command's status says it

    @property
    def status(self) -> str:
        if self.state != "finished":
            return self.state
        bad = [c.status for c in self.commands if not c.ok]
        return bad[0] if bad else self.error or ("ok" if self.commands else "not run")


class StepFailed(Exception):
    """The rest of the step cannot run (a command it depends on failed, or an output is missing)."""


class Interrupted(Exception):
    """The suite got SIGTERM, SIGINT or SIGHUP: the running command is stopped, the report says so."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Suite:
    """Runs the steps' commands with time boxes and keeps the report and the log up to date on disk."""

    def __init__(self, sizes: Sizes, smoke: bool, report_path: Path, work: Path, budget: float,
                 timeouts: dict[str, int], argv: list[str], names: list[str], probe: dict, env: dict[str, str],
                 wheels: list[str], compile_: bool = True):
        self.sizes, self.smoke, self.work, self.argv, self.probe = sizes, smoke, work, argv, probe
        self.compile = compile_  # False: --no-compile
        self.env, self.wheels = env, wheels
        self.started = time.monotonic()
        self.end = self.started + budget
        self.deadline = self.end  # of the step running: see start_step
        self.budget = budget
        self.timeouts = {**sizes.timeouts, **timeouts}
        self.report_path, self.log_path = report_path, report_path.with_suffix(".log")
        runs = "eager and compiled" if compile_ else "eager"
        self.steps = [StepReport(name, STEPS[name][0].format(runs=runs)) for name in names]
        self.state = "running"
        self.running: tuple[list[str], datetime] | None = None  # the command in flight, for the report
        self.facts: dict = {}  # what later steps use: the measured matmul peak
        atomic_write_text(self.log_path, "")

    @property
    def compile_modes(self) -> tuple[bool, ...]:
        """The train and cli steps run eager, then (unless ``--no-compile``) with torch.compile."""
        return (False, True) if self.compile else (False,)

    def start_step(self, index: int) -> None:
        """A step may run until the budget's end less the shares reserved for the steps after it, but always
        gets its own share (when that much is left)."""
        now = time.monotonic()
        later = sum(self.sizes.reserves[step.name] for step in self.steps[index + 1:]) * self.budget
        own = self.sizes.reserves[self.steps[index].name] * self.budget
        self.deadline = min(self.end, max(self.end - later, now + own))
        self.steps[index].state = "running"
        self.write()

    # -- running ----------------------------------------------------------------------------------------------

    def run(self, step: StepReport, argv: list[str], timeout_key: str, show: str = "markdown") -> CommandResult:
        """Run ``argv`` from the repository root until its time box or the step's share of the budget ends."""
        remaining = self.deadline - time.monotonic()
        box = self.timeouts[timeout_key]
        if remaining < 5:
            result = CommandResult(argv, "skipped: the step's share of the budget is spent", 0.0, "", "", show)
        elif box <= remaining:
            result = self._spawn(argv, box, ("timed out", f"its {timeout_key} time box"), show)
        else:
            result = self._spawn(argv, remaining, ("stopped", "the step's share of the budget ran out"), show)
        step.commands.append(result)
        self.write()
        return result

    def _spawn(self, argv: list[str], timeout: float, stopped: tuple[str, str], show: str) -> CommandResult:
        """Run one command; ``stopped`` is (verb, reason) for its status if ``timeout`` ends it."""
        self.running = (argv, datetime.now())
        self.write()
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            started = time.monotonic()
            process = subprocess.Popen(argv, cwd=REPO, env=self.env, stdout=out, stderr=err, start_new_session=True,
                                       preexec_fn=partial(set_parent_death_signal, signal.SIGKILL, os.getpid()))
            status = "interrupted"
            try:
                code = process.wait(timeout=timeout)
                status = "ok" if code == 0 else f"failed (exit {code})"
            except subprocess.TimeoutExpired:
                status = f"{stopped[0]} after {time.monotonic() - started:.0f} s ({stopped[1]})"
            finally:
                _kill_group(process)  # also what it left behind (compile and DataLoader workers)
                seconds = time.monotonic() - started
                out.seek(0), err.seek(0)
                stdout, stderr = out.read(), err.read()
                with open(self.log_path, "a") as log:
                    log.write(f"\n$ {shlex.join(argv)}\n# {status}, {seconds:.1f} s\n--- stdout\n{stdout}\n"
                              f"--- stderr\n{stderr}\n")
                self.running = None
        return CommandResult(argv, status, seconds, stdout, stderr, show)

    def python(self, *args: str) -> list[str]:
        return [sys.executable, *args]

    # -- the report -------------------------------------------------------------------------------------------

    def write(self) -> None:
        atomic_write_text(self.report_path, self.render())

    def render(self) -> str:
        used = time.monotonic() - self.started
        probe = self.probe
        torch_version = probe["torch"] + (f" (CUDA {probe['cuda']})" if probe["cuda"] else "")
        lines = [f"# {'Smoke run (CPU, tiny sizes)' if self.smoke else 'GPU suite'}: {probe['device_name']}, "
                 f"{date.today().isoformat()}", "",
                 f"- state: **{self.state}**",
                 f"- command: `{shlex.join(['bash', 'tools/gpu/gpu_suite.sh', *self.argv])}`",
                 f"- commit: {_commit()}",
                 f"- python {probe['python']}, torch {torch_version}",
                 f"- wheels installed from `.whl/`: {', '.join(self.wheels) if self.wheels else 'none'}",
                 f"- time: {used:.0f} s of a {self.budget:.0f} s budget; time box per command (s): "
                 + ", ".join(f"{k} {v}" for k, v in self.timeouts.items() if self.compile or "compile" not in k)]
        if self.smoke:
            lines.append("- a smoke run: its figures show that each step runs and reports, at toy sizes with one or "
                         "two timed steps on a shared CPU; they are not measurements")
        if self.running:
            argv, since = self.running
            lines.append(f"- running since {since:%H:%M:%S}: `{_shown(argv)}`")
        lines += ["", "| step | status | seconds |", "|---|---|---|"]
        lines += [f"| {i}. {s.title} | {s.status} | {s.seconds:.0f} |" for i, s in enumerate(self.steps, 1)]
        for i, step in enumerate(self.steps, 1):
            if step.state == "not run":
                continue
            lines += ["", f"## {i}. {step.title}", ""]
            for command in step.commands:
                lines += _render_command(command)
            lines += [f"{note}\n" for note in step.notes]
            if step.error:
                lines += [f"**Stopped**: {step.error}", ""]
        return "\n".join(lines) + "\n"


def _shown(argv: list[str]) -> str:
    return shlex.join(["python" if a == sys.executable else a for a in argv])


def _render_command(command: CommandResult) -> list[str]:
    lines = [f"`{_shown(command.argv)}`: **{command.status}**, {command.seconds:.1f} s", ""]
    stdout = command.stdout.strip()
    if command.ok and command.show == "markdown":
        lines += [stdout, ""]
    elif command.ok:
        lines += ["```text", *stdout.splitlines()[-TAIL_LINES:], "```", ""]
    elif not command.status.startswith("skipped"):
        streams = [("stdout", command.stdout), ("stderr", command.stderr)]
        if command.show == "markdown" and "|" in stdout:  # the rows measured before it stopped, once
            lines += [stdout, ""]
            streams = streams[1:]
        printed = False
        for name, text in streams:
            tail = [line for line in text.replace("\r", "\n").splitlines() if line.strip()][-TAIL_LINES:]
            if tail:
                lines += [f"Last {len(tail)} lines of {name}:", "", "```text", *tail, "```", ""]
                printed = True
        if not printed and not (command.show == "markdown" and "|" in stdout):
            lines += ["It printed nothing.", ""]
    return lines


def _kill_group(process: subprocess.Popen) -> None:
    """SIGTERM the command's whole process group (it and the workers it started), SIGKILL what is left
    after a grace period. A no-op for a command that ended and left nothing behind."""
    for sig, grace in ((signal.SIGTERM, KILL_GRACE), (signal.SIGKILL, 1.0)):
        try:
            os.killpg(process.pid, sig)
        except (ProcessLookupError, PermissionError):
            break
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            process.poll()  # reap the leader: a zombie would count as alive
            if not _group_alive(process.pid):
                break
            time.sleep(0.05)
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _commit() -> str:
    """The checkout's commit; ``$GPU_SUITE_COMMIT`` where the copy has no git history (the device machine's)."""
    if os.environ.get("GPU_SUITE_COMMIT"):
        return os.environ["GPU_SUITE_COMMIT"] + " (from GPU_SUITE_COMMIT)"
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (no git)"
    if head.returncode != 0:
        return "unknown (not a git checkout)"
    return head.stdout.strip() + (" with uncommitted changes" if dirty.stdout.strip() else "")


# -- the steps ------------------------------------------------------------------------------------------------

def step_env(suite: Suite, step: StepReport) -> None:
    env_json = suite.work / "env.json"
    suite.run(step, suite.python("tools/gpu/environment.py", "--device", suite.sizes.device, "--json", str(env_json)),
              "env")
    if env_json.is_file() and suite.sizes.device == "cuda":
        suite.facts["peak_tflops"] = json.loads(env_json.read_text())["matmul_tflops"]


def step_cuda_tests(suite: Suite, step: StepReport) -> None:
    result = suite.run(step, suite.python("-m", "pytest", "-m", "cuda", "-v", "-rfEs", "--tb=short", "-p",
                                          "no:cacheprovider", "tests"), "cuda_tests", show="tail")
    if suite.smoke and result.ok:
        step.notes.append("Smoke run: no CUDA here, so the CUDA tests are collected and skip.")


def step_attention(suite: Suite, step: StepReport) -> None:
    suite.run(step, suite.python("benchmarks/attention_backends.py", *suite.sizes.attention,
                                 "--device", suite.sizes.device), "attention")


def step_train(suite: Suite, step: StepReport) -> None:
    peak = []
    if "peak_tflops" in suite.facts:
        peak = ["--peak-tflops", f"{suite.facts['peak_tflops']:.1f}"]
        step.notes.append(f"MFU against this run's measured bf16 8192^3 matmul rate, {peak[1]} TFLOP/s (step 1); the "
                          "datasheet's dense bf16 peak (989 TFLOP/s for an H100 or H200) would give smaller MFUs.")
    elif suite.sizes.device == "cuda" and "H200" in suite.probe["device_name"]:
        peak = ["--peak-tflops", f"{H200_KINDS_MATMUL_TFLOPS:.1f}"]
        step.notes.append(f"No matmul rate measured in this run: MFU against {H200_KINDS_MATMUL_TFLOPS:.0f} TFLOP/s, the "
                          "bf16 8192^3 rate on random data the device notes record for this workplace's H200.")
    elif suite.sizes.device == "cuda":
        step.notes.append("No matmul rate measured in this run: MFU against the datasheet peak in "
                          "benchmarks/workloads.py, where it knows the GPU.")
    if not suite.compile:
        step.notes.append("The --compile runs were left out (--no-compile).")
    for compile_ in suite.compile_modes:
        # Compiling takes minutes per pair with a cold cache: only the first pair is compiled.
        for pair in suite.sizes.train_pairs[:1] if compile_ else suite.sizes.train_pairs:
            suite.run(step, suite.python("benchmarks/train_throughput.py", "--models", *pair, *suite.sizes.train,
                                         *peak, "--device", suite.sizes.device, *(["--compile"] if compile_ else [])),
                      "train_compile" if compile_ else "train")


def step_sample(suite: Suite, step: StepReport) -> None:
    suite.run(step, suite.python("benchmarks/sample_throughput.py", *suite.sizes.sample, "--device", suite.sizes.device),
              "sample")


def step_cli(suite: Suite, step: StepReport) -> None:
    """The user's pipeline end to end with the project's own commands, as the README gives them."""
    sizes, work = suite.sizes, suite.work / "cli"
    runs, store, images = work / "runs", work / "tokens", work / "images"
    batch = ["--train.global_batch_size", str(sizes.cli_batch), "--train.log_every", "4"]

    def run(argv: list[str], key: str = "cli") -> CommandResult:
        result = suite.run(step, suite.python(*argv), key, show="tail")
        if not result.ok:
            raise StepFailed()
        return result

    run(["-m", "dpar.data.synthetic", "--output", str(images), "--num-images", str(sizes.cli_images),
         "--image-size", str(sizes.cli_image_size)])
    run(["-m", "tokenizer.train_vq", "--config", sizes.configs["tokenizer"], "--data.data_path", str(images),
         "--train.results_dir", str(runs), "--train.epochs", "1", *batch])
    vq = _newest(runs, f"scratch/{Path(sizes.configs['tokenizer']).stem}/*/checkpoints/epoch_*/model.safetensors")
    run(["preprocess_tokens.py", "--stage", "tokens", "--data-path", str(images), "--store", str(store),
         "--vq-ckpt", str(vq), "--image-size", str(sizes.cli_image_size), "--views", "1",
         "--num-workers", "0" if suite.smoke else "4"])
    run(["train_entropy_model.py", "--config", sizes.configs["entropy"], "--data.store", str(store),
         "--data.val_store", "null", "--data.val_holdout", "0", "--train.results_dir", str(runs), "--train.epochs", str(sizes.cli_epochs),
         "--train.ckpt_every", str(sizes.cli_epochs), *batch])
    entropy = _newest(runs, f"scratch/{Path(sizes.configs['entropy']).stem}/*/checkpoints/epoch_*/model.safetensors")
    run(["preprocess_tokens.py", "--stage", "entropies", "--store", str(store),
         "--entropy-model-checkpoint", str(entropy)])
    stats = run(["-m", "dpar.data.stats", "--store", str(store), "--target-tokens-per-patch",
                 str(PAPER_TOKENS_PER_PATCH)])
    threshold = _table_column(stats.stdout, "threshold")[0]
    reached = float(_table_column(stats.stdout, "tokens/patch")[0])
    if reached < 1.1:  # the closest patching is one token each: take the longest patches P allows instead,
        # so that the runs below still train and sample on real patches
        stats = run(["-m", "dpar.data.stats", "--store", str(store), "--target-tokens-per-patch", "4"])
        threshold = _table_column(stats.stdout, "threshold")[0]
        reached = float(_table_column(stats.stdout, "tokens/patch")[0])
    if abs(reached - PAPER_TOKENS_PER_PATCH) > 0.1:
        step.notes.append(f"θ = {threshold} gives {reached:.2f} tokens per patch, not {PAPER_TOKENS_PER_PATCH}: this "
                          "briefly trained entropy model's entropies take too few distinct values. The runs below "
                          "use this θ (where the closest patching was one token each, the longest patches P allows).")
    suite.facts["cli"] = {"store": store, "entropy": entropy, "threshold": threshold, "runs": runs}  # for fsdp
    trained = {}
    if not suite.compile:
        step.notes.append("The --train.compile true run was left out (--no-compile); the eager run samples.")
    for compile_ in suite.compile_modes:
        name = "compiled" if compile_ else "eager"
        run(["train_global_model.py", "--config", sizes.configs["global"], "--data.store", str(store),
             "--data.val_store", "null", "--data.val_holdout", "0", "--patcher.entropy_model_checkpoint", str(entropy),
             "--patcher.threshold", threshold, "--train.results_dir", str(runs), "--train.experiment_name", name,
             "--train.epochs", str(sizes.cli_epochs), "--train.ckpt_every", str(sizes.cli_epochs),
             "--train.compile", str(compile_).lower(), *batch], "cli_compile" if compile_ else "cli")
        trained[name] = _newest(runs, f"scratch/{name}/*/config.yaml").parent
    step.notes.append(_training_table(trained))
    samples = work / "samples"
    run(["sample_c2i.py", "--experiment_dir", str(trained.get("compiled", trained["eager"])),
         "--output-dir", str(samples), "--classes", *sizes.cli_classes, "--per-class", "4"])
    for png in sorted(samples.glob("*.png")):
        kind = "patches" if png.stem.endswith("_patches") else "samples"
        target = suite.report_path.with_name(f"{suite.report_path.stem}-{kind}.png")
        shutil.copy(png, target)
        step.notes.append(f"![{kind}]({target.name})")


def step_fsdp(suite: Suite, step: StepReport) -> None:
    """train.fsdp=true on this machine's one device under torchrun (a one-process group: the sharded code path),
    stopped after one epoch and resumed for a second, then sampled from its full
    model.safetensors as any run is."""
    if "cli" not in suite.facts:
        raise StepFailed("needs the token store and entropy model of the cli step, in the same run (--only cli fsdp)")
    sizes, work, cli = suite.sizes, suite.work / "fsdp", suite.facts["cli"]

    def run(argv: list[str]) -> CommandResult:
        result = suite.run(step, suite.python(*argv), "fsdp", show="tail")
        if not result.ok:
            raise StepFailed()
        return result

    train = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "train_global_model.py",
             "--config", sizes.configs["global"], "--data.store", str(cli["store"]), "--data.val_store", "null",
             "--data.val_holdout", "0", "--patcher.entropy_model_checkpoint", str(cli["entropy"]),
             "--patcher.threshold", cli["threshold"], "--train.results_dir", str(work / "runs"),
             "--train.experiment_name", "fsdp", "--train.fsdp", "true", "--train.ema", "true",
             "--train.global_batch_size", str(sizes.cli_batch), "--train.log_every", "4"]
    first = run(train + ["--train.epochs", "1"])
    if "sharded (FSDP)" not in first.stdout:
        raise StepFailed("the run did not say it was sharded")
    trained = _newest(work / "runs", "scratch/fsdp/*/config.yaml").parent
    resumed = run(train + ["--train.epochs", "2", "--resume", str(trained)])
    if "resuming" not in resumed.stdout:
        raise StepFailed("the second command did not resume the run")
    step.notes.append(_training_table({"fsdp": trained}))
    samples = work / "samples"
    run(["sample_c2i.py", "--experiment_dir", str(trained), "--output-dir", str(samples), "--classes",
         *sizes.cli_classes[:2], "--per-class", "2"])
    if not list(samples.glob("*.png")):
        raise StepFailed(f"no sample grid in {samples}")
    step.notes.append("Trained sharded (a one-process group), resumed from its epoch checkpoint, sampled from its full "
                      "model.safetensors.")


def _newest(root: Path, pattern: str) -> Path:
    found = sorted(root.glob(pattern))
    if not found:
        raise StepFailed(f"nothing matches {root}/{pattern}")
    return found[-1]


def _table_column(stdout: str, column: str) -> list[str]:
    """The cells of ``column`` in the markdown table a command printed."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in stdout.splitlines()
            if line.startswith("|") and not line.startswith("|---")]
    if not rows or column not in rows[0] or len(rows) < 2:
        raise StepFailed(f"no table with a {column!r} column in the output")
    index = rows[0].index(column)
    return [row[index] for row in rows[1:]]


def _training_table(runs: dict[str, Path]) -> str:
    """Loss and throughput of the eager and compiled runs, from their metrics.jsonl."""
    lines = ["| run | steps | train loss, last epoch | images/s over the last 4 steps (a recompilation may fall in "
             "them) | tokens/patch |", "|---|---|---|---|---|"]
    for name, run in runs.items():
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        epochs = [r for r in records if r.get("epoch_summary")]
        steps = [r for r in records if "images_per_s" in r]
        last_epoch, last_step = (epochs or [{}])[-1], (steps or [{}])[-1]
        lines.append(f"| {name} | {last_epoch.get('step', '')} | {last_epoch.get('train_loss', float('nan')):.4f} | "
                     f"{last_step.get('images_per_s', float('nan')):.1f} | "
                     f"{last_epoch.get('tokens_per_patch', float('nan')):.2f} |")
    return "\n".join(lines)


STEPS: dict[str, tuple[str, Callable[[Suite, StepReport], None]]] = {
    "env": ("Environment", step_env),
    "cuda_tests": ("CUDA tests (pytest -m cuda)", step_cuda_tests),
    "attention": ("Packed attention backends", step_attention),
    "train": ("Training throughput", step_train),
    "sample": ("Sampling throughput", step_sample),
    "cli": ("The command-line path: tokenizer -> tokens -> entropy model -> DPAR {runs} -> samples",
            step_cli),
    "fsdp": ("FSDP (train.fsdp) under torchrun: train, resume, sample", step_fsdp),
}


def parse_timeouts(pairs: list[str], known: dict[str, int]) -> dict[str, int]:
    """``["cli=300", ...]`` -> ``{"cli": 300}``; ``UserError`` naming the bad pair."""
    timeouts = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in known or not (value.isascii() and value.isdigit()) or int(value) < 1:
            raise UserError(f"--timeout {pair!r}: expected NAME=SECONDS with NAME one of {', '.join(known)} and "
                            "SECONDS a positive integer")
        timeouts[key] = int(value)
    return timeouts


PROBE = """import json, platform, sys
import torch
cuda = torch.cuda.is_available()
name = torch.cuda.get_device_name() if cuda and sys.argv[1] == "cuda" else \\
    f"{platform.processor() or platform.machine()} CPU ({torch.get_num_threads()} threads)"
print(json.dumps({"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                  "cuda_available": cuda, "device_name": name}))
"""


def probe_python(device: str) -> dict:
    """What this interpreter's torch sees, asked in a child process (this one never holds a CUDA context);
    ``UserError`` when it cannot run torch."""
    out = subprocess.run([sys.executable, "-c", PROBE, device], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines() or ["no output"]
        raise UserError(f"{sys.executable} cannot run torch ({lines[-1]}); set PYTHON to an interpreter with torch")
    return json.loads(out.stdout.strip().splitlines()[-1])


def install_wheels(target: Path) -> list[str]:
    """Install the wheels carried in ``.whl/`` into ``target`` (no index, no dependencies); their names.
    ``UserError`` when pip fails."""
    wheels = sorted(WHEELS.glob("*.whl"))
    if not wheels:
        return []
    out = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                          "--no-cache-dir", "--target", str(target), *map(str, wheels)],
                         capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        lines = (out.stderr.strip() or out.stdout.strip() or "no output").splitlines()
        raise UserError(f"the wheels in {WHEELS} did not install: {lines[-1]}")
    return [wheel.name for wheel in wheels]


def report_path(out: Path, slug: str, only: list[str] | None) -> Path:
    """``<out>/<slug>-<date>[-<steps>].md``, with ``-2``, ``-3`` ... rather than replacing an earlier report."""
    stem = f"{slug}-{date.today().isoformat()}" + ("" if only is None else "-" + "-".join(only))
    path, n = out / f"{stem}.md", 1
    while path.exists() or path.with_suffix(".log").exists():
        n += 1
        path = out / f"{stem}-{n}.md"
    return path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (tests the suite itself)")
    parser.add_argument("--out", default=None, help="report folder (default: $OUT when set, else benchmarks/results)")
    parser.add_argument("--only", nargs="+", action="extend", choices=tuple(STEPS), default=None,
                        help="run only these steps (in the suite's order)")
    parser.add_argument("--budget", type=number(float, gt=0), default=None,
                        help=f"seconds for the whole suite (default: {GPU.budget} on a GPU, {SMOKE.budget} with --smoke)")
    parser.add_argument("--timeout", action="append", default=[], metavar="NAME=SECONDS",
                        help=f"time box per command, overriding the default; NAME: {', '.join(GPU.timeouts)}")
    parser.add_argument("--no-compile", dest="compile_", action="store_false",
                        help="leave out the torch.compile commands of the train and cli steps")
    parser.add_argument("--keep-work", action="store_true", help="keep the scratch folder (stores, runs, samples)")
    args = parser.parse_args(argv)

    sizes = SMOKE if args.smoke else GPU
    default_out = os.environ.get("OUT") or REPO / "benchmarks" / "results"
    out = check_output_dir(args.out if args.out is not None else default_out, "--out").absolute()
    timeouts = parse_timeouts(args.timeout, sizes.timeouts)  # after the flags: asking torch takes a child process
    probe = probe_python(sizes.device)
    if not args.smoke and not probe["cuda_available"]:
        parser.error("no CUDA device here: run on the GPU machine, or add --smoke for the CPU run")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        parser.error(f"--out {out}: cannot create it ({error.strerror})")

    work = Path(tempfile.mkdtemp(prefix="gpu_suite."))
    try:
        wheels = install_wheels(work / "site")
    except BaseException as error:  # no scratch folder left behind
        shutil.rmtree(work, ignore_errors=True)
        if isinstance(error, subprocess.TimeoutExpired):
            raise UserError(f"the wheels in {WHEELS} did not install: {error}") from None
        raise
    paths = [str(REPO), *([str(work / "site")] if wheels else []), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    names = [name for name in STEPS if name in (args.only or STEPS)]
    slug = "cpu-smoke" if args.smoke else re.sub(r"[^a-z0-9]+", "-", probe["device_name"].lower()).strip("-")
    suite = Suite(sizes, args.smoke, report_path(out, slug, names if args.only else None), work,
                  args.budget or sizes.budget, timeouts, argv, names, probe, env, wheels, args.compile_)
    print(f"gpu suite on {probe['device_name']}: report {suite.report_path}, work {work}", flush=True)

    def interrupt(signum, frame):
        raise Interrupted(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, interrupt)
    step = None
    try:
        for index, step in enumerate(suite.steps):
            suite.start_step(index)
            started = time.monotonic()
            print(f"== {step.title}", flush=True)
            try:
                STEPS[step.name][1](suite, step)
            except StepFailed as error:
                step.error = str(error)
            except Interrupted:
                raise
            except Exception as error:  # a bug in the suite itself: record it, go on with the next step
                step.error = f"suite error: {type(error).__name__}: {error}"
            finally:
                step.seconds = time.monotonic() - started
            step.state = "finished"
            print(f"   {step.status} ({step.seconds:.0f} s)", flush=True)
            suite.write()
        suite.state = "finished"
    except Interrupted as interrupted:
        suite.state = f"interrupted by {interrupted} after {time.monotonic() - suite.started:.0f} s"
        if step is not None and step.state == "running":
            step.state = "interrupted"
        suite.write()
        print(f"{interrupted}: stopped; report: {suite.report_path}", file=sys.stderr)
        return 128 + interrupted.signum
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)  # the cleanup below is not itself interrupted
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    suite.write()
    print(f"report: {suite.report_path}")
    return 0 if all(s.status == "ok" for s in suite.steps) else 1


if __name__ == "__main__":
    run_main(main)
