r"""Sample N images (50,000 by default) across processes and pack them into an ADM-format .npz for FID.

    accelerate launch sample_c2i_ddp.py --experiment_dir <run> --cfg-scale 2.0 --output-dir samples
    -> samples/epoch-299-topk-0-topp-1.0-temperature-1.0-cfg-2.0-seed-0.npz   (arr_0: uint8 [N, H, W, 3])
    accelerate launch sample_c2i_ddp.py --gpt-model GPT-L --gpt-ckpt c2i_L_256.pt --vq-ckpt vq_ds16_c2i.pt \
        --image-size 256 --cfg-scale 2.0     # a released LlamaGen checkpoint, same sampler and file format
    -> samples/GPT-L-c2i_L_256-size-256-topk-0-topp-1.0-temperature-1.0-cfg-2.0-seed-0.npz

Every class gets N / classes images, in a random order drawn from ``--seed`` (``FidLabels``: each chunk's
labels computed alone, never all N at once; they are stored as ``arr_1``): the Inception Score is averaged over
splits of 5,000 consecutive images, which then hold all classes, as in LlamaGen's and DiT's files (labels drawn
at random); in class order each split would hold 100 of 1,000 classes and IS would come out far too low. A job
whose .npz (and its chunks) cannot fit on the output's file system is refused before sampling. Image n uses seed
``seed * 1000003 + n``, so its label and tokens are the same on any number of processes (its pixels too
where the tokenizer's decoder runs the same kernels: the same batch size and thread count on CPUs). Chunks
of ``--per-proc-batch-size`` images are saved as they finish: rerun the same command after a kill and only
missing chunks are sampled. The .npz records the job that made it (the run, sample count, weights, tokenizer,
every sampling flag, the label order): rerunning the same command finds it done; another run's file under the
same name is left alone and this run's name gets the run appended (``sample_cli.sample_name``); another job of
the same run is refused. 384 px samples can be resized for FID with ``--image-size-eval 256`` (the decoder's output,
bicubic, before quantisation, as LlamaGen does).
"""
import argparse
import fcntl
import hashlib
import json
import shutil
import time
import zipfile
import zlib
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from dpar.errors import ArgumentParser, UserError, first_line, run_main
from dpar.fileio import (atomic_path, atomic_write_text, check_output_dir, check_output_file, claim_output,
                         lock_folder, npy_header)
from dpar.launch import make_accelerator
from dpar.validation import number
from sample_cli import (add_sampling_arguments, run_record, sample_file_stem, sample_name, sampler_from_args,
                        sampling_from_args)


# what the job record says of the labels (a file of an older version recorded another text, and is not reused)
LABEL_ORDER = ("class-balanced (class m * classes // N at position m < N); sample n takes position pi(n), pi a "
               "Feistel permutation of [0, N) (8 rounds of a splitmix64 mix, cycle walking) keyed by "
               "numpy.random.default_rng(seed); labels in arr_1")


class FidLabels:
    """The labels of samples 0..N-1 of an FID run, computed for any indices without materialising all N (a
    billion labels would take 8 GB): ``labels[a:b]``, ``labels[indices]``, ``np.asarray(labels)`` (all N).

    Each class gets N / num_classes samples (N // num_classes or one more when it does not divide): position m
    of the class-sorted list holds class ``m * num_classes // N``, and sample n takes position ``pi(n)``, where
    ``pi`` is a bijection of [0, N) drawn from ``seed``: a balanced Feistel network on the smallest domain of
    2^(2h) >= N values, whose round function mixes the right half with a round key (the 64-bit finaliser of
    splitmix64), walked again while it lands outside [0, N) (cycle walking keeps a bijection). The order is
    random-looking, so that every split of 5,000 consecutive samples holds (nearly) all classes: ADM's evaluator
    averages the Inception Score over such splits, and in class order a split holds 100 of 1,000 classes and IS
    comes out far too low. A label depends on n, N, the class count and the seed alone, not on the process
    count or the batch. FID, sFID, precision and recall do not depend on the order.
    """

    ROUNDS = 8

    def __init__(self, num_samples: int, num_classes: int, seed: int):
        assert num_samples >= 1 and num_classes >= 1 and seed >= 0
        self.num_samples, self.num_classes, self.seed = num_samples, num_classes, seed
        bits = max(2, (num_samples - 1).bit_length())
        self.half = np.uint64((bits + 1) // 2)
        self.mask = np.uint64((1 << int(self.half)) - 1)
        self.keys = np.random.default_rng(seed).integers(0, 2**64 - 1, size=self.ROUNDS, dtype=np.uint64,
                                                         endpoint=True)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: slice | np.ndarray) -> np.ndarray:
        """int64 labels of the samples ``index`` (a slice, or indices in [0, N))."""
        n = np.arange(*index.indices(self.num_samples), dtype=np.int64) if isinstance(index, slice) \
            else np.asarray(index, dtype=np.int64)
        assert n.size == 0 or (n.min() >= 0 and n.max() < self.num_samples), "sample index outside [0, N)"
        position = self.position(n)
        if self.num_samples * self.num_classes < 2**63:
            return position * self.num_classes // self.num_samples
        return (position.astype(object) * self.num_classes // self.num_samples).astype(np.int64)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        labels = self[0:self.num_samples]
        return labels if dtype is None else labels.astype(dtype)

    def position(self, n: np.ndarray) -> np.ndarray:
        """``pi(n)``: where samples ``n`` sit in the class-sorted list (a bijection of [0, N))."""
        x = self._feistel(np.asarray(n, dtype=np.uint64))
        outside = x >= self.num_samples
        while outside.any():  # cycle walking: fewer than 4 rounds on average (the domain is < 4 N)
            x[outside] = self._feistel(x[outside])
            outside = x >= self.num_samples
        return x.astype(np.int64)

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.mask
        for key in self.keys:
            left, right = right, left ^ (_mix64(right ^ key) & self.mask)
        return (left << self.half) | right

    def sha256(self, chunk: int = 1 << 20) -> str:
        """sha256 of all N labels as little-endian int64, computed ``chunk`` labels at a time."""
        digest = hashlib.sha256()
        for start in range(0, self.num_samples, chunk):
            digest.update(self[start:start + chunk].astype("<i8").tobytes())
        return digest.hexdigest()


def _mix64(x: np.ndarray) -> np.ndarray:
    """A 64-bit mixing function (splitmix64's finaliser: xor-shifts and two odd multipliers, wrapping)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def fid_labels(num_samples: int, num_classes: int, seed: int) -> np.ndarray:
    """All int64 labels of :class:`FidLabels` (samples 0..N-1) as one array."""
    return np.asarray(FidLabels(num_samples, num_classes, seed))


def check_disk_space(npz: Path, num_samples: int, size: int, chunk: int) -> None:
    """``UserError`` naming ``--num-fid-samples``, before any sampling, when the file system of ``npz`` lacks
    room for what the job writes: the ``.npz`` (``N x size x size x 3`` bytes of images, and the labels) and,
    until it is packed, the chunks of ``<name>.parts`` not yet written (a resumed run's count as written)."""
    per_image = size * size * 3
    parts = npz.with_suffix(".parts")
    written = len(list(parts.glob("chunk_*.npy"))) if parts.is_dir() else 0
    needed = num_samples * (per_image + 8) + max(0, num_samples - written * chunk) * per_image + (1 << 20)
    folder = npz.parent
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise UserError(f"--num-fid-samples {num_samples}: {size}x{size} samples need {needed / 1e9:,.1f} GB on "
                        f"{folder} (the .npz, and its chunks until they are packed), which has {free / 1e9:,.1f} GB "
                        "free; sample fewer or choose another --output-dir")


class SampleChunks:
    """Resumable output of a sharded sampling run: ``<name>.parts/chunk_*.npy``, then one ADM ``<name>.npz``.

    Chunk k holds samples ``k * chunk .. (k + 1) * chunk - 1`` and belongs to process ``k % processes``.
    Each chunk is written atomically, so a killed run redoes only missing chunks, and ``pack`` writes
    exactly ``num_samples`` images in sample order. The ``.npz`` also records ``job`` (key ``dpar_job``,
    JSON): everything that decides its images. An existing ``.npz`` is reused only by the same job; another
    job's is refused, never silently kept. While a run writes, every process holds a lock on the parts
    folder, so a second run on the same output is refused while any process of the first lives, and the main
    process claims the ``.npz`` (:func:`dpar.fileio.claim_output`), so no other writer of it runs meanwhile.
    The parts folder must be a folder, not a link: it is removed once packed.
    """

    JOB_KEY = "dpar_job"

    def __init__(self, npz_path: str | Path, num_samples: int, chunk: int, job: dict,
                 labels: np.ndarray | None = None):
        assert labels is None or len(labels) == num_samples
        self.npz_path, self.num_samples, self.chunk, self.labels = Path(npz_path), num_samples, chunk, labels
        self.parts = self.npz_path.with_suffix(".parts")
        self.job = {"num_samples": num_samples, **job}  # the likeliest difference is named first
        self.count = -(-num_samples // chunk)
        self._lock: int | None = None

    def finished(self) -> bool:
        """Whether this job's ``.npz`` exists (parts a killed run left next to it are removed). Raises
        :class:`UserError` for an ``.npz`` of another job, or one that does not say which job made it."""
        check_output_file(self.npz_path, "the samples file")
        check_output_dir(self.parts, "the samples' parts folder", removed=True)
        if not self.npz_path.exists():
            return False
        recorded = _recorded_job(self.npz_path, self.JOB_KEY)
        if zipfile.ZipFile(self.npz_path).testzip() is not None:  # reads it all: a bad CRC is not "done"
            raise UserError(f"{self.npz_path} is damaged (bad CRC); delete it and rerun")
        changed = [key for key in self.job if recorded.get(key) != self.job[key]]
        if changed:
            key = changed[0]
            raise UserError(f"{self.npz_path} exists from another sampling job ({key} {recorded.get(key)!r}, this "
                            f"run {self.job[key]!r}); delete it or choose another --output-dir")
        self._check_contents()
        shutil.rmtree(self.parts, ignore_errors=True)
        return True

    def _check_contents(self) -> None:
        """The finished ``.npz`` holds what its record says: ``arr_0`` uint8 ``[N, H, W, 3]`` (read from its
        header) and, when this job has labels, ``arr_1`` equal to them; else one line (it is not reused)."""
        problem = None
        with zipfile.ZipFile(self.npz_path) as archive:
            if "arr_0.npy" not in archive.namelist():
                problem = "no arr_0"
            else:
                with archive.open("arr_0.npy") as member:
                    shape, _, dtype = npy_header(member)
                if dtype != np.uint8 or len(shape) != 4 or shape[0] != self.num_samples or shape[-1] != 3:
                    problem = f"arr_0 is {dtype} {list(shape)}, not uint8 [{self.num_samples}, H, W, 3]"
            if problem is None and self.labels is not None:
                with np.load(self.npz_path) as data:
                    stored = data["arr_1"] if "arr_1" in data.files else None
                if stored is None or not np.array_equal(stored, np.asarray(self.labels)):
                    problem = "its labels (arr_1) are not this job's"
        if problem:
            raise UserError(f"{self.npz_path} records this sampling job but {problem}; delete it and rerun")

    def start(self, main_process: bool) -> None:
        """Take this run's lock on the parts folder; the main process first checks that an unfinished run
        there was the same job, then creates the folder. Call on the main process, then on the others."""
        job = {**self.job, "chunk": self.chunk}
        job_file = self.parts / "job.json"
        if main_process:
            if job_file.is_file() and any(self.parts.glob("chunk_*.npy")):  # parts with no chunk block nothing
                try:
                    previous = json.loads(job_file.read_text())
                except (OSError, ValueError, RecursionError):  # RecursionError: JSON nested too deep
                    previous = None
                if not isinstance(previous, dict):
                    raise UserError(f"{job_file} is damaged; delete {self.parts} to start over")
                changed = [k for k in job if previous.get(k) != job[k]]
                if changed:
                    raise UserError(f"{self.parts} holds an unfinished run with {changed[0]}="
                                    f"{previous.get(changed[0])!r}; this run has {job[changed[0]]!r} (delete the "
                                    "folder to start over)")
            self.parts.mkdir(parents=True, exist_ok=True)
        self._lock = lock_folder(self.parts, "a sampling run", shared=not main_process)
        if main_process:
            claim_output(self.npz_path, "the samples file")
            fcntl.flock(self._lock, fcntl.LOCK_SH)  # others of this run may now join
            if not job_file.is_file() or not any(self.parts.glob("chunk_*.npy")):
                atomic_write_text(job_file, json.dumps(job, indent=1) + "\n")

    def file(self, k: int) -> Path:
        return self.parts / f"chunk_{k:06d}.npy"

    def todo(self, rank: int, processes: int) -> list[int]:
        return [k for k in range(rank, self.count, processes) if not self.file(k).is_file()]

    def indices(self, k: int) -> Tensor:
        return torch.arange(k * self.chunk, min((k + 1) * self.chunk, self.num_samples))

    def _chunk(self, k: int, image_shape: tuple[int, ...] | None = None) -> np.ndarray:
        """Chunk ``k``: uint8 ``[images of chunk k, H, W, 3]`` (``H, W, 3`` = ``image_shape`` when given); a damaged
        or foreign one is removed, so that the rerun samples it again."""
        try:
            images = np.load(self.file(k), allow_pickle=False)
            rows = len(self.indices(k))
            if (images.dtype != np.uint8 or images.ndim != 4 or len(images) != rows or images.shape[-1] != 3
                    or (image_shape is not None and images.shape[1:] != image_shape)):
                raise ValueError(f"it holds {images.dtype} {list(images.shape)}, not uint8 [{rows}, "
                                 f"{', '.join(map(str, image_shape or ('H', 'W', 3)))}]")
            return images
        except (OSError, ValueError, EOFError) as error:
            self.file(k).unlink(missing_ok=True)
            raise UserError(f"{self.file(k)} was damaged ({first_line(error)}) and is removed; rerun the same "
                            "command to sample it again") from None

    def write(self, k: int, images: np.ndarray) -> None:
        with atomic_path(self.file(k)) as tmp, open(tmp, "wb") as f:
            np.save(f, images)

    def pack(self) -> Path:
        """All chunks -> ``arr_0 uint8 [N, H, W, 3]`` in sample order, ``arr_1`` their labels (as ADM's class-
        conditional samples; when given) and the job, written atomically; parts removed."""
        missing = [k for k in range(self.count) if not self.file(k).is_file()]
        if missing:
            raise UserError(f"{self.parts} lacks chunk {missing[0]}; rerun the same command to finish it")
        first = self._chunk(0)
        images = np.concatenate([first] + [self._chunk(k, first.shape[1:]) for k in range(1, self.count)])
        with atomic_path(self.npz_path) as tmp, open(tmp, "wb") as f:
            labels = {} if self.labels is None else {"arr_1": np.asarray(self.labels, dtype=np.int64)}
            np.savez(f, arr_0=images, **labels, **{self.JOB_KEY: np.array(json.dumps(self.job, sort_keys=True))})
        shutil.rmtree(self.parts)
        return self.npz_path


def _recorded_job(npz_path: Path, key: str) -> dict:
    """The job an ``.npz`` of :class:`SampleChunks` records; UserError for a file that records none."""
    try:
        with np.load(npz_path) as data:
            if key not in data.files:
                raise UserError(f"{npz_path} exists but does not record the sampling job that made it (an older "
                                "version or another tool wrote it); delete it or choose another --output-dir")
            job = json.loads(str(data[key]))
    except (OSError, ValueError, zipfile.BadZipFile, zlib.error, EOFError, RecursionError) as error:
        raise UserError(f"{npz_path} exists but cannot be read ({type(error).__name__}: {error}); delete it") from None
    if not isinstance(job, dict):
        raise UserError(f"{npz_path} records a sampling job that is not a mapping ({str(job)[:60]}); delete it")
    return job


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampling_arguments(parser)
    parser.add_argument("--num-fid-samples", type=number(int, min=1), default=50_000)
    parser.add_argument("--per-proc-batch-size", type=number(int, min=1), default=32,
                        help="images per step and per saved chunk")
    parser.add_argument("--image-size-eval", type=number(int, min=1), default=None,
                        help="resize samples to this size (e.g. 256)")
    args = parser.parse_args(argv)
    check_output_dir(args.output_dir, "--output-dir")
    accelerator = make_accelerator()
    sampler = sampler_from_args(args, accelerator.device)
    sampling = sampling_from_args(args)
    sampler.check(sampling)
    accelerator.print(f"sampling {sampler.weights} ({sampler.name})")
    stem = sample_file_stem(sampler.name, sampling, args.seed, args.threshold, args.max_patch_length,
                            sampler.patcher is not None and sampler.patcher.mode == "self_entropy", args.ema)
    run = run_record(sampler)
    stem, note = sample_name(args.output_dir, stem, (".npz", ".parts"), run, sampler.weights)
    if note:
        accelerator.print(note)
    npz = Path(args.output_dir) / f"{stem}.npz"
    if not npz.exists() or _recorded_job(npz, SampleChunks.JOB_KEY).get("num_samples") != args.num_fid_samples:
        # a finished job's file needs no room; another job's is refused below, after the labels' hash
        check_disk_space(npz, args.num_fid_samples, args.image_size_eval or sampler.model_config.image_size,
                         args.per_proc_batch_size)
    labels = FidLabels(args.num_fid_samples, sampler.model_config.num_classes, args.seed)
    job = {**sampler.identity(), "run": run, "epoch": sampler.epoch, "ema": args.ema, "seed": args.seed,
           "label_order": LABEL_ORDER, "labels_sha256": labels.sha256(),
           "sampling": asdict(sampling), "image_size_eval": args.image_size_eval}
    chunks = SampleChunks(npz, args.num_fid_samples, args.per_proc_batch_size, job, labels)
    if chunks.finished():
        accelerator.print(f"{npz} exists with these {args.num_fid_samples} samples; nothing to do")
        return
    if accelerator.is_main_process:
        chunks.start(main_process=True)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        chunks.start(main_process=False)

    todo = chunks.todo(accelerator.process_index, accelerator.num_processes)
    kept = sum(chunks.file(k).is_file() for k in range(chunks.count))
    if kept:  # a killed run of this job left chunks: only the others are sampled
        accelerator.print(f"resuming: {kept} of {chunks.count} chunks of {chunks.parts} are done")
    started, done, steps, tokens = time.perf_counter(), 0, 0, 0
    bar = tqdm(todo, desc="sampling", unit="chunk", disable=not accelerator.is_local_main_process)
    for k in bar:
        index = chunks.indices(k)
        images, out = sampler.sample(torch.from_numpy(labels[index.numpy()]).to(accelerator.device),
                                     args.seed * 1_000_003 + index, sampling,
                                     image_size=args.image_size_eval, static_shapes=args.static_shapes)
        chunks.write(k, images.cpu().numpy())
        done, steps, tokens = done + len(index), steps + int(out.global_steps.sum()), tokens + out.tokens.numel()
        bar.set_postfix(img_s=f"{done * accelerator.num_processes / (time.perf_counter() - started):.2f}",
                        tok_patch=f"{tokens / steps:.2f}")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        chunks.pack()
        accelerator.print(f"{args.num_fid_samples} samples -> {npz}")


if __name__ == "__main__":
    run_main(main, interrupted="the chunks sampled so far are kept: rerun the same command to continue")
