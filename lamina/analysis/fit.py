"""Fit a scaling law to your own runs: ``L(N, D) = E + A / N**alpha + B / D**beta`` (Chinchilla's approach 3).

    points = [read_run(p) for p in run_folders]   # N, D and the final validation loss of each run
    fit = fit_law(points)                         # a ParametricLaw: loss(), optimum(), compute_for()
    band = bootstrap(points, n=200)               # refits on resampled runs: confidence intervals
    fit.loss(5e7, 1e9), band.interval(lambda law: law.loss(5e7, 1e9))

The fit follows Hoffmann et al. 2022 (appendix D.2) as Besiroglu et al. 2024 reproduced it: minimise the
Huber loss (delta = 1e-3) between ``log L_i`` and ``LSE(a - alpha log N_i, b - beta log D_i, e)``
(``A = e**a``, ``B = e**b``, ``E = e**e``) with L-BFGS (scipy; tolerances tight enough that it does not
stop early, the flaw Besiroglu et al. found in the original fit), started from the best points of their
initialisation grid (alpha, beta in {0, 0.5, ..., 2}, e in {-1, -0.5, ..., 1}, a, b in {0, 5, ..., 25}).
Confidence intervals: percentile bootstrap over runs (each resample refitted).

``N`` is a run's parameter count (every parameter, as Chinchilla counts), ``D`` the tokens it trained on
(``tokens`` of its last validation record in ``metrics.jsonl``, else steps x batch x sequence length x
gradient accumulation from ``run.yaml``), and ``L`` that record's ``val_loss`` (nats/token).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lamina.analysis.plan import COUNT, _count
from lamina.analysis.scaling import ParametricLaw
from lamina.errors import ConfigError

HUBER_DELTA = 1e-3  # Hoffmann et al. 2022, appendix D.2
# fewest runs for bootstrap intervals: with 5 (the fewest a fit takes) every resample that can be fitted
# holds all 5 runs, so the intervals would have zero width
MIN_BOOTSTRAP = 8
# (a, b, e, alpha, beta): exponents kept >= 0 (loss falls with size and data) and every constant finite
BOUNDS = [(-20.0, 60.0), (-20.0, 60.0), (-5.0, 5.0), (0.0, 3.0), (0.0, 3.0)]


@dataclass
class FitConfig:
    """What ``lamina scaling fit`` reports (its flags)."""

    out: str | None = None  # folder for scaling_fit.png and fit.json (None: print only)
    bootstrap: int = 200  # refits on resampled runs for the 95% intervals (0: none)
    # predict the loss of a model of this many parameters (with predict_tokens: trained on that many tokens)
    predict_params: float | None = field(default=None, metadata=COUNT)
    # predict the loss after this many training tokens (with predict_params: of a model that size)
    predict_tokens: float | None = field(default=None, metadata=COUNT)
    budget: float | None = None  # also give the fitted law's compute-optimal N and D for this FLOP budget
    held_out: str | None = None  # a run left out of the fit: its loss predicted and compared
    seed: int = 0  # draws the bootstrap resamples
    starts: int = 8  # L-BFGS starts, from the best points of the paper's initialisation grid

    def __post_init__(self) -> None:
        if self.starts < 1:
            raise ConfigError(f"starts={self.starts} must be >= 1")


@dataclass(frozen=True)
class RunPoint:
    """One training run: ``params`` N, ``tokens`` D and its final validation ``loss`` (nats/token)."""

    name: str
    params: float
    tokens: float
    loss: float


def read_run(folder: str | Path) -> RunPoint:
    """The (N, D, L) of a pretraining run folder (``run.yaml`` + ``metrics.jsonl``). Raises
    ``ConfigError`` naming the folder when either is missing or no validation loss was logged."""
    from lamina.train.pretrain import RunConfig

    path = Path(folder)
    if not (path / "run.yaml").is_file() or not (path / "metrics.jsonl").is_file():
        raise ConfigError(f"{path}: not a finished pretraining run (run.yaml and metrics.jsonl expected)")
    run = RunConfig.from_yaml(path / "run.yaml")
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()]
    vals = [r for r in rows if "val_loss" in r]
    if not vals:
        raise ConfigError(
            f"{path}: no validation loss in metrics.jsonl; train with validation data (eval_every)"
        )
    last = vals[-1]
    t = run.train
    tokens = (
        last.get("tokens")
        or last["step"] * t.batch_size * (t.seq_len or run.model.max_seq_len) * t.grad_accum_steps
    )
    return RunPoint(path.name, float(run.model.n_params), float(tokens), float(last["val_loss"]))


def _objective(
    theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray
) -> tuple[float, np.ndarray]:
    """Huber loss of the log-space prediction and its gradient, for theta = (a, b, e, alpha, beta)."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])  # (3, n)
    top = terms.max(0)
    w = np.exp(terms - top)
    lse = top + np.log(w.sum(0))
    p = w / w.sum(0)  # d lse / d terms
    r = lse - log_l
    small = np.abs(r) <= HUBER_DELTA
    loss = np.where(small, 0.5 * r**2, HUBER_DELTA * (np.abs(r) - 0.5 * HUBER_DELTA)).sum()
    dr = np.where(small, r, HUBER_DELTA * np.sign(r))
    grad = np.array([
        (dr * p[0]).sum(), (dr * p[1]).sum(), (dr * p[2]).sum(),
        (dr * p[0] * -log_n).sum(), (dr * p[1] * -log_d).sum(),
    ])  # fmt: skip
    return float(loss), grad


def _grid() -> np.ndarray:
    alphas = betas = np.arange(0, 2.01, 0.5)
    es = np.arange(-1, 1.01, 0.5)
    abs_ = np.arange(0, 25.01, 5)
    return np.array(
        [(a, b, e, al, be) for al, be, e, a, b in itertools.product(alphas, betas, es, abs_, abs_)]
    )


_GRID = _grid()


def fit_law(points: Sequence[RunPoint], starts: int = FitConfig.starts, name: str = "fit") -> ParametricLaw:
    """The approach-3 law fitted to ``points`` (see the module doc); ``starts``: the best grid points
    L-BFGS starts from. Raises ``ConfigError`` with fewer than 5 runs (5 constants) or when N or D do
    not vary."""
    from scipy.optimize import minimize
    from threadpoolctl import threadpool_limits

    if len(points) < 5:
        raise ConfigError(f"fitting L(N, D) needs at least 5 runs (it has 5 constants); got {len(points)}")
    log_n = np.log([p.params for p in points])
    log_d = np.log([p.tokens for p in points])
    log_l = np.log([p.loss for p in points])
    if np.ptp(log_n) == 0 or np.ptp(log_d) == 0:
        raise ConfigError("the runs must differ in both parameters and tokens to fit L(N, D)")
    g = _GRID
    terms = np.stack([g[:, 0, None] - g[:, 3, None] * log_n, g[:, 1, None] - g[:, 4, None] * log_d,
                      np.repeat(g[:, 2, None], len(points), 1)])  # fmt: skip
    r = np.log(np.exp(terms - terms.max(0)).sum(0)) + terms.max(0) - log_l  # (G, n)
    huber = np.where(np.abs(r) <= HUBER_DELTA, 0.5 * r**2, HUBER_DELTA * (np.abs(r) - 0.5 * HUBER_DELTA)).sum(
        1
    )
    best = None
    with threadpool_limits(
        1
    ):  # 5 unknowns: BLAS threads only add synchronisation (10x slower on 2 busy cores)
        for i in np.argsort(huber)[:starts]:
            res = minimize(_objective, g[i], args=(log_n, log_d, log_l), jac=True, method="L-BFGS-B", bounds=BOUNDS,
                           options={"ftol": 0.0, "gtol": 1e-14, "maxiter": 5000})  # fmt: skip
            if best is None or res.fun < best.fun:
                best = res
    assert best is not None
    a, b, e, alpha, beta = best.x
    source = f"fitted to {len(points)} runs (Huber loss on log L, Hoffmann et al. 2022 approach 3)"
    return ParametricLaw(name, E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=float(alpha), beta=float(beta),
                         source=source)  # fmt: skip


@dataclass
class Bootstrap:
    """Laws refitted on resampled runs, for percentile confidence intervals of anything computed from one."""

    laws: list[ParametricLaw]

    def interval(self, f: Callable[[ParametricLaw], float], level: float = 0.95) -> tuple[float, float]:
        """The central ``level`` interval of ``f(law)`` over the refits."""
        values = np.array([f(law) for law in self.laws])
        tail = (1 - level) / 2 * 100
        lo, hi = np.percentile(values, [tail, 100 - tail])
        return float(lo), float(hi)


def bootstrap(points: Sequence[RunPoint], n: int = 200, seed: int = 0, starts: int = 4) -> Bootstrap:
    """``n`` refits on runs resampled with replacement (resamples with fewer than 5 distinct runs or
    without variation in N or D are drawn again). Raises ``ConfigError`` below ``MIN_BOOTSTRAP`` runs."""
    if len(points) < MIN_BOOTSTRAP:
        raise ConfigError(f"bootstrap intervals need at least {MIN_BOOTSTRAP} runs (got {len(points)}): with fewer, "
                          "every resample that can be fitted is the same runs")  # fmt: skip
    rng = np.random.default_rng(seed)
    laws: list[ParametricLaw] = []
    while len(laws) < n:
        idx = rng.integers(0, len(points), len(points))
        sample = [points[i] for i in idx]
        if (
            len(set(idx.tolist())) < 5
            or len({p.params for p in sample}) < 2
            or len({p.tokens for p in sample}) < 2
        ):
            continue
        laws.append(fit_law(sample, starts=starts))
    return Bootstrap(laws)


def plot_fit(points: Sequence[RunPoint], law: ParametricLaw, out: str | Path) -> Path:
    """``scaling_fit.png``: (left) loss against compute C = 6ND for the runs, with the law's
    compute-optimal frontier; (right) isoFLOP curves, the law's loss against N at fixed budgets, with
    its optimum marked. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    c = np.array([6 * p.params * p.tokens for p in points])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    sc = ax1.scatter(c, [p.loss for p in points], c=np.log10([p.params for p in points]), cmap="viridis")
    grid = np.logspace(math.log10(c.min() / 3), math.log10(c.max() * 30), 100)
    ax1.plot(
        grid, [law.loss(o.params, o.tokens) for o in map(law.optimum, grid)], "k--", label="frontier (fit)"
    )
    ax1.set(xscale="log", xlabel="compute C = 6ND (FLOPs)", ylabel="validation loss (nats/token)")
    ax1.legend()
    fig.colorbar(sc, ax=ax1, label="log10 parameters")
    for budget in np.logspace(math.log10(c.min()), math.log10(c.max() * 10), 5):
        opt = law.optimum(budget)
        ns = opt.params * np.logspace(-1, 1, 60)
        ax2.plot(ns, [law.loss(n, budget / (6 * n)) for n in ns], label=f"C={budget:.2g}")
        ax2.plot([opt.params], [law.loss(opt.params, opt.tokens)], "ko", ms=4)
    ax2.set(xscale="log", xlabel="parameters N", ylabel="loss (fit)", title="isoFLOP curves (dots: optimum)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    path = out / "scaling_fit.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _constant(name: str, law: ParametricLaw) -> float:
    return float(getattr(law, name))


def fit_report(runs: Sequence[str | Path], cfg: FitConfig) -> str:
    """Fit the runs in ``runs`` (folders) and describe the fit: the runs, the constants with bootstrap
    intervals, the compute-optimal tokens per parameter, and the predictions ``cfg`` asks for; with
    ``cfg.out``, write ``scaling_fit.png`` and ``fit.json`` there too."""
    points = [read_run(r) for r in runs]
    law = fit_law(points, starts=cfg.starts)
    band = (
        bootstrap(points, cfg.bootstrap, cfg.seed) if cfg.bootstrap and len(points) >= MIN_BOOTSTRAP else None
    )

    def ci(f: Callable[[ParametricLaw], float], fmt: str = "{:.4g}") -> str:
        if band is None:
            return fmt.format(f(law))
        lo, hi = band.interval(f)
        return f"{fmt.format(f(law))} [{fmt.format(lo)}, {fmt.format(hi)}]"

    lines = [f"{'run':<28}{'params':>9}{'tokens':>9}{'val_loss':>10}{'fit':>9}"]
    for p in points:
        lines.append(f"{p.name:<28}{_count(p.params):>9}{_count(p.tokens):>9}{p.loss:>10.4f}"
                     f"{law.loss(p.params, p.tokens):>9.4f}")  # fmt: skip
    note = (f" (95% bootstrap intervals over {cfg.bootstrap} refits)" if band else
            f" (no intervals: the bootstrap needs {MIN_BOOTSTRAP}+ runs)" if cfg.bootstrap else "")  # fmt: skip
    lines.append(f"L(N, D) = E + A / N^alpha + B / D^beta, fitted to {len(points)} runs{note}")
    for name in ("E", "A", "B", "alpha", "beta"):
        lines.append(f"  {name:<6}{ci(functools.partial(_constant, name))}")
    mid = 6 * float(np.exp(np.mean([math.log(p.params * p.tokens) for p in points])))
    lines.append(f"  compute-optimal tokens per parameter at C={mid:.3g}: "
                 f"{ci(lambda law: law.optimum(mid).tokens_per_param, '{:.1f}')}")  # fmt: skip
    report: dict[str, object] = {
        "law": dataclasses.asdict(law),
        "runs": [dataclasses.asdict(p) for p in points],
    }
    if cfg.predict_params is not None or cfg.predict_tokens is not None:
        if cfg.predict_params is None or cfg.predict_tokens is None:
            raise ConfigError("give both --predict-params and --predict-tokens to predict a run's loss")
        n, d = cfg.predict_params, cfg.predict_tokens
        lines.append(
            f"predicted loss of {_count(n)} params on {_count(d)} tokens: {ci(lambda law: law.loss(n, d))}"
        )
        report["prediction"] = {"params": n, "tokens": d, "loss": law.loss(n, d)}
    if cfg.held_out is not None:
        h = read_run(cfg.held_out)
        pred = law.loss(h.params, h.tokens)
        err = pred / h.loss - 1
        lines.append(f"held-out run {h.name} ({_count(h.params)} params, {_count(h.tokens)} tokens): predicted "
                     f"{ci(lambda law: law.loss(h.params, h.tokens))}, measured {h.loss:.4f} ({err:+.1%})")  # fmt: skip
        report["held_out"] = {**dataclasses.asdict(h), "predicted": pred, "error": err}
    if cfg.budget is not None:
        budget = cfg.budget
        o = law.optimum(budget)
        lines.append(f"budget {budget:.3g} FLOPs: N = {ci(lambda law: law.optimum(budget).params, '{:.3g}')}, "
                     f"D = {_count(o.tokens)}, loss {law.loss(o.params, o.tokens):.4f}")  # fmt: skip
    if cfg.out is not None:
        out = Path(cfg.out)
        lines.append(f"wrote {plot_fit(points, law, out)}")
        (out / "fit.json").write_text(json.dumps(report, indent=1) + "\n")
        lines.append(f"wrote {out / 'fit.json'}")
    return "\n".join(lines)
