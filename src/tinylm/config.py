"""Typed configuration: the model's shape, the training recipe, sampling, and named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

from tinylm.errors import TinyLMError, did_you_mean


@dataclass
class ModelConfig:
    """Shape and flavour of the decoder-only transformer."""

    vocab_size: int = 0  # 0 = take it from the tokenizer
    block_size: int = 256  # maximum context length in tokens
    n_layer: int = 6  # transformer blocks
    n_head: int = 6  # attention heads (query heads)
    n_kv_head: int = 0  # key/value heads for grouped-query attention; 0 = n_head
    n_embd: int = 384  # residual stream width
    ffn_hidden: int = 0  # feed-forward hidden width; 0 = 4 * n_embd (gelu) or 8/3 * n_embd (swiglu)
    position: str = "learned"  # "learned" absolute embeddings (GPT) or "rope" (LLaMA)
    norm: str = "layernorm"  # "layernorm" (GPT) or "rmsnorm" (LLaMA)
    mlp: str = "gelu"  # "gelu" (GPT), "swiglu" (LLaMA) or "relu2" (ReLU squared, modded-nanogpt)
    bias: bool = True  # biases in linear layers and LayerNorm
    tie_embeddings: bool = True  # share the token embedding with the output head
    dropout: float = 0.0  # dropout on embeddings, attention and residual branches
    norm_eps: float = 1e-5  # epsilon of LayerNorm / RMSNorm
    rope_theta: float = 10000.0  # RoPE base frequency
    n_expert: int = 0  # experts per Mixture-of-Experts layer; 0 = dense feed-forward
    n_expert_active: int = 2  # experts each token is routed to (top-k)
    moe_aux_weight: float = 0.01  # weight of the load-balancing loss added to the training loss
    # Speedrun options (modded-nanogpt); all off by default, measured in benchmarks/RESULTS.md (#22).
    qk_norm: bool = False  # RMS-normalise each head's queries and keys (before RoPE)
    zero_init: bool = False  # projections into the residual stream (and an untied head) start at zero
    value_embeds: int = 0  # token embeddings mixed into the values of the first and last this many layers
    embed_skip: bool = False  # every block mixes the token embedding back into its input (learned weights)
    unet_skips: bool = False  # block i's output also feeds block n_layer-1-i's input (learned weights)
    logit_softcap: float = 0.0  # > 0: logits = cap * tanh(logits / cap)

    def __post_init__(self) -> None:
        _check_choice("position", self.position, ("learned", "rope"))
        _check_choice("norm", self.norm, ("layernorm", "rmsnorm"))
        _check_choice("mlp", self.mlp, ("gelu", "swiglu", "relu2"))
        for name in ("block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise TinyLMError(f"{name} ({getattr(self, name)}) must be a positive integer.")
        if self.n_embd % self.n_head:
            raise TinyLMError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}).")
        if self.kv_heads <= 0 or self.n_head % self.kv_heads:
            raise TinyLMError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head}).")
        if self.position == "rope" and self.head_dim % 2:
            raise TinyLMError(f"RoPE needs an even head size; n_embd/n_head is {self.head_dim}.")
        if not 0.0 <= self.dropout < 1.0:
            raise TinyLMError(f"dropout ({self.dropout}) must be in [0, 1).")
        if self.n_expert < 0 or (self.n_expert and not 1 <= self.n_expert_active <= self.n_expert):
            raise TinyLMError(
                f"n_expert_active ({self.n_expert_active}) must be between 1 and n_expert ({self.n_expert})."
            )
        if not 0 <= self.value_embeds <= self.n_layer:
            raise TinyLMError(
                f"value_embeds ({self.value_embeds}) must be between 0 and n_layer ({self.n_layer})."
            )
        if self.logit_softcap < 0:
            raise TinyLMError(f"logit_softcap ({self.logit_softcap}) cannot be negative (0 turns it off).")

    def extras(self) -> list[str]:
        """The speedrun options this model computes with, which GPT-2 and LLaMA architectures do not have."""
        on = [f"mlp={self.mlp}"] if self.mlp == "relu2" else []
        on += [name for name in ("qk_norm", "embed_skip", "unet_skips") if getattr(self, name)]
        on += [
            f"{name}={getattr(self, name)}"
            for name in ("value_embeds", "logit_softcap")
            if getattr(self, name)
        ]
        return on

    @property
    def qwen3(self) -> bool:
        """Whether this is Qwen3's architecture: LLaMA-style, dense, no biases, with QK-norm its one extra."""
        llama = (self.position, self.norm, self.mlp) == ("rope", "rmsnorm", "swiglu")
        return llama and self.extras() == ["qk_norm"] and not (self.n_expert or self.bias)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def hidden_dim(self) -> int:
        """Feed-forward hidden width, with the usual default per MLP kind."""
        if self.ffn_hidden:
            return self.ffn_hidden
        if self.mlp == "swiglu":
            return 64 * ((8 * self.n_embd // 3 + 63) // 64)
        return 4 * self.n_embd


@dataclass
class TrainConfig:
    """The training recipe: how long, how fast, how often to evaluate and save."""

    batch_size: int = 16  # sequences per optimizer micro-step (per process)
    max_steps: int = 1000  # optimizer steps (ignored when epochs > 0)
    epochs: int = 0  # > 0: train this many passes over the sliding-window dataset
    window_stride: int = 1  # epoch mode: distance between consecutive training windows
    grad_accum: int = 1  # micro-batches per optimizer step
    batch_size_start: int = 0  # > 0: sequences per micro-step at step 0, growing linearly to batch_size
    block_size_start: int = 0  # > 0: tokens per sequence at step 0, growing linearly to block_size
    ramp_steps: int = 0  # steps over which the batch-size and sequence-length ramps reach full size
    lr: float = 3e-4  # peak learning rate
    min_lr_ratio: float = 0.1  # final learning rate as a fraction of the peak (cosine, wsd)
    schedule: str = "cosine"  # "cosine" (warmup then cosine), "constant" (warmup then flat), "wsd"
    warmup_steps: int = 100  # linear warmup length in optimizer steps
    decay_fraction: float = 0.2  # wsd: fraction of the run spent decaying at the end
    weight_decay: float = 0.1  # decoupled weight decay, applied to matrices only
    optimizer: str = "adamw"  # "adamw", or "muon": Muon on the blocks' weight matrices, AdamW on the rest
    muon_lr: float = 0.02  # optimizer muon: peak learning rate of the Muon part (scheduled like lr)
    orthogonalizer: str = (
        "newton-schulz"  # Muon: "newton-schulz" (Jordan et al.) or "polar-express" (Amsel et al.)
    )
    ns_steps: int = 5  # Muon: iterations of the orthogonalizer
    normuon: bool = (
        False  # Muon: NorMuon's per-neuron second-moment normalisation of the update (Li et al., 2025)
    )
    normuon_beta2: float = 0.95  # NorMuon: decay of the per-neuron second moment
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    max_grad_norm: float = 1.0  # clip the global gradient norm to this; 0 = no clipping
    eval_interval: int = 250  # steps between validation runs (step mode)
    eval_batches: int = 20  # batches per validation estimate during training
    eval_tokens: int = 0  # > 0: validation token budget per estimate instead (rounded up to whole batches)
    log_interval: int = 10  # steps between metrics.jsonl rows
    save_interval: int = 0  # > 0: also keep a step_N checkpoint every this many steps
    keep_last: int = 0  # > 0: keep only this many step_N / epoch_N checkpoints
    seed: int = 1337  # seeds initialization, data order and dropout
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:N" or "mps"
    dtype: str = "auto"  # "auto", "fp32", "bf16" or "fp16" (mixed precision)
    compile: bool = False  # torch.compile the model
    grad_checkpointing: bool = False  # recompute block activations in backward to save memory
    fsdp: bool = False  # shard with FSDP2 under torchrun instead of DDP (and checkpoint each rank's shards)
    async_save: bool = False  # write checkpoints in the background while training continues
    tensorboard: bool = False  # also log metrics to RUN_DIR/tensorboard
    wandb: bool = False  # also log metrics to Weights & Biases

    def __post_init__(self) -> None:
        _check_choice("schedule", self.schedule, ("cosine", "constant", "wsd"))
        _check_choice("optimizer", self.optimizer, ("adamw", "muon"))
        _check_choice("orthogonalizer", self.orthogonalizer, ("newton-schulz", "polar-express"))
        if not 1 <= self.ns_steps <= (5 if self.orthogonalizer == "polar-express" else 10):
            raise TinyLMError(
                f"ns_steps ({self.ns_steps}) must be between 1 and 5 for polar-express (its published "
                "coefficients are five) and between 1 and 10 for newton-schulz."
            )
        if not 0.0 <= self.normuon_beta2 < 1.0:
            raise TinyLMError(f"normuon_beta2 ({self.normuon_beta2}) must be in [0, 1).")
        if not 0 <= self.batch_size_start <= self.batch_size:
            raise TinyLMError(
                f"batch_size_start ({self.batch_size_start}) must be between 0 (off) and batch_size ({self.batch_size})."
            )
        if self.ramp_steps < 0 or ((self.batch_size_start or self.block_size_start) and not self.ramp_steps):
            raise TinyLMError(
                "A batch-size or sequence-length ramp needs ramp_steps > 0 (and never negative)."
            )
        if (self.batch_size_start or self.block_size_start) and self.epochs:
            raise TinyLMError(
                "Batch-size and sequence-length ramps crop each step's batch, so an epoch would skip windows; "
                "use them with --max-steps, not --epochs."
            )
        if self.optimizer == "muon" and self.fsdp:
            raise TinyLMError(
                "optimizer muon orthogonalizes whole matrices, which FSDP shards; train it with DDP (omit --fsdp)."
            )
        _check_choice("dtype", self.dtype, ("auto", "fp32", "bf16", "fp16"))
        for name in (
            "batch_size",
            "grad_accum",
            "eval_interval",
            "eval_batches",
            "log_interval",
            "window_stride",
        ):
            if getattr(self, name) <= 0:
                raise TinyLMError(f"{name} ({getattr(self, name)}) must be a positive integer.")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise TinyLMError("Give a positive max_steps or epochs: there is nothing to train otherwise.")
        if self.lr <= 0:
            raise TinyLMError(f"lr ({self.lr}) must be positive.")
        if self.muon_lr <= 0:
            raise TinyLMError(f"lr ({self.lr}) and muon_lr ({self.muon_lr}) must be positive.")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise TinyLMError(f"min_lr_ratio ({self.min_lr_ratio}) must be in [0, 1].")
        if self.warmup_steps < 0 or self.max_grad_norm < 0 or self.save_interval < 0 or self.keep_last < 0:
            raise TinyLMError("warmup_steps, max_grad_norm, save_interval and keep_last cannot be negative.")
        if self.eval_tokens < 0:
            raise TinyLMError(f"eval_tokens ({self.eval_tokens}) cannot be negative (0 uses eval_batches).")


@dataclass
class PrepareConfig:
    """How `tinylm prepare` reads, splits, tokenizes and shards a corpus."""

    tokenizer: str = "char"  # "char" (the corpus's characters), "bpe" (byte-level, trained here) or "gpt2"
    vocab_size: int = 4096  # BPE vocabulary size
    val_fraction: float = 0.1  # held out: whole documents (every 10th), or the tail of a single document
    text_field: str = "text"  # the field of JSONL, Parquet and Hugging Face rows that holds the text
    tokenizer_sample: int = 100_000_000  # characters the BPE learns from: the first ones of the training text
    shard_tokens: int = 100_000_000  # tokens per shard file (200 MB of uint16, as modded-nanogpt's shards)

    def __post_init__(self) -> None:
        _check_choice("tokenizer", self.tokenizer, ("char", "bpe", "gpt2"))
        if not 0.0 < self.val_fraction < 1.0:
            raise TinyLMError(f"--val-fraction ({self.val_fraction}) must be between 0 and 1.")
        for name in ("vocab_size", "tokenizer_sample", "shard_tokens"):
            if getattr(self, name) <= 0:
                raise TinyLMError(f"{name} ({getattr(self, name)}) must be a positive integer.")
        if not self.text_field:
            raise TinyLMError("--text-field cannot be empty.")


# Sampling ranges whose arithmetic stays finite: logits of any magnitude below 1e33 divided by the smallest
# temperature and penalty stay below float32's 3.4e38 (a temperature of 1e-40 made them infinite).
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 100.0
MIN_PENALTY, MAX_PENALTY = 1e-2, 100.0


@dataclass
class SampleConfig:
    """How to pick each next token: the one home of every sampling default (API, CLI, apps, server)."""

    max_new_tokens: int = 200  # tokens to generate
    temperature: float = 0.8  # > 0; lower is more conservative
    top_k: int = 50  # keep the k most likely tokens; 0 = off
    top_p: float = 1.0  # nucleus: keep the smallest set reaching this probability; 1.0 = off
    repetition_penalty: float = 1.0  # > 1 discourages tokens already present; 1.0 = off
    do_sample: bool = True  # False = greedy decoding (always the most likely token)
    seed: int | None = None  # fixes the sampled text
    stop: tuple[str, ...] = ()  # stop when any of these strings appears in the continuation
    rolling_cache: bool = (
        False  # past the context keep the last block_size keys (RoPE) instead of re-encoding
    )

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise TinyLMError(f"max_new_tokens ({self.max_new_tokens}) cannot be negative.")
        if self.do_sample and not MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE:
            raise TinyLMError(
                f"temperature ({self.temperature}) must be between {MIN_TEMPERATURE} and {MAX_TEMPERATURE} "
                "when sampling (lower ones overflow the logits); use greedy decoding instead."
            )
        if self.top_k < 0:
            raise TinyLMError(f"top_k ({self.top_k}) cannot be negative (0 turns it off).")
        if not 0.0 < self.top_p <= 1.0:
            raise TinyLMError(f"top_p ({self.top_p}) must be in (0, 1].")
        if not MIN_PENALTY <= self.repetition_penalty <= MAX_PENALTY:
            raise TinyLMError(
                f"repetition_penalty ({self.repetition_penalty}) must be between {MIN_PENALTY} and {MAX_PENALTY}."
            )
        self.stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def greedy(self) -> bool:
        return not self.do_sample


@dataclass
class ServeConfig:
    """Scheduling and request limits of `tinylm serve`: the one home of their defaults (server and CLI).

    Each limit is checked before any work on the request; exceeding one is an HTTP 4xx naming it.
    """

    max_batch: int = 16  # sequences decoded together in one step
    max_queue: int = 256  # sequences allowed to wait for a row; more get HTTP 429
    max_body_bytes: int = 1_000_000  # request body size; larger gets HTTP 413 before it is parsed
    max_prompt_tokens: int = 0  # tokens per prompt; 0 = the model's context (longer prompts keep their end)
    max_tokens: int = 4096  # largest max_tokens a request may ask for (it may exceed the context)
    max_n: int = 16  # choices per request
    max_logprobs: int = 20  # alternatives reported per token
    max_stop: int = 4  # stop strings per request
    max_stop_chars: int = 64  # characters per stop string

    def __post_init__(self) -> None:
        for f in fields(self):
            least = 0 if f.name in ("max_queue", "max_prompt_tokens", "max_logprobs", "max_stop") else 1
            if getattr(self, f.name) < least:
                raise TinyLMError(
                    f"{f.name} ({getattr(self, f.name)}) must be at least {least} "
                    f"(tinylm serve {self.flag(f.name)})."
                )

    @staticmethod
    def flag(name: str) -> str:
        """The `tinylm serve` flag that sets field `name`."""
        return "--max-tokens-limit" if name == "max_tokens" else "--" + name.replace("_", "-")


# Each application's own sampling defaults (tinylm complete / story / ask); options a caller gives replace them.
APP_SAMPLING: dict[str, SampleConfig] = {
    "complete": SampleConfig(max_new_tokens=50),
    "story": SampleConfig(max_new_tokens=200, temperature=0.8),
    "ask": SampleConfig(max_new_tokens=50, temperature=0.7, stop=("\n",)),
}


def sample_config(base: SampleConfig | None = None, **options: Any) -> SampleConfig:
    """`base` (default SampleConfig()) with the given fields replaced; None values keep the base's.

    The one way every caller (generate, stream, the apps, chat, the CLI) turns options into a
    SampleConfig, so a default lives only in SampleConfig. `greedy=True` is do_sample=False.
    """
    options = {k: v for k, v in options.items() if v is not None}
    if "greedy" in options:
        greedy = options.pop("greedy")
        if greedy:
            options["do_sample"] = False
    names = {f.name for f in fields(SampleConfig)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise TinyLMError(
            f"unknown sampling option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}."
        )
    return dataclasses.replace(base or SampleConfig(), **options)


_GPT = dict(position="learned", norm="layernorm", mlp="gelu")
_LLAMA = dict(position="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False)

# cpu-char's shape, LLaMA-style, Muon + AdamW, with the speedrun options that helped beyond seed noise
# (benchmarks/RESULTS.md, issue 22): QK-norm and NorMuon (each about -0.03 at 225 steps), which let 175 steps
# do what 225 did; the sequence-length ramp (16 to 64 tokens over the first 75 steps) costs no loss beyond
# the noise and 17% of the tokens.
_CPU_LLAMA = dict(
    **{**_LLAMA, "tie_embeddings": True},
    block_size=64,
    n_layer=4,
    n_head=4,
    n_embd=128,
    dropout=0.0,
    qk_norm=True,
    batch_size=24,
    block_size_start=16,
    ramp_steps=75,
    optimizer="muon",
    muon_lr=0.04,
    normuon=True,
    lr=6e-3,
    beta2=0.99,
    warmup_steps=50,
    max_steps=175,
    eval_interval=175,
)

# Each preset: fields of ModelConfig and TrainConfig. vocab_size always comes from the tokenizer.
PRESETS: dict[str, dict[str, Any]] = {
    # The first tutorial's LLaMA-style character model with a Mixture-of-Experts feed-forward:
    # 43 trainable tensors, about 2.25M parameters with a 65-character vocabulary.
    "seed-char-moe": dict(
        **_LLAMA,
        block_size=128,
        n_layer=4,
        n_head=8,
        n_embd=128,
        ffn_hidden=320,
        n_expert=4,
        n_expert_active=2,
        dropout=0.0,
        batch_size=32,
        lr=1e-3,
        warmup_steps=100,
        max_steps=2000,
        eval_interval=200,
    ),
    # The second tutorial's Mini-GPT (WikiText-2, subword tokenizer).
    "mini-gpt": dict(
        **_GPT,
        block_size=128,
        n_layer=4,
        n_head=8,
        n_embd=256,
        ffn_hidden=1024,
        dropout=0.1,
        batch_size=32,
        lr=3e-4,
        warmup_steps=500,
        max_steps=5000,
        eval_interval=500,
    ),
    # nanoGPT's baby GPT on Tiny Shakespeare characters (about 10.7M parameters).
    "shakespeare-char": dict(
        **_GPT,
        block_size=256,
        n_layer=6,
        n_head=6,
        n_embd=384,
        dropout=0.2,
        bias=False,
        batch_size=64,
        lr=1e-3,
        beta2=0.99,
        warmup_steps=100,
        max_steps=5000,
        eval_interval=250,
        eval_batches=50,  # nanoGPT uses 200; 50 keeps validation under 10% of the training compute
    ),
    # GPT-2 small, 124M parameters.
    "gpt2-small": dict(
        **_GPT,
        block_size=1024,
        n_layer=12,
        n_head=12,
        n_embd=768,
        dropout=0.0,
        batch_size=12,
        grad_accum=40,
        lr=6e-4,
        warmup_steps=2000,
        max_steps=600000,
        eval_interval=1000,
    ),
    # A fast CPU recipe for characters: 4 layers, 128 wide, context 64.
    "cpu-char": dict(
        **_GPT,
        block_size=64,
        n_layer=4,
        n_head=4,
        n_embd=128,
        dropout=0.0,
        bias=False,
        batch_size=12,
        lr=1e-3,
        beta2=0.99,
        warmup_steps=100,
        max_steps=2000,
        eval_interval=500,
    ),
    "cpu-llama": _CPU_LLAMA,  # see _CPU_LLAMA
    # The CPU time-to-quality record (`make demo`): cpu-llama made shallow and trained longer. At this scale depth
    # costs more time than it buys: 2 layers for 225 steps reach a lower loss than 4 layers for 175 in 40% less
    # time (seeds 1 to 3: 1.848 against 1.864 mean, 15 against 26 s of training CPU; RESULTS.md, issue 22).
    "cpu-record": {**_CPU_LLAMA, "n_layer": 2, "ramp_steps": 95, "max_steps": 225, "eval_interval": 225},
    # Seconds-long runs for tests and smoke checks.
    "tiny": dict(
        **_GPT,
        block_size=32,
        n_layer=2,
        n_head=2,
        n_embd=32,
        dropout=0.0,
        batch_size=8,
        lr=3e-3,
        warmup_steps=10,
        max_steps=100,
        eval_interval=50,
        eval_batches=5,
    ),
}
DEFAULT_PRESET = "tiny"  # what `train` and `info` use without --preset: a test-sized model, which they name


# The vocabulary each preset is meant for (its tutorial's tokenizer: GPT-2's 50,257 subwords or Tiny
# Shakespeare's 65 characters). Training always takes vocab_size from the data's tokenizer; this is what
# `tinylm info --preset` counts parameters with.
PRESET_VOCAB: dict[str, int] = {"mini-gpt": 50257, "gpt2-small": 50257}
CHAR_VOCAB = 65


def preset_vocab_size(preset: str) -> int:
    """The vocabulary size `preset` is meant for (65 characters unless it is a subword preset)."""
    return PRESET_VOCAB.get(preset, CHAR_VOCAB)


# Fine-tuning starts from the base run's recipe with these changes. Both learning rates (lr and, for
# optimizer muon, muon_lr) become FINETUNE_LR_SCALE of the base run's, and scale together with --lr.
# a fine-tune starts from a trained model: no batch-size / sequence-length ramps (they would crop the pairs)
FINETUNE_DEFAULTS: dict[str, Any] = dict(
    warmup_steps=20, max_steps=200, epochs=0, batch_size_start=0, block_size_start=0, ramp_steps=0
)
FINETUNE_LR_SCALE = 1 / 3


def finetune_config(base: TrainConfig, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The training config of a fine-tuning run: `base` + FINETUNE_DEFAULTS + overrides; muon_lr follows lr."""
    overrides = overrides or {}
    lr = overrides.get("lr", base.lr * FINETUNE_LR_SCALE)
    values = {**to_dict(base), **FINETUNE_DEFAULTS, "lr": lr, "muon_lr": base.muon_lr * lr / base.lr}
    return from_dict(TrainConfig, {**values, **overrides})


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise TinyLMError(f"{name} must be one of {', '.join(choices)}; got {value!r}.")


def field_names(cls: type) -> set[str]:
    """Names of a config dataclass's fields."""
    return {f.name for f in fields(cls)}


def build_configs(
    preset: str = DEFAULT_PRESET, overrides: dict[str, Any] | None = None, vocab_size: int = 0
) -> tuple[ModelConfig, TrainConfig]:
    """Model and training configs from a preset, with `overrides` applied to whichever owns each key."""
    if preset not in PRESETS:
        raise TinyLMError(
            f"Unknown preset {preset!r}.{did_you_mean(preset, PRESETS)} Choose one of: {', '.join(PRESETS)}."
        )
    values = {**PRESETS[preset], **(overrides or {})}
    keys = field_names(ModelConfig) | field_names(TrainConfig)
    unknown = sorted(set(values) - keys)
    if unknown:
        raise TinyLMError(
            f"Unknown config key(s) {', '.join(unknown)}.{did_you_mean(unknown[0], keys)} Valid keys are "
            f"{', '.join(sorted(keys))}."
        )
    model_kwargs = {k: v for k, v in values.items() if k in field_names(ModelConfig)}
    if vocab_size:
        model_kwargs["vocab_size"] = vocab_size
    train_kwargs = {k: v for k, v in values.items() if k in field_names(TrainConfig)}
    model_cfg, train_cfg = ModelConfig(**model_kwargs), TrainConfig(**train_kwargs)
    if not 0 <= train_cfg.block_size_start <= model_cfg.block_size:
        raise TinyLMError(
            f"block_size_start ({train_cfg.block_size_start}) must be between 0 (off) and block_size "
            f"({model_cfg.block_size})."
        )
    return model_cfg, train_cfg


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Turn ["n_layer=6", "dropout=0.1", "bias=false"] into typed values checked against the config fields."""
    types = {f.name: f.type for cls in (ModelConfig, TrainConfig) for f in fields(cls)}
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise TinyLMError(f"--set expects key=value, got {pair!r}.")
        if key not in types:
            raise TinyLMError(
                f"Unknown config key {key!r} in --set.{did_you_mean(key, types)} "
                "See `tinylm info --preset NAME --json` for the keys."
            )
        out[key] = _coerce(key, raw.strip(), str(types[key]))
    return out


def _coerce(key: str, raw: str, type_name: str) -> Any:
    try:
        if type_name == "bool":
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if type_name == "int":
            return int(raw)
        if type_name == "float":
            return float(raw)
        return raw
    except ValueError:
        raise TinyLMError(f"Bad value for {key}: {raw!r} is not a valid {type_name}.") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass."""
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a config, ignoring keys a newer or older version may have added."""
    known = field_names(cls)
    return cls(**{k: v for k, v in data.items() if k in known})


__all__ = [
    "ModelConfig",
    "TrainConfig",
    "SampleConfig",
    "sample_config",
    "APP_SAMPLING",
    "PRESETS",
    "PRESET_VOCAB",
    "DEFAULT_PRESET",
    "preset_vocab_size",
    "build_configs",
    "finetune_config",
    "FINETUNE_DEFAULTS",
    "parse_overrides",
    "to_dict",
    "from_dict",
]
