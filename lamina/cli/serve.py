"""``lamina serve MODEL [MODEL ...]``: an OpenAI-compatible HTTP server with continuous batching."""

from __future__ import annotations

import argparse

from lamina.checkpoint.load import LoadOptions
from lamina.checkpoint.peft import AdapterOptions
from lamina.cli.flags import add_alias, add_config_file, add_fields, values
from lamina.cli.generate import add_adapter_flags, add_model_flags, load_from_args
from lamina.errors import ConfigError
from lamina.fields import build
from lamina.malloc import set_malloc_policy
from lamina.serve.settings import ServeConfig


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
        "(top_k, min_p, repetition_penalty, stop_token_ids, ...). With --index PATH (an index of lamina "
        "index): POST /v1/retrieve, and chat completions with the extra field rag answered from the index "
        "with numbered citations (sources, citations).",
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
        "--served-model-name",
        action="append",
        default=None,
        metavar="NAME",
        help="the name clients use for the MODEL at the same position (repeat per MODEL)",
    )
    add_config_file(p)
    add_fields(p, ServeConfig, title="server (ServeConfig)")
    add_alias(p, "--api-key", ServeConfig, "api_keys", metavar="KEY", append=True)
    add_model_flags(p)
    add_adapter_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load the models and serve them until interrupted."""
    try:
        from lamina.serve import serve
    except ImportError as e:
        raise ConfigError(f"lamina serve needs the serve extra: pip install 'lamina[serve]' ({e})") from None

    names = args.served_model_name or []
    if len(names) > len(args.models):
        raise ConfigError(
            f"{len(names)} --served-model-name for {len(args.models)} MODEL arguments: give at most one per MODEL"
        )
    given = values(args, ServeConfig)
    if "api_keys" not in given:  # the environment's keys, when no flag or file names any
        given["api_keys"] = ServeConfig.env_api_keys()
    config = build(ServeConfig, given)
    adapter = build(AdapterOptions, values(args, AdapterOptions))
    if adapter.lora is not None and (len(args.models) > 1 or config.lora_modules):
        raise ConfigError(
            "--lora puts one adapter on the one MODEL; serve several adapters by name with --lora-modules NAME=PATH"
        )
    if config.lora_modules and build(LoadOptions, values(args, LoadOptions)).compile:
        raise ConfigError("--compile does not run with --lora-modules yet; leave one of them out")
    models = {}
    for i, model in enumerate(args.models):
        name = names[i] if i < len(names) else model
        models[name] = load_from_args(args, model, lora=True, adaptable=bool(config.lora_modules))
    set_malloc_policy("release")  # this process is the server: free memory goes back (after loading)
    serve(models, config, log_level=config.log_level)
    return 0
