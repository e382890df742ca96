# Shared body of the sbatch recipes (sourced, not run): recipe + overrides → one srun step of
# slurm/launch.py, with preemption → checkpoint → requeue. No training logic here.
#
# Environment it reads (all optional):
#   TANDEM_HOME          repository root (default: the sbatch submission directory)
#   TANDEM_PYTHON        python to run (default: $TANDEM_VENV/bin/python, else $TANDEM_HOME/.venv/bin/python)
#   TANDEM_VENV          virtual environment to activate before running
#   TANDEM_CONTAINER_IMAGE  run the tasks in this container (pyxis/enroot: srun --container-image);
#                        TANDEM_CONTAINER_MOUNTS adds mounts (the repository is always mounted)
#   TANDEM_RUNS_ROOT     where run directories go (default: $TANDEM_HOME/runs); run.dir=... overrides it
#   TANDEM_MAX_RESTARTS  requeue at most this many times (default 20); then stop with a message
#   TANDEM_SRUN_ARGS     extra srun arguments (word-split), e.g. "--cpu-bind=cores"
#   TANDEM_STEP_WAIT     seconds srun waits for the other tasks once one has exited (default 300)

TANDEM_PREEMPTED_EXIT_CODE=75   # trainer.loop.PREEMPTED_EXIT_CODE: checkpoint written, please requeue

tandem_log() { echo "[tandem-sbatch $(date -u +%H:%M:%S)] $*"; }
tandem_die() { echo "[tandem-sbatch] error: $*" >&2; exit 2; }

# tandem_should_requeue STATUS SIGNALLED → 0 (requeue) or 1. A preempted trainer exits 75 after its
# checkpoint. Tasks killed by a signal (status > 128) after the batch script got the preemption notice
# were preempted before the trainer's handler was up (start-up); they resume from the previous checkpoint.
tandem_should_requeue() {
    local status=$1 signalled=$2
    [[ $status -eq $TANDEM_PREEMPTED_EXIT_CODE ]] && return 0
    [[ -n $signalled && $status -gt 128 ]] && return 0
    return 1
}

# The preemption notice (--signal=B:USR1@grace, or TERM from scancel/preemption) reaches this shell only;
# forward USR1 to the training step once: the trainer finishes its step, checkpoints and exits 75.
_tandem_on_signal() {
    local sig=$1
    if [[ -n $TANDEM_SIGNALLED ]]; then
        tandem_log "got SIG$sig again; already forwarded, still waiting for the tasks"
        return
    fi
    TANDEM_SIGNALLED=$sig
    tandem_log "got SIG$sig: asking the training tasks to checkpoint and exit (USR1)"
    # srun forwards USR1 to every task of its step, on every node
    [[ -n $TANDEM_SRUN_PID ]] && kill -USR1 "$TANDEM_SRUN_PID" 2>/dev/null
}

# tandem_run DEFAULT_RECIPE [-cn RECIPE] [key=value ...]
tandem_run() {
    local recipe=$1; shift
    local -a overrides=()
    while [[ $# -gt 0 ]]; do
        case $1 in
            -cn|--config-name|--recipe) [[ $# -ge 2 ]] || tandem_die "$1 needs a recipe name"; recipe=$2; shift 2 ;;
            --config-name=*|--recipe=*) recipe=${1#*=}; shift ;;
            *) overrides+=("$1"); shift ;;
        esac
    done
    [[ -n $SLURM_JOB_ID ]] || tandem_die "SLURM_JOB_ID is not set: submit with sbatch (this script is not meant to be run directly)"

    TANDEM_HOME=${TANDEM_HOME:-$SLURM_SUBMIT_DIR}
    [[ -f $TANDEM_HOME/slurm/launch.py && -d $TANDEM_HOME/recipes ]] ||
        tandem_die "TANDEM_HOME=$TANDEM_HOME is not a tandem checkout: submit from the repository root or set TANDEM_HOME"
    [[ -f $TANDEM_HOME/recipes/$recipe.yaml ]] ||
        tandem_die "no recipe $TANDEM_HOME/recipes/$recipe.yaml (choose one of: $(cd "$TANDEM_HOME/recipes" && ls *.yaml | sed 's/\.yaml$//' | tr '\n' ' '))"
    cd "$TANDEM_HOME" || tandem_die "cannot cd to $TANDEM_HOME"

    local -a srun_args=(--kill-on-bad-exit=0 "--wait=${TANDEM_STEP_WAIT:-300}")
    local python
    if [[ -n $TANDEM_CONTAINER_IMAGE ]]; then
        local mounts="$TANDEM_HOME:$TANDEM_HOME${TANDEM_CONTAINER_MOUNTS:+,$TANDEM_CONTAINER_MOUNTS}"
        srun_args+=("--container-image=$TANDEM_CONTAINER_IMAGE" "--container-mounts=$mounts" "--container-workdir=$TANDEM_HOME")
        python=${TANDEM_PYTHON:-python}
    else
        if [[ -n $TANDEM_VENV ]]; then
            [[ -f $TANDEM_VENV/bin/activate ]] || tandem_die "TANDEM_VENV=$TANDEM_VENV has no bin/activate"
            # shellcheck disable=SC1091
            source "$TANDEM_VENV/bin/activate"
        fi
        python=${TANDEM_PYTHON:-${TANDEM_VENV:+$TANDEM_VENV/bin/python}}
        python=${python:-$TANDEM_HOME/.venv/bin/python}
        [[ -x $python ]] || command -v "$python" >/dev/null ||
            tandem_die "python $python not found: run 'make setup' in $TANDEM_HOME, or set TANDEM_PYTHON / TANDEM_VENV"
    fi
    # shellcheck disable=SC2206
    [[ -n $TANDEM_SRUN_ARGS ]] && srun_args+=($TANDEM_SRUN_ARGS)

    local run_dir="" o
    for o in "${overrides[@]}"; do [[ $o == run.dir=* ]] && run_dir=${o#run.dir=}; done
    if [[ -z $run_dir ]]; then
        # keyed by job id: a requeued job keeps its id, so it finds its checkpoints and resumes
        run_dir=${TANDEM_RUNS_ROOT:-$TANDEM_HOME/runs}/$recipe/$SLURM_JOB_ID
        overrides+=("run.dir=$run_dir")
    fi
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
    export PYTHONUNBUFFERED=1

    local restarts=${SLURM_RESTART_COUNT:-0} max_restarts=${TANDEM_MAX_RESTARTS:-20}
    tandem_log "job $SLURM_JOB_ID ($SLURM_JOB_NAME) SLURM_RESTART_COUNT=$restarts; nodes $SLURM_JOB_NODELIST; tasks ${SLURM_NTASKS:-?}"
    tandem_log "recipe $recipe; run dir $run_dir; python $python"
    tandem_log "overrides: ${overrides[*]}"

    TANDEM_SIGNALLED=""
    trap '_tandem_on_signal USR1' USR1
    trap '_tandem_on_signal TERM' TERM
    # srun in the background: bash runs traps only while it waits, not during a foreground command.
    srun "${srun_args[@]}" "$python" "$TANDEM_HOME/slurm/launch.py" -cn "$recipe" "${overrides[@]}" &
    TANDEM_SRUN_PID=$!
    [[ -n $TANDEM_SIGNALLED ]] && kill -USR1 "$TANDEM_SRUN_PID" 2>/dev/null   # notice came before srun started
    local status s
    while :; do
        wait "$TANDEM_SRUN_PID"
        status=$?
        kill -0 "$TANDEM_SRUN_PID" 2>/dev/null || break   # else a trap interrupted the wait: wait again
    done
    if [[ $status -gt 128 ]]; then   # maybe the status of an interrupted wait: ask bash for srun's own
        wait "$TANDEM_SRUN_PID" 2>/dev/null
        s=$?
        [[ $s -ne 127 ]] && status=$s
    fi
    trap - USR1 TERM

    if [[ $status -eq 0 ]]; then
        tandem_log "training finished (run dir $run_dir)"
        return 0
    fi
    if tandem_should_requeue "$status" "$TANDEM_SIGNALLED"; then
        if [[ $restarts -ge $max_restarts ]]; then
            tandem_log "preempted (exit $status) but not requeued: the job already restarted $restarts times" \
                "(TANDEM_MAX_RESTARTS=$max_restarts). Resubmit with run.dir=$run_dir to resume from its latest checkpoint."
            return "$status"
        fi
        # A preemption or time-limit notice leaves the job RUNNING; scancel leaves it COMPLETING/CANCELLED,
        # and a cancelled job must stay cancelled (scontrol requeue would bring it back).
        local state
        state=$(scontrol show job "$SLURM_JOB_ID" -o 2>/dev/null | grep -o 'JobState=[A-Z_]*' | head -n 1)
        state=${state#JobState=}
        if [[ -n $state && $state != RUNNING ]]; then
            tandem_log "the trainer exited with $status but the job is $state, not RUNNING (cancelled, or being ended" \
                "by Slurm, which requeues it itself under PreemptMode=REQUEUE): not requeued from here." \
                "Resubmit with run.dir=$run_dir to resume from its latest checkpoint."
            return "$status"
        fi
        tandem_log "preempted (exit $status): requeueing job $SLURM_JOB_ID (restart $((restarts + 1)) of at most $max_restarts); it resumes from $run_dir/checkpoints/latest"
        if ! scontrol requeue "$SLURM_JOB_ID"; then
            tandem_log "scontrol requeue failed (was the job cancelled, or submitted without --requeue?)." \
                "Resubmit with run.dir=$run_dir to resume."
            return "$status"
        fi
        return 0
    fi
    tandem_log "training failed with exit status $status (not a preemption): not requeued. Fix the error above;" \
        "resubmitting with run.dir=$run_dir resumes from its latest checkpoint, if any."
    return "$status"
}
