"""``tandem``: the Hydra app whose config root is the packaged recipes (:mod:`tandem.recipes`).

    tandem -cn smoke                                   # a complete recipe
    tandem -cn smoke stage.steps=50 optim.lr=1e-3      # overrides (typos fail, naming the key)
    tandem -cn nano3_pretrain model=tiny --cfg job     # print the composed config and exit
    torchrun --nproc_per_node 2 -m tandem.trainer.cli -cn smoke parallel=ddp_gloo
    tandem generate runs/smoke/sft --prompt "What is 2 + 3?"   # chat with a checkpoint (docs/GENERATION.md)

Exit status: 0 done, 2 bad input (message names the key/file), 75 preempted after a checkpoint.
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from tandem.recipes import RECIPES_DIR

from .config import register_configs
from .run import USER_ERRORS, run


def _app(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except USER_ERRORS as e:
        logging.getLogger("tandem").error("%s", e)
        print(f"tandem: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "generate":
        from .inference.cli import chat_main

        sys.exit(chat_main(sys.argv[2:]))
    register_configs()
    hydra.main(config_path=str(RECIPES_DIR), config_name=None, version_base="1.3")(_app)()


if __name__ == "__main__":
    main()
