# shellcheck shell=bash
# slurm/common.sh: sourced by slurm/*.sbatch; the launch, signal and requeue logic they share.
#
# Each sbatch script sets its own defaults at its top and then calls mkd_train or mkd_eval.
# Every setting below is an environment variable with a default, so a site profile or the
# submitting shell can set it (sbatch exports the submitting environment to the job by default).
#
# Launch modes (MKD_LAUNCHER):
#   srun      (default) one task per GPU; each rank finds its rank/world/master from Slurm's
#             environment (megatron_kd/distributed.py: SLURM_PROCID, SLURM_NTASKS, first host).
#   torchrun  one torchrun per node (srun --ntasks-per-node=1), static rendezvous at the first
#             node, MKD_PROCS_PER_NODE workers each.
#
# Signals: the job asks Slurm for SIGUSR1 to the batch shell before the time limit
# (#SBATCH --signal=B:USR1@<s>). The shell forwards it to every process of the training step
# (scancel --signal=USR1 <job>: all nodes, whichever launcher), repeating every MKD_RESIGNAL_S
# seconds until the step ends (so a rank still starting up cannot miss it). Ranks started here
# ignore SIGUSR1 until the training loop installs its handler (megatron_kd/training/
# preemption.py), and torchrun ignores it for good (it would otherwise die of it). The ranks
# checkpoint after the current step and exit with 75; the shell then runs `scontrol requeue`,
# and the requeued job resumes from the latest complete checkpoint (--resume is always passed).
# SIGTERM (scancel, preemption, time limit without warning) also makes the ranks checkpoint
# within KillWait, but never triggers a requeue from here: a cancelled job stays cancelled.
#
# NCCL / InfiniBand knobs (set in the environment or a site profile; unset ones keep NCCL's own
# defaults, which autodetect IB/RoCE on most clusters):
#   NCCL_SOCKET_IFNAME   interface for NCCL's bootstrap/TCP (e.g. ib0, bond0, ^docker,lo)
#   NCCL_IB_HCA          which HCAs to use (e.g. mlx5_0,mlx5_1,... ; "^mlx5_bond" to exclude)
#   NCCL_IB_GID_INDEX    RoCE: the GID index (often 3)
#   NCCL_IB_TIMEOUT      IB verbs timeout exponent (22 helps on large/noisy fabrics)
#   NCCL_NET_GDR_LEVEL   GPUDirect RDMA distance (PHB / SYS)
#   NCCL_NVLS_ENABLE     NVLink SHARP on H100 NVSwitch systems (1 default; 0 if it misbehaves)
#   NCCL_DEBUG           WARN (set here) / INFO to print the chosen transport per channel
#   TORCH_NCCL_ASYNC_ERROR_HANDLING=1  a hung/failed collective aborts the job instead of hanging
#   CUDA_DEVICE_MAX_CONNECTIONS=1      megatron-core's TP/SP comm-compute overlap relies on it
#   GLOO_SOCKET_IFNAME   same as NCCL_SOCKET_IFNAME, for the gloo groups (CPU / checkpoint barriers)

# ------------------------------------------------------------------ defaults (env overrides)
: "${MKD_LAUNCHER:=srun}"                 # srun | torchrun
: "${MKD_PYTHON:=python}"                 # interpreter that can `import megatron_kd`
: "${MKD_VENV:=}"                         # optional: a venv to activate first
: "${MKD_CONTAINER_IMAGE:=}"              # optional: enroot/pyxis image (srun --container-image)
: "${MKD_CONTAINER_MOUNTS:=}"             # optional: pyxis mounts, e.g. /lustre:/lustre
: "${MKD_SRUN_ARGS:=}"                    # optional: extra srun flags (e.g. --mpi=pmix)
: "${MKD_RESIGNAL_S:=30}"                 # re-send the stop signal every N s until the step ends
: "${MKD_MAX_RESTARTS:=50}"               # stop requeueing after this many restarts
: "${MKD_EXIT_GRACE_S:=60}"               # once one rank has exited, the others' time to follow
: "${MKD_OVERWRITE:=0}"                   # 1: replace the run dir on the job's first start only
: "${MKD_MASTER_ADDR:=}"                  # optional: rendezvous address (default: first host of the job)

: "${NCCL_DEBUG:=WARN}"
: "${TORCH_NCCL_ASYNC_ERROR_HANDLING:=1}"
: "${CUDA_DEVICE_MAX_CONNECTIONS:=1}"
: "${OMP_NUM_THREADS:=${SLURM_CPUS_PER_TASK:-1}}"
export NCCL_DEBUG TORCH_NCCL_ASYNC_ERROR_HANDLING CUDA_DEVICE_MAX_CONNECTIONS OMP_NUM_THREADS

MKD_EXIT_PREEMPTED=75   # megatron_kd/training/preemption.py EXIT_PREEMPTED
MKD_EXIT_BAD_INPUT=2    # megatron-kd's exit status for a bad config / data / run directory
# megatron_kd/training/nonfinite.py EXIT_NONFINITE: the loss or grad norm went NaN/inf (training
# diverged), nothing saved after it. Never requeued: resuming would replay the same steps from
# the same checkpoint. torchrun exits 1 whatever its ranks returned, so the ranks also write
# <run dir>/logs/diverged.txt (nonfinite.py DIVERGED_MARKER); a new one means the same.
MKD_EXIT_NONFINITE=65
MKD_DIVERGED_MARKER=logs/diverged.txt

mkd_log() { echo "[mkd $(date +%H:%M:%S)] $*"; }
mkd_die() { echo "[mkd $(date +%H:%M:%S)] error: $*" >&2; exit "$MKD_EXIT_BAD_INPUT"; }

# ------------------------------------------------------------------ environment
mkd_setup() {
    [ -n "${SLURM_JOB_ID:-}" ] || mkd_die "not inside a Slurm job (SLURM_JOB_ID unset): submit with sbatch"
    mkd_trap_signals
    [ -z "$MKD_VENV" ] || . "$MKD_VENV/bin/activate" || mkd_die "MKD_VENV=$MKD_VENV: cannot activate"
    # A job inherits the submitting shell's environment: a torchrun-style RANK/WORLD_SIZE there
    # would make every rank believe it is torchrun's (distributed.py checks those first).
    unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE GROUP_RANK
    MASTER_ADDR=${MKD_MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
    [ -n "$MASTER_ADDR" ] || mkd_die "cannot expand SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST"
    # Every rank connects to it: a name that does not resolve would surface only as a rendezvous
    # timeout minutes later, on every node.
    getent hosts "$MASTER_ADDR" >/dev/null \
        || mkd_die "MASTER_ADDR=$MASTER_ADDR (first host of SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST) does" \
                   "not resolve on $(hostname) (getent hosts $MASTER_ADDR): fix the site's DNS or /etc/hosts," \
                   "or export MKD_MASTER_ADDR=<an address of that node>"
    # Same rule as distributed.py's: every task derives the same port; jobs sharing a node differ.
    MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
    export MASTER_ADDR MASTER_PORT
    MKD_NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
    MKD_PROCS_PER_NODE=${MKD_PROCS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-8}}
    MKD_RESTART=${SLURM_RESTART_COUNT:-0}
}

# srun prefix shared by both modes: labelled output, the container, and an end to a step whose
# first task has exited: the rest get MKD_EXIT_GRACE_S seconds (a crashed rank's peers would
# otherwise hang in a collective until its timeout). Not --kill-on-bad-exit: it kills the
# others at once, so their own exit status (75 after a signal, 2 on bad input) would be lost.
mkd_srun() {
    local args=(srun --kill-on-bad-exit=0 --wait="$MKD_EXIT_GRACE_S" --label)
    if [ -n "$MKD_CONTAINER_IMAGE" ]; then
        args+=(--container-image="$MKD_CONTAINER_IMAGE" --container-workdir="$PWD")
        [ -z "$MKD_CONTAINER_MOUNTS" ] || args+=(--container-mounts="$MKD_CONTAINER_MOUNTS")
    fi
    # shellcheck disable=SC2206  # deliberate word splitting of a user flag list
    [ -z "$MKD_SRUN_ARGS" ] || args+=($MKD_SRUN_ARGS)
    printf '%s\n' "${args[@]}"
}

# The whole launch command for "python -m megatron_kd.cli <args...>" in the chosen mode, into
# the array MKD_CMD. `trap "" USR1; exec ...` makes the launched processes ignore SIGUSR1 until
# the training loop installs its handler (ignored signals stay ignored across exec). The exec
# also keeps the launcher (slurmstepd, torchrun) the rank's parent: each rank's watchdog ends
# the rank when that parent dies (megatron_kd/watchdog.py).
mkd_build_launch() {
    local srun_prefix
    mapfile -t srun_prefix < <(mkd_srun)
    case "$MKD_LAUNCHER" in
    srun)
        MKD_CMD=("${srun_prefix[@]}" bash -c 'trap "" USR1; echo "[mkd] rank $SLURM_PROCID of $SLURM_NTASKS on node $SLURMD_NODENAME"; exec "$@"' mkd-rank
                 "$MKD_PYTHON" -m megatron_kd.cli "$@")
        MKD_WORLD=${SLURM_NTASKS:-$((MKD_NNODES * MKD_PROCS_PER_NODE))}
        ;;
    torchrun)
        # One task per node holding all the node's CPUs; torchrun's --node-rank comes from
        # SLURM_NODEID, expanded on each node.
        MKD_CMD=("${srun_prefix[@]}" --ntasks="$MKD_NNODES" --ntasks-per-node=1
                 --cpus-per-task=$(( ${SLURM_CPUS_PER_TASK:-1} * MKD_PROCS_PER_NODE ))
                 bash -c 'trap "" USR1; echo "[mkd] torchrun node rank $SLURM_NODEID of $SLURM_NNODES on node $SLURMD_NODENAME"; exec "$1" -m torch.distributed.run --node-rank="$SLURM_NODEID" "${@:2}"'
                 mkd-node "$MKD_PYTHON" --nnodes="$MKD_NNODES" --nproc-per-node="$MKD_PROCS_PER_NODE"
                 --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT"
                 -m megatron_kd.cli "$@")
        MKD_WORLD=$((MKD_NNODES * MKD_PROCS_PER_NODE))
        ;;
    *) mkd_die "MKD_LAUNCHER=$MKD_LAUNCHER: expected srun or torchrun" ;;
    esac
}

# ------------------------------------------------------------------ running a step
# Signals are trapped from the job's first line (mkd_setup): an untrapped SIGUSR1 would kill the
# batch shell. A warning that comes before the training step exists is forwarded once it does.
mkd_trap_signals() {
    MKD_GOT_USR1=0 MKD_GOT_TERM=0 MKD_STEP_PID= MKD_FORWARDER_PID=
    trap 'mkd_on_signal USR1' USR1
    trap 'mkd_on_signal TERM' TERM
}

mkd_on_signal() {
    if [ "$1" = TERM ]; then
        MKD_GOT_TERM=1
        mkd_log "SIGTERM: the job is ending (scancel, preemption or time limit); the ranks" \
                "checkpoint if KillWait allows; no requeue from this script"
        return
    fi
    if [ "$MKD_GOT_USR1" = 0 ]; then
        MKD_GOT_USR1=1
        mkd_log "SIGUSR1 (time limit near): asking every rank to checkpoint after its current step"
    fi
    mkd_start_forwarder
}

# Forward SIGUSR1 to every process of the running step (all nodes), again every MKD_RESIGNAL_S
# seconds until it ends: a rank still starting up ignores it, the next one reaches it.
mkd_start_forwarder() {
    [ -n "$MKD_STEP_PID" ] && [ -z "$MKD_FORWARDER_PID" ] || return 0
    (
        trap 'kill "$sleeper" 2>/dev/null; exit 0' TERM
        while kill -0 "$MKD_STEP_PID" 2>/dev/null; do
            scancel --signal=USR1 "$SLURM_JOB_ID" || mkd_log "scancel --signal=USR1 failed"
            sleep "$MKD_RESIGNAL_S" & sleeper=$!
            wait "$sleeper"
        done
    ) &
    MKD_FORWARDER_PID=$!
}

# Run "$@" (an srun command) in the background and wait for it, staying responsive to signals:
# bash runs a trap only between commands, and `wait` is interruptible while a foreground srun
# is not.
mkd_run_step() {
    "$@" &
    MKD_STEP_PID=$!
    [ "$MKD_GOT_USR1" = 0 ] || mkd_start_forwarder
    local rc
    while :; do
        wait "$MKD_STEP_PID"
        rc=$?
        kill -0 "$MKD_STEP_PID" 2>/dev/null || break   # still running: wait was cut by a trap
    done
    [ -z "$MKD_FORWARDER_PID" ] || kill "$MKD_FORWARDER_PID" 2>/dev/null
    MKD_STEP_PID= MKD_FORWARDER_PID=
    return "$rc"
}

# Link this job's Slurm output file into the run's logs/ (once the run has created it), so each
# run directory lists the jobs that worked on it.
mkd_link_job_log() {
    local run_dir=$1 out
    out=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | tr ' ' '\n' | sed -n 's/^StdOut=//p')
    [ -n "$out" ] && [ -d "$run_dir/logs" ] && ln -sfn "$out" "$run_dir/logs/slurm-$SLURM_JOB_ID.out"
    return 0
}

# ------------------------------------------------------------------ training jobs
# mkd_train [--config FILE] [--overwrite] [section.key=value ...]
# The recipe comes from --config or MKD_CONFIG; the run directory from checkpoint.save=DIR,
# MKD_RUN_DIR, or MKD_RUN_ROOT/MKD_RUN_NAME. Always launched with --resume (a fresh directory
# starts, one with checkpoints continues) and --exit-signal-handler.
mkd_train() {
    mkd_setup
    local config=${MKD_CONFIG:-} run_dir=${MKD_RUN_DIR:-} overwrite=$MKD_OVERWRITE args=()
    while [ $# -gt 0 ]; do
        case "$1" in
        --config) [ $# -ge 2 ] || mkd_die "--config: expected a recipe file after it"
                  config=$2; shift 2 ;;
        --config=*) config=${1#--config=}; shift ;;
        --overwrite) overwrite=1; shift ;;
        --resume|--exit-signal-handler) shift ;;   # always passed
        checkpoint.save=*) run_dir=${1#checkpoint.save=}; shift ;;
        -*) mkd_die "$1: unknown option (expected --config FILE, --overwrite, section.key=value)" ;;
        *) args+=("$1"); shift ;;
        esac
    done
    [ -n "$config" ] || mkd_die "no recipe given: set MKD_CONFIG at the top of the sbatch script or" \
        "in the environment, or pass --config FILE after the script name, e.g." \
        "sbatch slurm/phase2_kd.sbatch --config examples/paper/phase2_kd_10k_to_500k.yaml key=value ..."
    [ -f "$config" ] || mkd_die "--config $config: no such file (relative to the submit directory $PWD)"
    [ -n "$run_dir" ] || run_dir=${MKD_RUN_ROOT:?MKD_RUN_ROOT unset}/${MKD_RUN_NAME:-$SLURM_JOB_NAME}
    case "$run_dir" in /*) ;; *) run_dir=$PWD/$run_dir ;; esac

    # The run directory: writable here and visible from every node (shared storage).
    mkdir -p "$run_dir" 2>/dev/null \
        || mkd_die "run directory $run_dir: cannot create it (set MKD_RUN_ROOT / MKD_RUN_DIR /" \
                   "checkpoint.save to a writable directory on shared storage)"
    local probe="$run_dir/.mkd_write_probe.$SLURM_JOB_ID"
    { : > "$probe"; } 2>/dev/null && rm -f "$probe" \
        || mkd_die "run directory $run_dir: not writable (set MKD_RUN_ROOT / MKD_RUN_DIR /" \
                   "checkpoint.save to a writable directory on shared storage)"
    srun --ntasks="$MKD_NNODES" --ntasks-per-node=1 test -d "$run_dir" \
        || mkd_die "run directory $run_dir: not visible on every node of $SLURM_JOB_NODELIST" \
                   "(node-local path? the run directory must be on shared storage)"

    local flags=(--config "$config" --resume --exit-signal-handler)
    if [ "$overwrite" = 1 ] && [ "$MKD_RESTART" = 0 ]; then
        flags+=(--overwrite)   # first start only: a requeued job must continue, not start over
    fi
    mkd_build_launch train "${flags[@]}" "${args[@]}" "checkpoint.save=$run_dir"
    local latest marker="$run_dir/$MKD_DIVERGED_MARKER" marker_before
    marker_before=$(stat -c %Y.%s "$marker" 2>/dev/null || echo none)
    latest=$(cat "$run_dir/checkpoints/latest_checkpointed_iteration.txt" 2>/dev/null || echo none)
    mkd_log "job $SLURM_JOB_ID (restart $MKD_RESTART) on $SLURM_JOB_NODELIST: $MKD_NNODES node(s)," \
            "world size $MKD_WORLD, launcher $MKD_LAUNCHER, master $MASTER_ADDR:$MASTER_PORT"
    mkd_log "run directory $run_dir (latest checkpoint: $latest)"
    mkd_log "command: ${MKD_CMD[*]}"

    local rc=0
    mkd_run_step "${MKD_CMD[@]}" || rc=$?
    mkd_link_job_log "$run_dir"
    latest=$(cat "$run_dir/checkpoints/latest_checkpointed_iteration.txt" 2>/dev/null || echo none)
    if [ "$rc" = 0 ]; then
        mkd_log "training finished (latest checkpoint: $latest)"
        exit 0
    fi
    # Before the requeue rule: a warning signal may have come too, and a diverged run must stop.
    if [ "$rc" = "$MKD_EXIT_NONFINITE" ] ||
            [ "$(stat -c %Y.%s "$marker" 2>/dev/null || echo none)" != "$marker_before" ]; then
        mkd_log "training diverged: $(cat "$marker" 2>/dev/null || echo "non-finite loss or grad norm (exit $rc)")"
        mkd_log "not requeued (a resume would diverge again): the latest checkpoint $latest holds" \
                "only finite updates; lower train.lr or allow train.skip_nonfinite_steps, then resubmit"
        exit "$MKD_EXIT_NONFINITE"
    fi
    # Requeue after the warning signal (ours to handle), never after SIGTERM (a cancel stays a
    # cancel; Slurm requeues preempted jobs itself under PreemptMode=REQUEUE). torchrun hides the
    # ranks' exit code (it exits 1), hence the second condition.
    if [ "$MKD_GOT_TERM" = 0 ] && { [ "$rc" = "$MKD_EXIT_PREEMPTED" ] ||
            { [ "$MKD_GOT_USR1" = 1 ] && [ "$rc" != "$MKD_EXIT_BAD_INPUT" ]; }; }; then
        if [ "$MKD_RESTART" -ge "$MKD_MAX_RESTARTS" ]; then
            mkd_log "stopped at checkpoint $latest; not requeueing: restart limit MKD_MAX_RESTARTS=$MKD_MAX_RESTARTS"
            exit "$rc"
        fi
        mkd_log "stopped at checkpoint $latest (exit $rc); requeueing job $SLURM_JOB_ID"
        trap '' TERM   # the requeue terminates this script; nothing left to do
        scontrol requeue "$SLURM_JOB_ID" && exit 0
        mkd_log "scontrol requeue failed: resubmit the same command to resume from checkpoint $latest"
        exit "$rc"
    fi
    if [ "$rc" = "$MKD_EXIT_BAD_INPUT" ]; then
        mkd_log "bad input (the error is above); not requeued"
    else
        mkd_log "training failed (exit $rc); not requeued; resubmitting the same command resumes" \
                "from checkpoint $latest"
    fi
    exit "$rc"
}

# ------------------------------------------------------------------ evaluation jobs
# mkd_eval --checkpoint DIR [megatron-kd eval options ...]: passed through unchanged.
mkd_eval() {
    mkd_setup
    local ckpt="" prev=""
    for a in "$@"; do
        case "$a" in --checkpoint=*) ckpt=${a#--checkpoint=} ;; esac
        [ "$prev" = --checkpoint ] && ckpt=$a
        prev=$a
    done
    [ -n "$ckpt" ] || mkd_die "no checkpoint given: pass --checkpoint DIR after the script name, e.g." \
        "sbatch slurm/eval.sbatch --checkpoint runs/phase2_kd --tasks niah --lengths 4096,8192"
    [ -d "$ckpt" ] || mkd_die "--checkpoint $ckpt: no such directory (relative to the submit directory $PWD)"
    mkd_build_launch eval "$@"
    mkd_log "job $SLURM_JOB_ID on $SLURM_JOB_NODELIST: world size $MKD_WORLD, launcher $MKD_LAUNCHER"
    mkd_log "command: ${MKD_CMD[*]}"
    local rc=0
    mkd_run_step "${MKD_CMD[@]}" || rc=$?
    mkd_log "evaluation exited with $rc"
    exit "$rc"
}
