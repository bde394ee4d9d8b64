#!/usr/bin/env bash
# queue.sh FILE: run each line "NAME SEED SETS..." of FILE in turn (lines appended later are picked up); a line
# is claimed atomically (mkdir lock) so two queues can share one file
f=$1
while true; do
  n=$(wc -l < "$f"); picked=""
  for i in $(seq 1 "$n"); do
    if mkdir /work/probe/search2/claims/$i 2>/dev/null; then picked=$i; break; fi
  done
  [ -z "$picked" ] && break
  line=$(sed -n "${picked}p" "$f")
  [ "$line" = "STOP" ] && break
  eval /work/probe/search2/trial.sh $line
done
