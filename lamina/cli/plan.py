"""``lamina plan --flops C | --hours H | --params N``: compute-optimal size and tokens, a config, its memory."""

from __future__ import annotations

import argparse

from lamina.analysis.plan import PlanConfig
from lamina.cli.flags import add_config_file, add_fields, values
from lamina.fields import build


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``plan`` verb."""
    p = sub.add_parser(
        "plan",
        help="plan a training run: compute-optimal parameters and tokens for a FLOP budget (Chinchilla), a "
        "config that size, its memory",
        description="For a FLOP budget (--flops), or device-hours (--hours, at --flops-per-second or this "
        "machine's measured matmul peak x --mfu), print the compute-optimal parameter and token counts of "
        "Chinchilla's approaches 1, 2 and 3 (the paper's constants and Besiroglu et al. 2024's refit) and "
        "Kaplan et al. 2020 for comparison, the loss --law predicts, a lamina ModelConfig of that size and "
        "its inference and training memory. --params N answers the reverse: the budget at which N is "
        "optimal. C = 6 N D; N counts every parameter.",
        epilog="examples: lamina plan --flops 5.76e23 | lamina plan --params 135M | lamina plan --hours 24",
    )
    add_config_file(p)
    add_fields(p, PlanConfig, title="plan (PlanConfig)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the plan."""
    from lamina.analysis.plan import plan

    print(plan(build(PlanConfig, values(args, PlanConfig))).text())
    return 0
