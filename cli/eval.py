"""``lethe eval tofu`` and ``lethe eval membership``: a running Lethe, per mechanism (`evals.tofu_eval`,
`evals.membership`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from server.config import get_settings


def mechanism_sets(values: list[str] | None) -> list[list[str]] | None:
    """``--mechanisms`` as given, once or more: each a comma-separated set (blanks dropped)."""
    if not values:
        return None
    return [[name.strip() for name in value.split(",") if name.strip()] for value in values]


def cmd_eval(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from demo.builder import build_demo_model, demo_model_authors
    from evals.eval_report import markdown_table, plot
    from evals.membership import membership_auc, membership_set
    from evals.reference_model import ReferenceModel
    from evals.tofu_eval import configurations, eval_sets, evaluate, run_count, summary
    from server.admin_client import AdminClient, AdminClientError

    settings = get_settings()
    if not settings.admin_key:
        raise SystemExit("lethe: set LETHE_ADMIN_KEY: the evaluation registers targets and scores answers")
    retain_dir = Path(args.retain_model) if args.retain_model else build_demo_model(
        settings.cache_dir, args.demo_variant, args.split, progress=True)
    try:
        sets = eval_sets(args.split, args.limit, demo_model_authors(retain_dir))
        runs = configurations(mechanism_sets(args.mechanisms), args.matrix)
        if args.seeds < 1:
            raise ValueError(f"--seeds {args.seeds}: register each configuration at least once")
        # --limit caps the membership questions per author too
        membership = membership_auc(membership_set(args.split, args.limit)) if args.membership else None
    except ValueError as exc:
        raise SystemExit(f"lethe: {exc}") from exc
    api_key = settings.api_keys[0] if settings.api_keys else None
    steps = 2 + sum(3 * args.seeds if mechanisms else 2 for mechanisms in runs)  # (register,) replies, scores
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"tofu-{args.split}"
    json_path = Path(args.json or f"{stem}.json")
    with AdminClient(args.base_url, settings.admin_key, api_key) as client, tqdm(total=steps, unit="step") as bar:
        def progress(message: str) -> None:
            bar.set_description(message)
            bar.update(1)

        def write_json(results_so_far: list) -> None:  # after every run: a later failure keeps what was measured
            report = summary(args.split, results_so_far)
            report["model"], report["retain_model"], report["limit"] = model, str(retain_dir), args.limit
            report["complete"] = len(results_so_far) == run_count(runs, args.seeds)
            json_path.write_text(json.dumps(report, indent=2))

        try:
            model = client.model()
            results = evaluate(client, sets, runs, ReferenceModel(retain_dir, args.max_tokens), args.max_tokens,
                               args.job_timeout, progress, on_run=write_json, membership=membership,
                               seeds=args.seeds)
        except (AdminClientError, ValueError) as exc:
            raise SystemExit(f"lethe: {exc} (the runs measured before this are in {json_path})") from exc
    table = markdown_table(args.split, model, results)
    Path(f"{stem}.md").write_text(table)
    plot(args.split, results, Path(f"{stem}.png"))
    print(table)
    print(f"written: {json_path}, {stem}.md, {stem}.png")
    return 0


def cmd_eval_membership(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from evals.eval_report import membership_table
    from evals.membership import evaluate_membership, membership_set, membership_summary
    from evals.tofu_eval import configurations
    from server.admin_client import AdminClient, AdminClientError

    settings = get_settings()
    if not settings.admin_key:
        raise SystemExit("lethe: set LETHE_ADMIN_KEY: the evaluation registers targets and scores replies")
    try:
        sets = membership_set(args.split, args.questions_per_author)
        runs = configurations(mechanism_sets(args.mechanisms), args.matrix)
    except ValueError as exc:
        raise SystemExit(f"lethe: {exc}") from exc
    api_key = settings.api_keys[0] if settings.api_keys else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"membership-{args.split}"
    json_path = Path(args.json or f"{stem}.json")
    steps = sum(2 if mechanisms else 1 for mechanisms in runs)  # (register,) replies and scores per run
    with AdminClient(args.base_url, settings.admin_key, api_key) as client, tqdm(total=steps, unit="step") as bar:
        def progress(message: str) -> None:
            bar.set_description(message)
            bar.update(1)

        def write_json(results_so_far: list) -> None:  # after every run: a later failure keeps what was measured
            report = membership_summary(sets, results_so_far)
            report["model"], report["questions_per_author"] = model, args.questions_per_author
            report["complete"] = len(results_so_far) == len(runs)
            json_path.write_text(json.dumps(report, indent=2))

        try:
            model = client.model()
            results = evaluate_membership(client, sets, runs, args.max_tokens, args.job_timeout, progress,
                                          on_run=write_json)
        except (AdminClientError, ValueError) as exc:
            raise SystemExit(f"lethe: {exc} (the runs measured before this are in {json_path})") from exc
    table = membership_table(args.split, model, results)
    Path(f"{stem}.md").write_text(table)
    print(table)
    print(f"written: {json_path}, {stem}.md")
    return 0
