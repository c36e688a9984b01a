"""The benchmarks run at tiny scale on a CPU and report what they claim to measure."""
import pytest
import torch

from benchmarks import attention_backends, sample_throughput, self_entropy, small_scale_study, train_throughput, workloads
from benchmarks.workloads import realistic_patch_starts
from dpar.patcher import patch_start_mask

TINY = ["--image-size", "32", "--downsample", "4", "--vocab", "64", "--num-classes", "4"]


class Clock:
    """A stand-in for the ``time`` module of a benchmark, so that no verdict depends on the machine's load:
    ``perf_counter()`` reads ``now``, which moves only by ``tick`` per reading and by what a test adds."""

    def __init__(self, tick: float = 0.0):
        self.now, self.tick = 0.0, tick

    def perf_counter(self) -> float:
        self.now += self.tick
        return self.now


@pytest.fixture
def counted_stages(monkeypatch):
    """``sample_throughput``'s stage timers on a clock that moves one second per reading: each call of a stage
    then costs it exactly one second, so the "%" columns count the stages' calls (over all the clock's readings
    in the run: they sum to about 50), the same on any machine."""
    monkeypatch.setattr(sample_throughput, "time", Clock(tick=1.0))


def table(out: str) -> list[dict[str, str]]:
    """The rows of the markdown table a benchmark printed, keyed by its header."""
    lines = [line for line in out.splitlines() if line.startswith("|") and not line.startswith("|---")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[1:]]


@pytest.mark.parametrize("target", [1.81, 2.06])
def test_realistic_patches_have_the_requested_mean_length_and_follow_the_rule(target):
    starts = realistic_patch_starts(32, 8, target, seed=1)
    assert abs(starts.numel() / starts.sum().item() - target) < 0.05
    assert starts[:, ::8].all()  # row breaks
    run = torch.zeros(32, dtype=torch.long)
    for i in range(64):  # never more than P=4 tokens without a start
        run = torch.where(starts[:, i], 0, run + 1)
        assert (run < 4).all()
    assert not torch.equal(starts, patch_start_mask(torch.zeros(32, 64), grid_width=8, threshold=0.5,
                                                    max_patch_length=4, row_break=True))  # not just the cap


def test_train_throughput_compares_dpar_with_the_baseline(capsys):
    train_throughput.main([*TINY, "--batch-size", "8", "--steps", "2", "--warmup", "1"])
    rows = {row["model"]: row for row in table(capsys.readouterr().out)}
    assert set(rows) == {"DGPT-tiny", "GPT-tiny"}
    assert abs(float(rows["DGPT-tiny"]["tokens/patch"]) - 1.81) < 0.1
    assert float(rows["GPT-tiny"]["tokens/patch"]) == 1.0
    # DPAR's FLOP count is the smaller one; the step-time ratio is printed next to it
    assert float(rows["DGPT-tiny"]["train GFLOP/image"]) < float(rows["GPT-tiny"]["train GFLOP/image"])
    ratio = rows["DGPT-tiny"]["step vs GPT, median (min-max)"]  # interleaved: median of pairwise ratios, range
    median, low, high = (float(x) for x in ratio.replace("x (", " ").replace("-", " ").rstrip(")").split())
    assert low <= median <= high and rows["DGPT-tiny"]["MFU"] == ""  # no MFU on a CPU
    step_ratio = float(rows["DGPT-tiny"]["step ms"]) / float(rows["GPT-tiny"]["step ms"])
    assert low / 2 < step_ratio < high * 2  # the medians of each side agree roughly with the pairwise ratio


def test_attention_backends_agree_with_the_reference(capsys):
    attention_backends.main(["--batch-size", "6", "--repeats", "2"])
    rows = {row["backend"]: row for row in table(capsys.readouterr().out)}
    assert {"sdpa", "flex", "padded"} <= set(rows)
    for name, row in rows.items():
        assert float(row["max abs error (output)"]) < 1e-5, name
    assert float(rows["padded"]["max abs error (gradients)"]) < 1e-5 and rows["flex"]["max abs error (gradients)"] == "no backward here"


def test_sample_throughput_splits_the_time_by_stage(capsys, counted_stages):
    sample_throughput.main([*TINY, "--batch-sizes", "2", "--repeats", "1", "--patching", "entropy", "self_entropy"])
    rows = {(row["model"], row["patching"]): row for row in table(capsys.readouterr().out)}
    dpar, gpt, own = rows["DGPT-tiny", "entropy"], rows["GPT-tiny", ""], rows["DGPT-tiny", "self_entropy"]
    assert float(own["% entropy_model"]) == 0 and float(own["global steps/image"]) < 64  # no entropy model runs
    assert "x (" in dpar["time vs GPT, median (min-max)"] and "x (" in own["time vs GPT, median (min-max)"]
    for stage in sample_throughput.STAGES:
        assert float(dpar[f"% {stage}"]) > 0, stage
    assert float(gpt["% encoder"]) == float(gpt["% entropy_model"]) == 0 and float(gpt["% global"]) > 20
    assert sum(float(dpar[f"% {stage}"]) for stage in sample_throughput.STAGES) <= 101
    assert float(gpt["global steps/image"]) == 64 and float(dpar["global steps/image"]) < 64


def test_interleaved_timing_measures_each_side_and_their_ratio(monkeypatch):
    from benchmarks.workloads import interleaved
    clock = Clock()  # A takes 20 ms, B 10 ms of a clock that nothing else moves
    monkeypatch.setattr(workloads, "time", clock)
    calls = []

    def run(name: str, seconds: float) -> None:
        calls.append(name)
        clock.now += seconds

    timing = interleaved(lambda: run("a", 0.02), lambda: run("b", 0.01), "cpu", pairs=3, warmup=1)
    assert calls == ["a", "b"] * 4  # A B A B: both under the same load
    assert timing["ratio_min"] <= timing["ratio"] <= timing["ratio_max"] and 1.3 < timing["ratio"] < 3
    assert timing["a"] > timing["b"] > 0.009


@pytest.mark.slow  # about 4 s on 2 CPU cores: the splits-by-stage test runs the same benchmark
def test_sample_throughput_counts_work_and_times_the_two_hypothesis_step(capsys, counted_stages):
    sample_throughput.main([*TINY, "--batch-sizes", "2", "--repeats", "1", "--patching", "self_entropy",
                            "--static-shapes", "--count-work"])
    rows = {row["model"]: row for row in table(capsys.readouterr().out)}
    dpar, gpt = rows["DGPT-tiny"], rows["GPT-tiny"]
    for stage in ("encoder", "global", "decoder"):  # the global transformer advances before H_i: still timed
        assert float(dpar[f"% {stage}"]) > 0, stage
    # the GPT's step reads each of its linear weights once (rows do not matter): their bytes, per token step
    gpt_model = sample_throughput.build_model("GPT-tiny", image_size=32, downsample=4, vocab=64, num_classes=4,
                                              device="cpu")
    linear_bytes = sum(m.weight.nbytes for m in gpt_model.modules() if isinstance(m, torch.nn.Linear))
    assert float(gpt["weight MB/step"]) == pytest.approx(linear_bytes / 1e6, rel=0.01)
    ratios = {key: float(dpar[key].rstrip("x")) for key in ("FLOPs vs GPT", "weights vs GPT")}
    assert ratios["weights vs GPT"] == pytest.approx(float(dpar["weight MB/step"]) / float(gpt["weight MB/step"]),
                                                     rel=0.02)
    assert float(dpar["GFLOP/image"]) > 0 and ratios["FLOPs vs GPT"] > 0 and gpt["FLOPs vs GPT"] == ""


@pytest.mark.parametrize("script, argv, named", [
    (sample_throughput, ["--batch-sizes", "0"], "--batch-sizes"),
    (sample_throughput, ["--repeats", "0"], "--repeats"),
    (sample_throughput, ["--tokens-per-patch", "nan"], "--tokens-per-patch"),
    (sample_throughput, ["--downsample", "5"], "--downsample 5"),
    (sample_throughput, ["--entropy-model", "DGPT-tiny"], "--entropy-model"),
    (sample_throughput, ["--patching", "self_entropy", "self_entropy"], "--patching"),
    (sample_throughput, ["--models", "GPT-tiny", "--patching", "self_entropy"], "--patching"),
    (train_throughput, ["--image-size", "32", "30", "--downsample", "4"], "--image-size 30"),
    (train_throughput, ["--steps", "0"], "--steps"),
    (train_throughput, ["--models", "GPT-Z"], "--models"),
    (attention_backends, ["--batch-size", "-1"], "--batch-size"),
    (attention_backends, ["--device", "tpu"], "--device"),
])
def test_benchmark_flags_are_checked_before_anything_runs(script, argv, named, capsys):
    from dpar.errors import UserError
    with pytest.raises(UserError, match=named):
        script.main(argv)
    assert capsys.readouterr().out == ""  # nothing measured or printed first


def test_a_benchmark_reports_bad_input_in_one_line_with_exit_status_2():
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "benchmarks/sample_throughput.py", "--batch-sizes", "0"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0 and "--batch-sizes" in done.stderr


def test_self_entropy_bisection_stops_at_the_exact_patch_count_with_the_full_search_s_threshold(monkeypatch):
    """Tokens per patch as a step function of θ (64 tokens; a patch ends wherever θ is below a fixed cut): the
    early stop returns the θ that all 24 bisection steps would, after fewer teacher-forced passes."""
    cuts = torch.linspace(0.3, 6.0, 40)
    calls = []

    def fake_teacher_forced(sampler, patcher, tokens, labels):
        calls.append(patcher.threshold)
        return 0.0, 64 / (1 + int((cuts > patcher.threshold).sum()))

    monkeypatch.setattr(self_entropy, "teacher_forced", fake_teacher_forced)
    sampler = type("S", (), {"model_config": type("C", (), {"vocab_size": 1024})()})()
    patcher = self_entropy.PatcherConfig(mode="self_entropy")
    target = 64 / 13  # 12 cuts above θ
    theta, reached = self_entropy.calibrate_self_threshold(sampler, patcher, None, None, target)
    assert reached == target and len(calls) < 24
    low, high, best = 0.0, float(torch.log(torch.tensor(1024.0))), None  # the search without the stop
    for _ in range(24):
        mid = (low + high) / 2
        got = 64 / (1 + int((cuts > mid).sum()))
        if best is None or abs(got - target) < abs(best[1] - target):
            best = (mid, got)
        low, high = (mid, high) if got < target else (low, mid)
    assert theta == round(best[0], 6)


def test_report_outputs_are_checked_before_any_work(tmp_path, capsys):
    """A report path under a file, empty or with a name too long for the file system, and a --gpt that is no
    run, are one line before the work (a calibration, a run); nothing is written."""
    from benchmarks import small_scale_study
    from dpar.errors import UserError
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cases = [(self_entropy, ["--output", str(blocker / "report")], "--output"),
             (self_entropy, ["--output", ""], "--output ''"),
             (self_entropy, ["--output", str(tmp_path / ("r" * 300))], "--output .* bytes, the file system allows"),
             (self_entropy, ["--gpt", str(tmp_path / "no_run"), "--output", str(tmp_path / "r")], "no_run"),
             (small_scale_study, ["--output", str(tmp_path / ("s" * 300))], "--output"),
             (small_scale_study, ["--runs-dir", ""], "argument --runs-dir: must be a path"),
             (small_scale_study, ["--output", str(blocker / "study")], "--output"),
             (small_scale_study, ["--runs-dir", str(blocker / "runs"), "--output", str(tmp_path / "study")],
              "--runs-dir")]
    for script, argv, named in cases:
        with pytest.raises(UserError, match=named):
            script.main(argv)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"] and capsys.readouterr().out == ""


@pytest.mark.parametrize("folder", ["repository", "elsewhere"])
def test_self_entropy_checks_its_runs_before_the_calibration_from_any_folder(tmp_path, monkeypatch, folder):
    """Issue 30: --gpt <a DPAR run> failed after the minutes of calibration (an assertion in the GPT's timing),
    and the defaults (the demo's runs, the report under benchmarks/results) were relative to the working
    folder. With the demo's DPAR as --gpt: one line before any calibration, from any folder."""
    from pathlib import Path

    from dpar.errors import UserError, one_line
    root = Path(self_entropy.__file__).resolve().parents[1]
    monkeypatch.chdir(root if folder == "repository" else tmp_path)
    checked = []
    monkeypatch.setattr(self_entropy, "check_output_file", lambda path, what: checked.append(Path(path)))
    monkeypatch.setattr(self_entropy, "teacher_forced", lambda *a, **k: pytest.fail("calibrated first"))
    dpar_run = root / "assets" / "demo" / "dpar"
    with pytest.raises(UserError) as raised:
        self_entropy.main(["--gpt", str(dpar_run)])
    assert one_line(raised.value) == (f"--gpt {dpar_run} is a DGPT-tiny run; give the token-level GPT run (GPT-*) "
                                      "to time against, or none")
    assert checked[0] == root / "benchmarks" / "results" / "self_entropy_demo.md"
    assert list(tmp_path.iterdir()) == []


def test_the_study_checks_its_sample_quality_metric_before_any_work(tmp_path):
    """--quality-samples too small for precision / recall, and a --classifier folder whose reference is missing,
    damaged or holds another network's statistics: one line naming the flag, before anything is trained or
    written (a breaker found them after training and sampling, naming the study's own copy)."""
    import shutil

    import numpy as np

    from benchmarks import small_scale_study
    from dpar.errors import UserError
    shipped = small_scale_study.REPO / "assets" / "demo" / "classifier"
    bad = {name: tmp_path / "classifiers" / name for name in ("no_reference", "damaged", "inception")}
    for name, folder in bad.items():
        folder.mkdir(parents=True)
        shutil.copy(shipped / "classifier.safetensors", folder)
    (bad["damaged"] / "reference.npz").write_bytes((shipped / "reference.npz").read_bytes()[:3000])
    np.savez(bad["inception"] / "reference.npz", arr_0=np.zeros((4, 32, 32, 3), np.uint8), mu=np.zeros(2048),
             sigma=np.eye(2048), mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    cases = [(["--quality-samples", "3"], r"--quality-samples 3: 0 \(no sample quality\) or at least 4"),
             (["--classifier", str(bad["no_reference"])], r"--classifier .*no_reference has no reference.npz"),
             (["--classifier", str(bad["damaged"])], r"--classifier .*damaged: .*reference.npz"),
             (["--classifier", str(bad["inception"])], r"--classifier .*inception: .*holds statistics of inception")]
    outputs = ["--runs-dir", str(tmp_path / "runs"), "--output", str(tmp_path / "out")]
    for argv, named in cases:
        with pytest.raises(UserError, match=named):
            small_scale_study.main(argv + outputs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classifiers"]


@pytest.mark.parametrize("epochs,points,expected", [(8, 4, [1, 3, 5, 7]), (4, 2, [1, 3]), (3, 4, [0, 1, 2]),
                                                    (2, 4, [0, 1]), (1, 4, [0]), (5, 1, [4])])
def test_the_quality_curve_reads_existing_checkpoints_and_always_the_last(epochs, points, expected):
    """A breaker's --epochs 2 with the default 4 points asked sample_c2i_ddp.py for epoch -1 after training."""
    from benchmarks.small_scale_study import curve_epochs
    assert curve_epochs(epochs, points) == expected


@pytest.mark.parametrize("variants, compared_with", [(["dpar", "E2D1"], "dpar"), (["token", "token_E2D1"], "token"),
                                                     (["gpt", "token", "token_rope_2d"], "gpt and token")])
def test_the_study_refuses_options_trained_past_the_curve_they_are_compared_with(tmp_path, variants, compared_with):
    from dpar.errors import UserError
    argv = ["--variants", *variants, "--epochs", "1", "--ablation-epochs", "2", "--quality-samples", "0",
            "--runs-dir", str(tmp_path / "runs"), "--output", str(tmp_path / "out")]
    with pytest.raises(UserError, match=f"--ablation-epochs 2 exceeds --epochs 1: the options are compared with "
                                        f"the curve of {compared_with},"):
        small_scale_study.main(argv)
    assert not list(tmp_path.iterdir())


def test_token_level_options_are_the_patched_options_with_one_token_per_patch():
    variants = small_scale_study.VARIANTS
    for name, (section, config, overrides) in variants.items():
        if name.startswith("token_"):
            assert section == "Token level" and config == variants["token"][1]
            assert overrides[0] == "patcher.mode=token"
    for patched in ("E2D1", "no_pooling_ffn", "inject_every_block", "paper_text", "inject_residual", "residual_rope_2d"):
        assert variants[f"token_{patched}"][2] == ["patcher.mode=token", *variants[patched][2]]
