"""The seed study and the extended suite, as lists of cells (the extended list extends the seed list).

Seed study ("Defense Against Adversarial Examples in NN"): three models (clean, FGSM
adversarial training, median squeezing) under no attack, FGSM and DeepFool, with the
study's protocols: white-box on the clean and FGSM-trained models; for median squeezing,
examples crafted on the clean model, median-filtered, fed to the model trained on
median-filtered images (transfer). An extra row feeds the same examples unfiltered.

Extended suite: PGD and fast adversarial training at `at_eps`; white-box PGD at each
`pgd_eps` on every trained model; median squeezing by transfer and adaptively (BPDA);
Xu et al.'s feature-squeezing detector, also under an adaptive PGD; robustness curves.
Its new cells cover the first `ext_n` test images, the curves the first `curve_n`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxadv.attacks import Spec
from jaxadv.configs import TrainConfig
from jaxadv.study.cells import Cell

# The study's table (test accuracy, %); None where it did not measure.
STUDY = {
    ("none", "none"): 88.5, ("none", "fgsm"): 0.1, ("none", "deepfool"): 7.4,
    ("adversarial_training", "none"): 81.5, ("adversarial_training", "fgsm"): 76.9,
    ("adversarial_training", "deepfool"): None,
    ("median_squeezing", "none"): 80.1, ("median_squeezing", "fgsm"): 45.3, ("median_squeezing", "deepfool"): 77.5,
}  # fmt: skip
SEED_ROWS = ("none", "adversarial_training", "median_squeezing")
SEED_COLUMNS = ("none", "fgsm", "deepfool")
TRAINED = ("none", "adversarial_training", "pgd_adversarial_training", "fast_adversarial_training")
NEW_MODELS = ("pgd_adversarial_training", "fast_adversarial_training")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything the cell lists depend on besides the models."""

    eps: float = 0.1  # FGSM of the study (attack and adversarial training), pixels in [0, 1]
    deepfool: tuple = (("max_iter", 50), ("num_candidates", 10), ("overshoot", 0.02))
    at_eps: float = 8 / 255  # PGD / fast adversarial training
    pgd_eps: tuple[float, ...] = (8 / 255, 0.1)
    pgd_steps: int = 20
    at_pgd_steps: int | None = None  # PGD steps of PGD-AT (None: the base config's)
    at_co_guard: float = 0.0
    ext_n: int | None = None
    curve_n: int = 1000
    curve_eps: tuple[float, ...] = tuple(float(e) for e in np.linspace(0.0, 0.1, 8).round(4))
    # AutoAttack (standard) beside PGD-20 for every trained model: (norm, eps) pairs. Early
    # exit keeps AutoAttack's verdicts and skips the iterations spent on fooled points.
    autoattack: tuple = (("linf", 8 / 255), ("l2", 0.5))
    autoattack_settings: tuple = ()  # overrides of AutoAttack's own, e.g. (("n_iter", 10),) for a smoke run


def pgd_name(eps: float) -> str:
    return "pgd_8/255" if abs(eps - 8 / 255) < 1e-9 else f"pgd_{eps:g}"


def pgd_spec(eps: float, steps: int, norm: str = "linf") -> Spec:
    if norm == "linf":  # the 0.1 spec, unchanged: stored runs stay valid
        return Spec("pgd", eps=eps, steps=steps, step_size=2.5 * eps / steps)
    return Spec("pgd", eps=eps, steps=steps, step_size=2.5 * eps / steps, norm=norm)


def budget_name(norm: str, eps: float) -> str:
    e = "8/255" if abs(eps - 8 / 255) < 1e-9 else f"{eps:g}"
    return e if norm == "linf" else f"l2_{e}"


def autoattack_columns(s: "Settings") -> dict:
    """{column: spec} of the AutoAttack cells and the PGD-20 cells they are compared with."""
    cols = {}
    for norm, eps in s.autoattack:
        if norm != "linf" or not any(abs(eps - e) < 1e-12 for e in s.pgd_eps):
            cols[f"pgd_{budget_name(norm, eps)}"] = pgd_spec(eps, s.pgd_steps, norm)
        cols[f"aa_{budget_name(norm, eps)}"] = Spec("autoattack", eps=eps, norm=norm, early_exit=True,
                                                    **dict(s.autoattack_settings))
    return cols


def model_configs(base: TrainConfig, s: Settings, *, extended: bool = False) -> dict[str, TrainConfig]:
    """The suite's training configs from one base preset (they differ in their defense).

    They equal what `jaxadv train --config NAME --defense D --eps EPS` builds, so a model
    trained on its own into OUT/models/<name>/ is picked up as finished.
    """
    cfgs = {"none": base.with_defense("none"), "adversarial_training": base.with_defense("fgsm_at", eps=s.eps),
            "median_squeezing": base.with_defense("median")}  # fmt: skip
    if extended:
        pgd_steps = {} if s.at_pgd_steps is None else {"pgd_steps": s.at_pgd_steps}
        cfgs["pgd_adversarial_training"] = base.with_defense("pgd_at", eps=s.at_eps, co_guard=s.at_co_guard, **pgd_steps)
        cfgs["fast_adversarial_training"] = base.with_defense("fast_at", eps=s.at_eps, co_guard=s.at_co_guard)
    return cfgs


def seed_cells(s: Settings) -> list[Cell]:
    """The study's nine cells and the extra unfiltered row, on all test images."""
    specs = {"none": Spec("none"), "fgsm": Spec("fgsm", eps=s.eps), "deepfool": Spec("deepfool", **dict(s.deepfool))}
    cells = [Cell(row, col, row, specs[col]) for row in ("none", "adversarial_training") for col in SEED_COLUMNS]
    cells += [Cell("median_squeezing", col, "median_squeezing", specs[col], "transfer", source="none")
              for col in SEED_COLUMNS]
    cells += [Cell("median_squeezing_unfiltered", col, "median_squeezing", specs[col], "transfer", source="none",
                   deploy=False, table="seed_extra") for col in SEED_COLUMNS]  # fmt: skip
    return cells


def extended_cells(s: Settings) -> list[Cell]:
    """The seed cells, then the extended suite's (on the first `ext_n` test images)."""
    n = s.ext_n
    pgd = {pgd_name(e): pgd_spec(e, s.pgd_steps) for e in s.pgd_eps}
    study_cols = {"none": Spec("none"), "fgsm": Spec("fgsm", eps=s.eps), "deepfool": Spec("deepfool", **dict(s.deepfool))}
    cells = seed_cells(s)

    def add(row, cols, *, model=None, protocol="white_box", source=None):
        cells.extend(Cell(row, col, model or row, spec, protocol, source=source, n=n, table="extended")
                     for col, spec in cols.items())

    aa = autoattack_columns(s)
    for row in TRAINED:
        add(row, ({**study_cols, **pgd, **aa} if row in NEW_MODELS else {**pgd, **aa}))
    add("median_squeezing", pgd, protocol="transfer", source="none")
    add("median_squeezing_adaptive", {**study_cols, **pgd, **aa}, model="median_squeezing", protocol="adaptive")
    add("detector", {**study_cols, **pgd}, model="none", protocol="detector")
    add("detector_adaptive", pgd, model="none", protocol="detector_adaptive")
    cells += curve_cells(s)
    return cells


def curve_cells(s: Settings) -> list[Cell]:
    """Accuracy against L-inf eps (FGSM and PGD) for every trained model and for median
    squeezing attacked through BPDA; eps 0 is the clean accuracy."""
    cells = []
    targets = [(row, row, "white_box") for row in TRAINED] + [("median_squeezing_adaptive", "median_squeezing",
                                                                 "adaptive")]  # fmt: skip
    for row, model, protocol in targets:
        for kind in ("fgsm", "pgd"):
            for e in s.curve_eps:
                spec = Spec("none") if e == 0 else Spec("fgsm", eps=e) if kind == "fgsm" else pgd_spec(e, s.pgd_steps)
                cells.append(Cell(row, f"{kind}@{e:g}", model, spec, protocol if e else "white_box", n=s.curve_n,
                                  table="curve"))  # fmt: skip
    return cells
