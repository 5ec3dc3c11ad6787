#!/bin/bash
# 1 epoch of the fast preset on the real archive: 1 process x 1 device, 1 process x 2 devices, 2 processes x 1 device.

cd "$(dirname "$0")/../.." && . .venv/bin/activate
D=../shared/data/cifar10-jpeg.tar.gz
rm -rf runs/distributed/t1 runs/distributed/t1x2 runs/distributed/t2
/usr/bin/time -v jaxadv train --data $D --config fast --epochs 1 --no-progress --out runs/distributed/t1 2>&1 | grep -v Gloo
JAXADV_HOST_DEVICES=2 /usr/bin/time -v jaxadv train --data $D --config fast --epochs 1 --no-progress --out runs/distributed/t1x2 2>&1
/usr/bin/time -v python -m jaxadv.launch -n 2 --devices-per-process 1 -- jaxadv train --data $D --config fast --epochs 1 --no-progress --out runs/distributed/t2 2>&1 | grep -v Gloo
