"""Scaling laws: the compute-optimal model size N and training tokens D for a FLOP budget C, and back.

Training compute is ``C = 6 N D`` FLOPs (Kaplan et al. 2020, section 2.1), ``N`` counting every parameter
(Chinchilla's convention; Kaplan's own fits leave embeddings out). Three kinds of law:

* :class:`ParametricLaw`: Chinchilla's approach 3 (Hoffmann et al. 2022, eq. 2),
  ``L(N, D) = E + A / N**alpha + B / D**beta``. Minimising L on ``C = 6 N D`` gives the closed form
  ``N_opt = G (C/6)**a``, ``D_opt = (C/6)**b / G`` with ``G = (alpha A / (beta B))**(1/(alpha+beta))``,
  ``a = beta/(alpha+beta)``, ``b = alpha/(alpha+beta)`` (their eq. 4). Two sets of constants:
  the paper's (E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28), whose optimum at 5.76e23 FLOPs is about
  32B parameters on 3T tokens, not the 67B/1.5T of the paper's other approaches (the inconsistency
  Besiroglu et al. 2024 found), and Besiroglu et al. 2024's refit on the paper's own data
  (E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658: about 70B on 1.4T tokens).
* :class:`PowerLaw`: ``N_opt = k C**a`` and ``D_opt = C / (6 N_opt)``. Chinchilla's approaches 1 and 2 are
  fitted (least squares in log space) to the projections the paper publishes for each (Table 3 for
  approach 1, Table A3 for approach 2: model size, FLOPs, tokens); the fitted exponents reproduce the
  paper's a = 0.50 and 0.49 (checked by a test). Kaplan et al. 2020's ``N_opt = 1.3e9 C**0.73`` (C in
  PF-days, their eq. 6.1 and figure 14) is there for comparison: it favours much larger models.

Every law answers :meth:`optimum` (budget -> N, D) and :meth:`compute_for` (N -> the budget whose optimum it
is, with its D).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PF_DAY = 1e15 * 86400  # FLOPs in a petaflop/s-day (Kaplan et al.'s compute unit)


@dataclass(frozen=True)
class Optimum:
    """A compute-optimal point: ``params`` N, ``tokens`` D and ``flops`` C = 6 N D."""

    params: float
    tokens: float
    flops: float

    @property
    def tokens_per_param(self) -> float:
        return self.tokens / self.params


@dataclass(frozen=True)
class ParametricLaw:
    """``L(N, D) = E + A / N**alpha + B / D**beta`` (nats per token) and its compute-optimal frontier."""

    name: str
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    source: str

    def loss(self, params: float, tokens: float) -> float:
        """Predicted final training loss (nats/token) of ``params`` parameters trained on ``tokens``."""
        return self.E + self.A / params**self.alpha + self.B / tokens**self.beta

    @property
    def _g(self) -> float:
        return (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))

    @property
    def a(self) -> float:
        """Exponent of N_opt in C."""
        return self.beta / (self.alpha + self.beta)

    def optimum(self, flops: float) -> Optimum:
        """N and D minimising ``loss`` under ``6 N D = flops`` (Hoffmann et al. eq. 4)."""
        n = self._g * (flops / 6) ** self.a
        return Optimum(n, flops / (6 * n), flops)

    def compute_for(self, params: float) -> Optimum:
        """The budget whose optimum is a model of ``params`` parameters (the inverse of :meth:`optimum`)."""
        flops = 6 * (params / self._g) ** (1 / self.a)
        return Optimum(params, flops / (6 * params), flops)


@dataclass(frozen=True)
class PowerLaw:
    """``N_opt = k * (C / unit)**a``, ``D_opt = C / (6 N_opt)``."""

    name: str
    k: float
    a: float
    source: str
    unit: float = 1.0  # FLOPs per unit of C in the fit (PF_DAY for Kaplan)

    def optimum(self, flops: float) -> Optimum:
        n = self.k * (flops / self.unit) ** self.a
        return Optimum(n, flops / (6 * n), flops)

    def compute_for(self, params: float) -> Optimum:
        flops = self.unit * (params / self.k) ** (1 / self.a)
        return Optimum(params, flops / (6 * params), flops)

    @classmethod
    def fit(cls, name: str, rows: list[tuple[float, float]], source: str) -> PowerLaw:
        """Least squares of ``log N = log k + a log C`` over ``rows`` of (N, C)."""
        xs = [math.log(c) for _, c in rows]
        ys = [math.log(n) for n, _ in rows]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        a = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
        return cls(name, math.exp(my - a * mx), a, source)


# Hoffmann et al. 2022, Table 3 (approach 1) and Table A3 (approach 2): (parameters, training FLOPs).
CHINCHILLA_APPROACH1_TABLE = [
    (400e6, 1.92e19), (1e9, 1.21e20), (10e9, 1.23e22), (67e9, 5.76e23), (175e9, 3.85e24),
    (280e9, 9.90e24), (520e9, 3.43e25), (1e12, 1.27e26), (10e12, 1.30e28),
]  # fmt: skip
CHINCHILLA_APPROACH2_TABLE = [
    (400e6, 1.84e19), (1e9, 1.20e20), (10e9, 1.32e22), (67e9, 6.88e23), (175e9, 4.54e24),
    (280e9, 1.18e25), (520e9, 4.19e25), (1e12, 1.59e26), (10e12, 1.75e28),
]  # fmt: skip

CHINCHILLA_1 = PowerLaw.fit("chinchilla-1", CHINCHILLA_APPROACH1_TABLE,
                            "Hoffmann et al. 2022, approach 1 (minimum over training curves), Table 3")  # fmt: skip
CHINCHILLA_2 = PowerLaw.fit("chinchilla-2", CHINCHILLA_APPROACH2_TABLE,
                            "Hoffmann et al. 2022, approach 2 (IsoFLOP profiles), Table A3")  # fmt: skip
CHINCHILLA_3 = ParametricLaw("chinchilla-3", E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28,
                             source="Hoffmann et al. 2022, approach 3 (parametric fit), eq. 10")  # fmt: skip
BESIROGLU = ParametricLaw("besiroglu", E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658,
                          source="Besiroglu et al. 2024, refit of approach 3 on Hoffmann et al.'s data")  # fmt: skip
KAPLAN = PowerLaw("kaplan", k=1.3e9, a=0.73, unit=PF_DAY, source="Kaplan et al. 2020, eq. 6.1 / figure 14")

LAWS: dict[str, ParametricLaw | PowerLaw] = {
    law.name: law for law in (CHINCHILLA_1, CHINCHILLA_2, CHINCHILLA_3, BESIROGLU, KAPLAN)
}
"""Every law by name, in the order ``lamina plan`` prints them."""
