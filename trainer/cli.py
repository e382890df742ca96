"""``tandem``: the Hydra app whose config root is the packaged recipes (:mod:`tandem.recipes`).

    tandem -cn smoke                                   # a complete recipe
    tandem -cn smoke stage.steps=50 optim.lr=1e-3      # overrides (typos fail, naming the key)
    tandem -cn nano3_pretrain model=tiny --cfg job     # print the composed config and exit
    torchrun --nproc_per_node 2 -m tandem.trainer.cli -cn smoke parallel=ddp_gloo
    tandem generate runs/smoke/sft --prompt "What is 2 + 3?"   # chat with a checkpoint (docs/GENERATION.md)
    tandem plan -cn nano3_pretrain --nodes 2 --gpus-per-node 8 --gpu-mem-gb 80   # memory per rank (docs/PARALLELISM.md)
    tandem export runs/smoke/pretrain --to exported/ --dtype bfloat16   # released layout, one tensor at a time
    tandem serve-env --env math --env code --port 8000   # environments as a NeMo Gym resources server (docs/RL.md)

Exit status: 0 done, 2 bad input (one line on stderr naming the key/file), 75 preempted after a checkpoint
(SIGTERM, SIGUSR1 or a first Ctrl-C finish the step and checkpoint; stderr says the command that resumes).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from tandem.recipes import RECIPES_DIR

from .config import ConfigError, register_configs
from .loop import Preempted
from .run import USER_ERRORS, run, validate

#: exit status of bad input (a config, data or checkpoint the user has to fix)
USAGE_EXIT_CODE = 2


def first_to_say(line: str, env: dict[str, str] | None = None) -> bool:
    """Whether this process is the first of its launch on this machine to print ``line``.

    The ranks of a torchrun (or Slurm) launch usually hit the same bad input and would each print the same
    line; the first to create a marker file named after the launch and the line prints it, the others stay
    quiet. A line only one rank hits (its own checkpoint shard is damaged, say) is still printed by that rank.
    Outside a launcher every line is printed.
    """
    import hashlib
    import tempfile

    env = os.environ if env is None else env
    launch = env.get("TORCHELASTIC_RUN_ID") or (env.get("SLURM_JOB_ID", "") + "." + env.get("SLURM_STEP_ID", ""))
    if launch in ("", ".") or int(env.get("WORLD_SIZE", "1")) <= 1:
        return True
    key = hashlib.sha256(f"{launch}\0{line}".encode()).hexdigest()[:20]
    try:
        os.close(os.open(os.path.join(tempfile.gettempdir(), f"tandem-said-{key}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    except OSError:  # no writable temp dir: better twice than never
        return True
    return True


def fail(message: str) -> None:
    """Print ``tandem: error: <message>`` as one line on stderr (once per launch, not once per rank) and
    exit with status 2."""
    line = f"tandem: error: {' '.join(str(message).split())}"
    if first_to_say(line):
        print(line, file=sys.stderr, flush=True)
    sys.exit(USAGE_EXIT_CODE)


def resume_command(argv: list[str], env: dict[str, str]) -> str:
    """The command line that continues this run from its latest checkpoint: the same one, launched the same
    way (``tandem``, ``python -m``, or torchrun with the same process count), with ``run.resume=auto``."""
    overrides = [a for a in argv if not a.startswith("run.resume=")] + ["run.resume=auto"]
    if "LOCAL_WORLD_SIZE" in env:  # started by torchrun
        nnodes = int(env.get("WORLD_SIZE", "1")) // max(int(env["LOCAL_WORLD_SIZE"]), 1)
        launch = ["torchrun", "--nproc_per_node", env["LOCAL_WORLD_SIZE"]]
        launch += ["--nnodes", str(nnodes)] if nnodes > 1 else []
        launch += ["-m", "tandem.trainer.cli"]
    elif Path(sys.argv[0]).name == "tandem":
        launch = ["tandem"]
    else:
        launch = [Path(sys.executable).name, "-m", "tandem.trainer.cli"]
    return shlex.join(launch + overrides)


#: where Hydra's multirun bookkeeping (``multirun.yaml``, one empty folder per job) goes unless
#: ``hydra.sweep.dir`` is given: beside the runs, never in the source tree
SWEEP_DIR = "runs/multirun/${now:%Y-%m-%d_%H-%M-%S}"


def _own_job_dir(cfg: DictConfig) -> None:
    """In a Hydra multirun, a job whose recipe's ``run.dir`` does not name its overrides (a recipe of your own
    without ``${tandem.overrides:}``) and that was not given ``run.dir`` gets ``<run.dir>-<overrides>``: jobs
    never share a directory (the second would find the first's finished run and train nothing)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from .config import overrides_suffix

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    task = list(HydraConfig.get().overrides.task)
    raw = OmegaConf.to_container(cfg.run, resolve=False)["dir"]
    if "tandem.overrides" in str(raw) or any(o.lstrip("+~").startswith("run.dir=") for o in task):
        return
    cfg.run.dir = str(cfg.run.dir) + overrides_suffix(task)


def _app(cfg: DictConfig) -> None:
    _own_job_dir(cfg)
    try:
        run(cfg)
    except USER_ERRORS as e:
        fail(str(e))
    except Preempted:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"tandem: preempted after a checkpoint; resume with: {resume_command(sys.argv[1:], dict(os.environ))}",
                  file=sys.stderr, flush=True)
        raise


class _Unparsed(Exception):
    pass


class _QuietParser(argparse.ArgumentParser):
    def error(self, message):  # Hydra's parser reports it; this one only declines
        raise _Unparsed(message)


#: Hydra's command-line options (``hydra.main``'s parser)
_HYDRA_OPTIONS = ("--help", "-h", "--hydra-help", "--version", "--resolve", "--run", "-r", "--multirun", "-m",
                  "--shell-completion", "-sc", "--cfg", "-c", "--package", "-p", "--config-path", "-cp",
                  "--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun", "--info", "-i")


def _hydra_args(argv: list[str]) -> argparse.Namespace | None:
    """Hydra's own command line (same options as ``hydra.main``'s parser), or None if it does not parse."""
    p = _QuietParser(add_help=False)
    p.add_argument("overrides", nargs="*")
    for flag in ("--help", "-h"), ("--hydra-help",), ("--version",), ("--resolve",), ("--run", "-r"), \
            ("--multirun", "-m"), ("--shell-completion", "-sc"):
        p.add_argument(*flag, action="store_true")
    for flag in ("--cfg", "-c"), ("--package", "-p"), ("--config-path", "-cp"), ("--config-name", "-cn"), \
            ("--config-dir", "-cd"), ("--experimental-rerun",):
        p.add_argument(*flag)
    p.add_argument("--info", "-i", nargs="?", const="all")
    try:
        return p.parse_intermixed_args(argv)
    except _Unparsed:
        return None


def hydra_argv(argv: list[str]) -> list[str]:
    """``argv`` with Hydra's options first and the overrides after them, as Hydra's parser needs them
    (``tandem stage.steps=4 -cn smoke`` would otherwise stop with a usage screen); an unparsable command
    line is one ``tandem: error:`` line, exit status 2."""
    args = _hydra_args(argv)
    if args is None:
        bad = [a for a in argv if a.startswith("-") and a.split("=")[0] not in _HYDRA_OPTIONS]
        fail(f"cannot parse the command line {shlex.join(argv)!r}"
             + (f": unknown option {bad[0]}" if bad else "") + " (see tandem --help)")
    overrides = list(args.overrides)
    options = argv[:]
    for o in overrides:
        options.remove(o)
    return options + overrides


def _one_line(e: Exception) -> str:
    """Hydra's composition message (several lines, a ``+key`` hint we refuse, OmegaConf's cause) as one line."""
    lines = []
    for line in str(e).splitlines():
        line = line.strip()
        if line.startswith("Config search path"):
            break
        if line and not line.startswith(("To append to your config use", "full_key:", "reference_type=", "object_type=")):
            lines.append(line)
    cause = e.__cause__
    if cause is not None and getattr(cause, "msg", None) and cause.msg not in " ".join(lines):
        lines.append(str(cause.msg).splitlines()[0])
    return " ".join(lines)


def check_composition(argv: list[str]) -> None:
    """Compose the recipe with the command line's overrides as Hydra is about to, and validate the result.

    Hydra itself reports a bad recipe name, an unknown key or a wrong type on several lines and exits 1;
    here they are one line and exit status 2, like every other bad input. A multirun is checked job by job
    (each combination of the sweep's values, up to :data:`MAX_CHECKED_JOBS`) before the first job starts.
    Command lines this check does not model (help, other config paths, rerun) go to Hydra unchecked.
    """
    args = _hydra_args(argv)
    if args is None or args.help or args.hydra_help or args.version or args.shell_completion \
            or args.info or args.config_path or args.config_dir or args.experimental_rerun:
        return
    if args.config_name is None:
        recipes = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
        fail(f"no recipe given: tandem -cn <recipe> [key=value ...], recipes: {', '.join(recipes)}")
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        jobs = _sweep_jobs(list(args.overrides)) if args.multirun else [list(args.overrides)]
        with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base="1.3"):
            for overrides in jobs:
                cfg = compose(config_name=args.config_name, overrides=overrides)
                if args.cfg is None:  # --cfg prints the config as composed, for inspection
                    try:
                        validate(cfg)
                    except ConfigError as e:
                        fail(f"{' '.join(o for o in overrides if not o.startswith('hydra.'))}: {e}" if args.multirun
                             else str(e))
    except (HydraException, OmegaConfBaseException) as e:
        fail(_one_line(e))


#: a multirun with more jobs than this has its first this-many checked before it starts (the rest by each job)
MAX_CHECKED_JOBS = 64


def _sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """The override lists of a multirun's jobs (Hydra's basic sweeper: the cartesian product of every
    ``key=a,b`` / ``range(...)`` sweep), at most :data:`MAX_CHECKED_JOBS` of them."""
    import itertools

    from hydra.core.override_parser.overrides_parser import OverridesParser

    choices = []
    for o in OverridesParser.create().parse_overrides(overrides):
        if o.is_sweep_override():
            key = o.get_key_element()
            choices.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            choices.append([o.input_line])
    return [list(job) for job in itertools.islice(itertools.product(*choices), MAX_CHECKED_JOBS)]


def recipe_summary(path: Path, width: int = 96) -> str:
    """The first sentence of a recipe's header comment (what ``tandem --help`` lists), at most ``width`` chars."""
    words = []
    for line in path.read_text().splitlines():
        if not line.startswith("#") or line.startswith("#   "):
            break
        words += line.lstrip("#").split()
    text = " ".join(words)
    text = text.split(". ", 1)[0]
    text = text.rstrip(".:")
    return text if len(text) <= width else text[: width - 1].rsplit(" ", 1)[0] + "…"


def _groups() -> dict[str, list[str]]:
    """Config groups of the packaged recipes and their options (the schema entries left out)."""
    return {d.name: sorted(p.stem for p in d.glob("*.yaml"))
            for d in sorted(RECIPES_DIR.iterdir()) if d.is_dir() and list(d.glob("*.yaml"))}


def help_text(recipe: str | None = None) -> str:
    """``tandem --help``: subcommands, recipes with one line each, config groups, overrides, completion.
    With ``-cn RECIPE``: that recipe's header and how to see its composed config."""
    if recipe is not None:
        path = RECIPES_DIR / f"{recipe}.yaml"
        if not path.exists():
            fail(f"no recipe {recipe!r}; recipes: {', '.join(sorted(p.stem for p in RECIPES_DIR.glob('*.yaml')))}")
        header = [l[2:] if l.startswith("# ") else l.lstrip("#") for l in path.read_text().splitlines()
                  if l.startswith("#")][:12]
        return "\n".join([f"tandem -cn {recipe} [key=value ...]", "", *header, "",
                          f"Its composed config, every key and value:  tandem -cn {recipe} --cfg job",
                          f"Overrides and run directories: docs/RECIPES.md.  All recipes: tandem --help"]) + "\n"
    recipes = sorted(RECIPES_DIR.glob("*.yaml"))
    w = max(len(p.stem) for p in recipes)
    lines = [
        "tandem: train hybrid Mamba-2 / attention / MoE language models from Hydra recipes.",
        "",
        "usage:",
        "  tandem -cn RECIPE [key=value ...]            train (resumes its run dir; Ctrl-C checkpoints and stops)",
        "  tandem -cn RECIPE --cfg job                  print the composed config and exit",
        "  tandem -m -cn RECIPE key=a,b                 Hydra multirun: one job, and one run dir, per value",
        "  torchrun --nproc_per_node N -m tandem.trainer.cli -cn RECIPE ...   several processes",
        "  tandem generate CKPT [--prompt TEXT]         chat with a checkpoint        (tandem generate --help)",
        "  tandem report RUN_DIR [RUN_DIR ...]          plots of runs: PNG + one HTML page (tandem report --help)",
        "  tandem export RUN --to DIR                   a checkpoint in the released HF layout (tandem export --help)",
        "  tandem plan -cn RECIPE --nodes N ...         memory per GPU of a recipe on a cluster (tandem plan --help)",
        "  tandem serve-env --env NAME [--port P]       RL environments as a NeMo Gym resources server (docs/RL.md)",
        "  tandem-preprocess -i FILES -o PREFIX         JSONL/Parquet/HF datasets -> megatron indexed data",
        "",
        "recipes (-cn NAME; tandem -cn NAME --help shows one):",
        *[f"  {p.stem:<{w}}  {recipe_summary(p)}" for p in recipes],
        "",
        "config groups (GROUP=OPTION, e.g. parallel=ddp precision=bf16):",
        *[f"  {g + ':':<10} {', '.join(opts)}" for g, opts in _groups().items()],
        "",
        "overrides: any key of the schema (trainer/config.py), e.g. stage.steps=500 optim.lr=1e-3 run.dir=runs/mine;",
        "  keys outside it are refused. Each command line gets its own run dir (docs/RECIPES.md).",
        "  logger.verbose=true: every rank's log lines and library warnings.",
        "",
        "shell completion (groups, options, and keys after -cn RECIPE):  eval \"$(tandem -sc install=bash)\"   (or install=zsh, fish)",
        "exit status: 0 done, 2 bad input (one line naming the key or file), 75 preempted after a checkpoint.",
        "docs: README.md and docs/ in the repository.",
    ]
    return "\n".join(lines) + "\n"


#: ``tandem export --dtype`` choices
EXPORT_DTYPES = ("float32", "bfloat16", "float16")


def export_main(argv: list[str]) -> int:
    """``tandem export RUN --to DIR [--dtype bfloat16]``: a run checkpoint (its latest step, or the step dir
    given) as a released-layout directory, streamed one tensor at a time; 0, or 2 on bad input."""

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            print(f"tandem export: error: {message} (see --help)", file=sys.stderr)
            raise SystemExit(USAGE_EXIT_CODE)

    p = Parser(prog="tandem export", description=export_main.__doc__.split(";")[0].split(": ", 1)[1])
    p.add_argument("checkpoint", help="a run dir, its checkpoints/ dir, a step_* dir, or a released-layout dir")
    p.add_argument("--to", required=True, help="output directory (created; other files in it are kept)")
    p.add_argument("--dtype", choices=EXPORT_DTYPES, help="cast floating tensors (the router stays fp32); default: as stored")
    args = p.parse_args(argv)
    from .checkpoint.export import export_checkpoint

    try:
        out = export_checkpoint(args.checkpoint, args.to, dtype=getattr(torch, args.dtype) if args.dtype else None)
    except USER_ERRORS as e:
        print(f"tandem export: error: {' '.join(str(e).split())}", file=sys.stderr)
        return USAGE_EXIT_CODE
    print(f"exported {args.checkpoint} -> {out}")
    return 0


def _completion_recipe() -> str | None:
    """The recipe named on the command line being completed (``COMP_LINE``), so keys complete too."""
    words = os.environ.get("COMP_LINE", "").split()
    for flag in ("-cn", "--config-name"):
        if flag in words[:-1]:
            return words[words.index(flag) + 1]
    return None


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "generate":
        from .inference.cli import chat_main

        sys.exit(chat_main(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "plan":
        from .plan import plan_main

        sys.exit(plan_main(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "export":
        sys.exit(export_main(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "serve-env":
        from .rl.environments.gym_server import serve_main

        sys.exit(serve_main(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "report":
        from .report import report_main

        sys.exit(report_main(sys.argv[2:]))
    register_configs()
    sys.argv[1:] = hydra_argv(sys.argv[1:])
    args = _hydra_args(sys.argv[1:])
    if args.help or (len(sys.argv) > 1 and sys.argv[1] == "help"):
        sys.stdout.write(help_text(args.config_name))
        sys.exit(0)
    modes = [flag for flag, on in (("--run", args.run), ("--multirun", args.multirun), ("--cfg", args.cfg),
                                   ("--info", args.info), ("--shell-completion", args.shell_completion)) if on]
    if len(modes) > 1:
        fail(f"{' and '.join(modes)} cannot be combined; give one of them")
    if args.multirun and not any(o.startswith("hydra.sweep.dir=") for o in args.overrides):
        sys.argv.append(f"hydra.sweep.dir={SWEEP_DIR}")
    check_composition(sys.argv[1:])
    hydra.main(config_path=str(RECIPES_DIR), config_name=_completion_recipe() if args.shell_completion else None,
               version_base="1.3")(_app)()


if __name__ == "__main__":
    main()
