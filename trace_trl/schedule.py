"""The KL-channel weight as a pure function of the optimizer step.

Being a function of ``trainer.state.global_step`` alone (which Trainer checkpoints in ``trainer_state.json``), the
schedule needs no state of its own: a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import math


KL_DECAYS: tuple[str, ...] = ("linear", "cosine", "exponential", "none")

# e-folds of the exponential decay over `decay_steps`; the curve is shifted and rescaled so it reaches 0 exactly.
EXPONENTIAL_EFOLDS = 5.0


def kl_weight(step: int, *, coef: float, warmup_steps: int, decay_steps: int, decay: str) -> float:
    r"""Weight of the KL channel at optimizer step ``step`` (0-based: the number of completed optimizer steps).

    With $t = (\text{step} - \text{warmup}) / \text{decay\_steps}$ clipped to $[0, 1]$:

    - $w = c$ while $\text{step} < \text{warmup}$ (and forever when ``decay="none"``);
    - linear: $w = c\,(1 - t)$;
    - cosine: $w = c\,\tfrac{1}{2}(1 + \cos \pi t)$;
    - exponential: $w = c\,\frac{e^{-k t} - e^{-k}}{1 - e^{-k}}$ with $k = 5$, so $w(0) = c$ and $w(1) = 0$;
    - $w = 0$ from $\text{warmup} + \text{decay\_steps}$ on (immediately after the warm-up if ``decay_steps == 0``).
    """
    if decay not in KL_DECAYS:
        raise ValueError(f"decay must be one of {KL_DECAYS}, got {decay!r}.")
    if warmup_steps < 0 or decay_steps < 0:
        raise ValueError(f"warmup_steps and decay_steps must be >= 0, got {warmup_steps} and {decay_steps}.")
    if coef == 0.0:
        return 0.0
    if decay == "none" or step < warmup_steps:
        return float(coef)
    if decay_steps == 0 or step >= warmup_steps + decay_steps:
        return 0.0
    t = (step - warmup_steps) / decay_steps
    if decay == "linear":
        return float(coef * (1.0 - t))
    if decay == "cosine":
        return float(coef * 0.5 * (1.0 + math.cos(math.pi * t)))
    k = EXPONENTIAL_EFOLDS
    return float(coef * (math.exp(-k * t) - math.exp(-k)) / (1.0 - math.exp(-k)))


def kl_weight_sq_sum(step: int, *, coef: float, warmup_steps: int, decay_steps: int, decay: str) -> float:
    r"""$\sum_{k=0}^{\text{step}} w_k^2$: the running sum of squared KL weights through optimizer step ``step``.

    The paper's bound on how far the privileged teacher can pull the policy grows with this sum; like the weight
    itself it is a pure function of the step, so a resumed run reports the same value. After the decay it stays
    constant; with ``decay="none"`` it grows as $c^2 (\text{step} + 1)$.
    """
    if step < 0:
        return 0.0
    if decay == "none" or coef == 0.0:
        return float(coef) ** 2 * (step + 1) if decay == "none" else 0.0
    last = min(step, warmup_steps + decay_steps)  # the weight is 0 from warmup + decay on
    return float(
        sum(
            kl_weight(k, coef=coef, warmup_steps=warmup_steps, decay_steps=decay_steps, decay=decay) ** 2
            for k in range(last + 1)
        )
    )
