# tandem — set-up, main job, tests. Every target creates .venv and installs on a fresh machine.
#
#   make setup   create .venv and install tandem (+ pinned deps)
#   make smoke   the main job on one machine (CPU or one GPU)
#   make test    the test suite (CPU; GPU tests run when CUDA is present), without the end-to-end smoke test
#   make test-e2e  `make smoke` run and checked end to end by pytest (tests/test_smoke.py; CI runs both)
#
# TORCH_SPEC picks the torch build installed *before* tandem. The default is the CPU wheel this
# project is developed against; on a GPU machine use e.g.
#   make setup TORCH_SPEC="torch==2.11.0 --index-url https://download.pytorch.org/whl/cu130"
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.tandem-installed
PYTEST_ARGS ?=
# The suite runs on TEST_WORKERS pytest-xdist workers, one test file at a time per worker (module fixtures are
# built once; the local-Slurm tests, one file, share one cluster); TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
# Exact pins tested on the CPU machines; on a GPU machine whose torch needs another triton, pass CONSTRAINTS=
CONSTRAINTS ?= requirements/constraints-cpu.txt

.PHONY: setup smoke test test-e2e clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	# --no-build-isolation: deepspeed builds from source and must see the torch installed above,
	# not pull its own (a multi-GB CUDA build) into an isolated build environment.
	$(PY) -m pip install --quiet setuptools wheel
	$(PY) -m pip install --quiet --no-build-isolation $(if $(CONSTRAINTS),-c $(CONSTRAINTS),) -e ".[dev]"
	touch $(STAMP)

# The main job. Everything lives in $(SMOKE_DIR) (runs/smoke/), started afresh each time: a generated
# corpus → tandem-preprocess → indexed datasets → the tiny model through both pretraining phases (128-token
# windows) → long-context CPT at 512 tokens on generated needle documents mixed with the corpus, whose
# needle accuracy at 512 tokens must rise over the pretraining weights' by CPT_MIN_GAIN → SFT (from the
# pretraining weights: the smoke CPT costs the GRPO gate, docs/LONG_CONTEXT.md) on generated reasoning conversations (ON and OFF) plus half-right answers to "Which is larger, a or b?" →
# a reasoning-mode check and a chat in both modes → GRPO on that question, which must raise the held-out
# reward (64 prompts) by at least 0.15 → GenRM: a judge (verdict-format SFT, right 70% of the time, then GRPO
# with the verifiable GenRM reward) on concise-vs-rambling answers to "Repeat the number: n", whose held-out
# agreement must rise → RLHF of the GRPO policy (first taught to ramble on half its answers) against that
# judge, whose held-out answers must get shorter.
SMOKE_DIR ?= runs/smoke
# The smoke CPT gate: needle accuracy gain at the trained length (512) over the pretraining weights (measured
# 0.00 -> 0.75 over 40 prompts; another data seed 0.00 -> 0.40 over 20: docs/LONG_CONTEXT.md, "The smoke CPT").
CPT_MIN_GAIN ?= 0.2
# The judge's verdict warm-up is right this often (it learns the format and, partly, the preference), GenRM
# GRPO must raise its held-out agreement by GENRM_MIN_GAIN, and RLHF against it must shorten the policy's
# held-out answers by at least -RLHF_MAX_LENGTH_GAIN tokens (docs/RLHF.md, "The smoke GenRM and RLHF").
JUDGE_WARMUP_ACCURACY ?= 0.7
GENRM_MIN_GAIN ?= 0.1
RLHF_MAX_LENGTH_GAIN ?= -4
smoke: setup
	rm -rf $(SMOKE_DIR)
	$(PY) -m tandem.data_pipelines.smoke_data --out $(SMOKE_DIR)/corpus/phase1.jsonl --docs 3000 --seed 0
	$(PY) -m tandem.data_pipelines.smoke_data --out $(SMOKE_DIR)/corpus/phase2.jsonl --docs 1000 --seed 1
	$(VENV)/bin/tandem-preprocess -i $(SMOKE_DIR)/corpus/phase1.jsonl -o $(SMOKE_DIR)/data/phase1 --no-progress
	$(VENV)/bin/tandem-preprocess -i $(SMOKE_DIR)/corpus/phase2.jsonl -o $(SMOKE_DIR)/data/phase2 --no-progress
	TANDEM_SMOKE_DIR=$(SMOKE_DIR) $(VENV)/bin/tandem -cn smoke data=smoke_indexed run.dir=$(SMOKE_DIR)/pretrain
	$(PY) -m tandem.data_pipelines.long_context --out $(SMOKE_DIR)/corpus/long_needle.jsonl --kinds needle --lengths 192,320,448,512 --depths 0,0.2,0.4,0.6,0.8,1 --per-cell 40 --seed 5 --value-digits 1
	$(VENV)/bin/tandem-preprocess -i $(SMOKE_DIR)/corpus/long_needle.jsonl -o $(SMOKE_DIR)/data/long_needle --no-progress
	TANDEM_SMOKE_DIR=$(SMOKE_DIR) $(VENV)/bin/tandem -cn smoke_cpt
	$(PY) -m tandem.trainer.inference.long_eval $(SMOKE_DIR)/cpt --check --task needle --min-gain $(CPT_MIN_GAIN)
	$(PY) -m tandem.data_pipelines.sft_synthetic --out $(SMOKE_DIR)/sft/train.jsonl --samples 2000 --seed 0
	$(PY) -m tandem.data_pipelines.rl_synthetic --kinds max --out $(SMOKE_DIR)/grpo/prompts.jsonl --prompts 2000 --seed 2 --sft-out $(SMOKE_DIR)/sft/warmup_max.jsonl --sft-samples 2000 --sft-accuracy 0.5
	$(PY) -m tandem.data_pipelines.rl_synthetic --kinds max --out $(SMOKE_DIR)/grpo/valid.jsonl --prompts 64 --seed 3
	TANDEM_SMOKE_DIR=$(SMOKE_DIR) $(VENV)/bin/tandem -cn smoke_sft
	$(PY) -m tandem.trainer.inference.chat_eval $(SMOKE_DIR)/sft --prompts 40 --out $(SMOKE_DIR)/sft/chat_eval.json --min-well-formed 0.9
	$(VENV)/bin/tandem generate $(SMOKE_DIR)/sft --prompt "What is 12 + 34?" --greedy --show-reasoning
	$(VENV)/bin/tandem generate $(SMOKE_DIR)/sft --prompt "What is 12 + 34?" --greedy --no-think
	TANDEM_SMOKE_DIR=$(SMOKE_DIR) $(VENV)/bin/tandem -cn smoke_grpo
	$(PY) -m tandem.trainer.rl.reward_curve $(SMOKE_DIR)/grpo --min-gain 0.15 --min-prompts 64
	$(PY) -m tandem.data_pipelines.preferences --synthetic 1000 --seed 0 --kinds copy --styles correct_concise,correct_rambling --same-style 0.3 --instructions compact --out $(SMOKE_DIR)/genrm/prefs.jsonl --judge-out $(SMOKE_DIR)/genrm/judge_train.jsonl --sft-out $(SMOKE_DIR)/genrm/warmup.jsonl --sft-accuracy $(JUDGE_WARMUP_ACCURACY)
	$(PY) -m tandem.data_pipelines.preferences --synthetic 32 --seed 7 --kinds copy --styles correct_concise,correct_rambling --same-style 0.3 --instructions compact --out $(SMOKE_DIR)/genrm/prefs_valid.jsonl --judge-out $(SMOKE_DIR)/genrm/judge_valid.jsonl
	TANDEM_SMOKE_DIR=$(SMOKE_DIR) $(VENV)/bin/tandem -cn smoke_judge
	TANDEM_SMOKE_DIR=$(SMOKE_DIR) $(VENV)/bin/tandem -cn smoke_genrm
	$(PY) -m tandem.trainer.rl.reward_curve $(SMOKE_DIR)/genrm --metric val/genrm/agree --min-gain $(GENRM_MIN_GAIN)
	$(PY) -m tandem.data_pipelines.rl_synthetic --kinds copy --out $(SMOKE_DIR)/rlhf/prompts.jsonl --prompts 2000 --seed 4 --sft-out $(SMOKE_DIR)/rlhf/warmup.jsonl --sft-samples 1000 --sft-accuracy 1.0 --sft-ramble 0.5
	$(PY) -m tandem.data_pipelines.rl_synthetic --kinds copy --out $(SMOKE_DIR)/rlhf/valid.jsonl --prompts 64 --seed 5
	TANDEM_SMOKE_DIR=$(SMOKE_DIR) $(VENV)/bin/tandem -cn smoke_rlhf_warmup
	TANDEM_SMOKE_DIR=$(SMOKE_DIR) $(VENV)/bin/tandem -cn smoke_rlhf
	$(PY) -m tandem.trainer.rl.reward_curve $(SMOKE_DIR)/rlhf --metric val_response_length --max-gain $(RLHF_MAX_LENGTH_GAIN)
	$(VENV)/bin/tandem report $(SMOKE_DIR) --title "make smoke: the whole pipeline"

# The end-to-end test (`make smoke` under pytest, ~6-7 min) is its own target: it needs a core of its own
# (beside the multi-process tests it takes > 3x as long) and has its own 10-minute budget, like make smoke.
test: setup
	$(PY) -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile) $(PYTEST_ARGS) -m "not e2e"

test-e2e: setup
	$(PY) -m pytest -q -m e2e tests/test_smoke.py $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build dist *.egg-info
