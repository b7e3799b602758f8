"""Alignment step time: DPO and GRPO steps of lamina against TRL 1.16 (``DPOTrainer``, ``GRPOTrainer``) on
the same tiny random Llama (saved once as an HF folder with a word-level tokenizer: both load it), the
same data and batch, in the same process, alternating rounds, each side keeping its best time.

- DPO step: ``batch`` pairs of a ``prompt_len``-token prompt and two ``completion_len``-token completions
  (random ids), the sigmoid loss with beta 0.1, the reference a frozen copy; forward of the policy on
  the 2B rows, the reference's log-probs without gradients, backward, AdamW. lamina: the ``--task dpo``
  objective (``lamina.train.preference.dpo``); TRL: ``DPOTrainer.compute_loss`` on its collator's batch.
- GRPO step: ``prompts`` prompts x ``num_generations`` sampled completions of at most ``max_new``
  tokens (temperature 1), a cheap length reward, group advantages, beta 0.04 (so a reference forward),
  loss dapo, backward, AdamW. lamina: ``GenerationBatches.batch`` (generation with lamina's batched
  engine, scoring, reference) + ``grpo_objective``; TRL: ``GRPOTrainer.training_step`` (its default
  generation path: transformers ``generate``, then scoring, reference and loss).
- GRPO generation tokens/s: completion tokens per second of the generation alone: lamina's
  ``GenerationBatches.generate`` (the GRPO run's generation: ``generate_ids``, one request with
  n = num_generations per prompt) against ``GRPOTrainer._generate``. With ``--compile`` the GRPO config
  sets ``grpo.compile_generation``: generation runs on a merged copy of the policy (``MergedCopy``,
  refreshed from the policy before each generation, inside the timing) through ``lamina.model.aot``'s
  compiled decode step, for the GRPO steps too; the step is compiled once per architecture into lamina's
  compile cache (or loaded from it) at the first generation, a warm-up before any timing, its seconds
  printed apart; the eager engine's tokens/s (a run without ``compile_generation``) are printed too.

Targets (``headline:`` lines): DPO step >= 1.0x TRL (TRL's time over lamina's), GRPO step >= 1.0x TRL,
GRPO generation tokens/s >= 2x TRL.

    python benchmarks/align.py [--batch 4] [--prompt-len 64] [--completion-len 64] [--rounds 3]
    python benchmarks/align.py --quick      # a smaller model, 2 rounds of 2 steps
    python benchmarks/align.py --compile    # lamina's GRPO generation with grpo.compile_generation
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from common import headline, machine

VOCAB = 2000  # words w0 ... w1999 plus the special tokens


def _build(folder: Path, hidden: int, layers: int) -> None:
    """A random Llama and a word-level tokenizer, saved as an HF folder."""
    import torch
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                     unk_token="<unk>", pad_token="</s>")  # fmt: skip
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                         tie_word_embeddings=True)  # fmt: skip
    tf.LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)


def _best(times: list[float]) -> float:
    return min(times) if times else float("nan")


class Dpo:
    """One DPO step of each library on the same pairs."""

    def __init__(self, folder: Path, out: Path, batch: int, prompt_len: int, completion_len: int) -> None:
        import torch
        import transformers as tf
        from datasets import Dataset
        from trl import DPOConfig, DPOTrainer
        from trl.trainer.dpo_trainer import DataCollatorForPreference

        import lamina
        from lamina.data.preference import Pair, PreferenceBatches
        from lamina.train.preference import DpoConfig, dpo, reference

        g = torch.Generator().manual_seed(1)

        def ids(n: int) -> list[int]:
            return torch.randint(3, VOCAB + 3, (n,), generator=g).tolist()

        pairs = [Pair(ids(prompt_len), [*ids(completion_len - 1), 2], [*ids(completion_len - 1), 2],
                      [True] * completion_len, [True] * completion_len, f"row {i}") for i in range(batch)]  # fmt: skip
        self.batch = PreferenceBatches(pairs, batch, 0, pad_id=2).collate(range(batch))
        self.model = lamina.load(str(folder)).model.float().train()
        self.objective = dpo(DpoConfig(beta=0.1), reference(self.model, lora=False))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-6)
        hf = tf.LlamaForCausalLM.from_pretrained(folder).float()
        args = DPOConfig(output_dir=str(out / "dpo"), report_to=[], use_cpu=True, bf16=False, beta=0.1,
                         loss_type=["sigmoid"], precompute_ref_log_probs=False)  # fmt: skip
        ds = Dataset.from_dict({"prompt": ["w1 w2"], "chosen": [" w3"], "rejected": [" w4"]})
        tok = tf.AutoTokenizer.from_pretrained(folder)
        self.trainer = DPOTrainer(model=hf, ref_model=copy.deepcopy(hf).eval(), args=args, train_dataset=ds,
                                  processing_class=tok)  # fmt: skip
        self.inputs = DataCollatorForPreference(pad_token_id=2)(
            [{"prompt_ids": p.prompt, "chosen_ids": p.chosen, "rejected_ids": p.rejected} for p in pairs]
        )
        assert torch.equal(self.inputs["input_ids"], self.batch["input_ids"])  # the same rows
        self.hf, self.hf_opt = hf, torch.optim.AdamW(hf.parameters(), lr=1e-6)

    def lamina_step(self) -> float:
        t = time.perf_counter()
        loss, _ = self.objective(self.model, self.batch)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    def trl_step(self) -> float:
        t = time.perf_counter()
        self.hf.train()
        loss = self.trainer.compute_loss(self.hf, dict(self.inputs))
        loss.backward()
        self.hf_opt.step()
        self.hf_opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t


def length_reward(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
    """A cheap programmatic reward: closeness of the completion's word count to 10."""
    return [1.0 - min(abs(len(str(c).split()) - 10), 10) / 10 for c in completions]


class Grpo:
    """One GRPO step of each library (generation included) on the same prompts."""

    def __init__(
        self, folder: Path, out: Path, prompts: int, num_generations: int, max_new: int, compile: bool
    ) -> None:
        import torch
        import transformers as tf
        from datasets import Dataset
        from trl import GRPOConfig, GRPOTrainer

        import lamina
        from lamina.train.grpo import GenerationBatches, GrpoConfig, _reference, grpo_objective

        g = torch.Generator().manual_seed(2)
        texts = [" ".join(f"w{i}" for i in torch.randint(0, VOCAB, (16,), generator=g).tolist())
                 for _ in range(prompts * 4)]  # fmt: skip
        self.texts, self.G, self.max_new = texts, num_generations, max_new
        bs = prompts * num_generations
        lm = lamina.load(str(folder))
        self.model, self.tok = lm.model.float().train(), lm.tokenizer
        assert self.tok is not None
        cfg = GrpoConfig(reward_funcs=["length"], num_generations=num_generations, max_completion_length=max_new,
                         beta=0.04, loss_type="dapo", samples=0, compile_generation=compile)  # fmt: skip
        ids = [self.tok.encode(t) for t in texts]
        (out / "lamina").mkdir(parents=True, exist_ok=True)
        self.source = GenerationBatches(self.model, self.tok, texts, ids, [{} for _ in texts], cfg,
                                        [("length", length_reward)], _reference(self.model, False), bs, 1, 0,
                                        out / "lamina", [2])  # fmt: skip
        self.objective = grpo_objective(cfg, self.source)
        eager = GrpoConfig(**{**vars(cfg), "compile_generation": False})
        self.eager_source = GenerationBatches(self.model, self.tok, texts, ids, [{} for _ in texts], eager,
                                              [("length", length_reward)], None, bs, 1, 0, out / "lamina", [2])  # fmt: skip
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-6)
        self.step_index = 0
        args = GRPOConfig(output_dir=str(out / "grpo"), report_to=[], use_cpu=True, bf16=False,
                          num_generations=num_generations, per_device_train_batch_size=bs,
                          max_completion_length=max_new, beta=0.04, loss_type="dapo", temperature=1.0,
                          logging_steps=1)  # fmt: skip
        self.trainer = GRPOTrainer(model=str(folder), reward_funcs=[length_reward], args=args,
                                   train_dataset=Dataset.from_dict({"prompt": texts}),
                                   processing_class=tf.AutoTokenizer.from_pretrained(folder, padding_side="left"))  # fmt: skip
        self.trainer.create_optimizer()
        self.trainer.current_gradient_accumulation_steps = 1  # what Trainer.train sets
        self.trainer.model.train()
        self.loader = iter(self.trainer.get_train_dataloader())

    def lamina_step(self) -> float:
        t = time.perf_counter()
        batch = self.source.batch(self.step_index)
        self.step_index += 1
        loss, _ = self.objective(self.model, batch)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    def trl_step(self) -> float:
        try:
            inputs = next(self.loader)
        except StopIteration:
            self.loader = iter(self.trainer.get_train_dataloader())
            inputs = next(self.loader)
        t = time.perf_counter()
        self.trainer.training_step(self.trainer.model, inputs, None)
        self.trainer.optimizer.step()
        self.trainer.optimizer.zero_grad(set_to_none=True)
        self.trainer._step += 1
        return time.perf_counter() - t

    def lamina_generation(self, eager: bool = False) -> float:
        """Completion tokens/s of lamina's engine on the step's prompts, as the GRPO run generates
        (``GenerationBatches.generate``: with ``grpo.compile_generation`` the refresh of its merged copy
        and the compiled decode step) or, ``eager``, as a run without ``compile_generation``."""
        from lamina.config import GenerationConfig

        source = self.eager_source if eager else self.source
        prompts = [self.tok.encode(t) for t in self.texts[: self.source.per_batch]]
        cfg = GenerationConfig(n=self.G, temperature=1.0, max_new_tokens=self.max_new, seed=0)
        t = time.perf_counter()
        seqs = source.generate(prompts, [cfg] * len(prompts))
        dt = time.perf_counter() - t
        return sum(len(s.tokens) for s in seqs) / dt

    def trl_generation(self) -> float:
        """Completion tokens/s of GRPOTrainer's default generation path on the same prompts."""
        prompts = [p for p in self.texts[: self.source.per_batch] for _ in range(self.G)]
        t = time.perf_counter()
        out = self.trainer._generate(prompts)
        dt = time.perf_counter() - t
        return sum(len(c) for c in out[1]) / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4, help="DPO pairs per step")
    ap.add_argument("--prompt-len", type=int, default=64, help="DPO prompt tokens")
    ap.add_argument("--completion-len", type=int, default=64, help="DPO tokens per completion")
    ap.add_argument("--prompts", type=int, default=2, help="GRPO prompts per step")
    ap.add_argument("--num-generations", type=int, default=4, help="GRPO completions per prompt")
    ap.add_argument("--max-new", type=int, default=32, help="GRPO completion tokens at most")
    ap.add_argument("--hidden", type=int, default=256, help="the model's hidden size (64 per head)")
    ap.add_argument("--layers", type=int, default=4, help="the model's layers")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per round and side")
    ap.add_argument("--rounds", type=int, default=3, help="rounds alternating lamina and TRL")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="hidden 128, 2 layers, 2 rounds of 2 steps")
    ap.add_argument("--compile", action="store_true", help="GRPO generation with grpo.compile_generation")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    if args.quick:
        args.hidden, args.layers, args.steps, args.rounds = 128, 2, 2, 2
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import trl

    print(f"machine: {machine(args.threads)}")
    print(f"TRL {trl.__version__}; Llama hidden {args.hidden} x {args.layers} layers, vocab {VOCAB + 3}")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        _build(folder, args.hidden, args.layers)
        dpo = Dpo(folder, Path(tmp), args.batch, args.prompt_len, args.completion_len)
        grpo = Grpo(folder, Path(tmp), args.prompts, args.num_generations, args.max_new, args.compile)
        times: dict[str, list[float]] = {k: [] for k in ("dpo_lamina", "dpo_trl", "grpo_lamina", "grpo_trl")}
        gen: dict[str, list[float]] = {"lamina": [], "trl": [], "lamina_eager": []}
        t = time.perf_counter()
        grpo.lamina_generation()  # the run's first generation: compiles with grpo.compile_generation
        first = time.perf_counter() - t
        if args.compile:
            print(f"lamina's first GRPO generation (compiling or loading the decode step): {first:.1f} s")
        dpo.lamina_step(), dpo.trl_step(), grpo.lamina_step(), grpo.trl_step()  # warm-up
        for _ in range(args.rounds):
            times["dpo_lamina"] += [dpo.lamina_step() for _ in range(args.steps)]
            times["dpo_trl"] += [dpo.trl_step() for _ in range(args.steps)]
            times["grpo_lamina"] += [grpo.lamina_step() for _ in range(args.steps)]
            times["grpo_trl"] += [grpo.trl_step() for _ in range(args.steps)]
            gen["lamina"].append(grpo.lamina_generation())
            gen["trl"].append(grpo.trl_generation())
            if args.compile:
                gen["lamina_eager"].append(grpo.lamina_generation(eager=True))
    best = {k: _best(v) for k, v in times.items()}
    tps = {k: max(v) for k, v in gen.items() if v}
    results = {"step_s": best, "generation_tokens_per_s": tps, "args": vars(args)}
    print(f"DPO step ({args.batch} pairs, {args.prompt_len} + 2 x {args.completion_len} tokens): "
          f"lamina {best['dpo_lamina'] * 1e3:.1f} ms, TRL {best['dpo_trl'] * 1e3:.1f} ms")  # fmt: skip
    print(f"GRPO step ({args.prompts} prompts x {args.num_generations} completions <= {args.max_new} tokens): "
          f"lamina {best['grpo_lamina'] * 1e3:.1f} ms, TRL {best['grpo_trl'] * 1e3:.1f} ms")  # fmt: skip
    mode = "grpo.compile_generation" if args.compile else "eager"
    print(f"GRPO generation: lamina ({mode}) {tps['lamina']:.0f} tokens/s, TRL {tps['trl']:.0f} tokens/s")
    if "lamina_eager" in tps:
        print(f"  lamina eager (compile_generation off): {tps['lamina_eager']:.0f} tokens/s, "
              f"{tps['lamina_eager'] / tps['trl']:.2f}x TRL")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    headline("DPO step", best["dpo_trl"] / best["dpo_lamina"], "TRL DPOTrainer", 1.0)
    headline("GRPO step", best["grpo_trl"] / best["grpo_lamina"], "TRL GRPOTrainer", 1.0)
    what = "GRPO generation tokens/s" + (" (grpo.compile_generation)" if args.compile else "")
    headline(what, tps["lamina"] / tps["trl"], "TRL default generation", 2.0)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
