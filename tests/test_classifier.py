"""The sample-quality metric of the embedded demo (issue 31, item 2): a classifier of the synthetic classes
(evaluations.c2i.classifier) as the evaluator's feature network, its reference batch, and the one-line refusals.
Real images are drawn fresh (seeds the demo never uses), so nothing here was seen in training."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from dpar import demo
from dpar.data.synthetic import CLASSES, class_folder, synthetic_image, write_image_folder
from dpar.errors import UserError
from evaluations.c2i import classifier, evaluator, reference_batch
from tests.helpers import ROOT

SHIPPED = ROOT / "assets" / "demo" / demo.CLASSIFIER
WEIGHTS = SHIPPED / classifier.WEIGHTS_FILE


def fresh_images(count: int, seed: int, size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    size = size or demo.image_size()
    pairs = [synthetic_image(i, size, seed) for i in range(count)]
    return np.stack([image for image, _ in pairs]), np.array([label for _, label in pairs], dtype=np.int64)


def shipped_reference(folder) -> str:
    """A copy of the shipped reference batch in ``folder``: the evaluator caches features beside it."""
    copy = folder / "reference.npz"
    copy.write_bytes((SHIPPED / "reference.npz").read_bytes())
    return str(copy)


def evaluate(ref, samples, *flags: str) -> dict[str, str]:
    """The evaluator's report (written next to ``samples``) as a dict."""
    evaluator.main([str(ref), str(samples), "--features", str(WEIGHTS), *flags])
    report = samples.with_suffix(".classifier.txt").read_text()
    return dict(line.split(": ", 1) for line in report.splitlines())


# -- the shipped classifier and reference batch ----------------------------------------------------------------

def test_the_shipped_classifier_classifies_fresh_images_of_the_demos_size():
    model, record = classifier.load_classifier(WEIGHTS)
    assert record["image_size"] == demo.image_size()  # a demo at another size needs its classifier rebuilt
    assert record["classes"] == [class_folder(label) for label in range(len(CLASSES))]  # label order
    assert record["held_out"]["accuracy"] >= 0.95 and record["held_out"]["images"] >= 100
    images, labels = fresh_images(360, seed=9)
    accuracy = (classifier.predict(model, images) == labels).mean()
    assert accuracy >= 0.95, accuracy
    assert json.loads((SHIPPED / classifier.RECORD_FILE).read_text()) == record


def test_the_shipped_reference_batch_is_small_held_out_and_of_the_classifiers_features():
    ref = SHIPPED / "reference.npz"
    assert ref.stat().st_size < 5 * 2 ** 20
    record = evaluator.reference_record(ref)
    assert record["image_size"] == demo.image_size() and record["seed"] == 0 and record["images"] >= 500
    with np.load(ref) as data:
        images, labels = data["arr_0"], data["arr_1"]
    assert (np.bincount(labels, minlength=len(CLASSES)) >= record["images"] // len(CLASSES) - 1).all()
    expected, _ = fresh_images(12, seed=demo.REFERENCE_SEED)  # images of the reference seed, not the training one
    assert {image.tobytes() for image in expected} <= {image.tobytes() for image in images}
    _, kind = evaluator.classifier_features(WEIGHTS)
    assert evaluator.statistics_features(ref) == kind.identity
    assert evaluator.reference_statistics(ref, kind)["mu"].shape == (kind.pool,)


def test_real_against_real_is_close_and_wrong_labels_or_other_images_are_not(tmp_path):
    """Real vs real (the shipped reference against fresh images of another seed): FID near 0, precision and
    recall high, class accuracy near 1; the same images with shuffled labels: class accuracy near chance
    (1/12); images of another distribution (each image's pixels shuffled: same colours, no shapes): FID far
    larger, precision and recall near 0."""
    ref = shipped_reference(tmp_path)
    images, labels = fresh_images(360, seed=4)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "real.npz", arr_0=images, arr_1=labels)
    np.savez(tmp_path / "shuffled.npz", arr_0=images, arr_1=rng.permutation(labels))
    pixels = images.reshape(len(images), -1, 3)
    scrambled = np.stack([p[rng.permutation(len(p))] for p in pixels]).reshape(images.shape)
    np.savez(tmp_path / "scrambled.npz", arr_0=scrambled, arr_1=labels)
    real, shuffled, other = (evaluate(ref, tmp_path / f"{name}.npz")
                             for name in ("real", "shuffled", "scrambled"))
    assert real["Features"].startswith(f"classifier {WEIGHTS} (12 classes, {demo.image_size()} px")
    value = {name: {k: float(v) for k, v in r.items() if k != "Features"}
             for name, r in (("real", real), ("shuffled", shuffled), ("other", other))}
    assert value["real"]["Class accuracy"] >= 0.95 and value["shuffled"]["Class accuracy"] <= 0.2
    assert value["real"]["Precision"] > 0.8 and value["real"]["Recall"] > 0.8
    assert value["other"]["Precision"] < 0.2 and value["other"]["Recall"] < 0.2
    assert value["real"]["FID"] < 1.0 and value["other"]["FID"] > 50 * value["real"]["FID"]
    assert value["other"]["sFID"] > 3 * value["real"]["sFID"]
    assert value["real"]["Classifier Score"] > 10 > 2 > value["other"]["Classifier Score"]  # 12 at most
    # the labels do not enter FID, sFID, precision, recall or the score
    assert {k: v for k, v in value["shuffled"].items() if k != "Class accuracy"} == \
        {k: v for k, v in value["real"].items() if k != "Class accuracy"}


def test_samples_without_labels_are_evaluated_and_said_to_have_no_class_accuracy(tmp_path, capsys):
    images, _ = fresh_images(24, seed=4)
    np.savez(tmp_path / "unlabelled.npz", arr_0=images)
    shipped = sorted(p.name for p in SHIPPED.iterdir())  # (a user's evaluation may have left a cache there)
    report = evaluate(shipped_reference(tmp_path), tmp_path / "unlabelled.npz")
    assert list(report) == ["Features", "Classifier Score", "FID", "sFID", "Precision", "Recall"]
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert warnings == [f"warning: {tmp_path / 'unlabelled.npz'} has no arr_1 (the labels the samples were "
                        "conditioned on; sample_c2i_ddp.py writes them): no class accuracy"]
    assert (tmp_path / "unlabelled.npz.classifier.npz").is_file()  # its own cache, beside Inception's
    assert sorted(p.name for p in SHIPPED.iterdir()) == shipped  # the copy's cache is beside the copy
    assert not (tmp_path / "unlabelled.txt").exists()  # an Inception report of the same file is not replaced


# -- the command -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("classifier") / "images", 96, 16, seed=6)


def test_the_classifier_command_writes_weights_and_record(small_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the output, given as an absolute path, is recorded relative to the working folder
    argv = ["--images", str(small_folder), "--output", str(tmp_path / "out"), "--epochs", "2", "--width", "4"]
    classifier.main(argv)
    assert capsys.readouterr().out.startswith("86 training and 10 held-out images of 12 classes (16x16)")
    record = json.loads((tmp_path / "out" / classifier.RECORD_FILE).read_text())
    assert record["image_size"] == 16 and record["classes"] == [class_folder(i) for i in range(12)]
    assert record["features"] == {"pool": 16, "spatial": 4 * 4 * classifier.SPATIAL_CHANNELS, "logits": 12}
    assert record["command"] == "python -m evaluations.c2i.classifier " + " ".join(argv).replace(str(tmp_path / "out"), "out")
    assert 0 <= record["held_out"]["accuracy"] <= 1 and record["held_out"]["images"] == 10
    model, loaded = classifier.load_classifier(tmp_path / "out" / classifier.WEIGHTS_FILE)
    assert loaded == record
    weights = tmp_path / "out" / classifier.WEIGHTS_FILE
    assert weights.stat().st_mode & 0o777 == (tmp_path / "out" / classifier.RECORD_FILE).stat().st_mode & 0o777
    pool, spatial, logits = model(torch.rand(3, 3, 16, 16) * 255)
    assert pool.shape == (3, 16) and spatial.shape == (3, 4, 4, classifier.SPATIAL_CHANNELS) and logits.shape == (3, 12)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [classifier.RECORD_FILE, classifier.WEIGHTS_FILE]


def test_the_held_out_images_are_a_stratified_draw_kept_out_of_training(small_folder, tmp_path, monkeypatch):
    seen = {}

    def fake_train(images, labels, num_classes, *args, **kwargs):
        seen["train"], seen["held_out"] = labels, args[-1][1]
        return classifier.ClassifierCNN(num_classes, 2).eval(), [0.5]

    monkeypatch.setattr(classifier, "train", fake_train)
    monkeypatch.setattr(classifier, "save", lambda *args: None)
    classifier.main(["--images", str(small_folder), "--output", str(tmp_path), "--holdout", "0.25"])
    assert (np.bincount(seen["held_out"], minlength=12) == 2).all()  # 24 of 96: two of each class
    assert (np.bincount(seen["train"], minlength=12) == 6).all()


def one_line(module: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    return proc.stderr


def test_the_classifier_command_refuses_bad_input_in_one_line(small_folder, tmp_path):
    def refused(*args: str) -> str:
        with pytest.raises(UserError) as raised:
            classifier.main(list(args))
        return str(raised.value)

    out = str(tmp_path / "out")
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        (flat / f"{i}.png").write_bytes((small_folder / class_folder(0) / f"{12 * i:06d}.png").read_bytes())
    assert "a classifier needs class subfolders" in refused("--images", str(flat), "--output", out)
    lonely = tmp_path / "lonely"
    for label, count in ((0, 3), (1, 1)):
        (lonely / f"c{label}").mkdir(parents=True)
        for i in range(count):
            (lonely / f"c{label}" / f"{i}.png").write_bytes((flat / f"{i}.png").read_bytes())
    assert "class 'c1' has 1 readable image(s); every class needs at least 2" in refused(
        "--images", str(lonely), "--output", out)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / classifier.WEIGHTS_FILE).write_bytes(b"x")
    assert "already holds classifier.safetensors" in refused("--images", str(small_folder), "--output",
                                                             str(tmp_path / "taken"))
    assert "--holdout: must be" in one_line("evaluations.c2i.classifier", "--images", str(small_folder),
                                            "--output", out, "--holdout", "1.5")
    assert "image folder not found" in one_line("evaluations.c2i.classifier", "--images", str(tmp_path / "none"),
                                                "--output", out)
    assert not (tmp_path / "out").exists()


# -- the evaluator with a classifier: refusals -------------------------------------------------------------------

def test_statistics_of_other_features_are_refused(tmp_path, monkeypatch):
    """A reference's statistics are only compared with statistics of the same features: not a classifier's
    with Inception's, not one classifier's with another's (other weights), not ADM's Inception statistics
    with a classifier's."""
    folder = write_image_folder(tmp_path / "images", 48, demo.image_size(), seed=7)
    reference_batch.main([str(folder), str(tmp_path / "ref.npz"), "--statistics", "--features", str(WEIGHTS)])
    images, labels = fresh_images(24, seed=4)
    np.savez(tmp_path / "samples.npz", arr_0=images, arr_1=labels)
    # another classifier: the shipped weights with one change
    other, record = classifier.load_classifier(WEIGHTS)
    with torch.no_grad():
        other.head.bias += 1
    classifier.save(other, record, tmp_path / "other")
    with pytest.raises(UserError, match=r"ref.npz holds statistics of classifier features of other weights"):
        evaluator.main([str(tmp_path / "ref.npz"), str(tmp_path / "samples.npz"), "--features",
                        str(tmp_path / "other" / classifier.WEIGHTS_FILE)])
    # found before any network is loaded: no Inception weights are needed to learn that they would not fit
    with pytest.raises(UserError, match=r"ref.npz holds statistics of classifier features \(sha256 \w+\), this "
                                        "evaluation uses inception features; evaluate with"):
        evaluator.main([str(tmp_path / "ref.npz"), str(tmp_path / "samples.npz"), "--inception-weights",
                        str(tmp_path / "missing.pth")])
    (tmp_path / "inception.pth").write_bytes(b"")
    monkeypatch.setattr(evaluator.FIDInceptionV3, "from_file", lambda path: torch.nn.Identity())
    with pytest.raises(UserError, match=r"ref.npz holds statistics of classifier features \(sha256 \w+\), this "
                                        "evaluation uses inception"):
        evaluator.main([str(tmp_path / "ref.npz"), str(tmp_path / "samples.npz"), "--inception-weights",
                        str(tmp_path / "inception.pth")])
    np.savez(tmp_path / "adm.npz", arr_0=images, mu=np.zeros(2048), sigma=np.eye(2048), mu_s=np.zeros(2023),
             sigma_s=np.eye(2023))
    with pytest.raises(UserError, match="adm.npz holds statistics of inception features"):
        evaluate(tmp_path / "adm.npz", tmp_path / "samples.npz")
    assert not list(tmp_path.glob("samples*.txt"))
    # the same classifier's statistics are used
    report = evaluate(tmp_path / "ref.npz", tmp_path / "samples.npz")
    assert float(report["Class accuracy"]) >= 0.9


def test_bad_classifier_inputs_are_one_line_errors(small_folder, tmp_path):
    ref = shipped_reference(tmp_path)
    size = demo.image_size()
    np.savez(tmp_path / "labels.npz", arr_0=np.zeros((4, size, size, 3), np.uint8), arr_1=np.array([0, 1, 2, 12]))
    assert "arr_1 holds labels 0..12, but the classifier knows 12 classes (0..11)" in one_line(
        "evaluations.c2i.evaluator", ref, str(tmp_path / "labels.npz"), "--features", str(WEIGHTS))
    np.savez(tmp_path / "count.npz", arr_0=np.zeros((4, size, size, 3), np.uint8), arr_1=np.zeros(3, np.int64))
    assert "arr_1 must hold one integer label per image (4)" in one_line(
        "evaluations.c2i.evaluator", ref, str(tmp_path / "count.npz"), "--features", str(WEIGHTS))
    np.savez(tmp_path / "small.npz", arr_0=np.zeros((4, size // 2, size // 2, 3), np.uint8))
    assert f"but the classifier judges {size}x{size} px images" in one_line(
        "evaluations.c2i.evaluator", ref, str(tmp_path / "small.npz"), "--features", str(WEIGHTS))
    assert "--features: must be 'inception' or a classifier's .safetensors" in one_line(
        "evaluations.c2i.evaluator", ref, str(tmp_path / "small.npz"), "--features", "inception.pth")
    assert "classifier not found" in one_line("evaluations.c2i.evaluator", ref, str(tmp_path / "small.npz"),
                                              "--features", str(tmp_path / "none.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    assert "cannot read" in one_line("evaluations.c2i.evaluator", ref, str(tmp_path / "small.npz"),
                                     "--features", str(tmp_path / "junk.safetensors"))
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    assert "is not a classifier of python -m evaluations.c2i.classifier" in one_line(
        "evaluations.c2i.evaluator", ref, str(tmp_path / "small.npz"), "--features", str(tmp_path / "model.safetensors"))
    assert f"--image-size {size * 2}: the classifier" in one_line(
        "evaluations.c2i.reference_batch", str(small_folder), str(tmp_path / "r.npz"), "--features", str(WEIGHTS),
        "--image-size", str(size * 2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["count.npz", "junk.safetensors", "labels.npz",
                                                          "model.safetensors", "reference.npz", "small.npz"]
    # nothing written: no report, no feature cache


# -- the full recipe ------------------------------------------------------------------------------------------------

@pytest.mark.slow  # about 45 s on 2 CPU cores (one thread): the demo's recipe, 4,000 images, 10 epochs
def test_the_demos_classifier_recipe_reaches_95_percent_on_held_out_and_fresh_images(tmp_path):
    folder = write_image_folder(tmp_path / "images", demo.FULL.images, demo.image_size(), seed=0)
    classifier.main(["--images", str(folder), "--output", str(tmp_path / "out"), "--image-size",
                     str(demo.image_size()), "--epochs", str(demo.FULL.classifier_epochs)])
    model, record = classifier.load_classifier(tmp_path / "out" / classifier.WEIGHTS_FILE)
    assert record["held_out"]["accuracy"] >= 0.95 and record["held_out"]["images"] == demo.FULL.images // 10
    images, labels = fresh_images(600, seed=5)
    assert (classifier.predict(model, images) == labels).mean() >= 0.95


def test_the_recorded_command_names_paths_under_the_working_folder_relative_to_it(tmp_path, monkeypatch):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.chdir(tmp_path / "link")  # the working folder reached through a link
    inside = tmp_path / "link"
    assert [classifier.relative_to_cwd(a) for a in [f"--output={inside / 'out'}", str(inside / "a" / ".." / "b"),
                                                    str(tmp_path / "real" / "c"), "/elsewhere/d", "--epochs", "e/f"]] \
        == ["--output=out", "b", "c", "/elsewhere/d", "--epochs", "e/f"]
