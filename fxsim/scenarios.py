"""The paper's three attack scenarios and the full transfer matrix.

A baseline B (the float model) and compressed models C_i. For each attack, adversarial images
are made once per source model and evaluated on targets:

    FULL->FULL   from B, on B        (how strong the attack is on the baseline)
    COMP->COMP   from C_i, on C_i    (scenario 1: the attacker holds the compressed model)
    FULL->COMP   from B, on C_i      (scenario 2: the attacker holds the baseline)
    COMP->FULL   from C_i, on B      (scenario 3: a compressed model leaks an attack on B)
    CROSS        from C_i, on C_j    (beyond the paper: completes the transfer matrix)

Metrics per (attack, scenario, source, target) row: ``accuracy`` of the target on the
adversarial images against the true labels; ``success_rate``: of the images the target
classifies correctly when clean, the fraction it gets wrong after the attack; ``mean_abs``
(mean |perturbation| per pixel) and ``mean_l2`` of the adversarial set (properties of the
source); ``gradient_masked``: images for which the source's gradient was zero or not finite.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fxsim.errors import FxsimError

SCENARIOS = ("FULL->FULL", "COMP->COMP", "FULL->COMP", "COMP->FULL", "CROSS")
ROW_COLUMNS = ("attack", "scenario", "source", "target", "accuracy", "success_rate",
               "mean_abs", "mean_l2", "gradient_masked", "images")
MODEL_COLUMNS = ("name", "kind", "density", "bits", "clean_accuracy", "file")


def plan(baseline: str, compressed: list[str], matrix: bool = False) -> list[tuple]:
    """(source, target, scenario) for every evaluation the scenarios need, baseline first."""
    if baseline in compressed or len(set(compressed)) != len(compressed):
        raise FxsimError("every model needs its own name (the baseline and each compressed one)")
    pairs = [(baseline, baseline, "FULL->FULL")]
    for name in compressed:
        pairs += [(name, name, "COMP->COMP"), (baseline, name, "FULL->COMP"),
                  (name, baseline, "COMP->FULL")]
    if matrix:
        pairs += [(s, t, "CROSS") for s in compressed for t in compressed if s != t]
    return pairs


@dataclass
class AdversarialSet:
    """The adversarial images one attack made on one source model, with what they cost:
    adversarial (N, C, H, W); mean_abs: mean |perturbation| per pixel over the set; mean_l2;
    gradient_masked: how many images met a zero or non-finite gradient."""

    attack: str
    source: str
    adversarial: np.ndarray
    mean_abs: float
    mean_l2: float
    gradient_masked: int

    @classmethod
    def from_result(cls, attack: str, source: str, result) -> AdversarialSet:
        return cls(attack, source, result.adversarial, float(result.mean_abs.mean()),
                   float(result.l2.mean()), int(result.gradient_masked.sum()))


def evaluate(target, adversarial: AdversarialSet, labels, clean_predictions) -> dict:
    """Accuracy and success rate of ``adversarial`` on the ``target`` model."""
    after = target.predict(adversarial.adversarial)
    correct = clean_predictions == labels
    fooled = after[correct] != labels[correct]
    return {"accuracy": float((after == labels).mean()),
            "success_rate": float(fooled.mean()) if correct.any() else float("nan"),
            "mean_abs": adversarial.mean_abs, "mean_l2": adversarial.mean_l2,
            "gradient_masked": adversarial.gradient_masked, "images": len(labels)}


def describe(name: str, model, info: dict, path=None, baseline: bool = False) -> dict:
    """One row of the models table: kind (baseline, float, pruned, quantized,
    pruned+quantized), overall weight density of the conv/linear layers, word width (0 for
    float) and where it came from. clean_accuracy is filled in by the evaluation."""
    from fxsim.compress import prunable_layers

    masks, quant = info.get("masks") or {}, info.get("quant") or {}
    names = prunable_layers(model)
    total = sum(model.layer(n).params["weight"].size for n in names)
    kept = sum(int(masks[n].sum()) if n in masks else model.layer(n).params["weight"].size
               for n in names)
    bits = max((dp["weight_fmt"]["bits"] for dp in quant.values()), default=0)
    kind = "+".join(k for k, on in (("pruned", bool(masks)), ("quantized", bool(quant))) if on)
    return {"name": name, "kind": "baseline" if baseline else (kind or "float"),
            "density": kept / total if total else 1.0, "bits": int(bits),
            "clean_accuracy": float("nan"), "file": str(path or "")}


def check_compatible(baseline_path, baseline_info: dict, path, info: dict) -> None:
    """A compressed model must be of the baseline's architecture and data set."""
    for key in ("arch", "dataset"):
        if info[key] != baseline_info[key]:
            raise FxsimError(f"{path} is a {key} {info[key]!r} model, the baseline "
                             f"{baseline_path} is {baseline_info[key]!r}")


class AttackFiles:
    """The finished attacks of a scenarios run, one adversarial image file each in ``folder``,
    so that a run cut short skips them when it is run again. A file is named by a digest of
    what its images depend on: the source model (``model_digests``: name -> a digest of its
    file), the attack and its settings, and the images and labels attacked."""

    def __init__(self, folder, model_digests: dict, images, labels):
        import hashlib

        self.folder = Path(folder)
        self.model_digests = model_digests
        data = hashlib.sha256(np.ascontiguousarray(images).data)
        data.update(np.ascontiguousarray(labels).data)
        self.data_digest = data.hexdigest()

    def path(self, method: str, source: str, settings: dict) -> Path:
        import hashlib
        import json

        what = json.dumps([self.model_digests[source], method, settings, self.data_digest],
                          sort_keys=True)
        return self.folder / f"{method}-{hashlib.sha256(what.encode()).hexdigest()[:16]}.h5"

    def load(self, method: str, source: str, settings: dict) -> AdversarialSet | None:
        from fxsim import store

        path = self.path(method, source, settings)
        if not path.exists():
            return None
        _, adversarial, _, meta = store.load_adversarial(path)
        return AdversarialSet(method, source, adversarial, meta["mean_abs"], meta["mean_l2"],
                              meta["gradient_masked"])

    def save(self, made: AdversarialSet, settings: dict, images, labels) -> None:
        from fxsim import store

        self.folder.mkdir(exist_ok=True)
        store.save_adversarial(self.path(made.attack, made.source, settings), images,
                               made.adversarial, labels,
                               {"method": made.attack, "settings": settings,
                                "source": made.source, "mean_abs": made.mean_abs,
                                "mean_l2": made.mean_l2,
                                "gradient_masked": made.gradient_masked})

    def remove(self) -> None:
        """Delete the files (the folder too, once it holds nothing else)."""
        for path in self.folder.glob("*.h5"):
            path.unlink()
        with contextlib.suppress(OSError):
            self.folder.rmdir()


def run(models: dict, baseline: str, attacks: dict, images, labels, matrix: bool = False,
        batch_size: int = 500, progress=None,
        attack_files: AttackFiles | None = None) -> tuple[list[dict], dict]:
    """Every scenario for every attack. ``models``: name -> runnable model (the baseline
    among them); ``attacks``: method -> settings (fxsim.attacks.DEFAULTS). ``progress(msg)``
    hears about each attack run. With ``attack_files`` every attack's images are kept as a
    file, and an attack whose file is there is not run again. Returns (rows, clean accuracy
    per model)."""
    from fxsim import attacks as attack_lib

    if baseline not in models:
        raise FxsimError(f"no model named {baseline!r}")
    pairs = plan(baseline, [n for n in models if n != baseline], matrix)
    clean = {name: model.predict(images) for name, model in models.items()}
    rows = []
    for method, settings in attacks.items():
        adversarial = {}
        for source in dict.fromkeys(s for s, _, _ in pairs):
            made = attack_files.load(method, source, settings) if attack_files else None
            if made is not None:
                if progress:
                    progress(f"{method} on {source}: made before, read back")
                adversarial[source] = made
                continue
            if progress:
                progress(f"{method} on {source} ({len(images)} images)")
            result = attack_lib.run(method, models[source], images, labels, settings,
                                    batch_size)
            adversarial[source] = AdversarialSet.from_result(method, source, result)
            if attack_files:
                attack_files.save(adversarial[source], settings, images, labels)
        for source, target, scenario in pairs:
            metrics = evaluate(models[target], adversarial[source], labels, clean[target])
            rows.append({"attack": method, "scenario": scenario, "source": source,
                         "target": target, **metrics})
    accuracy = {name: float((pred == labels).mean()) for name, pred in clean.items()}
    return rows, accuracy
