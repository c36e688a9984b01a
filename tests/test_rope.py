import pytest
import torch

from dpar.models.rope import ROPE_MODES, apply_rotary, grid_rope, patch_rope

HEAD_DIM, BASE = 32, 10000.0


def llamagen_2d_table(grid: int, head_dim: int, base: float) -> torch.Tensor:
    """LlamaGen's precompute_freqs_cis_2d (without the class rows), written out from its source."""
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    angles = torch.outer(torch.arange(grid), freqs)
    both = torch.cat([angles[:, None, :].expand(-1, grid, -1), angles[None, :, :].expand(grid, -1, -1)], dim=-1)
    return torch.stack([torch.cos(both), torch.sin(both)], dim=-1).flatten(0, 1)


def test_grid_rope_is_llamagen_2d_rope_bit_for_bit():
    positions = torch.arange(36)
    table = grid_rope(positions // 6, positions % 6, 64, BASE)
    assert torch.equal(table, llamagen_2d_table(6, 64, BASE))


def rotate(vector: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    return apply_rotary(vector[None, None, None], table[None])[0, 0, 0]


def coords(row, start, end):
    return torch.tensor(row), torch.tensor(start), torch.tensor(end)


@pytest.mark.parametrize("mode", ROPE_MODES)
def test_rotations_compose(mode):
    x = torch.randn(HEAD_DIM)
    a, b = coords(2, 3, 5), coords(1, 4, 9)
    summed = tuple(p + q for p, q in zip(a, b))
    twice = rotate(rotate(x, patch_rope(*a, HEAD_DIM, BASE, mode)), patch_rope(*b, HEAD_DIM, BASE, mode))
    assert torch.allclose(twice, rotate(x, patch_rope(*summed, HEAD_DIM, BASE, mode)), atol=1e-5)


@pytest.mark.parametrize("mode", ROPE_MODES)
def test_scores_depend_on_relative_position_only(mode):
    q, k = torch.randn(2, HEAD_DIM).unbind(0)
    a, b, shift = coords(3, 1, 2), coords(1, 5, 7), coords(4, 2, 2)

    def score(pa, pb):
        return rotate(q, patch_rope(*pa, HEAD_DIM, BASE, mode)) @ rotate(k, patch_rope(*pb, HEAD_DIM, BASE, mode))

    moved = score(tuple(p + s for p, s in zip(a, shift)), tuple(p + s for p, s in zip(b, shift)))
    assert torch.allclose(score(a, b), moved, atol=1e-4)
    assert not torch.allclose(score(a, b), score(a, coords(1, 6, 7)), atol=1e-3)


def test_dynamic_is_two_half_size_2d_ropes_of_start_and_end():
    row, start, end = coords([0, 2], [1, 3], [4, 3])
    table = patch_rope(row, start, end, HEAD_DIM, BASE, "dynamic")
    half = HEAD_DIM // 4  # pairs in each half of the head
    assert torch.equal(table[:, :half], grid_rope(row, start, HEAD_DIM // 2, BASE))
    assert torch.equal(table[:, half:], grid_rope(row, end, HEAD_DIM // 2, BASE))


def test_complementary_one_token_patch_is_the_2d_rope_of_its_token():
    """start = end: the two halves together rotate by exactly the GPT's 2D RoPE frequencies (pairs reordered),
    so a one-token patch is placed as finely as a token; ``dynamic`` repeats half of them instead."""
    row, col = torch.arange(6).repeat_interleave(6), torch.arange(6).repeat(6)
    eighth, quarter = HEAD_DIM // 8, HEAD_DIM // 4
    even, odd = torch.arange(0, quarter, 2), torch.arange(1, quarter, 2)
    order = torch.cat([even, quarter + even, odd, quarter + odd])  # row even | col even | row odd | col odd
    token = grid_rope(row, col, HEAD_DIM, BASE)
    table = patch_rope(row, col, col, HEAD_DIM, BASE, "dynamic_complementary")
    assert torch.allclose(table, token[:, order], atol=1e-6)
    coarse = patch_rope(row, col, col, HEAD_DIM, BASE, "dynamic")
    assert torch.equal(coarse[:, :2 * eighth], coarse[:, 2 * eighth:])  # today's layout: the same pairs twice
    assert not torch.allclose(coarse, token[:, order], atol=1e-3)


def test_complementary_end_moves_only_the_second_half():
    row, start, end = coords([2], [1], [4])
    table = patch_rope(row, start, end, HEAD_DIM, BASE, "dynamic_complementary")
    one_token = patch_rope(row, start, start, HEAD_DIM, BASE, "dynamic_complementary")
    half = HEAD_DIM // 4
    assert torch.equal(table[:, :half], one_token[:, :half])
    assert torch.equal(table[:, :half], patch_rope(row, start, end, HEAD_DIM, BASE, "dynamic")[:, :half])
    assert not torch.allclose(table[:, half:], one_token[:, half:], atol=1e-3)


def test_no_redundancy_encodes_the_row_once():
    row, start, end = coords([2], [1], [4])
    table = patch_rope(row, start, end, HEAD_DIM, BASE, "dynamic_no_redundancy")
    quarter, eighth = HEAD_DIM // 4, HEAD_DIM // 8
    assert torch.equal(table[:, :quarter], grid_rope(row, start, HEAD_DIM, BASE)[:, :quarter])
    start_only = patch_rope(row, start, start, HEAD_DIM, BASE, "dynamic_no_redundancy")
    assert torch.equal(table[:, :quarter + eighth], start_only[:, :quarter + eighth])
    assert not torch.equal(table[:, quarter + eighth:], start_only[:, quarter + eighth:])


def test_2d_mode_ignores_the_end_and_dynamic_modes_do_not():
    row, start = torch.tensor([1]), torch.tensor([2])
    short, long_ = torch.tensor([2]), torch.tensor([5])
    plain = patch_rope(row, start, short, HEAD_DIM, BASE, "2d")
    assert torch.equal(plain, patch_rope(row, start, long_, HEAD_DIM, BASE, "2d"))
    assert torch.equal(plain, grid_rope(row, start, HEAD_DIM, BASE))
    for mode in ("dynamic", "dynamic_complementary", "dynamic_no_redundancy"):
        assert not torch.equal(patch_rope(row, start, short, HEAD_DIM, BASE, mode),
                               patch_rope(row, start, long_, HEAD_DIM, BASE, mode))
    tables = [patch_rope(row, start, long_, HEAD_DIM, BASE, mode) for mode in ROPE_MODES]
    assert not torch.equal(tables[0], tables[1]) and not torch.equal(tables[1], tables[2])


def test_rotation_keeps_norms_and_zero_table_zeroes():
    x = torch.randn(2, 5, 3, HEAD_DIM)
    positions = torch.arange(5)
    rotated = apply_rotary(x, grid_rope(positions, positions, HEAD_DIM, BASE))
    assert torch.allclose(rotated.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    assert apply_rotary(x, torch.zeros(5, HEAD_DIM // 2, 2)).abs().max() == 0


def test_head_dim_checks():
    with pytest.raises(ValueError, match="divisible by 8"):
        patch_rope(torch.tensor([0]), torch.tensor([0]), torch.tensor([0]), 12, BASE)
    with pytest.raises(ValueError, match="unknown rope mode"):
        patch_rope(torch.tensor([0]), torch.tensor([0]), torch.tensor([0]), 16, BASE, "3d")
