"""The VQ tokenizer: LlamaGen's state dict, shapes, codes, and a tiny one that learns."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from dpar.errors import UserError
from tokenizer.vq_model import VQ_models, VQConfig, create_vq, load_vq, uint8_to_unit, unit_to_uint8

DATA = Path(__file__).parent / "data"
TINY_VQ = VQConfig(vq_model="VQ-16", codebook_size=64, codebook_embed_dim=4, ch=16, ch_mult=[1, 2, 2],
                   z_channels=16, num_res_blocks=1, norm_groups=8, entropy_loss_ratio=0.1)


def llamagen_keys(name: str) -> list[tuple[str, tuple[int, ...]]]:
    rows = [line.split() for line in (DATA / name).read_text().splitlines() if not line.startswith("#")]
    return [(key, tuple(int(d) for d in shape.split("x"))) for key, shape in rows]


@pytest.mark.parametrize("model,listing", [("VQ-16", "llamagen_vq16_state_dict.txt"),
                                           ("VQ-8", "llamagen_vq8_state_dict.txt")])
def test_state_dict_matches_llamagen(model, listing):
    with torch.device("meta"):
        vq = VQ_models[model](codebook_size=16384, codebook_embed_dim=8)
    ours = [(key, tuple(t.shape)) for key, t in vq.state_dict().items()]
    assert ours == llamagen_keys(listing)


def test_llamagen_style_checkpoint_loads_strictly(tmp_path):
    """A torch file shaped like vq_ds16_c2i.pt ({"model": ...}) loads through load_vq, weights intact."""
    source = create_vq(TINY_VQ)
    path = tmp_path / "vq.pt"
    torch.save({"model": source.state_dict()}, path)
    loaded = load_vq(path, TINY_VQ)
    for key, tensor in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key


def test_mismatched_checkpoint_is_one_line_error(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"encoder.conv_in.weight": torch.zeros(1)}, path)
    with pytest.raises(UserError, match="does not fit the model.*missing"):
        load_vq(path, TINY_VQ)


@pytest.mark.parametrize("size", [256, 384])
def test_vq16_round_trip_shapes(size):
    torch.manual_seed(0)
    vq = VQ_models["VQ-16"](codebook_size=128, codebook_embed_dim=8, ch=32, z_channels=32,
                            num_res_blocks=1).eval()
    images = torch.randint(0, 256, (1, size, size, 3), dtype=torch.uint8)
    codes = vq.images_to_codes(images)
    grid = size // 16
    assert codes.shape == (1, grid * grid) and codes.dtype == torch.long
    assert 0 <= int(codes.min()) and int(codes.max()) < 128
    quant, _, (_, _, indices) = vq.encode(uint8_to_unit(images))
    assert quant.shape == (1, 8, grid, grid)
    # The quantised tensor is the l2-normalised codebook row of each index.
    lookup = F.normalize(vq.quantize.embedding.weight, dim=-1)[indices]
    assert torch.allclose(quant.permute(0, 2, 3, 1).reshape(-1, 8), lookup, atol=1e-6)
    decoded = vq.decode_code(indices, (1, 8, grid, grid))
    assert decoded.shape == (1, 3, size, size)
    back = vq.codes_to_images(codes, grid)
    assert back.shape == (1, size, size, 3) and back.dtype == torch.uint8
    assert torch.equal(back, unit_to_uint8(decoded))


def test_codes_are_nearest_codebook_entries():
    torch.manual_seed(1)
    vq = create_vq(TINY_VQ).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = F.normalize(vq.quant_conv(vq.encoder(x)).permute(0, 2, 3, 1).reshape(-1, 4), dim=-1)
    codebook = F.normalize(vq.quantize.embedding.weight, dim=-1)
    brute_force = torch.cdist(z, codebook).argmin(dim=1)
    _, _, (_, _, indices) = vq.encode(x)
    assert torch.equal(indices, brute_force)


def test_uint8_conversions():
    images = torch.arange(256, dtype=torch.uint8).view(1, 16, 16, 1).expand(1, 16, 16, 3).contiguous()
    unit = uint8_to_unit(images)
    assert unit.shape == (1, 3, 16, 16) and unit.min() == -1 and unit.max() == 1
    assert torch.equal(unit_to_uint8(unit), images)


def test_bad_inputs_are_one_line_errors():
    vq = create_vq(TINY_VQ).eval()
    with pytest.raises(UserError, match="uint8"):
        vq.images_to_codes(torch.zeros(1, 16, 16, 3))
    with pytest.raises(UserError, match="multiple of"):
        vq.images_to_codes(torch.zeros(1, 18, 16, 3, dtype=torch.uint8))
    with pytest.raises(UserError, match=r"\[0, 64\)"):
        vq.codes_to_images(torch.full((1, 16), 64), 4)
    with pytest.raises(UserError, match="shape"):
        vq.codes_to_images(torch.zeros(1, 15, dtype=torch.long), 4)


def test_tiny_tokenizer_overfits_a_few_images():
    torch.manual_seed(0)
    images = torch.zeros(4, 16, 16, 3, dtype=torch.uint8)
    for i, (top, left) in enumerate([(0, 0), (4, 8), (8, 2), (6, 6)]):
        images[i] = torch.tensor([40 * i, 200 - 30 * i, 90])
        images[i, top:top + 8, left:left + 8] = torch.tensor([250, 20 * i, 255 - 50 * i])
    x = uint8_to_unit(images)
    vq = create_vq(TINY_VQ).train()
    optimizer = torch.optim.Adam(vq.parameters(), lr=3e-3)

    def reconstruction_error() -> float:
        vq.eval()
        with torch.no_grad():
            error = F.mse_loss(vq(x)[0], x).item()
        vq.train()
        return error

    before = reconstruction_error()
    for _ in range(150):
        reconstruction, (vq_loss, commit, entropy, _) = vq(x)
        loss = F.mse_loss(reconstruction, x) + vq_loss + commit + entropy
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = reconstruction_error()
    assert after < before / 10, (before, after)
