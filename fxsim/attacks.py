"""Adversarial attacks: FGM/FGSM, their iterative forms (the paper's Algorithm 1, optionally with
the BIM projection) and L2 DeepFool.

Every attack takes a model, images in [0, 1] (N, C, H, W) and labels, and returns an
:class:`AttackResult`. Attacks are pure (inputs are never modified), per sample (a sample's
result does not depend on the batch it is in: gradients come from the model in evaluation mode)
and deterministic. The gradient comes from the model the attack runs on: a quantised model
computes its forward pass on the integer datapath and its backward pass through the STE, so the
examples are made against what the accelerator computes. A sample whose gradient is zero or not
finite is flagged (``gradient_masked``) rather than silently left unchanged.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from fxsim.errors import FxsimError


@dataclass
class AttackResult:
    """adversarial: (N, C, H, W) images; success: (N,) whether the attack achieved its goal
    (untargeted: the prediction differs from the label; targeted: it equals the target;
    DeepFool: it differs from the original prediction); iterations: (N,) steps used;
    gradient_masked: (N,) a zero or non-finite gradient was met; l0, l1, l2, linf: (N,)
    norms of the perturbation; mean_abs: (N,) mean |perturbation| per pixel."""

    adversarial: np.ndarray
    success: np.ndarray
    iterations: np.ndarray
    gradient_masked: np.ndarray
    l0: np.ndarray
    l1: np.ndarray
    l2: np.ndarray
    linf: np.ndarray
    mean_abs: np.ndarray

    @classmethod
    def build(cls, original, adversarial, success, iterations, masked) -> AttackResult:
        delta = (adversarial.astype(np.float64) - original).reshape(len(original), -1)
        return cls(adversarial, success, iterations, masked,
                   l0=(delta != 0).sum(axis=1), l1=np.abs(delta).sum(axis=1),
                   l2=np.sqrt((delta**2).sum(axis=1)), linf=np.abs(delta).max(axis=1, initial=0),
                   mean_abs=np.abs(delta).mean(axis=1) if delta.shape[1] else delta.sum(axis=1))


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_settings(eps=None, steps=None) -> None:
    """Reject a negative, NaN or infinite step size (steps are taken in float32, where inf
    times a zero gradient is NaN) or a step count below 1, naming the value."""
    if eps is not None and not 0 <= eps <= _FLOAT32_MAX:
        raise FxsimError(f"eps must be >= 0 and finite in float32, got {eps}")
    if steps is not None and (int(steps) != steps or steps < 1):
        raise FxsimError(f"steps must be an integer >= 1, got {steps}")


def _check(model, images, labels, eps=None, steps=None, clip=(0.0, 1.0), target=None):
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != model.input_shape:
        raise FxsimError(f"{model.arch} attacks need images of shape "
                         f"(N, {', '.join(map(str, model.input_shape))}), got {images.shape}")
    if len(images) == 0:
        raise FxsimError("no images to attack (got an empty batch)")
    if images.dtype.kind != "f" or not np.all(np.isfinite(images)):
        raise FxsimError("images must be finite floats")
    if clip is not None:
        lo, hi = clip
        if not lo < hi:
            raise FxsimError(f"clip must be (low, high) with low < high, got {clip}")
        if images.min(initial=lo) < lo or images.max(initial=hi) > hi:
            raise FxsimError(f"images must lie in the clip box [{lo}, {hi}], found values in "
                             f"[{images.min():g}, {images.max():g}]")
    check_settings(eps, steps)
    for name, values in (("labels", labels), ("target", target)):
        if values is None:
            continue
        values = np.asarray(values)
        if values.shape != (len(images),) or values.dtype.kind not in "iu":
            raise FxsimError(f"{name} must be {len(images)} integers, got shape {values.shape}")
        if len(values) and (values.min() < 0 or values.max() >= model.num_classes):
            raise FxsimError(f"{name} must lie in 0..{model.num_classes - 1}")
    return images.astype(np.float32, copy=False)


# Every model call an attack makes sees exactly CHUNK images (the last chunk padded with copies
# of its last image): float32 GEMM picks its kernel by matrix size, so a sample's gradient
# would otherwise change in the last bits with the size of the batch it came in, and DeepFool's
# and IFGM's continuous steps carry that difference on.
CHUNK = 64


def _chunked(fn, x, *per_sample):
    """``fn(x, *per_sample)`` evaluated CHUNK images at a time; outputs (arrays or tuples of
    arrays with one row per image) concatenated."""
    pieces = []
    for start in range(0, len(x), CHUNK):
        count = min(CHUNK, len(x) - start)
        args = [a[start : start + count] for a in (x, *per_sample)]
        if count < CHUNK:
            args = [np.concatenate([a, np.repeat(a[-1:], CHUNK - count, axis=0)])
                    for a in args]
        out = fn(*args)
        pieces.append(tuple(o[:count] for o in out) if isinstance(out, tuple) else out[:count])
    if not pieces:
        return fn(x, *per_sample)
    if isinstance(pieces[0], tuple):
        return tuple(np.concatenate(parts) for parts in zip(*pieces, strict=True))
    return np.concatenate(pieces)


def _predict(model, x):
    return _chunked(model.forward, x).argmax(axis=1)


def _direction(grad, norm):
    flat = grad.reshape(len(grad), -1)
    if norm == "sign":
        return np.sign(grad)
    if norm == "none":
        return grad
    lengths = np.sqrt((flat.astype(np.float64) ** 2).sum(axis=1))
    lengths[lengths == 0] = 1.0
    return (flat / lengths[:, None]).reshape(grad.shape).astype(grad.dtype)


def _masked(grad):
    flat = grad.reshape(len(grad), -1)
    return ~np.all(np.isfinite(flat), axis=1) | ~np.any(flat != 0, axis=1)


def _iterates(model, x0, goal, sign, eps, steps, norm, clip, radius):
    """Algorithm 1 on one batch ``x0``: yields (the iterate after step k, whether a sample has
    met a zero or non-finite gradient so far, the logits of the iterate after step k - 1) for
    k = 1 .. ``steps``. The iterate after k steps is the k-step attack's result (nothing
    depends on the step count). The logits come free with step k's gradient: its forward pass
    is :meth:`Model.forward` on the same chunks of images, so they are that call's bits."""
    adv = x0.copy()
    masked = np.zeros(len(x0), bool)
    for _ in range(int(steps)):
        grad, logits = _chunked(model.input_gradient, adv, goal)
        masked |= _masked(grad)
        grad = np.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
        with np.errstate(over="ignore"):  # a huge step overflows to +-inf: clipped below
            adv = adv + np.float32(sign * eps) * _direction(grad, norm).astype(np.float32)
        if radius is not None:
            adv = np.clip(adv, x0 - radius, x0 + radius)
        if clip is not None:
            adv = np.clip(adv, clip[0], clip[1])
        yield adv, masked, logits


def _iterate(model, images, labels, eps, steps, norm, clip, radius, target, batch_size,
             progress=None):
    """The paper's Algorithm 1: ``steps`` steps of size ``eps`` along the loss gradient's sign
    (or the gradient itself), each iterate clipped to ``clip``; with ``radius`` projected onto
    the L-inf ball around the original (BIM). Targeted: down the target's loss."""
    x = _check(model, images, labels, eps, steps, clip, target)
    out = np.empty_like(x)
    masked = np.zeros(len(x), bool)
    for start in range(0, len(x), batch_size):
        sl = slice(start, start + batch_size)
        goal = labels[sl] if target is None else np.asarray(target)[sl]
        sign = 1.0 if target is None else -1.0
        # the last iterate is the attack's result (steps >= 1: _check)
        out[sl], masked[sl], _ = deque(_iterates(model, x[sl], goal, sign, eps, steps, norm,
                                                 clip, radius), maxlen=1)[0]
        if progress:
            progress(len(out[sl]))
    predictions = _predict(model, out)
    success = predictions != labels if target is None else predictions == np.asarray(target)
    return AttackResult.build(x, out, success, np.full(len(x), int(steps)), masked)


def fgsm(model, images, labels, eps, clip=(0.0, 1.0), target=None, batch_size=500,
         progress=None):
    """Fast gradient sign method: ``x + eps * sign(grad)``, clipped. ``progress(n)`` is called
    after every batch of n images (all attacks take it)."""
    return _iterate(model, images, labels, eps, 1, "sign", clip, None, target, batch_size,
                    progress)


def fgm(model, images, labels, eps, norm="none", clip=(0.0, 1.0), target=None, batch_size=500,
        progress=None):
    """Fast gradient method: ``x + eps * grad`` (the paper) or ``eps * grad / ||grad||_2``
    (``norm="l2"``), clipped."""
    if norm not in ("none", "l2"):
        raise FxsimError(f"norm must be 'none' or 'l2', got {norm!r}")
    return _iterate(model, images, labels, eps, 1, norm, clip, None, target, batch_size,
                    progress)


def ifgsm(model, images, labels, eps=0.02, steps=12, clip=(0.0, 1.0), radius=None,
          target=None, batch_size=500, progress=None):
    """Iterative FGSM (the paper's Algorithm 1; with ``radius``, BIM's projection)."""
    return _iterate(model, images, labels, eps, steps, "sign", clip, radius, target, batch_size,
                    progress)


def ifgm(model, images, labels, eps=0.02, steps=12, norm="none", clip=(0.0, 1.0), radius=None,
         target=None, batch_size=500, progress=None):
    """Iterative FGM: ``steps`` steps of ``eps * grad`` (or its L2-normalised direction)."""
    if norm not in ("none", "l2"):
        raise FxsimError(f"norm must be 'none' or 'l2', got {norm!r}")
    return _iterate(model, images, labels, eps, steps, norm, clip, radius, target, batch_size,
                    progress)


def deepfool(model, images, labels=None, candidates=10, overshoot=0.02, max_iter=50,
             clip=None, batch_size=500, progress=None):
    """L2 DeepFool (Moosavi-Dezfooli et al.): linearise the classifier around the current point
    and step to the nearest of the ``candidates`` top classes' boundaries; the reference class
    is the model's own prediction; ``overshoot`` scales the total perturbation; each sample
    stops as soon as its prediction changes. No clipping unless ``clip`` is given."""
    x = _check(model, images, labels, clip=clip)
    if not overshoot >= 0 or max_iter < 1 or candidates < 2:
        raise FxsimError("need overshoot >= 0, max_iter >= 1 and candidates >= 2")
    k = min(int(candidates), model.num_classes)
    out = np.empty_like(x)
    iterations = np.zeros(len(x), int)
    masked = np.zeros(len(x), bool)
    for start in range(0, len(x), batch_size):
        sl = slice(start, start + batch_size)
        x0 = x[sl].astype(np.float64)
        logits0 = _chunked(model.forward, x[sl])
        reference = logits0.argmax(axis=1)
        order = np.argsort(-logits0, axis=1, kind="stable")[:, :k]  # top-k, reference first
        total = np.zeros_like(x0)
        active = np.ones(len(x0), bool)
        for it in range(max_iter):
            current = x0 + (1 + overshoot) * total
            if clip is not None:
                current = np.clip(current, *clip)
            logits = _chunked(model.forward, current.astype(np.float32))
            active &= logits.argmax(axis=1) == reference
            if not active.any():
                break
            iterations[sl][active] = it + 1
            idx = np.flatnonzero(active)
            cur = current[idx].astype(np.float32)
            # the reference class's gradient and the other candidates', from one forward pass
            classes = np.concatenate([reference[idx, None], order[idx, 1:]], axis=1)
            grads, logits_c = _chunked(model.logit_gradients, cur, classes)
            grad_ref = grads[:, 0]
            best_dist = np.full(len(idx), np.inf)
            best_step = np.zeros((len(idx), *x0.shape[1:]))
            for c in range(1, k):
                cls = order[idx, c]
                grad_c = grads[:, c]
                w = (grad_c - grad_ref).reshape(len(idx), -1).astype(np.float64)
                f = (logits_c[np.arange(len(idx)), cls]
                     - logits_c[np.arange(len(idx)), reference[idx]]).astype(np.float64)
                norm = np.sqrt((w**2).sum(axis=1))
                dist = np.where(norm > 0, np.abs(f) / np.where(norm > 0, norm, 1), np.inf)
                better = dist < best_dist
                step = ((np.abs(f) + 1e-4) / np.where(norm > 0, norm, 1) ** 2)[:, None] * w
                best_dist = np.where(better, dist, best_dist)
                best_step[better] = step[better].reshape(-1, *x0.shape[1:])
            stuck = ~np.isfinite(best_dist)
            masked[sl][idx[stuck]] = True
            total[idx[~stuck]] += best_step[~stuck]
            active[idx[stuck]] = False
        adv = x0 + (1 + overshoot) * total
        if clip is not None:
            adv = np.clip(adv, *clip)
        out[sl] = adv.astype(np.float32)
        if progress:
            progress(len(x0))
    success = _predict(model, out) != _predict(model, x)
    return AttackResult.build(x, out, success, iterations, masked)


# The attacks by name with their settings and defaults (the paper's: eps 0.02, 12 steps; DeepFool
# overshoot 0.02, 50 iterations, top-10 candidates). Config files and the CLI go through these.
DEFAULTS = {
    "fgsm": {"eps": 0.02},
    "fgm": {"eps": 0.02, "norm": "none"},
    "ifgsm": {"eps": 0.02, "steps": 12, "radius": None},
    "ifgm": {"eps": 0.02, "steps": 12, "norm": "none", "radius": None},
    "deepfool": {"overshoot": 0.02, "max_iter": 50, "candidates": 10},
}


# what each setting must be (config files give any TOML value), and how to say so
_SETTING_TYPES = {
    "eps": ("number", "a number"), "overshoot": ("number", "a number"),
    "radius": ("number or None", "a number or absent"),
    "steps": ("integer", "an integer"), "max_iter": ("integer", "an integer"),
    "candidates": ("integer", "an integer"), "norm": ("text", "'none' or 'l2'"),
}


def _setting_type_ok(name: str, value) -> bool:
    kind = _SETTING_TYPES[name][0]
    if kind == "text":
        return isinstance(value, str)
    if value is None:
        return kind == "number or None"
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        return False
    return kind != "integer" or float(value).is_integer()


def settings_for(method: str, given: dict | None = None) -> dict:
    """``given`` completed with ``method``'s defaults; an unknown method or setting is an
    error naming it, and so is a bad value."""
    if method not in DEFAULTS:
        raise FxsimError(f"unknown attack {method!r}; choose from {', '.join(DEFAULTS)}")
    given = dict(given or {})
    unknown = sorted(set(given) - set(DEFAULTS[method]))
    if unknown:
        raise FxsimError(f"{method} has no setting {', '.join(map(repr, unknown))}; it takes "
                         f"{', '.join(DEFAULTS[method])}")
    settings = {**DEFAULTS[method], **given}
    for name, value in given.items():
        if not _setting_type_ok(name, value):
            raise FxsimError(f"{method} setting {name!r} must be {_SETTING_TYPES[name][1]}, got "
                             f"{value!r}")
    check_settings(settings.get("eps"), settings.get("steps"))
    if settings.get("norm", "none") not in ("none", "l2"):
        raise FxsimError(f"norm must be 'none' or 'l2', got {settings['norm']!r}")
    radius = settings.get("radius")
    if radius is not None and not radius > 0:
        raise FxsimError(f"radius must be > 0, got {radius}")
    if method == "deepfool" and not (settings["overshoot"] >= 0 and settings["max_iter"] >= 1
                                     and settings["candidates"] >= 2):
        raise FxsimError("deepfool needs overshoot >= 0, max_iter >= 1 and candidates >= 2")
    return settings


def run(method: str, model, images, labels, settings: dict | None = None, batch_size=500,
        progress=None) -> AttackResult:
    """Run attack ``method`` with ``settings`` (see DEFAULTS) on ``model``."""
    s = settings_for(method, settings)
    common = {"batch_size": batch_size, "progress": progress}
    if method == "fgsm":
        return fgsm(model, images, labels, s["eps"], **common)
    if method == "fgm":
        return fgm(model, images, labels, s["eps"], s["norm"], **common)
    if method == "ifgsm":
        return ifgsm(model, images, labels, s["eps"], s["steps"], radius=s["radius"], **common)
    if method == "ifgm":
        return ifgm(model, images, labels, s["eps"], s["steps"], s["norm"], radius=s["radius"],
                    **common)
    return deepfool(model, images, labels, s["candidates"], s["overshoot"], s["max_iter"],
                    **common)


@dataclass
class StrengthCurves:
    """Accuracy under an iterative attack as its step size and step count grow (the paper's
    Figure 3): ``accuracy[name]`` (len(eps), steps + 1) is the accuracy of the model called
    ``name`` on the examples made on the attacked model with step size ``eps[i]`` after ``k``
    steps (column 0: the clean images)."""

    method: str
    eps: list[float]
    steps: int
    accuracy: dict[str, np.ndarray]


def strength_curves(method: str, model, images, labels, eps_values, steps: int,
                    targets: dict | None = None, settings: dict | None = None, batch_size=500,
                    progress=None) -> StrengthCurves:
    """Run ``method`` ("ifgsm" or "ifgm", with the rest of ``settings``) on ``model`` once per
    step size in ``eps_values`` for ``steps`` steps, and after every step evaluate the
    iterates on ``model`` (as "source") and on every model of ``targets`` (name -> model):
    one run per step size gives every step count, since the iterate after k steps is the
    k-step attack; the attacked model's accuracy on the iterate after k - 1 steps comes from
    step k's gradient pass. ``progress(n)`` after every batch of n images and step size."""
    if method not in ("ifgsm", "ifgm"):
        raise FxsimError(f"strength curves need an iterative attack (ifgsm, ifgm), got {method!r}")
    eps_values = [float(e) for e in eps_values]
    if not eps_values:
        raise FxsimError("give at least one step size")
    s = settings_for(method, {**(settings or {}), "eps": eps_values[0], "steps": steps})
    for eps in eps_values:
        check_settings(eps, steps)
    norm = "sign" if method == "ifgsm" else s["norm"]
    targets_ = dict(targets or {})
    if "source" in targets_:
        raise FxsimError("'source' names the attacked model's curves; name the other models "
                         "otherwise")
    models = {"source": model, **targets_}
    x = _check(model, images, labels, eps_values[0], steps, (0.0, 1.0))
    labels = np.asarray(labels)
    accuracy = {name: np.zeros((len(eps_values), steps + 1)) for name in models}
    for start in range(0, len(x), batch_size):
        x0, goal = x[start : start + batch_size], labels[start : start + batch_size]
        clean = {name: np.count_nonzero(_predict(m, x0) == goal) for name, m in targets_.items()}
        for i, eps in enumerate(eps_values):
            for name in targets_:
                accuracy[name][i, 0] += clean[name]
            iterates = _iterates(model, x0, goal, 1.0, eps, steps, norm, (0.0, 1.0), s["radius"])
            for k, (adv, _, logits) in enumerate(iterates, start=1):
                # the attacked model's logits of the iterate before this step: one forward
                # pass of the three per step saved
                accuracy["source"][i, k - 1] += np.count_nonzero(logits.argmax(axis=1) == goal)
                for name, m in targets_.items():
                    accuracy[name][i, k] += np.count_nonzero(_predict(m, adv) == goal)
            accuracy["source"][i, steps] += np.count_nonzero(_predict(model, adv) == goal)
            if progress:
                progress(len(x0))
    return StrengthCurves(method, eps_values, int(steps),
                          {name: a / max(1, len(x)) for name, a in accuracy.items()})
