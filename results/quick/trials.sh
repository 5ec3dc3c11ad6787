#!/bin/bash
# Paired trials for the quick preset (issue 14), one after another on the idle machine.
# Usage: trials.sh NAME "FLAGS" [NAME "FLAGS" ...]; each writes runs/quick/NAME/ (resumable).
cd "$(dirname "$0")/../.." && . .venv/bin/activate
D=../shared/data/cifar10-jpeg.tar.gz
while [ $# -gt 1 ]; do
  name=$1; flags=$2; shift 2
  echo "== $name: jaxadv train --data $D $flags --out runs/quick/$name ($(date))"
  resume=""; [ -d runs/quick/$name/checkpoints ] && resume="--resume"
  /usr/bin/time -f "$name wall %e s" jaxadv train --data $D $flags --no-progress --out runs/quick/$name $resume 2>&1
done
echo "== done $(date)"
