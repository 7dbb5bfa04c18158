"""The ProbeSet: fixed responses of known kinds per prompt, built once, hashed, saved and reloaded.

Every trial of a sweep must score exactly the same probes, so a probe set is built once per data
split, identified by a content hash (logged as an MLflow param) and stored as plain files that any
worker can load and verify. Two defects of the seed code are designed out here: the rejected
paraphrase is built from the *rejected* text, and `random` is a derangement (never a prompt's own
chosen answer).
"""
from __future__ import annotations

import hashlib
import json
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Protocol, Sequence

from infra import storage
from trainers.data.schema import PreferencePair

STATIC_CATEGORIES = ("chosen", "rejected", "paraphrase_chosen", "paraphrase_rejected", "variant", "random", "nonresponse")
DYNAMIC_CATEGORIES = ("greedy", "sample")  # made by the current policy at each evaluation; not stored
FORMAT_VERSION = 1
PROBES_FILE, MANIFEST_FILE = "probes.jsonl", "manifest.json"


class ProbeGenerator(Protocol):
    """What writes the derived categories: RuleBasedGenerator offline, an LLM client otherwise."""

    name: str

    def paraphrases(self, texts: Sequence[str], seed: int) -> list[str]: ...

    def variants(self, prompts: Sequence[str], chosen: Sequence[str], seed: int) -> list[str]: ...

    def nonresponses(self, n: int, seed: int) -> list[str]: ...


class ProbeSetError(ValueError):
    """A saved probe set that cannot be trusted: malformed, incomplete or tampered with."""


@dataclass(frozen=True)
class ProbeSet:
    prompts: tuple[str, ...]                      # prompt_id = index
    responses: Mapping[str, tuple[str, ...]]      # category -> one response per prompt
    generators: Mapping[str, str]                 # category -> what produced it
    source: str                                   # data set spec + split

    def __post_init__(self):
        object.__setattr__(self, "prompts", tuple(self.prompts))
        object.__setattr__(self, "responses", {c: tuple(r) for c, r in self.responses.items()})
        object.__setattr__(self, "generators", dict(self.generators))
        missing = [c for c in STATIC_CATEGORIES if c not in self.responses]
        if missing:
            raise ValueError(f"probe set lacks categories {missing}")
        dynamic = [c for c in self.responses if c in DYNAMIC_CATEGORIES]
        if dynamic:
            raise ValueError(f"categories {dynamic} are regenerated at each evaluation and cannot be stored")
        for category, responses in self.responses.items():
            if len(responses) != len(self.prompts):
                raise ValueError(f"category {category!r} has {len(responses)} responses for {len(self.prompts)} prompts")

    @property
    def categories(self) -> tuple[str, ...]:
        """The static categories in their canonical order, then any extra ones sorted."""
        extra = sorted(c for c in self.responses if c not in STATIC_CATEGORIES)
        return STATIC_CATEGORIES + tuple(extra)

    def content_hash(self) -> str:
        """First 16 hex digits of sha256 over canonical JSON of categories, prompts and responses."""
        canonical = json.dumps(
            {"version": FORMAT_VERSION, "categories": list(self.categories), "prompts": list(self.prompts),
             "responses": {c: list(self.responses[c]) for c in self.categories}},
            sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]

    def save(self, directory, extra: Mapping | None = None) -> Path:
        """Write probes.jsonl (one row per prompt and category) and manifest.json; returns the folder.

        Both files are written into a staging folder beside `directory` that then takes its place in
        one rename (`infra.storage.replace_dir`), so a crash never leaves a half-written set, nor new
        probes under an old manifest, nor (replacing a set) no set at all. A folder that already holds
        other files than a probe set's gets the two files in place, manifest last, unless it holds a
        set to replace: then it is refused (the swap would take the other files with it).
        `extra` adds fields to the manifest (how the set was built); it cannot replace the core ones.
        """
        directory = Path(directory)
        rows = (json.dumps({"prompt_id": i, "category": c, "prompt": p, "response": self.responses[c][i]},
                           ensure_ascii=False)
                for i, p in enumerate(self.prompts) for c in self.categories)
        manifest = {
            "version": FORMAT_VERSION, "source": self.source, "content_hash": self.content_hash(),
            "categories": list(self.categories), "generators": {c: self.generators.get(c, "") for c in self.categories},
            "counts": {"prompts": len(self.prompts), **{c: len(self.responses[c]) for c in self.categories}},
        }
        clashes = sorted(set(extra or {}) & set(manifest))
        if clashes:
            raise ValueError(f"extra manifest fields {clashes} would replace core fields")
        manifest.update(extra or {})
        files = {PROBES_FILE: "".join(row + "\n" for row in rows),
                 MANIFEST_FILE: json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"}
        others = sorted(p.name for p in directory.iterdir() if p.name not in files) if directory.is_dir() else []
        if others:
            if (directory / MANIFEST_FILE).exists():
                raise ProbeSetError(f"{directory}: holds a probe set and other files ({', '.join(others[:5])}); "
                                    f"a probe set is replaced only in a folder of its own")
            for name, text in files.items():  # no set to lose here; the manifest marks the set complete
                storage.write_text(directory / name, text)
            return directory
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.staging-"))
        try:
            for name, text in files.items():
                storage.write_text(staging / name, text)
            storage.replace_dir(staging, directory)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return directory

    @classmethod
    def load(cls, directory) -> "ProbeSet":
        """Read a saved probe set and check it is complete and matches its manifest's hash."""
        directory = Path(directory)
        storage.restore_replaced_dir(directory)  # a save that crashed while swapping folders left the old set aside
        manifest_path, probes_path = directory / MANIFEST_FILE, directory / PROBES_FILE
        for path in (manifest_path, probes_path):
            if not path.is_file():
                raise FileNotFoundError(f"probe set file not found: {path}")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ProbeSetError(f"{manifest_path}: not valid JSON ({error.msg})") from None
        for key in ("content_hash", "source", "categories"):
            if key not in manifest:
                raise ProbeSetError(f"{manifest_path}: field '{key}' missing")
        prompts, responses = _read_rows(probes_path, manifest["categories"])
        probe_set = cls(prompts, responses, manifest.get("generators", {}), manifest["source"])
        if probe_set.content_hash() != manifest["content_hash"]:
            raise ProbeSetError(f"{probes_path}: content hash {probe_set.content_hash()} does not match "
                                f"{manifest['content_hash']} in {manifest_path} (the files were changed)")
        return probe_set

    def shard(self, rank: int, world_size: int) -> list[int]:
        """Prompt ids scored by `rank`: strided, so any prefix of ids is spread evenly over ranks."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        return list(range(rank, len(self.prompts), world_size))


def _read_rows(path: Path, categories: Sequence[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Prompts and responses from probes.jsonl; errors name the file, line and field."""
    prompts: dict[int, str] = {}
    cells: dict[tuple[int, str], str] = {}
    expected = {"prompt_id": int, "category": str, "prompt": str, "response": str}
    with path.open(encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ProbeSetError(f"{path}, line {number}: not valid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise ProbeSetError(f"{path}, line {number}: expected an object")
            for key, kind in expected.items():
                if not isinstance(row.get(key), kind) or isinstance(row.get(key), bool):
                    raise ProbeSetError(f"{path}, line {number}, field '{key}': missing or not {kind.__name__}")
            prompt_id, category = row["prompt_id"], row["category"]
            if category not in categories:
                raise ProbeSetError(f"{path}, line {number}, field 'category': {category!r} not in the manifest")
            if prompts.setdefault(prompt_id, row["prompt"]) != row["prompt"]:
                raise ProbeSetError(f"{path}, line {number}, field 'prompt': differs from earlier rows of prompt {prompt_id}")
            if (prompt_id, category) in cells:
                raise ProbeSetError(f"{path}, line {number}: duplicate row for prompt {prompt_id}, {category!r}")
            cells[(prompt_id, category)] = row["response"]
    if sorted(prompts) != list(range(len(prompts))):
        raise ProbeSetError(f"{path}: prompt ids are not 0..{len(prompts) - 1}")
    missing = [(i, c) for i in range(len(prompts)) for c in categories if (i, c) not in cells]
    if missing:
        raise ProbeSetError(f"{path}: {len(missing)} rows missing, first: prompt {missing[0][0]}, {missing[0][1]!r}")
    ordered = [prompts[i] for i in range(len(prompts))]
    return ordered, {c: [cells[(i, c)] for i in range(len(prompts))] for c in categories}


def derangement(n: int, rng: random.Random) -> list[int]:
    """A uniformly random permutation p of range(n) with p[i] != i for every i (n >= 2)."""
    if n < 2:
        raise ValueError(f"a derangement needs n >= 2, got {n}")
    while True:  # rejection sampling: about e (2.72) tries on average
        permutation = list(range(n))
        rng.shuffle(permutation)
        if all(p != i for i, p in enumerate(permutation)):
            return permutation


def select_pairs(pairs: Sequence[PreferencePair], n_prompts: int,
                 seed: int) -> tuple[list[PreferencePair], random.Random]:
    """The first `n_prompts` pairs after a seeded shuffle (all if fewer), and the generator, which
    goes on to draw the `random` derangement."""
    if len(pairs) < 2 or n_prompts < 2:
        raise ValueError(f"a probe set needs at least 2 prompts (pairs={len(pairs)}, n_prompts={n_prompts})")
    rng = random.Random(seed)
    order = list(range(len(pairs)))
    rng.shuffle(order)
    return [pairs[i] for i in order[:n_prompts]], rng


def build_probe_set(pairs: Sequence[PreferencePair], generator: ProbeGenerator, n_prompts: int, seed: int,
                    source: str) -> ProbeSet:
    """Probe responses for the first `n_prompts` pairs after a seeded shuffle (all if fewer)."""
    picked, rng = select_pairs(pairs, n_prompts, seed)
    prompts = [p.prompt for p in picked]
    chosen = [p.chosen for p in picked]
    rejected = [p.rejected for p in picked]
    others = derangement(len(picked), rng)
    responses = {
        "chosen": chosen,
        "rejected": rejected,
        "paraphrase_chosen": generator.paraphrases(chosen, seed),
        "paraphrase_rejected": generator.paraphrases(rejected, seed),   # from the rejected text
        "variant": generator.variants(prompts, chosen, seed),
        "random": [chosen[j] for j in others],
        "nonresponse": generator.nonresponses(len(picked), seed),
    }
    generators = {"chosen": "data", "rejected": "data", "random": "derangement",
                  **{c: generator.name for c in ("paraphrase_chosen", "paraphrase_rejected", "variant", "nonresponse")}}
    return ProbeSet(tuple(prompts), responses, generators, source)


def _data_fingerprint(pairs: Sequence[PreferencePair]) -> str:
    digest = hashlib.sha256()
    for pair in pairs:
        for text in (pair.prompt, pair.chosen, pair.rejected):
            digest.update(text.encode("utf-8"))
            digest.update(b"\x00")
    return digest.hexdigest()[:16]


def probe_cache_key(source: str, n_prompts: int, seed: int, generator_name: str, pairs: Sequence[PreferencePair]) -> str:
    """Cache key of a built probe set; includes a fingerprint of the data, so an edited file rebuilds."""
    fields = {"source": source, "n_prompts": n_prompts, "seed": seed, "generator": generator_name,
              "data": _data_fingerprint(pairs), "version": FORMAT_VERSION}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def cached_probe_set_dir(cache_dir, pairs: Sequence[PreferencePair], generator: ProbeGenerator, n_prompts: int,
                         seed: int, source: str) -> Path:
    """The folder of the cached probe set for these inputs, building and saving it (atomically) first if needed."""
    cache_dir = Path(cache_dir)
    directory = cache_dir / f"build-{probe_cache_key(source, n_prompts, seed, generator.name, pairs)}"
    if (directory / MANIFEST_FILE).is_file():
        return directory
    probe_set = build_probe_set(pairs, generator, n_prompts, seed, source)
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = probe_set.save(Path(tempfile.mkdtemp(dir=cache_dir, prefix=".staging-")))
    storage.publish_dir(staging, directory)  # another process may have built the same set first
    return directory


def load_or_build_probe_set(cache_dir, pairs: Sequence[PreferencePair], generator: ProbeGenerator, n_prompts: int,
                            seed: int, source: str) -> ProbeSet:
    """The cached probe set for these inputs (verified on load), built first if it is not there."""
    return ProbeSet.load(cached_probe_set_dir(cache_dir, pairs, generator, n_prompts, seed, source))
