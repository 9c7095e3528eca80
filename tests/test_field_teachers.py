"""Teachers from the field: SEDD's, MDLM's and DUO's checkpoint layouts, read, written
and checked against their DDiT written out by hand (tests/test_models.py) and the
closed-form scores of their outputs."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from cdm.models import (DiT, DiTConfig, checkpoint_layout, denoiser_config, load_pretrained, save_pretrained,
                        sedd_config)
from cdm.models.dit import LOG_ZERO
from test_models import ddit_reference_logits, randomised, sedd_reference

ROOT = Path(__file__).resolve().parents[1]
VOCAB, LENGTH, HIDDEN, HEADS, BLOCKS, COND = 9, 6, 32, 4, 2, 16  # VOCAB: data tokens (+1 mask when absorbing)


def public_state(num_states: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the parameter names of SEDD's, MDLM's and DUO's DDiT (models/dit.py in
    their repositories), shapes as their modules create them."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {"vocab_embed.embedding": (num_states, HIDDEN),
              "sigma_map.mlp.0.weight": (COND, 256), "sigma_map.mlp.0.bias": (COND,),
              "sigma_map.mlp.2.weight": (COND, COND), "sigma_map.mlp.2.bias": (COND,)}
    for i in range(BLOCKS):
        shapes.update({f"blocks.{i}.norm1.weight": (HIDDEN,), f"blocks.{i}.attn_qkv.weight": (3 * HIDDEN, HIDDEN),
                       f"blocks.{i}.attn_out.weight": (HIDDEN, HIDDEN), f"blocks.{i}.norm2.weight": (HIDDEN,),
                       f"blocks.{i}.mlp.0.weight": (4 * HIDDEN, HIDDEN), f"blocks.{i}.mlp.0.bias": (4 * HIDDEN,),
                       f"blocks.{i}.mlp.2.weight": (HIDDEN, 4 * HIDDEN), f"blocks.{i}.mlp.2.bias": (HIDDEN,),
                       f"blocks.{i}.adaLN_modulation.weight": (6 * HIDDEN, COND),
                       f"blocks.{i}.adaLN_modulation.bias": (6 * HIDDEN,)})
    shapes.update({"output_layer.norm_final.weight": (HIDDEN,), "output_layer.linear.weight": (num_states, HIDDEN),
                   "output_layer.linear.bias": (num_states,),
                   "output_layer.adaLN_modulation.weight": (2 * HIDDEN, COND),
                   "output_layer.adaLN_modulation.bias": (2 * HIDDEN,)})
    state = {name: torch.randn(shape, generator=generator) * 0.3 for name, shape in shapes.items()}
    head_dim = HIDDEN // HEADS
    state["rotary_emb.inv_freq"] = 1.0 / 10_000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    return state


SIZES = SimpleNamespace(hidden=HIDDEN, n_heads=HEADS, n_blocks=BLOCKS)


def hf_config(model_type: str, num_states: int, **extra) -> dict:
    """A config.json as MDLM's and DUO's Hugging Face configs write it."""
    return {"model_type": model_type, "vocab_size": num_states, "model_length": LENGTH, "hidden_dim": HIDDEN,
            "cond_dim": COND, "n_blocks": BLOCKS, "n_heads": HEADS, "dropout": 0.1, "return_dict": False,
            "torch_dtype": "float32", **extra}


def write(directory, config: dict, state: dict, prefix: str = "") -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    save_file({prefix + name: t.contiguous() for name, t in state.items()}, directory / "model.safetensors")


def noisy_inputs(num_states: int, masked: bool, batch: int = 4, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(0, num_states - (1 if masked else 0), (batch, LENGTH), generator=generator)
    if masked:
        x = torch.where(torch.rand(x.shape, generator=generator) < 0.5, num_states - 1, x)
    sigma = torch.rand(batch, generator=generator) * 3 + 0.05
    return x, sigma


def absorbing_scores(log_p0: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Log-scores of the absorbing graph from a conditional with MDLM's carry-over, in closed form:
    at a masked position r_y = p0(y) / (e^sigma - 1); a clean token may only be masked, r_mask = e^sigma - 1."""
    mask = log_p0.shape[-1] - 1
    log_odds = torch.log(torch.expm1(sigma.double()))[:, None, None]
    masked = (x == mask)[..., None]
    clean_scores = torch.full_like(log_p0, LOG_ZERO).index_fill(-1, torch.tensor([mask]), 0.0) + \
        torch.zeros_like(log_p0).index_fill(-1, torch.tensor([mask]), 1.0) * log_odds
    out = torch.where(masked, (log_p0 - log_odds).clamp_min(LOG_ZERO), clean_scores)
    return torch.scatter(out, -1, x[..., None], 0.0)


def uniform_scores(log_p0: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Log-scores of the uniform graph: r_y = sum_a p0(a) K(a, y) / K(a, x), K = e^-s I + (1 - e^-s) / N."""
    n = log_p0.shape[-1]
    alpha = torch.exp(-sigma.double())[:, None, None, None]
    kernel = alpha * torch.eye(n, dtype=torch.float64) + (1 - alpha) / n  # (B, 1, N, N)
    p0 = log_p0.exp()
    column = kernel[:, 0].gather(-1, x[:, :, None].expand(-1, -1, n).transpose(1, 2)).transpose(1, 2)  # K(a, x_i)
    ratios = torch.einsum("bla,bay->bly", p0 / column, kernel[:, 0])
    return ratios.log()


# ----------------------------------------------------------------------------- layouts built by hand


def test_sedd_layout_by_hand(tmp_path):
    state = public_state(VOCAB + 1)
    config = {"tokens": VOCAB, "graph": {"type": "absorb"},
              "noise": {"type": "loglinear", "sigma_min": 1e-4, "sigma_max": 20},
              "model": {"name": "small", "type": "ddit", "hidden_size": HIDDEN, "cond_dim": COND, "length": LENGTH,
                        "n_blocks": BLOCKS, "n_heads": HEADS, "scale_by_sigma": True, "dropout": 0.1},
              "training": {"batch_size": 512}}
    write(tmp_path, config, state)
    assert checkpoint_layout(tmp_path) == "sedd"
    loaded = load_pretrained(tmp_path)
    assert (loaded.layout, loaded.graph, loaded.noise, loaded.noise_options) == ("sedd", "absorbing", "loglinear", {})
    assert (loaded.num_states, loaded.seq_len) == (VOCAB + 1, LENGTH)
    x, sigma = noisy_inputs(VOCAB + 1, masked=True)
    expected = sedd_reference(state, SimpleNamespace(**vars(SIZES), scale_by_sigma=True), x, sigma)
    torch.testing.assert_close(loaded.model(x, sigma), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("time_conditioning", [False, True])
def test_mdlm_layout_by_hand_is_subs(tmp_path, time_conditioning):
    state = public_state(VOCAB + 1)
    write(tmp_path, hf_config("mdlm", VOCAB + 1, time_conditioning=time_conditioning,
                              architectures=["MDLM"]), state, prefix="backbone.")
    assert checkpoint_layout(tmp_path) == "mdlm"
    loaded = load_pretrained(tmp_path)
    assert (loaded.layout, loaded.graph, loaded.noise) == ("mdlm", "absorbing", "loglinear")
    assert loaded.model.config.parameterization == "posterior"
    x, sigma = noisy_inputs(VOCAB + 1, masked=True)
    # MDLM's backbone sees sigma = 0 without time conditioning; SUBS: no mask, carry-over, normalised
    logits = ddit_reference_logits(state, SIZES, x, sigma if time_conditioning else torch.zeros_like(sigma))
    log_p0 = logits.double().index_fill(-1, torch.tensor([VOCAB]), -math.inf).log_softmax(-1)
    expected = absorbing_scores(log_p0, x, sigma)
    torch.testing.assert_close(loaded.model(x, sigma).double(), expected, rtol=1e-4, atol=1e-4)


def test_duo_layout_by_hand_is_the_uniform_posterior(tmp_path):
    state = public_state(VOCAB)
    write(tmp_path, hf_config("DUO", VOCAB, causal=False, var_min=True), state, prefix="backbone.")
    assert checkpoint_layout(tmp_path) == "duo"
    loaded = load_pretrained(tmp_path)
    assert (loaded.layout, loaded.graph, loaded.noise) == ("duo", "uniform", "loglinear")
    x, sigma = noisy_inputs(VOCAB, masked=False)
    log_p0 = ddit_reference_logits(state, SIZES, x, sigma).double().log_softmax(-1)  # DUO: sigma = -log alpha_t
    torch.testing.assert_close(loaded.model(x, sigma), uniform_scores(log_p0, x, sigma), rtol=1e-5, atol=1e-5)


def test_pickled_weights_without_inv_freq(tmp_path):
    """``pytorch_model.bin`` (a pickled state dict, as transformers writes without safetensors),
    saved without the rotary buffer: the DiT's own frequencies are the checkpoint's."""
    state = public_state(VOCAB)
    (tmp_path / "config.json").write_text(json.dumps(hf_config("DUO", VOCAB)))
    torch.save({"backbone." + name: t for name, t in state.items() if name != "rotary_emb.inv_freq"},
               tmp_path / "pytorch_model.bin")
    x, sigma = noisy_inputs(VOCAB, masked=False)
    log_p0 = ddit_reference_logits(state, SIZES, x, sigma).double().log_softmax(-1)
    torch.testing.assert_close(load_pretrained(tmp_path).model(x, sigma), uniform_scores(log_p0, x, sigma),
                               rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- written by cdm


LAYOUT_CASES = {
    "sedd": dict(scale_by_sigma=True),
    "mdlm": dict(parameterization="posterior", graph="absorbing", time_conditioning=False),
    "duo": dict(parameterization="posterior", graph="uniform"),
}


@pytest.mark.parametrize("layout", sorted(LAYOUT_CASES))
@pytest.mark.parametrize("mixture", [{}, {"latent_dim": 1, "latent_components": 3, "shared_blocks": 1}])
def test_saved_networks_load_as_they_were(tmp_path, layout, mixture):
    absorbing = layout != "duo"
    num_states = VOCAB + 1 if absorbing else VOCAB
    config = DiTConfig(num_states, LENGTH, HIDDEN, HEADS, BLOCKS, COND, **LAYOUT_CASES[layout], **mixture)
    model = randomised(DiT(config))
    written = save_pretrained(model, tmp_path, "absorbing" if absorbing else "uniform", "loglinear", {})
    assert written == layout == checkpoint_layout(tmp_path)
    loaded = load_pretrained(tmp_path)
    assert loaded.model.config == config
    x, sigma = noisy_inputs(num_states, masked=absorbing)
    lam = torch.tensor([0.1, 0.5, 0.9, 0.4])[:, None] if mixture else None
    assert torch.equal(loaded.model(x, sigma, lam), model(x, sigma, lam))
    if layout != "sedd":  # their wrapper's names: everything behind "backbone."
        from safetensors.torch import load_file
        assert all(name.startswith("backbone.") for name in load_file(tmp_path / "model.safetensors"))


def test_a_geometric_schedule_round_trips_in_sedds_layout(tmp_path):
    save_pretrained(DiT(DiTConfig(VOCAB, LENGTH)), tmp_path, "uniform", "geometric", {"sigma_max": 8})
    loaded = load_pretrained(tmp_path)
    assert (loaded.graph, loaded.noise, loaded.noise_options) == ("uniform", "geometric",
                                                                   {"sigma_min": 1e-3, "sigma_max": 8.0})


def test_saving_keeps_the_teachers_other_settings(tmp_path):
    state = public_state(VOCAB + 1)
    write(tmp_path / "teacher", hf_config("mdlm", VOCAB + 1, auto_map={"AutoConfig": "configuration_mdlm.MDLMConfig"}),
          state, prefix="backbone.")
    teacher = load_pretrained(tmp_path / "teacher")
    save_pretrained(teacher.model, tmp_path / "student", teacher.graph, teacher.noise, teacher.noise_options,
                    like=teacher)
    config = json.loads((tmp_path / "student" / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_mdlm.MDLMConfig"}
    assert config["time_conditioning"] is False and config["vocab_size"] == VOCAB + 1


# ----------------------------------------------------------------------------- refusals


def test_unknown_and_missing_checkpoints_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        load_pretrained(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="none of the layouts.*'llama'"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(hf_config("mdlm", VOCAB + 1)))
    with pytest.raises(FileNotFoundError, match="MDLM checkpoint .* neither model.safetensors nor pytorch_model.bin"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("change, message", [
    (lambda c, s: c.pop("hidden_dim"), r"MDLM config is missing keys \['hidden_dim'\]"),
    (lambda c, s: c.update(mask_token_id=3), "mask token 3; cdm's absorbing graph needs it last"),
    (lambda c, s: s.pop("backbone.blocks.1.attn_out.weight"), r"missing parameters \['blocks.1.attn_out.weight'\]"),
    (lambda c, s: s.update({"backbone.extra.weight": torch.zeros(1)}), r"unexpected parameters \['extra.weight'\]"),
    (lambda c, s: s.update({"sampling_eps_min": torch.zeros(())}), "parameters outside 'backbone.'"),
    (lambda c, s: c.update(n_heads=3), "describes no valid network: hidden=32 must split"),
    (lambda c, s: c.update(vocab_size=VOCAB),
     r"vocab_embed.embedding: checkpoint shape \(10, 32\), model expects \(9, 32\)"),
])
def test_mdlm_mismatches_are_refused(tmp_path, change, message):
    config = hf_config("mdlm", VOCAB + 1)
    state = {"backbone." + name: t for name, t in public_state(VOCAB + 1).items()}
    change(config, state)
    write(tmp_path, config, state)
    with pytest.raises(ValueError, match=message):
        load_pretrained(tmp_path)


def test_causal_duo_is_refused(tmp_path):
    write(tmp_path, hf_config("DUO", VOCAB, causal=True), public_state(VOCAB), prefix="backbone.")
    with pytest.raises(ValueError, match="causal=true: that is an autoregressive network"):
        load_pretrained(tmp_path)


def test_layouts_refuse_networks_they_cannot_hold(tmp_path):
    posterior = DiTConfig(VOCAB + 1, LENGTH, HIDDEN, HEADS, BLOCKS, COND, parameterization="posterior",
                          graph="absorbing")
    with pytest.raises(ValueError, match="SEDD's layout holds score networks"):
        sedd_config(posterior, graph="absorb")
    with pytest.raises(ValueError, match="DUO's layout holds posterior networks of the uniform graph"):
        denoiser_config(posterior, "duo")
    with pytest.raises(ValueError, match="records no noise schedule"):
        save_pretrained(DiT(posterior), tmp_path, "absorbing", "geometric", {})
    with pytest.raises(ValueError, match="eps=0.001 only"):
        save_pretrained(DiT(posterior), tmp_path, "absorbing", "loglinear", {"eps": 0.01})
    ordinal = DiTConfig(VOCAB, LENGTH, HIDDEN, HEADS, BLOCKS, COND, parameterization="posterior", graph="ordinal")
    with pytest.raises(ValueError, match="no published layout holds a posterior network of the ordinal graph"):
        save_pretrained(DiT(ordinal), tmp_path, "ordinal", "geometric", {})


# ----------------------------------------------------------------------------- the chunked joint-CDM loss

import cdm_kernels as ck  # noqa: E402
from cdm.losses import joint_cdm_loss  # noqa: E402
from cdm.schedules import LogLinearNoise  # noqa: E402

CHUNK_CASES = {
    "absorbing-posterior": (dict(parameterization="posterior", graph="absorbing", time_conditioning=False), {}),
    "absorbing-score-shared": (dict(scale_by_sigma=True, shared_blocks=1), {}),
    "uniform-posterior-weighted": (dict(parameterization="posterior", graph="uniform", mixture_weights=True), {}),
    "uniform-score-step": (dict(), dict(steps=2, target="step")),
}


def chunk_case(name: str, vocab: int = VOCAB, length: int = LENGTH):
    network, options = CHUNK_CASES[name]
    absorbing = network.get("graph", "absorbing" if "scale_by_sigma" in network else "uniform") == "absorbing"
    num_states = vocab + 1 if absorbing else vocab
    graph = ck.AbsorbingGraph(num_states) if absorbing else ck.UniformGraph(num_states)
    config = DiTConfig(num_states, length, HIDDEN, HEADS, BLOCKS, COND, latent_dim=1, latent_components=4, **network)
    teacher = randomised(DiT(DiTConfig(num_states, length, HIDDEN, HEADS, BLOCKS, COND)), seed=1)
    student = randomised(DiT(config), seed=2).train()
    x0 = torch.randint(0, vocab, (3, length), generator=torch.Generator().manual_seed(3))
    return student, teacher, graph, x0, dict(num_latents=4, num_targets=2, teacher_steps=2, **options)


def loss_and_grads(student, teacher, graph, x0, options, chunk, teacher_batch=None):
    loss = joint_cdm_loss(student, teacher, graph, LogLinearNoise(), x0, chunk=chunk, teacher_batch=teacher_batch,
                          generator=torch.Generator().manual_seed(4), **options)
    return loss, torch.autograd.grad(loss, [p for p in student.parameters()], allow_unused=True)


@pytest.mark.parametrize("name", sorted(CHUNK_CASES))
def test_chunked_joint_loss_equals_the_whole_one(name):
    student, teacher, graph, x0, options = chunk_case(name)
    whole, whole_grads = loss_and_grads(student, teacher, graph, x0, options, None)
    assert torch.isfinite(whole) and whole > 0
    for chunk in (1, 4, LENGTH):  # 4: a last chunk shorter than the others
        loss, grads = loss_and_grads(student, teacher, graph, x0, options, chunk)
        torch.testing.assert_close(loss, whole, rtol=1e-5, atol=1e-6)
        for a, b in zip(grads, whole_grads):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # the teacher's chain one sequence per call: other draws (one generator call per row), the same equality
    whole, whole_grads = loss_and_grads(student, teacher, graph, x0, options, None, teacher_batch=1)
    for chunk in (2,):
        loss, grads = loss_and_grads(student, teacher, graph, x0, options, chunk, teacher_batch=1)
        torch.testing.assert_close(loss, whole, rtol=1e-5, atol=1e-6)
        for a, b in zip(grads, whole_grads):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def allocated_peak(fn) -> int:
    """Peak bytes of tensor memory allocated during ``fn()`` above what was live before, from the CPU
    allocator's events as torch.profiler records them (benchmarks/_harness.py measures the same way)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    sizes = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    running = torch.tensor([n for _, n in sizes], dtype=torch.int64).cumsum(0)
    return int(running.max())


def test_chunked_joint_loss_holds_less_memory():
    student, teacher, graph, x0, options = chunk_case("absorbing-posterior", vocab=2048, length=16)
    peaks = {chunk: allocated_peak(lambda: loss_and_grads(student, teacher, graph, x0, options, chunk))
             for chunk in (None, 2)}
    # whole: B * M * L * N float32 logits, several times over (~50 MB here); chunked: 1/8 of the positions at a time
    rows = x0.shape[0] * options["num_latents"] * x0.shape[1] * graph.num_states * 4
    assert peaks[None] > 4 * rows and peaks[2] < peaks[None] / 3, (peaks, rows)


def test_chunk_is_validated():
    student, teacher, graph, x0, options = chunk_case("absorbing-posterior")
    with pytest.raises(ValueError, match="chunk must be a positive int"):
        loss_and_grads(student, teacher, graph, x0, options, 0)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        loss_and_grads(student, teacher, graph, x0, options, None, teacher_batch=0)
    with pytest.raises(ValueError, match="chunk does not go with target='exact'"):
        joint_cdm_loss(student, teacher, graph, LogLinearNoise(), x0, chunk=2, target="exact")


# ----------------------------------------------------------------------------- through the command line

from cdm.cli import main  # noqa: E402
from cdm.experiment import Setup, load_model  # noqa: E402

MARKOV = ["--data", "markov", "--data-option", "vocab_size=4", "--data-option", "seq_len=3"]


@pytest.fixture(scope="module")
def sedd_teacher(tmp_path_factory):
    """A tiny absorbing, log-linear teacher pretrained with score entropy on the markov data
    (4 tokens + the mask, length 3), written in SEDD's layout."""
    root = tmp_path_factory.mktemp("sedd-teacher")
    main(["pretrain", *MARKOV, "--graph", "absorbing", "--noise", "loglinear", "--steps", "40", "--batch-size", "64",
          "--out", str(root / "run"), "--quiet", "--device", "cpu"])
    model, setup, _ = load_model(root / "run" / "teacher.safetensors")
    save_pretrained(model, root / "sedd", setup.graph, setup.noise, setup.noise_options)
    return root / "sedd"


def test_every_method_distils_an_absorbing_sedd_teacher(sedd_teacher, tmp_path, capsys):
    out = tmp_path / "compare"
    main(["compare", "--teacher", str(sedd_teacher), *MARKOV, "--steps", "3", "--batch-size", "4",
          "--student-steps", "1,2", "--teacher-nfe", "1,4", "--num-samples", "32", "--latent-components", "2",
          "--teacher-steps", "2", "--num-targets", "1", "--out", str(out), "--quiet", "--device", "cpu"])
    rows = json.loads((out / "results.json").read_text())
    assert {(r["model"], r["method"], r["nfe"]) for r in rows} == {
        ("teacher", "analytic", 1), ("teacher", "analytic", 4),
        *{("student", method, k) for method in ("cdm-per-token", "cdm-joint", "di4c", "d-mmd") for k in (1, 2)}}
    assert all({"kl", "reverse_kl", "nll"} <= set(r["metrics"]) for r in rows)  # 5^3 states: exact KLs
    assert "absorbing graph" in capsys.readouterr().out
    for method in ("per-token", "joint", "di4c", "dmmd"):
        student, setup, _ = load_model(out / f"student-{method}-k1.safetensors")
        assert (setup.graph, setup.noise, student.config.parameterization) == ("absorbing", "loglinear", "score")
        saved = load_pretrained(out / f"student-{method}-k1")  # the teacher's own layout, for its own tools
        assert saved.layout == "sedd" and saved.model.config == student.config
        x, sigma = torch.randint(0, 5, (3, 3)), torch.tensor([0.3, 1.0, 5.0])
        lam = torch.tensor([0.1, 0.6, 0.9]) if student.config.latent_dim else None
        assert torch.equal(saved.model(x, sigma, lam), student(x, sigma, lam))
    capsys.readouterr()
    main(["eval", "--checkpoint", str(out / "student-joint-k2.safetensors"), "--steps", "2", "--handover",
          "--teacher", str(sedd_teacher), "--teacher-steps", "2"])
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:]] == ["ss", "tt", "st", "ts"]


def test_a_posterior_student_of_a_sedd_teacher_is_written_in_mdlms_layout(sedd_teacher, tmp_path):
    main(["distill", "--teacher", str(sedd_teacher), *MARKOV, "--methods", "per-token", "--student-output",
          "posterior", "--steps", "2", "--batch-size", "4", "--student-steps", "1", "--teacher-nfe", "1",
          "--num-samples", "16", "--out", str(tmp_path), "--quiet", "--device", "cpu"])
    saved = load_pretrained(tmp_path / "student-per-token-k1")
    assert saved.layout == "mdlm" and not saved.model.config.scale_by_sigma


@pytest.mark.parametrize("options, needles", [
    (["--data-option", "vocab_size=5", "--data-option", "seq_len=3"],
     ["SEDD checkpoint's absorbing graph has 5 states", "the markov data has 5 tokens plus the mask: 6 states"]),
    (["--data-option", "vocab_size=4", "--data-option", "seq_len=4"],
     ["SEDD checkpoint's length is 3", "the markov data's 4"]),
])
def test_a_teacher_that_does_not_fit_the_data_is_refused(sedd_teacher, tmp_path, capsys, options, needles):
    with pytest.raises(SystemExit) as exit_info:
        main(["distill", "--teacher", str(sedd_teacher), "--data", "markov", *options, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert all(needle in err for needle in needles), err


def test_data_goes_with_a_checkpoint_directory_only(sedd_teacher, tmp_path, capsys):
    teacher_file = sedd_teacher.parent / "run" / "teacher.safetensors"
    with pytest.raises(SystemExit):
        main(["distill", "--teacher", str(teacher_file), "--data", "words", "--out", str(tmp_path)])
    assert "--data: the model file" in capsys.readouterr().err


def test_handover_with_a_teacher_of_another_graph_is_refused(sedd_teacher, tmp_path, capsys):
    student = tmp_path / "uniform.safetensors"
    setup = Setup(data="markov", data_options={"vocab_size": 4, "seq_len": 3})
    from cdm.experiment import new_model, save_model
    save_model(student, new_model(setup, "tiny"), setup, "student")
    with pytest.raises(SystemExit):
        main(["eval", "--checkpoint", str(student), "--steps", "1", "--handover", "--teacher", str(sedd_teacher)])
    assert "SEDD checkpoint of the absorbing graph; the run is on the uniform graph" in capsys.readouterr().err


@pytest.mark.parametrize("sharding", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_chunked_joint_cdm_on_two_ranks_trains_the_whole_ones_student(tmp_path, sharding):
    """Under torchrun (2 ranks, gloo), --chunk runs inside the wrapped forward: DDP and FSDP
    reduce the same gradients as without it, so both runs end at the same weights."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("needs torch.distributed with gloo")
    from test_distributed import WEIGHTED_DISTILL, identical_rank_dumps, torchrun

    runs = {}
    for name, extra in (("whole", []), ("chunked", ["--chunk", "2"])):
        torchrun(tmp_path / name, tmp_path / f"{name}-dump", 3, "--teacher-batch", "1", *extra, *sharding,
                 cli=WEIGHTED_DISTILL)
        runs[name] = identical_rank_dumps(tmp_path / f"{name}-dump")[0]
    for key, value in runs["whole"].items():
        if key.startswith("model."):
            torch.testing.assert_close(runs["chunked"][key], value, rtol=1e-4, atol=1e-6, msg=key)


def test_the_gpu_recipe_script_runs_small_on_the_cpu(tmp_path):
    """benchmarks/gpu_field_distill.sh at a CPU's size: torchrun (one rank), a SEDD-layout
    absorbing teacher of bytes, a pre-tokenized .bin corpus, the chunked joint loss."""
    import numpy as np

    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("needs torch.distributed with gloo")
    corpus = tmp_path / "corpus.bin"
    text = " ".join(f"the {word} sat on the mat number {i}." for i, word in enumerate(["cat", "dog", "owl"] * 60))
    np.frombuffer(text.encode(), dtype=np.uint8).astype(np.uint16).tofile(corpus)
    setup = Setup(data="text", data_options={"path": str(corpus), "seq_len": 8}, graph="absorbing",
                  noise="loglinear")
    from cdm.experiment import new_model
    save_pretrained(new_model(setup, "tiny"), tmp_path / "sedd", setup.graph, setup.noise, setup.noise_options)
    out = tmp_path / "out"
    env = {key: value for key, value in os.environ.items()
           if key not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(TEACHER=str(tmp_path / "sedd"), CORPUS=str(corpus), SEQ_LEN="8", DEVICE="cpu", PRECISION="fp32",
               BATCH="2", LATENTS="2", TARGETS="2", TEACHER_STEPS="2", CHUNK="3", TEACHER_BATCH="1",
               STUDENT_STEPS="2", STEPS="2", WARMUP="0", OUT=str(out), PYTHON=sys.executable, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
               EXTRA="--teacher-nfe 2 --num-samples 4 --evaluator-steps 2")
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_field_distill.sh")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())
    assert [(r["model"], r["method"], r["nfe"]) for r in rows] == [("teacher", "analytic", 2),
                                                                    ("student", "cdm-joint", 2)]
    student, run, _ = load_model(out / "student-joint-k2.safetensors")
    saved = load_pretrained(out / "student-joint-k2")
    assert (run.data, run.graph, saved.layout) == ("text", "absorbing", "sedd")
    assert student.config.latent_components == 2 and saved.model.config == student.config
    assert "student-joint-k2" in (out / "distill.log").read_text()


# ----------------------------------------------------------------------------- on text, through the command line

TEXT_LENGTH = 8
TEXT = " ".join(f"the {word} sat on the mat, and the mat was {i}." for i, word in enumerate(["cat", "dog", "owl"] * 20))


@pytest.fixture
def text_corpus(tmp_path, monkeypatch):
    """A small UTF-8 corpus the test writes, and ``--data`` options that read it (the corpus's
    own evaluator trained 3 steps, cached under tmp_path)."""
    monkeypatch.setenv("CDM_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return ["--data", "text", "--data-option", f"path={path}", "--data-option", f"seq_len={TEXT_LENGTH}",
            "--evaluator-steps", "3"]


def field_teacher(directory, layout: str, num_states: int = 256 + 1, length: int = TEXT_LENGTH) -> Path:
    """A random network of ``num_states`` states written in ``layout`` (SEDD's and MDLM's: absorbing,
    the mask last; DUO's: uniform) with the released log-linear schedule."""
    config = DiTConfig(num_states, length, HIDDEN, HEADS, BLOCKS, COND, **LAYOUT_CASES[layout])
    save_pretrained(randomised(DiT(config)), directory, "uniform" if layout == "duo" else "absorbing", "loglinear", {})
    return directory


@pytest.mark.parametrize("layout", ["sedd", "mdlm", "duo"])
def test_every_method_distils_a_byte_teacher_on_text(layout, text_corpus, tmp_path, capsys):
    """A tiny teacher of bytes in SEDD's or MDLM's layout (absorbing: 256 tokens + the mask)
    or DUO's (uniform: 256), distilled by every method on a text corpus: results.json rows
    with gen_ppl and entropy, and each student written in the teacher's own layout, which
    reloads as the same network."""
    graph = "uniform" if layout == "duo" else "absorbing"
    num_states = 256 if layout == "duo" else 257
    teacher = field_teacher(tmp_path / layout, layout, num_states)
    out = tmp_path / "compare"
    main(["compare", "--teacher", str(teacher), *text_corpus, "--steps", "2", "--batch-size", "4",
          "--student-steps", "1,2", "--teacher-nfe", "1,2", "--num-samples", "8", "--latent-components", "2",
          "--teacher-steps", "2", "--out", str(out), "--device", "cpu", "--quiet"])
    assert f"text data, {graph} graph; primary metric: gen_ppl" in capsys.readouterr().out
    rows = json.loads((out / "results.json").read_text())
    methods = ("cdm-per-token", "cdm-joint", "di4c", "d-mmd")
    assert [(r["model"], r["method"], r["nfe"]) for r in rows] == [
        ("teacher", "analytic", 1), ("teacher", "analytic", 2), *[("student", m, k) for m in methods for k in (1, 2)]]
    for row in rows:
        assert set(row) >= {"model", "method", "nfe", "metrics"} and "kl" not in row["metrics"]
        assert row["metrics"]["gen_ppl"] > 1 and 0 < row["metrics"]["entropy"] <= math.log(TEXT_LENGTH)
    parameterization = "score" if layout == "sedd" else "posterior"
    x = torch.randint(0, num_states, (3, TEXT_LENGTH), generator=torch.Generator().manual_seed(5))
    sigma = torch.tensor([0.3, 1.0, 5.0])
    for method in ("per-token", "joint", "di4c", "dmmd"):
        student, setup, _ = load_model(out / f"student-{method}-k2.safetensors")
        assert (setup.data, setup.graph, setup.noise) == ("text", graph, "loglinear")
        assert student.config.parameterization == parameterization
        saved = load_pretrained(out / f"student-{method}-k2")
        assert saved.layout == layout and saved.model.config == student.config
        lam = torch.tensor([0.1, 0.6, 0.9]) if student.config.latent_dim else None
        assert torch.equal(saved.model(x, sigma, lam), student(x, sigma, lam))


@pytest.mark.parametrize("layout, num_states, length, needles", [
    ("sedd", 50257 + 1, TEXT_LENGTH, ["--teacher", "the SEDD checkpoint's absorbing graph has 50258 states",
                                      "the text data has 256 tokens plus the mask: 257 states",
                                      "--data-option tokenizer=FILE"]),
    ("sedd", 256, TEXT_LENGTH, ["SEDD checkpoint's absorbing graph has 256 states", "plus the mask: 257 states"]),
    ("duo", 257, TEXT_LENGTH, ["DUO checkpoint's uniform graph has 257 states", "the text data has 256 tokens: 256",
                               "the default, bytes, has 256 tokens"]),
    ("mdlm", 257, 2 * TEXT_LENGTH, ["MDLM checkpoint's length is 16, the text data's 8",
                                    "--data-option seq_len=16 fits it"]),
])
def test_a_teacher_that_does_not_fit_the_text_is_refused(layout, num_states, length, needles, text_corpus, tmp_path,
                                                         capsys):
    """Vocabulary (a GPT-2-sized teacher on the byte tokenizer; an absorbing one without room for
    the mask; a uniform one of another size) and length, each naming both sides and the fix."""
    teacher = field_teacher(tmp_path / layout, layout, num_states, length)
    with pytest.raises(SystemExit) as exit_info:
        main(["distill", "--teacher", str(teacher), *text_corpus, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert all(needle in err for needle in needles), err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def word_tokenizer(directory, padded: bool) -> Path:
    """A tokenizers JSON built by hand: a word-level vocabulary of the corpus's words and
    punctuation (plus [UNK]); ``padded``: with a [PAD] token added, as DUO's code adds
    one to GPT-2's tokenizer (written the way the refusal's message says)."""
    import re

    from tokenizers import Tokenizer

    words = sorted(set(re.findall(r"\w+|[^\w\s]+", TEXT)))
    document = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
                "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
                "model": {"type": "WordLevel", "vocab": {w: i for i, w in enumerate(words + ["[UNK]"])},
                          "unk_token": "[UNK]"}}
    path = directory / "words.json"
    path.write_text(json.dumps(document))
    if padded:
        tokenizer = Tokenizer.from_file(str(path))
        tokenizer.add_special_tokens(["[PAD]"])
        path = directory / "words-pad.json"
        tokenizer.save(str(path))
    return path


def test_a_duo_teacher_counts_the_pad_token_of_its_tokenizer(text_corpus, tmp_path, capsys):
    """DUO's releases have GPT-2's 50257 tokens plus the [PAD] its code adds (50258 states, uniform
    graph). Here in small: a teacher of N + 1 states with a tokenizer file of N tokens is refused
    with the way to add the pad token; the file so padded runs; an MDLM teacher (N tokens + the
    mask) refuses the padded file."""
    pytest.importorskip("tokenizers")
    plain, padded = word_tokenizer(tmp_path, padded=False), word_tokenizer(tmp_path, padded=True)
    tokens = len(json.loads(plain.read_text())["model"]["vocab"])
    duo = field_teacher(tmp_path / "duo", "duo", tokens + 1)
    argv = ["distill", "--teacher", str(duo), *text_corpus, "--methods", "per-token", "--student-steps", "1",
            "--teacher-nfe", "1", "--steps", "1", "--batch-size", "4", "--num-samples", "8", "--device", "cpu",
            "--quiet"]
    with pytest.raises(SystemExit):
        main([*argv, "--data-option", f"tokenizer={plain}", "--out", str(tmp_path / "refused")])
    err = capsys.readouterr().err
    assert f"DUO checkpoint's uniform graph has {tokens + 1} states, but the text data has {tokens} tokens" in err
    assert "add it to the file given as --data-option tokenizer=FILE" in err and "add_special_tokens(['[PAD]'])" in err
    out = tmp_path / "padded"
    main([*argv, "--data-option", f"tokenizer={padded}", "--out", str(out)])
    rows = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in rows] == ["analytic", "cdm-per-token"] and rows[1]["metrics"]["gen_ppl"] > 1
    assert load_pretrained(out / "student-per-token-k1").layout == "duo"
    mdlm = field_teacher(tmp_path / "mdlm", "mdlm", tokens + 1)
    with pytest.raises(SystemExit):
        main(["distill", "--teacher", str(mdlm), *text_corpus, "--data-option", f"tokenizer={padded}",
              "--out", str(tmp_path / "mdlm-out")])
    err = capsys.readouterr().err
    assert f"has {tokens + 1} tokens plus the mask: {tokens + 2} states" in err and "give it without" in err
