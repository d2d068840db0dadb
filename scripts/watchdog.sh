#!/usr/bin/env bash
# Watches the test binaries of a `cargo test` run (started by scripts/test.sh): one that has
# run for longer than LIMIT seconds (default 900; the longest takes about 4 minutes) is hung.
# Its threads' stacks and those of the processes it started are printed, then it is killed, so
# that the run fails saying where it hung instead of running into CI's time limit.
set -uo pipefail
deps="$(realpath -m "${1:?usage: watchdog.sh TARGET_DIR [LIMIT]}")/debug/deps/"
limit=${2:-900}

stacks() {
  if command -v gdb >/dev/null; then
    timeout 60 gdb -p "$1" -batch -ex "thread apply all bt 25" 2>/dev/null |
      grep -E '^(Thread|#)' | head -300
  else
    cat "/proc/$1/task"/*/stack 2>/dev/null | head -100
  fi
}

while sleep 20; do
  for proc in /proc/[0-9]*; do
    pid=${proc#/proc/}
    exe=$(readlink "$proc/exe" 2>/dev/null) || continue
    [[ $exe == "$deps"* ]] || continue
    age=$(ps -o etimes= -p "$pid" 2>/dev/null | tr -d ' ') || continue
    [ -n "$age" ] && [ "$age" -gt "$limit" ] || continue
    {
      echo "watchdog: $(basename "$exe") has run ${age}s (limit ${limit}s): hung. Its threads:"
      stacks "$pid"
      for child in $(pgrep -P "$pid"); do
        echo "watchdog: its child $child: $(tr '\0' ' ' <"/proc/$child/cmdline" 2>/dev/null | cut -c1-300)"
        stacks "$child"
      done
      echo "watchdog: killing $(basename "$exe") (pid $pid) and its children"
    } >&2
    pkill -KILL -P "$pid"
    kill -KILL "$pid"
  done
done
