r"""FID, sFID, Inception Score, precision and recall of ADM-format .npz batches, in PyTorch (no TensorFlow).

    python -m evaluations.c2i.evaluator VIRTUAL_imagenet256_labeled.npz \
        samples/epoch-299-topk-0-topp-1.0-temperature-1.0-cfg-2.0-seed-0.npz \
        --inception-weights pretrained_models/pt_inception-2015-12-05-6726825d.pth
    python -m evaluations.c2i.evaluator assets/demo/classifier/reference.npz samples/<sample name>.npz \
        --features assets/demo/classifier/classifier.safetensors

A port of OpenAI's ``guided-diffusion/evaluations/evaluator.py``: the same Inception graph (see
``inception.py``), features (pool_3; the first 7 channels of mixed_6/conv for sFID; the softmax of
the pool_3 logits for IS) and metric code paths. Prints the results in ADM's format and writes them
to ``SAMPLE.txt``. Reference statistics (``mu``, ``sigma``, ``mu_s``, ``sigma_s``) are taken from the
reference .npz when present, as ADM does; features computed for a file are cached beside it
(``<file>.inception.npz``) so a second evaluation skips the network.

The feature network is a choice (``--features``): ``inception`` (the default, ADM's numbers) or a classifier
trained by ``python -m evaluations.c2i.classifier`` on data Inception does not know (the embedded demo). The
classifier's pooled features then take pool_3's place (FID, precision, recall), its spatial features
mixed_6/conv's (sFID), its softmax the 1008 classes' (the IS formula, reported as ``Classifier Score``), and its
predictions give the **class accuracy**: the share of samples classified as the label they were conditioned on
(``arr_1``). The metric code is the same for both. Reference statistics record the features they were computed
with (``dpar_reference``); statistics of other features are refused. The report of a classifier evaluation
goes to ``SAMPLE.classifier.txt`` and names the classifier in its first line.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
import zipfile
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from scipy import linalg
from tqdm import tqdm

from dpar.data.store import file_sha256
from dpar.errors import ArgumentParser, UserError, run_main
from dpar.fileio import OutputBusy, atomic_path, atomic_write_text, check_output_file, claim_output, npy_header
from dpar.validation import device, number

from .classifier import load_classifier, spatial_size
from .inception import FIDInceptionV3

SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7]: 17 * 17 * 7 = 2023 features
# the statistics a reference batch may carry, and their shapes (pool_3: 2048 features; spatial: 2023)
STATS_SIZES = {"mu": (2048,), "sigma": (2048, 2048), "mu_s": (2023,), "sigma_s": (2023, 2023)}
IS_SPLIT = 5000  # ADM: the Inception Score is the mean over consecutive splits of 5,000 samples
REFERENCE_RECORD = "dpar_reference"  # how reference_batch.py made a file (JSON), with the statistics' features


# -- the metrics (each a plain function of features, as ADM computes it) -------------------------------------

def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), with ADM's (TTUR's) handling of a singular product."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different sizes: {mu1.shape}/{sigma1.shape} vs {mu2.shape}/{sigma2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"FID: singular product; adding {eps} to the diagonal of the covariances")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(probs: np.ndarray, split_size: int = IS_SPLIT) -> float:
    """Mean over consecutive splits of ``split_size`` of exp(E KL(p(y|x) || p(y))) (ADM: 10 splits for 50K)."""
    scores = []
    for start in range(0, len(probs), split_size):
        part = probs[start:start + split_size]
        kl = part * (np.log(part) - np.log(np.mean(part, axis=0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
    return float(np.mean(scores))


def pairwise_distances(u: torch.Tensor, v: torch.Tensor, half: bool = True) -> torch.Tensor:
    """Squared Euclidean distances ``[len(u), len(v)]`` as ADM's DistanceBlock computes them: in float16
    when every result is finite, else in float32."""
    def compute(a, b):
        norms_a, norms_b = a.pow(2).sum(1, keepdim=True), b.pow(2).sum(1)[None]
        return (norms_a - 2 * a @ b.t() + norms_b).clamp(min=0)

    if half:
        distances = compute(u.half(), v.half())
        if torch.isfinite(distances).all():
            return distances.float()
    return compute(u.float(), v.float())


def manifold_radii(features: torch.Tensor, k: int = 3, batch: int = 10000, half: bool = True) -> torch.Tensor:
    """Distance (squared) from each feature to its k-th nearest neighbour in the same set (itself excluded)."""
    radii = []
    for start in range(0, len(features), batch):
        rows = features[start:start + batch]
        distances = torch.cat([pairwise_distances(rows, features[c:c + batch], half)
                               for c in range(0, len(features), batch)], dim=1)
        radii.append(distances.kthvalue(k + 1, dim=1).values)  # the smallest is the point itself
    return torch.cat(radii)


def precision_recall(ref_features: np.ndarray, sample_features: np.ndarray, k: int = 3,
                     batch: int = 10000, half: bool = True) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al.) as ADM's ManifoldEstimator computes them.

    Precision: fraction of samples inside some reference feature's k-NN ball; recall: fraction of
    references inside some sample's ball. ``half`` keeps ADM's float16 distance computation.
    """
    ref, sample = torch.as_tensor(ref_features), torch.as_tensor(sample_features)
    if len(ref) <= k or len(sample) <= k:
        raise UserError(f"precision/recall needs more than k={k} features per set, got {len(ref)} and {len(sample)}")
    ref_radii, sample_radii = manifold_radii(ref, k, batch, half), manifold_radii(sample, k, batch, half)
    ref_in = torch.zeros(len(ref), dtype=torch.bool)
    sample_in = torch.zeros(len(sample), dtype=torch.bool)
    for r in range(0, len(ref), batch):
        for s in range(0, len(sample), batch):
            distances = pairwise_distances(ref[r:r + batch], sample[s:s + batch], half)
            ref_in[r:r + batch] |= (distances <= sample_radii[s:s + batch][None]).any(dim=1)
            sample_in[s:s + batch] |= (distances <= ref_radii[r:r + batch][:, None]).any(dim=0)
    return float(sample_in.double().mean()), float(ref_in.double().mean())


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64), as ADM's compute_statistics."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


# -- the feature network ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Features:
    """What a feature network gives the metrics: a network's ``forward(float [N, 3, H, W] in 0..255)`` returns
    (pooled ``[N, pool]``, spatial ``[N, h, w, c]``, logits ``[N, logits]``); the first ``spatial_channels``
    channels of the spatial output (all of them when None) give the ``spatial`` sFID features."""
    name: str                     # "inception" or "classifier": the cache's and the report's suffix
    pool: int
    logits: int
    spatial: int
    spatial_channels: int | None
    sha256: str | None            # of the weights (None: any weights of this network, e.g. ADM's own statistics)
    description: str = ""         # the report's "Features:" line
    image_size: int | None = None  # the only image size it takes (None: any; Inception resizes to 299)
    classes: tuple[str, ...] | None = None  # a classifier's classes in label order

    @property
    def identity(self) -> dict:
        """What a reference batch records of the features its statistics were computed with."""
        return {"network": self.name, "sha256": self.sha256}

    @property
    def score_name(self) -> str:
        return "Inception Score" if self.name == "inception" else "Classifier Score"

    def stats_sizes(self) -> dict[str, tuple[int, ...]]:
        return {"mu": (self.pool,), "sigma": (self.pool, self.pool), "mu_s": (self.spatial,),
                "sigma_s": (self.spatial, self.spatial)}


INCEPTION = Features("inception", 2048, 1008, STATS_SIZES["mu_s"][0], SPATIAL_CHANNELS, None,
                     "inception (ADM's FID Inception-v3)")


def inception_features(weights: str | Path) -> tuple[FIDInceptionV3, Features]:
    """The FID Inception and its features (one line when the weights are missing or foreign)."""
    network = FIDInceptionV3.from_file(weights)
    return network, replace(INCEPTION, sha256=file_sha256(weights),
                            description=f"inception {weights} (ADM's FID Inception-v3)")


def classifier_features(path: str | Path) -> tuple[torch.nn.Module, Features]:
    """A classifier of ``python -m evaluations.c2i.classifier`` and its features."""
    network, record = load_classifier(path)
    size, classes = record["image_size"], tuple(record["classes"])
    accuracy = record.get("held_out", {}).get("accuracy")
    held_out = f", held-out accuracy {accuracy:.4f}" if accuracy is not None else ""
    return network, Features("classifier", record["features"]["pool"], len(classes), spatial_size(size), None,
                             file_sha256(path), f"classifier {path} ({len(classes)} classes, {size} px{held_out})",
                             size, classes)


def features_flag(text: str) -> str | Path:
    """An argparse ``type`` for ``--features``: ``inception`` or a classifier's ``.safetensors``."""
    if text == "inception":
        return text
    if not text.endswith(".safetensors"):
        raise argparse.ArgumentTypeError("must be 'inception' or a classifier's .safetensors (python -m "
                                         f"evaluations.c2i.classifier); got {text!r}")
    return Path(text)


def load_features(choice: str | Path, inception_weights: str | Path) -> tuple[torch.nn.Module, Features]:
    """The network of ``--features`` and its :class:`Features`."""
    return inception_features(inception_weights) if choice == "inception" else classifier_features(choice)


def check_image_size(batch: ImageBatch, features: Features) -> None:
    """One line when a classifier is given images of another size than it was trained on."""
    if features.image_size is None or batch.shape[1:3] == (features.image_size,) * 2:
        return
    h, w = batch.shape[1:3]
    raise UserError(f"{batch.path}: {h}x{w} px images, but the classifier judges {features.image_size}x"
                    f"{features.image_size} px images (build the reference with --image-size "
                    f"{features.image_size}, sample at that size, or train a classifier with --image-size {h})")


# -- features of a batch file -------------------------------------------------------------------------------

@dataclass
class BatchFeatures:
    pool: np.ndarray        # [N, 2048] float32 (Inception's pool_3; a classifier's pooled features)
    probs: np.ndarray       # [N, 1008] softmax of the pool_3 logits (a classifier's softmax)
    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray
    sigma_s: np.ndarray


class ImageBatch:
    """``arr_0`` of an ADM batch file (uint8 [N, H, W, 3]), checked up front and streamed in batches from the
    zip member, so a 50K x 256 x 256 x 3 file never has to fit in memory."""

    def __init__(self, path: Path, minimum: int):
        if path.is_dir():
            raise UserError(f"batch file {path} is a folder; give an .npz (build one from an image folder with "
                            "python -m evaluations.c2i.reference_batch)")
        if not path.is_file():
            raise UserError(f"batch file not found: {path}")
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
                if "arr_0.npy" not in names:
                    keys = ", ".join(n.removesuffix(".npy") for n in names) or "none"
                    raise UserError(f"{path} has no 'arr_0' (keys: {keys}); ADM batches keep their images in arr_0")
                with archive.open("arr_0.npy") as member:
                    shape, fortran, dtype = npy_header(member)
        except (OSError, ValueError, zipfile.BadZipFile) as error:
            raise UserError(f"cannot read {path} as an .npz: {error}") from None
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or fortran:
            raise UserError(f"{path}: arr_0 must be uint8 [N, H, W, 3] images in 0..255 (C order), got {dtype} "
                            f"{list(shape)}")
        if shape[0] < minimum:
            raise UserError(f"{path}: {shape[0]} image{'s' * (shape[0] != 1)}, but the statistics need at least "
                            f"{minimum}")
        self.path, self.shape = path, shape

    def __len__(self) -> int:
        return self.shape[0]

    def batches(self, batch_size: int):
        image_bytes = int(np.prod(self.shape[1:]))
        try:
            with zipfile.ZipFile(self.path) as archive, archive.open("arr_0.npy") as member:
                npy_header(member)
                for start in range(0, len(self), batch_size):
                    count = min(batch_size, len(self) - start)
                    data = member.read(count * image_bytes)
                    yield np.frombuffer(data, dtype=np.uint8).reshape(count, *self.shape[1:])
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:  # a bad CRC, a cut file
            raise UserError(f"{self.path} is damaged: {error}") from None


@torch.no_grad()
def compute_features(network: torch.nn.Module, images: ImageBatch, batch_size: int, device: str,
                     features: Features = INCEPTION) -> BatchFeatures:
    pools, spatials, probs = [], [], []
    channels = features.spatial_channels
    for batch in tqdm(images.batches(batch_size), total=-(-len(images) // batch_size), desc=features.name,
                      unit="batch"):
        x = torch.from_numpy(batch.copy()).to(device)
        pool, spatial, logits = network(x.permute(0, 3, 1, 2).float())
        pools.append(pool.float().cpu().numpy())
        spatials.append((spatial if channels is None else spatial[..., :channels]).reshape(len(x), -1)
                        .float().cpu().numpy())
        probs.append(torch.softmax(logits.float(), dim=-1).cpu().numpy())
    pool = np.concatenate(pools)
    mu, sigma = statistics(pool)
    mu_s, sigma_s = statistics(np.concatenate(spatials))
    return BatchFeatures(pool, np.concatenate(probs), mu, sigma, mu_s, sigma_s)


def batch_features(images: ImageBatch, network_factory, weights_id: str, batch_size: int,
                   device: str, kind: Features = INCEPTION) -> BatchFeatures:
    """Features of one batch file, from its cache (``<file>.<kind.name>.npz``) when the file and the weights
    are unchanged. The cache is best effort: a batch in a read-only folder is evaluated all the same."""
    path = images.path
    stat = path.stat()
    key = f"{stat.st_size}-{stat.st_mtime_ns}-{weights_id}"
    cache = path.with_name(f"{path.name}.{kind.name}.npz")
    cached = _cached_features(cache, key, len(images), kind)
    if cached is not None:
        return cached
    features = compute_features(network_factory(), images, batch_size, device, kind)
    try:
        with atomic_path(cache) as tmp, open(tmp, "wb") as f:
            np.savez(f, key=key, **features.__dict__)
    except (OSError, OutputBusy) as error:  # a read-only folder; another evaluation writing the same cache
        reason = error.strerror if isinstance(error, OSError) else "another process is writing it"
        warnings.warn(f"cannot cache the features of {path} next to it ({reason}); computing them again next time")
    return features


def _cached_features(cache: Path, key: str, count: int, kind: Features = INCEPTION) -> BatchFeatures | None:
    """The features cached for this file and these weights, or None when there are none usable (missing,
    stale, damaged or of other shapes: they are then computed again and the cache rewritten)."""
    try:
        with np.load(cache) as cached:
            if str(cached["key"]) != key:
                return None
            features = BatchFeatures(*(cached[name] for name in ("pool", "probs", "mu", "sigma", "mu_s", "sigma_s")))
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile, zlib.error):
        return None
    expected = {"pool": (count, kind.pool), "probs": (count, kind.logits), **kind.stats_sizes()}
    return features if all(getattr(features, k).shape == v for k, v in expected.items()) else None


def reference_record(path: Path) -> dict:
    """The ``dpar_reference`` record of a batch built by ``reference_batch.py`` ({} for ADM's own files); one line
    when the file is damaged or the record is not one reference_batch.py writes."""
    try:
        with np.load(path) as stored:
            record = json.loads(str(stored[REFERENCE_RECORD])) if REFERENCE_RECORD in stored.files else {}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise UserError(f"{path} is damaged: {error}") from None
    features = record.get("features") if isinstance(record, dict) else None
    if not isinstance(record, dict) or not isinstance(features or {}, dict) or \
            not isinstance((features or {}).get("network", "inception"), str):
        raise UserError(f"{path} is damaged: its {REFERENCE_RECORD} record is not one reference_batch.py writes")
    return record


def statistics_features(path: Path) -> dict:
    """What a reference file records of the features its statistics were computed with; a file without a
    record (ADM's, or an older reference_batch.py's) holds Inception statistics of unnamed weights."""
    return reference_record(path).get("features") or {"network": "inception", "sha256": None}


def _stored_statistics(path: Path) -> dict[str, np.ndarray] | None:
    """The mu/sigma/mu_s/sigma_s arrays a reference file carries (None when it has no ``mu``); one line when the
    file is damaged."""
    try:
        with np.load(path) as stored:
            if "mu" not in stored.files:
                return None
            return {key: stored[key] for key in STATS_SIZES if key in stored.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise UserError(f"{path} is damaged: {error}") from None


def check_statistics_network(path: Path, network: str, sha256: str | None = None, uses: str | None = None) -> None:
    """Refuse statistics made with another feature network than ``network`` (``inception`` or ``classifier``)
    or, given ``sha256``, with other weights of it; ``uses`` describes this evaluation's features in the message.
    Called before any network is loaded: no Inception weights are needed to learn that a classifier's statistics
    do not fit them."""
    if _stored_statistics(path) is None:
        return
    made_with = statistics_features(path)
    theirs, their_weights = made_with.get("network"), made_with.get("sha256")
    if theirs != network or (their_weights and sha256 and their_weights != sha256):
        weights = " of other weights" if theirs == network else ""
        made = f" (sha256 {str(their_weights)[:12]})" if their_weights else " (unnamed weights)"
        raise UserError(f"{path} holds statistics of {theirs} features{weights}{made}, this evaluation uses "
                        f"{uses or network + ' features'}; evaluate with the features they were made with, or "
                        "build the reference again with these (or without --statistics)")


def reference_statistics(path: Path, kind: Features | None = None) -> dict[str, np.ndarray] | None:
    """The mu/sigma/mu_s/sigma_s a reference file carries (checked against the shapes of ``kind``'s features,
    by default ADM's Inception), or None. ADM's rule: these win over statistics computed from its arr_0.
    Statistics recorded as made with other features (another network, or other weights) are refused."""
    kind = kind or INCEPTION
    found = _stored_statistics(path)
    if found is None:
        return None
    check_statistics_network(path, kind.name, kind.sha256, kind.description)
    what = "ADM's Inception features" if kind.name == "inception" else "the classifier's features"
    for key, shape in kind.stats_sizes().items():
        if key not in found or found[key].shape != shape:
            got = list(found[key].shape) if key in found else "nothing"
            raise UserError(f"{path}: reference statistics {key} must have shape {list(shape)} ({what}), got {got}")
        if not np.issubdtype(found[key].dtype, np.number) or not np.isfinite(found[key]).all():
            raise UserError(f"{path}: reference statistics {key} must be finite numbers, got "
                            f"{'non-finite values' if np.issubdtype(found[key].dtype, np.number) else found[key].dtype}")
    return found


def batch_labels(path: Path, count: int) -> np.ndarray | None:
    """The ``arr_1`` labels of an ADM batch of ``count`` images, or None when it has none; one line when they are
    not one integer per image, or the file is damaged."""
    try:
        with np.load(path) as data:
            labels = data["arr_1"] if "arr_1" in data.files else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise UserError(f"{path} is damaged: {error}") from None
    if labels is not None and (labels.shape != (count,) or not np.issubdtype(labels.dtype, np.integer)):
        raise UserError(f"{path}: arr_1 must hold one integer label per image ({count}), got {labels.dtype} "
                        f"{list(labels.shape)}")
    return labels


def sample_labels(path: Path, count: int, kind: Features) -> tuple[np.ndarray | None, str | None]:
    """(the ``arr_1`` labels the samples were conditioned on, None) or (None, why there are none). Labels that
    do not fit the classifier (other classes) are one line."""
    labels = batch_labels(path, count)
    if labels is None:
        return None, (f"{path} has no arr_1 (the labels the samples were conditioned on; sample_c2i_ddp.py writes "
                      "them): no class accuracy")
    if count and (labels.min() < 0 or labels.max() >= kind.logits):
        raise UserError(f"{path}: arr_1 holds labels {labels.min()}..{labels.max()}, but the classifier knows "
                        f"{kind.logits} classes (0..{kind.logits - 1}); is it the classifier of these samples' data?")
    return labels, None


def with_reference_statistics(features: BatchFeatures, stored: dict[str, np.ndarray] | None) -> BatchFeatures:
    """``features`` with the statistics its file carries, when it carries them (ADM's rule)."""
    return features if stored is None else BatchFeatures(features.pool, features.probs, **stored)


def class_order_warning(path: Path, count: int, split_size: int = IS_SPLIT) -> str | None:
    """What to tell about a sample file of ``count`` samples in class order, or None. The Inception Score
    averages over splits of ``split_size`` consecutive samples (as ADM's evaluator does), which in class order
    see a few classes each: a far too low IS. Class order is known from the labels a file carries (``arr_1``,
    sorted) or its sampling job's record (an older ``sample_c2i_ddp.py`` wrote ``class_order``); a file that
    says neither, or holds one split, is taken as it is."""
    if count <= split_size:
        return None
    try:
        with np.load(path) as data:
            job = json.loads(str(data["dpar_job"])) if "dpar_job" in data.files else {}
            labels = data["arr_1"] if "arr_1" in data.files else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error):
        return None
    sorted_labels = (labels is not None and labels.ndim == 1 and len(np.unique(labels)) > 1
                     and bool((np.diff(labels) >= 0).all()))
    if not (isinstance(job, dict) and "class_order" in job) and not sorted_labels:
        return None
    return (f"{path} holds its samples in class order: the Inception Score, averaged over splits of {split_size} "
            "consecutive samples as ADM's evaluator does, comes out far too low (FID, sFID, precision and recall "
            "are unaffected); sample again with this version of sample_c2i_ddp.py (random label order) for an IS "
            "to compare with published ones")


def size_warning(ref: ImageBatch, sample: ImageBatch) -> str | None:
    """What to tell when the two batches hold images of different sizes, or None. Inception resizes both to
    299 px, so the metrics compute, but they then also measure the resampling (e.g. a 256 px reference against
    32 px samples)."""
    if ref.shape[1:3] == sample.shape[1:3]:
        return None
    (rh, rw), (sh, sw) = ref.shape[1:3], sample.shape[1:3]
    return (f"the reference images are {rh}x{rw} px and the samples {sh}x{sw} px: the metrics then also measure "
            "the resizing; build the reference at the samples' size (python -m evaluations.c2i.reference_batch "
            f"... --image-size {sh})")


def class_accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Share of samples whose predicted class is the label they were conditioned on."""
    return float((probs.argmax(1) == labels).mean())


def evaluate(ref: BatchFeatures, sample: BatchFeatures, kind: Features = INCEPTION,
             labels: np.ndarray | None = None) -> dict[str, float]:
    precision, recall = precision_recall(ref.pool, sample.pool)
    results = {kind.score_name: inception_score(sample.probs),
               "FID": frechet_distance(sample.mu, sample.sigma, ref.mu, ref.sigma),
               "sFID": frechet_distance(sample.mu_s, sample.sigma_s, ref.mu_s, ref.sigma_s),
               "Precision": precision, "Recall": recall}
    if labels is not None:
        results["Class accuracy"] = class_accuracy(sample.probs, labels)
    return results


def check_reference_classes(path: Path, kind: Features) -> None:
    """One line when the reference batch was built from a folder of other classes than the classifier's."""
    classes = reference_record(path).get("classes")
    if kind.classes is not None and classes is not None and tuple(classes) != kind.classes:
        raise UserError(f"{path} was built from a folder of other classes ({len(classes)}: {classes[0]}, ...) than "
                        f"the classifier's ({len(kind.classes)}: {kind.classes[0]}, ...)")


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ref_batch", help="reference batch .npz (e.g. ADM's VIRTUAL_imagenet256_labeled.npz)")
    parser.add_argument("sample_batch", help="sample batch .npz (arr_0: uint8 [N, H, W, 3])")
    parser.add_argument("--features", type=features_flag, default="inception",
                        help="the feature network: 'inception' (ADM's; default) or a classifier's .safetensors "
                             "(python -m evaluations.c2i.classifier), e.g. the demo's "
                             "assets/demo/classifier/classifier.safetensors")
    parser.add_argument("--inception-weights", default="pretrained_models/pt_inception-2015-12-05-6726825d.pth",
                        help="pytorch-fid's FID Inception weights (default: %(default)s, from the working folder)")
    parser.add_argument("--batch-size", type=number(int, min=1), default=64, help="images per network forward")
    parser.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    suffix = ".txt" if args.features == "inception" else ".classifier.txt"
    report_path = check_output_file(Path(args.sample_batch).with_suffix(suffix), "the report of sample_batch")

    # every input (both batches, the network, the reference's statistics, the labels) checked before any work
    ref_images, sample_images = ImageBatch(Path(args.ref_batch), 2), ImageBatch(Path(args.sample_batch), 2)
    check_statistics_network(ref_images.path, "inception" if args.features == "inception" else "classifier")
    network, kind = load_features(args.features, args.inception_weights)  # a missing or foreign file: one line
    stored = reference_statistics(ref_images.path, kind)
    labels, no_labels = (None, None) if kind.name == "inception" else sample_labels(sample_images.path,
                                                                                  len(sample_images), kind)
    for batch in (ref_images, sample_images):
        check_image_size(batch, kind)
    check_reference_classes(ref_images.path, kind)

    def network_factory() -> torch.nn.Module:
        return network.to(args.device)

    claim_output(report_path, "the report of sample_batch")
    for warning in (class_order_warning(sample_images.path, len(sample_images)),
                    size_warning(ref_images, sample_images), no_labels):
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
    if kind.name == "inception":  # a classifier's report names it in its first line
        print(f"features: {kind.description}")
    print("computing reference batch activations...")
    ref = with_reference_statistics(batch_features(ref_images, network_factory, kind.sha256, args.batch_size,
                                                   args.device, kind), stored)
    print("computing sample batch activations...")
    sample = batch_features(sample_images, network_factory, kind.sha256, args.batch_size, args.device, kind)
    print("Computing evaluations...")
    results = evaluate(ref, sample) if kind.name == "inception" else evaluate(ref, sample, kind, labels)
    # ADM's report for Inception, as it was; a classifier's report names the classifier first
    header = "" if kind.name == "inception" else f"Features: {kind.description}\n"
    report = header + "".join(f"{name}: {value}\n" for name, value in results.items())
    print(report, end="")
    atomic_write_text(report_path, report)


if __name__ == "__main__":
    run_main(main)
