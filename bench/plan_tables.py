"""Print the memory tables of docs/PARALLELISM.md and docs/CLUSTER.md from the planner (``tandem plan``).

    python bench/plan_tables.py            # markdown: nano3_pretrain per layout × node count, 80 GB GPUs

Every figure is the planner's (trainer/plan.py): exact parameter counts, engine state, activations measured
on fake tensors at the recipe's real shapes. Not a speed benchmark; it lives here beside the others because
it regenerates documented numbers.
"""

from __future__ import annotations

import sys

from hydra import compose, initialize_config_dir

from tandem.recipes import RECIPES_DIR
from tandem.trainer.config import build_hybrid_config, register_configs
from tandem.trainer.plan import GB, Cluster, Layout, plan

ALL = frozenset({"mamba", "attention", "moe", "mlp"})
LAYOUTS = [
    ("EP 8 + FSDP2, checkpointing all blocks (the recipe)", Layout("fsdp", 8, ALL)),
    ("EP 8 + FSDP2, no checkpointing", Layout("fsdp", 8)),
    ("EP 8 + ZeRO-1, checkpointing all", Layout("zero1", 8, ALL)),
    ("EP 8 + ZeRO-2, checkpointing all", Layout("zero2", 8, ALL)),
    ("EP 8, replicated dense (ddp), checkpointing all", Layout("ddp", 8, ALL)),
]


def main(recipe: str = "nano3_pretrain", nodes=(2, 4, 8)) -> None:
    register_configs()
    with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base="1.3"):
        cfg = compose(config_name=recipe, overrides=["model.preset=nano3"])
    model = build_hybrid_config(cfg.model)
    tokens = cfg.stage.micro_batch * cfg.data.seq_len
    print(f"`{recipe}`: {tokens} tokens per micro-batch, H100 80 GB; peak GB per GPU (weights + gradients + "
          f"AdamW + buffers + activations), ✓ = fits\n")
    print("| layout | " + " | ".join(f"{n} nodes × 8" for n in nodes) + " |")
    print("|---|" + "---|" * len(nodes))
    for name, layout in LAYOUTS:
        cells = []
        for n in nodes:
            c = Cluster(n, 8, 80.0, "cuda")
            p = plan(model, c, layout, tokens=tokens, batch_rows=cfg.stage.micro_batch,
                     accumulating=cfg.stage.global_batch > cfg.stage.micro_batch * c.world)
            cells.append(f"{p.peak / GB:.0f}{' ✓' if p.fits else ''}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    c = Cluster(nodes[0], 8, 80.0, "cuda")
    p = plan(model, c, LAYOUTS[0][1], tokens=tokens, batch_rows=cfg.stage.micro_batch, accumulating=True)
    print(f"\nThe recipe's layout at {nodes[0]} nodes, part by part:\n\n```\n{p.table()}\n```")


if __name__ == "__main__":
    main(*sys.argv[1:2])
