"""Every recipe composes against the schema and builds its model on the meta device."""

from pathlib import Path

import pytest

from tandem.trainer.run import validate
from omegaconf import OmegaConf

from tandem.model import HybridLM
from tandem.recipes import RECIPES_DIR as RECIPES
from tandem.trainer.config import build_hybrid_config

from .conftest import compose_recipe

RECIPE_NAMES = sorted(p.stem for p in RECIPES.glob("*.yaml"))


def test_recipes_exist():
    assert {"smoke", "nano3_pretrain", "nano3_pretrain_phase1", "nano3_pretrain_phase2", "smoke_sft", "sft",
            "finetune_from_release", "grpo", "smoke_grpo", "nano3_rlvr", "rlhf", "nano3_rlhf"} <= set(RECIPE_NAMES)
    for group in ("model", "data", "optim", "parallel", "precision", "logger", "stage"):
        assert list((RECIPES / group).glob("*.yaml")), group


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory):
    """A tiny HF-layout checkpoint for the recipes that read their architecture from model.init_from."""
    from tandem.model import HybridConfig

    path = tmp_path_factory.mktemp("release") / "tiny"
    HybridLM(HybridConfig.preset("tiny"), init_seed=0).save_pretrained(path)
    return path


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_recipe_composes_and_builds_on_meta(name, release_dir):
    cfg = compose_recipe(name)
    overrides = []
    # the user names the checkpoint (smoke_sft's is made by `make smoke`, absent on a fresh clone)
    if cfg.model.preset == "init_from" and not (cfg.model.init_from and Path(cfg.model.init_from).exists()):
        overrides.append(f"model.init_from={release_dir}")
    if cfg.stage.name == "sft" and not cfg.data.chat.train:
        overrides.append("data.chat.train=[/data/sft.jsonl]")
    if cfg.stage.name in ("grpo", "rlhf") and not cfg.data.rl.train:
        overrides.append("data.rl.train=[/data/rl.jsonl]")
    if cfg.stage.name == "rlhf" and not cfg.stage.rlhf.judge:  # the judge, like the checkpoint, is the user's
        overrides.append("stage.rlhf.judge=/ckpt/genrm")
    if overrides:
        cfg = compose_recipe(name, overrides)
    OmegaConf.to_yaml(cfg, resolve=True)  # every interpolation resolves
    model = HybridLM(build_hybrid_config(cfg.model), device="meta")
    assert all(p.is_meta for p in model.parameters())
    if cfg.stage.name not in ("grpo", "rlhf"):  # their batch is P × G rollouts; global_batch is not read
        assert cfg.stage.global_batch % cfg.stage.micro_batch == 0
    if cfg.stage.name == "pretrain":
        assert cfg.data.phase1
    elif cfg.stage.name in ("grpo", "rlhf"):
        validate(cfg)
        assert cfg.data.rl.train and cfg.stage.grpo.prompts_per_step >= 1  # any parallel layout (EP/FSDP2 rollouts run in lockstep)
    elif cfg.stage.name == "cpt":
        validate(cfg)
        assert cfg.stage.cpt.long and cfg.stage.cpt.long_length % cfg.stage.cpt.short_length == 0
    else:
        assert cfg.stage.name == "sft" and cfg.data.chat.train


def test_release_recipes_take_shape_and_tokenizer_from_the_checkpoint(release_dir):
    cfg = compose_recipe("finetune_from_release", [f"model.init_from={release_dir}", "data.chat.train=[x.jsonl]"])
    assert build_hybrid_config(cfg.model).hidden_size == HybridLM.from_pretrained(release_dir).config.hidden_size
    assert cfg.data.chat.tokenizer == str(release_dir)


def test_nano3_recipe_is_the_real_shape_and_schedule():
    cfg = compose_recipe("nano3_pretrain")
    model = HybridLM(build_hybrid_config(cfg.model), device="meta")
    count = model.parameter_count()
    assert 31.4e9 < count.total < 31.8e9
    assert cfg.data.phase2_start == 0.94 and cfg.optim.schedule == "wsd"
    tokens = cfg.stage.steps * cfg.stage.global_batch * cfg.data.seq_len
    assert 24.9e12 < tokens < 25.1e12  # 25T tokens
    p1, p2 = compose_recipe("nano3_pretrain_phase1"), compose_recipe("nano3_pretrain_phase2")
    assert p1.stage.steps + p2.stage.steps == cfg.stage.steps
    assert p2.model.init_from and p2.data.phase2_start == 0.0


def test_every_config_group_option_composes():
    for group_dir in RECIPES.iterdir():
        if not group_dir.is_dir():
            continue
        for option in group_dir.glob("*.yaml"):
            compose_recipe("smoke", [f"{group_dir.name}={option.stem}"])


def test_typo_in_override_names_the_key():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="hiden_size"):
        compose_recipe("smoke", ["model.hiden_size=3"])
    with pytest.raises(ConfigCompositionException, match="stage.steps"):
        compose_recipe("smoke", ["stage.steps=abc"])


def test_cfg_job_prints_the_composed_config():
    from .conftest import run_cli

    res = run_cli("-cn", "nano3_pretrain", "--cfg", "job")
    assert res.returncode == 0, res.stderr
    assert "preset: nano3" in res.stdout and "phase2_start: 0.94" in res.stdout
