"""What a tokenizer keeps (evaluations.reconstruction): PSNR against its definition, the reconstructions as an
ADM batch the evaluator reads (labels kept), and the one-line refusals before anything is written."""
import subprocess
import sys

import numpy as np
import pytest

from evaluations import reconstruction
from tests.helpers import ROOT

DEMO_TOKENIZER = sorted((ROOT / "assets" / "demo" / "tokenizer" / "checkpoints").glob("*/model.safetensors"))[-1]


def test_psnr_follows_its_definition():
    a = np.zeros((3, 4, 4, 3), np.uint8)
    b = a.copy()
    b[1] += 1                         # MSE 1 -> 10 log10(255^2)
    b[2, 0, 0, 0] = 255               # MSE 255^2 / 48 -> 10 log10(48)
    got = reconstruction.psnr(a, b)
    assert got[0] == reconstruction.PSNR_CAP
    assert got[1] == pytest.approx(20 * np.log10(255))
    assert got[2] == pytest.approx(10 * np.log10(48))


def write_batch(path, images, labels=None):
    np.savez(path, images, *([] if labels is None else [labels]))
    return path


def demo_images(count, seed=9):
    from dpar.data.synthetic import synthetic_image
    from dpar import demo
    pairs = [synthetic_image(i, demo.image_size(), seed) for i in range(count)]
    return np.stack([p[0] for p in pairs]), np.array([p[1] for p in pairs], dtype=np.int64)


def test_reconstructions_are_an_adm_batch_with_the_labels_and_the_reported_psnr(tmp_path, capsys):
    images, labels = demo_images(20)
    ref = write_batch(tmp_path / "ref.npz", images, labels)
    out, summary = tmp_path / "rec.npz", tmp_path / "rec.json"
    reconstruction.main(["--vq-ckpt", str(DEMO_TOKENIZER), str(ref), str(out), "--json", str(summary),
                         "--batch-size", "7"])
    with np.load(out) as data:
        rebuilt, kept = data["arr_0"], data["arr_1"]
    assert rebuilt.shape == images.shape and rebuilt.dtype == np.uint8
    assert (kept == labels).all()
    assert not (rebuilt == images).all()  # a lossy tokenizer: the output is not the input copied
    import json
    record = json.loads(summary.read_text())
    mse = ((rebuilt.astype(float) - images.astype(float)) ** 2).reshape(20, -1).mean(1)
    assert record["psnr_db"] == pytest.approx(np.mean(10 * np.log10(255 ** 2 / mse)), rel=1e-9)
    assert 1 <= record["codes_used"] <= record["codebook_size"]
    assert "no LPIPS" in capsys.readouterr().out


def run(*args):
    return subprocess.run([sys.executable, "-m", "evaluations.reconstruction", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True)


@pytest.mark.parametrize("case", ["exists", "odd_size", "vgg_alone", "no_arr_0", "json_is_the_reference",
                                  "json_is_the_output", "json_exists", "labels_short"])
def test_bad_inputs_are_one_line_before_any_output(tmp_path, case):
    """Each refused in one line with every file as it was; the --json and label cases overwrote the reference or
    the output, or wrote a batch whose labels did not fit its images (a breaker's findings)."""
    images, labels = demo_images(2)
    ref, out = write_batch(tmp_path / "ref.npz", images), tmp_path / "rec.npz"
    flags = ["--vq-ckpt", DEMO_TOKENIZER]
    expected = {"exists": "the output", "odd_size": "multiple of its downsampling", "vgg_alone": "--lpips-weights",
                "no_arr_0": "no 'arr_0'", "json_is_the_reference": "--json", "json_is_the_output": "--json",
                "json_exists": "--json", "labels_short": "arr_1 must hold one integer label per image (2)"}[case]
    if case in ("exists", "json_exists"):
        (out if case == "exists" else tmp_path / "keep.json").write_bytes(b"keep")
        flags += ["--json", tmp_path / "keep.json"] if case == "json_exists" else []
    elif case == "odd_size":
        write_batch(ref, np.zeros((2, 30, 30, 3), np.uint8))
    elif case == "vgg_alone":
        flags += ["--vgg16-weights", tmp_path / "vgg.pth"]
    elif case == "no_arr_0":
        np.savez(ref, images=images)
    elif case == "labels_short":
        write_batch(ref, images, labels[:1])
    else:
        flags += ["--json", ref if case == "json_is_the_reference" else out]
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    result = run(ref, out, *flags)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and expected in result.stderr, result.stderr
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
