"""The gather-based token permutation equals the index / index_add formulation it replaced (values and
gradients), and routing counts equal bincount."""

import torch

from tandem.model.moe import _cpu_grouped_mm, _cpu_grouped_mm_backward, count_per_expert, permute_tokens, unpermute_tokens


def _reference(x, topk_idx, w, num_experts):
    k = topk_idx.shape[1]
    order = torch.argsort(topk_idx.reshape(-1), stable=True)
    xs = x[order // k]
    y_sorted = xs * torch.arange(1, xs.shape[0] + 1, dtype=xs.dtype)[:, None]  # a row-dependent "expert"
    out = torch.zeros(x.shape[0], x.shape[1]).index_add_(0, order // k, (y_sorted * w.reshape(-1)[order][:, None]).float())
    return out, torch.bincount(topk_idx.reshape(-1), minlength=num_experts)


def test_permutation_equals_index_add_reference():
    torch.manual_seed(0)
    n, h, e, k = 13, 5, 6, 3
    x = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    w = torch.rand(n, k, dtype=torch.float64, requires_grad=True)
    topk_idx = torch.stack([torch.randperm(e)[:k] for _ in range(n)])
    ref, ref_counts = _reference(x, topk_idx, w, e)
    xs, order, counts = permute_tokens(x, topk_idx, e)
    out = unpermute_tokens(xs * torch.arange(1, xs.shape[0] + 1, dtype=xs.dtype)[:, None], order, w, n)
    assert torch.equal(counts, ref_counts)
    assert out.dtype == torch.float32  # combined in fp32, as before
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-6)
    probe = torch.randn(n, h)
    for a, b in zip(torch.autograd.grad((out * probe).sum(), [x, w]), torch.autograd.grad((ref * probe).sum(), [x, w])):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-6)


def test_count_per_expert_equals_bincount_with_empty_experts():
    idx = torch.tensor([3, 3, 0, 5, 3])
    assert torch.equal(count_per_expert(idx, 8), torch.bincount(idx, minlength=8))


def test_opaque_cpu_grouped_mm_ops_match_their_fake_kernels_and_autograd():
    """The ops fp32 takes under torch.compile: fake shapes/strides and gradients as the real kernel's
    (torch.library.opcheck), with the weight passed transposed as the experts pass it."""
    torch.manual_seed(0)
    x = torch.randn(10, 8, requires_grad=True)
    w = torch.randn(3, 12, 8).transpose(-2, -1).requires_grad_()
    offs = torch.tensor([3, 3, 10], dtype=torch.int32)
    torch.library.opcheck(_cpu_grouped_mm, (x, w, offs))
    torch.library.opcheck(_cpu_grouped_mm_backward, (x.detach(), w.detach(), offs, torch.randn(10, 12)))
    y = _cpu_grouped_mm(x, w, offs)
    g = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, [x, w], g)
    rows = [slice(0, 3), slice(3, 3), slice(3, 10)]
    for e, r in enumerate(rows):  # per expert by hand
        torch.testing.assert_close(dx[r], g[r] @ w[e].detach().T, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dw[e], x[r].detach().T @ g[r], atol=1e-5, rtol=1e-5)
