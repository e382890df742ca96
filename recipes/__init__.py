"""tandem's Hydra recipes, shipped as package data: ``tandem -cn <name>`` composes ``<name>.yaml`` from here.

Complete recipes sit at the top (smoke, nano3_pretrain*, sft, smoke_sft, finetune_from_release); the
config groups they compose (model/, data/, optim/, parallel/, precision/, stage/, logger/) are folders.
:data:`RECIPES_DIR` is where they are on disk, wherever tandem is installed.
"""

from pathlib import Path

RECIPES_DIR = Path(__file__).resolve().parent
