"""conditional_matching_loss: value, gradient, reductions, against independent computations."""

import pytest
import torch

import cdm_kernels as ck
from cdm_kernels import reference
from exact import exact_noisy, random_data_distribution, small_graphs
from test_posterior import noisy_scores


def test_value_is_cross_entropy_against_the_exact_conditional(backend):
    for graph in small_graphs(4):
        truth = exact_noisy(graph, random_data_distribution(graph, 2), 2, 0.6)
        target = torch.softmax(torch.randn(truth.posterior.shape, dtype=torch.float64), -1)
        if graph.family == "absorbing":  # a target never puts mass where the conditional is structurally 0
            target = torch.where(truth.posterior > 0, target, 0.0)
            target = target / target.sum(-1, keepdim=True)
        loss = ck.conditional_matching_loss(graph, truth.log_ratio, truth.x, 0.6, target, reduction="none", backend=backend)
        plogq = torch.where(target > 0, target * truth.posterior.log(), 0.0)
        assert loss.dtype == torch.float32
        assert torch.allclose(loss.double(), -plogq.sum(-1), rtol=1e-5, atol=1e-6), graph


def test_reductions(backend):
    graph = ck.UniformGraph(9)
    log_score, x = torch.randn(3, 5, 9), torch.randint(0, 9, (3, 5))
    target = torch.softmax(torch.randn(3, 5, 9), -1)
    per_position = ck.conditional_matching_loss(graph, log_score, x, 0.5, target, reduction="none", backend=backend)
    assert per_position.shape == (3, 5)
    assert torch.allclose(ck.conditional_matching_loss(graph, log_score, x, 0.5, target, backend=backend), per_position.mean())
    assert torch.allclose(ck.conditional_matching_loss(graph, log_score, x, 0.5, target, reduction="sum", backend=backend), per_position.sum())


@pytest.mark.parametrize("tau", [0.05, 1.0, 4.0])
def test_gradient_matches_finite_differences(backend, tau):
    for graph in small_graphs(5):
        log_score, x = noisy_scores(graph, 6, tau, seed=2, noise=0.05, dtype=torch.float64)
        truth = reference.scores_to_posterior(graph, log_score, x, torch.full((6,), tau, dtype=torch.float64)).exp()
        target = 0.5 * truth + 0.5 * torch.softmax(torch.randn(6, 5, dtype=torch.float64), -1) * (truth > 0)
        target = target / target.sum(-1, keepdim=True)
        weights = torch.rand(6, dtype=torch.float64)
        log_score.requires_grad_(True)

        def loss(scores):
            return ck.conditional_matching_loss(graph, scores, x, tau, target, reduction="none", backend=backend).double() * weights

        # the fused backends return a float32 loss: compare their gradient with autograd of the float64 reference
        grad = torch.autograd.grad(loss(log_score).sum(), log_score)[0]
        expected = torch.autograd.grad(
            (reference.conditional_matching_loss(graph, log_score, x, torch.full((6,), tau, dtype=torch.float64), target) * weights).sum(),
            log_score,
        )[0]
        assert torch.allclose(grad, expected, rtol=1e-5, atol=1e-7), graph


def test_gradient_vanishes_at_the_matching_student(backend):
    # CE(target, q) is minimised at q = target: exact scores of the target's posterior have zero gradient
    graph = ck.UniformGraph(6)
    x, tau = torch.tensor([0, 3, 5]), torch.full((3,), 0.9, dtype=torch.float64)
    target = torch.softmax(torch.randn(3, 6, dtype=torch.float64), -1)
    log_score = ck.posterior_to_scores(graph, target.log(), x, tau).requires_grad_(True)
    loss = ck.conditional_matching_loss(graph, log_score, x, tau, target, reduction="sum", backend=backend)
    (grad,) = torch.autograd.grad(loss, log_score)
    assert grad.abs().max() < 1e-5


def test_only_the_student_gets_a_gradient(backend):
    graph = ck.UniformGraph(5)
    target = torch.softmax(torch.randn(2, 5, requires_grad=True), -1)
    with pytest.raises(ValueError, match="target must not require grad"):
        ck.conditional_matching_loss(graph, torch.randn(2, 5), torch.tensor([0, 1]), 0.5, target, backend=backend)


def test_bf16_error_at_most_twice_eager_bf16(backend):
    for graph in [ck.UniformGraph(17), ck.AbsorbingGraph(17), ck.ordinal_graph(17)]:
        log_score, x = noisy_scores(graph, 256, 0.7, seed=4, noise=0.2, dtype=torch.float64)
        tau = torch.full((256,), 0.7, dtype=torch.float64)
        target = reference.scores_to_posterior(graph, log_score + 0.1 * torch.randn_like(log_score), x, tau).exp()
        truth = reference.conditional_matching_loss(graph, log_score, x, tau, target)
        eager = reference.conditional_matching_loss(graph, log_score.bfloat16(), x, tau, target.bfloat16()).double()
        fused = ck.conditional_matching_loss(graph, log_score.bfloat16(), x, 0.7, target.bfloat16(), reduction="none", backend=backend).double()
        assert (fused - truth).abs().max() <= 2 * (eager - truth).abs().max() + 1e-6, graph


@pytest.mark.parametrize("n", [17, 1000, 50257])
def test_large_vocabulary_loss_and_gradient(backend, n):
    graph = ck.UniformGraph(n)
    gen = torch.Generator().manual_seed(0)
    log_score = torch.randn(2, 3, n, generator=gen, requires_grad=True)
    x = torch.randint(0, n, (2, 3), generator=gen)
    target = torch.softmax(torch.randn(2, 3, n, generator=gen), -1)
    tau = torch.full((2, 3), 0.3, dtype=torch.float64)
    loss = ck.conditional_matching_loss(graph, log_score, x, 0.3, target, backend=backend)
    (grad,) = torch.autograd.grad(loss, log_score)

    def reference_gradient(dtype):
        scores = log_score.detach().to(dtype).requires_grad_(True)
        value = reference.conditional_matching_loss(graph, scores, x, tau, target.to(dtype)).mean()
        return value, torch.autograd.grad(value, scores)[0].double()

    exact_loss, exact_grad = reference_gradient(torch.float64)
    _, eager_grad = reference_gradient(torch.float32)
    assert torch.allclose(loss.double(), exact_loss, rtol=1e-5)
    # random scores make some r_a - beta S nearly cancel, where float32 gradients lose relative accuracy:
    # hold the fused backend to (at most twice) the error of eager float32 PyTorch
    error = (grad.double() - exact_grad).norm() / exact_grad.norm()
    eager_error = (eager_grad - exact_grad).norm() / exact_grad.norm()
    assert error <= 2 * eager_error + 1e-6, (error, eager_error)


# ----------------------------------------------------------------------------- the gradient written in the forward


def _compatible_case(graph, shape, dtype, seed):
    """Scores, tokens, noise levels and a target without mass on a structural zero of
    the student's conditional (absorbing: half the positions on the mask)."""
    n = graph.num_states
    gen = torch.Generator().manual_seed(seed)
    log_score = torch.randn(*shape, n, generator=gen, dtype=torch.float64)
    x = torch.randint(0, n, shape, generator=gen)
    tau = 0.1 + torch.rand(shape, generator=gen, dtype=torch.float64)
    target = torch.softmax(torch.randn(*shape, n, generator=gen, dtype=torch.float64), -1)
    if graph.family == "absorbing":
        x = torch.where(torch.rand(shape, generator=gen) < 0.5, n - 1, torch.randint(0, n - 1, shape, generator=gen))
        target = torch.where(x[..., None] == n - 1, target * (torch.arange(n) < n - 1),
                             torch.nn.functional.one_hot(x, n).double())
        target = target / target.sum(-1, keepdim=True)
    return log_score.to(dtype), x, tau, target.to(dtype)


def _reduced(per_position, reduction):
    return {"mean": per_position.mean(), "sum": per_position.sum(), "none": per_position}[reduction]


def _compiled_only(backend):
    if backend == "reference":
        pytest.skip("the reference backend differentiates through autograd")


def _fused_node(loss):
    """The autograd node of conditional_matching_loss_with_grad under ``loss``."""
    stack, seen = [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if "conditional_matching_loss_with_grad" in node.name():
            return node
        stack += [next_node for next_node, _ in node.next_functions]
    return None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided", "expanded"])
def test_fused_gradient_matches_the_float64_reference(backend, dtype, reduction, layout):
    """Every graph family, odd shapes, views: the gradient the forward writes (scaled by the
    upstream gradient) against autograd of the float64 reference, within twice the error of
    eager PyTorch in the same dtype."""
    from layouts import view_of

    for graph in small_graphs(13):
        log_score, x, tau, target = _compatible_case(graph, (3, 5), dtype, seed=7)
        leaf = log_score.clone().requires_grad_(True)
        scores = view_of(leaf, layout)
        loss = ck.conditional_matching_loss(graph, scores, x, tau, target, reduction=reduction, backend=backend)
        cotangent = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1)) + 0.5
        (grad,) = torch.autograd.grad(loss, leaf, cotangent)
        assert grad.dtype == dtype and grad.shape == leaf.shape

        def reference_gradient(work):
            copy = leaf.detach().to(work).requires_grad_(True)
            value = _reduced(reference.conditional_matching_loss(graph, view_of(copy, layout).contiguous(), x, tau,
                                                                 target.to(work)), reduction)
            return value, torch.autograd.grad(value, copy, cotangent.to(value.dtype))[0].double()

        exact_loss, exact = reference_gradient(torch.float64)
        eager_loss, eager = reference_gradient(dtype)
        loss_error = (loss.double() - exact_loss).abs().max()
        rtol = 1e-5 if dtype == torch.float32 else 1e-3  # a bf16 reduction may round luckily
        assert loss_error <= 2 * (eager_loss.double() - exact_loss).abs().max() + rtol * exact_loss.abs().max(), graph
        error = (grad.double() - exact).norm() / exact.norm()
        eager_error = (eager - exact).norm() / exact.norm()
        # float32: the uniform inversion's cancellations (r - beta S) cost the compiled kernels a few
        # 1e-6 at these shapes, recomputing or not; bf16: the kept gradient is rounded to bf16 once
        # before the upstream scale, so up to one more bf16 rounding than a recomputing backward
        floor = 1e-5 if dtype == torch.float32 else torch.finfo(torch.bfloat16).eps
        assert error <= 2 * eager_error + floor, (graph, error, eager_error)


def test_the_loss_is_the_same_with_and_without_grad(backend):
    for graph in small_graphs(11):
        log_score, x, tau, target = _compatible_case(graph, (4, 3), torch.float32, seed=3)
        plain = ck.conditional_matching_loss(graph, log_score, x, tau, target, reduction="none", backend=backend)
        with_grad = ck.conditional_matching_loss(graph, log_score.requires_grad_(True), x, tau, target,
                                                 reduction="none", backend=backend)
        # one formula per family; the absorbing one sums the log-softmax in another order
        assert torch.allclose(with_grad, plain, rtol=1e-6, atol=1e-7), graph
        if graph.family != "absorbing":
            assert torch.equal(with_grad, plain), graph


def test_structural_zeros_give_inf_with_grad_as_without(backend):
    _compiled_only(backend)
    graph = ck.AbsorbingGraph(6)
    log_score = torch.randn(3, 6)
    x = torch.tensor([5, 5, 2])
    target = torch.softmax(torch.randn(3, 6), -1)  # mass on the mask (rows 0, 1) and off x (row 2)
    target[1, -1] = 0
    target[1] /= target[1].sum()
    plain = ck.conditional_matching_loss(graph, log_score, x, 0.5, target, reduction="none", backend=backend)
    fused = ck.conditional_matching_loss(graph, log_score.requires_grad_(True), x, 0.5, target, reduction="none",
                                         backend=backend)
    assert torch.isinf(plain[[0, 2]]).all() and torch.isfinite(plain[1])
    assert torch.equal(torch.isinf(fused), torch.isinf(plain)) and torch.allclose(fused[1], plain[1])


class _Calls(torch.utils._python_dispatch.TorchDispatchMode):
    """The ops that run inside it, by name."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("family", ["uniform", "absorbing", "dense"])
def test_backward_scales_the_saved_gradient_and_never_reads_the_scores(backend, family):
    """The forward saves one (P, N) gradient and not the scores; the backward runs no kernel
    of cdm_kernels (so it cannot read the scores again): a broadcast multiply, in place."""
    _compiled_only(backend)
    graph = {"uniform": ck.UniformGraph(9), "absorbing": ck.AbsorbingGraph(9), "dense": ck.ordinal_graph(9)}[family]
    log_score, x, tau, target = _compatible_case(graph, (2, 3), torch.float32, seed=5)
    log_score.requires_grad_(True)
    with _Calls() as forward:
        loss = ck.conditional_matching_loss(graph, log_score, x, tau, target, reduction="none", backend=backend)
    assert [name for name in forward.names if name.startswith("cdm_kernels")] == [
        f"cdm_kernels.{'triton_' if backend == 'triton' else ''}conditional_matching_loss_with_grad.default"]
    node = _fused_node(loss)
    (saved,) = node.saved_tensors
    assert saved.shape == (6, 9) and saved.dtype == log_score.dtype
    assert saved.untyped_storage().data_ptr() != log_score.untyped_storage().data_ptr()
    written = saved.clone()
    cotangent = torch.rand(2, 3)
    with _Calls() as backward:
        (grad,) = torch.autograd.grad(loss, log_score, cotangent)
    assert not [name for name in backward.names if name.startswith("cdm_kernels")], backward.names
    assert "aten.mul_.Tensor" in backward.names
    # nor a (P, N) buffer: not even zeros for the gradient output's own (unused) gradient
    assert not [name for name in backward.names if name.split(".")[1] in ("zeros", "empty", "fill_", "mul")]
    assert torch.allclose(grad, written.view(2, 3, 9) * cotangent[..., None], rtol=1e-6, atol=0)
    assert grad.untyped_storage().data_ptr() == saved.untyped_storage().data_ptr()  # no new (P, N) buffer


def test_no_gradient_buffer_without_grad(backend):
    """Inference (no_grad, or scores that do not require grad) runs the loss alone."""
    _compiled_only(backend)
    graph = ck.UniformGraph(9)
    log_score, x, tau, target = _compatible_case(graph, (2, 3), torch.float32, seed=5)
    for requires_grad, grad_mode in ((False, True), (True, False)):
        with torch.set_grad_enabled(grad_mode), _Calls() as calls:
            ck.conditional_matching_loss(graph, log_score.clone().requires_grad_(requires_grad), x, tau, target,
                                         backend=backend)
        kernels = [name for name in calls.names if name.startswith("cdm_kernels")]
        assert kernels == [f"cdm_kernels.{'triton_' if backend == 'triton' else ''}conditional_matching_loss.default"]


def test_double_and_repeated_backward_are_refused(backend):
    _compiled_only(backend)
    graph = ck.UniformGraph(7)
    log_score, x, tau, target = _compatible_case(graph, (3,), torch.float64, seed=2)
    loss = ck.conditional_matching_loss(graph, log_score.requires_grad_(True), x, tau, target, backend=backend)
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(loss, log_score, create_graph=True)
    # the first backward scales the kept gradient in place: a second one says so
    loss = ck.conditional_matching_loss(graph, log_score, x, tau, target, backend=backend)
    torch.autograd.grad(loss, log_score, retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward through the same graph"):
        torch.autograd.grad(loss, log_score)


@pytest.mark.parametrize("n", [9, 300])  # both row layouts of the CPU kernels
def test_value_checks_with_grad(backend, n):
    """The loss-with-gradient kernels check what they read, as the loss alone does."""
    for graph in (ck.UniformGraph(n), ck.AbsorbingGraph(n), ck.ordinal_graph(9)):
        log_score, x, tau, target = _compatible_case(graph, (4,), torch.float32, seed=11)
        poisoned = log_score.clone()
        poisoned[2, 1] = float("nan")
        with pytest.raises(ValueError, match="student_log_score contains NaN or inf"):
            ck.conditional_matching_loss(graph, poisoned.requires_grad_(True), x, tau, target, backend=backend)
        with pytest.raises(ValueError, match="target rows must sum to 1"):
            ck.conditional_matching_loss(graph, log_score.requires_grad_(True), x, tau, 1.5 * target, backend=backend)
