"""LoRA adapters (PEFT) on a frozen base model: what the run trains, references, saves and ships.

With `lora_rank > 0` only the low-rank adapters (and a PPO value head) train. That changes four
things, all kept here so that the training run needs one call for each:
* the frozen reference of DPO/PPO is the same model with its adapters switched off, not a second
  copy of the weights (LoRA starts as the identity: B = 0, so at step 0 the two agree exactly, and
  reference log-probs computed once from the base model still hold);
* a resumable checkpoint holds only the trainable tensors; the base is rebuilt from the model name;
* rollout engines and saved models get merged weights W + (alpha / r) B A under the base model's
  own parameter names, so they need no PEFT;
* a saved model folder is a plain Hugging Face folder of merged weights (a later stage can start
  from it), with the adapters beside it in `lora_adapter/`.
PEFT is imported only when LoRA is on (the `lora` extra).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from trainers.model.pretrained import MissingPackageError

ADAPTER_DIR = "lora_adapter"
INSTALL_HINT = "pip install -e '.[lora]'"


def target_modules(spec: str) -> str | list[str]:
    """'all-linear' (PEFT's every linear layer but the output head) or a comma-separated list of module names."""
    if spec.strip() == "all-linear":
        return "all-linear"
    return [name.strip() for name in spec.split(",") if name.strip()]


def require_peft():
    """The peft module, or one line naming the install command (the sweep driver calls this before it starts)."""
    try:
        import peft
    except ImportError:
        raise MissingPackageError(f"--lora-rank needs the peft package (not installed): run {INSTALL_HINT}") from None
    return peft


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: str, seed: int = 0) -> nn.Module:
    """`model` with fresh LoRA adapters (the base frozen); unchanged when `rank` is 0.

    The adapters' random A matrices come from `seed` without touching the global generator, so every
    rank and every resumed run builds the same start."""
    if rank == 0:
        return model
    peft = require_peft()
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_modules(targets), lora_dropout=0.0,
                             bias="none", task_type=peft.TaskType.CAUSAL_LM)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return peft.get_peft_model(model, config)
        except ValueError as error:  # e.g. a target module name the model does not have
            raise ValueError(f"--lora-target-modules {targets!r}: {error}") from None


def find_lora(module: nn.Module):
    """The PEFT model inside `module` (itself, or inside a DDP or value-head wrapper), or None."""
    try:
        from peft import PeftModel
    except ImportError:
        return None
    for candidate in module.modules():
        if isinstance(candidate, PeftModel):
            return candidate
    return None


class AdaptersDisabled(nn.Module):
    """The frozen reference of a LoRA policy: the policy's own module run with its adapters off.

    No weights are copied. `train()`/`eval()` leave the shared policy's mode alone; never call
    `requires_grad_` on this module (it would freeze the policy's adapters too)."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, *args, **kwargs):
        with torch.no_grad(), self.policy.disable_adapter():
            return self.policy(*args, **kwargs)

    def train(self, mode: bool = True) -> "AdaptersDisabled":
        return self


def frozen_reference(model: nn.Module) -> nn.Module:
    """The start point that preference losses and the PPO KL compare against: the base with the
    adapters disabled under LoRA, else a frozen copy of `model`."""
    if find_lora(model) is not None:
        return AdaptersDisabled(model)
    import copy

    return copy.deepcopy(model).eval().requires_grad_(False)


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights a plain copy of the base architecture needs to compute what `model` computes:
    `model.state_dict()` without LoRA; with LoRA, W + delta for every adapted layer, under the base
    model's parameter names. The model itself is not modified (no merge/unmerge round trip)."""
    lora = find_lora(model)
    if lora is None:
        return model.state_dict()
    from peft.tuners.lora import LoraLayer

    base = lora.get_base_model()
    deltas: dict[str, torch.Tensor] = {}
    for name, layer in base.named_modules():
        if isinstance(layer, LoraLayer) and not layer.merged:
            for adapter in layer.active_adapters:
                if adapter in layer.lora_A:
                    delta = layer.get_delta_weight(adapter)
                    key = f"{name}.weight"
                    deltas[key] = deltas[key] + delta if key in deltas else delta
    merged = {}
    for key, tensor in base.state_dict().items():
        if any(part.startswith("lora_") for part in key.split(".")):
            continue
        key = key.replace(".base_layer.", ".")
        merged[key] = tensor + deltas[key].to(tensor.dtype) if key in deltas else tensor
    missing = set(deltas) - set(merged)
    if missing:
        raise RuntimeError(f"LoRA deltas without a base weight: {sorted(missing)[:3]}")
    return merged


def checkpoint_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """What a resumable checkpoint stores of `module`: every tensor without LoRA, only the trainable
    ones (adapters, a value head) with it."""
    state = module.state_dict()
    if find_lora(module) is None:
        return state
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    return {key: value for key, value in state.items() if key in trainable}


def load_checkpoint_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Inverse of `checkpoint_state`: under LoRA every trainable tensor must be in `state`, nothing else."""
    if find_lora(module) is None:
        module.load_state_dict(state)
        return
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    result = module.load_state_dict(state, strict=False)
    missing = sorted(set(result.missing_keys) & trainable)
    if missing or result.unexpected_keys:
        raise ValueError(f"checkpoint does not fit this LoRA model: missing {missing[:3]}, "
                         f"unexpected {list(result.unexpected_keys)[:3]} (different --lora-rank or target modules?)")


def save_pretrained(model: nn.Module, directory: str | Path) -> None:
    """A plain Hugging Face folder of `model` (merged weights under LoRA, adapters in `lora_adapter/`)."""
    lora = find_lora(model)
    if lora is None:
        model.save_pretrained(directory)
        return
    lora.get_base_model().save_pretrained(directory, state_dict=merged_state_dict(lora))
    lora.save_pretrained(Path(directory) / ADAPTER_DIR)
