"""``lamina finetune --task classify --data train.csv --init MODEL``: train a task head on labeled text
(``--task regress``; ``--task token_classify --data conll.jsonl`` for tagging); ``--task sft --data
chat.jsonl --init MODEL``: supervised fine-tuning of a language model on conversations; ``--task reward``
and ``--task dpo --data prefs.jsonl``: a reward model or preference tuning from prompt/chosen/rejected pairs;
``--task grpo --data prompts.jsonl``: RL from rewards of sampled completions;
``--task seq2seq --data pairs.jsonl``: an encoder-decoder on source/target pairs."""

from __future__ import annotations

import argparse

from lamina.cli.flags import (
    HelpFormatter,
    add_alias,
    add_config_file,
    add_fields,
    add_top_level,
    merged,
    print_config,
)
from lamina.cli.pretrain import _overwrite
from lamina.config import TRAIN_PRESETS, TrainConfig
from lamina.train.distributed import keep_freed_memory_on_cpu
from lamina.train.finetune import SECTIONS as RUN_SECTIONS
from lamina.train.finetune import FinetuneRun, TaskConfig, finetune

# the run config's sections, from the library's one table (init has its own flag)
SECTIONS: dict[str, type] = {k: v for k, v in RUN_SECTIONS.items() if v is not None}


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``finetune`` verb: one flag per field of the run config's sections."""
    p = sub.add_parser(
        "finetune",
        formatter_class=HelpFormatter,
        help="fine-tune a task head on labeled data, or a language model on chat data (--task sft), a "
        "reward model (--task reward), DPO (--task dpo), GRPO (--task grpo) or an encoder-decoder on source/target "
        "pairs (--task seq2seq)",
        description="Put a fresh task head on MODEL (--init) or on a model built from --model.* flags, "
        "and train on --data (CSV with a header or JSONL; columns --task.text_field [text], "
        "--task.pair_field for sentence pairs, and --task.label_field [label]; for token_classify, JSONL "
        "with a list of words --task.tokens_field [tokens] and one tag per word --task.tags_field [tags]). "
        "Reports loss, accuracy and macro F1 (or MSE; token_classify: token accuracy, macro F1 and, for "
        "IOB tags, entity F1) on held-out rows after every epoch. --task sft trains a language model on "
        "JSONL conversations (OpenAI messages, prompt/completion or Alpaca instruction/input/output) "
        "rendered with its chat template, the loss on the answers only (--sft.loss_on all: every token); "
        "every evaluation writes greedy answers to a few held-out prompts to OUT/samples.jsonl; any "
        "--lora.* flag (--lora.r 16 --lora.target_modules all-linear) trains LoRA adapters only, saved in "
        "PEFT's format in each checkpoint's adapter/ folder. --task reward and --task dpo read JSONL "
        "prompt/chosen/rejected pairs (strings or message lists): reward trains a scalar head with the "
        "Bradley-Terry loss and reports held-out pairwise accuracy; dpo trains the policy against the frozen "
        "start (with LoRA: the base, adapters disabled) with --dpo.loss sigmoid|ipo|hinge|robust|simpo and "
        "--dpo.beta, reporting rewards/chosen, rewards/rejected, rewards/accuracies and rewards/margins. "
        "--task grpo reads JSONL prompts (--grpo.prompt_field [prompt], a string or a message list), samples "
        "--grpo.num_generations completions per prompt with lamina's engine, scores them with "
        "--grpo.reward_funcs (module:function or file.py:function with TRL's signature f(prompts, "
        "completions, **kwargs) -> list[float], or a reward model folder; --grpo.reward_weights) and trains "
        "on group-normalised advantages (--grpo.beta, --grpo.epsilon, --grpo.loss_type, "
        "--grpo.num_iterations); reward mean/std, KL and clip ratio go to metrics.jsonl every step, "
        "completions to OUT/samples.jsonl. "
        "--task seq2seq trains an encoder-decoder (--init a T5 model, or --model.preset t5-tiny with "
        "--task.tokenizer) on source/target pairs (TSV/CSV with a header or JSONL; --seq2seq.source_field "
        "[source], --seq2seq.target_field [target]) and reports validation BLEU, chrF and ROUGE of greedy "
        "outputs at every evaluation. Freeze layers with --train.freeze "
        "'[0-3]' (block indices) or name globs ('[tok_emb.*]'). The train section starts from the "
        "`finetune` preset (3 epochs, lr 5e-5, no warmup). Every field is a flag --SECTION.FIELD and a "
        "key of the --config YAML file; flags win over the file.",
        epilog="examples:\n  lamina finetune --task classify --data examples/reviews.csv --init minilm "
        "--train.epochs 3 --out runs/sentiment\n  lamina finetune --task sft --data chat.jsonl --init smollm2 "
        "--task.max_seq_len 512 --out runs/chat\n  lamina finetune --task dpo --data prefs.jsonl --init smollm2 "
        "--dpo.beta 0.1 --lora.r 16 --out runs/dpo\n  lamina finetune --task grpo --data prompts.jsonl --init smollm2 "
        "--grpo.reward_funcs '[rewards.py:brevity]' --grpo.num_generations 8 --out runs/grpo\n  lamina finetune --task seq2seq --data pairs.jsonl "
        "--model.preset t5-tiny --task.tokenizer tokenizer.json --train.lr 3e-3 --out runs/t5",
    )
    add_config_file(p)
    p.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in the output folder"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a run already in the output folder")
    add_alias(p, "--task", TaskConfig, "task", "task")
    add_alias(p, "--data", TaskConfig, "data", "task")
    add_alias(p, "--out", TrainConfig, "out_dir", "train")
    add_top_level(p, "--init", "init", "the MODEL to fine-tune (its tokenizer too)", "MODEL")
    for section, cls in SECTIONS.items():  # the train section starts from the finetune preset
        add_fields(p, cls, section, defaults=TRAIN_PRESETS["finetune"] if cls is TrainConfig else None)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build the run from file + flags, fine-tune, and print the last evaluation."""
    run_config = FinetuneRun.from_dict(merged(args, SECTIONS))
    if args.print_config:
        print_config(run_config.to_dict())
        return 0
    keep_freed_memory_on_cpu(run_config.train.device)  # a CPU run owns this process: keep what steps free
    _, _, result = finetune(run_config, resume=args.resume, **_overwrite(args))
    if result.is_main:  # under torchrun, rank 0 alone
        print(result.summary())
    return 0
