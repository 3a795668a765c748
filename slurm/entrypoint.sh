#!/usr/bin/env bash
# megadistill entrypoint: start the ranks of one program on a SLURM allocation (or locally).
#
#   entrypoint.sh PROGRAM [ARGS...]
#
# Every rank runs PROGRAM with RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, NODE_RANK, NNODES,
# MASTER_ADDR and MASTER_PORT exported (what torch.distributed / DeepSpeed read).
#
# Launchers (MEGADISTILL_LAUNCHER; default srun inside a SLURM job, local outside):
#   srun       one task per rank over the allocation (needs --ntasks / --ntasks-per-node on the job)
#   deepspeed  the DeepSpeed launcher: its local launch on one node; on several, a hostfile built
#              from the allocation and pdsh/ssh fan-out (MEGADISTILL_DS_LAUNCHER, default pdsh;
#              signals then reach only the batch node's ranks: prefer srun for preemptible jobs)
#   local      MEGADISTILL_NPROC ranks on this machine, no SLURM (`megadistill pipeline run --local`)
#
# Preemption: SIGUSR1 / SIGTERM reaching this script (e.g. `sbatch --signal=B:USR1@300` or
# `scancel --signal=USR1 --batch`) are forwarded to the ranks, SIGINT as SIGTERM. A program that checkpoints and
# exits with MEGADISTILL_REQUEUE_EXIT_CODE (default 143,
# megadistill.engine.signals.EXIT_PREEMPTED) gets its SLURM job requeued; it resumes
# from its checkpoint when the job runs again (SLURM_RESTART_COUNT > 0).
set -uo pipefail

REQUEUE_EXIT_CODE=${MEGADISTILL_REQUEUE_EXIT_CODE:-143}
launcher=${MEGADISTILL_LAUNCHER:-}
if [ -z "$launcher" ]; then
    if [ -n "${SLURM_JOB_ID:-}" ]; then launcher=srun; else launcher=local; fi
fi

log() { echo "[entrypoint $(date +%H:%M:%S)] $*" >&2; }

if [ "$#" -lt 1 ]; then
    echo "usage: entrypoint.sh PROGRAM [ARGS...]" >&2
    exit 2
fi

# ---------------------------------------------------------------- rendezvous from the allocation
if [ "$launcher" = local ]; then
    NNODES=1
    NODE_RANK=0
    NPROC_PER_NODE=${MEGADISTILL_NPROC:-1}
    MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
    MASTER_PORT=${MASTER_PORT:-$((20000 + RANDOM % 40000))}
    hosts=localhost
else
    if [ -z "${SLURM_JOB_ID:-}" ]; then
        echo "entrypoint.sh: launcher '$launcher' needs a SLURM job (no SLURM_JOB_ID)" >&2
        exit 2
    fi
    hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
    MASTER_ADDR=$(head -n 1 <<<"$hosts")
    NNODES=${SLURM_JOB_NUM_NODES:-$(wc -l <<<"$hosts")}
    NODE_RANK=${SLURM_NODEID:-0}
    NTASKS=${SLURM_NTASKS:-$NNODES}
    NPROC_PER_NODE=$((NTASKS / NNODES))
    # One port per job, so array tasks sharing a node do not collide (a MASTER_PORT exported from
    # the submitting shell would be shared by every job: only MEGADISTILL_MASTER_PORT overrides).
    MASTER_PORT=${MEGADISTILL_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 40000))}
fi
export MASTER_ADDR MASTER_PORT NNODES NODE_RANK
WORLD_SIZE=$((NNODES * NPROC_PER_NODE))

hostfile=${MEGADISTILL_HOSTFILE:-${TMPDIR:-/tmp}/megadistill-hostfile-${SLURM_JOB_ID:-local-$$}}
while read -r host; do echo "$host slots=$NPROC_PER_NODE"; done <<<"$hosts" >"$hostfile"
export MEGADISTILL_HOSTFILE=$hostfile
log "launcher=$launcher nodes=$NNODES ranks=$WORLD_SIZE master=$MASTER_ADDR:$MASTER_PORT" \
    "job=${SLURM_JOB_ID:-none} restart=${SLURM_RESTART_COUNT:-0}"

# ---------------------------------------------------------------- start the ranks
pids=()
# Traps first: a signal while the ranks start is forwarded to those already started.
forward() { # SIGNAL [AS]: forward a signal to the ranks (as another one)
    log "got SIG$1; forwarding to the ranks${2:+ as SIG$2}"
    [ "$1" = TERM ] && terminated=1
    local targets=("${pids[@]}")
    if [ "$launcher" = deepspeed ]; then
        # deepspeed runner -> deepspeed.launcher.launch -> ranks: signal the ranks on this node
        # (the launchers die on SIGUSR1; ranks on other nodes are out of reach over pdsh).
        targets=()
        for launch in $(pgrep -P "${pids[0]}"); do targets+=($(pgrep -P "$launch")); done
    fi
    pending=${2:-$1}
    [ "${#targets[@]}" -gt 0 ] && kill -s "${2:-$1}" "${targets[@]}" 2>/dev/null
}
terminated=0
pending=
trap 'forward USR1' USR1
trap 'forward TERM' TERM
# Ranks started in the background ignore SIGINT (POSIX), so Ctrl-C reaches them as SIGTERM:
# checkpoint and stop.
trap 'forward INT TERM' INT
case "$launcher" in
srun)
    # srun no longer inherits --cpus-per-task from the job (Slurm >= 22.05): pass it on.
    srun --ntasks="$WORLD_SIZE" ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} \
        --kill-on-bad-exit=1 --export=ALL bash -c '
        export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS
        export LOCAL_WORLD_SIZE=$((SLURM_NTASKS / SLURM_NNODES)) NODE_RANK=$SLURM_NODEID
        exec "$@"' megadistill-rank "$@" &
    pids+=($!)
    ;;
deepspeed)
    if [ "$NNODES" -eq 1 ]; then
        # One node: DeepSpeed's local launch (a hostfile would make it insist on ssh to itself).
        where=(--hostfile /dev/null --num_nodes 1 --num_gpus "$NPROC_PER_NODE")
    else
        where=(--hostfile "$hostfile" --launcher "${MEGADISTILL_DS_LAUNCHER:-pdsh}")
    fi
    # The job's interpreter runs the launcher: `deepspeed` need not be on PATH.
    "${MEGADISTILL_PYTHON:-python3}" -m deepspeed.launcher.runner "${where[@]}" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
        --no_python --no_local_rank "$@" &
    pids+=($!)
    ;;
local)
    for ((rank = 0; rank < WORLD_SIZE; rank++)); do
        RANK=$rank LOCAL_RANK=$rank WORLD_SIZE=$WORLD_SIZE LOCAL_WORLD_SIZE=$WORLD_SIZE "$@" &
        pids+=($!)
    done
    ;;
*)
    echo "entrypoint.sh: unknown MEGADISTILL_LAUNCHER '$launcher' (srun, deepspeed, local)" >&2
    exit 2
    ;;
esac

# A signal that came while the ranks were starting reaches every rank.
if [ -n "$pending" ] && [ "$launcher" != deepspeed ]; then kill -s "$pending" "${pids[@]}" 2>/dev/null; fi

# ---------------------------------------------------------------- wait; first failure wins
# Every rank's exit status is read exactly once. `wait -n PIDS` answers "no such job" (127, at
# once) for a rank that bash has already reaped and reported, e.g. when ranks die together: such a
# rank is found dead with `kill -0` and its status read with a plain `wait PID` (bash keeps it). A
# round that learns nothing sleeps, so the loop can never spin.
rc=0
running=("${pids[@]}")

tree() { # PID and all its descendants, children first
    local child
    for child in $(pgrep -P "$1" 2>/dev/null); do tree "$child"; done
    echo "$1"
}

ended() { # a rank PID ended with CODE: record it, kill the others on a crash
    local pid=$1 code=$2 left=() p
    if [ -n "$pending" ] && [ "$code" -eq $((128 + $(kill -l "$pending"))) ]; then
        # killed by the preemption signal before it could handle it (still starting up):
        # nothing was lost since its last checkpoint, so the job runs again
        [ "$code" -ne "$REQUEUE_EXIT_CODE" ] &&
            log "a rank ended by SIG$pending before it could checkpoint; counting it as $REQUEUE_EXIT_CODE"
        code=$REQUEUE_EXIT_CODE
    fi
    for p in "${running[@]}"; do [ "$p" != "$pid" ] && left+=("$p"); done
    running=("${left[@]}")
    if [ "$code" -ne 0 ] && [ "$rc" -eq 0 ]; then
        rc=$code
        # A crash kills the other ranks with everything they started (they would wait in a
        # collective until its timeout); a checkpointed exit lets them finish their checkpoint.
        if [ "$code" -ne "$REQUEUE_EXIT_CODE" ] && [ "${#running[@]}" -gt 0 ]; then
            log "a rank exited with $code; killing the others"
            for p in "${running[@]}"; do kill -s KILL $(tree "$p") 2>/dev/null; done
        fi
    fi
}

idle_rounds=0
while [ "${#running[@]}" -gt 0 ]; do
    unset done_pid
    wait -n -p done_pid "${running[@]}" 2>/dev/null
    waited=$?
    if [ -n "${done_pid:-}" ]; then
        ended "$done_pid" "$waited"
        idle_rounds=0
        continue
    fi
    # Interrupted by a forwarded signal (code > 128), or some rank is no longer bash's job.
    progress=0
    for pid in "${running[@]}"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            wait "$pid" 2>/dev/null
            code=$?
            [ "$code" -eq 127 ] && { log "exit status of rank pid $pid is lost; counting it as 1"; code=1; }
            ended "$pid" "$code"
            progress=1
        fi
    done
    if [ "$progress" -eq 0 ] && [ "$waited" -le 128 ]; then
        idle_rounds=$((idle_rounds + 1))
        [ "$idle_rounds" -eq 1 ] && log "wait returned $waited with ${#running[@]} rank(s) alive; polling"
        sleep 1
    fi
done

if [ "$rc" -eq "$REQUEUE_EXIT_CODE" ] && [ -n "${SLURM_JOB_ID:-}" ]; then
    log "ranks checkpointed and exited with $rc: requeueing job $SLURM_JOB_ID"
    # scontrol can report failure although the requeue happened (its TERM to this job can reach
    # scontrol itself, or the RPC times out under load): trust the job's state, not the exit code.
    requeued=0
    err=$(timeout 30 scontrol requeue "$SLURM_JOB_ID" 2>&1) && requeued=1
    if [ "$requeued" -eq 0 ]; then
        state=$(timeout 30 scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | grep -o 'JobState=[A-Z_]*' || true)
        case "$state" in
            *REQUEUE*|*PENDING*|*COMPLETING*) requeued=1 ;;
            *) log "scontrol requeue $SLURM_JOB_ID: ${err:-timed out} ($state)" ;;
        esac
    fi
    if [ "$requeued" -eq 1 ]; then
        # slurm now stops this script (TERM, then KILL) and queues the job again; once TERM came
        # (it also kills our `sleep`, and a step being torn down may refuse new ones), just exit.
        for _ in $(seq 120); do
            [ "$terminated" -eq 1 ] && break
            sleep 1
        done
        if [ "$terminated" -eq 1 ]; then
            log "job $SLURM_JOB_ID requeued; slurm stopped this attempt"
        else
            log "job $SLURM_JOB_ID was requeued but not stopped; exiting with $rc"
        fi
    else
        log "requeue of $SLURM_JOB_ID failed; exiting with $rc"
    fi
fi
log "ranks finished with exit code $rc"
exit "$rc"
