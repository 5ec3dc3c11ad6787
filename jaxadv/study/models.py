"""The study's trained models by name: trained on first use (resumably), loaded after that."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from jaxadv import checkpoint, defenses, squeeze, train
from jaxadv.configs import TrainConfig
from jaxadv.types import ApplyFn, Squeezer


@dataclasses.dataclass(frozen=True)
class Model:
    """A trained model as the study uses it."""

    name: str
    apply_fn: ApplyFn  # the network alone (eval mode)
    variables: dict
    squeezer: Squeezer | None  # its deploy transform, if the defense has one
    cfg: TrainConfig
    history: list
    checkpoint: str
    step: int
    reused: str | None = None  # a --clean-run or pretrained model directory

    @property
    def deployed(self) -> ApplyFn:
        """The classifier as the defense deploys it."""
        return self.apply_fn if self.squeezer is None else squeeze.squeezed(self.apply_fn, self.squeezer)

    @property
    def train_seconds(self) -> float:
        return float(sum(h["seconds"] for h in self.history))


def finished(ckpt_dir: Path, cfg: TrainConfig | None = None) -> bool:
    """True if `ckpt_dir` holds a training run that has ended (and, given `cfg`, of that config)."""
    if checkpoint.latest_step(ckpt_dir) is None:
        return False
    _, meta = checkpoint.read_meta(ckpt_dir)
    done = meta.get("stopped_early") or len(meta.get("history", [])) >= TrainConfig.from_dict(meta["config"]).epochs
    return bool(done) and (cfg is None or TrainConfig.from_dict(meta["config"]) == cfg)


class ModelStore:
    """`store(name) -> Model`: trains `cfgs[name]` into OUT/models/<name>/ with
    `train.train_and_evaluate` the first time it is needed (resuming an interrupted run),
    then loads it. "none" may instead be a finished `jaxadv train` run (`clean_run`), and
    with `pretrained` every model is PRETRAINED/<name>/ (`jaxadv.pretrained`), never trained."""

    def __init__(self, out: str | Path, cfgs: dict[str, TrainConfig], splits, *, seed: int = 0,
                 progress: bool = True, log: Callable[[str], None] = print, clean_run: str | Path | None = None,
                 environment: dict | None = None, pretrained: str | Path | None = None):  # fmt: skip
        self.out, self.cfgs, self.splits = Path(out), dict(cfgs), splits
        self.pretrained = None if pretrained is None else Path(pretrained)
        self.seed, self.progress, self.log, self.clean_run, self.environment = seed, progress, log, clean_run, environment
        self.models: dict[str, Model] = {}

    def _ckpt_dir(self, name: str) -> Path:
        if self.pretrained is not None:
            return self.pretrained / name / "checkpoints"
        if name == "none" and self.clean_run is not None:
            return Path(self.clean_run) / "checkpoints"
        return self.out / "models" / name / "checkpoints"

    def __call__(self, name: str) -> Model:
        if name in self.models:
            return self.models[name]
        if name not in self.cfgs:
            raise ValueError(f"unknown model {name!r}; the study knows {sorted(self.cfgs)}")
        ckpt = self._ckpt_dir(name)
        reused = None
        if self.pretrained is not None:
            reused = str(ckpt.parent)
            self._check_pretrained(name, ckpt)
        elif name == "none" and self.clean_run is not None:
            reused = str(self.clean_run)
            self._check_clean_run(ckpt)
        elif not finished(ckpt, self.cfgs[name]):
            self.log(f"[train {name}] ...")
            train.train_and_evaluate(self.cfgs[name], self.splits, ckpt.parent, seed=self.seed, resume=True,
                                     progress=self.progress, log=lambda s: self.log(f"[train {name}] {s}"),
                                     environment=self.environment)  # fmt: skip
        apply_fn, variables, cfg, meta = train.load_trained(str(ckpt))
        if reused is None:
            self._check_data(name, meta)
        step = checkpoint.latest_step(ckpt)
        sq = defenses.get(cfg.defense.name).deploy(cfg.defense)
        self.models[name] = Model(name, apply_fn, variables, sq, cfg, meta["history"], str(ckpt), step, reused)
        return self.models[name]

    def _check_data(self, name: str, meta: dict) -> None:
        """A finished model is reused only if it was trained on these splits with this seed."""
        want = {"data": self.splits.source, "seed": self.seed, "n_train": len(self.splits.train)}
        for k, v in want.items():
            if k in meta and meta[k] != v:
                raise ValueError(f"{self.out / 'models' / name} was trained with {k}={meta[k]!r}, not {v!r}; "
                                 "use a new --out, or the same data and seed")

    def _check_pretrained(self, name: str, ckpt: Path) -> None:
        """A pretrained model must exist and carry this row's defense (its checksum is
        verified when it loads). Its data is not checked: weights trained on the JPEG copy
        may be evaluated on official CIFAR-10."""
        if checkpoint.latest_step(ckpt) is None:
            raise ValueError(f"no pretrained model {name!r}: {ckpt.parent} has no checkpoint")
        _, meta = checkpoint.read_meta(ckpt)
        got = TrainConfig.from_dict(meta.get("config", {})).defense.name
        if got != self.cfgs[name].defense.name:
            raise ValueError(f"pretrained model {ckpt.parent} was trained with defense {got!r}, but the study's "
                             f"{name!r} row needs {self.cfgs[name].defense.name!r}")

    def _check_clean_run(self, ckpt: Path) -> None:
        if not finished(ckpt):
            raise ValueError(f"--clean-run {self.clean_run} has not finished training; rerun the study when it has")
        _, meta = checkpoint.read_meta(ckpt)
        if TrainConfig.from_dict(meta["config"]).defense.name != "none":
            raise ValueError(f"--clean-run {self.clean_run} was trained with a defense, not as the clean model")

    def fingerprint(self, name: str) -> dict:
        """What a result computed on this model depends on: its config and final checkpoint."""
        m = self(name)
        last = m.history[-1] if m.history else {}
        return {"config": m.cfg.to_dict(), "step": m.step, "epochs": len(m.history),
                "final_train_loss": last.get("train_loss"), "final_val_loss": last.get("val_loss")}
