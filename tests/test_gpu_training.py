"""The trainer on a GPU: every loss trains on CUDA tensors in both precisions, the
joint-CDM loss (sampled and exact targets) and exact evaluation give on CUDA what
they give on the CPU from the same seed, and the CLI runs a distillation end to end
with ``--device cuda``.

Runs only where torch sees a CUDA device; skipped otherwise (the same code paths run
on the CPU in test_train.py, test_cdm_exact.py and test_baselines.py).

Why CPU and CUDA can agree draw for draw: every random draw of the trainer comes
from one CPU generator (uniforms are drawn there and moved), and ``fused_euler_step``
takes a (seed, offset) from it for its counter-based Philox draws, which the CPU and
CUDA kernels turn into the same uniforms.
"""

from __future__ import annotations

import json

import pytest
import torch

from cdm.cli import main
from cdm.experiment import Setup, exact_metrics, load_model, new_model
from cdm.losses import ExactTargets, get_loss
from cdm.models import make_student
from cdm.train import TrainConfig, Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")
SETUP = Setup(data="markov", data_options={"vocab_size": 4, "seq_len": 3}, noise_options={"sigma_max": 8})


def _teacher() -> torch.nn.Module:
    torch.manual_seed(0)
    return new_model(SETUP, "tiny")


def _student(method: str, teacher: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(1)
    if method in ("cdm_joint", "di4c"):
        extra = {"mixture_weights": True, "shared_blocks": 1} if method == "cdm_joint" else {}
        return make_student(teacher, latent_dim=1, latent_components=4, parameterization="posterior",
                            graph=SETUP.graph, **extra)
    return make_student(teacher, parameterization="posterior", graph=SETUP.graph)


LOSS_OPTIONS = {
    "score_entropy": {},
    "cdm_per_token": {"steps": 2},
    "cdm_joint": {"steps": 2, "num_latents": 4, "num_targets": 2, "teacher_steps": 4, "rollout": 0.5},
    "di4c": {"steps": 2, "num_latents": 4},
    "dmmd": {"steps": 2},
}


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("name", list(LOSS_OPTIONS))
def test_every_loss_trains_on_cuda(tmp_path, name, precision):
    teacher = _teacher().to(CUDA)
    model = _teacher() if name == "score_entropy" else _student(name, teacher)
    loss = get_loss(name, SETUP.kernel_graph, SETUP.schedule, teacher=None if name == "score_entropy" else teacher,
                    **LOSS_OPTIONS[name])
    before = {k: v.detach().clone().to(CUDA) for k, v in model.state_dict().items()}
    config = TrainConfig(steps=4, batch_size=8, lr=1e-3, warmup=1, ema=0.5, log_every=1, save_every=2,
                         progress=False, precision=precision)
    trainer = Trainer(model, loss, SETUP.dataset.sample, config, tmp_path, metadata={"name": name}, device=CUDA)
    trained = trainer.fit()
    assert all(p.device.type == CUDA.type for p in trained.parameters())
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    changed = [k for k, v in trainer.model.state_dict().items()
               if v.is_floating_point() and not torch.equal(v, before[k])]
    assert changed, "no weight moved in 4 steps"
    # a checkpoint written from CUDA resumes on the CPU
    cpu_trainer = Trainer(_teacher() if name == "score_entropy" else _student(name, teacher.cpu()),
                          get_loss(name, SETUP.kernel_graph, SETUP.schedule,
                                   teacher=None if name == "score_entropy" else teacher, **LOSS_OPTIONS[name]),
                          SETUP.dataset.sample, config, tmp_path, metadata={"name": name}, device="cpu")
    assert cpu_trainer.resume() and cpu_trainer.step == 4
    for key, value in cpu_trainer.model.state_dict().items():
        assert torch.equal(value, trainer.model.state_dict()[key].cpu()), key


@pytest.mark.parametrize("target", ["clean", "exact"])
def test_joint_cdm_loss_on_cuda_is_the_cpu_loss_draw_for_draw(target):
    teacher = _teacher()
    student = _student("cdm_joint", teacher)
    options = dict(LOSS_OPTIONS["cdm_joint"], rollout=0.0, target=target)
    values = {}
    for device in ("cpu", "cuda"):
        teacher_d, student_d = teacher.to(device), student.to(device)
        if target == "exact":
            options["exact_targets"] = ExactTargets(teacher_d, SETUP.kernel_graph, SETUP.schedule,
                                                    SETUP.dataset.seq_len, options["steps"], options["teacher_steps"])
        loss = get_loss("cdm_joint", SETUP.kernel_graph, SETUP.schedule, teacher=teacher_d, **options)
        x0 = SETUP.dataset.sample(64, torch.Generator().manual_seed(3)).to(device)
        value = loss(student_d, x0, torch.Generator().manual_seed(4))
        value.backward()
        grads = [p.grad.detach().cpu().clone() for p in student_d.parameters() if p.grad is not None]
        student_d.zero_grad(set_to_none=True)
        values[device] = (value.item(), grads)
    # fp32 networks on two devices: the same draws unless a uniform falls within ~1e-6 of a CDF
    # boundary, so the losses agree to float32 rounding of the network
    assert values["cuda"][0] == pytest.approx(values["cpu"][0], rel=1e-4)
    for cpu_grad, cuda_grad in zip(values["cpu"][1], values["cuda"][1]):
        torch.testing.assert_close(cuda_grad, cpu_grad, rtol=1e-3, atol=1e-5)


def test_exact_metrics_on_cuda_are_the_cpu_metrics():
    teacher = _teacher()
    student = _student("cdm_joint", teacher).eval()
    for model, steps in ((teacher, 8), (student, 2)):
        on_cpu = exact_metrics(model.cpu(), SETUP, steps)
        on_cuda = exact_metrics(model.to(CUDA), SETUP, steps)
        for key in ("kl", "reverse_kl"):
            assert on_cuda[key] == pytest.approx(on_cpu[key], rel=1e-4), key


def test_cli_distills_on_cuda_end_to_end(tmp_path):
    teacher_dir, out = tmp_path / "teacher", tmp_path / "distill"
    main(["pretrain", "--data-option", "vocab_size=4", "--data-option", "seq_len=3", "--steps", "20",
          "--batch-size", "32", "--device", "cuda", "--quiet", "--out", str(teacher_dir)])
    teacher_file = teacher_dir / "teacher.safetensors"
    assert load_model(teacher_file)[0] is not None
    main(["distill", "--teacher", str(teacher_file), "--methods", "per-token,joint", "--student-steps", "1,2",
          "--teacher-nfe", "1,4", "--steps", "6", "--latent-components", "4", "--teacher-steps", "4",
          "--num-samples", "64", "--device", "cuda", "--precision", "fp32", "--quiet", "--out", str(out)])
    rows = json.loads((out / "results.json").read_text())
    expected = [("teacher", 1), ("teacher", 4)] + [("student", 1), ("student", 2)] * 2  # per-token, then joint
    assert [(r["model"], r["nfe"]) for r in rows] == expected
    assert all(r["metrics"]["kl"] >= 0 and torch.isfinite(torch.tensor(r["metrics"]["kl"])) for r in rows)
    main(["eval", "--checkpoint", str(out / "student-joint-k2.safetensors"), "--steps", "2", "--device", "cuda",
          "--handover", "--teacher", str(teacher_file), "--teacher-steps", "2"])
