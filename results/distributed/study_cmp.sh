#!/bin/bash
# The seed study on a 1,000-image test subset (1-epoch models on 5,000 training images):
# 1 process x 2 devices, then 2 processes x 1 device (the same global mesh).
cd "$(dirname "$0")/../.." && . .venv/bin/activate
D=../shared/data/cifar10-jpeg.tar.gz
ARGS="--data $D --config fast --epochs 1 --train-subset 5000 --test-subset 1000 --no-progress"
rm -rf runs/distributed/s1x2 runs/distributed/s2
date
JAXADV_HOST_DEVICES=2 /usr/bin/time -f "wall %e s" jaxadv study $ARGS --out runs/distributed/s1x2 2>&1 | grep -v Gloo
date
/usr/bin/time -f "wall %e s" python -m jaxadv.launch -n 2 --devices-per-process 1 -- jaxadv study $ARGS --out runs/distributed/s2 2>&1 | grep -v Gloo
date
