"""`lethe serve`'s engine options as vLLM users know them: the model as a positional, vLLM's flags overriding their
LETHE_* settings, and any other engine argument after `--`, read by vLLM's own parser; all of it reaches the
``AsyncEngineArgs`` the engine is built from, and what Lethe must set itself is refused (no engine is started)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.main import build_parser, parse_args
from cli.serve import resolve_model, serve_settings
from server.config import Settings
from server.engine import engine_args


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    (tmp_path / "my-model").mkdir()
    (tmp_path / "my-model" / "config.json").write_text("{}")
    return tmp_path / "my-model"


def serve(*argv: str, settings: Settings | None = None):
    """The ``AsyncEngineArgs`` that ``lethe serve ARGV`` would start its engine with."""
    args = parse_args(build_parser(), ["serve", *argv])
    chosen = serve_settings(settings or Settings(_env_file=None), args)
    path, name = resolve_model(chosen, args.model)
    return engine_args(chosen, path, name)


def test_the_model_is_a_positional_or_the_model_option(model_dir: Path) -> None:
    parser = build_parser()
    assert parse_args(parser, ["serve", str(model_dir)]).model == str(model_dir)
    assert parse_args(parser, ["serve", "--model", str(model_dir)]).model == str(model_dir)
    assert parse_args(parser, ["serve", str(model_dir), "--model", str(model_dir)]).model == str(model_dir)
    assert parse_args(parser, ["serve"]).model is None
    assert serve(str(model_dir)).model == str(model_dir)


def test_two_different_models_are_an_argparse_error(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args(build_parser(), ["serve", str(model_dir), "--model", "/elsewhere"])
    assert exited.value.code == 2
    assert "the model is given twice" in capsys.readouterr().err


def test_each_engine_flag_reaches_the_engine(model_dir: Path) -> None:
    args = serve(str(model_dir), "--served-model-name", "public", "--max-model-len", "4096", "--dtype", "float16",
                 "--tensor-parallel-size", "2", "--gpu-memory-utilization", "0.5", "--max-num-seqs", "8",
                 "--no-enforce-eager")
    assert (args.served_model_name, args.max_model_len, args.dtype, args.tensor_parallel_size,
            args.gpu_memory_utilization, args.max_num_seqs, args.enforce_eager) == \
        ("public", 4096, "float16", 2, 0.5, 8, False)
    assert serve(str(model_dir), "-tp", "4", "--enforce-eager",
                 settings=Settings(enforce_eager=False)).tensor_parallel_size == 4


def test_flags_override_their_settings_which_apply_otherwise(model_dir: Path) -> None:
    settings = Settings(served_model_name="from-env", max_model_len=2048, dtype="bfloat16", tensor_parallel_size=2,
                        gpu_memory_utilization=0.7, max_num_seqs=4, enforce_eager=False)
    from_settings = serve(str(model_dir), settings=settings)
    assert (from_settings.served_model_name, from_settings.max_model_len, from_settings.dtype,
            from_settings.tensor_parallel_size, from_settings.gpu_memory_utilization, from_settings.max_num_seqs,
            from_settings.enforce_eager) == ("from-env", 2048, "bfloat16", 2, 0.7, 4, False)
    flagged = serve(str(model_dir), "--max-model-len", "512", "--served-model-name", "flag", settings=settings)
    assert (flagged.max_model_len, flagged.served_model_name, flagged.max_num_seqs) == (512, "flag", 4)


def test_the_served_name_defaults_to_the_directory_name_never_its_path(model_dir: Path) -> None:
    # vLLM labels its metrics with it (`model_name`): the path on disk stays off /metrics.
    assert serve(str(model_dir)).served_model_name == "my-model"


@pytest.mark.parametrize("flag", [["--max-model-len", "8"], ["--max-model-len", "long"], ["-tp", "0"],
                                  ["--gpu-memory-utilization", "1.5"], ["--max-num-seqs", "0"]])
def test_a_flag_is_checked_like_its_setting(flag: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args(build_parser(), ["serve", *flag])
    assert exited.value.code == 2 and "argument" in capsys.readouterr().err


def test_unflagged_options_are_lethes_own_and_vllms_defaults(model_dir: Path) -> None:
    args = serve(str(model_dir))
    assert args.enable_lora and args.enable_prompt_embeds and args.logprobs_mode == "processed_logprobs"
    assert args.logits_processors == ["guards.processor:LetheLogitsProcessor"]
    assert args.disable_log_stats  # vLLM's stats line; its Prometheus logger is handed over at start
    assert (args.max_model_len, args.max_num_seqs, args.enforce_eager, args.tensor_parallel_size) == (1024, 32, True, 1)
    assert args.gpu_memory_utilization == 0.92 and args.enable_prefix_caching is None  # vLLM's own defaults


def test_arguments_after_a_double_dash_are_read_by_vllms_parser(model_dir: Path) -> None:
    args = serve(str(model_dir), "--port", "9000", "--", "--enable-prefix-caching", "--max-num-batched-tokens", "4k",
                 "--seed=7", "--block_size", "32")
    assert args.enable_prefix_caching is True
    assert args.max_num_batched_tokens == 4000  # vLLM's human-readable integers
    assert args.seed == 7 and args.block_size == 32  # `=` and underscores, as vLLM takes them
    assert serve(str(model_dir), "--", "--no-enable-prefix-caching").enable_prefix_caching is False


def test_the_engine_args_setting_comes_first(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LETHE_ENGINE_ARGS", "--enable-prefix-caching --seed '3'")
    settings = Settings()
    assert settings.engine_args == ["--enable-prefix-caching", "--seed", "3"]
    assert serve(str(model_dir), settings=settings).seed == 3
    overridden = serve(str(model_dir), "--", "--seed", "5", settings=settings)
    assert overridden.seed == 5 and overridden.enable_prefix_caching is True


@pytest.mark.parametrize("words", [["--no-such-argument"], ["--max-num-batched-tokens", "many"],
                                   ["--enable-prefix-caching", "surplus"]])
def test_vllms_parser_refuses_what_vllm_serve_would(words: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        serve("--", *words)
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "lethe serve [MODEL] [options] -- [vLLM engine arguments]" in error and "error:" in error


@pytest.mark.parametrize("words, option", [
    (["--enable-lora"], "--enable-lora"),
    (["--max-lora-rank", "8"], "--max-lora-rank"),
    (["--lora-target-modules", "q_proj"], "--lora-target-modules"),
    (["--enable-prompt-embeds"], "--enable-prompt-embeds"),
    (["--logits-processors", "my.module:Processor"], "--logits-processors"),
    (["--worker-extension-cls", "my.module.Extension"], "--worker-extension-cls"),
    (["--logprobs-mode", "raw_logprobs"], "--logprobs-mode"),
    (["--max-logprobs", "5"], "--max-logprobs"),
    (["--model", "/elsewhere"], "--model"),
    (["--tokenizer", "/elsewhere"], "--tokenizer"),
    (["--disable-log-stats"], "--disable-log-stats"),
    (["--max-model-len", "4096"], "--max-model-len"),  # a `lethe serve` flag: before `--`
    (["-tp", "2"], "--tensor-parallel-size"),
    (["--served-model-name", "other"], "--served-model-name"),
])
def test_arguments_lethe_sets_itself_are_refused(model_dir: Path, words: list[str], option: str) -> None:
    with pytest.raises(SystemExit) as exited:
        serve(str(model_dir), "--", *words)
    message = str(exited.value.code)
    assert message.startswith(f"lethe: {option} ") and ("not accepted" in message or "before `--`" in message)


def test_only_serve_takes_a_double_dash(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args(build_parser(), ["settings", "--", "--enable-prefix-caching"])
    assert exited.value.code == 2 and "only `lethe serve`" in capsys.readouterr().err
