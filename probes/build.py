"""Build a probe set whose derived categories are written by Gemini, a local model or the rule tables.

    python -m probes.build --dataset Anthropic/hh-rlhf:helpful-base --split test --num-prompts 64 \\
        --output probe_sets/hh-test --generator gemini          # the key from GEMINI_API_KEY

The output folder is a ProbeSet (probes.jsonl + manifest.json) that the sweeps load with
`--probe-set-dir DIR`. Besides the core fields, the manifest's `build` section records the data set
and split, the generator of each category, the model, the prompt templates, the validation rules,
failures and rejected replies per category, the prompts dropped, and requests / tokens / cost.

How a failed probe is handled: a paraphrase, variant or non-response that still fails validation
after `--max-attempts` attempts drops its prompt from the probe set, with every category of that
prompt, so all categories stay aligned prompt by prompt (`random` is drawn among the prompts kept).
If more than `--max-failure-fraction` of any category's probes failed, no probe set is written and
the error names the category, its counts and reasons.

Generators: `gemini` (needs GEMINI_API_KEY or GOOGLE_API_KEY), `local` (for the built-in data the
rule tables, otherwise a local causal LM via `--local-model`; non-responses from the built-in
sentence list), `builtin` (the rule tables for every category, any data), and `auto`: gemini when a
key is set, else local; also local when the Gemini endpoint cannot be reached at all.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Mapping, Sequence

from infra.cli import AT_LEAST_1, NON_NEGATIVE, POSITIVE, Parser, Range, add_settings, check_ranges, setting
from probes.gemini import (MIN_INPUT_CHARS, BudgetExhausted, GeminiError, GeminiOptions, GeminiReplies, GeminiUnreachable,
                           api_key_from_env, redact, safe_url)
from probes.local_generator import LocalLMReplies, RuleBasedReplies, SentenceReplies
from probes.probe_set import MANIFEST_FILE, ProbeSet, derangement, select_pairs
from probes.reply_cache import ReplyCache
from probes.templates import DERIVED_CATEGORIES, ProbeRequest, PromptTemplates, load_templates
from probes.validation import ValidationRules
from probes.writing import BuildProgress, Outcome, ReplyWriter, rejection_counts, write_validated

GENERATORS = ("auto", "gemini", "local", "builtin")
BUILD_FORMAT = 1
log = logging.getLogger(__name__)


class ProbeBuildError(RuntimeError):
    """The probe set cannot be built as asked (too many failures, too few prompts, a clash on disk)."""


@dataclass
class BuildConfig:
    output: str = field(metadata={"help": "folder for probes.jsonl and manifest.json (load it with --probe-set-dir)", "required": True})
    dataset: str = setting("builtin", "'builtin', a hub name[:data_dir] or a .jsonl/.json/.parquet file")
    split: str = setting("test", "data split the prompts come from")
    num_prompts: int = setting(32, "prompts to select (at least 2)", range=Range(2))
    seed: int = setting(0, "prompt selection and sampling seed", range=NON_NEGATIVE)
    generator: str = setting("auto", "who writes paraphrases, variants and non-responses (auto: gemini if a key is set)", choices=GENERATORS)
    # Gemini
    model_name: str = setting("gemini-2.5-flash", "Gemini model", group="Gemini")
    base_url: str | None = setting(None, "API base URL (a proxy or a test server)", group="Gemini")
    templates: str | None = setting(None, "YAML file replacing prompt templates / max_words", group="Gemini")
    max_requests: int | None = setting(None, "stop after this many requests (retries included); cached replies are kept", range=AT_LEAST_1, group="Gemini")
    concurrency: int = setting(4, "requests in flight", range=AT_LEAST_1, group="Gemini")
    timeout_s: float = setting(60.0, "seconds per request", range=POSITIVE, flag="--timeout", group="Gemini")
    max_retries: int = setting(6, "retries per request on 429 / 5xx / timeouts", range=NON_NEGATIVE, group="Gemini")
    backoff_initial_s: float = setting(1.0, "first retry wait in seconds", range=NON_NEGATIVE, flag="--backoff-initial", group="Gemini")
    backoff_max_s: float = setting(60.0, "longest retry wait in seconds", range=NON_NEGATIVE, flag="--backoff-max", group="Gemini")
    temperature: float = setting(0.9, "sampling temperature of the replies", range=NON_NEGATIVE, group="Gemini")
    max_output_tokens: int = setting(512, "reply length limit in tokens", range=AT_LEAST_1, group="Gemini")
    thinking_budget: int | None = setting(0, "thinking tokens per reply (0: off); -1: leave it to the model", range=Range(-1), group="Gemini")
    max_input_chars: int = setting(4000, "longest conversation or response put into a request, in characters (Gemini's tokenizer is not local); a longer one is cut (a conversation keeps its end) and the cut is marked in the request", range=Range(MIN_INPUT_CHARS), group="Gemini")
    price_input_per_m: float = setting(0.30, "USD per 1M input tokens, for the cost estimate", range=NON_NEGATIVE, group="Gemini")
    price_output_per_m: float = setting(2.50, "USD per 1M output (and thinking) tokens", range=NON_NEGATIVE, group="Gemini")
    max_attempts: int = setting(3, "tries per probe", range=AT_LEAST_1, group="validation")
    length_slack: float = setting(1.5, "a reply may have max_words x this many words (at least 1)", range=Range(1), group="validation")
    max_failure_fraction: float = setting(0.1, "refuse the probe set if more of any category failed", range=Range(0, 1), group="validation")
    cache_dir: str | None = setting(None, "reply cache folder (default: $PROBESWEEP_CACHE/llm_replies, ~/.cache/probesweep/...)", group="Gemini")
    local_model: str = setting("tiny-pythia-1m", "causal LM of --generator local on non-built-in data", group="other")
    local_max_new_tokens: int = setting(64, "tokens the local LM writes per probe", range=AT_LEAST_1, group="other")
    max_rows: int | None = setting(None, "read at most this many data rows", range=AT_LEAST_1, group="other")
    skip_bad_rows: bool = setting(False, "skip malformed data rows instead of stopping at the first", group="other")
    overwrite: bool = setting(False, "replace a different probe set already in --output", group="other")
    progress: bool = setting(True, "no progress bar", flag="--no-progress", negate=True, group="other")
    tracking_uri: str | None = setting(None, "also log the build to this MLflow store", group="other")
    experiment_name: str = setting("probesweep-probe-sets", "MLflow experiment of the build", group="other")

    def __post_init__(self):
        check_ranges(self)
        if self.generator not in GENERATORS:
            raise ValueError(f"generator must be one of {GENERATORS}, got {self.generator!r}")
        if self.num_prompts < 2:
            raise ValueError(f"num_prompts must be at least 2, got {self.num_prompts}")
        if not 0.0 <= self.max_failure_fraction <= 1.0:
            raise ValueError(f"max_failure_fraction must be in [0, 1], got {self.max_failure_fraction}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.length_slack < 1.0:
            raise ValueError(f"length_slack must be at least 1, got {self.length_slack}")

    def gemini_options(self) -> GeminiOptions:
        return GeminiOptions(
            model=self.model_name, base_url=self.base_url, timeout_s=self.timeout_s, concurrency=self.concurrency,
            max_requests=self.max_requests, max_retries=self.max_retries, backoff_initial_s=self.backoff_initial_s,
            backoff_max_s=self.backoff_max_s, temperature=self.temperature, max_output_tokens=self.max_output_tokens,
            thinking_budget=self.thinking_budget, max_input_chars=self.max_input_chars, price_input_per_m=self.price_input_per_m,
            price_output_per_m=self.price_output_per_m)

    def resolved_cache_dir(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir)
        from infra.storage import cache_root

        return cache_root() / "llm_replies"

    def to_params(self) -> dict:
        """The config for logs and MLflow params: no credential (there is no key field), base URL reduced."""
        values = asdict(self)
        values["base_url"] = safe_url(self.base_url) if self.base_url else None
        return values


@dataclass
class BuildResult:
    probe_set: ProbeSet
    directory: Path
    manifest: dict
    cache_problems: list[str] = field(default_factory=list)


def derived_requests(pairs) -> list[ProbeRequest]:
    """Four requests per selected pair, category by category."""
    makers = {
        "paraphrase_chosen": lambda i, p: ProbeRequest("paraphrase_chosen", i, source=p.chosen),
        "paraphrase_rejected": lambda i, p: ProbeRequest("paraphrase_rejected", i, source=p.rejected),
        "variant": lambda i, p: ProbeRequest("variant", i, source=p.chosen, prompt=p.prompt),
        "nonresponse": lambda i, p: ProbeRequest("nonresponse", i),
    }
    return [makers[c](i, pair) for c in DERIVED_CATEGORIES for i, pair in enumerate(pairs)]


def _response_lead(pairs) -> str:
    """The whitespace responses start with in this data (HH: one space after 'Assistant:')."""
    leads = Counter(p.chosen[: len(p.chosen) - len(p.chosen.lstrip())] for p in pairs)
    return leads.most_common(1)[0][0] if leads else " "


def _writers(mode: str, config: BuildConfig, api_key: str | None, templates: PromptTemplates, lead: str,
             cache: ReplyCache | None) -> dict[str, ReplyWriter]:
    if mode == "gemini":
        gemini = GeminiReplies(api_key, config.gemini_options(), templates, cache, seed=config.seed, lead=lead)
        return {c: gemini for c in DERIVED_CATEGORIES}
    if mode == "builtin":
        rules = RuleBasedReplies(seed=config.seed)
        return {c: rules for c in DERIVED_CATEGORIES}
    # local
    writer = (RuleBasedReplies(seed=config.seed) if config.dataset == "builtin"
              else LocalLMReplies(config.local_model, seed=config.seed, lead=lead,
                                  max_new_tokens=config.local_max_new_tokens))
    sentences = SentenceReplies(seed=config.seed)
    return {"paraphrase_chosen": writer, "paraphrase_rejected": writer, "variant": writer, "nonresponse": sentences}


def _failure_report(requests: Sequence[ProbeRequest], outcomes: Sequence[Outcome], n: int) -> dict:
    report = {}
    for category in DERIVED_CATEGORIES:
        mine = [o for r, o in zip(requests, outcomes, strict=True) if r.category == category]
        failed = [o for o in mine if o.text is None]
        report[category] = {
            "failed": len(failed), "of": n,
            "final_reasons": dict(sorted(Counter(o.rejections[-1] for o in failed).items())),
            "rejected_replies": rejection_counts(mine),
        }
    return report


def _check_failures(report: Mapping[str, dict], max_fraction: float) -> None:
    too_many = [(c, r) for c, r in report.items() if r["failed"] > max_fraction * r["of"]]
    if too_many:
        lines = [f"category {c!r}: {r['failed']} of {r['of']} probes failed (reasons: "
                 f"{', '.join(f'{k} {v}' for k, v in r['final_reasons'].items())})" for c, r in too_many]
        raise ProbeBuildError(
            "too many failed probes, no probe set written: " + "; ".join(lines)
            + f". The limit is {max_fraction:.0%} per category (--max-failure-fraction); replies are cached, "
              "so a rerun with other templates, more --max-attempts or a higher limit only asks for what is new")


def _check_output(directory: Path, content_hash: str, overwrite: bool) -> None:
    manifest = directory / MANIFEST_FILE
    if manifest.is_file() and not overwrite:
        try:
            existing = json.loads(manifest.read_text(encoding="utf-8")).get("content_hash")
        except (json.JSONDecodeError, AttributeError):
            existing = None
        if existing != content_hash:
            raise ProbeBuildError(f"{directory} already holds a different probe set ({existing}); "
                                  f"this build is {content_hash}: choose another --output, or pass --overwrite")


def build(config: BuildConfig, environ: Mapping[str, str] | None = None) -> BuildResult:
    """Build, validate and save the probe set described by `config` (see the module docstring)."""
    from trainers.data.pairs import load_preference_data

    api_key, key_variable = api_key_from_env(environ)
    mode = config.generator
    if mode == "auto":
        mode = "gemini" if api_key else "local"
    if mode == "gemini" and not api_key:
        raise GeminiError("--generator gemini needs an API key in GEMINI_API_KEY or GOOGLE_API_KEY "
                          "(or use --generator local)")
    templates = load_templates(config.templates)
    rules = ValidationRules(max_words=templates.max_words, length_slack=config.length_slack)

    loaded = load_preference_data(config.dataset, config.split, skip_bad_rows=config.skip_bad_rows,
                                  max_rows=config.max_rows)
    picked, rng = select_pairs(loaded.pairs, config.num_prompts, config.seed)
    requests = derived_requests(picked)
    lead = _response_lead(picked)
    if mode == "local" and config.dataset != "builtin":
        from trainers.model.factory import TINY_PYTHIA_SIZES

        if config.local_model in TINY_PYTHIA_SIZES:
            print(f"warning: {config.local_model} is a randomly initialised built-in model, so its paraphrases "
                  "and variants are noise; pass --local-model with a trained model (e.g. the one you fine-tune)",
                  file=sys.stderr, flush=True)
    cache = ReplyCache(config.resolved_cache_dir()) if mode == "gemini" else None
    if cache is not None and cache.problems:
        print(f"reply cache: {len(cache.problems)} damaged entries ignored (they are asked for again); "
              f"first: {cache.problems[0]}", file=sys.stderr, flush=True)

    fallback = None
    while True:
        writers = _writers(mode, config, api_key, templates, lead, cache)
        progress = BuildProgress(len(requests), enabled=config.progress, description=f"probes ({mode})")
        try:
            outcomes = write_validated(requests, writers, rules, config.max_attempts, progress)
            break
        except GeminiUnreachable as error:
            if config.generator != "auto":
                raise
            fallback = f"gemini unreachable ({error}); local generators used"
            print(f"warning: {fallback}", file=sys.stderr, flush=True)
            mode = "local"
        finally:
            progress.close()

    report = _failure_report(requests, outcomes, len(picked))
    _check_failures(report, config.max_failure_fraction)
    by_index = {(r.category, r.index): o.text for r, o in zip(requests, outcomes, strict=True)}
    kept = [i for i in range(len(picked)) if all(by_index[(c, i)] is not None for c in DERIVED_CATEGORIES)]
    if len(kept) < 2:
        raise ProbeBuildError(f"only {len(kept)} of {len(picked)} prompts have every probe: a probe set needs 2")
    others = derangement(len(kept), rng)
    chosen = [picked[i].chosen for i in kept]
    responses = {"chosen": chosen, "rejected": [picked[i].rejected for i in kept],
                 **{c: [by_index[(c, i)] for i in kept] for c in DERIVED_CATEGORIES},
                 "random": [chosen[j] for j in others]}
    generators = {"chosen": "data", "rejected": "data", "random": "derangement",
                  **{c: writers[c].name for c in DERIVED_CATEGORIES}}
    probe_set = ProbeSet(tuple(picked[i].prompt for i in kept), responses, generators,
                         f"{config.dataset}:{config.split}")

    distinct = {id(w): w for w in writers.values()}
    llm_used = mode == "gemini"
    build_info = {
        "format": BUILD_FORMAT, "tool": "probes.build",
        "dataset": config.dataset, "split": config.split, "seed": config.seed,
        "rows_loaded": len(loaded.pairs), "rows_skipped": len(loaded.skipped),
        "num_prompts_requested": config.num_prompts, "num_prompts_selected": len(picked),
        "num_prompts": len(kept),
        "generator": mode, "generator_requested": config.generator, "fallback": fallback,
        "model_name": config.model_name if llm_used else None,
        "key_variable": key_variable if llm_used else None,
        "writers": {w.name: w.describe() for w in distinct.values()},
        "prompt_templates": templates.to_dict() if llm_used else None,
        "validation": {"max_words": rules.max_words, "length_slack": rules.length_slack,
                       "word_limit": rules.word_limit, "max_attempts": config.max_attempts,
                       "max_failure_fraction": config.max_failure_fraction},
        "failures": report,
        "dropped_prompts": [{"position": i, "source_row": picked[i].row}
                            for i in sorted(set(range(len(picked))) - set(kept))],
        "usage": {"requests_sent": progress.requests, "replies_from_cache": progress.cached,
                  "input_tokens": progress.input_tokens, "output_tokens": progress.output_tokens,
                  "estimated_cost_usd": round(progress.cost, 6),
                  "price_per_1m_tokens_usd": {"input": config.price_input_per_m, "output": config.price_output_per_m}},
    }
    directory = Path(config.output)
    _check_output(directory, probe_set.content_hash(), config.overwrite)
    probe_set.save(directory, extra={"build": build_info})
    manifest = json.loads((directory / MANIFEST_FILE).read_text(encoding="utf-8"))
    result = BuildResult(probe_set, directory, manifest, list(cache.problems) if cache else [])
    if config.tracking_uri:
        log_build(config, result)
    return result


def log_build(config: BuildConfig, result: BuildResult) -> str:
    """One MLflow run per build: the config as params, hash and generators as tags, the files as artifacts."""
    from infra.tracking import Tracker

    tracker = Tracker(config.tracking_uri)
    experiment_id = tracker.experiment_id(config.experiment_name)
    content_hash = result.probe_set.content_hash()
    run_id = tracker.start_run(experiment_id, f"probe-set:{content_hash}", params=config.to_params(),
                               tags={"probe_set_hash": content_hash, "probe_set_generator": result.manifest["build"]["generator"]})
    for name in (MANIFEST_FILE, "probes.jsonl"):
        tracker.log_artifact(run_id, result.directory / name, "probe_set")
    tracker.end_run(run_id)
    return run_id


def _summary(result: BuildResult) -> str:
    build_info = result.manifest["build"]
    usage = build_info["usage"]
    lines = [f"probe set {result.probe_set.content_hash()}: {len(result.probe_set.prompts)} prompts x "
             f"{len(result.probe_set.categories)} categories -> {result.directory}",
             "generators: " + ", ".join(f"{c}={g}" for c, g in result.manifest["generators"].items())]
    failed = {c: r["failed"] for c, r in build_info["failures"].items() if r["failed"]}
    if failed:
        lines.append(f"failed probes (their prompts dropped): {failed}")
    if usage["requests_sent"] or usage["replies_from_cache"]:
        lines.append(f"requests sent {usage['requests_sent']}, replies from cache {usage['replies_from_cache']}, "
                     f"tokens in/out {usage['input_tokens']}/{usage['output_tokens']}, "
                     f"estimated cost ${usage['estimated_cost_usd']:.4f}")
    return "\n".join(lines)


def parser() -> tuple[argparse.ArgumentParser, dict[str, tuple[str, ...]]]:
    """The shared parser builder over BuildConfig (flags, help and ranges from its fields)."""
    p = Parser(
        prog="python -m probes.build",
        description="Build a probe set (all static categories) with LLM-written, locally generated or rule-based "
                    "paraphrases, variants and non-responses. The Gemini key is read from GEMINI_API_KEY or "
                    "GOOGLE_API_KEY, never from a flag.")
    return p, add_settings(p, BuildConfig, "probe set")


def config_from_args(argv: Sequence[str] | None = None) -> BuildConfig:
    p, paths = parser()
    args = vars(p.parse_args(argv))
    values = {paths[k][0]: v for k, v in args.items()}
    try:
        config = BuildConfig(**values)
    except (ValueError, TypeError) as error:
        p.error(str(error))
    if config.thinking_budget is not None and config.thinking_budget < 0:
        config = replace(config, thinking_budget=None)
    return config


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = config_from_args(argv)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    key, _ = api_key_from_env()
    try:
        result = build(config)
    except KeyboardInterrupt:
        print("\ninterrupted: every reply received so far is in the reply cache; run the same command again "
              "to go on", file=sys.stderr)
        return 130
    except BudgetExhausted as error:
        print(f"error: {redact(str(error), key)}", file=sys.stderr)
        return 3
    except (ProbeBuildError, GeminiError, ValueError, FileNotFoundError) as error:
        print(f"error: {redact(str(error), key)}", file=sys.stderr)
        return 1
    print(_summary(result))
    if result.cache_problems:
        print(f"reply cache: {len(result.cache_problems)} damaged entries were ignored and asked for again")
    return 0


if __name__ == "__main__":
    sys.exit(main())
