"""Output paths (issue 30, item 6): a link that leads nowhere, a file another user owns in a sticky folder, two
writers of one file, a linked ``.parts`` folder, a full disk and Ctrl-C each end in one line and lose nothing;
and one line under a launcher (item 10): printed once, and named by torchrun as the root cause."""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import preprocess_tokens
import sample_c2i
import sample_c2i_ddp
import train_entropy_model
import train_global_model
from dpar import demo, patchmap
from dpar.data import synthetic
from dpar.errors import UserError, run_main
from dpar.fileio import atomic_write_text, check_output_dir, check_output_file
from evaluations import linear_probe
from evaluations.c2i import evaluator
from sample_c2i_ddp import SampleChunks
from tests.helpers import ROOT, demo_checkpoint, write_image_folder

DEMO = ROOT / "assets" / "demo"
VQ = demo_checkpoint("tokenizer") / "model.safetensors"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

# a process that holds a write of argv[1] open (through atomic_path) until it reads a line
WRITER = ("import sys\nfrom dpar.fileio import atomic_path\n"
          "with atomic_path(sys.argv[1]) as tmp:\n"
          "    tmp.write_text('first')\n"
          "    print('writing', flush=True)\n"
          "    sys.stdin.readline()\n")


def interruptible(then=None):
    """A child's ``preexec_fn``: Ctrl-C (SIGINT) as a terminal delivers it, then ``then``. A shell starts background
    jobs (``nohup pytest ... &``) with SIGINT ignored, children inherit that, and Python then installs no handler."""
    def setup() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if then is not None:
            then()
    return setup


def python(code: str, *args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, env=ENV, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=interruptible(kwargs.pop("preexec_fn", None)), **kwargs)


class Writing:
    """Another process in the middle of writing ``path`` (``with Writing(path):``)."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.process = python(WRITER, self.path)
        assert self.process.stdout.readline() == "writing\n", self.process.communicate()[1]
        return self

    def finish(self) -> int:
        out, err = self.process.communicate("\n", timeout=60)
        assert self.process.returncode == 0, err
        return self.process.returncode

    def __exit__(self, *exc):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*.tmp"))


# -- links that lead nowhere -----------------------------------------------------------------------------------

@pytest.fixture(params=["dangling", "loop"])
def broken_link(request, tmp_path):
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "missing" if request.param == "dangling" else link)
    return link, "which does not exist" if request.param == "dangling" else "a loop of links"


def test_a_link_that_leads_nowhere_is_refused_as_an_output_folder_or_file(broken_link):
    link, leads = broken_link
    for check, path in ((check_output_dir, link), (check_output_dir, link / "sub"),
                        (check_output_file, link), (check_output_file, link / "x.json")):
        with pytest.raises(UserError, match=f"^--out {path}: {link} is a symbolic link to .*, {leads}"):
            check(path, "--out")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    Image.new("RGB", (32, 32), (200, 10, 10)).save(root / "img.png")
    write_image_folder(root / "images", classes=2, per_class=2, size=32)
    return root


def _tiny_trainer(config: str):
    return lambda out, inputs: ["--config", str(ROOT / "configs" / "tiny" / config), "--data.store",
                                str(DEMO / "tokens"), "--train.results_dir", str(out), "--train.epochs", "1"]


# the nine commands whose output folder was a dangling link: FileExistsError after the work (issue 30, item 6)
COMMANDS = {
    "sample_c2i": (sample_c2i.main, lambda out, inputs: ["--output-dir", str(out), "--per-class", "1",
                                                         "--classes", "0"]),
    "sample_c2i_ddp": (sample_c2i_ddp.main, lambda out, inputs: ["--output-dir", str(out), "--num-fid-samples", "2",
                                                                 "--per-proc-batch-size", "2"]),
    "patchmap": (patchmap.main, lambda out, inputs: [str(inputs / "img.png"), "--experiment_dir", str(DEMO / "dpar"),
                                                     "--output-dir", str(out)]),
    "preprocess_tokens": (preprocess_tokens.main, lambda out, inputs: [
        "--stage", "tokens", "--data-path", str(inputs / "images"), "--store", str(out), "--vq-ckpt", str(VQ),
        "--image-size", "32", "--num-workers", "0"]),
    "synthetic": (synthetic.main, lambda out, inputs: ["--output", str(out), "--num-images", "2",
                                                       "--image-size", "32"]),
    "train_entropy_model": (train_entropy_model.main, _tiny_trainer("entropy_model.yaml")),
    "train_global_model": (train_global_model.main, _tiny_trainer("gpt_baseline.yaml")),
    "demo": (demo.main, lambda out, inputs: ["--tiny", "--output", str(out), "--work-dir", str(out.parent / "work")]),
    "linear_probe": (linear_probe.main, lambda out, inputs: [
        "--experiment_dir", str(DEMO / "dpar"), "--store", str(DEMO / "tokens"), "--output", str(out / "probe.json")]),
}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_refuses_a_dangling_link_as_output_before_its_work(command, inputs, tmp_path):
    main, argv = COMMANDS[command]
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "missing")
    with pytest.raises(UserError, match=f"{link} is a symbolic link to {tmp_path / 'missing'}, which does not exist"):
        main(argv(link, inputs))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# -- an existing output this user may not replace --------------------------------------------------------------

def test_an_output_another_user_owns_in_a_sticky_folder_is_refused_up_front(tmp_path, monkeypatch):
    """os.replace onto it fails with PermissionError after the work (sticky folders such as /tmp: only the
    file's owner, the folder's owner or root may replace it). Tested as another user, through os.geteuid."""
    folder = tmp_path / "shared"
    folder.mkdir()
    folder.chmod(0o1777)
    (folder / "x.json").write_text("theirs")
    (folder / "x.parts").mkdir()
    owner = (folder / "x.json").stat().st_uid
    monkeypatch.setattr(os, "geteuid", lambda: owner + 4242)
    with pytest.raises(UserError, match=f"^--output {folder / 'x.json'} exists and belongs to another user \\(uid "
                                        f"{owner}\\) in {folder}, a sticky folder"):
        check_output_file(folder / "x.json", "--output")
    with pytest.raises(UserError, match="belongs to another user"):  # a folder the command removes when done
        check_output_dir(folder / "x.parts", "the samples' parts folder", removed=True)
    check_output_file(folder / "new.json", "--output")  # a new file there is this user's to write
    folder.chmod(0o777)
    check_output_file(folder / "x.json", "--output")  # not sticky: whoever may write the folder may replace it
    monkeypatch.setattr(os, "geteuid", lambda: owner)
    folder.chmod(0o1777)
    check_output_file(folder / "x.json", "--output")  # its owner may


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to own a file that another user then meets")
def test_the_sticky_rule_is_the_kernels():
    """The rule above, against the kernel: as another user (a forked child), os.replace onto root's file in a
    sticky folder fails and check_output_file refuses it; onto that user's own file both go ahead."""
    folder = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        folder.chmod(0o1777)
        (folder / "roots.json").write_text("root's")
        (folder / "theirs.json").write_text("nobody's")
        os.chown(folder / "theirs.json", 65534, 65534)
        read, write = os.pipe()
        child = os.fork()
        if child == 0:  # as user 65534: check, then try the rename the write would do
            lines = []
            try:
                os.setgid(65534)
                os.setuid(65534)
                for name in ("roots.json", "theirs.json"):
                    try:
                        check_output_file(folder / name, "--output")
                        check = "passes"
                    except UserError:
                        check = "refuses"
                    (folder / f"new-{name}").write_text("new")
                    try:
                        os.replace(folder / f"new-{name}", folder / name)
                        kernel = "replaces"
                    except PermissionError:
                        kernel = "refuses"
                    lines.append(f"{name} {check} {kernel}")
            finally:
                os.write(write, "\n".join(lines).encode())
                os._exit(0)
        os.close(write)
        with os.fdopen(read) as pipe:
            lines = pipe.read().splitlines()
        os.waitpid(child, 0)
        assert lines == ["roots.json refuses refuses", "theirs.json passes replaces"]
    finally:
        shutil.rmtree(folder)


# -- two writers of one file -----------------------------------------------------------------------------------

def test_a_second_writer_of_one_file_is_refused_and_the_first_one_finishes(tmp_path):
    out = tmp_path / "result.json"
    with Writing(out) as first:
        with pytest.raises(UserError, match=f"^another process is writing {out}; wait for it"):
            atomic_write_text(out, "second")
        atomic_write_text(tmp_path / "other.json", "x")  # another file of the same folder: allowed
        atomic_write_text(tmp_path / "result", "y")  # a name the first one's temporary starts with: allowed
        first.finish()
    assert out.read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.json", "result", "result.json"]


def test_a_dead_writers_temporary_is_removed_by_the_next_write(tmp_path):
    out = tmp_path / "result.json"
    with Writing(out) as first:
        first.process.kill()
        first.process.wait()
    assert len(temporaries(tmp_path)) == 1  # what the killed write left
    atomic_write_text(out, "second")
    assert out.read_text() == "second" and temporaries(tmp_path) == []


def test_a_finished_store_removes_the_temporaries_of_dead_writers_only(tmp_path):
    """The token store's clean-up at the end of a stage took every temporary for stale, a live writer's too."""
    from dpar.data import preprocess

    shards = tmp_path / preprocess.SHARDS
    shards.mkdir()
    dead = shards / ".tokens_00001.npy.abcd1234.tmp"
    dead.write_text("half")
    with Writing(shards / "tokens_00000.npy") as live:
        preprocess._remove_stale_temporaries(tmp_path)
        assert not dead.exists()
        live.finish()
    assert (shards / "tokens_00000.npy").read_text() == "first"


@pytest.mark.parametrize("ending", ["returns", "raises", "exits"])
def test_a_claim_that_is_never_written_leaves_no_temporary(tmp_path, ending):
    code = ("import sys\nfrom dpar.fileio import claim_output\n"
            "claim_output(sys.argv[1], '--output')\n"
            "print('claimed', flush=True)\n"
            + {"returns": "", "raises": "raise ValueError('x')\n", "exits": "sys.exit(2)\n"}[ending])
    process = python(code, tmp_path / "out" / "result.json")
    out, err = process.communicate(timeout=60)
    assert out == "claimed\n", err
    assert list((tmp_path / "out").iterdir()) == []


def test_a_claim_is_written_through_and_ends_with_its_block(tmp_path):
    from dpar.fileio import claim_output
    from dpar.visual import save_png

    with claim_output(tmp_path / "a.png", "the grid") as claim:
        assert claim_output(tmp_path / "a.png") is claim  # this process's own claim: taken as it is
        save_png(np.zeros((2, 2, 3), np.uint8), tmp_path / "a.png")  # writes through it
        assert not claim.held
    with claim_output(tmp_path / "b.png"):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


def _refuse_work(*args, **kwargs):
    raise AssertionError("the work started although another process writes the output")


def _patchmap(tmp_path, inputs, monkeypatch):
    monkeypatch.setattr(patchmap, "next_token_entropies", _refuse_work)
    out = tmp_path / "maps"
    return out / "img_patches.png", lambda: patchmap.main([str(inputs / "img.png"), "--experiment_dir",
                                                           str(DEMO / "dpar"), "--output-dir", str(out)])


def _linear_probe(tmp_path, inputs, monkeypatch):
    monkeypatch.setattr(linear_probe, "features", _refuse_work)
    out = tmp_path / "probe.json"
    return out, lambda: linear_probe.main(["--experiment_dir", str(DEMO / "dpar"), "--store", str(DEMO / "tokens"),
                                           "--output", str(out)])


def _sample_c2i(tmp_path, inputs, monkeypatch):
    out = tmp_path / "samples"
    argv = ["--output-dir", str(out), "--per-class", "1", "--classes", "0"]
    sample_c2i.main(argv)  # once, to learn the grid's name
    grid = next(path for path in out.glob("*.png") if not path.stem.endswith("_patches"))
    for path in out.iterdir():
        path.unlink()
    monkeypatch.setattr("dpar.runs.Sampler.sample", _refuse_work)
    return grid, lambda: sample_c2i.main(argv)


def _evaluator(tmp_path, inputs, monkeypatch):
    for name in ("ref", "sample"):
        np.savez(tmp_path / f"{name}.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    monkeypatch.setattr(evaluator.FIDInceptionV3, "from_file", lambda path: None)
    monkeypatch.setattr(evaluator, "file_sha256", lambda path: "0")
    monkeypatch.setattr(evaluator, "batch_features", _refuse_work)
    return tmp_path / "sample.txt", lambda: evaluator.main([str(tmp_path / "ref.npz"), str(tmp_path / "sample.npz"),
                                                            "--inception-weights", str(tmp_path / "w.pth")])


@pytest.mark.parametrize("command", [_patchmap, _linear_probe, _sample_c2i, _evaluator])
def test_a_command_whose_output_another_process_writes_stops_before_its_work(command, inputs, tmp_path, monkeypatch):
    """sample_c2i, dpar.patchmap, linear_probe and the evaluator's report claim their outputs once their inputs
    are checked: a second run on the same output is refused before it computes anything."""
    output, run = command(tmp_path, inputs, monkeypatch)
    output.parent.mkdir(parents=True, exist_ok=True)
    with Writing(output) as first:
        with pytest.raises(UserError, match=f"another process is writing {output}"):
            run()
        first.finish()
    assert output.read_text() == "first" and temporaries(tmp_path) == []


def test_a_feature_cache_another_evaluation_writes_is_skipped_with_a_warning(tmp_path, monkeypatch):
    np.savez(tmp_path / "ref.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    features = evaluator.BatchFeatures(*(np.zeros(1),) * 6)
    monkeypatch.setattr(evaluator, "compute_features", lambda *args: features)
    with Writing(tmp_path / "ref.npz.inception.npz") as first:
        with pytest.warns(UserWarning, match="another process is writing it"):
            got = evaluator.batch_features(evaluator.ImageBatch(tmp_path / "ref.npz", 2), lambda: None, "w", 2, "cpu")
        assert got is features
        first.finish()


def test_a_sampling_run_claims_its_npz_before_sampling(tmp_path):
    npz = tmp_path / "s.npz"
    with Writing(npz) as first:
        with pytest.raises(UserError, match=f"another process is writing {npz}"):
            SampleChunks(npz, 2, 1, {"seed": 0}).start(main_process=True)
        first.finish()


# -- a linked .parts folder ------------------------------------------------------------------------------------

def test_a_parts_folder_that_is_a_link_is_refused_before_sampling(tmp_path):
    """It was written into, the .npz packed, then shutil.rmtree raised on the link and the chunks stayed."""
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "s.parts").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UserError, match=f"the samples' parts folder {tmp_path / 's.parts'} is a symbolic link"):
        SampleChunks(tmp_path / "s.npz", 2, 1, {"seed": 0}).finished()
    assert list((tmp_path / "elsewhere").iterdir()) == [] and not (tmp_path / "s.npz").exists()


# -- a full disk -----------------------------------------------------------------------------------------------

WRITE = ("import sys, numpy as np\nfrom dpar.errors import run_main\nfrom dpar.fileio import atomic_path\n"
         "def main():\n"
         "    out, how = sys.argv[1:]\n"
         "    if how == 'numpy':  # numpy's tofile: an OSError without errno\n"
         "        with atomic_path(out) as tmp, open(tmp, 'wb') as f:\n"
         "            np.save(f, np.zeros(100_000, np.uint8))\n"
         "    elif how == 'npz':\n"
         "        with atomic_path(out) as tmp, open(tmp, 'wb') as f:\n"
         "            np.savez(f, arr_0=np.random.default_rng(0).integers(0, 256, 100_000, dtype=np.uint8))\n"
         "    elif how == 'png':  # Pillow (dpar.visual imports torch: a slow start)\n"
         "        from PIL import Image\n"
         "        with atomic_path(out) as tmp:\n"
         "            noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)\n"
         "            Image.fromarray(noise).save(tmp, format='PNG')\n"
         "    else:\n"
         "        with atomic_path(out) as tmp:\n"
         "            tmp.write_text('x' * 100_000)\n"
         "run_main(main)\n")


def _file_size_limit(size: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


@pytest.mark.parametrize("how", ["numpy", "npz", "png", "text"])
def test_a_write_that_finds_no_room_is_one_line_and_keeps_the_old_file(tmp_path, how):
    """A file size limit (EFBIG, what the issue hit; a full disk, ENOSPC, takes the same path): exit status 1,
    ``error: writing <file>: <reason>``, the file as it was, no temporary."""
    out = tmp_path / f"out.{how}"
    out.write_text("old")
    process = python(WRITE, out, how, preexec_fn=_file_size_limit(4096))
    _, err = process.communicate(timeout=60)
    assert (process.returncode, err) == (1, f"error: writing {out}: File too large\n")
    assert out.read_text() == "old" and temporaries(tmp_path) == []


def test_run_main_names_a_write_error_once_and_exits_1(capsys):
    def full(errno_code):
        def main():
            raise OSError(errno_code, os.strerror(errno_code), "samples/x.png")
        return main

    import errno

    for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG):
        with pytest.raises(SystemExit) as exit_:
            run_main(full(code))
        assert exit_.value.code == 1
        assert capsys.readouterr().err == f"error: writing samples/x.png: {os.strerror(code)}\n"
    with pytest.raises(PermissionError):  # not a lack of room: a bug to see whole
        run_main(full(errno.EACCES))


# -- Ctrl-C ----------------------------------------------------------------------------------------------------

def test_ctrl_c_is_one_line_and_exit_status_130(tmp_path):
    code = ("import time\nfrom dpar.errors import run_main\n"
            "def main():\n    print('working', flush=True)\n    time.sleep(60)\n"
            "run_main(main)\n")
    process = python(code)
    assert process.stdout.readline() == "working\n"
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert err.startswith("interrupted; ") and err.count("\n") == 1 and "Traceback" not in err


# -- the commands, end to end ----------------------------------------------------------------------------------

def _run(argv, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *map(str, argv)], cwd=ROOT, env={**ENV, "PYTHONDONTWRITEBYTECODE": "1"},
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=interruptible(kwargs.pop("preexec_fn", None)), **kwargs)


@pytest.mark.slow
def test_ctrl_c_and_a_full_disk_while_sampling_keep_the_chunks_and_the_rerun_finishes(tmp_path):
    """sample_c2i_ddp.py: Ctrl-C after its first chunk, then a file size limit under which the next chunk
    cannot be written; each ends in one line, no temporary is left, and the same command then finishes."""
    argv = ["sample_c2i_ddp.py", "--num-fid-samples", "80", "--per-proc-batch-size", "4", "--output-dir", tmp_path]
    process = _run(argv)
    for _ in range(1200):
        if list(tmp_path.glob("*.parts/chunk_*.npy")) or process.poll() is not None:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert err.splitlines()[-1] == ("interrupted; the chunks sampled so far are kept: rerun the same command to "
                                    "continue")
    assert "Traceback" not in err and temporaries(tmp_path) == []
    kept = sorted(tmp_path.glob("*.parts/chunk_*.npy"))
    assert kept

    chunk_size = kept[0].stat().st_size
    process = _run(argv, preexec_fn=_file_size_limit(chunk_size // 2))
    _, err = process.communicate(timeout=300)
    assert process.returncode == 1, err
    assert "Traceback" not in err and temporaries(tmp_path) == []
    last = err.splitlines()[-1]
    assert last.startswith(f"error: writing {kept[0].parent}/chunk_") and last.endswith(": File too large")
    assert sorted(tmp_path.glob("*.parts/chunk_*.npy")) == kept

    process = _run(argv)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    npz = next(tmp_path.glob("*.npz"))
    assert f"80 samples -> {npz}" in out and np.load(npz)["arr_0"].shape[0] == 80
    assert sorted(p.name for p in tmp_path.iterdir()) == [npz.name]


# -- one line under a launcher ---------------------------------------------------------------------------------

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _torchrun(argv) -> subprocess.CompletedProcess:
    return subprocess.run([*TORCHRUN, *map(str, argv)], cwd=ROOT, text=True, capture_output=True, timeout=300,
                          env={**ENV, "ACCELERATE_USE_CPU": "1"})


@pytest.mark.slow
def test_under_torchrun_a_bad_flag_is_printed_once_and_named_as_the_root_cause(tmp_path):
    """Both processes refuse the flag; the line is printed once (by rank 0), and torchrun's failure table,
    which it prints in any case, names it as the root cause instead of 'To enable traceback see ...'."""
    done = _torchrun(["sample_c2i_ddp.py", "--cfg-scale", "-1", "--output-dir", tmp_path / "out"])
    line = "error: argument --cfg-scale: must be >= 0; got '-1' (see sample_c2i_ddp.py --help)"
    lines = (done.stdout + done.stderr).splitlines()
    assert done.returncode != 0 and lines.count(line) == 1, done.stderr
    root_cause = done.stderr[done.stderr.index("Root Cause"):]
    assert f"traceback : {line}" in root_cause and "To enable traceback" not in root_cause
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_under_torchrun_an_error_of_one_rank_alone_is_not_lost(tmp_path):
    code = tmp_path / "one_rank.py"
    code.write_text("import os, time\nfrom dpar.errors import UserError, run_main\n"
                    "def main():\n"
                    "    if os.environ['RANK'] == '1':\n"
                    "        raise UserError('only rank 1 fails')\n"
                    "    time.sleep(60)\n"
                    "run_main(main)\n")
    done = _torchrun([code])
    lines = (done.stdout + done.stderr).splitlines()
    assert done.returncode != 0 and lines.count("error: only rank 1 fails") == 1, done.stderr
    root_cause = done.stderr[done.stderr.index("Root Cause"):]
    assert "rank      : 1" in root_cause and "traceback : error: only rank 1 fails" in root_cause


def test_the_launcher_reads_the_line_as_its_root_cause(tmp_path, monkeypatch, capsys):
    """Rank 0 of a launch prints the line and writes it where torchrun looks (TORCHELASTIC_ERROR_FILE), read
    back here with torchrun's own reader."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")

    def main():
        raise UserError("--cfg-scale -1: must be >= 0")

    with pytest.raises(SystemExit) as exit_:
        run_main(main)
    assert exit_.value.code == 2 and capsys.readouterr().err == "error: --cfg-scale -1: must be >= 0\n"
    failure = ProcessFailure(local_rank=0, pid=1, exitcode=2, error_file=str(error_file))
    assert failure.message["message"] == "error: --cfg-scale -1: must be >= 0"
    assert abs(failure.timestamp - time.time()) < 60
    json.loads(error_file.read_text())


CHECKPOINT = ("import sys, torch\nfrom dpar import experiment\nfrom dpar.errors import run_main\n"
              "run_main(lambda: experiment.save_checkpoint(sys.argv[1], 3, {'w': torch.ones(50_000)},\n"
              "                                            {'optimizer': torch.ones(100_000)}, step=30))\n")


@pytest.mark.slow  # starts torch in a subprocess (2 s)
@pytest.mark.parametrize("fails", ["model.safetensors", "training_state.pt"])
def test_a_checkpoint_that_finds_no_room_is_one_line_and_leaves_no_half_checkpoint(tmp_path, fails):
    """safetensors names the errno in its text, torch.save loses it (found by the probe); the staging folder
    goes, and the run's previous checkpoint stays the one to resume from."""
    import torch

    from dpar import experiment

    experiment.save_checkpoint(tmp_path, 2, {"w": torch.ones(1)}, {"optimizer": torch.ones(1)}, step=20)
    process = python(CHECKPOINT, tmp_path, preexec_fn=_file_size_limit(100_000 if fails == "model.safetensors"
                                                                       else 300_000))
    _, err = process.communicate(timeout=60)
    assert (process.returncode, err) == (1, f"error: writing {experiment.checkpoint_dir(tmp_path, 3) / fails}: "
                                            "File too large\n")
    assert [path.name for path in (tmp_path / "checkpoints").iterdir()] == ["epoch_00000002"]
    assert experiment.checkpoint_step(experiment.resume_checkpoint(tmp_path)) == 20
