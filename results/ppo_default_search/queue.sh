#!/usr/bin/env bash
# queue.sh FILE: run each line "NAME SEED SETS..." of FILE in turn (lines appended later are picked up)
f=$1; i=1
while true; do
  line=$(sed -n "${i}p" "$f")
  [ -z "$line" ] && { sleep 20; line=$(sed -n "${i}p" "$f"); [ -z "$line" ] && break; }
  [ "$line" = "STOP" ] && break
  eval /work/probe/search/trial.sh $line
  i=$((i+1))
done
