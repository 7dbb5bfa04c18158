"""The typed configuration of one training run (one trial): what a worker needs, nothing more.

Every field carries its help text, from which the command line is generated; the resolved config
is what a run records as its MLflow params.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


def _f(default, help: str, **kwargs):
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class TrainConfig:
    # model and data
    model: str = _f("tiny-pythia-1m", "built-in size (tiny-pythia-1m/-4m/-16m), a Hugging Face name or a local folder")
    init_checkpoint: str | None = _f(None, "start from this saved model folder instead of `model` (the sweep sets it to the shared SFT warm-up)")
    dataset: str = _f("builtin", "'builtin', a local .jsonl/.json/.parquet file, or a hub data set such as 'Anthropic/hh-rlhf:helpful-base'")
    train_split: str = _f("train", "split of `dataset` to train on")
    eval_split: str = _f("test", "split the probe prompts come from")
    max_train_pairs: int | None = _f(None, "use only the first N valid training pairs")
    skip_bad_rows: bool = _f(False, "skip (and count) malformed data rows instead of stopping at the first")
    max_prompt_tokens: int = _f(160, "prompts are cut from the left (the oldest turns go first) to this many tokens")
    max_response_tokens: int = _f(64, "responses are cut from the right to this many tokens (EOS included)")
    truncation: str = _f("truncate", "'truncate' cuts over-long rows as above; 'error' treats them as bad rows", choices=("truncate", "error"))
    # objective
    loss: str = _f("dpo", "sft, dpo, cdpo (label-smoothed DPO), ipo or ppo")
    sft_targets: str = _f("chosen", "what SFT trains on: the 'chosen' responses, or 'both' chosen and rejected", choices=("chosen", "both"))
    beta: float = _f(0.1, "DPO/IPO temperature beta (> 0)")
    label_smoothing: float = _f(0.0, "cDPO label smoothing in [0, 0.5); loss=cdpo uses 0.1 when this is 0")
    reference_logps_dir: str | None = _f(None, "folder of shared reference log-probs (the sweep computes them once); unset: the reference model runs every step")
    # optimisation
    lr: float = _f(2e-4, "peak AdamW learning rate")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    warmup_steps: int = _f(10, "linear warm-up steps, then constant")
    max_steps: int = _f(60, "optimizer steps (each = micro_batch_size x grad_accum_steps x num_workers pairs)")
    micro_batch_size: int = _f(8, "pairs per worker per forward")
    grad_accum_steps: int = _f(1, "micro-batches accumulated per optimizer step")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 disables)")
    seed: int = _f(0, "seed of model init, data order and sampling")
    # PPO (loss=ppo): rollouts from the actor pool, rewards from a rule or a reward model
    reward: str = _f("rule", "PPO reward: 'rule' (built-in: the prompt's key words the answer uses, minus unhelpful phrases) or a reward-model folder (sweeps/reward_model.py)")
    ppo_kl_coef: float = _f(0.05, "KL penalty coefficient to the frozen reference (per token)")
    ppo_kl_estimator: str = _f("k1", "per-token KL estimator: k1 (log ratio) or k3 (non-negative)", choices=("k1", "k3"))
    ppo_target_kl: float = _f(0.0, "adaptive KL controller's target KL per sequence (0: fixed coefficient)")
    ppo_kl_horizon: float = _f(1000.0, "adaptive KL controller's horizon in sequences")
    ppo_gamma: float = _f(1.0, "discount of GAE")
    ppo_lam: float = _f(0.95, "lambda of GAE")
    ppo_clip: float = _f(0.2, "policy ratio clip")
    ppo_value_clip: float = _f(0.2, "value clip (in reward units)")
    ppo_vf_coef: float = _f(0.1, "weight of the value loss")
    ppo_epochs: int = _f(2, "passes over each rollout batch")
    ppo_minibatches: int = _f(2, "minibatches per pass (per worker)")
    ppo_max_new_tokens: int = _f(24, "length limit of a rollout")
    ppo_temperature: float = _f(1.0, "sampling temperature of rollouts")
    rollout_engine: str = _f("auto", "auto (vLLM when CUDA and vllm are present), hf or vllm", choices=("auto", "hf", "vllm"))
    rollout_actors: int = _f(2, "rollout actors per trial (separate from the training workers)")
    rollout_cpus_per_actor: float = _f(0.15, "CPU share per rollout actor")
    rollout_gpus_per_actor: float = _f(0.0, "GPU share per rollout actor (e.g. 1 on a GPU cluster)")
    rollout_sync_every: int = _f(1, "push the policy's weights to the actors every N updates")
    rollout_timeout_s: float = _f(300.0, "longest wait for a rollout or a weight sync before the trial fails")
    # evaluation
    eval_every: int = _f(10, "score the probe set every N steps (and at step 0 and the last step)")
    num_probe_prompts: int = _f(32, "evaluation prompts in the probe set")
    probe_batch_prompts: int = _f(8, "prompts scored together in one shared-prompt pass")
    greedy_max_tokens: int = _f(48, "length limit of the policy's own decodes that form the `greedy` and `sample` categories")
    probe_decodes: str = _f("local", "who decodes the greedy and sample probes of SFT/DPO trials: 'local' (the training worker) or 'actors' (the rollout actors, as PPO always does)", choices=("local", "actors"))
    probe_set_dir: str | None = _f(None, "a saved probe set folder (the sweep builds and sets it)")
    # distribution
    num_workers: int = _f(2, "Ray Train workers per trial (DDP)")
    strategy: str = _f("ddp", "how workers share the training: 'ddp' (every worker holds the full model and optimizer) or 'deepspeed' (ZeRO: --zero-stage 2 shards optimizer state and gradients across workers, 3 also the parameters; needs the deepspeed extra)", choices=("ddp", "deepspeed"))
    zero_stage: int = _f(2, "ZeRO stage with --strategy deepspeed: 1 shards optimizer state, 2 also gradients, 3 also parameters", choices=(1, 2, 3))
    cpus_per_worker: float = _f(0.3, "CPU share per worker; fractional so trials pack on small machines")
    gpus_per_worker: float = _f(1.0, "GPU share per worker with use_gpu (fractional: several small trials share a GPU)")
    use_gpu: bool = _f(False, "GPUs for the workers (NCCL; gpus_per_worker each); default CPU with gloo")
    checkpoint_every: int = _f(20, "report a resumable checkpoint every N steps")
    report_every: int = _f(5, "send buffered per-step metrics to Tune/MLflow every N steps (each report is a round trip)")
    # LoRA (PEFT): rank-r adapters on a frozen base; the reference is that base with the adapters off (trainers.model.lora)
    lora_rank: int = _f(0, "LoRA rank: train rank-r adapters on the frozen model (0: train every weight; needs the lora extra)")
    lora_alpha: float = _f(16.0, "LoRA alpha: the adapters' update is scaled by alpha / rank")
    lora_target_modules: str = _f("all-linear", "modules that get adapters: 'all-linear' (every linear layer but the output head) or comma-separated names, e.g. 'q_proj,v_proj' (Llama) or 'query_key_value' (GPT-NeoX)")

    def __post_init__(self):
        if self.loss not in ("sft", "dpo", "cdpo", "ipo", "ppo"):
            raise ValueError(f"loss must be one of sft, dpo, cdpo, ipo, ppo; got {self.loss!r}")
        if self.loss in ("dpo", "cdpo", "ipo") and self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.sft_targets not in ("chosen", "both"):
            raise ValueError(f"sft_targets must be 'chosen' or 'both', got {self.sft_targets!r}")
        if self.truncation not in ("truncate", "error"):
            raise ValueError(f"truncation must be 'truncate' or 'error', got {self.truncation!r}")
        if self.probe_decodes not in ("local", "actors"):
            raise ValueError(f"probe_decodes must be 'local' or 'actors', got {self.probe_decodes!r}")
        if self.ppo_kl_estimator not in ("k1", "k3"):
            raise ValueError(f"ppo_kl_estimator must be k1 or k3, got {self.ppo_kl_estimator!r}")
        if self.loss == "ppo" and self.micro_batch_size % self.ppo_minibatches:
            raise ValueError(f"micro_batch_size ({self.micro_batch_size}) must be a multiple of ppo_minibatches ({self.ppo_minibatches})")
        if self.strategy not in ("ddp", "deepspeed"):
            raise ValueError(f"strategy must be 'ddp' or 'deepspeed', got {self.strategy!r}")
        if self.zero_stage not in (1, 2, 3):
            raise ValueError(f"zero_stage must be 1, 2 or 3 (ZeRO stages), got {self.zero_stage!r}")
        if self.strategy == "deepspeed" and self.loss == "ppo":
            raise ValueError("strategy 'deepspeed' does not support loss 'ppo' yet (PPO runs its own update loop); "
                             "use --strategy ddp for PPO")
        if self.lora_rank < 0 or self.lora_alpha <= 0:
            raise ValueError(f"--lora-rank must be >= 0 and --lora-alpha > 0, got {self.lora_rank}, {self.lora_alpha}")
        if self.lora_rank and self.strategy == "deepspeed":
            raise ValueError("--lora-rank with --strategy deepspeed is not supported yet; use --strategy ddp with LoRA")
        if self.lora_rank and not [m for m in self.lora_target_modules.split(",") if m.strip()]:
            raise ValueError("--lora-target-modules: name at least one module, or 'all-linear'")
        if self.cpus_per_worker <= 0 or self.gpus_per_worker <= 0:
            raise ValueError(f"cpus_per_worker and gpus_per_worker must be > 0, got {self.cpus_per_worker}, {self.gpus_per_worker}")
        for name in ("max_steps", "micro_batch_size", "grad_accum_steps", "eval_every", "num_workers", "num_probe_prompts", "report_every", "checkpoint_every",
                     "ppo_epochs", "ppo_minibatches", "ppo_max_new_tokens", "rollout_actors", "rollout_sync_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig keys: {unknown}")
        return cls(**values)
