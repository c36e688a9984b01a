"""Tiny models with random (non-zero) weights, so that every test can actually fail, and tiny data."""
import os
import subprocess
from pathlib import Path

import numpy as np
import torch

from dpar.models.dpar import DPAR, DPARArgs
from dpar.models.gpt import Transformer
from dpar.models.layers import ModelArgs

TINY = dict(dim=32, n_head=2, vocab_size=48, block_size=16, num_classes=5,
            token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)


def randomize(model: torch.nn.Module, std: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """LlamaGen zero-initialises the head, which would make every logit 0 and every comparison pass."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * std)
    return model


def tiny_gpt(**overrides) -> Transformer:
    return randomize(Transformer(ModelArgs(**{**TINY, "n_layer": 2, **overrides}))).eval()


def tiny_dpar(**overrides) -> DPAR:
    config = {**TINY, "n_layer": 2, "n_enc_layer": 1, "n_dec_layer": 2, **overrides}
    return randomize(DPAR(DPARArgs(**config))).eval()


def random_patch_starts(batch: int, num_tokens: int, p: float = 0.4, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, num_tokens, generator=generator) < p
    mask[:, 0] = True
    return mask


def write_image_folder(root, classes: int = 2, per_class: int = 4, size: int = 16, seed: int = 0):
    """Small PNGs of coloured boxes and discs on flat backgrounds, one subfolder per class."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    root = Path(root)
    for label in range(classes):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 256, 3)))
            draw = ImageDraw.Draw(image)
            x0, y0 = (int(v) for v in rng.integers(0, size // 2, 2))
            box = [x0, y0, x0 + size // 3 + int(rng.integers(size // 4)), y0 + size // 3 + int(rng.integers(size // 4))]
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.rectangle if label % 2 == 0 else draw.ellipse)(box, fill=colour)
            image.save(folder / f"{i:03d}.png")
    return root



def write_token_store(path, tokens, labels, *, codebook_size: int, num_classes: int, entropies=None,
                      entropy_checkpoint=None, shard_size: int | None = None) -> Path:
    """A complete token store from arrays (tokens [I, V, N], labels [I], entropies [I, V, N]), no tokenizer.

    The entropies are recorded as coming from ``entropy_checkpoint`` (its sha256), as the entropies stage does.
    """
    import math

    import numpy as np

    from dpar.data import preprocess
    from dpar.data.store import file_sha256, shard_file, write_array

    path = Path(path)
    images, views, num_tokens = tokens.shape
    shard_size = shard_size or images
    grid = math.isqrt(num_tokens)
    job = preprocess.TokenJob(image_size=4 * grid, views=views, crop_range=1.1, grid=grid, codebook_size=codebook_size,
                              tokenizer={"checkpoint": "arrays", "sha256": "0", "downsample": 4},
                              shard_size=shard_size, num_inputs=images, listing_sha256="0",
                              class_names=[f"class_{c}" for c in range(num_classes)])
    meta = preprocess.start_store(path, job)
    shards = range(0, images, shard_size)
    for k, lo in enumerate(shards):
        (path / "shards").mkdir(exist_ok=True)
        shard_file(path, "tokens", k, ".json").write_text(f'{{"images": {len(tokens[lo:lo + shard_size])}, '
                                                          '"skipped": []}')
        write_array(shard_file(path, "labels", k), np.asarray(labels[lo:lo + shard_size], dtype=np.int16))
        write_array(shard_file(path, "tokens", k), np.asarray(tokens[lo:lo + shard_size], dtype=np.uint16))
    meta = preprocess.finish_tokens(path, meta)
    if entropies is not None:
        identity = {"checkpoint": str(entropy_checkpoint), "sha256": file_sha256(entropy_checkpoint),
                    "gpt_model": "GPT-tiny"}
        meta = preprocess.start_entropies(path, meta, identity, overwrite=False)
        for k, lo in enumerate(shards):
            write_array(shard_file(path, "entropies", k), np.asarray(entropies[lo:lo + shard_size], dtype=np.float16))
        preprocess.finish_entropies(path, meta)
    return path


ROOT = Path(__file__).resolve().parents[1]


def without_record(weights: Path) -> Path:
    """Re-save a ``.safetensors`` file without its metadata: weights written before they recorded their model config
    (older runs; LlamaGen's files record none), whose shapes alone say what they fit."""
    from safetensors.torch import load_file, save_file
    save_file(load_file(weights), weights)
    return weights


def demo_checkpoint(run: str) -> Path:
    """The one checkpoint folder the embedded demo ships for ``run`` (tokenizer, entropy_model, dpar, gpt, static):
    ``assets/demo/<run>/checkpoints/epoch_*`` (its epoch changes when the demo is rebuilt longer)."""
    (folder,) = (ROOT / "assets" / "demo" / run / "checkpoints").glob("epoch_*")
    return folder


def run_script(args: list[str], cwd: Path = ROOT, **env):
    """Start a script, from the repository root unless ``cwd`` says otherwise. One thread per process: CPU
    matmul results can depend on the thread count, and runs that are compared must compute alike."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}
    return subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc) -> str:
    """Wait for a :func:`run_script` process; its stdout, or a failure showing its stderr."""
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    return out


def labelled_grid(picture: np.ndarray, rows: int, columns: int, cell: int, pad: int = 2) -> np.ndarray:
    """The image grid inside a ``sample_c2i.py`` picture, checking the label margin on its left: white, with
    text (dark pixels) beside every row."""
    grid_width = columns * (cell + pad) + pad
    assert picture.shape[0] == rows * (cell + pad) + pad and picture.shape[1] > grid_width
    margin = picture[:, :picture.shape[1] - grid_width].min(axis=2)
    for row in range(rows):
        assert (margin[pad + row * (cell + pad):(row + 1) * (cell + pad)] < 100).any(), f"row {row} has no label"
    return picture[:, -grid_width:]
