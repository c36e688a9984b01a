import math

import numpy as np
import pytest
import torch

from dpar.data.store import ENTROPY_DTYPE
from dpar.models.dpar import patch_lengths
from dpar.patcher import (BOUNDARY_DTYPE, PatcherConfig, boundary_entropies, calibrate_threshold, next_patch_start,
                          patch_ids, patch_start_mask, patch_starts, patch_stats, static_patch_start_mask,
                          token_patch_start_mask)

INF = math.inf


def starts(mask: torch.Tensor) -> list[int]:
    return mask[0].nonzero().squeeze(1).tolist()


def entropy_mask(values, width=100, threshold=5.0, cap=None, row_break=True):
    return patch_start_mask(torch.tensor([values], dtype=torch.float32), grid_width=width, threshold=threshold,
                            max_patch_length=cap, row_break=row_break)


def test_first_token_always_starts_a_patch():
    assert starts(entropy_mask([0.0, 0.0, 0.0])) == [0]
    assert starts(entropy_mask([INF, 0.0, 0.0])) == [0]


def test_threshold_is_strict():
    assert starts(entropy_mask([INF, 1, 9, 1, 1, 9, 5.0, 5.01])) == [0, 2, 5, 7]


def test_cap_splits_long_low_entropy_runs():
    assert starts(entropy_mask([INF] + [0.0] * 15, cap=3)) == [0, 3, 6, 9, 12, 15]


def test_cap_counts_from_the_last_entropy_start():
    values = [INF, 0, 0, 0, 9, 0, 0, 0, 0, 0]
    assert starts(entropy_mask(values, cap=3)) == [0, 3, 4, 7]


def test_row_break():
    values = [INF] + [0.0] * 11
    assert starts(entropy_mask(values, width=4)) == [0, 4, 8]
    assert starts(entropy_mask(values, width=4, row_break=False)) == [0]


def test_row_break_restarts_the_cap_count():
    values = [INF] + [0.0] * 17
    assert starts(entropy_mask(values, width=6, cap=4)) == [0, 4, 6, 10, 12, 16]


def test_static_mode():
    mask = static_patch_start_mask(2, 12, grid_width=5, patch_length=2)
    assert starts(mask) == [0, 2, 4, 5, 7, 9, 10]
    assert torch.equal(mask[0], mask[1])
    capped = static_patch_start_mask(1, 8, grid_width=8, patch_length=5, max_patch_length=3, row_break=False)
    assert starts(capped) == [0, 3, 6]


def test_token_mode():
    assert token_patch_start_mask(2, 7).all()


def reference_loop(entropies, width, threshold, cap, row_break):
    """The rule, one token at a time (paper section 3.2.1)."""
    out = torch.zeros(entropies.shape, dtype=torch.bool)
    for b in range(entropies.shape[0]):
        length = 0
        for i in range(entropies.shape[1]):
            new = (i == 0 or entropies[b, i] > threshold or (cap is not None and length == cap)
                   or (row_break and i % width == 0))
            out[b, i] = new
            length = 1 if new else length + 1
    return out


@pytest.mark.parametrize("width,threshold,cap,row_break", [
    (4, 1.0, 4, True), (8, 1.5, 2, True), (8, 2.0, None, True), (16, 1.2, 5, False), (6, 0.3, 1, True),
    (16, 10.0, 3, False), (16, 10.0, None, False),
])
def test_vectorised_equals_loop_reference(width, threshold, cap, row_break):
    generator = torch.Generator().manual_seed(width + int(10 * threshold))
    entropies = torch.rand(8, width * width // 2, generator=generator) * 3
    entropies[:, 0] = INF
    got = patch_start_mask(entropies, grid_width=width, threshold=threshold, max_patch_length=cap,
                           row_break=row_break)
    assert torch.equal(got, reference_loop(entropies, width, threshold, cap, row_break))


def test_float16_entropies_are_accepted():
    values = torch.tensor([[INF, 1, 9, 1]], dtype=torch.float16)
    assert starts(patch_start_mask(values, grid_width=8, threshold=5, max_patch_length=None)) == [0, 2]


def test_lengths_and_ids():
    mask = torch.tensor([[1, 0, 0, 1, 1, 0], [1, 1, 0, 0, 0, 1]], dtype=torch.bool)
    assert patch_lengths(mask).tolist() == [3, 1, 2, 1, 4, 1]
    assert patch_ids(mask).tolist() == [[0, 0, 0, 1, 2, 2], [0, 1, 1, 1, 1, 2]]


def test_patch_stats():
    entropies = torch.tensor([[INF, 0, 0, 0, 9, 0, 0, 0], [INF, 9, 9, 9, 9, 9, 9, 9]])
    stats = patch_stats(entropies, grid_width=8, threshold=5, max_patch_length=None)
    assert stats["patches_per_image"] == pytest.approx((2 + 8) / 2)
    assert stats["tokens_per_patch"] == pytest.approx(16 / 10)


def test_config_dispatch():
    entropies = torch.zeros(2, 16)
    entropies[:, 0] = INF
    assert starts(patch_starts(PatcherConfig(mode="entropy", max_patch_length=3), entropies, 8)) == [0, 3, 6, 8, 11, 14]
    assert starts(patch_starts(PatcherConfig(mode="static", static_length=4, max_patch_length=None),
                               entropies, 8)) == [0, 4, 8, 12]
    assert patch_starts(PatcherConfig(mode="token"), entropies, 8).all()
    with pytest.raises(AssertionError, match="unknown patcher mode"):  # a user's mode: the field's choices
        patch_starts(PatcherConfig(mode="bytes"), entropies, 8)


def test_bad_cap_is_rejected():
    with pytest.raises(AssertionError, match="max_patch_length"):  # a user's P: the field's range
        entropy_mask([INF, 0], cap=0)


@pytest.mark.parametrize("target,cap,row_break", [(1.81, 4, True), (2.5, None, False), (1.3, 4, True)])
def test_calibrated_threshold_hits_the_target_mean_patch_length(target, cap, row_break):
    entropies = torch.rand(64, 64, generator=torch.Generator().manual_seed(0)) * 8
    entropies[:, 0] = float("inf")  # as a token store marks position 0
    theta = calibrate_threshold(entropies, 8, target, max_patch_length=cap, row_break=row_break)
    starts = patch_start_mask(entropies, grid_width=8, threshold=theta, max_patch_length=cap, row_break=row_break)
    assert abs(entropies.numel() / starts.sum().item() - target) < 0.02
    lower = patch_start_mask(entropies, grid_width=8, threshold=theta - 0.5, max_patch_length=cap, row_break=row_break)
    assert lower.sum() > starts.sum()  # a lower θ cuts more patches: the bisection's premise


def test_calibration_keeps_the_closer_patching_when_the_target_falls_between_two():
    """Entropies with two distinct values allow only a few mean patch lengths: θ gives the one closest to the
    target, and lies strictly between stored values (or beyond them), so a θ rounded to 6 digits patches alike."""
    entropies = torch.full((4, 16), 4.8359375)
    entropies[:, 0] = float("inf")
    entropies[:, 8] = 4.83984375  # at the row start anyway (row break)
    def reached(theta):
        mask = patch_start_mask(entropies, grid_width=8, threshold=theta, max_patch_length=4, row_break=True)
        return entropies.numel() / mask.sum().item()
    options = {reached(t) for t in (4.0, 4.837, 5.0)}  # every patching these entropies allow
    for target in (1.2, 1.81, 3.5, 4.5):
        theta = calibrate_threshold(entropies, 8, target, max_patch_length=4, row_break=True)
        assert reached(theta) == min(options, key=lambda o: abs(o - target)), target
        assert reached(float(f"{theta:.6g}")) == reached(theta)
        assert theta not in (4.8359375, 4.83984375)
    one_value = torch.full((2, 16), 2.0)
    for target in (1.0, 3.9):
        theta = calibrate_threshold(one_value, 8, target, max_patch_length=4, row_break=True)
        mask = patch_start_mask(one_value, grid_width=8, threshold=float(f"{theta:.6g}"), max_patch_length=4)
        assert abs(one_value.numel() / mask.sum().item() - target) < 0.2


# -- one precision: every boundary decision reads H_i as the token store holds it (float16) ---------------------

def stored(entropies: torch.Tensor) -> torch.Tensor:
    """What the store's writer keeps of float32 entropies (numpy's cast, as dpar.data.preprocess writes them)."""
    with np.errstate(over="ignore"):  # random bit patterns beyond float16's range become inf, as torch's cast
        return torch.from_numpy(entropies.numpy().astype(ENTROPY_DTYPE))


def test_the_boundary_precision_is_the_stores_and_rounds_as_its_writer():
    assert BOUNDARY_DTYPE == torch.from_numpy(np.zeros(1, ENTROPY_DTYPE)).dtype == torch.float16
    generator = torch.Generator().manual_seed(0)
    bits = torch.randint(-2**31, 2**31, (200_000,), generator=generator, dtype=torch.int64).to(torch.int32)
    halves = torch.arange(0, 2**15 - 1024, dtype=torch.int16).view(torch.float16).float()  # every finite >= 0 float16
    ties = (halves[:-1] + halves[1:]) / 2  # exactly halfway: round to nearest even decides
    values = torch.cat([bits.view(torch.float32), ties, ties.nextafter(torch.tensor(0.0)), halves])
    torch.testing.assert_close(boundary_entropies(values), stored(values).float(), rtol=0, atol=0, equal_nan=True)


def test_the_papers_theta_cuts_alike_from_live_and_stored_entropies():
    """θ = 7.8: every float32 H_i in (7.79883, 7.8] is stored as 7.80078 > θ, so training starts a patch there;
    sampling (next_patch_start), patch maps and --threshold (patch_starts on live entropies) and statistics must too."""
    live = torch.tensor([[INF, 7.7990, 7.7995, 7.8, 7.7980, 7.81, 7.0]])
    assert stored(live)[0, 1:4].tolist() == [7.80078125] * 3 and (live[0, 1:4] <= 7.8).all()
    patcher = PatcherConfig(threshold=7.8, max_patch_length=None, row_break=False)
    training = patch_starts(patcher, stored(live).float(), grid_width=7)
    assert starts(training) == [0, 1, 2, 3, 5]
    sampling = torch.stack([next_patch_start(patcher, live[:, i], i, torch.tensor([1]), 7) for i in range(7)], 1)
    assert torch.equal(sampling, training)
    assert torch.equal(patch_starts(patcher, live, grid_width=7), training)
    assert patch_stats(live, grid_width=7, threshold=7.8, max_patch_length=None) == \
        patch_stats(stored(live), grid_width=7, threshold=7.8, max_patch_length=None)


@pytest.mark.parametrize("target,cap", [(1.81, 4), (2.5, None), (1.3, 4)])
def test_calibration_on_live_entropies_gives_the_theta_of_their_stored_values(target, cap):
    """Calibrated on float32 entropies (a benchmark's, a sampler's), θ lies between two stored values, never
    inside one float16 step: the store-precision rule then reaches the target, as on the store itself."""
    live = torch.rand(64, 64, generator=torch.Generator().manual_seed(1)) * 8
    live[:, 0] = INF
    theta = calibrate_threshold(live, 8, target, max_patch_length=cap)
    assert theta == calibrate_threshold(stored(live), 8, target, max_patch_length=cap)
    mask = patch_start_mask(stored(live).float(), grid_width=8, threshold=theta, max_patch_length=cap)
    assert abs(live.numel() / mask.sum().item() - target) < 0.02
    assert torch.equal(patch_start_mask(live, grid_width=8, threshold=theta, max_patch_length=cap), mask)
