"""Dynamic loss scaling for float16 training (PyTorch's ``GradScaler`` rule).

float16 keeps 5 exponent bits: gradients under about 6e-5 (its smallest normal number) lose
precision, and those under about 3e-8 (half its smallest subnormal, 2^-24 ≈ 6e-8) round to zero.
So the backward starts from ``dL = scale`` instead of 1, which multiplies every gradient by
``scale`` and lifts the small ones into range; ``Params.unscale_grads(1 / scale)`` divides it out
again in float32. When a scaled gradient overflows (inf or NaN), the step is skipped and the scale
halved; after ``growth_interval`` steps in a row without overflow it is doubled, so it stays near
the largest scale that fits. bfloat16 has float32's exponent range and needs no scaling
(``enabled=False``: the scale stays 1).
"""


class LossScaler:
    """The loss scale of a float16 run, and the rule that moves it."""

    def __init__(self, enabled, *, init_scale=2.0 ** 16, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000):
        self.enabled = bool(enabled)
        self._scale = float(init_scale) if self.enabled else 1.0
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        self.good_steps = 0            # steps in a row without overflow
        self.skipped = 0               # steps skipped so far

    @property
    def scale(self):
        return self._scale

    def update(self, finite):
        """After a backward: ``finite`` says whether every scaled gradient was finite."""
        if not self.enabled:
            return
        if not finite:
            self._scale *= self.backoff_factor
            self.good_steps = 0
            self.skipped += 1
            return
        self.good_steps += 1
        if self.good_steps == self.growth_interval:
            self._scale *= self.growth_factor
            self.good_steps = 0

    def state_dict(self):
        return {"scale": self._scale, "good_steps": self.good_steps, "skipped": self.skipped}

    def load_state_dict(self, state):
        self._scale, self.good_steps, self.skipped = float(state["scale"]), int(state["good_steps"]), int(state["skipped"])
