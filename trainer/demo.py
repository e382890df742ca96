"""A model-level smoke run (``make smoke`` until the Hydra trainer lands).

Trains the ``tiny`` preset for a few dozen AdamW steps on packed synthetic documents (each document
walks a fixed random successor table over a small sub-vocabulary from a random start, so the loss can
fall far below the uniform ln(V)), checks that the loss fell, writes the model in the released
NemotronH layout and reloads it.
Exits non-zero if the loss did not fall or the reload changes the logits.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from model import HybridConfig, HybridLM


def make_batch(gen: torch.Generator, successor: torch.Tensor, batch: int, seqlen: int, docs: int = 2):
    """Rows of ``docs`` packed documents; token t+1 = successor[token t]. Returns ids and seq_idx."""
    ids = torch.empty(batch, seqlen, dtype=torch.long)
    seq_idx = torch.empty(batch, seqlen, dtype=torch.long)
    doc_len = seqlen // docs
    for b in range(batch):
        for d in range(docs):
            start, stop = d * doc_len, (seqlen if d == docs - 1 else (d + 1) * doc_len)
            tok = successor[torch.randint(0, len(successor), (1,), generator=gen)].item()
            for t in range(start, stop):
                ids[b, t] = tok
                tok = successor[tok - 3].item()
            seq_idx[b, start:stop] = d
    return ids, seq_idx


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    cfg = HybridConfig.preset("tiny")
    model = HybridLM(cfg, init_seed=args.seed)
    count = model.parameter_count()
    print(f"model: tiny preset, pattern {cfg.hybrid_override_pattern!r}, {count.total:,} parameters "
          f"({count.active:,} active per token)")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    successor = torch.randperm(64, generator=gen) + 3  # token ids 3..66 (0-2 are pad/bos/eos)
    losses = []
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        ids, seq_idx = make_batch(gen, successor, args.batch, args.seqlen)
        logits = model(ids[:, :-1], seq_idx=seq_idx[:, :-1])
        # No loss on the first token of each document: it cannot be predicted from the previous one.
        mask = seq_idx[:, 1:] == seq_idx[:, :-1]
        loss = F.cross_entropy(logits.float()[mask], ids[:, 1:][mask])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step == 1 or step % 10 == 0 or step == args.steps:
            print(f"step {step:4d}  loss {loss.item():.4f}  ({time.perf_counter() - t0:.1f}s)")
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"mean loss first 5 steps {first:.3f} → last 5 steps {last:.3f}")
    if not last < 0.7 * first:
        print("FAILED: the loss did not fall by 30%", file=sys.stderr)
        return 1

    model.eval()
    ids, seq_idx = make_batch(gen, successor, 2, args.seqlen)
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        reloaded = HybridLM.from_pretrained(d)
        with torch.no_grad():
            diff = (model(ids, seq_idx) - reloaded(ids, seq_idx)).abs().max().item()
    print(f"save_pretrained → from_pretrained: max |Δlogits| = {diff:.2e}")
    if diff != 0.0:
        print("FAILED: reloaded model differs", file=sys.stderr)
        return 1
    print("smoke OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
