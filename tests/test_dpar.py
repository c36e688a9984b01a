import pytest
import torch

from dpar.models import DPAR, DPAR_models, DPARArgs, PatchLayout
from dpar.models.rope import ROPE_MODES
from dpar.patcher import token_patch_start_mask
from helpers import TINY, random_patch_starts, tiny_dpar

N = 16  # 4 x 4 token grid


def batch(b=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 48, (b, N), generator=generator)
    cond = torch.randint(0, 5, (b,), generator=generator)
    return idx, cond, random_patch_starts(b, N, seed=seed)


def test_logits_shape_and_loss():
    model = tiny_dpar()
    idx, cond, starts = batch()
    logits, loss = model(idx, cond, starts, targets=idx)
    assert logits.shape == (3, N, 48) and logits.dtype == torch.float32
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(logits.reshape(-1, 48), idx.reshape(-1)))


# the architecture options of DPARArgs (paper Tables 9 and 10 and the paper's text), each alone
ARCHITECTURES = [{}, {"rope": "dynamic_complementary"}, {"rope": "dynamic_no_redundancy"}, {"rope": "2d"},
                 {"n_enc_layer": 2, "n_dec_layer": 1}, {"encoder_pooling_ffn": True}, {"decoder_injection": "once"},
                 {"decoder_injection": "residual"}]
ARCH_IDS = ["default", "rope_complementary", "rope_no_redundancy", "rope_2d", "E2D1", "pooling_ffn", "inject_once",
            "inject_residual"]


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=ARCH_IDS)
def test_causality_with_fixed_boundaries(arch):
    model = tiny_dpar(**arch)
    idx, cond, starts = batch()
    base = model(idx, cond, starts)[0]
    for j in (0, 1, 5, 8, 15):
        changed = idx.clone()
        changed[:, j:] = (changed[:, j:] + 11) % 48
        out = model(changed, cond, starts)[0]
        assert torch.allclose(out[:, : j + 1], base[:, : j + 1], atol=1e-6), j
        if j < N - 1:
            assert not torch.allclose(out[:, j + 1], base[:, j + 1])


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=ARCH_IDS)
def test_a_later_patch_boundary_never_changes_earlier_logits(arch):
    """Flipping the boundary at token j (adding or removing a patch start) leaves the logits of x_<j as
    they were: no token sees how the patches at or after its own position are cut."""
    model = tiny_dpar(**arch)
    idx, cond, starts = batch(b=2, seed=4)
    base = model(idx, cond, starts)[0]
    for j in range(1, N):
        flipped = starts.clone()
        flipped[:, j] = ~flipped[:, j]
        out = model(idx, cond, flipped)[0]
        torch.testing.assert_close(out[:, :j], base[:, :j], atol=2e-6, rtol=0)
        assert not torch.allclose(out[:, j:], base[:, j:]), j  # the flip matters from token j on


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=ARCH_IDS)
def test_the_global_output_at_stream_position_s_first_changes_the_first_token_of_patch_s(arch):
    """Stream position s holds the class (s = 0) or patch s-1; its output must reach the logits exactly from
    patch s's first token on: earlier tokens never see it, and that token does."""
    model = tiny_dpar(**arch)
    idx, cond, starts = batch(b=2, seed=5)
    layout = PatchLayout.from_mask(starts, grid_width=4)
    base = model(idx, cond, starts)[0]
    last_global = model.global_layers[-1]
    for s in range(len(layout.patch_length)):  # flat stream index = flat patch index
        def perturb(module, inputs, output, s=s):
            output = output.clone()
            output[0, s] += 0.5
            return output
        handle = last_global.register_forward_hook(perturb)
        out = model(idx, cond, starts)[0]
        handle.remove()
        image, first = int(layout.patch_image[s]), int(layout.first_token[s]) % N
        changed = (out - base).abs().amax(-1) > 1e-6  # [B, N]
        assert changed[image].nonzero()[0].item() == first, s
        assert not changed[1 - image].any()


def test_architecture_options_build_what_they_say():
    plain = tiny_dpar()  # the paper's text: cross-attention only, the patch vector into every decoder block
    e2d1 = tiny_dpar(n_enc_layer=2, n_dec_layer=1)
    assert (len(e2d1.encoder.layers), len(e2d1.encoder.cross_layers), len(e2d1.decoder.layers)) == (2, 2, 1)
    with_ffn = tiny_dpar(encoder_pooling_ffn=True)
    assert any("cross_layers.0.feed_forward" in k for k in with_ffn.state_dict())
    assert not any("cross_layers.0.feed_forward" in k for k in plain.state_dict())
    once = tiny_dpar(decoder_injection="once")  # 2 decoder blocks: one norm + linear fewer
    extra = set(plain.state_dict()) - set(once.state_dict())
    assert extra == {"decoder.block_injections.0.patch_norm.weight", "decoder.block_injections.0.patch_proj.weight"}
    as_is = tiny_dpar(decoder_injection="residual")  # the global output added with no norm + linear
    assert set(once.state_dict()) - set(as_is.state_dict()) == {"decoder.patch_norm.weight", "decoder.patch_proj.weight"}
    with pytest.raises(AssertionError, match="decoder_injection must be one of"):  # a user's: ModelConfig's field
        tiny_dpar(decoder_injection="twice")
    with pytest.raises(AssertionError, match="n_dec_layer >= 1"):
        tiny_dpar(n_dec_layer=0)


@pytest.mark.parametrize("layers", [(1, 4), (2, 3), (3, 2), (4, 1)])
def test_table_10_variants_are_expressible(layers):
    from dpar.flops import count
    from dpar.models import ModelConfig, architecture, create_model
    config = ModelConfig(gpt_model="DGPT-L", n_enc_layer=layers[0], n_dec_layer=layers[1])
    with torch.device("meta"):
        model = create_model(config)
    assert (len(model.encoder.layers), len(model.global_layers), len(model.decoder.layers)) == (layers[0], 19, layers[1])
    measured = count("DGPT-L", 256, **architecture(config))
    assert measured["params"] == sum(p.numel() for p in model.parameters())


def test_a_gpt_refuses_dpar_options():
    from dpar.errors import UserError
    from dpar.models import ModelConfig, create_model
    config = ModelConfig(gpt_model="GPT-tiny", decoder_injection="residual")
    with pytest.raises(UserError, match="model.decoder_injection applies to DGPT-\\* models only"):
        config.check()
    with pytest.raises(UserError, match="model.decoder_injection applies to DGPT-\\* models only"):
        create_model(config)  # checks first, whoever built the config
    with pytest.raises(UserError, match="model.encoder_pooling_ffn applies to DGPT-\\* models only"):
        ModelConfig(gpt_model="GPT-tiny", encoder_pooling_ffn=True).check()  # (a record of it is read otherwise)


def test_dpar_refuses_stochastic_depth_and_a_partial_token_grid():
    from dpar.errors import UserError
    from dpar.models import ModelConfig, create_model
    with pytest.raises(UserError, match="^model.drop_path_rate 0.1 applies to GPT-\\* models only, not DGPT-tiny"):
        create_model(ModelConfig(gpt_model="DGPT-tiny", drop_path_rate=0.1))
    ModelConfig(gpt_model="GPT-tiny", drop_path_rate=0.1).check()  # the GPT baseline has stochastic depth
    with pytest.raises(UserError, match="^model.image_size 250 is not a multiple of model.downsample_size 16$"):
        create_model(ModelConfig(image_size=250))


def test_token_mode_runs_and_is_causal():
    model = tiny_dpar()
    idx, cond, _ = batch()
    starts = token_patch_start_mask(3, N)
    base = model(idx, cond, starts)[0]
    changed = idx.clone()
    changed[:, 7:] = 0
    assert torch.allclose(model(changed, cond, starts)[0][:, :8], base[:, :8], atol=1e-6)


def test_batch_equals_images_one_by_one():
    model = tiny_dpar()
    idx, cond, starts = batch(b=4, seed=3)
    together = model(idx, cond, starts)[0]
    for b in range(4):
        alone = model(idx[b:b + 1], cond[b:b + 1], starts[b:b + 1])[0]
        assert torch.allclose(alone[0], together[b], atol=1e-5)


def test_layout_describes_the_patches():
    starts = torch.tensor([[1, 0, 0, 1, 1, 0, 1, 0], [1, 1, 0, 0, 1, 0, 0, 0]], dtype=torch.bool)
    layout = PatchLayout.from_mask(starts, grid_width=4)
    assert layout.patch_length.tolist() == [3, 1, 2, 2, 1, 3, 4]
    assert layout.patch_image.tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert layout.patch_row.tolist() == [0, 0, 1, 1, 0, 0, 1]
    assert layout.patch_start_col.tolist() == [0, 3, 0, 2, 0, 1, 0]
    assert layout.patch_end_col.tolist() == [2, 3, 1, 3, 0, 3, 3]
    assert layout.stream_is_class.tolist() == [True, False, False, False, True, False, False]
    assert layout.packed.seqlens == (4, 3) and layout.packed.cu_seqlens.tolist() == [0, 4, 7]
    assert layout.token_patch.tolist() == [[0, 0, 0, 1, 2, 2, 3, 3], [4, 5, 5, 5, 6, 6, 6, 6]]
    assert layout.longest_patch == 4
    with pytest.raises(ValueError, match="True at token 0"):
        PatchLayout.from_mask(~starts, grid_width=4)


def test_eval_is_deterministic_and_train_uses_dropout():
    model = tiny_dpar(resid_dropout_p=0.3, token_dropout_p=0.3, class_dropout_prob=0.5)
    idx, cond, starts = batch()
    logits = model(idx, cond, starts)[0]
    assert torch.equal(logits, model(idx, cond, starts)[0])
    model.train()
    assert not torch.allclose(model(idx, cond, starts)[0], logits)


def test_rope_options_change_the_model():
    idx, cond, starts = batch()
    outputs = [tiny_dpar(rope=rope)(idx, cond, starts)[0] for rope in ROPE_MODES]
    assert not torch.allclose(outputs[0], outputs[1]) and not torch.allclose(outputs[0], outputs[2])


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=ARCH_IDS)
def test_every_parameter_gets_a_gradient(arch):
    model = tiny_dpar(**arch).train()
    idx, cond, starts = batch()
    model(idx, cond, starts, targets=idx)[1].backward()
    silent = [name for name, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert silent == []


def test_overfits_a_tiny_batch():
    model = DPAR(DPARArgs(**{**TINY, "n_layer": 2, "n_dec_layer": 1, "class_dropout_prob": 0.0})).train()
    idx, cond, starts = batch(b=4, seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = model(idx, cond, starts, targets=idx)[1]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0]


def test_unconditional_dpar():
    model = tiny_dpar(model_type="uncond")
    idx, _, starts = batch()
    assert torch.equal(model(idx, None, starts)[0], model(idx, model.cls_embedding.null_labels(3), starts)[0])


def test_sizes_and_aliases():
    assert set(DPAR_models) >= {"DGPT-B", "DGPT-L", "DGPT-XL", "DGPT-XXL", "DPAR-B", "DPAR-L", "DPAR-XL", "DPAR-XXL"}
    with torch.device("meta"):
        model = DPAR_models["DPAR-L"](vocab_size=16384, block_size=256, num_classes=1000, cls_token_num=1,
                                     model_type="c2i", rope="dynamic_no_redundancy")
    assert (len(model.encoder.layers), len(model.global_layers), len(model.decoder.layers)) == (1, 19, 4)
    assert model.config.dim == 1024 and model.config.n_head == 16


def test_the_small_sizes_are_the_tiny_ones_at_twice_the_width():
    """The small-scale study's scale trend (--size small) changes the width only: depth and head_dim stay."""
    from dpar.models import GPT_models
    with torch.device("meta"):
        built = {name: builder(vocab_size=512, block_size=64, num_classes=12, cls_token_num=1, model_type="c2i")
                 for name, builder in [*((n, DPAR_models[n]) for n in ("DGPT-tiny", "DGPT-small")),
                                       *((n, GPT_models[n]) for n in ("GPT-tiny", "GPT-small"))]}
    for family in ("DGPT", "GPT"):
        tiny, small = built[f"{family}-tiny"].config, built[f"{family}-small"].config
        assert (small.dim, small.n_head, small.n_layer) == (2 * tiny.dim, 2 * tiny.n_head, tiny.n_layer)
        assert small.dim // small.n_head == tiny.dim // tiny.n_head == 32
    blocks = [(len(m.encoder.layers), len(m.global_layers), len(m.decoder.layers))
              for m in (built["DGPT-tiny"], built["DGPT-small"])]
    assert blocks[0] == blocks[1] == (1, 3, 2)


def test_bad_arguments():  # DPARArgs built by hand; a user's config is checked by ModelConfig first
    with pytest.raises(AssertionError, match="rope must be one of"):
        tiny_dpar(rope="3d")
    with pytest.raises(AssertionError, match="attn_backend must be"):
        tiny_dpar(attn_backend="flash")
    with pytest.raises(AssertionError, match="drop_path_rate"):
        tiny_dpar(drop_path_rate=0.1)
    idx, cond, starts = batch()
    with pytest.raises(ValueError, match="needs cond_idx"):
        tiny_dpar()(idx, None, starts)


@pytest.mark.cuda
def test_dgpt_b_bf16_forward_backward_on_every_cuda_backend():
    from dpar.models.attention import available_backends
    from dpar.patcher import patch_start_mask
    torch.manual_seed(0)
    model = DPAR_models["DGPT-B"](vocab_size=16384, block_size=256, num_classes=1000).cuda().train()
    torch.nn.init.normal_(model.output.weight, std=0.02)
    idx = torch.randint(0, 16384, (8, 256), device="cuda")
    cond = torch.randint(0, 1000, (8,), device="cuda")
    entropies = torch.rand(8, 256, device="cuda") * 10
    starts = patch_start_mask(entropies, grid_width=16, threshold=7.8, max_patch_length=4)
    layout = PatchLayout.from_mask(starts, grid_width=16)
    results = {}
    for backend in available_backends("cuda", torch.bfloat16, grad=True):
        for layer in model.global_layers:
            layer.attention.backend = backend
        model.zero_grad()
        torch.manual_seed(1)  # same dropout masks for every backend
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits, loss = model(idx, cond, starts, targets=idx, layout=layout)
        loss.backward()
        results[backend] = (logits.float(), model.tok_embeddings.weight.grad.float().clone())
    ref_logits, ref_grad = results.pop("sdpa")
    for backend, (logits, grad) in results.items():
        assert torch.allclose(logits, ref_logits, atol=5e-2, rtol=5e-2), backend
        assert torch.allclose(grad, ref_grad, atol=1e-3, rtol=5e-2), backend
