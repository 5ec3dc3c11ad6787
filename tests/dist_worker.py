"""One process of the multi-process tests (tests/test_distributed.py), or the single-process
reference run of the same thing: `python tests/dist_worker.py MODE OUT_DIR`.

It joins the job that `python -m jaxadv.launch` describes in its environment (a no-op
without one), runs MODE, writes OUT_DIR/result.json through jaxadv.io (so process 0
alone writes it), and prints its own result as one JSON line for the test to compare.
"""

import json
import os
import sys

from jaxadv import distributed

distributed.initialize()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxadv import attacks, checkpoint, data, evaluation, io, train  # noqa: E402
from jaxadv.configs import ModelConfig, OptimConfig, TrainConfig  # noqa: E402
from jaxadv.models import make_apply  # noqa: E402

CFG = TrainConfig(name="tiny", model=ModelConfig(widths=(4, 8, 8), head=(16,), norm="batch"), batch_size=32,
                  epochs=3, optim=OptimConfig(lr=3e-3, weight_decay=0.0), val_size=32, log_every=4, patience=0,
                  augment=True)  # fmt: skip
SPLITS = data.synthetic(256, 48, num_classes=4, val_size=32, seed=7)


def train_mode(out: str) -> dict:
    die_after = int(os.environ.get("DIST_WORKER_DIE_AFTER_EPOCH", "-1"))
    if die_after >= 0 and jax.process_index() == jax.process_count() - 1:
        save = checkpoint.save

        def save_then_die(directory, step, *a, **k):  # killed right after a complete checkpoint
            save(directory, step, *a, **k)
            if step == die_after:
                os._exit(9)

        checkpoint.save = save_then_die
    s = SPLITS
    r = train.fit(CFG, s.train.images, s.train.labels, s.val.images, s.val.labels, key=jax.random.key(0),
                  num_classes=4, progress=False, ckpt_dir=os.path.join(out, "checkpoints"), resume=True)  # fmt: skip
    ev = evaluation.evaluate(make_apply(r.state.model), r.state.variables, s.test.images, s.test.labels, batch_size=24)
    return {"train_loss": [h["train_loss"] for h in r.history], "val_loss": [h["val_loss"] for h in r.history],
            "leaves": [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(r.state.variables)], "eval": ev}


def eval_mode(out: str) -> dict:
    apply_fn, variables, _, _ = train.load_trained(os.path.join(out, "checkpoints"))
    s = SPLITS.test
    res = {}
    for name, spec in (("fgsm", attacks.Spec("fgsm", eps=0.03)), ("deepfool", attacks.Spec("deepfool"))):
        store = evaluation.BatchStore(os.path.join(out, f"store_{name}"), {"attack": name})
        summary, _ = evaluation.attack_eval(apply_fn, variables, s.images, s.labels, attack=spec, index=s.index,
                                            batch_size=20, store=store)  # fmt: skip
        per = summary["per_example"]
        res[name] = {"accuracy_pct": summary["accuracy_pct"], "n": summary["n"], "index": per["index"].tolist(),
                     "correct": per["correct"].tolist()}  # fmt: skip
        if "norm" in per:
            res[name]["norm"] = per["norm"].tolist()
            res[name]["success"] = per["success"].tolist()
    return res


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    result = {"train": train_mode, "eval": eval_mode}[mode](out)
    result.update(process=jax.process_index(), processes=jax.process_count(), devices=jax.device_count())
    io.write_json(os.path.join(out, f"{mode}.json"), result)
    print(json.dumps(result), flush=True)
