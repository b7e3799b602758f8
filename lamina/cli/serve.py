"""``lamina serve MODEL [MODEL ...]``: an OpenAI-compatible HTTP server with continuous batching."""

from __future__ import annotations

import argparse

from lamina.cli.generate import add_model_flags, load_from_args
from lamina.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``serve`` verb (fastapi and uvicorn are imported only when it runs)."""
    p = sub.add_parser(
        "serve",
        help="serve models over an OpenAI-compatible HTTP API (completions, chat, embeddings)",
        description="Serve MODEL over HTTP with OpenAI's API, so the openai client, LangChain, LlamaIndex "
        "and lm-evaluation-harness talk to it unchanged: GET /v1/models, POST /v1/completions, "
        "POST /v1/chat/completions (streaming, n, stop, penalties, logprobs, seed, response_format "
        "json_object), POST /v1/embeddings (encoder models such as minilm), GET /health, GET /metrics "
        "(Prometheus), /docs (OpenAPI). Concurrent requests are decoded together in one running batch "
        "(continuous batching). Requests may also carry lamina's decoding controls as extra fields "
        "(top_k, min_p, repetition_penalty, stop_token_ids, ...).",
        epilog="example: lamina serve smollm2 --port 8000, then "
        "openai.OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='none')",
    )
    p.add_argument(
        "models",
        metavar="MODEL",
        nargs="+",
        help="path, models-directory name or packaged name (e.g. smollm2; minilm for embeddings); "
        "each is served under the name given here unless --served-model-name renames it",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 listens on every interface)",
    )
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--api-key",
        action="append",
        default=None,
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on /v1/* (repeat for several keys; default: the "
        "comma-separated keys of $LAMINA_API_KEY, or none: no authentication)",
    )
    p.add_argument(
        "--served-model-name",
        action="append",
        default=None,
        metavar="NAME",
        help="the name clients use for the MODEL at the same position (repeat per MODEL)",
    )
    p.add_argument("--max-batch-size", type=int, default=32, help="sequences decoded together (default 32)")
    p.add_argument(
        "--max-tokens-in-flight",
        type=int,
        default=None,
        help="limit on prompt + completion tokens of the running sequences (default: none)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=256,
        help="requests waiting to join the batch; beyond it clients get 429 + Retry-After (default 256)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds from a request's arrival to its last token, else 504 (default 600; 0 = none)",
    )
    p.add_argument("--max-n", type=int, default=16, help="largest n per request (default 16)")
    p.add_argument(
        "--max-request-bytes", type=int, default=4 * 1024 * 1024, help="largest request body (default 4 MiB)"
    )
    add_model_flags(p)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn's log level (default info)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load the models and serve them until interrupted."""
    try:
        from lamina.serve import ServeConfig, serve
    except ImportError as e:
        raise ConfigError(f"lamina serve needs the serve extra: pip install 'lamina[serve]' ({e})") from None
    import torch

    names = args.served_model_name or []
    if len(names) > len(args.models):
        raise ConfigError(
            f"{len(names)} --served-model-name for {len(args.models)} MODEL arguments: give at most one per MODEL"
        )
    config = ServeConfig(
        host=args.host,
        port=args.port,
        api_keys=args.api_key if args.api_key is not None else ServeConfig.env_api_keys(),
        max_batch_size=args.max_batch_size,
        max_tokens_in_flight=args.max_tokens_in_flight,
        max_queue=args.max_queue,
        timeout=args.timeout or None,
        max_n=args.max_n,
        max_request_bytes=args.max_request_bytes,
    )
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    models = {}
    for i, model in enumerate(args.models):
        name = names[i] if i < len(names) else model
        models[name] = load_from_args(args, model)
    serve(models, config, log_level=args.log_level)
    return 0
