"""LoRA adapters on the server (vLLM's ``--lora-modules``): each adapter is a model name over its base,
listed with ``parent``; concurrent requests for the base and two adapters share the base's running
batch and each gets the greedy tokens it gets alone."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import peft
import pytest
import torch
import transformers as tf
from tiny_chat import tiny_tokenizer

import lamina
from lamina.checkpoint.peft import load_adaptable, load_with_adapter
from lamina.config import GenerationConfig
from lamina.errors import ConfigError
from lamina.generate.engine import Engine


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve_lora")
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    tf.LlamaForCausalLM(
        tf.LlamaConfig(
            vocab_size=tok.vocab_size, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
            num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
            eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
        )
    ).save_pretrained(root / "hf")  # fmt: skip
    tok.save(root / "hf")
    for name, seed, targets in [
        ("sql", 1, ["q_proj", "v_proj", "down_proj"]),
        ("poet", 2, ["k_proj", "o_proj"]),
    ]:
        torch.manual_seed(seed)
        cfg = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=targets)
        model = peft.get_peft_model(tf.LlamaForCausalLM.from_pretrained(root / "hf"), cfg)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.mul_(0.3)
        model.save_pretrained(root / name)
    return {"hf": root / "hf", "sql": root / "sql", "poet": root / "poet"}


def _alone(model: Any, ids: list[int], n: int) -> list[int]:
    engine = Engine(model, max_batch_size=1)
    (seq,) = engine.submit(ids, GenerationConfig(temperature=0.0, max_new_tokens=n, ignore_eos=True))
    while engine.has_work():
        engine.step()
    return seq.tokens


def test_adapters_are_models_over_their_base_and_mix_in_one_batch(folders: dict[str, Path]) -> None:
    from lamina.serve import BackgroundServer, ServeConfig

    lm = load_adaptable(folders["hf"])
    poet = json.dumps({"name": "poet", "path": str(folders["poet"]), "base_model_name": "tiny"})
    modules = [f"sql={folders['sql']}", poet]  # vLLM's two forms
    config = ServeConfig(timeout=60.0, lora_modules=modules)
    prompts = [[3, 4, 5], [6, 7, 8, 9], [10, 11], [12, 3, 4, 5, 6]]
    names = ["tiny", "sql", "poet"]
    want = {
        "tiny": lambda p: _alone(lamina.load(folders["hf"]).model, p, 8),
        "sql": lambda p: _alone(load_with_adapter(folders["hf"], folders["sql"], merge=False).model, p, 8),
        "poet": lambda p: _alone(load_with_adapter(folders["hf"], folders["poet"], merge=False).model, p, 8),
    }
    jobs = [(names[i % 3], prompts[i % 4]) for i in range(9)]
    with BackgroundServer({"tiny": lm}, config) as server:
        listed = httpx.get(server.url + "/v1/models").json()["data"]
        cards = {m["id"]: m for m in listed}
        assert set(cards) == set(names)
        assert cards["sql"]["parent"] == "tiny" and cards["sql"]["root"] == str(folders["sql"])
        assert cards["tiny"]["parent"] is None
        assert httpx.get(server.url + "/v1/models/tiny:sql").json()["id"] == "sql"  # BASE:ADAPTER works too
        assert httpx.get(server.url + "/v1/models/poet:sql").status_code == 404

        def ask(job: tuple[str, list[int]]) -> str:
            body = {"model": job[0], "prompt": job[1], "max_tokens": 8, "temperature": 0, "ignore_eos": True}
            r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            return str(r.json()["choices"][0]["text"])

        with ThreadPoolExecutor(9) as pool:
            got = list(pool.map(ask, jobs))
    tok = lm.tokenizer
    text = [" ".join(tok.decode(want[name](p), skip_special_tokens=True).split()) for name, p in jobs]
    assert [" ".join(t.split()) for t in got] == text
    assert len({tuple(want[n](prompts[1])) for n in names}) == 3  # the three models differ


def test_bad_lora_modules_are_refused(folders: dict[str, Path]) -> None:
    from lamina.serve import Registry, ServeConfig

    with pytest.raises(ConfigError, match="NAME=PATH"):
        ServeConfig(lora_modules=["sql"])
    with pytest.raises(ConfigError, match="twice"):
        ServeConfig(lora_modules=["a=x", "a=y"])
    with pytest.raises(ConfigError, match="speculative_layers"):
        ServeConfig(lora_modules=["a=x"], speculative_layers=1)
    registry = Registry(ServeConfig())
    registry.add("tiny", lamina.load(folders["hf"], weights="int8"))
    with pytest.raises(ConfigError, match="fused"):
        registry.add_adapter("sql", str(folders["sql"]))
    with pytest.raises(ConfigError, match="not a served generation model"):
        registry.add_adapter("sql", str(folders["sql"]), base="nope")
