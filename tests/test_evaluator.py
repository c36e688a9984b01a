"""Evaluator: metric functions against formulas written out here, the FID Inception's structure, the CLI."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import linalg

from dpar.data.store import file_sha256
from dpar.errors import UserError
from evaluations.c2i import evaluator
from evaluations.c2i.evaluator import (frechet_distance, inception_score, manifold_radii, precision_recall,
                                       statistics)
from evaluations.c2i.inception import FIDInceptionV3, tf_resize_bilinear
from sample_c2i_ddp import SampleChunks, fid_labels

ROOT = Path(__file__).resolve().parents[1]


def random_features(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3 + shift


# -- metrics -------------------------------------------------------------------------------------------------

def test_frechet_distance_equals_the_eigenvalue_formula():
    mu1, s1 = statistics(random_features(200, 16, 0))
    mu2, s2 = statistics(random_features(300, 16, 1, shift=0.5))
    # Tr((S1 S2)^(1/2)) = sum of the square roots of the eigenvalues of S1 S2 (real and >= 0 for PSD S1, S2)
    eigenvalues = linalg.eigvals(s1 @ s2).real.clip(min=0)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(eigenvalues))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-8)
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-8


def test_frechet_distance_of_diagonal_gaussians_is_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)  # = 5 + (1 + 0 + 4)
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected) == pytest.approx(10.0)


def test_inception_score_follows_its_definition():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(12000, 10)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = []
    for part in (probs[:5000], probs[5000:10000], probs[10000:]):  # ADM's consecutive splits of 5000
        marginal = part.mean(0)
        kl = [sum(p[j] * np.log(p[j] / marginal[j]) for j in range(10)) for p in part]
        scores.append(np.exp(np.mean(kl)))
    assert inception_score(probs) == pytest.approx(np.mean(scores), rel=1e-10)
    assert inception_score(np.full((100, 10), 0.1)) == pytest.approx(1.0)
    assert inception_score(np.eye(10).repeat(5, axis=0) * (1 - 1e-12) + 1e-13) == pytest.approx(10.0, rel=1e-6)


class ClassPeakedInception(torch.nn.Module):
    """A stand-in for the FID Inception whose prediction peaks at the class an image's first pixel encodes
    (a well-classified sample), with noise; pool_3 and spatial features are 0."""

    def forward(self, images):
        classes = images[:, 0, 0, 0].long()
        noise = torch.randn(len(images), 1008, generator=torch.Generator().manual_seed(int(classes.sum())))
        logits = noise + 10 * torch.nn.functional.one_hot(classes, 1008)
        return torch.zeros(len(images), 2048), torch.zeros(len(images), 17, 17, 192), logits


def sampler_style_file(path: Path, num_samples: int, num_classes: int, chunk: int = 64) -> np.ndarray:
    """An .npz written as sample_c2i_ddp.py writes one (its labels, chunks, packing); image n is filled with
    its label. Returns the labels."""
    labels = fid_labels(num_samples, num_classes, seed=0)
    chunks = SampleChunks(path, num_samples, chunk, {"seed": 0}, labels)
    chunks.start(main_process=True)
    for k in range(chunks.count):
        chunks.write(k, np.broadcast_to(labels[chunks.indices(k).numpy()].astype(np.uint8)[:, None, None, None],
                                        (len(chunks.indices(k)), 4, 4, 3)).copy())
    chunks.pack()
    return labels


def test_the_inception_score_of_a_sample_file_does_not_depend_on_its_order(tmp_path):
    """Issue 30: in class order (as the sampler wrote them), ADM's consecutive splits saw few classes each and
    IS came out far too low (99.4 instead of 897.3 for 1,000 classes). Scaled down: 100 classes x 50 samples,
    splits of 500, so that a split of a class-sorted file holds 10 of the 100 classes."""
    labels = sampler_style_file(tmp_path / "samples.npz", 5000, 100)
    with np.load(tmp_path / "samples.npz") as data:
        assert np.array_equal(data["arr_1"], labels)  # ADM's place for the labels of class-conditional samples
        assert np.array_equal(data["arr_0"][:, 0, 0, 0], labels)
    assert (np.bincount(labels, minlength=100) == 50).all()  # class-balanced
    probs = evaluator.batch_features(evaluator.ImageBatch(tmp_path / "samples.npz", 2), ClassPeakedInception,
                                     "fake", 256, "cpu").probs
    assert (probs.argmax(1) == labels).mean() > 0.9  # mostly classified as their class
    in_file = inception_score(probs, split_size=500)
    shuffled = inception_score(probs[np.random.default_rng(1).permutation(5000)], split_size=500)
    one_split = inception_score(probs, split_size=5000)
    class_sorted = inception_score(probs[np.argsort(labels, kind="stable")], split_size=500)
    # one split sees p(y) from 50 samples a class, a split of 500 from 5 (as ADM's 5,000 of 1,000 classes
    # do): a few % apart, the same way in published numbers
    assert in_file == pytest.approx(shuffled, rel=0.02) and in_file == pytest.approx(one_split, rel=0.1)
    assert class_sorted < in_file / 5  # the order the sampler used to write: far off
    assert in_file > 30, (in_file, shuffled, one_split, class_sorted)


def test_fid_and_precision_recall_do_not_depend_on_the_order():
    features = random_features(300, 8, 0).astype(np.float32)
    ref = random_features(200, 8, 1, shift=0.4).astype(np.float32)
    order = np.random.default_rng(2).permutation(300)
    (mu, sigma), (mu_p, sigma_p) = statistics(features), statistics(features[order])
    assert np.allclose(mu, mu_p) and np.allclose(sigma, sigma_p)
    assert precision_recall(ref, features, batch=64) == precision_recall(ref, features[order], batch=64)


def test_a_file_in_class_order_is_named(tmp_path):
    labels = sampler_style_file(tmp_path / "new.npz", 600, 6)
    assert evaluator.class_order_warning(tmp_path / "new.npz", 600, split_size=500) is None
    np.savez(tmp_path / "sorted.npz", arr_0=np.zeros((600, 4, 4, 3), np.uint8), arr_1=np.sort(labels))
    old_job = json.dumps({"num_samples": 600, "class_order": "sample n has class n * 6 // N"})
    np.savez(tmp_path / "old.npz", arr_0=np.zeros((600, 4, 4, 3), np.uint8), dpar_job=np.array(old_job))
    for name in ("sorted.npz", "old.npz"):
        assert "in class order: the Inception Score" in evaluator.class_order_warning(tmp_path / name, 600, 500)
        assert evaluator.class_order_warning(tmp_path / name, 500, 500) is None  # one split: no harm


def brute_force_precision_recall(ref: np.ndarray, sample: np.ndarray, k: int = 3) -> tuple[float, float]:
    def squared_distances(a, b):
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)

    ref_radii = np.sort(squared_distances(ref, ref), axis=1)[:, k]  # column 0 is the point itself
    sample_radii = np.sort(squared_distances(sample, sample), axis=1)[:, k]
    cross = squared_distances(ref, sample)
    precision = np.mean([(cross[:, j] <= ref_radii).any() for j in range(len(sample))])
    recall = np.mean([(cross[i] <= sample_radii).any() for i in range(len(ref))])
    return precision, recall


def test_precision_recall_equal_brute_force_knn_balls():
    ref = random_features(300, 8, 0).astype(np.float32)
    sample = random_features(250, 8, 1, shift=0.4).astype(np.float32)
    expected = brute_force_precision_recall(ref.astype(np.float64), sample.astype(np.float64))
    assert 0.05 < expected[0] < 0.95 and 0.05 < expected[1] < 0.95  # a case where both can be wrong
    assert precision_recall(ref, sample, half=False, batch=64) == pytest.approx(expected, abs=1e-12)
    # ADM computes the distances in float16: the same up to points on a ball's edge
    assert precision_recall(ref, sample) == pytest.approx(expected, abs=0.02)
    radii = manifold_radii(torch.from_numpy(ref), half=False)
    assert torch.allclose(radii.double(), torch.from_numpy(np.sort(((ref[:, None] - ref[None]) ** 2).sum(-1), 1)[:, 3]).double(),
                          rtol=1e-4)


# -- the network ---------------------------------------------------------------------------------------------

def conv(name, c_in, c_out, kh, kw=None):
    kw = kh if kw is None else kw
    return [(f"{name}.conv.weight", (c_out, c_in, kh, kw))] + [
        (f"{name}.bn.{p}", (c_out,)) for p in ("weight", "bias", "running_mean", "running_var")]


def block_a(name, c_in, pool):
    return (conv(f"{name}.branch1x1", c_in, 64, 1) + conv(f"{name}.branch5x5_1", c_in, 48, 1)
            + conv(f"{name}.branch5x5_2", 48, 64, 5) + conv(f"{name}.branch3x3dbl_1", c_in, 64, 1)
            + conv(f"{name}.branch3x3dbl_2", 64, 96, 3) + conv(f"{name}.branch3x3dbl_3", 96, 96, 3)
            + conv(f"{name}.branch_pool", c_in, pool, 1))


def block_c(name, c7):
    return (conv(f"{name}.branch1x1", 768, 192, 1) + conv(f"{name}.branch7x7_1", 768, c7, 1)
            + conv(f"{name}.branch7x7_2", c7, c7, 1, 7) + conv(f"{name}.branch7x7_3", c7, 192, 7, 1)
            + conv(f"{name}.branch7x7dbl_1", 768, c7, 1) + conv(f"{name}.branch7x7dbl_2", c7, c7, 7, 1)
            + conv(f"{name}.branch7x7dbl_3", c7, c7, 1, 7) + conv(f"{name}.branch7x7dbl_4", c7, c7, 7, 1)
            + conv(f"{name}.branch7x7dbl_5", c7, 192, 1, 7) + conv(f"{name}.branch_pool", 768, 192, 1))


def block_e(name, c_in):
    return (conv(f"{name}.branch1x1", c_in, 320, 1) + conv(f"{name}.branch3x3_1", c_in, 384, 1)
            + conv(f"{name}.branch3x3_2a", 384, 384, 1, 3) + conv(f"{name}.branch3x3_2b", 384, 384, 3, 1)
            + conv(f"{name}.branch3x3dbl_1", c_in, 448, 1) + conv(f"{name}.branch3x3dbl_2", 448, 384, 3)
            + conv(f"{name}.branch3x3dbl_3a", 384, 384, 1, 3) + conv(f"{name}.branch3x3dbl_3b", 384, 384, 3, 1)
            + conv(f"{name}.branch_pool", c_in, 192, 1))


# pt_inception-2015-12-05: torchvision's Inception3 (no aux classifier, 1008 classes) as pytorch-fid builds it
PUBLIC_WEIGHTS = (
    conv("Conv2d_1a_3x3", 3, 32, 3) + conv("Conv2d_2a_3x3", 32, 32, 3) + conv("Conv2d_2b_3x3", 32, 64, 3)
    + conv("Conv2d_3b_1x1", 64, 80, 1) + conv("Conv2d_4a_3x3", 80, 192, 3)
    + block_a("Mixed_5b", 192, 32) + block_a("Mixed_5c", 256, 64) + block_a("Mixed_5d", 288, 64)
    + conv("Mixed_6a.branch3x3", 288, 384, 3) + conv("Mixed_6a.branch3x3dbl_1", 288, 64, 1)
    + conv("Mixed_6a.branch3x3dbl_2", 64, 96, 3) + conv("Mixed_6a.branch3x3dbl_3", 96, 96, 3)
    + block_c("Mixed_6b", 128) + block_c("Mixed_6c", 160) + block_c("Mixed_6d", 160) + block_c("Mixed_6e", 192)
    + conv("Mixed_7a.branch3x3_1", 768, 192, 1) + conv("Mixed_7a.branch3x3_2", 192, 320, 3)
    + conv("Mixed_7a.branch7x7x3_1", 768, 192, 1) + conv("Mixed_7a.branch7x7x3_2", 192, 192, 1, 7)
    + conv("Mixed_7a.branch7x7x3_3", 192, 192, 7, 1) + conv("Mixed_7a.branch7x7x3_4", 192, 192, 3)
    + block_e("Mixed_7b", 1280) + block_e("Mixed_7c", 2048)
    + [("fc.weight", (1008, 2048)), ("fc.bias", (1008,))]
)


def test_state_dict_matches_the_public_fid_weights():
    state = FIDInceptionV3().state_dict()
    mine = {k: tuple(v.shape) for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert mine == dict(PUBLIC_WEIGHTS)
    # torchvision's documented 27,161,264 parameters, minus its aux classifier (3,326,696), plus 8 classes
    assert sum(p.numel() for p in FIDInceptionV3().parameters()) == 27_161_264 - 3_326_696 + 8 * 2049


def kaiming_inception(seed: int = 0) -> FIDInceptionV3:
    """Random weights that keep activations alive through 94 layers (default init collapses them to ~0)."""
    torch.manual_seed(seed)
    model = FIDInceptionV3()
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.nn.init.normal_(model.fc.weight, std=0.3)
    return model.eval()


def test_feature_shapes_for_a_299_input():
    with torch.no_grad():
        pool, spatial, logits = kaiming_inception()(torch.rand(2, 3, 299, 299) * 255)
    assert pool.shape == (2, 2048) and spatial.shape == (2, 17, 17, 192) and logits.shape == (2, 1008)
    assert (pool >= 0).all() and pool.std(0).mean() > 0  # post-ReLU averages that differ between images


def test_resize_is_tf1_bilinear_without_half_pixel_centres():
    x = torch.tensor([[[[0.0, 10.0], [20.0, 30.0]]]])
    out = tf_resize_bilinear(x, 4)  # source coordinate = target * 2 / 4: 0, 0.5, 1, 1.5 (clamped)
    row = torch.tensor([0.0, 5.0, 10.0, 10.0])
    expected = torch.stack([row, row + 10, row + 20, row + 20])
    assert torch.allclose(out[0, 0], expected)
    image = torch.rand(1, 3, 7, 7)
    assert torch.equal(tf_resize_bilinear(image, 7), image)  # on the source grid: the pixels themselves


# -- end to end -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    torch.save(kaiming_inception().state_dict(), root / "inception.pth")
    rng = np.random.default_rng(0)
    np.savez(root / "ref.npz", arr_0=rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8))
    sample = rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    sample[:2] = 255 - sample[:2]
    np.savez(root / "sample.npz", arr_0=sample)
    return root


@pytest.mark.slow  # about 16 s on 2 CPU cores: Inception features and two 2048x2048 sqrtm
def test_evaluator_end_to_end_with_random_weights(batches, capsys):
    args = [str(batches / "ref.npz"), str(batches / "sample.npz"), "--inception-weights", str(batches / "inception.pth"),
            "--batch-size", "4"]
    evaluator.main(args)
    report = (batches / "sample.txt").read_text()
    names = [line.split(":")[0] for line in report.splitlines()]
    assert names == ["Inception Score", "FID", "sFID", "Precision", "Recall"] and report in capsys.readouterr().out
    values = dict(line.split(": ") for line in report.splitlines())
    assert float(values["Inception Score"]) > 1.0 and float(values["FID"]) > 0 and float(values["sFID"]) > 0
    assert (batches / "sample.npz.inception.npz").is_file()

    def no_network():
        raise AssertionError("the cached features should have been used")
    weights_id = file_sha256(batches / "inception.pth")
    cached = evaluator.batch_features(evaluator.ImageBatch(batches / "sample.npz", 2), no_network, weights_id, 4, "cpu")
    assert cached.pool.shape == (5, 2048) and cached.mu_s.shape == (17 * 17 * 7,)
    assert np.allclose(cached.mu, cached.pool.mean(0))  # (a second evaluate() would redo two 2048^2 sqrtm: ~30 s)


def test_reference_statistics_stored_in_the_file_are_used(batches):
    weights = batches / "inception.pth"
    features = evaluator.batch_features(evaluator.ImageBatch(batches / "ref.npz", 2),
                                        lambda: FIDInceptionV3.from_file(weights), file_sha256(weights), 4,
                                        "cpu")  # cached by the end-to-end test
    np.savez(batches / "virtual.npz", arr_0=np.load(batches / "ref.npz")["arr_0"], mu=np.zeros(2048),
             sigma=np.eye(2048), mu_s=np.ones(2023), sigma_s=np.eye(2023))
    stats = evaluator.with_reference_statistics(features, evaluator.reference_statistics(batches / "virtual.npz"))
    assert (stats.mu == 0).all() and (stats.mu_s == 1).all() and stats.pool is features.pool


def test_the_evaluator_warns_in_one_line_of_a_file_in_class_order(batches, tmp_path, monkeypatch, capsys):
    old_job = json.dumps({"num_samples": 5001, "class_order": "sample n has class n * 1000 // N"})
    np.savez(tmp_path / "old.npz", arr_0=np.zeros((5001, 16, 16, 3), np.uint8), dpar_job=np.array(old_job))
    monkeypatch.setattr(evaluator, "batch_features", lambda *args: None)  # the metrics are tested above
    monkeypatch.setattr(evaluator, "with_reference_statistics", lambda features, stored: features)
    monkeypatch.setattr(evaluator, "evaluate", lambda ref, sample: {"Inception Score": 1.0})
    evaluator.main([str(batches / "ref.npz"), str(tmp_path / "old.npz"), "--inception-weights",
                    str(batches / "inception.pth")])
    err = capsys.readouterr().err
    assert err.startswith(f"warning: {tmp_path / 'old.npz'} holds its samples in class order") and err.count("\n") == 1


def one_line_error(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "evaluations.c2i.evaluator", *args], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stdout == ""  # every input checked before any work or output
    return proc.stderr


def test_bad_inputs_are_one_line_errors(batches, tmp_path):
    weights = ["--inception-weights", str(batches / "inception.pth")]
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((4, 8, 8, 3), np.float32))
    np.savez(tmp_path / "nokey.npz", images=np.zeros((4, 8, 8, 3), np.uint8))
    np.savez(tmp_path / "one.npz", arr_0=np.zeros((1, 8, 8, 3), np.uint8))
    assert "arr_0 must be uint8 [N, H, W, 3]" in one_line_error(str(tmp_path / "float.npz"), "x.npz", *weights)
    assert "has no 'arr_0' (keys: images)" in one_line_error(str(tmp_path / "nokey.npz"), "x.npz", *weights)
    assert "1 image, but the statistics need at least 2" in one_line_error(str(tmp_path / "one.npz"), "x", *weights)
    assert "is a folder; give an .npz" in one_line_error(str(tmp_path), "x.npz", *weights)
    np.savez(tmp_path / "sample.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    assert "Inception weights not found at" in one_line_error(
        str(batches / "ref.npz"), str(tmp_path / "sample.npz"), "--inception-weights", str(tmp_path / "none.pth"))
    assert not (tmp_path / "sample.txt").exists() and not (tmp_path / "sample.npz.inception.npz").exists()
    torch.save({"w": torch.zeros(1)}, tmp_path / "other.pth")
    assert "is not pt_inception-2015-12-05-6726825d.pth: 472 missing keys" in one_line_error(
        str(batches / "ref.npz"), str(batches / "sample.npz"), "--inception-weights", str(tmp_path / "other.pth"))


# -- a reference batch from an image folder (issue 30, item 12) -------------------------------------------------

class ProjectionInception(torch.nn.Module):
    """A cheap stand-in for the FID Inception with features that vary from image to image: fixed random
    projections of the pixels (pool_3 2048, spatial 17x17x7 of the 192 channels, logits 1008)."""

    def __init__(self, pixels: int, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.pool = torch.randn(pixels, 2048, generator=generator) / pixels
        self.spatial = torch.randn(pixels, 17 * 17 * 7, generator=generator) / pixels
        self.logits = torch.randn(pixels, 1008, generator=generator) / pixels

    def forward(self, images):
        x = images.flatten(1) / 255
        spatial = torch.nn.functional.pad((x @ self.spatial).reshape(len(x), 17, 17, 7), (0, 192 - 7))
        return torch.relu(x @ self.pool), spatial, x @ self.logits


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from tests.helpers import write_image_folder

    root = write_image_folder(tmp_path_factory.mktemp("images") / "folder", classes=3, per_class=4, size=24)
    rng = np.random.default_rng(5)  # a wide image: the crop takes its middle after a bicubic resize
    from PIL import Image
    Image.fromarray(rng.integers(0, 256, (37, 70, 3), dtype=np.uint8)).save(root / "class_2" / "wide.png")
    (root / "class_1" / "broken.png").write_bytes(b"not an image")  # skipped and counted
    return root


def test_a_reference_batch_holds_center_crops_labels_and_the_evaluators_statistics(image_folder, tmp_path):
    from evaluations.c2i import reference_batch
    from tokenizer.images import list_images
    from tokenizer.transforms import load_center_crop

    network = ProjectionInception(16 * 16 * 3)
    # one image per forward everywhere: a CPU's matmul may round a row differently in batches of another size
    record = reference_batch.build(image_folder, tmp_path / "ref.npz", 16, max_images=100, network=network,
                                   batch_size=1)
    paths, labels, classes = list_images(image_folder)
    crops = {load_center_crop(p, 16).tobytes(): label for p, label in zip(paths, labels) if p.name != "broken.png"}
    with np.load(tmp_path / "ref.npz") as data:
        assert {"arr_0", "arr_1", "mu", "sigma", "mu_s", "sigma_s"} <= set(data.files)
        images, image_labels = data["arr_0"], data["arr_1"]
    assert images.shape == (13, 16, 16, 3) and images.dtype == np.uint8 and image_labels.dtype == np.int64
    assert sorted(image.tobytes() for image in images) == sorted(crops)  # every readable image, once, cropped
    assert [crops[image.tobytes()] for image in images] == image_labels.tolist()
    assert record["classes"] == classes == ["class_0", "class_1", "class_2"] and record["statistics_images"] == 13
    assert len(record["skipped"]) == 1 and "class_1/broken.png" in record["skipped"][0]
    # the evaluator reads the file, and its own features of arr_0 give the statistics stored
    batch = evaluator.ImageBatch(tmp_path / "ref.npz", 2)
    stored = evaluator.reference_statistics(batch.path)
    own = evaluator.batch_features(batch, lambda: network, "projection", 1, "cpu")
    for key in ("mu", "sigma", "mu_s", "sigma_s"):
        np.testing.assert_allclose(stored[key], getattr(own, key), rtol=1e-6, atol=1e-9)
    # statistics pooled over blocks (bounded memory) equal those of one block
    reference_batch.build(image_folder, tmp_path / "blocks.npz", 16, max_images=4, network=network, block=3,
                          batch_size=1)
    with np.load(tmp_path / "blocks.npz") as blocks:
        assert blocks["arr_0"].shape[0] == 4  # a draw of 4; the statistics still cover all 13
        for key in ("mu", "sigma", "mu_s", "sigma_s"):
            np.testing.assert_allclose(blocks[key], stored[key], rtol=1e-9, atol=1e-12)


def test_a_reference_batch_without_statistics_reads_only_what_it_keeps(image_folder, tmp_path, capsys):
    from evaluations.c2i import reference_batch

    reference_batch.main([str(image_folder), str(tmp_path / "ref.npz"), "--image-size", "8", "--max-images", "3",
                          "--seed", "1"])
    assert capsys.readouterr().out.startswith(f"3 images of 14 (8x8), with labels -> {tmp_path / 'ref.npz'}")
    with np.load(tmp_path / "ref.npz") as data:
        assert set(data.files) == {"arr_0", "arr_1", "dpar_reference"} and data["arr_0"].shape == (3, 8, 8, 3)
    assert evaluator.reference_statistics(tmp_path / "ref.npz") is None  # the evaluator computes them from arr_0


def test_batches_of_other_image_sizes_are_warned(tmp_path):
    """Found by a new user: a 256 px reference (the documented default) against the demo's 32 px samples was
    evaluated without a word; Inception resizes both, so the metrics also measure the resizing."""
    for name, size in (("ref", 16), ("same", 16), ("small", 8)):
        np.savez(tmp_path / f"{name}.npz", arr_0=np.zeros((2, size, size, 3), np.uint8))
    ref, same, small = (evaluator.ImageBatch(tmp_path / f"{name}.npz", 2) for name in ("ref", "same", "small"))
    assert evaluator.size_warning(ref, same) is None
    assert "the reference images are 16x16 px and the samples 8x8 px" in evaluator.size_warning(ref, small)
    assert "--image-size 8" in evaluator.size_warning(ref, small)


def test_a_reference_batch_warns_when_it_enlarges_images(image_folder, tmp_path, capsys):
    from evaluations.c2i import reference_batch

    reference_batch.main([str(image_folder), str(tmp_path / "ref.npz"), "--image-size", "32", "--max-images", "3"])
    assert "warning: 3 of the images read are smaller than --image-size 32" in capsys.readouterr().err
    reference_batch.main([str(image_folder), str(tmp_path / "ok.npz"), "--image-size", "16", "--max-images", "3"])
    assert "warning" not in capsys.readouterr().err


def test_a_reference_batch_refuses_bad_inputs_in_one_line_before_writing(image_folder, tmp_path):
    from evaluations.c2i import reference_batch

    def refused(*args: str) -> str:
        with pytest.raises(UserError) as raised:
            reference_batch.main(list(args))
        return str(raised.value)

    (tmp_path / "empty").mkdir()
    assert "no images" in refused(str(tmp_path / "empty"), str(tmp_path / "a.npz"))
    (tmp_path / "junk").mkdir()
    for name in ("a.png", "b.jpg"):
        (tmp_path / "junk" / name).write_bytes(b"junk")
    assert "0 readable image(s) of 2; a reference batch needs at least 2 (2 unreadable, first: cannot read" in \
        refused(str(tmp_path / "junk"), str(tmp_path / "a.npz"))
    assert "name it <name>.npz" in refused(str(image_folder), str(tmp_path / "a.png"))
    (tmp_path / "taken.npz").write_bytes(b"x")
    assert "exists; delete it" in refused(str(image_folder), str(tmp_path / "taken.npz"))
    # the weights are checked before any image is read: one line, nothing printed (the command line, once)
    proc = subprocess.run([sys.executable, "-m", "evaluations.c2i.reference_batch", str(image_folder),
                           str(tmp_path / "a.npz"), "--statistics", "--inception-weights", str(tmp_path / "none.pth")],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stdout == "", proc.stderr
    assert proc.stderr.startswith("error: Inception weights not found at")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "junk", "taken.npz"]  # nothing written


@pytest.mark.slow  # about 10 s on 2 CPU cores: the FID Inception (random weights) over 14 images
def test_a_reference_batch_with_the_fid_inception(image_folder, batches, tmp_path, capsys):
    from evaluations.c2i import reference_batch

    reference_batch.main([str(image_folder), str(tmp_path / "ref.npz"), "--image-size", "16", "--statistics",
                          "--inception-weights", str(batches / "inception.pth"), "--batch-size", "7"])
    out = capsys.readouterr().out
    assert "Inception statistics over 13 images" in out and "skipped 1 unreadable image(s)" in out
    stored = evaluator.reference_statistics(tmp_path / "ref.npz")  # ADM's shapes, checked by the evaluator
    features = evaluator.batch_features(evaluator.ImageBatch(tmp_path / "ref.npz", 2),
                                        lambda: FIDInceptionV3.from_file(batches / "inception.pth"), "w", 7, "cpu")
    np.testing.assert_allclose(stored["mu"], features.mu, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, arrays, message", [
    ("features_str", {"dpar_reference": json.dumps({"features": "inception"})}, "record is not one reference_batch"),
    ("record_list", {"dpar_reference": json.dumps([1])}, "record is not one reference_batch"),
    ("mu_text", {"mu": np.array(["a"] * 2048)}, "mu must be finite numbers, got <U1"),
    ("sigma_inf", {"sigma": np.full((2048, 2048), np.inf)}, "sigma must be finite numbers, got non-finite values"),
    ("mu_nan", {"mu": np.full(2048, np.nan)}, "mu must be finite numbers, got non-finite values"),
])
def test_damaged_reference_statistics_are_one_line_errors(tmp_path, name, arrays, message):
    """A breaker's damaged references, each once an AttributeError, a numpy error or FID: nan."""
    stats = {"mu": np.zeros(2048), "sigma": np.eye(2048), "mu_s": np.zeros(2023), "sigma_s": np.eye(2023)}
    np.savez(tmp_path / f"{name}.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8), **{**stats, **arrays})
    with pytest.raises(UserError, match=f"{name}.npz.*{message}"):
        evaluator.reference_statistics(tmp_path / f"{name}.npz")
