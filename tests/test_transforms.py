"""Image transforms: crops and their order computed by hand on coordinate-coded images."""
import numpy as np
import pytest
from PIL import Image

from dpar.errors import UserError
from tokenizer.transforms import (ImageError, center_crop_arr, five_crop, hflip, image_views, open_rgb,
                                  random_crop_arr, ten_crop)


def coordinate_image(height: int, width: int) -> tuple[Image.Image, np.ndarray]:
    """An RGB image whose pixel (y, x) is (x % 256, y % 256, (x // 256) * 16 + y // 256), and the index grid."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x % 256, y % 256, (x // 256) * 16 + y // 256], axis=-1).astype(np.uint8)
    return Image.fromarray(pixels), np.stack([y, x], axis=-1)


def decode(crop: np.ndarray) -> np.ndarray:
    """Back from pixels to (y, x) coordinates."""
    crop = crop.astype(np.int64)
    return np.stack([crop[..., 1] + 256 * (crop[..., 2] % 16), crop[..., 0] + 256 * (crop[..., 2] // 16)], axis=-1)


@pytest.mark.parametrize("size,crop,offset,center", [(256, 281, 25, 12), (384, 422, 38, 19)])
def test_ten_crop_geometry_and_order(size, crop, offset, center):
    image, coords = coordinate_image(crop, crop)  # already the 1.1x crop: center_crop_arr keeps it as is
    views = ten_crop(image, size, crop_range=1.1)
    assert views.shape == (10, size, size, 3) and views.dtype == np.uint8
    corners = [(0, 0), (0, offset), (offset, 0), (offset, offset), (center, center)]
    mirrored = coords[:, ::-1]
    for i, (top, left) in enumerate(corners):
        assert np.array_equal(decode(views[i]), coords[top:top + size, left:left + size]), f"view {i}"
        assert np.array_equal(decode(views[5 + i]), mirrored[top:top + size, left:left + size]), f"view {5 + i}"
    # The flipped half holds mirror images of the first half: TL of the flip is the mirrored TR.
    assert np.array_equal(views[5], hflip(views[1]))


def test_center_crop_takes_the_middle_of_the_long_side():
    image, coords = coordinate_image(281, 300)
    out = np.asarray(center_crop_arr(image, 281))
    assert np.array_equal(decode(out), coords[:, 9:290])


def test_center_crop_halves_then_resizes():
    image, _ = coordinate_image(600, 900)
    out = center_crop_arr(image, 256)
    assert out.size == (256, 256)
    flat = Image.new("RGB", (900, 600), (10, 200, 30))
    assert np.all(np.asarray(center_crop_arr(flat, 256)) == [10, 200, 30])


def test_five_crop_rounds_the_center_half_to_even():
    _, coords = coordinate_image(21, 21)
    center = five_crop(coords, 16)[4]
    assert tuple(center[0, 0]) == (2, 2)  # round(2.5) == 2, as torchvision computes it
    _, coords = coordinate_image(23, 23)
    assert tuple(five_crop(coords, 16)[4][0, 0]) == (4, 4)  # round(3.5) == 4


def test_view_sets():
    image, coords = coordinate_image(256, 301)
    one = image_views(image, 256, views=1)
    two = image_views(image, 256, views=2)
    assert one.shape == (1, 256, 256, 3)
    assert np.array_equal(decode(one[0]), coords[:, 22:278])  # ADM center crop: floor((301 - 256) / 2)
    assert np.array_equal(two[0], one[0]) and np.array_equal(decode(two[1]), coords[:, 22:278][:, ::-1])
    image, _ = coordinate_image(281, 281)
    twenty = image_views(image, 256, views=20)
    assert twenty.shape == (20, 256, 256, 3)
    assert np.array_equal(twenty[:10], ten_crop(image, 256, 1.1))
    assert np.array_equal(twenty[10:], ten_crop(image, 256, 1.05))
    assert not np.array_equal(twenty[:10], twenty[10:])
    with pytest.raises(UserError, match="views must be one of"):
        image_views(image, 256, views=3)


def test_random_crop_is_deterministic_given_the_generator():
    image, _ = coordinate_image(300, 400)
    a = random_crop_arr(image, 64, np.random.default_rng(7))
    b = random_crop_arr(image, 64, np.random.default_rng(7))
    assert a.size == (64, 64) and np.array_equal(np.asarray(a), np.asarray(b))


def test_non_rgb_images_are_converted(tmp_path):
    gray = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8), mode="L")
    gray.save(tmp_path / "gray.png")
    rgb = np.asarray(open_rgb(tmp_path / "gray.png"))
    assert rgb.shape == (8, 8, 3) and all(np.array_equal(rgb[..., c], np.asarray(gray)) for c in range(3))
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., :3], rgba[..., 3] = (5, 6, 7), 0
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    assert np.all(np.asarray(open_rgb(tmp_path / "rgba.png")) == [5, 6, 7])  # alpha dropped, as documented
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 9, 8, 7] + [0] * 762)
    palette.save(tmp_path / "palette.png")
    assert np.all(np.asarray(open_rgb(tmp_path / "palette.png")) == [9, 8, 7])


def test_unreadable_and_16_bit_images_are_one_line_errors(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not an image at all")
    with pytest.raises(ImageError, match="cannot read image .*broken.jpg"):
        open_rgb(tmp_path / "broken.jpg")
    Image.new("RGB", (32, 32), (1, 2, 3)).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated.png"):
        open_rgb(tmp_path / "truncated.png")
    Image.fromarray(np.full((4, 4), 4000, dtype=np.uint16)).save(tmp_path / "deep.png")
    with pytest.raises(ImageError, match="16-bit"):
        open_rgb(tmp_path / "deep.png")
    with pytest.raises(ImageError, match="missing.png"):
        open_rgb(tmp_path / "missing.png")
