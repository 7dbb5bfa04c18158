"""The typed configuration of one training run (one trial): what a worker needs, nothing more.

Every field carries its help text and its allowed range, from which the command line is generated
and against which every value is checked when a config is made (flags, YAML and code alike). The
resolved config is what a run records as its MLflow params (sections flattened: `rollout.num_actors`).

Sections: `DataSettings` (the preference data and its tokenization; `RewardModelConfig`, the
config of a reward-model run, shares it),
`RolloutSettings` (the rollout actors; `rollout.actors` builds its engines from it) and the rest of
TrainConfig. `OBJECTIVES` is the one list of loss names.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from infra.cli import AT_LEAST_1, NON_NEGATIVE, POSITIVE, Range, check_ranges, setting as _f


@dataclass(frozen=True)
class Objective:
    """What a loss name means for the rest of the system."""
    kind: str                        # "supervised", "preference" (a frozen reference, beta) or "reinforcement"
    label_smoothing: bool = False    # takes --label-smoothing


# the registry of loss names: the functions behind the preference entries are trainers.model.losses.PREFERENCE_LOSSES
OBJECTIVES: dict[str, Objective] = {
    "sft": Objective("supervised"),
    "dpo": Objective("preference", label_smoothing=True),
    "cdpo": Objective("preference", label_smoothing=True),   # label-smoothed DPO (0.1 unless --label-smoothing)
    "ipo": Objective("preference"),
    "ppo": Objective("reinforcement"),
}
SFT_RECIPES = ("chosen", "both")


def preference_losses() -> tuple[str, ...]:
    return tuple(name for name, objective in OBJECTIVES.items() if objective.kind == "preference")


def is_preference(loss: str) -> bool:
    return OBJECTIVES[loss].kind == "preference"


@dataclass
class DataSettings:
    """The preference data and how it is cut into tokens (a training run's and a reward model's)."""
    dataset: str = _f("builtin", "'builtin', a local .jsonl/.json/.parquet file, or a hub data set such as 'Anthropic/hh-rlhf:helpful-base'")
    train_split: str = _f("train", "split of `dataset` to train on")
    eval_split: str = _f("test", "split the probe prompts (or a reward model's held-out pairs) come from")
    holdout_fraction: float = _f(0.1, "a local data file's share of prompts held out from training (chosen by prompt hash: deterministic); they form its eval split", range=Range(0, 1, low_open=True, high_open=True))
    max_train_pairs: int | None = _f(None, "use only the first N valid training pairs", range=AT_LEAST_1)
    skip_bad_rows: bool = _f(False, "skip (and count) malformed data rows instead of stopping at the first")
    max_prompt_tokens: int = _f(160, "prompts are cut from the left (the oldest turns go first) to this many tokens", range=AT_LEAST_1)
    max_response_tokens: int = _f(64, "responses are cut from the right to this many tokens (EOS included)", range=AT_LEAST_1)
    truncation: str = _f("truncate", "'truncate' cuts over-long rows as above; 'error' treats them as bad rows", choices=("truncate", "error"))

    def __post_init__(self):
        check_ranges(self)


@dataclass
class RolloutSettings:
    """The rollout actors of a trial (PPO, and probe decodes with --probe-decodes actors)."""
    engine: str = _f("auto", "auto (vLLM where it is installed and takes the model: any on CUDA, head_dim 32/64/... on CPU), hf or vllm", choices=("auto", "hf", "vllm"), flag="--rollout-engine")
    num_actors: int = _f(2, "rollout actors per trial (separate from the training workers)", range=AT_LEAST_1, flag="--rollout-actors")
    cpus_per_actor: float = _f(0.15, "CPU share per rollout actor", range=NON_NEGATIVE, flag="--rollout-cpus-per-actor")
    gpus_per_actor: float = _f(0.0, "GPU share per rollout actor (e.g. 1 on a GPU cluster)", range=NON_NEGATIVE, flag="--rollout-gpus-per-actor")
    sync_every: int = _f(1, "push the policy's weights to the actors every N updates", range=AT_LEAST_1, flag="--rollout-sync-every")
    timeout_s: float = _f(300.0, "longest wait for a rollout or a weight sync before the trial fails", range=POSITIVE, flag="--rollout-timeout-s")
    start_timeout_s: float = _f(900.0, "longest wait for the actors' engines to start (vLLM on 2 CPU cores: 1-7 minutes)", range=POSITIVE, flag="--rollout-start-timeout-s")
    weight_sync: str = _f("auto", "how weights reach the actors: 'broadcast' (one gloo/NCCL group from trainer rank 0 to every vLLM worker), 'object-store' (one Ray object each actor loads), 'auto' (broadcast when every actor runs vLLM)", choices=("auto", "broadcast", "object-store"), flag="--weight-sync")
    mismatch_prompts: int = _f(4, "after each weight sync, score this many probe prompts' chosen and rejected responses with every actor and the trainer: rollout/probe_mismatch_* (0: off)", range=NON_NEGATIVE, flag="--probe-mismatch-prompts")
    vllm_gpu_memory_utilization: float = _f(0.4, "share of a GPU's memory a vLLM engine may take", range=Range(0, 1, low_open=True), flag="--rollout-vllm-gpu-memory-utilization")
    max_restarts: int = _f(3, "restarts of an actor lost with its node (start weights; the next sync updates it)", range=NON_NEGATIVE, flag="--rollout-max-restarts")

    def __post_init__(self):
        check_ranges(self)


@dataclass
class TrainConfig(DataSettings):
    # model
    model: str = _f("tiny-pythia-1m", "built-in size (tiny-pythia-1m/-4m/-16m), a Hugging Face name or a local folder")
    init_checkpoint: str | None = _f(None, "start from this saved model folder instead of `model` (the sweep sets it to the shared SFT warm-up)")
    # objective
    loss: str = _f("dpo", "sft, dpo, cdpo (label-smoothed DPO), ipo or ppo", choices=tuple(OBJECTIVES))
    sft_recipe: str = _f("chosen", "what SFT trains on (SFT trials, and the shared SFT warm-up before DPO/PPO): the 'chosen' responses, or 'both' chosen and rejected (softens DPO's squeezing effect)", choices=SFT_RECIPES)
    beta: float = _f(0.1, "DPO/IPO temperature beta", range=POSITIVE)
    label_smoothing: float = _f(0.0, "cDPO label smoothing (dpo and cdpo only); loss=cdpo uses 0.1 when this is 0", range=Range(0, 0.5, high_open=True))
    reference_logps_dir: str | None = _f(None, "folder of shared reference log-probs (the sweep computes them once); unset: the reference model runs every step")
    # optimisation
    lr: float = _f(2e-4, "peak AdamW learning rate", range=POSITIVE)
    weight_decay: float = _f(0.0, "AdamW weight decay", range=NON_NEGATIVE)
    warmup_steps: int = _f(10, "linear warm-up steps, then constant (1: no warm-up)", range=AT_LEAST_1)
    max_steps: int = _f(60, "optimizer steps (each = micro_batch_size x grad_accum_steps x num_workers pairs)", range=AT_LEAST_1)
    micro_batch_size: int = _f(8, "pairs per worker per forward", range=AT_LEAST_1)
    grad_accum_steps: int = _f(1, "micro-batches accumulated per optimizer step", range=AT_LEAST_1)
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 disables)", range=NON_NEGATIVE)
    seed: int = _f(0, "seed of model init, data order and sampling", range=NON_NEGATIVE)
    # PPO (loss=ppo): rollouts from the actor pool, rewards from a rule or a reward model
    reward: str = _f("rule", "PPO reward: 'rule' (built-in: the prompt's key words the answer uses, minus unhelpful phrases), 'dense-rule' (that, averaged with how many words of the built-in helpful answers it uses; sweeps/ppo.py's default) or a reward-model folder (sweeps/reward_model.py)")
    ppo_kl_coef: float = _f(0.05, "KL penalty coefficient to the frozen reference (per token)", range=NON_NEGATIVE)
    ppo_kl_estimator: str = _f("k1", "per-token KL estimator: k1 (log ratio) or k3 (non-negative)", choices=("k1", "k3"))
    ppo_target_kl: float = _f(0.0, "adaptive KL controller's target KL per sequence (0: fixed coefficient)", range=NON_NEGATIVE)
    ppo_kl_horizon: float = _f(1000.0, "adaptive KL controller's horizon in sequences", range=POSITIVE)
    ppo_gamma: float = _f(1.0, "discount of GAE", range=Range(0, 1))
    ppo_lam: float = _f(0.95, "lambda of GAE", range=Range(0, 1))
    ppo_clip: float = _f(0.2, "policy ratio clip", range=POSITIVE)
    ppo_value_clip: float = _f(0.2, "value clip (in reward units)", range=POSITIVE)
    ppo_vf_coef: float = _f(0.1, "weight of the value loss", range=NON_NEGATIVE)
    ppo_epochs: int = _f(2, "passes over each rollout batch", range=AT_LEAST_1)
    ppo_minibatches: int = _f(2, "minibatches per pass (per worker)", range=AT_LEAST_1)
    ppo_max_new_tokens: int = _f(24, "length limit of a rollout", range=AT_LEAST_1)
    ppo_temperature: float = _f(1.0, "sampling temperature of rollouts", range=POSITIVE)
    rollout: RolloutSettings = _f(RolloutSettings, "the rollout actors", section=True)
    # evaluation
    eval_every: int = _f(10, "score the probe set every N steps (and at step 0 and the last step)", range=AT_LEAST_1)
    num_probe_prompts: int = _f(32, "evaluation prompts in the probe set", range=AT_LEAST_1)
    probe_batch_prompts: int = _f(8, "prompts scored together in one shared-prompt pass", range=AT_LEAST_1)
    grad_cos_prompts: int = _f(2, "probe prompts per category in the grad_cos/<category> alignment at each evaluation (0: off; each costs a backward per category)", range=NON_NEGATIVE)
    greedy_max_tokens: int = _f(48, "length limit of the policy's own decodes that form the `greedy` and `sample` categories", range=AT_LEAST_1)
    probe_decodes: str = _f("local", "who decodes the greedy and sample probes of SFT/DPO trials: 'local' (the training worker) or 'actors' (the rollout actors, as PPO always does)", choices=("local", "actors"))
    probe_set_dir: str | None = _f(None, "a saved probe set folder (the sweep builds and sets it)", aliases=("--probe-set",))
    # distribution
    num_workers: int = _f(2, "Ray Train workers per trial (DDP)", range=AT_LEAST_1)
    strategy: str = _f("ddp", "how workers share the training: 'ddp' (every worker holds the full model and optimizer) or 'deepspeed' (ZeRO: --zero-stage 2 shards optimizer state and gradients across workers, 3 also the parameters; needs the deepspeed extra)", choices=("ddp", "deepspeed"))
    zero_stage: int = _f(2, "ZeRO stage with --strategy deepspeed: 1 shards optimizer state, 2 also gradients, 3 also parameters", choices=(1, 2, 3))
    cpus_per_worker: float = _f(0.3, "CPU share per worker; fractional so trials pack on small machines", range=POSITIVE)
    gpus_per_worker: float = _f(1.0, "GPU share per worker with use_gpu (fractional: several small trials share a GPU)", range=POSITIVE)
    use_gpu: bool = _f(False, "GPUs for the workers (NCCL; gpus_per_worker each); default CPU with gloo")
    checkpoint_every: int = _f(20, "report a resumable checkpoint every N steps", range=AT_LEAST_1)
    report_every: int = _f(5, "send buffered per-step metrics to Tune/MLflow every N steps (each report is a round trip)", range=AT_LEAST_1)
    # LoRA (PEFT): rank-r adapters on a frozen base; the reference is that base with the adapters off (trainers.model.lora)
    lora_rank: int = _f(0, "LoRA rank: train rank-r adapters on the frozen model (0: train every weight; needs the lora extra)", range=NON_NEGATIVE)
    lora_alpha: float = _f(16.0, "LoRA alpha: the adapters' update is scaled by alpha / rank", range=POSITIVE)
    lora_target_modules: str = _f("all-linear", "modules that get adapters: 'all-linear' (every linear layer but the output head) or comma-separated names, e.g. 'q_proj,v_proj' (Llama) or 'query_key_value' (GPT-NeoX)")

    def __post_init__(self):
        if isinstance(self.rollout, dict):  # from YAML or a recorded config
            self.rollout = RolloutSettings(**self.rollout)
        check_ranges(self)
        if self.label_smoothing and not OBJECTIVES[self.loss].label_smoothing:
            takes = [name for name, objective in OBJECTIVES.items() if objective.label_smoothing]
            raise ValueError(f"--label-smoothing applies to {' and '.join(takes)} only; loss {self.loss!r} takes none (got {self.label_smoothing})")
        if self.loss == "ppo" and self.micro_batch_size % self.ppo_minibatches:
            raise ValueError(f"--micro-batch-size ({self.micro_batch_size}) must be a multiple of --ppo-minibatches ({self.ppo_minibatches})")
        if self.strategy == "deepspeed" and self.loss == "ppo":
            raise ValueError("strategy 'deepspeed' does not support loss 'ppo' yet (PPO runs its own update loop); "
                             "use --strategy ddp for PPO")
        if self.lora_rank and self.strategy == "deepspeed":
            raise ValueError("--lora-rank with --strategy deepspeed is not supported yet; use --strategy ddp with LoRA")
        if self.lora_rank and not [m for m in self.lora_target_modules.split(",") if m.strip()]:
            raise ValueError("--lora-target-modules: name at least one module, or 'all-linear'")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig keys: {unknown}")
        return cls(**values)


@dataclass
class RewardModelConfig(DataSettings):
    """One reward-model run: the data section a training run has (so `load_training_pairs` reads it), and its own optimisation."""
    model: str = _f("tiny-pythia-1m", "built-in size, a Hugging Face name or a local causal-LM folder (the backbone)")
    max_eval_pairs: int | None = _f(None, "evaluate on only the first N held-out pairs", range=AT_LEAST_1)
    lr: float = _f(1e-3, "peak AdamW learning rate", range=POSITIVE)
    weight_decay: float = _f(0.0, "AdamW weight decay", range=NON_NEGATIVE)
    warmup_steps: int = _f(5, "linear warm-up steps, then constant (1: no warm-up)", range=AT_LEAST_1)
    max_steps: int = _f(50, "optimizer steps", range=AT_LEAST_1)
    batch_size: int = _f(16, "pairs per step", range=AT_LEAST_1)
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 disables)", range=NON_NEGATIVE)
    eval_every: int = _f(25, "held-out evaluation every N steps (and at step 0 and the last step)", range=AT_LEAST_1)
    eval_batch_size: int = _f(32, "pairs per evaluation forward", range=AT_LEAST_1)
    seed: int = _f(0, "seed of backbone and head init and of the data order", range=NON_NEGATIVE)

    def to_dict(self) -> dict:
        return asdict(self)
