import json
import math

import pytest
import torch
import torch.nn.functional as F

from cdm.models import (DiT, DiTConfig, dit_config_from_sedd, load_sedd_checkpoint, save_sedd_checkpoint,
                        sedd_config, sedd_noise_schedule)
from cdm.schedules import GeometricNoise, LogLinearNoise

VOCAB, LENGTH = 11, 7


def tiny_config(**overrides) -> DiTConfig:
    return DiTConfig.preset("tiny", vocab_size=VOCAB, seq_len=LENGTH, **overrides)


def randomised(model: DiT, seed: int = 0) -> DiT:
    """Give every parameter (zero-initialised ones included) random values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model.eval()


def inputs(batch: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (batch, LENGTH), generator=generator)
    sigma = torch.rand(batch, generator=generator) * 3 + 0.1
    return x, sigma


def sedd_reference(state: dict, config: DiTConfig, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """SEDD's log-scores: its DDiT's outputs, scaled by sigma where it does so, 0 at the current token."""
    out = ddit_reference_logits(state, config, x, sigma)
    if config.scale_by_sigma:
        out = out - torch.log(torch.exp(sigma) - 1)[:, None, None] - math.log(out.shape[-1] - 1)
    return torch.scatter(out, -1, x[..., None], 0.0)


def ddit_reference_logits(state: dict, config: DiTConfig, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The DDiT forward pass of SEDD, MDLM and DUO (their models/dit.py) written out from its
    state dict (cdm names), attention by explicit softmax: the last layer's outputs."""
    heads, dim = config.n_heads, config.hidden
    head_dim = dim // heads

    def linear(h, name, bias=True):
        return F.linear(h, state[f"{name}.weight"], state[f"{name}.bias"] if bias else None)

    def norm(h, name):
        return F.layer_norm(h, (dim,)) * state[f"{name}.weight"]

    half = 128
    frequencies = torch.exp(-math.log(10_000) * torch.arange(half) / half)
    angles = sigma[:, None] * frequencies
    c = linear(F.silu(linear(torch.cat([angles.cos(), angles.sin()], -1), "sigma_map.mlp.0")), "sigma_map.mlp.2")
    c = F.silu(c)

    positions = torch.outer(torch.arange(x.shape[1]).float(), state["rotary_emb.inv_freq"])
    cos, sin = torch.cat([positions, positions], -1).cos(), torch.cat([positions, positions], -1).sin()

    def rotate(t):  # t: (B, L, H, Dh)
        rotated = torch.cat([-t[..., head_dim // 2:], t[..., :head_dim // 2]], -1)
        return t * cos[None, :, None] + rotated * sin[None, :, None]

    h = state["vocab_embed.embedding"][x]
    for i in range(config.n_blocks):
        block = f"blocks.{i}"
        shift1, scale1, gate1, shift2, scale2, gate2 = linear(c, f"{block}.adaLN_modulation")[:, None].chunk(6, -1)
        qkv = linear(norm(h, f"{block}.norm1") * (1 + scale1) + shift1, f"{block}.attn_qkv", bias=False)
        qkv = qkv.reshape(*x.shape, 3, heads, head_dim)
        q, k, v = rotate(qkv[:, :, 0]), rotate(qkv[:, :, 1]), qkv[:, :, 2]
        weights = torch.softmax(torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(head_dim), dim=-1)
        attended = torch.einsum("bhlm,bmhd->blhd", weights, v).reshape(*x.shape, dim)
        h = h + gate1 * linear(attended, f"{block}.attn_out", bias=False)
        hidden = F.gelu(linear(norm(h, f"{block}.norm2") * (1 + scale2) + shift2, f"{block}.mlp.0"),
                        approximate="tanh")
        h = h + gate2 * linear(hidden, f"{block}.mlp.2")
    shift, scale = linear(c, "output_layer.adaLN_modulation")[:, None].chunk(2, -1)
    return linear(norm(h, "output_layer.norm_final") * (1 + scale) + shift, "output_layer.linear")


# --------------------------------------------------------------------------- DiT

def test_output_shape_dtype_and_zero_init():
    model = DiT(tiny_config())
    x, sigma = inputs()
    out = model(x, sigma)
    assert out.shape == (3, LENGTH, VOCAB) and out.dtype == torch.float32
    assert torch.equal(out, torch.zeros_like(out))  # zero-initialised output layer


def test_current_token_entry_is_zero_for_any_weights():
    model = randomised(DiT(tiny_config()))
    x, sigma = inputs()
    out = model(x, sigma)
    assert torch.equal(out.gather(-1, x[..., None]), torch.zeros(3, LENGTH, 1))
    assert (out != 0).float().mean() > 0.8


def test_matches_reference_sedd_forward():
    for config in (tiny_config(), tiny_config(scale_by_sigma=True, n_blocks=3)):
        model = randomised(DiT(config))
        x, sigma = inputs(batch=4)
        expected = sedd_reference(model.state_dict(), config, x, sigma)
        torch.testing.assert_close(model(x, sigma), expected, rtol=1e-4, atol=1e-4)


def test_scale_by_sigma_shift_at_initialisation():
    model = DiT(tiny_config(scale_by_sigma=True))
    x, sigma = inputs()
    out = model(x, sigma)
    shift = -(torch.log(torch.expm1(sigma)) + math.log(VOCAB - 1))
    off_current = torch.ones_like(out, dtype=torch.bool).scatter(-1, x[..., None], False)
    torch.testing.assert_close(out, torch.where(off_current, shift[:, None, None].expand_as(out), 0.0))


def test_time_conditioning_takes_effect_after_training_steps():
    torch.manual_seed(0)
    model = DiT(tiny_config())
    x = torch.randint(0, VOCAB, (1, LENGTH)).repeat(2, 1)
    sigma = torch.tensor([0.1, 3.0])
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    target = torch.randn(2, LENGTH, VOCAB)
    gaps = []
    for _ in range(3):
        out = model(x, sigma)
        gaps.append((out[0] - out[1]).abs().max().item())
        optimiser.zero_grad()
        F.mse_loss(out, target).backward()
        optimiser.step()
    # adaLN-zero: at initialisation nothing depends on sigma, and the first
    # step only moves the output projection (the modulation's gradient is
    # multiplied by that zero projection); from the second step on sigma matters.
    assert gaps[0] == 0.0 and gaps[1] == 0.0 and gaps[2] > 1e-4


def test_bfloat16_model_returns_float32_close_to_float32_model():
    model = randomised(DiT(tiny_config(scale_by_sigma=True)))
    x, sigma = inputs()
    expected = model(x, sigma)
    out = model.to(torch.bfloat16)(x, sigma)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0.05, atol=0.1)


def test_attention_is_bidirectional():
    model = randomised(DiT(tiny_config()))
    x, sigma = inputs(batch=1)
    changed = x.clone()
    changed[0, -1] = (x[0, -1] + 1) % VOCAB
    assert not torch.allclose(model(x, sigma)[0, 0], model(changed, sigma)[0, 0])


def test_latent_input_starts_inert_and_then_matters():
    config = tiny_config(latent_dim=2)
    model = DiT(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if not name.startswith("latent_map.mlp.2"):
                parameter.normal_(0, 0.2)
    x, sigma = inputs()
    lam = torch.rand(3, 2)
    # Zero-initialised last latent layer: a new latent student equals the non-latent net.
    torch.testing.assert_close(model(x, sigma, lam), model(x, sigma))
    randomised(model)
    torch.testing.assert_close(model(x, sigma, None), model(x, sigma, torch.zeros(3, 2)))
    assert not torch.allclose(model(x, sigma, lam), model(x, sigma, 1 - lam))


def test_scalar_latent_shape():
    model = randomised(DiT(tiny_config(latent_dim=1)))
    x, sigma = inputs()
    lam = torch.rand(3)
    torch.testing.assert_close(model(x, sigma, lam), model(x, sigma, lam[:, None]))


def test_forward_validates_inputs():
    model = DiT(tiny_config())
    x, sigma = inputs()
    with pytest.raises(TypeError, match="x must"):
        model(x.float(), sigma)
    with pytest.raises(ValueError, match="x must"):
        model(x[0], sigma)
    with pytest.raises(ValueError, match="sigma must"):
        model(x, sigma[:2])
    with pytest.raises(ValueError, match="latent_dim=0"):
        model(x, sigma, torch.rand(3))
    with pytest.raises(ValueError, match="lam must"):
        DiT(tiny_config(latent_dim=2))(x, sigma, torch.rand(3))
    with pytest.raises(ValueError, match="lam must"):  # not a whole number of latents per sequence
        DiT(tiny_config(latent_dim=1))(x, sigma, torch.rand(4, 1))
    with pytest.raises(ValueError, match="draw needs"):
        DiT(tiny_config(latent_dim=1))(x, sigma, draw=torch.rand(3))


def test_config_presets_and_validation():
    tiny = DiT(tiny_config())
    assert 100_000 <= sum(p.numel() for p in tiny.parameters()) <= 500_000
    small = DiTConfig.preset("sedd-small", vocab_size=50258, seq_len=1024)
    assert (small.hidden, small.n_heads, small.n_blocks, small.cond_dim) == (768, 12, 12, 128)
    with pytest.raises(ValueError, match="hidden"):
        DiTConfig(vocab_size=5, seq_len=4, hidden=66, n_heads=4)
    with pytest.raises(ValueError, match="dropout"):
        tiny_config(dropout=1.0)
    with pytest.raises(ValueError, match="name"):
        DiTConfig.preset("huge", vocab_size=5, seq_len=4)
    with pytest.raises(ValueError, match="shared_blocks"):
        tiny_config(latent_dim=1, shared_blocks=3)  # tiny has 2 blocks
    with pytest.raises(ValueError, match="shared_blocks needs a latent"):
        tiny_config(shared_blocks=1)


# --------------------------------------------------------------------------- SEDD checkpoints

@pytest.mark.parametrize("safe_serialization", [True, False])
def test_sedd_checkpoint_round_trip(tmp_path, safe_serialization):
    config = tiny_config(scale_by_sigma=True)
    model = randomised(DiT(config))
    hub_config = sedd_config(config, graph="absorb")
    save_sedd_checkpoint(model, hub_config, tmp_path, safe_serialization=safe_serialization)
    loaded, loaded_hub_config = load_sedd_checkpoint(tmp_path)
    assert loaded_hub_config == hub_config and loaded.config == config
    assert loaded_hub_config["tokens"] == VOCAB - 1  # the mask token is not counted
    x, sigma = inputs()
    assert torch.equal(loaded(x, sigma), model(x, sigma))


def test_sedd_config_translation():
    hub = {"tokens": 50257, "graph": {"type": "absorb"},
           "noise": {"type": "loglinear", "sigma_min": 1e-4, "sigma_max": 20},
           "model": {"hidden_size": 768, "cond_dim": 128, "length": 1024, "n_blocks": 12, "n_heads": 12,
                     "scale_by_sigma": True, "dropout": 0.1}}
    config = dit_config_from_sedd(hub)
    assert config == DiTConfig.preset("sedd-small", vocab_size=50258, seq_len=1024, dropout=0.1,
                                      scale_by_sigma=True)
    assert isinstance(sedd_noise_schedule(hub), LogLinearNoise)
    hub["noise"]["type"] = "geometric"
    assert isinstance(sedd_noise_schedule(hub), GeometricNoise)
    del hub["model"]["n_heads"]
    with pytest.raises(ValueError, match="model.n_heads"):
        dit_config_from_sedd(hub)


def test_sedd_loading_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no SEDD checkpoint"):
        load_sedd_checkpoint(tmp_path / "absent")
    config = tiny_config()
    hub_config = sedd_config(config, graph="uniform", noise="geometric")
    save_sedd_checkpoint(DiT(config), hub_config, tmp_path)

    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        load_sedd_checkpoint(tmp_path)

    state = DiT(config).state_dict()
    del state["blocks.1.attn_out.weight"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"missing parameters \['blocks.1.attn_out.weight'\].*extra.weight"):
        load_sedd_checkpoint(tmp_path)

    hub_config["model"]["hidden_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(hub_config))
    torch.save(DiT(config).state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="vocab_embed.embedding: checkpoint shape"):
        load_sedd_checkpoint(tmp_path)


def test_sedd_saving_rejects_inconsistent_config(tmp_path):
    model = DiT(tiny_config())
    with pytest.raises(ValueError, match="hidden"):
        save_sedd_checkpoint(model, sedd_config(tiny_config(hidden=32), graph="uniform"), tmp_path)
    hub_config = sedd_config(tiny_config(), graph="uniform")
    hub_config["tokens"] -= 1
    with pytest.raises(ValueError, match="vocab_size"):
        save_sedd_checkpoint(model, hub_config, tmp_path)
    with pytest.raises(ValueError, match="score networks"):
        sedd_config(tiny_config(parameterization="posterior", graph="uniform"), graph="uniform")
    with pytest.raises(ValueError, match="scale_by_sigma"):
        sedd_config(tiny_config(scale_by_sigma=True), graph="uniform")


# ----------------------------------------------------------------------------- posterior parameterisation


@pytest.mark.parametrize("graph", ["uniform", "absorbing", "ordinal"])
def test_posterior_parameterisation_round_trips_to_the_softmax(graph):
    """The scores a posterior-form DiT returns invert (cdm_kernels.scores_to_posterior)
    to exactly the softmax of its logits: the float64 reference of the round trip."""
    import cdm_kernels as ck

    config = tiny_config(parameterization="posterior", graph=graph)
    model = randomised(DiT(config))
    x, sigma = inputs(batch=4)
    if graph == "absorbing":  # masked and clean positions both
        x[:, ::2] = VOCAB - 1
    log_score = model(x, sigma)
    assert log_score.dtype == (torch.float32 if graph == "absorbing" else torch.float64)
    assert torch.all(log_score.gather(-1, x[..., None]) == 0)
    logits = model.output_layer(_trunk(model, x, sigma), F.silu(model.sigma_map(sigma))).double()
    if graph == "absorbing":
        logits[..., -1] = -math.inf
    expected = torch.softmax(logits, -1)
    tau = sigma.double()[:, None].expand(x.shape)
    recovered = ck.scores_to_posterior(model.kernel_graph, log_score.double(), x, tau).exp()
    if graph == "absorbing":  # a clean token's conditional is its point mass, whatever the logits
        clean = x != VOCAB - 1
        expected[clean] = F.one_hot(x[clean], VOCAB).double()
    torch.testing.assert_close(recovered, expected, atol=1e-5, rtol=1e-4)


def _trunk(model, x, sigma):
    c = F.silu(model.sigma_map(sigma))
    h = model.vocab_embed(x)
    cos, sin = model.rotary_emb(x.shape[1])
    for block in model.blocks:
        h = block(h, cos, sin, c)
    return h


def test_posterior_config_validation():
    with pytest.raises(ValueError, match="parameterization"):
        tiny_config(parameterization="logits")
    with pytest.raises(ValueError, match="graph"):
        tiny_config(parameterization="posterior")
    with pytest.raises(ValueError, match="scale_by_sigma"):
        tiny_config(parameterization="posterior", graph="absorbing", scale_by_sigma=True)


# ----------------------------------------------------------------------------- K-component latent


def test_component_latent_selects_one_of_k_components():
    from cdm.sampling import latent_quadrature

    model = randomised(DiT(tiny_config(latent_dim=1, latent_components=4)))
    x, sigma = inputs(batch=1)
    x, sigma = x.expand(8, -1), sigma.expand(8)
    lam = torch.tensor([0.0, 0.1, 0.25, 0.49, 0.5, 0.74, 0.75, 0.999])[:, None]
    out = model(x, sigma, lam)
    for same in ((0, 1), (2, 3), (4, 5), (6, 7)):
        torch.testing.assert_close(out[same[0]], out[same[1]])
    assert not torch.allclose(out[1], out[2]) and not torch.allclose(out[3], out[4])
    torch.testing.assert_close(latent_quadrature(model), torch.tensor([[0.125], [0.375], [0.625], [0.875]]))
    with pytest.raises(ValueError, match="latent_dim=1"):
        tiny_config(latent_dim=2, latent_components=4)


def test_fresh_component_tables_differ_so_components_can_separate():
    model = DiT(tiny_config(latent_dim=1, latent_components=3))
    table = model.latent_map.table
    assert table.std() > 0.5 and not torch.allclose(table[0], table[1])


# ----------------------------------------------------------------------------- latents per sequence, shared blocks


@pytest.mark.parametrize("shared_blocks", [0, 1, 2])
def test_m_latents_per_sequence_equal_the_repeated_batch(shared_blocks):
    """lam with M rows per sequence (B * M, 1) gives what the batch repeated M times
    gives, forward and backward; the shared blocks then run once per sequence."""
    model = randomised(DiT(tiny_config(latent_dim=1, latent_components=5, shared_blocks=shared_blocks)))
    x, sigma = inputs()
    lam = torch.rand(3 * 4, 1)
    grouped = model(x, sigma, lam)
    grads = torch.autograd.grad(grouped.square().sum(), list(model.parameters()))
    repeated = model(x.repeat_interleave(4, 0), sigma.repeat_interleave(4, 0), lam)
    torch.testing.assert_close(grouped, repeated, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, torch.autograd.grad(repeated.square().sum(), list(model.parameters()))):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=2e-4)  # float32 sums in another order


def test_shared_blocks_do_not_see_the_latent():
    """With shared_blocks = 1 the first block's output is the same for every latent:
    perturbing the latent table moves only what comes after it."""
    model = randomised(DiT(tiny_config(latent_dim=1, latent_components=3, shared_blocks=1)))
    x, sigma = inputs()
    seen = []
    model.blocks[0].register_forward_hook(lambda module, args, output: seen.append(output))
    out = [model(x, sigma, torch.full((3, 1), v)) for v in (0.1, 0.9)]
    torch.testing.assert_close(seen[0], seen[1])
    assert not torch.allclose(out[0], out[1])


@pytest.mark.parametrize("shared_blocks", [0, 1])
def test_draw_scores_the_component_its_weights_select(shared_blocks):
    """``model(x, sigma, draw=u)`` is component ``component_from_uniform(log w(x_t), u)``'s
    output, and those components follow the weights."""
    from cdm.models.dit import component_from_uniform

    model = randomised(DiT(tiny_config(latent_dim=1, latent_components=4, mixture_weights=True,
                                       shared_blocks=shared_blocks)))
    x, sigma = inputs()
    u = torch.tensor([0.05, 0.5, 0.97])
    index = component_from_uniform(model(x, sigma, mixture_weights=True), u)
    torch.testing.assert_close(model(x, sigma, draw=u), model(x, sigma, ((index.float() + 0.5) / 4)[:, None]))
    weights = torch.tensor([0.5, 0.3, 0.15, 0.05])
    uniforms = torch.rand(40000, generator=torch.Generator().manual_seed(0))
    draws = component_from_uniform(weights.log().expand(40000, -1), uniforms)
    counts = torch.bincount(draws, minlength=4).double() / 40000
    torch.testing.assert_close(counts, weights.double(), atol=0.01, rtol=0)
    assert component_from_uniform(torch.tensor([[0.0, -math.inf]]), torch.tensor([0.999999])).item() == 0
    with pytest.raises(ValueError, match="draw must"):
        model(x, sigma, draw=torch.rand(2))
    with pytest.raises(ValueError, match="lam must be None"):
        model(x, sigma, torch.rand(3, 1), draw=u)
