"""The seed study, as run for the README (see README "Seed study" for results and timings).

    python experiments/seed_study.py --data ../shared/data/cifar10-jpeg.tar.gz --out runs/study

is `jaxadv study --config fast ...` with the budgets used for the README table: the clean
model is the full `fast` run (18 epochs, reused through --clean-run when given), the
FGSM-trained and median-squeezed models get 8 epochs of the same preset. Any flag of
`jaxadv study` may be added; the command is resumable.
"""

import sys

from jaxadv import cli

if __name__ == "__main__":
    args = sys.argv[1:]
    defaults = {"--config": "fast", "--epochs": "8", "--eps": "0.1"}
    for flag, value in defaults.items():
        if not any(a == flag or a.startswith(flag + "=") for a in args):
            args += [flag, value]
    sys.exit(cli.main(["study", *args]))
