"""Sampling: the KV-cached, patch-by-patch generator equals full forwards of what it generated."""
import dataclasses
import numpy as np
import pytest
import torch

from dpar.data import preprocess
from dpar.data.dataset import PackedCollate, TokenDataset
from dpar.data.preprocess import next_token_entropies
from dpar.data.store import ENTROPY_DTYPE, TokenStore
from dpar.patcher import PatcherConfig, logits_entropy, next_patch_start, patch_starts
from dpar.sampling import SamplingConfig, cached_steps, generate, guidance_scale, sample_from_logits
from tests.helpers import TINY, tiny_dpar, tiny_gpt, write_token_store

GRID = 4
SEEDS = torch.tensor([11, 12, 13, 14, 15])
LABELS = torch.tensor([0, 1, 2, 3, 4])


def entropy_model():
    return tiny_gpt(model_type="uncond", num_classes=0)


def threshold_for(model, fraction: float = 0.5) -> float:
    """A θ that makes about ``fraction`` of the tokens boundaries for this random entropy model."""
    tokens = torch.randint(0, TINY["vocab_size"], (32, TINY["block_size"]), generator=torch.Generator().manual_seed(1))
    entropies = next_token_entropies(model, tokens)[:, 1:]
    return float(entropies.quantile(1 - fraction))


@pytest.mark.parametrize("arch", [{}, {"n_dec_layer": 3}, {"encoder_pooling_ffn": True, "n_enc_layer": 2},
                                  {"decoder_injection": "residual"}],  # "once": the shipped demo's, sampled elsewhere
                         ids=["default", "D3", "E2_ffn", "residual"])
@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
@pytest.mark.parametrize("mode", ["entropy", "static", "token"])
def test_dpar_logits_equal_a_full_forward_of_the_sample(mode, cfg_scale, arch):
    model, ent = tiny_dpar(**arch), entropy_model()
    patcher = PatcherConfig(mode=mode, threshold=threshold_for(ent), max_patch_length=3, static_length=2)
    out = generate(cached_steps(model, patcher, ent), LABELS, SEEDS, SamplingConfig(cfg_scale=cfg_scale),
                   record_logits=True)
    halves = [LABELS] if cfg_scale == 1.0 else [LABELS, torch.full_like(LABELS, model.num_classes)]
    assert out.logits.shape == (len(SEEDS) * len(halves), GRID * GRID, TINY["vocab_size"])
    for half, labels in enumerate(halves):
        full, _ = model(out.tokens, labels, out.patch_start)
        used = out.logits[half * len(SEEDS):(half + 1) * len(SEEDS)]
        torch.testing.assert_close(used, full, atol=1e-4, rtol=1e-4)
    assert torch.equal(out.global_steps, out.patch_start.sum(1))
    if mode == "entropy":  # a real mix of long and short patches, else the test proves little
        assert GRID * GRID * len(SEEDS) * 0.3 < int(out.patch_start.sum()) < GRID * GRID * len(SEEDS) * 0.9


@pytest.mark.parametrize("row_break,cap", [(True, 3), (False, None)])
def test_boundaries_equal_the_patcher_on_the_entropy_models_full_forward(row_break, cap):
    model, ent = tiny_dpar(), entropy_model()
    patcher = PatcherConfig(threshold=threshold_for(ent, 0.3), max_patch_length=cap, row_break=row_break)
    out = generate(cached_steps(model, patcher, ent), LABELS, SEEDS, SamplingConfig(cfg_scale=2.0))
    full = next_token_entropies(ent, out.tokens)
    torch.testing.assert_close(out.entropies[:, 1:], full[:, 1:], atol=1e-4, rtol=1e-4)
    assert torch.equal(out.patch_start, patch_starts(patcher, full, GRID))


@pytest.mark.parametrize("cfg_scale", [1.0, 2.5])
def test_gpt_logits_equal_a_full_forward_of_the_sample(cfg_scale):
    model = tiny_gpt()
    out = generate(cached_steps(model), LABELS, SEEDS, SamplingConfig(cfg_scale=cfg_scale, top_k=10),
                   record_logits=True)
    full, _ = model(out.tokens[:, :-1], LABELS)
    torch.testing.assert_close(out.logits[:len(SEEDS)], full, atol=1e-4, rtol=1e-4)
    if cfg_scale != 1.0:
        null, _ = model(out.tokens[:, :-1], torch.full_like(LABELS, model.num_classes))
        torch.testing.assert_close(out.logits[len(SEEDS):], null, atol=1e-4, rtol=1e-4)
    assert out.patch_start.all() and (out.global_steps == GRID * GRID).all()


def test_guidance_changes_the_samples():
    model, ent = tiny_dpar(), entropy_model()
    patcher = PatcherConfig(threshold=threshold_for(ent))
    plain = generate(cached_steps(model, patcher, ent), LABELS, SEEDS, SamplingConfig())
    guided = generate(cached_steps(model, patcher, ent), LABELS, SEEDS, SamplingConfig(cfg_scale=4.0))
    assert not torch.equal(plain.tokens, guided.tokens)


@pytest.mark.parametrize("which", ["dpar", "gpt"])
def test_an_image_depends_on_its_seed_not_on_its_batch(which):
    model, ent = (tiny_dpar(), entropy_model()) if which == "dpar" else (tiny_gpt(), None)
    patcher = PatcherConfig(threshold=threshold_for(entropy_model())) if which == "dpar" else None
    config = SamplingConfig(cfg_scale=2.0, top_p=0.9)
    batch = generate(cached_steps(model, patcher, ent), LABELS, SEEDS, config)
    alone = generate(cached_steps(model, patcher, ent), LABELS[2:3], SEEDS[2:3], config)
    assert torch.equal(batch.tokens[2:3], alone.tokens) and torch.equal(batch.patch_start[2:3], alone.patch_start)
    assert len({tuple(t) for t in batch.tokens.tolist()}) == len(SEEDS)  # different seeds, different images


def test_unconditional_models_sample_without_labels():
    out = generate(cached_steps(tiny_gpt(model_type="uncond", num_classes=0)), None, SEEDS, SamplingConfig(),
                   record_logits=True)
    assert out.tokens.shape == (len(SEEDS), GRID * GRID) and out.logits.shape[0] == len(SEEDS)


def test_logit_filters_and_inverse_cdf():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0]]).repeat(3, 1)
    uniforms = torch.tensor([0.0, 0.5, 0.999])
    assert sample_from_logits(logits, uniforms, SamplingConfig(top_k=1)).tolist() == [1, 1, 1]
    assert sample_from_logits(logits, uniforms, SamplingConfig(top_p=0.01)).tolist() == [1, 1, 1]
    two = sample_from_logits(logits, uniforms, SamplingConfig(top_k=2))
    assert set(two.tolist()) == {1, 2}
    probs = torch.softmax(logits[0], 0).double()
    u = torch.linspace(0.001, 0.999, 999, dtype=torch.float64)
    drawn = sample_from_logits(logits[:1].repeat(999, 1), u, SamplingConfig())
    frequencies = torch.bincount(drawn, minlength=4).double() / 999
    assert torch.allclose(frequencies, probs, atol=2e-3)  # the inverse CDF reproduces the distribution
    cold = sample_from_logits(logits, uniforms, SamplingConfig(temperature=1e-6))
    assert cold.tolist() == [1, 1, 1]


def test_guidance_without_a_null_class_is_refused():
    model = tiny_gpt(class_dropout_prob=0.0)
    with pytest.raises(AssertionError, match="no null class"):
        generate(cached_steps(model), LABELS, SEEDS, SamplingConfig(cfg_scale=2.0))


def test_linear_guidance_schedule_rises_from_one_to_the_scale():
    linear = SamplingConfig(cfg_scale=3.0, cfg_schedule="linear")
    assert [guidance_scale(linear, i, 5) for i in range(5)] == [1.0, 1.5, 2.0, 2.5, 3.0]
    assert guidance_scale(SamplingConfig(cfg_scale=3.0), 0, 5) == 3.0


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("which", ["dpar", "gpt"])
def test_kv_cached_sampling_equals_a_full_forward_on_each_device(which, dtype, device):
    """Cached steps against the full forward of what they sampled, in the model's dtype; on CUDA the full
    forward runs the packed backend ``auto`` picks there, the cached steps SDPA over the cache."""
    ent = entropy_model()
    dpar = which == "dpar"
    model = (tiny_dpar() if dpar else tiny_gpt()).to(device, dtype)
    patcher = PatcherConfig(threshold=threshold_for(ent), max_patch_length=3) if dpar else None
    out = generate(cached_steps(model, patcher, ent.to(device, dtype) if dpar else None), LABELS, SEEDS,
                   SamplingConfig(cfg_scale=2.0), record_logits=True)
    labels = LABELS.to(device)
    for half, half_labels in enumerate([labels, torch.full_like(labels, model.num_classes)]):
        with torch.no_grad():
            full = model(out.tokens, half_labels, out.patch_start)[0] if dpar else model(out.tokens[:, :-1], half_labels)[0]
        used = out.logits[half * len(SEEDS):(half + 1) * len(SEEDS)]
        error = float((used.float() - full.float()).norm() / full.float().norm())
        # fp32: rounding only; bf16 (measured 0.009-0.014 on a CPU): 8 mantissa bits through every layer. A wrong
        # cache row or position gives errors of order 1.
        assert error < (1e-4 if dtype == torch.float32 else 3e-2), error
    if dpar:
        assert 0.3 < float(out.patch_start.float().mean()) < 0.9


@pytest.mark.parametrize("which", ["dpar", "gpt"])
def test_completion_keeps_the_prefix_and_continues_as_a_full_forward(which):
    dpar = which == "dpar"
    model, ent = (tiny_dpar(), entropy_model()) if dpar else (tiny_gpt(), None)
    patcher = PatcherConfig(threshold=threshold_for(ent), max_patch_length=3) if dpar else None
    prefix = torch.randint(0, TINY["vocab_size"], (len(SEEDS), GRID + 2), generator=torch.Generator().manual_seed(5))
    out = generate(cached_steps(model, patcher, ent), LABELS, SEEDS, SamplingConfig(cfg_scale=2.0), prefix=prefix,
                   record_logits=True)
    assert torch.equal(out.tokens[:, :prefix.shape[1]], prefix)
    free = generate(cached_steps(model, patcher, ent), LABELS, SEEDS, SamplingConfig(cfg_scale=2.0))
    assert not torch.equal(free.tokens[:, :prefix.shape[1]], prefix)  # the prefix is not what it would sample
    for half, labels in enumerate([LABELS, torch.full_like(LABELS, model.num_classes)]):
        full, _ = model(out.tokens, labels, out.patch_start) if dpar else model(out.tokens[:, :-1], labels)
        torch.testing.assert_close(out.logits[half * len(SEEDS):(half + 1) * len(SEEDS)], full, atol=1e-4, rtol=1e-4)
    if dpar:  # the boundaries, prefix included, are the entropy model's on the completed sequence
        assert torch.equal(out.patch_start, patch_starts(patcher, next_token_entropies(ent, out.tokens), GRID))


def test_a_class_conditional_gpt_as_entropy_model_reads_its_null_class():
    c2i = tiny_gpt()  # a LlamaGen-style c2i GPT with a null class
    patcher = PatcherConfig(threshold=threshold_for(c2i), max_patch_length=3)
    out = generate(cached_steps(tiny_dpar(), patcher, c2i), LABELS, SEEDS, SamplingConfig(cfg_scale=2.0))
    null_logits, _ = c2i(out.tokens[:, :-1], torch.full_like(LABELS, c2i.num_classes))
    probs = null_logits.double().softmax(-1)
    expected = -(probs * probs.log()).sum(-1)
    torch.testing.assert_close(out.entropies[:, 1:].double(), expected[:, 1:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(next_token_entropies(c2i, out.tokens)[:, 1:].double(), expected[:, 1:],
                               atol=1e-4, rtol=1e-4)
    class_logits, _ = c2i(out.tokens[:, :-1], LABELS)  # and not its class-conditional prediction
    assert not torch.allclose(class_logits, null_logits, atol=1e-3)


def self_entropy_patcher(model, fraction: float = 0.5) -> PatcherConfig:
    """Self-entropy patching at a θ that makes about ``fraction`` of the undecided tokens boundaries."""
    tokens = torch.randint(0, TINY["vocab_size"], (8, TINY["block_size"]), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits, _ = model(tokens, LABELS[:1].expand(8), torch.zeros_like(tokens, dtype=torch.bool).index_fill(1,
                          torch.tensor([0]), True))  # one patch: every prediction is "no new patch"
    probs = logits.softmax(-1)
    entropies = -(probs * probs.log()).sum(-1)[:, 1:]
    first = PatcherConfig(mode="self_entropy", threshold=float(entropies.quantile(1 - fraction)), max_patch_length=3)
    # the entropies of sampling itself (its own tokens and patches) differ from these: θ from a first sampling
    sampled = generate(cached_steps(model, first), LABELS, SEEDS, SamplingConfig()).entropies
    return dataclasses.replace(first, threshold=float(sampled[sampled.isfinite()].quantile(1 - fraction)))


@pytest.mark.parametrize("static_shapes", [False, True], ids=["default", "two-hypotheses"])
@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_self_entropy_boundaries_are_the_models_own_entropy_under_no_new_patch(cfg_scale, static_shapes):
    model = tiny_dpar()
    patcher = self_entropy_patcher(model)
    out = generate(cached_steps(model, patcher, static_shapes=static_shapes), LABELS, SEEDS,
                   SamplingConfig(cfg_scale=cfg_scale), record_logits=True)
    # the logits used are a full forward's with the chosen boundaries (both CFG halves)
    halves = [LABELS] if cfg_scale == 1.0 else [LABELS, torch.full_like(LABELS, model.num_classes)]
    for half, labels in enumerate(halves):
        full, _ = model(out.tokens, labels, out.patch_start)
        torch.testing.assert_close(out.logits[half * len(SEEDS):(half + 1) * len(SEEDS)], full, atol=1e-4, rtol=1e-4)
    # H_i: the conditional prediction of x_i with every earlier boundary and none at i (causal: later
    # boundaries never change it); the rule on it, with the cap and the row breaks, gives the boundaries
    forced_alone = patch_starts(PatcherConfig(mode="entropy", threshold=float("inf"), max_patch_length=3),
                                torch.zeros(out.tokens.shape), GRID)
    decided = 0
    for i in range(1, GRID * GRID):
        no_new_patch = out.patch_start.clone()
        no_new_patch[:, i] = False
        logits, _ = model(out.tokens, LABELS, no_new_patch)
        entropy = logits_entropy(logits[:, i])
        rule = next_patch_start(patcher, entropy, i, i - last_start(out.patch_start, i), GRID)
        assert torch.equal(out.patch_start[:, i], rule), i
        computed = torch.isfinite(out.entropies[:, i])
        torch.testing.assert_close(out.entropies[computed, i], entropy[computed], atol=1e-4, rtol=1e-4)
        decided += int(computed.sum())
    assert decided > 0 and 0.3 < out.patch_start.float().mean() < 0.9  # a real mix of boundaries
    assert not torch.equal(out.patch_start, forced_alone)


def last_start(patch_start: torch.Tensor, i: int) -> torch.Tensor:
    """``[B]`` the position of each image's last patch start before ``i``."""
    positions = torch.arange(i).expand(len(patch_start), -1)
    return torch.where(patch_start[:, :i], positions, 0).amax(1)


def test_self_entropy_patching_is_refused_for_training():
    with pytest.raises(AssertionError, match="self_entropy boundaries come from the model being sampled"):
        patch_starts(PatcherConfig(mode="self_entropy"), torch.zeros(2, 16), GRID)


@pytest.mark.parametrize("mode", ["entropy", "static", "token", "self_entropy"])
def test_the_static_shape_path_samples_what_the_default_path_samples(mode):
    model, ent = tiny_dpar(), entropy_model()
    patcher = self_entropy_patcher(model) if mode == "self_entropy" else \
        PatcherConfig(mode=mode, threshold=threshold_for(ent), max_patch_length=3, static_length=2)
    runs = [generate(cached_steps(model, patcher, ent, static_shapes=static), LABELS, SEEDS,
                     SamplingConfig(cfg_scale=2.0), record_logits=True) for static in (False, True)]
    assert torch.equal(runs[0].tokens, runs[1].tokens) and torch.equal(runs[0].patch_start, runs[1].patch_start)
    torch.testing.assert_close(runs[0].logits, runs[1].logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(runs[0].global_steps, runs[1].global_steps)


# -- one precision: the sampler decides boundaries on H_i as the token store holds it (float16) ------------------

def store_rounded(entropies: torch.Tensor) -> torch.Tensor:
    """What the token store keeps of float32 entropies (numpy's cast to its dtype, as preprocess writes them)."""
    return torch.from_numpy(entropies.numpy().astype(ENTROPY_DTYPE)).float()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_boundaries_are_the_rule_on_store_rounded_entropies(seed):
    """θ placed between a token's float32 entropy and its float16 rounding: the sampler (a full prefix, so every
    H_i is known in advance) must cut the patches training cuts from the store's entropies of the same tokens."""
    model, ent = tiny_dpar(), entropy_model()
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, TINY["vocab_size"], (len(SEEDS), GRID * GRID), generator=generator)
    live = next_token_entropies(ent, tokens)
    rounded = store_rounded(live)
    ulp = torch.from_numpy(np.spacing(rounded[:, 1:].numpy().astype(ENTROPY_DTYPE)).astype(np.float32))
    gap = (live[:, 1:] - rounded[:, 1:]).abs()
    far_from_ties = (gap > 1e-4) & (gap < ulp / 2 - 1e-4)  # the sampler's cached H_i rounds as the full forward's
    tried = 0
    for b, i in far_from_ties.nonzero()[:6].tolist():
        theta = float(live[b, i + 1] + rounded[b, i + 1]) / 2
        patcher = PatcherConfig(threshold=theta, max_patch_length=None, row_break=False)
        out = generate(cached_steps(model, patcher, ent), LABELS, SEEDS, SamplingConfig(), prefix=tokens)
        assert torch.equal(out.tokens, tokens)
        training = patch_starts(patcher, rounded, GRID)
        assert (live[b, i + 1] > theta) != bool(training[b, i + 1])  # live float32 and the store disagree here
        assert torch.equal(out.patch_start, training), (b, i + 1, theta)
        tried += 1
    assert tried >= 4


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_sampled_boundaries_at_a_hand_set_theta_are_the_rule_on_store_rounded_entropies(cfg_scale):
    """Free sampling, with and without guidance: the boundaries are the rule on the stored entropies."""
    model, ent = tiny_dpar(), entropy_model()
    for theta in (threshold_for(ent, 0.3), threshold_for(ent, 0.6), 3.5, 3.7):
        patcher = PatcherConfig(threshold=theta, max_patch_length=3)
        out = generate(cached_steps(model, patcher, ent), LABELS, SEEDS, SamplingConfig(cfg_scale=cfg_scale))
        assert torch.equal(out.patch_start, patch_starts(patcher, store_rounded(next_token_entropies(ent, out.tokens)),
                                                         GRID))


def test_the_papers_theta_cuts_alike_in_sampling_and_in_training_from_the_store(tmp_path):
    """θ = 7.8 with an entropy model whose every H_i is ln 2440 = 7.79976 (uniform over 2440 codes), stored as
    7.80078 > θ: training (store -> TokenDataset -> PackedCollate) starts a patch at every token; sampling must."""
    vocab = 2440
    ent = tiny_gpt(model_type="uncond", num_classes=0, vocab_size=vocab)
    with torch.no_grad():
        ent.output.weight.zero_()  # every logit 0: H_i = ln 2440 at every position
    model = tiny_dpar(vocab_size=vocab)
    patcher = PatcherConfig(threshold=7.8, max_patch_length=None, row_break=False)
    out = generate(cached_steps(model, patcher, ent), LABELS, SEEDS, SamplingConfig())
    assert (7.79883 < out.entropies[:, 1:]).all() and (out.entropies[:, 1:] <= 7.8).all()

    write_token_store(tmp_path / "store", out.tokens[:, None].numpy(), LABELS.numpy(), codebook_size=vocab,
                      num_classes=TINY["num_classes"])
    store = TokenStore(tmp_path / "store")
    meta = preprocess.start_entropies(store.path, store.meta, {"checkpoint": "zero-head GPT", "sha256": "0"}, False)
    preprocess.entropy_shards(store.path, [0], store.shard_tokens, lambda t: next_token_entropies(ent, t),
                              batch_size=64, show_progress=False)
    preprocess.finish_entropies(store.path, meta)
    dataset = TokenDataset(TokenStore(store.path), entropies=True, view=0)
    training = PackedCollate(patcher, GRID)([dataset[i] for i in range(len(dataset))])
    assert training.patch_start.all()
    assert torch.equal(out.patch_start, training.patch_start)
