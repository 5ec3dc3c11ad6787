"""Study cells as data, and the one function that evaluates a list of them.

A `Cell` is one number of a results table: a row (a trained model, deployed with or
without its input transform), a column (an attack spec from the registry), a protocol
saying where the adversarial examples come from, and how many test images it covers.

Protocols:
  * "white_box": crafted on the evaluated classifier itself.
  * "transfer": crafted white-box on the `source` model (deployed), then fed to the
    evaluated classifier (the study's protocol for median squeezing).
  * "adaptive": crafted through the evaluated model's input transform with BPDA
    (forward pass of the transform, identity gradient; Athalye et al. 2018).
  * "detector": Xu et al.'s feature-squeezing detector on the model; the cell is the
    fraction of inputs detected or still correctly classified (for "none": clean inputs
    neither flagged nor misclassified). The examples are the white-box ones.
  * "detector_adaptive": PGD on margin + lambda x detector score (through BPDA), then
    the detector.

`evaluate_cells` derives the distinct attack *runs* the cells need (one per model,
protocol and attack), runs each once over the largest prefix of the test split any cell
needs (every prefix of a split is class-balanced), and reduces each cell from the run's
per-example results. So DeepFool runs once per model, transferred examples are crafted
once, and a cell on a smaller subset costs nothing more. Runs are stored batch by batch
under OUT/runs/ with a fingerprint of everything they depend on: an interrupted study
resumes mid-run, and a changed setting recomputes only what it touches.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from jaxadv import attacks, detect, distributed, io, squeeze
from jaxadv.evaluation import BatchStore, attack_eval, to_float
from jaxadv.study.models import ModelStore

PROTOCOLS = ("white_box", "transfer", "adaptive", "detector", "detector_adaptive")
SCHEMA_VERSION = 2


@dataclasses.dataclass(frozen=True)
class Cell:
    """One cell of a results table.

    Attributes:
      row: the row label, stored as "defense" in results.json (e.g. "median_squeezing").
      column: the column label, stored as "attack" (e.g. "fgsm", "pgd_8/255").
      model: the trained model (a name the study's `ModelStore` knows).
      attack: the attack and its hyperparameters (`Spec("none")`: clean inputs).
      protocol: one of `PROTOCOLS`.
      source: the model adversarial examples are crafted on ("transfer" only).
      deploy: evaluate the model with its deploy transform (e.g. the median filter).
      n: test images, the first n of the (class-balanced, shuffled) test split; None: all.
      table: which table the cell belongs to ("seed", "seed_extra", "extended", "curve").
    """

    row: str
    column: str
    model: str
    attack: attacks.Spec = attacks.Spec("none")
    protocol: str = "white_box"
    source: str | None = None
    deploy: bool = True
    n: int | None = None
    table: str = "seed"

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {self.protocol!r}; choose one of {PROTOCOLS}")
        if (self.protocol == "transfer") != (self.source is not None):
            raise ValueError(f"cell {self.row}/{self.column}: a source model goes with the transfer protocol only")


@dataclasses.dataclass(frozen=True)
class Run:
    """One pass of an attack over a prefix of the test split; many cells read one run."""

    model: str
    deploy: bool
    mode: str  # "white_box", "adaptive", "transfer", "detector" or "detector_adaptive"
    attack: attacks.Spec
    source: "Run | None" = None

    @property
    def id(self) -> str:
        spec = json.dumps(io.json_safe(self.attack.to_dict()), sort_keys=True)
        digest = hashlib.sha256(spec.encode()).hexdigest()[:8]
        name = f"{self.model}{'' if self.deploy else '_raw'}__{self.mode}__{self.attack.name}-{digest}"
        return name if self.source is None else f"{name}__from__{self.source.id}"

    def to_dict(self) -> dict:
        return {"model": self.model, "deploy": self.deploy, "mode": self.mode, "attack": self.attack.to_dict(),
                "source": None if self.source is None else self.source.to_dict()}  # fmt: skip


def run_of(cell: Cell) -> Run:
    """The run a cell is reduced from."""
    if cell.protocol == "transfer" and cell.attack.name != "none":
        source = Run(cell.source, True, "white_box", cell.attack)
        return Run(cell.model, cell.deploy, "transfer", cell.attack, source)
    if cell.protocol == "detector":
        return Run(cell.model, cell.deploy, "detector", cell.attack, Run(cell.model, cell.deploy, "white_box",
                                                                         cell.attack))
    if cell.protocol in ("adaptive", "detector_adaptive") and cell.attack.name != "none":
        return Run(cell.model, cell.deploy, cell.protocol, cell.attack)
    return Run(cell.model, cell.deploy, "white_box", cell.attack)


@dataclasses.dataclass
class Context:
    """What evaluating cells needs: the data, the models and where runs are stored."""

    out: Path
    test: Any  # jaxadv.data.Dataset (shuffled, class-balanced in every prefix)
    val: Any  # validation Dataset (for the detector's threshold)
    models: ModelStore
    seed: int = 0
    batch_size: int = 500
    progress: bool = True
    log: Callable[[str], None] = print
    data_source: str = ""
    detector: dict = dataclasses.field(default_factory=lambda: {"val": 2000, "lam": 1.0, "fpr": 0.05})
    results: dict = dataclasses.field(default_factory=dict)  # Run -> per-example arrays
    cells: list = dataclasses.field(default_factory=list)  # the cells evaluated last
    seconds: dict = dataclasses.field(default_factory=dict)  # run id -> seconds


def _plan(cells: list[Cell], n_test: int) -> tuple[list[Run], dict[Run, int], set[Run]]:
    """Runs in dependency order, the prefix size each needs, and which must keep x_adv."""
    size: dict[Run, int] = {}
    keep: set[Run] = set()
    order: list[Run] = []

    def need(run: Run, n: int):
        if run.source is not None:
            need(run.source, n)
            if run.mode in ("transfer", "detector"):
                keep.add(run.source)
        size[run] = max(size.get(run, 0), n)
        if run not in order:
            order.append(run)

    for c in cells:
        need(run_of(c), min(c.n or n_test, n_test))
    for r in order:  # detector_adaptive scores its own examples
        if r.mode == "detector_adaptive":
            keep.add(r)
    return order, size, keep


def _fingerprint(run: Run, n: int, ctx: Context, keep: bool) -> dict:
    models = {m: ctx.models.fingerprint(m) for m in {run.model} | ({run.source.model} if run.source else set())}
    idx = np.ascontiguousarray(ctx.test.index[:n])
    return {"schema": SCHEMA_VERSION, "run": run.to_dict(), "n": n, "seed": ctx.seed, "data": ctx.data_source,
            "test_index_sha": hashlib.sha256(idx.tobytes()).hexdigest()[:16], "models": models, "keep_adv": keep,
            "detector": ctx.detector if "detector" in run.mode else None}  # fmt: skip


def _attack_for(run: Run, model, ctx: Context):
    """(attack, attack_apply) for a crafting run."""
    if run.mode == "detector_adaptive":
        objective = detect.adaptive_objective(model.apply_fn, detect.cifar10_squeezers(), lam=ctx.detector["lam"])
        return functools.partial(attacks.pgd, objective=objective, **run.attack.kwargs), model.apply_fn
    if run.mode == "adaptive":
        if model.squeezer is None:
            raise ValueError(f"adaptive cell on {run.model}: the model has no input transform to attack through")
        return run.attack, squeeze.squeezed(model.apply_fn, squeeze.bpda(model.squeezer))
    return (run.attack if run.attack.name != "none" else None), None


def _stored_run(run: Run, n: int, keep: bool, ctx: Context) -> dict:
    """`_evaluate_run`'s arrays, from OUT/runs/<id>/result.npz when it holds the same
    fingerprint; otherwise computed (resuming from finished batches) and stored."""
    directory = ctx.out / "runs" / run.id
    fingerprint = io.json_safe(_fingerprint(run, n, ctx, keep))
    done = directory / "result.npz"
    if done.exists() and io.read_json(directory / "fingerprint.json") == fingerprint:
        with np.load(done) as z:
            return {k: z[k] for k in z.files}
    t0 = time.perf_counter()
    store = BatchStore(directory, fingerprint)
    out = _evaluate_run(run, n, keep, ctx, store)
    out["seconds"] = np.asarray(time.perf_counter() - t0)  # this invocation's share if it resumed
    io.write_npz(done, **out)
    if distributed.is_primary():  # process 0 owns the files (see jaxadv.distributed)
        for f in directory.glob("batch_*.npz"):  # the result holds them all now
            f.unlink(missing_ok=True)
    return out


def _evaluate_run(run: Run, n: int, keep: bool, ctx: Context, store: BatchStore) -> dict:
    """Per-example results of one run over the first n test images."""
    model = ctx.models(run.model)
    apply_fn = model.deployed if run.deploy else model.apply_fn
    test = ctx.test
    kw = dict(index=test.index[:n], key=jax.random.key(ctx.seed), batch_size=ctx.batch_size, keep_adv=keep,
              progress=ctx.progress, desc=run.id[:60], store=store)  # fmt: skip
    images, labels = test.images[:n], test.labels[:n]
    if run.mode == "detector":
        return _detector_run(run, n, ctx)
    if run.mode == "transfer":
        summary, x_adv = attack_eval(apply_fn, model.variables, images, labels, inputs=ctx.results[run.source]["x_adv"],
                                     **kw)  # fmt: skip
    else:
        attack, attack_apply = _attack_for(run, model, ctx)
        summary, x_adv = attack_eval(apply_fn, model.variables, images, labels, attack=attack,
                                     attack_apply=attack_apply, **kw)  # fmt: skip
    out = {k: np.asarray(v) for k, v in summary["per_example"].items()}
    if x_adv is not None:
        out["x_adv"] = x_adv
    if run.mode == "detector_adaptive":
        out.update(_detector_scores_of(x_adv, out["correct"], model, ctx, n))
    return out


def evaluate_cells(cells: list[Cell], ctx: Context) -> list[dict]:
    """Evaluate every cell (each needed run once, in dependency order); one record per cell.

    Returns:
      records with "defense" (row), "attack" (column), "accuracy_pct", "loss", "n",
      "protocol", "source", "deployed", "table", "attack_spec", plus the statistics of
      minimum-norm attacks ("success_rate_correct_pct", "norm_median", ...) and, for
      detector cells, "detection_rate" etc.
    """
    ctx.cells = list(cells)
    order, size, keep = _plan(cells, len(ctx.test))
    for i, run in enumerate(order):
        ctx.log(f"[{i + 1}/{len(order)}] {run.id} on {size[run]} test images")
        ctx.results[run] = _stored_run(run, size[run], run in keep, ctx)
        ctx.seconds[run.id] = float(ctx.results[run]["seconds"])
    return [reduce_cell(c, ctx) for c in cells]


def reduce_cell(cell: Cell, ctx: Context) -> dict:
    """A cell's record from its run's per-example results over the cell's prefix."""
    from jaxadv.evaluation import _min_norm_stats

    run = run_of(cell)
    r = ctx.results[run]
    n = min(cell.n or len(ctx.test), len(ctx.test))
    labels = np.asarray(ctx.test.labels[:n])
    rec = {"defense": cell.row, "attack": cell.column, "n": n, "protocol": cell.protocol, "source": cell.source,
           "deployed": cell.deploy, "table": cell.table, "attack_spec": cell.attack.to_dict()}  # fmt: skip
    if run.mode in ("detector", "detector_adaptive"):
        return {**rec, **_detector_cell(r, n, ctx.detector["fpr"])}
    rec["accuracy_pct"] = 100.0 * float(np.mean(r["correct"][:n]))
    rec["loss"] = float(np.mean(r["example_loss"][:n]))
    if "norm" in r:
        stats = _min_norm_stats({k: r[k][:n] for k in ("clean_pred", "iterations", "success", "norm")}, labels)
        rec.update({k: v for k, v in stats.items() if k not in ("norms", "norms_correct")})
    return rec


def min_norm_lists(cell: Cell, ctx: Context) -> dict:
    """The per-example norms behind a minimum-norm cell (for histograms and L2 curves)."""
    from jaxadv.evaluation import _min_norm_stats

    r = ctx.results[run_of(cell)]
    n = min(cell.n or len(ctx.test), len(ctx.test))
    stats = _min_norm_stats({k: r[k][:n] for k in ("clean_pred", "iterations", "success", "norm")},
                            np.asarray(ctx.test.labels[:n]))  # fmt: skip
    return {"n": n, **{k: stats[k] for k in ("norms", "norms_correct", "n_correct_unfooled")}}


# ---------------------------------------------------------------------------------------
# The feature-squeezing detector (Xu et al. 2018) as a protocol
# ---------------------------------------------------------------------------------------


def _detector_base(ctx: Context, model, n: int) -> dict:
    """Validation scores (threshold) and clean test scores, computed once per model and n."""
    key = ("detector_base", model.name, n)
    if key not in ctx.results:
        sq = detect.cifar10_squeezers()
        n_val = min(ctx.detector["val"], len(ctx.val))
        val = detect.scores(model.apply_fn, model.variables, ctx.val.images[:n_val], sq, batch_size=ctx.batch_size)
        clean = detect.scores(model.apply_fn, model.variables, ctx.test.images[:n], sq, batch_size=ctx.batch_size)
        ctx.results[key] = {"val": val, "clean": clean, "n_val": n_val,
                            "threshold": detect.threshold_at_fpr(val, ctx.detector["fpr"])}  # fmt: skip
    return ctx.results[key]


def _detector_scores_of(x_adv, correct, model, ctx: Context, n: int) -> dict:
    sq = detect.cifar10_squeezers()
    base = _detector_base(ctx, model, n)
    scores = detect.scores(model.apply_fn, model.variables, x_adv, sq, batch_size=ctx.batch_size)
    return {"adv_scores": scores, "clean_scores": base["clean"], "val_scores": base["val"], "correct": correct}


def _detector_run(run: Run, n: int, ctx: Context) -> dict:
    model = ctx.models(run.model)
    src = ctx.results[run.source]
    if run.attack.name == "none":
        base = _detector_base(ctx, model, n)
        return {"clean_scores": base["clean"], "val_scores": base["val"], "correct": src["correct"][:n],
                "clean": np.asarray(True)}
    return _detector_scores_of(src["x_adv"][:n], src["correct"][:n], model, ctx, n)


def _detector_cell(r: dict, n: int, fpr: float) -> dict:
    threshold = detect.threshold_at_fpr(r["val_scores"], fpr)
    flagged_clean = r["clean_scores"][:n] > threshold
    correct = np.asarray(r["correct"][:n], bool)
    if r.get("clean"):
        return {"accuracy_pct": 100.0 * float(np.mean(~flagged_clean & correct)), "loss": None,
                "fpr_test": float(flagged_clean.mean()), "threshold": threshold}  # fmt: skip
    rep = detect.evaluate(r["val_scores"], r["clean_scores"][:n], r["adv_scores"][:n], correct, fpr=fpr)
    return {"accuracy_pct": 100.0 * rep.detected_or_correct, "loss": None, **rep._asdict()}


def x_float(images: np.ndarray) -> np.ndarray:
    """Test images as float32 in [0, 1] (for plots)."""
    return np.asarray(to_float(np.asarray(images)))
