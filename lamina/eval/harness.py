"""lm-evaluation-harness model ``lamina``: any lamina-loadable model under lm-eval's own tasks and CLI.

lm-eval 0.4.x finds ``--model`` names in its registry before it imports any plugin, and (checked in
0.4.13) reads no entry points for models, so this module is also the CLI: it registers ``lamina`` and runs
lm-eval's command line with the same arguments::

    python -m lamina.eval.harness --model lamina --model_args pretrained=smollm2 \\
        --tasks arc_easy --include_path local_tasks/ --limit 100

In Python, ``import lamina.eval.harness`` registers the model for ``lm_eval.simple_evaluate(model="lamina",
...)``, or pass ``LaminaLM(...)`` as the model object.

``loglikelihood`` scores (context, continuation) pairs as the ``hf`` backend does (lm-eval's
``TemplateLM`` encodes them), with every request of one context scored after one pass over it
(``lamina.eval.multiple_choice.score_continuations``). ``loglikelihood_rolling`` uses lm-eval's rolling
windows (prefix token, ``max_length`` tokens each). ``generate_until`` decodes greedily on lamina's batched
engine and cuts the text at the first stop string, and cuts a context longer than ``max_length -
max_gen_toks`` tokens from the left, as the ``hf`` backend does
(``lamina.eval.generation_tasks.generate_greedy``).

A running ``lamina serve`` is evaluated with lm-eval's own ``local-completions`` model instead (no lamina
install needed on the client)::

    lm_eval --model local-completions --model_args \\
        model=smollm2,base_url=http://localhost:8000/v1/completions,tokenizer_backend=huggingface,tokenizer=HF_DIR \\
        --tasks arc_easy
"""

from __future__ import annotations

import sys
from collections import defaultdict
from typing import Any

from lamina.eval.generation_tasks import MAX_BATCH_SIZE
from lamina.eval.seq2seq import MissingExtraError

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError:  # pragma: no cover - the message is the point
    raise MissingExtraError(
        "lm-evaluation-harness is not installed; the lamina lm-eval model needs it: pip install 'lamina[eval]'"
    ) from None


@register_model("lamina")
class LaminaLM(TemplateLM):
    """lm-eval's ``LM`` over a lamina model. ``pretrained``: a model name or path (``lamina.load``);
    ``dtype``, ``device``: as ``lamina.load``; ``batch_size``: sequences generated together;
    ``batch_tokens``: tokens scored in one forward batch; ``max_gen_toks``: generation default."""

    backend = "causal"

    def __init__(
        self,
        pretrained: Any = "smollm2",
        dtype: str = "fp32",
        device: str = "cpu",
        batch_size: int | str = MAX_BATCH_SIZE,
        batch_tokens: int = 2048,
        max_gen_toks: int = 256,
        max_length: int | None = None,
        **_: Any,
    ) -> None:
        super().__init__()
        import torch

        import lamina

        if str(device).startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"  # lm-eval's CLI passes --device cuda by default; its hf backend falls back too
        dtype = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "auto": "fp32"}.get(dtype, dtype)
        self.lm = (
            pretrained
            if isinstance(pretrained, lamina.LoadedModel)
            else lamina.load(pretrained, dtype, device)
        )
        if self.lm.tokenizer is None:
            raise lamina.ConfigError(f"model {pretrained!r} has no tokenizer; lm-eval needs one")
        self.tokenizer = self.lm.tokenizer
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else MAX_BATCH_SIZE  # ("auto")
        self.batch_tokens = int(batch_tokens)
        self.max_gen_toks = int(max_gen_toks)
        self._max_length = int(max_length) if max_length else self.lm.model.config.max_seq_len

    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return int(eos if eos is not None else self.lm.generation.eos_token_ids[0])

    @property
    def prefix_token_id(self) -> int:
        from lamina.eval.multiple_choice import prefix_token_id

        return prefix_token_id(self.lm)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.lm.entry.name.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **_: Any) -> list[int]:
        return self.tokenizer.encode(
            string, add_special_tokens=True if add_special_tokens is None else add_special_tokens
        )

    def tok_decode(self, tokens: Any, skip_special_tokens: bool = True) -> str:
        ids = [tokens] if isinstance(tokens, int) else list(tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
        disable_tqdm: bool = False,
        **kwargs: Any,
    ) -> list[tuple[float, bool]]:
        from lamina.eval.multiple_choice import score_continuations

        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)  # one pass per distinct context
        for i, request in enumerate(requests):
            groups[tuple(request[1])].append(i)
        keys = list(groups)
        scored = score_continuations(
            self.lm.model, [(list(k), [requests[i][2] for i in groups[k]]) for k in keys], self.batch_tokens
        )
        out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for k, results in zip(keys, scored, strict=True):
            for i, r in zip(groups[k], results, strict=True):
                out[i] = r
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], r)
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils

        windows: list[tuple[tuple[str, str] | None, list[int], list[int]]] = []
        owners = []
        for n, req in enumerate(requests):
            (string,) = req.args
            for w in map(
                utils.make_disjoint_window,
                utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1,
                ),
            ):  # fmt: skip
                windows.append((None, w[0], w[1]))
                owners.append(n)
        scores = self._loglikelihood_tokens(windows)
        totals = [0.0] * len(requests)
        for n, (ll, _) in zip(owners, scores, strict=True):
            totals[n] += ll
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

        from lamina.eval.generation_tasks import generate_greedy

        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        contexts, stops, budgets = [], [], []
        for req in requests:  # the hf backend's reading of until / max_gen_toks (and its aliases)
            context, gen_kwargs = req.args
            kwargs = normalize_gen_kwargs(dict(gen_kwargs or {}), self.max_gen_toks)
            contexts.append(context)
            stops.append(handle_stop_sequences(kwargs.pop("until", None), eos=eos))
            budgets.append(int(kwargs.pop("max_gen_toks")))
        out = generate_greedy(self.lm, contexts, stops, budgets, self.max_length, self.batch_size)
        for req, text in zip(requests, out, strict=True):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return out


def main(argv: list[str] | None = None) -> None:
    """lm-eval's CLI with the ``lamina`` model registered (``python -m lamina.eval.harness ...``)."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
