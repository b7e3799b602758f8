"""``lamina ask "question" [--index FILE] [--model smollm2] [--show-sources]``: an answer from an index,
streamed, with numbered citations, then the sources they point to."""

from __future__ import annotations

import argparse
import sys

from lamina.cli.flags import HelpFormatter, add_config_file, add_fields, values
from lamina.fields import build
from lamina.rag.ask import DEFAULT_MODEL, AskResult, ask
from lamina.rag.retrieve import RetrieveConfig
from lamina.rag.synthesize import Citation, SynthesizeConfig
from lamina.rag.types import FILTERS_HELP


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``ask`` verb; every ``RetrieveConfig`` and ``SynthesizeConfig`` field is a flag."""
    p = sub.add_parser(
        "ask",
        help="answer a question from an index (lamina index) with numbered citations, streamed",
        description="Retrieve the passages of the index that answer QUESTION (--mode: dense by default; "
        "bm25; hybrid, both fused), have a chat model answer from them citing [1], [2], ..., stream the answer, then list "
        "the cited sources (document, character span, page). Nothing retrieved (or nothing above "
        "--score-threshold): 'Not found in the sources.' without running the model. --filters: "
        + FILTERS_HELP
        + ".",
        epilog="examples: lamina index --builtin stdlib-docs\n"
        '  lamina ask "How do I read a CSV file with a header row?" --show-sources\n'
        '  lamina ask "What does shutil.rmtree do?" --mode bm25 --k 3 --max-new-tokens 80',
        formatter_class=HelpFormatter,
    )
    p.add_argument("question", metavar="QUESTION", help="the question")
    p.add_argument(
        "--index",
        "--store",  # the name `lamina index` writes it under (its --store)
        dest="index",
        metavar="FILE",
        help="the index: a SQLite file or a postgresql:// URL, as `lamina index --store` wrote it "
        "(default: where `lamina index` writes)",
    )
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        metavar="MODEL",
        help=f"the chat model that writes the answer (default: {DEFAULT_MODEL})",
    )
    p.add_argument(
        "--show-sources",
        action="store_true",
        help="also print every passage retrieved, with its score and text",
    )
    add_config_file(p)
    add_fields(p, RetrieveConfig, title="retrieval (RetrieveConfig)")
    add_fields(p, SynthesizeConfig, title="answer (SynthesizeConfig)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Stream the answer to stdout, then its sources; a note on stderr for dropped citations."""
    retrieve_cfg = build(RetrieveConfig, values(args, RetrieveConfig))
    synth_cfg = build(SynthesizeConfig, values(args, SynthesizeConfig))
    streamed: list[str] = []

    def show(delta: str) -> None:
        streamed.append(delta)
        sys.stdout.write(delta)
        sys.stdout.flush()

    result = ask(args.question, args.index, args.model, retrieve_cfg, synth_cfg, stream=show)
    if not streamed:  # not found (no model call), or nothing streamed
        sys.stdout.write(result.answer.text)
    sys.stdout.write("\n")
    print_sources(result, args.show_sources)
    if result.answer.dropped_citations:
        n = result.answer.dropped_citations
        print(
            f"{n} citation{'' if n == 1 else 's'} to passages the model was not shown dropped "
            f"(it saw [1]..[{len(result.answer.sources)}])",
            file=sys.stderr,
        )
    return 0


def where(c: Citation) -> str:
    """``csv.DictReader, chars 0-120, page 3``."""
    page = f", page {c.page}" if c.page is not None else ""
    return f"{c.doc_id}, chars {c.start}-{c.end}{page}"


def print_sources(result: AskResult, show_all: bool) -> None:
    """The cited sources (or, when the answer cites none, the passages it was shown); with ``show_all``
    every retrieved passage with its score and an excerpt."""
    answer = result.answer
    if not answer.found:
        return
    cited = answer.citations
    print("\nSources:" if cited else "\nSources shown to the model (the answer cites none):")
    for c in cited or answer.sources:
        print(f"[{c.number}] {where(c)}")
    if show_all:
        print("\nRetrieved passages:")
        shown = {s.chunk_id: s.number for s in answer.sources}
        for h in result.hits:
            number = shown.get(h.chunk.chunk_id)
            tag = f"[{number}]" if number else "(not in the prompt)"
            excerpt = " ".join(h.chunk.text.split())[:300]
            print(
                f"{h.rank}. {tag} {h.chunk.doc_id} (score {h.score:.4f}, chars {h.chunk.start}-{h.chunk.end})"
            )
            print(f"   {excerpt}")
