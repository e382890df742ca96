"""Inference cache: incremental decoding equals the full forward, ragged prefill equals each row alone,
Mamba state does not grow with length."""

import pytest
import torch

from tandem.model import HybridCache, HybridConfig, HybridLM

ATOL = 2e-5


def _model(pattern="ME*M-E", **kw):
    # chunk_size 16 (tiny preset): prompt lengths below are not multiples of it and decoding crosses it
    return HybridLM(HybridConfig.preset("tiny", hybrid_override_pattern=pattern, **kw), init_seed=0).eval()


@pytest.mark.parametrize("pattern", ["ME*M-E", "M*-E", "M", "*-"])
@pytest.mark.parametrize("prompt_len", [1, 13, 16])
def test_incremental_decode_equals_full_forward(pattern, prompt_len):
    model = _model(pattern)
    ids = torch.randint(0, 512, (2, prompt_len + 22))  # decode crosses chunk edges at 16 and 32
    with torch.no_grad():
        full = model(ids)
        cache = model.allocate_cache(2, ids.shape[1] + 3)
        steps = [model(ids[:, :prompt_len], cache=cache)]
        for t in range(prompt_len, ids.shape[1]):
            steps.append(model(ids[:, t : t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=ATOL, rtol=1e-5)
    assert cache.lengths.tolist() == [ids.shape[1]] * 2


def test_ragged_prefill_and_decode_equal_each_row_alone():
    model = _model()
    lengths = [5, 17, 1, 11]
    total = max(lengths) + 20
    seqs = [torch.randint(0, 512, (n + 20,)) for n in lengths]
    prompts = torch.zeros(len(lengths), max(lengths), dtype=torch.long)  # right padding (pad id 0)
    for i, n in enumerate(lengths):
        prompts[i, :n] = seqs[i][:n]
    with torch.no_grad():
        cache = model.allocate_cache(len(lengths), total)
        pre = model(prompts, cache=cache, lengths=torch.tensor(lengths))
        steps = [[] for _ in lengths]
        for t in range(20):
            nxt = torch.stack([s[n + t] for s, n in zip(seqs, lengths)])[:, None]
            out = model(nxt, cache=cache)
            for i in range(len(lengths)):
                steps[i].append(out[i, 0])
        assert cache.lengths.tolist() == [n + 20 for n in lengths]
        for i, n in enumerate(lengths):
            alone = model(seqs[i][None])[0]
            torch.testing.assert_close(pre[i, :n], alone[:n], atol=ATOL, rtol=1e-5)
            torch.testing.assert_close(torch.stack(steps[i]), alone[n:], atol=ATOL, rtol=1e-5)


def test_ragged_extend_of_a_nonempty_cache():
    """A multi-token, ragged step on top of a cache whose rows already differ in length (the general path:
    per-row KV positions, conv windows gathered at each row's end, SSM initial states)."""
    model = _model("M*EM")
    first, second = [3, 18], [7, 2]
    seqs = [torch.randint(0, 512, (a + b,)) for a, b in zip(first, second)]

    def padded(parts):
        out = torch.zeros(2, max(len(p) for p in parts), dtype=torch.long)
        for i, p in enumerate(parts):
            out[i, : len(p)] = p
        return out

    with torch.no_grad():
        cache = model.allocate_cache(2, 64)
        model(padded([s[:a] for s, a in zip(seqs, first)]), cache=cache, lengths=first)
        out = model(padded([s[a:] for s, a in zip(seqs, first)]), cache=cache, lengths=second)
        for i, (a, b) in enumerate(zip(first, second)):
            torch.testing.assert_close(out[i, :b], model(seqs[i][None])[0, a:], atol=ATOL, rtol=1e-5)
        # rows of length 0 in a step are left untouched
        before = [t.clone() for t in (cache.ssm[0], cache.conv[0], cache.lengths)]
        model(torch.zeros(2, 3, dtype=torch.long), cache=cache, lengths=[0, 0])
        for x, y in zip(before, (cache.ssm[0], cache.conv[0], cache.lengths)):
            assert torch.equal(x, y)


def test_mamba_cache_does_not_grow_with_length():
    cfg = HybridConfig.preset("tiny")
    short, long = (HybridCache.bytes_for(cfg, batch=3, max_len=n) for n in (128, 8192))
    assert short.mamba == long.mamba > 0 and short.mamba_per_layer == long.mamba_per_layer
    assert long.attention == 64 * short.attention
    cache = HybridCache.allocate(cfg, batch=3, max_len=128)
    assert cache.nbytes() == short
    # per Mamba layer: conv window [3, conv_dim, K-1] + fp32 SSM state [3, heads, head_dim, N]
    assert short.mamba_per_layer == 3 * cfg.mamba_conv_dim * 3 * 4 + 3 * 8 * 16 * 16 * 4
    assert cache.ssm[0].dtype == torch.float32
    half = HybridCache.allocate(cfg, batch=3, max_len=128, dtype=torch.bfloat16)
    assert half.ssm[0].dtype == torch.float32 and half.key[2].dtype == torch.bfloat16


def test_select_rows_then_continue():
    model = _model()
    ids = torch.randint(0, 512, (3, 12))
    with torch.no_grad():
        full = model(ids)
        cache = model.allocate_cache(3, 16)
        model(ids[:, :10], cache=cache)
        cache.select([2, 0])
        out = model(ids[[2, 0], 10:11], cache=cache)
    torch.testing.assert_close(out[:, 0], full[[2, 0], 10], atol=ATOL, rtol=1e-5)


def test_bf16_decode_close_to_fp32():
    model = _model()
    ids = torch.randint(0, 512, (1, 24))
    with torch.no_grad():
        ref = model(ids)
        model = model.to(torch.bfloat16)
        cache = model.allocate_cache(1, 24)
        out = [model(ids[:, :20], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(20, 24)]
    out = torch.cat(out, 1).float()
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_cache_errors():
    model = _model()
    cache = model.allocate_cache(2, 8)
    with torch.no_grad():
        with pytest.raises(ValueError, match="cache is full|HybridCache is full"):
            model(torch.zeros(2, 9, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="seq_idx cannot be combined with a cache"):
            model(torch.zeros(2, 3, dtype=torch.long), seq_idx=torch.zeros(2, 3, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="does not match the cache's batch"):
            model(torch.zeros(3, 3, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="lengths is only meaningful with a cache"):
            model(torch.zeros(2, 3, dtype=torch.long), lengths=[1, 2])


@pytest.mark.skipif(__import__("os").environ.get("TRITON_INTERPRET") != "1",
                    reason="runs the Triton SSD kernels on CPU tensors under TRITON_INTERPRET=1")
def test_ragged_prefill_through_the_triton_scan():
    """The prefill's chunk_scan(initial_states, return_final_states) with dt = 0 pads, on the Triton path."""
    ref = _model("M*")
    tri = HybridLM(HybridConfig.preset("tiny", hybrid_override_pattern="M*", ssd_impl="triton"), init_seed=0).eval()
    ids = torch.randint(0, 512, (2, 23))
    with torch.no_grad():
        cache = tri.allocate_cache(2, 32)
        pre = tri(ids[:, :19], cache=cache, lengths=[19, 12])
        step = tri(torch.stack([ids[0, 19], ids[1, 12]])[:, None], cache=cache)
        for i, n in enumerate((19, 12)):
            alone = ref(torch.cat([ids[i, :n], ids[i, n : n + 1]])[None])[0]
            torch.testing.assert_close(pre[i, :n], alone[:n], atol=ATOL, rtol=1e-5)
            torch.testing.assert_close(step[i, 0], alone[n], atol=ATOL, rtol=1e-5)
