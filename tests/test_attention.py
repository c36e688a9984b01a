import sys

import pytest
import torch

from dpar.models.attention import PackedSeqs, attend, available_backends, block_causal_mask, default_backend

LENGTHS = (5, 1, 9, 3)


def per_sequence_reference(q, k, v, lengths):
    """Causal softmax attention computed separately for each sequence of the stream."""
    outputs, offset = [], 0
    for n in lengths:
        sl = slice(offset, offset + n)
        scores = q[:, :, sl] @ k[:, :, sl].transpose(-1, -2) / q.shape[-1] ** 0.5
        scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=q.device).tril(), float("-inf"))
        outputs.append(scores.softmax(-1) @ v[:, :, sl])
        offset += n
    return torch.cat(outputs, dim=2)


def stream(lengths=LENGTHS, heads=2, dim=16, device="cpu", dtype=torch.float32, grad=True):
    total = sum(lengths)
    return [torch.randn(1, heads, total, dim, device=device, dtype=dtype, requires_grad=grad) for _ in range(3)]


def test_block_causal_mask():
    mask = block_causal_mask(PackedSeqs.from_seqlens([2, 3]))
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]])
    assert torch.equal(mask, expected.bool())


def test_sdpa_reference_equals_per_sequence_attention():
    q, k, v = stream()
    out = attend(q, k, v, causal=True, packed=PackedSeqs.from_seqlens(LENGTHS), backend="sdpa")
    assert torch.allclose(out, per_sequence_reference(q, k, v, LENGTHS), atol=1e-5)


@pytest.mark.parametrize("backend", available_backends("cpu", torch.float32))
def test_every_cpu_backend_equals_the_reference(backend):
    q, k, v = stream(grad=False)
    out = attend(q, k, v, causal=True, packed=PackedSeqs.from_seqlens(LENGTHS), backend=backend)
    assert torch.allclose(out, per_sequence_reference(q, k, v, LENGTHS), atol=1e-5)


@pytest.mark.parametrize("backend", available_backends("cpu", torch.float32, grad=True))
def test_every_cpu_training_backend_has_reference_gradients(backend):
    q, k, v = stream()
    out = attend(q, k, v, causal=True, packed=PackedSeqs.from_seqlens(LENGTHS), backend=backend)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(per_sequence_reference(q, k, v, LENGTHS).square().sum(), (q, k, v))
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, atol=1e-4)


def test_flex_runs_on_cpu_for_inference_but_auto_picks_padded():
    assert "flex" in available_backends("cpu", torch.float32)
    assert "flex" not in available_backends("cpu", torch.float32, grad=True)
    # padded: O(n L_max^2) instead of the reference's O((sum L)^2); benchmarks/results/cpu-2026-12-01-training.md
    assert default_backend("cpu", torch.float32) == default_backend("cpu", torch.float32, grad=True) == "padded"


def test_packed_input_errors():
    q, k, v = stream()
    with pytest.raises(ValueError, match="not available"):
        attend(q, k, v, causal=True, packed=PackedSeqs.from_seqlens(LENGTHS), backend="varlen")
    with pytest.raises(ValueError, match="packed stream must have shape"):
        attend(q, k, v, causal=True, packed=PackedSeqs.from_seqlens([3, 3]))
    with pytest.raises(ValueError, match="at least one element"):
        PackedSeqs.from_seqlens([3, 0])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_cuda_backend_equals_the_reference(dtype):
    lengths = (140, 1, 77, 256, 33)
    packed = PackedSeqs.from_seqlens(lengths, device="cuda")
    q, k, v = stream(lengths, heads=4, dim=64, device="cuda", dtype=dtype)
    ref = per_sequence_reference(*(t.float() for t in (q, k, v)), lengths)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    backends = available_backends("cuda", dtype, grad=True)
    assert "sdpa" in backends and "flex" in backends
    for backend in backends:
        out = attend(q, k, v, causal=True, packed=packed, backend=backend)
        grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
        assert out.dtype == dtype
        assert torch.allclose(out.float(), ref, atol=2e-2), backend
        for g, r in zip(grads, ref_grads):
            assert torch.allclose(g.float(), r.float(), atol=5e-2, rtol=5e-2), backend


def test_an_xformers_that_does_not_import_is_skipped_with_a_warning(tmp_path, monkeypatch):
    from dpar.models import attention
    package = tmp_path / "xformers"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "ops.py").write_text("raise ImportError('built for another torch')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    attention._has_xformers.cache_clear()
    try:
        with pytest.warns(UserWarning, match="xformers is installed but does not import"):
            backends = available_backends("cuda", torch.bfloat16, grad=True)
        assert backends[0] != "xformers" and "sdpa" in backends
    finally:
        attention._has_xformers.cache_clear()
        for name in [m for m in sys.modules if m.split(".")[0] == "xformers"]:
            del sys.modules[name]
