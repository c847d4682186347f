#!/bin/sh
# watchdog.sh: keep one healthy agentwatch running. From cron, every minute:
#
#   * * * * * cd /home/me/agentwatch && ./watchdog.sh
#
# When GET /health does not answer 200 within AGENTWATCH_HEALTH_TIMEOUT seconds
# (a crash, a stale scheduler, a frozen process), it stops the process named in
# the pidfile (TERM, then KILL after AGENTWATCH_STOP_TIMEOUT seconds), starts
# `nohup $AGENTWATCH_CMD` appending its output to the log, and waits until the
# new process answers 200. Every action is a line in the log; a healthy check
# writes nothing.
#
# It never runs twice at once (flock on "$AGENTWATCH_PIDFILE.watchdog"), and it
# never makes a second agentwatch: agentwatch itself refuses to run while another
# holds its database's lock, and the watchdog logs that refusal.
#
# Environment, all optional:
#   AGENTWATCH_HEALTH_URL      http://127.0.0.1:8787/health
#   AGENTWATCH_DB              ./agentwatch.db (the `db` key of the config, relative to
#                              the config's folder): the process is found by the
#                              lock it holds on "$AGENTWATCH_DB.lock", which names it
#   AGENTWATCH_PIDFILE         ./agentwatch.pid (the file `agentwatch run` writes:
#                              its `pidfile` key, beside the db unless absolute); the
#                              watchdog's own lock is "$AGENTWATCH_PIDFILE.watchdog"
#   AGENTWATCH_CONFIG          passed on to the command as --config
#   AGENTWATCH_LOG             ./agentwatch.log
#   AGENTWATCH_CMD             agentwatch run  (split on spaces; use a full path under cron)
#   AGENTWATCH_HEALTH_TIMEOUT  5   seconds for /health to answer
#   AGENTWATCH_STOP_TIMEOUT    15  seconds from TERM to KILL (agentwatch needs up to 10)
#   AGENTWATCH_START_TIMEOUT   60  seconds for a new process to answer 200
#   AGENTWATCH_PYTHON          python3  runs the health probe (so curl is not needed)
#
# Exit status: 0 healthy (already, or after a restart); 1 not healthy.

set -u

health_url=${AGENTWATCH_HEALTH_URL:-http://127.0.0.1:8787/health}
lockfile=${AGENTWATCH_DB:-./agentwatch.db}.lock
pidfile=${AGENTWATCH_PIDFILE:-./agentwatch.pid}
logfile=${AGENTWATCH_LOG:-./agentwatch.log}
cmd=${AGENTWATCH_CMD:-agentwatch run}
health_timeout=${AGENTWATCH_HEALTH_TIMEOUT:-5}
stop_timeout=${AGENTWATCH_STOP_TIMEOUT:-15}
start_timeout=${AGENTWATCH_START_TIMEOUT:-60}
python=${AGENTWATCH_PYTHON:-python3}

log() {
    printf '%s watchdog: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >>"$logfile"
}

now() {
    date +%s
}

# A fifth of a second where sleep takes fractions (GNU, busybox), else a second.
nap() {
    sleep 0.2 2>/dev/null || sleep 1
}

# GET /health: status 0 on a 200; otherwise prints why, in a few words.
probe() {
    "$python" - "$health_url" "$health_timeout" <<'PY'
import json, signal, sys, urllib.error, urllib.request

url, timeout = sys.argv[1], float(sys.argv[2])

def too_slow(*_):
    raise TimeoutError(f"no answer within {timeout:g}s")

signal.signal(signal.SIGALRM, too_slow)
signal.setitimer(signal.ITIMER_REAL, timeout)  # the whole answer, not each read
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    with opener.open(url, timeout=timeout) as answer:
        answer.read()
        if answer.status == 200:
            sys.exit(0)
        print(f"answered {answer.status}")
except urllib.error.HTTPError as e:
    try:
        status = json.loads(e.read()).get("status")
    except Exception:
        status = None
    print(f"answered {e.code}" + (f" ({status})" if status else ""))
except Exception as e:
    print(f"no answer: {getattr(e, 'reason', None) or e}")
sys.exit(1)
PY
}

# True while process $1 runs. A zombie nobody has reaped yet counts as gone.
alive() {
    kill -0 "$1" 2>/dev/null || return 1
    if [ -r "/proc/$1/stat" ]; then
        state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -c1)
        [ "$state" != Z ] || return 1
    fi
    return 0
}

# The pid in the database's lock file, if it holds one.
lock_holder() {
    holder=$(tr -d ' \n' <"$lockfile" 2>/dev/null) || return 1
    case $holder in
        '' | *[!0-9]*) return 1 ;;
    esac
    printf '%s\n' "$holder"
}

# True when process $1 is the agentwatch running on this database: the lock file
# names it, and the lock is held by it. A name in a command line is not enough (a
# recycled pid, another instance, `tail -f .../agentwatch/run.log` all match one).
# Where /proc shows open files, $1 must have the lock file open (agentwatch keeps
# it open exactly while it holds the lock); elsewhere, someone must hold the lock
# (flock -n fails) while the file names $1.
is_agentwatch() {
    [ "$(lock_holder)" = "$1" ] || return 1
    if [ -d "/proc/$1/fd" ]; then
        lock_path="$(cd "$(dirname "$lockfile")" 2>/dev/null && pwd -P)/$(basename "$lockfile")"
        for fd in "/proc/$1/fd/"*; do
            [ "$(readlink "$fd" 2>/dev/null)" = "$lock_path" ] && return 0
        done
        return 1
    fi
    ! flock -n "$lockfile" true 2>/dev/null
}

stop() {
    pid=$1
    log "stopping pid $pid (TERM)"
    kill -TERM "$pid" 2>/dev/null
    # A process frozen with SIGSTOP handles TERM only once it runs again.
    kill -CONT "$pid" 2>/dev/null
    deadline=$(($(now) + stop_timeout))
    while alive "$pid" && [ "$(now)" -lt "$deadline" ]; do
        nap
    done
    if alive "$pid"; then
        log "pid $pid still running after ${stop_timeout}s: KILL"
        kill -KILL "$pid" 2>/dev/null
        deadline=$(($(now) + 5))
        while alive "$pid" && [ "$(now)" -lt "$deadline" ]; do
            nap
        done
    fi
    if alive "$pid"; then
        log "pid $pid survived KILL"
        return 1
    fi
    log "pid $pid is gone"
}

start() {
    # AGENTWATCH_CMD is split into words on purpose (a path, then arguments).
    set -f
    # shellcheck disable=SC2086
    set -- $cmd
    set +f
    if [ -n "${AGENTWATCH_CONFIG:-}" ]; then
        set -- "$@" --config "$AGENTWATCH_CONFIG"
    fi
    # 9>&-: the new process must not inherit the watchdog's lock, or no later
    # cron run could ever take it.
    nohup "$@" >>"$logfile" 2>&1 </dev/null 9>&- &
    child=$!
    log "started pid $child: $*"
    started=$(now)
    deadline=$((started + start_timeout))
    while :; do
        if reason=$(probe); then
            log "pid $child is healthy after $(($(now) - started))s"
            return 0
        fi
        if ! alive "$child"; then
            wait "$child"
            log "pid $child exited with status $? before it was healthy (its output is above)"
            return 1
        fi
        if [ "$(now)" -ge "$deadline" ]; then
            log "pid $child is not healthy after ${start_timeout}s: $reason; leaving it to the next run"
            return 1
        fi
        nap
    done
}

if ! command -v flock >/dev/null 2>&1; then
    log "flock (util-linux) is not installed: doing nothing"
    exit 1
fi
if ! command -v "$python" >/dev/null 2>&1; then
    log "$python is not installed (it runs the health probe): doing nothing"
    exit 1
fi

# One watchdog at a time: a run that finds another still at work leaves it be.
exec 9>>"$pidfile.watchdog"
if ! flock -n 9; then
    log "another watchdog is still at work: leaving it be"
    exit 0
fi

if reason=$(probe); then
    exit 0
fi
log "$health_url $reason"

# The pidfile may be stale, lost, or not the one `run` writes (another path):
# the lock holder is the process to replace whatever the pidfile says.
pid=$(cat "$pidfile" 2>/dev/null)
case $pid in
    '' | *[!0-9]*)
        [ -z "$pid" ] || log "ignoring $pidfile: it does not hold a pid"
        pid=
        ;;
    *)
        if ! alive "$pid"; then
            log "pid $pid (from $pidfile) is not running"
            pid=
        elif ! is_agentwatch "$pid"; then
            log "pid $pid (from $pidfile) is not agentwatch on $lockfile: leaving it alone"
            pid=
        fi
        ;;
esac
if [ -z "$pid" ] && holder=$(lock_holder) && alive "$holder" && is_agentwatch "$holder"; then
    log "pid $holder holds $lockfile"
    pid=$holder
fi
if [ -n "$pid" ]; then
    stop "$pid" || exit 1
fi

start || exit 1
