import json
import subprocess
import sys

import pytest
import torch

from dpar.flops import PAPER_LINEAR_GMACS, PAPER_PARAMS, count, evenly_spaced_patches, measure_forward
from dpar.models import PatchLayout
from helpers import tiny_dpar, tiny_gpt


def test_cli_prints_one_json_object():
    out = subprocess.run([sys.executable, "-m", "dpar.flops", "--model", "DGPT-B", "--image-size", "256", "--json"],
                         capture_output=True, text=True, check=True).stdout
    result = json.loads(out)
    assert isinstance(result["params"], int)
    assert result["linear_gmacs"] > 0 and result["gflops"] > 2 * result["linear_gmacs"]
    assert result["tokens_per_patch"] == 1.81


def test_cli_rejects_bad_tokens_per_patch():
    proc = subprocess.run([sys.executable, "-m", "dpar.flops", "--model", "DGPT-B", "--tokens-per-patch", "0.5"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "argument --tokens-per-patch: must be >= 1; got '0.5'" in proc.stderr


@pytest.mark.parametrize("argv,message", [
    (["--model", "GPT-B", "--rope", "2d"], "error: --rope applies to DGPT-* models only, not GPT-B\n"),
    (["--image-size", "250"], "error: --image-size 250 is not a multiple of the VQ-16 downsampling factor 16\n"),
])
def test_cli_checks_its_flags_by_the_model_configs_rules(argv, message):
    proc = subprocess.run([sys.executable, "-m", "dpar.flops", *argv], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr == message


@pytest.mark.parametrize("name", list(PAPER_PARAMS))
def test_params_match_paper_table_1(name):
    assert count(name, 256)["params"] == pytest.approx(PAPER_PARAMS[name], rel=0.03)


@pytest.mark.parametrize("name,image_size", list(PAPER_LINEAR_GMACS))
def test_linear_gmacs_match_paper_table_8(name, image_size):
    tolerance = 0.05 if name.startswith("DGPT") else 0.01
    assert count(name, image_size)["linear_gmacs"] == pytest.approx(PAPER_LINEAR_GMACS[(name, image_size)],
                                                                    rel=tolerance)


@pytest.mark.parametrize("name", ["GPT-XXL", "DGPT-XXL"])
def test_largest_models_answer_at_384(name):
    result = count(name, 384)
    assert result["tokens"] == 576 and result["params"] > 1.3e9


def linear_macs_by_hooks(model, *inputs, **kwargs):
    """Sum over the model's nn.Linear calls of rows x in_features x out_features."""
    total = []

    def hook(module, args, output):
        total.append(args[0].numel() // module.in_features * module.in_features * module.out_features)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    model(*inputs, **kwargs)
    for handle in handles:
        handle.remove()
    return sum(total)


def test_linear_convention_counts_exactly_the_linear_layers():
    gpt = tiny_gpt()
    idx, cond = torch.randint(0, 48, (2, 15)), torch.tensor([1, 2])
    assert measure_forward(gpt, idx, cond)[0] == linear_macs_by_hooks(gpt, idx, cond)
    dpar = tiny_dpar()
    mask = evenly_spaced_patches(16, 7).expand(2, 16)
    layout = PatchLayout.from_mask(mask, 4)
    args = (torch.randint(0, 48, (2, 16)), torch.tensor([1, 2]), mask)
    assert measure_forward(dpar, *args, layout=layout)[0] == linear_macs_by_hooks(dpar, *args, layout=layout)


def test_fractional_patch_counts_interpolate_measured_runs():
    low, high, mid = (count("DGPT-B", 256, 256 / m) for m in (141, 142, 141.25))
    assert low["linear_gmacs"] < mid["linear_gmacs"] < high["linear_gmacs"]
    assert mid["linear_gmacs"] == pytest.approx(0.75 * low["linear_gmacs"] + 0.25 * high["linear_gmacs"])
    assert count("DGPT-B", 256, 1.0)["patches_per_image"] == 256


def test_evenly_spaced_patches():
    mask = evenly_spaced_patches(16, 6)
    assert mask.sum() == 6 and mask[0, 0]
