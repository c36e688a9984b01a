"""The token store: VQ tokens (and entropies) of every view of every image, in memory-mapped shards.

::

    <store>/meta.json                   resolution, grid, codebook, views, counts, classes, tokenizer and
                                        entropy-model identity; ``tokens.complete`` once every shard exists
    <store>/skipped.txt                 images that could not be read: path and reason, one per line
    <store>/shards/tokens_00000.npy     uint16 [images, views, N]   (N = grid * grid, raster order)
    <store>/shards/labels_00000.npy     int16  [images]
    <store>/shards/tokens_00000.json    the shard's image count and skipped images
    <store>/shards/entropies_00000.npy  float16 [images, views, N]  (nats; the first token is +inf)

Shard ``k`` holds the readable images among inputs ``k * shard_size .. (k + 1) * shard_size - 1``.
Each file is written under a temporary name and renamed, and a shard counts as done once its
``tokens`` (or ``entropies``) file exists, so an interrupted run redoes only unfinished shards.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from dpar.errors import UserError
from dpar.fileio import atomic_path, atomic_write_text

META_FILE = "meta.json"
SKIPPED_FILE = "skipped.txt"
SHARDS = "shards"
# The entropies' dtype on disk, and the precision of every boundary decision: dpar.patcher rounds a live entropy
# to it before comparing it with θ (dpar.patcher.BOUNDARY_DTYPE is this dtype), so that sampling, patch maps and
# calibration cut the patches training cuts from the store.
ENTROPY_DTYPE = np.float16
_FLOAT16_EXPONENT, _FLOAT16_INF, _FLOAT16_NEGATIVE_ZERO = 0x7C00, 0x7C00, 0x8000  # entropy_problem reads the bits
assert np.dtype(ENTROPY_DTYPE) == np.float16, "entropy_problem reads float16 bit fields"


def shard_file(store: str | Path, kind: str, shard: int, suffix: str = ".npy") -> Path:
    return Path(store) / SHARDS / f"{kind}_{shard:05d}{suffix}"


def write_array(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def read_meta(store: str | Path) -> dict[str, Any] | None:
    path = Path(store) / META_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not valid JSON ({error}); delete the store and preprocess again") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("tokens"), dict) or "grid" not in meta:
        raise UserError(f"{path} is not a token store's meta.json (no 'tokens' record or 'grid'); delete the store "
                        "and preprocess again")
    counts = {key: meta.get(key) for key in ("grid", "views", "codebook_size", "image_size")}
    shard_images = meta["tokens"].get("shard_images", [])
    wrong = [f"{key} {value!r}" for key, value in counts.items() if not _positive_int(value)]
    if not isinstance(shard_images, list) or not all(_positive_int(n) or n == 0 for n in shard_images):
        wrong.append(f"tokens.shard_images {shard_images!r}")
    names = meta.get("class_names")
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        wrong.append(f"class_names {names!r}"[:80])
    if wrong:
        raise UserError(f"{path} is damaged: {wrong[0]} (expected a positive integer, a list of image counts, a "
                        "list of class names); delete the store and preprocess again")
    return meta


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def file_sha256(path: str | Path, length: int = 16) -> str:
    """A short content hash: the identity of a tokenizer or entropy-model checkpoint."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]


def entropy_problem(entropies: np.ndarray) -> str | None:
    """What makes ``entropies [..., N]`` (nats, :data:`ENTROPY_DTYPE`) unusable, e.g. "entropy nan at view 0,
    token 17", or None when every entropy is finite and >= 0 but the first token's, which the store marks +inf
    (it always starts a patch). Checked where a store's entropies are read and before the entropies stage
    writes them; on the bit patterns, several times faster than float16 comparisons in numpy."""
    entropies = np.asarray(entropies, dtype=ENTROPY_DTYPE)
    bits = entropies.view(np.uint16)
    bad = ((bits & _FLOAT16_EXPONENT) == _FLOAT16_EXPONENT) | (bits > _FLOAT16_NEGATIVE_ZERO)  # inf/NaN, < 0
    bad[..., :1] &= bits[..., :1] != _FLOAT16_INF  # the first token's +inf is the store's mark
    if not bad.any():
        return None
    where = np.unravel_index(int(np.argmax(bad)), bad.shape)
    names = ("image", "view", "token")[-len(where):] if len(where) <= 3 else [f"axis {d}" for d in range(len(where))]
    return f"entropy {entropies[where]} at " + ", ".join(f"{name} {int(i)}" for name, i in zip(names, where))


class TokenStore:
    """Read access to a complete store. Shards are memory-mapped on first use in each process."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_file():
            raise UserError(f"{self.path} is a file; a token store is a folder made by preprocess_tokens.py")
        meta = read_meta(self.path)
        if meta is None:
            raise UserError(f"no token store at {self.path} (missing {META_FILE}); run preprocess_tokens.py "
                            "--stage tokens first")
        if not meta["tokens"].get("complete"):
            raise UserError(f"token store {self.path} is incomplete; rerun preprocess_tokens.py --stage tokens "
                            "(it continues where it stopped)")
        self.meta = meta
        self.shard_images = list(meta["tokens"]["shard_images"])
        self.offsets = np.cumsum([0] + self.shard_images)
        self._open: dict[tuple[str, int], np.ndarray] = {}
        self.labels = np.concatenate([self._array("labels", k) for k in range(len(self.shard_images))]) \
            if self.shard_images else np.zeros(0, np.int16)
        for k in range(len(self.shard_images)):  # every shard's header, so a damaged store stops here
            self._array("tokens", k)
        self._open.clear()

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers map the files themselves
        return {**self.__dict__, "_open": {}}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def grid(self) -> int:
        return self.meta["grid"]

    @property
    def num_tokens(self) -> int:
        return self.meta["grid"] ** 2

    @property
    def views(self) -> int:
        return self.meta["views"]

    @property
    def codebook_size(self) -> int:
        return self.meta["codebook_size"]

    @property
    def num_classes(self) -> int:
        return len(self.meta["class_names"])

    @property
    def has_entropies(self) -> bool:
        return bool(self.meta.get("entropies", {}).get("complete"))

    def locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"image {index} is outside the store's {len(self)} images")
        shard = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return shard, index - int(self.offsets[shard])

    def _array(self, kind: str, shard: int) -> np.ndarray:
        """Shard ``shard``'s ``kind`` array, memory-mapped; :class:`UserError` naming the file when it is
        missing, unreadable, pickled, or not the shape and type ``meta.json`` promises."""
        key = (kind, shard)
        if key not in self._open:
            path = shard_file(self.path, kind, shard)
            dtype, tail = {"labels": (np.int16, ()), "tokens": (np.uint16, (self.views, self.num_tokens)),
                           "entropies": (ENTROPY_DTYPE, (self.views, self.num_tokens))}[kind]
            expected = (self.shard_images[shard], *tail)
            try:
                array = np.load(path, mmap_mode=None if kind == "labels" else "r", allow_pickle=False)
            except FileNotFoundError:
                raise UserError(f"token store {self.path} lacks {path.name}; rerun the preprocess_tokens.py stage "
                                "that writes it (it continues where it stopped)") from None
            except (OSError, ValueError, EOFError) as error:
                raise UserError(f"token store file {path} is damaged ({error}); delete it and rerun the "
                                "preprocess_tokens.py stage that writes it") from None
            if array.shape != expected or array.dtype != dtype:
                raise UserError(f"token store file {path} holds {array.dtype} {list(array.shape)}, meta.json promises "
                                f"{np.dtype(dtype)} {list(expected)}; delete it and rerun the preprocess_tokens.py "
                                "stage that writes it")
            self._open[key] = array
        return self._open[key]

    def tokens(self, index: int) -> np.ndarray:
        """uint16 [views, N]; :class:`UserError` for a token outside the codebook (a damaged shard)."""
        shard, row = self.locate(index)
        return self._checked_tokens(self._array("tokens", shard)[row], shard)

    def _checked_tokens(self, tokens: np.ndarray, shard: int) -> np.ndarray:
        largest = int(tokens.max(initial=0))
        if largest >= self.codebook_size:
            raise UserError(f"token store file {shard_file(self.path, 'tokens', shard)} holds token {largest}, "
                            f"outside the codebook of {self.codebook_size} (meta.json); it is damaged: delete it and "
                            "rerun preprocess_tokens.py --stage tokens")
        return tokens

    def require_entropies(self) -> None:
        if not self.has_entropies:
            raise UserError(f"token store {self.path} has no entropies; run preprocess_tokens.py --stage entropies")

    def entropies(self, index: int) -> np.ndarray:
        """float16 [views, N]; :class:`UserError` naming the shard for an entropy that is NaN, negative or
        infinite (but the first token's +inf): a damaged shard."""
        self.require_entropies()
        shard, row = self.locate(index)
        entropies = self._array("entropies", shard)[row]
        problem = entropy_problem(entropies)
        if problem is not None:
            raise UserError(f"token store file {shard_file(self.path, 'entropies', shard)} holds {problem} of image "
                            f"{index}; it is damaged: delete it and rerun preprocess_tokens.py --stage entropies")
        return entropies

    def shard_tokens(self, shard: int) -> np.ndarray:
        """uint16 [images, views, N] of one shard, checked as :meth:`tokens`."""
        return self._checked_tokens(self._array("tokens", shard), shard)
