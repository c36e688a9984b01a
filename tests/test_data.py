"""Data pipeline: synthetic images -> token store -> entropies -> dataset -> packed batch -> DPAR."""
import filecmp
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import preprocess_tokens
from dpar.data import preprocess
from dpar.data.dataset import PackedCollate, TokenDataset
from tokenizer.images import list_images
from dpar.data.stats import main as stats_main
from dpar.data.stats import store_patch_stats
from dpar.data.store import ENTROPY_DTYPE, TokenStore, entropy_problem
from dpar.data.synthetic import CLASSES, class_folder, synthetic_image, write_image_folder
from dpar.errors import UserError
from dpar.experiment import save_checkpoint
from dpar.models.layers import LabelEmbedder
from dpar.models import ModelConfig, create_model
from dpar.patcher import PatcherConfig
from tests.helpers import randomize
from tokenizer.transforms import image_views, open_rgb
from tokenizer.vq_model import VQConfig, create_vq

SIZE, GRID, CODES = 32, 8, 64
TINY_VQ = VQConfig(vq_model="VQ-16", codebook_size=CODES, codebook_embed_dim=4, ch=16, ch_mult=[1, 2, 2],
                   z_channels=16, num_res_blocks=1, norm_groups=8)


def experiment(root: Path, model, section) -> Path:
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(OmegaConf.to_yaml({"model": asdict(section)}))
    return save_checkpoint(root, 0, model.state_dict()) / "model.safetensors"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    images = write_image_folder(root / "images", num_images=24, image_size=40)
    torch.manual_seed(0)
    vq_ckpt = experiment(root / "vq_run", create_vq(TINY_VQ), TINY_VQ)
    entropy_config = ModelConfig(gpt_model="GPT-tiny", model_type="uncond", image_size=SIZE, downsample_size=4,
                                 vocab_size=CODES, num_classes=len(CLASSES))
    entropy_model = randomize(create_model(entropy_config), std=0.2)
    entropy_ckpt = experiment(root / "entropy_run", entropy_model, entropy_config)
    return root, images, vq_ckpt, entropy_ckpt


def tokens_args(setup, store, *extra):
    _, images, vq_ckpt, _ = setup
    return ["--stage", "tokens", "--data-path", str(images), "--store", str(store), "--vq-ckpt", str(vq_ckpt),
            "--image-size", str(SIZE), "--views", "2", "--shard-size", "10", "--num-workers", "0",
            "--batch-size", "4", *extra]


def entropy_args(setup, store, *extra):
    return ["--stage", "entropies", "--store", str(store), "--entropy-model-checkpoint", str(setup[3]),
            "--batch-size", "8", *extra]


@pytest.fixture(scope="module")
def store(setup):
    path = setup[0] / "store"
    preprocess_tokens.main(tokens_args(setup, path))
    preprocess_tokens.main(entropy_args(setup, path))
    return TokenStore(path)


def test_synthetic_images_are_deterministic_and_have_flat_and_sharp_parts():
    assert len(CLASSES) >= 10
    for index in range(len(CLASSES)):
        image, label = synthetic_image(index, 64, seed=3)
        assert label == index % len(CLASSES) and image.shape == (64, 64, 3) and image.dtype == np.uint8
        assert np.array_equal(image, synthetic_image(index, 64, seed=3)[0])
        assert not np.array_equal(image, synthetic_image(index, 64, seed=4)[0])
        steps = np.abs(np.diff(image.astype(int), axis=1)).sum(-1)
        assert (steps <= 8).mean() > 0.5, CLASSES[label]  # mostly flat or gently varying
        if CLASSES[label] != "gradient":
            assert steps.max() > 100, CLASSES[label]  # and a sharp edge somewhere
    assert synthetic_image(5, 200)[0].shape == (200, 200, 3)


def test_synthetic_folder_is_an_image_folder(setup):
    paths, labels, classes = list_images(setup[1])
    assert classes == [class_folder(i) for i in range(len(CLASSES))] and len(paths) == 24
    for path, label in zip(paths, labels):
        assert int(path.stem) % len(CLASSES) == label


def test_store_holds_the_tokenizers_codes_and_the_models_entropies(setup, store):
    _, images, vq_ckpt, entropy_ckpt = setup
    assert len(store) == 24 and store.views == 2 and store.grid == GRID and store.codebook_size == CODES
    assert store.meta["tokens"]["skipped"] == 0 and store.meta["tokenizer"]["checkpoint"] == str(vq_ckpt)
    paths, labels, _ = list_images(images)
    from tokenizer.vq_model import load_vq
    vq = load_vq(vq_ckpt)
    for index in (0, 13, 23):
        views = torch.from_numpy(image_views(open_rgb(paths[index]), SIZE, 2))
        assert np.array_equal(store.tokens(index), vq.images_to_codes(views).numpy())
        assert store.labels[index] == labels[index]
    from dpar.runs import load_trained_model
    model, _ = load_trained_model(entropy_ckpt)
    tokens = torch.from_numpy(store.tokens(7).astype(np.int64))
    expected = preprocess.next_token_entropies(model, tokens).numpy().astype(np.float16)
    assert np.array_equal(store.entropies(7), expected)
    assert np.isinf(store.entropies(7)[:, 0]).all()
    finite = store.entropies(7)[:, 1:].astype(np.float32)
    assert (finite >= 0).all() and (finite <= math.log(CODES) + 1e-2).all() and finite.std() > 0


def test_entropies_are_the_entropy_of_the_softmax():
    logits = torch.randn(2, 5, 7)

    class Fixed(torch.nn.Module):
        cls_embedding = LabelEmbedder(0, 4, 0.0, with_null=True)  # an unconditional model's start row

        def forward(self, idx, cond):
            return logits, None

    probs = logits.softmax(-1)
    expected = -(probs * probs.log()).sum(-1)
    got = preprocess.next_token_entropies(Fixed(), torch.zeros(2, 6, dtype=torch.long))
    assert torch.isinf(got[:, 0]).all() and torch.allclose(got[:, 1:], expected[:, 1:], atol=1e-5)


@pytest.mark.parametrize("values,problem", [
    ([np.inf, 0.0, -0.0, 7.8, 65504], None),                   # the store's +inf at token 0; 0, -0 and the largest
    ([1.5, 2.0, 3.0], None),                                   # a finite first entropy is no damage either
    ([np.inf, 1.0, np.nan], "entropy nan at token 2"),
    ([np.inf, np.inf, 1.0], "entropy inf at token 1"),         # +inf only at the first token
    ([-np.inf, 1.0, 1.0], "entropy -inf at token 0"),
    ([np.nan, 1.0, 1.0], "entropy nan at token 0"),
    ([np.inf, 1.0, -0.5], "entropy -0.5 at token 2"),
    ([[[np.inf, 1.0], [np.inf, -2.0]]], "entropy -2.0 at image 0, view 1, token 1"),
])
def test_entropies_are_finite_and_not_negative_but_the_first_tokens_mark(values, problem):
    assert entropy_problem(np.array(values, dtype=ENTROPY_DTYPE)) == problem


def test_interrupted_runs_resume_byte_identical(setup, store, monkeypatch):
    path = setup[0] / "resumed"
    real_tokenize = preprocess.tokenize_shards

    def crash_after(calls: int):
        def tokenize(store, job, paths, labels, encode, **kwargs):
            count = {"n": 0}

            def flaky(pixels):
                count["n"] += 1
                if count["n"] > calls:
                    raise KeyboardInterrupt  # a kill in the middle of a shard
                return encode(pixels)
            return real_tokenize(store, job, paths, labels, flaky, **kwargs)
        return tokenize

    monkeypatch.setattr(preprocess_tokens, "tokenize_shards", crash_after(4))
    with pytest.raises(KeyboardInterrupt):
        preprocess_tokens.main(tokens_args(setup, path))
    monkeypatch.undo()
    done = sorted(p.name for p in (path / "shards").iterdir())
    assert "tokens_00000.npy" in done and "tokens_00001.npy" not in done
    (path / "shards" / ".tokens_00001.npy.abc.tmp").write_bytes(b"half")  # what SIGKILL would leave
    with pytest.raises(UserError, match="incomplete"):
        TokenStore(path)
    preprocess_tokens.main(tokens_args(setup, path))
    preprocess_tokens.main(entropy_args(setup, path))
    comparison = filecmp.dircmp(store.path / "shards", path / "shards")
    assert not comparison.left_only and not comparison.right_only and not comparison.diff_files
    assert filecmp.cmp(store.path / "meta.json", path / "meta.json", shallow=False)


def test_corrupt_images_are_skipped_and_counted(setup, tmp_path):
    images = write_image_folder(tmp_path / "images", num_images=12, image_size=40)
    bad = images / class_folder(3) / "000003.png"
    bad.write_bytes(b"\x89PNG broken")
    args = tokens_args(setup, tmp_path / "store")
    args[args.index("--data-path") + 1] = str(images)
    preprocess_tokens.main(args)
    store = TokenStore(tmp_path / "store")
    assert len(store) == 11 and store.meta["tokens"]["skipped"] == 1
    assert (tmp_path / "store" / "skipped.txt").read_text().startswith(f"{class_folder(3)}/000003.png\t")
    paths, labels, _ = list_images(images)
    kept = [label for path, label in zip(paths, labels) if path != bad]
    assert store.labels.tolist() == kept


def test_clear_errors(setup, store, tmp_path):
    with pytest.raises(UserError, match="not a multiple"):
        preprocess_tokens.main(tokens_args(setup, tmp_path / "s", "--image-size", "30"))
    with pytest.raises(UserError, match="views=2, this run has 1"):
        preprocess_tokens.main(tokens_args(setup, store.path, "--views", "1"))
    mixed = write_image_folder(tmp_path / "mixed", num_images=12, image_size=40)
    (mixed / "stray.png").write_bytes((mixed / class_folder(0) / "000000.png").read_bytes())
    with pytest.raises(UserError, match="also images directly inside"):
        list_images(mixed)
    other = ModelConfig(gpt_model="GPT-tiny", model_type="uncond", image_size=SIZE, downsample_size=4,
                        vocab_size=CODES * 2)
    wrong_codebook = experiment(tmp_path / "other", create_model(other), other)
    with pytest.raises(UserError, match="predicts 128 codes, the tokenizer here has 64"):
        preprocess_tokens.main(["--stage", "entropies", "--store", str(store.path),
                                "--entropy-model-checkpoint", str(wrong_codebook)])
    with pytest.raises(UserError, match="no token store"):
        TokenStore(tmp_path / "nowhere")


def test_dataset_and_collate_feed_dpar(store):
    patcher = PatcherConfig(threshold=2.0, max_patch_length=4)
    dataset = TokenDataset(store, entropies=True, seed=0)
    views = {int(np.random.default_rng([0, 0, i]).integers(2)) for i in range(len(dataset))}
    assert views == {0, 1}  # both views get used
    item = dataset[3]
    assert item["tokens"].shape == (GRID * GRID,) and item["entropies"].dtype == torch.float32
    batch = PackedCollate(patcher, GRID)([dataset[i] for i in range(6)])
    mask = batch.patch_start
    assert mask.shape == (6, GRID * GRID) and mask[:, ::GRID].all()  # row breaks
    per_image = mask.sum(1)
    assert batch.layout.packed.seqlens == tuple(per_image.tolist())  # one stream per image: no padding
    assert batch.layout.packed.cu_seqlens.tolist() == [0] + per_image.cumsum(0).tolist()
    assert batch.layout.packed.total == int(mask.sum()) and batch.layout.first_token.numel() == int(mask.sum())
    assert torch.equal(batch.layout.patch_image, torch.repeat_interleave(torch.arange(6), per_image))
    lengths = torch.diff(torch.nonzero(torch.cat([mask, torch.ones(6, 1, dtype=torch.bool)], 1).flatten()).flatten())
    assert int(lengths.max()) <= 4

    config = ModelConfig(gpt_model="DGPT-tiny", image_size=SIZE, downsample_size=4, vocab_size=CODES,
                         num_classes=len(CLASSES), dropout_p=0.0, token_dropout_p=0.0, class_dropout_prob=0.0)
    model = randomize(create_model(config), std=0.1)
    logits, loss = model(batch.tokens, batch.labels, batch.patch_start, targets=batch.tokens, layout=batch.layout)
    loss.backward()
    assert logits.shape == (6, GRID * GRID, CODES) and torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)

    # No leakage across packed images: changing image 1 leaves image 0's logits alone.
    other = [dataset[i] for i in range(6)]
    other[1] = dict(other[1], tokens=torch.randint(0, CODES, other[1]["tokens"].shape))
    moved = PackedCollate(patcher, GRID)(other)
    with torch.no_grad():
        model.eval()
        before = model(batch.tokens, batch.labels, batch.patch_start, layout=batch.layout)[0]
        after = model(moved.tokens, moved.labels, moved.patch_start, layout=moved.layout)[0]
    assert torch.equal(before[0], after[0]) and not torch.equal(before[1], after[1])

    baseline = PackedCollate(None, GRID)([dataset[i] for i in range(2)])
    assert baseline.patch_start is None and baseline.layout is None
    with pytest.raises(UserError, match="needs the store's entropies"):
        PackedCollate(patcher, GRID)([TokenDataset(store, entropies=False)[0]])


def test_patch_stats_report(store, capsys):
    huge, tiny = store_patch_stats(store, [1e9, -1.0], max_patch_length=None, row_break=True)
    assert huge["tokens_per_patch"] == GRID and huge["patches_per_image"] == GRID  # one patch per row
    assert tiny["tokens_per_patch"] == 1.0
    stats_main(["--store", str(store.path), "--threshold", "1e9", "--max-patch-length", "4"])
    assert "| 1e+09 | 4.000 | 16.0 |" in capsys.readouterr().out


def test_calibrated_threshold_is_printed_in_full(tmp_path, capsys):
    """The printed θ, given back as --threshold, gives the printed tokens per patch, also when the entropies crowd
    within 0.04 nats, as a briefly trained entropy model's do (rounded to 0.01, such a θ is another patching)."""
    from tests.helpers import write_token_store
    generator = torch.Generator().manual_seed(0)
    entropies = 4.72 + 0.04 * torch.rand(64, 1, GRID * GRID, generator=generator)
    checkpoint = tmp_path / "entropy.safetensors"
    checkpoint.write_bytes(b"stand-in entropy model")
    store = write_token_store(tmp_path / "store", torch.zeros(64, 1, GRID * GRID, dtype=torch.long).numpy(),
                              np.zeros(64), codebook_size=CODES, num_classes=1, entropies=entropies.numpy(),
                              entropy_checkpoint=checkpoint)

    def table(*args):
        stats_main(["--store", str(store), *args])
        *_, row = capsys.readouterr().out.strip().splitlines()
        return [cell.strip() for cell in row.strip("|").split("|")]

    theta, tokens_per_patch, _ = table("--target-tokens-per-patch", "1.81")
    assert abs(float(tokens_per_patch) - 1.81) < 0.1
    assert table("--threshold", theta)[1] == tokens_per_patch


def test_held_out_images_cover_every_class_in_proportion():
    """A class-sorted store (as an image folder gives) of uneven classes: the hold-out takes each class's share,
    never the last class, and is the same draw for the same seed only."""
    from dpar.data.splits import holdout_split
    sizes = [300, 300, 120, 480, 100, 700]
    labels = np.repeat(np.arange(len(sizes)), sizes)
    train, held = holdout_split(labels, 200, seed=0)
    assert np.array_equal(np.sort(np.concatenate([train, held])), np.arange(len(labels)))
    per_class = np.bincount(labels[held], minlength=len(sizes))
    expected = 200 * np.array(sizes) / len(labels)
    assert per_class.sum() == 200 and np.all(np.abs(per_class - expected) < 1), (per_class, expected)
    assert not np.array_equal(held, np.arange(len(labels) - 200, len(labels)))
    again, other = holdout_split(labels, 200, seed=0)[1], holdout_split(labels, 200, seed=1)[1]
    assert np.array_equal(held, again) and not np.array_equal(held, other)
    assert np.bincount(labels[other], minlength=len(sizes)).tolist() == per_class.tolist()
    assert len(holdout_split(labels, 0)[1]) == 0
    with pytest.raises(ValueError, match="cannot hold out"):
        holdout_split(labels, len(labels))


def test_trainers_and_calibration_use_the_stratified_split(store):
    """The validation set of a trainer is the stratified draw, and θ is calibrated on the rest."""
    from dpar.data.splits import holdout_split
    from dpar.data.stats import calibration_images
    from dpar.training import DataConfig, _datasets
    classes = len(set(store.labels.tolist()))
    held = classes  # one image of each class
    train_set, val_set = _datasets(store, DataConfig(store=str(store.path), val_holdout=held), ModelConfig(), False, 0)
    train, expected = holdout_split(store.labels, held, 0)
    assert list(val_set.images) == expected.tolist() and list(train_set.images) == train.tolist()
    assert len(set(store.labels[expected].tolist())) == classes  # every class, not the last ones
    assert calibration_images(store, held).tolist() == train.tolist()
    sample = calibration_images(store, held, max_images=classes)
    assert len(sample) == classes and set(sample) <= set(train) and len(set(store.labels[sample].tolist())) == classes


def test_a_hold_out_that_would_empty_a_class_is_one_line(store):
    from dpar.training import DataConfig, _datasets
    classes = len(set(store.labels.tolist()))
    too_many = len(store) - classes + 1
    with pytest.raises(UserError, match=f"^data.val_holdout={too_many} for data.store .*: cannot hold out {too_many} "
                                        f"of {len(store)} images \\(every class keeps one for training\\)$"):
        _datasets(store, DataConfig(store=str(store.path), val_holdout=too_many), ModelConfig(), False, 0)


def test_small_hold_outs_draw_their_classes_and_every_class_keeps_a_training_image():
    from dpar.data.splits import holdout_split
    labels = np.repeat(np.arange(12), 8)
    picked = {tuple(np.unique(labels[holdout_split(labels, 6, seed)[1]])) for seed in range(6)}
    assert len(picked) > 1 and all(len(classes) == 6 for classes in picked)  # not always classes 0-5
    labels = np.repeat(np.arange(12), [85] + [1] * 11)
    train, held = holdout_split(labels, 16, 0)
    assert np.bincount(labels[train], minlength=12).min() == 1 and len(held) == 16
    with pytest.raises(ValueError, match="every class keeps one"):
        holdout_split(labels, 85)


@pytest.mark.parametrize("gpt_model, patcher", [("DGPT-tiny", PatcherConfig(threshold=2.0, max_patch_length=4)),
                                                ("GPT-tiny", None)])
def test_per_token_nlls_average_to_the_validation_nll(store, gpt_model, patcher):
    """training.token_nlls (the study's NLL by class and grid position) against nll_totals (validation)."""
    from dpar.training import nll_totals, token_nlls
    torch.manual_seed(0)
    config = ModelConfig(gpt_model=gpt_model, image_size=SIZE, downsample_size=4, vocab_size=CODES, num_classes=12)
    model = randomize(create_model(config))
    dataset, collate = TokenDataset(store, entropies=True, view=0), PackedCollate(patcher, GRID)
    nlls = token_nlls(model, dataset, collate, 5, conditional=True)
    totals = nll_totals(model, dataset, collate, 5, conditional=True, progress=False)
    assert nlls.shape == (len(dataset), GRID * GRID)
    assert float(nlls.double().mean()) == pytest.approx(float(totals[0] / totals[1]), rel=1e-5)
    first = token_nlls(model, torch.utils.data.Subset(dataset, [0]), collate, 1, conditional=True)
    torch.testing.assert_close(first[0], nlls[0], rtol=1e-5, atol=1e-5)  # one image alone: the same terms
