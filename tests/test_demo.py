"""The embedded demo's pipeline end to end at toy size (python -m dpar.demo --tiny), then sampling from it."""
import json

import numpy as np
from PIL import Image

import sample_c2i
from dpar import demo


def test_tiny_demo_build_then_sample(tmp_path, capsys):
    output = tmp_path / "demo"
    demo.main(["--tiny", "--output", str(output), "--work-dir", str(tmp_path / "work")])
    summary = json.loads((output / "summary.json").read_text())
    assert list(summary["seconds"]) == ["synthetic images", "tokenizer", "tokens", "entropy model", "entropies",
                                        "dpar model", "gpt model", "static model", "dpar samples", "gpt samples"]
    assert summary["static"]["tokens_per_patch"] == 2.0 and summary["gpt"]["tokens_per_patch"] == 1.0
    for name in ("tokenizer", "entropy_model", "dpar", "gpt", "static"):
        assert (output / name / "config.yaml").is_file()
        assert len(list((output / name / "checkpoints").glob("epoch_*/model.safetensors"))) == 1
    assert not list(output.rglob("training_state.pt"))  # weights only: the demo is for sampling
    assert len(list((output / "samples" / "dpar").glob("*_patches.png"))) == 1

    capsys.readouterr()
    sample_c2i.main(["--experiment_dir", str(output / "dpar"), "--output-dir", str(tmp_path / "samples"),
                     "--per-class", "1", "--classes", "0", "1", "2"])
    out = capsys.readouterr().out
    assert "tokens per patch" in out
    grid = np.asarray(Image.open(next((tmp_path / "samples").glob("*[0-9].png"))))
    assert grid.shape == (3 * 66 + 2, 66 + 2, 3)  # three 64 px rows with 2 px gaps
