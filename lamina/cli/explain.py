"""``lamina explain MODEL "text"``: attention maps, logit lens and surprisal as PNGs and a table."""

from __future__ import annotations

import argparse

from lamina.analysis.explain import ExplainConfig
from lamina.cli.flags import add_config_file, add_fields, values
from lamina.fields import build


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``explain`` verb."""
    p = sub.add_parser(
        "explain",
        help="look inside a model on a text: attention maps, logit lens and per-token surprisal (PNGs)",
        description="Run MODEL on TEXT and write into --out: attention_grid.png (every layer and head), "
        "attention_L{layer}_H{head}.png (one head at full size with token labels), logit_lens.png (each "
        "layer's top next token through the final norm and LM head, coloured by its probability) and "
        "surprisal.png; print a table of each token's surprisal in bits and the logit lens at the first, "
        "middle and last layer.",
        epilog='example: lamina explain smollm2 "The capital of France is Paris." --out explain/ --layer 20',
    )
    p.add_argument("model", metavar="MODEL", help="model path or name (e.g. smollm2)")
    p.add_argument("text", metavar="TEXT", help="the text to explain")
    add_config_file(p)
    add_fields(p, ExplainConfig, title="explain (ExplainConfig)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Explain and print."""
    import lamina
    from lamina.analysis.explain import explain, figures

    cfg = build(ExplainConfig, values(args, ExplainConfig))
    lm = lamina.load(args.model)
    ex = explain(lm, args.text, cfg.max_tokens)
    print(ex.table(lm.tokenizer))
    for path in figures(ex, cfg.out, lm.tokenizer, cfg.layer, cfg.head):
        print(f"wrote {path}")
    return 0
