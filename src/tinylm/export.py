"""Hugging Face interoperability: export runs as GPT2LMHeadModel / LlamaForCausalLM / MixtralForCausalLM
directories, and import local transformers GPT-2 / LLaMA / Mixtral checkpoints as tinylm runs."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tinylm.checkpoint import RunRecord, load_run, save_checkpoint
from tinylm.config import ModelConfig, TrainConfig
from tinylm.errors import TinyLMError
from tinylm.tokenizer import EOT, CharTokenizer, HFTokenizer, Tokenizer

State = dict[str, torch.Tensor]


def _transformers():
    try:
        import transformers
    except ImportError:
        raise TinyLMError(
            "Hugging Face export/import needs transformers: pip install 'tinylm[hf]'."
        ) from None
    if not sys.stderr.isatty():  # its loading/saving bars would redraw with carriage returns in a log
        transformers.utils.logging.disable_progress_bar()
    return transformers


def hf_architecture(cfg: ModelConfig) -> str:
    """ "gpt2", "llama", "mixtral" or "qwen3": the transformers architecture that represents this model exactly."""
    gpt = (cfg.position, cfg.norm, cfg.mlp) == ("learned", "layernorm", "gelu")
    llama = (cfg.position, cfg.norm, cfg.mlp) == ("rope", "rmsnorm", "swiglu")
    if cfg.qwen3:
        return "qwen3"  # LLaMA with RMS-normalised queries and keys (whose norm weights stay ones)
    if cfg.extras():
        raise TinyLMError(
            f"This model uses {', '.join(cfg.extras())}, which GPT-2, LLaMA, Mixtral and Qwen3 (LLaMA with "
            "qk_norm, dense, no biases) do not compute, so it is not exportable; train without those options."
        )
    if gpt and not cfg.n_expert and cfg.kv_heads == cfg.n_head:
        return "gpt2"
    if llama and not cfg.n_expert:
        return "llama"
    if llama and cfg.n_expert and not cfg.bias:
        return "mixtral"
    raise TinyLMError(
        f"This model (position={cfg.position}, norm={cfg.norm}, mlp={cfg.mlp}, n_expert={cfg.n_expert}, "
        f"n_kv_head={cfg.n_kv_head}) has no exact transformers architecture, so it is not exportable; "
        "GPT-2 (learned/layernorm/gelu, dense), LLaMA (rope/rmsnorm/swiglu) and Mixtral (LLaMA + MoE) are."
    )


# ----- one weight mapping per architecture, used in both directions ----------------------------
@dataclass(frozen=True)
class Rule:
    """Our tensors `ours` <-> one transformers tensor `theirs`.

    `sizes` (split along dim 0 of our layout) joins several of ours into one of theirs (GPT-2's
    fused qkv, Mixtral's gate_up); `transpose` swaps the last two dims (GPT-2's Conv1D, experts);
    `expert_cat` joins on the last dim before the transpose (Mixtral's (E, C, 2H) gate_up).
    `zeros` fills absent tensors of ours with zeros on export (bias-free models as GPT-2).
    """

    ours: tuple[str, ...]
    theirs: str
    sizes: tuple[int, ...] = ()
    transpose: bool = False
    expert_cat: bool = False
    zeros: bool = False

    def to_hf(self, sd: State) -> torch.Tensor:
        parts = [sd[k] if k in sd or not self.zeros else torch.zeros(n) for k, n in self._sized()]
        t = torch.cat(parts, dim=-1 if self.expert_cat else 0) if len(parts) > 1 else parts[0]
        return t.transpose(-2, -1) if self.transpose else t

    def from_hf(self, t: torch.Tensor) -> dict[str, torch.Tensor]:
        t = t.transpose(-2, -1) if self.transpose else t
        parts = t.split(list(self.sizes), dim=-1 if self.expert_cat else 0) if self.sizes else (t,)
        return {k: p.contiguous() for k, p in zip(self.ours, parts)}

    def _sized(self) -> list[tuple[str, int]]:
        return list(zip(self.ours, self.sizes or (0,) * len(self.ours)))


def _gpt2_rules(cfg: ModelConfig) -> list[Rule]:
    C, H = cfg.n_embd, cfg.hidden_dim
    rules = [
        Rule(("tok_emb.weight",), "transformer.wte.weight"),
        Rule(("pos_emb.weight",), "transformer.wpe.weight"),
        Rule(("norm_f.weight",), "transformer.ln_f.weight"),
        Rule(("norm_f.bias",), "transformer.ln_f.bias", (C,), zeros=True),
    ]
    if not cfg.tie_embeddings:
        rules.append(Rule(("lm_head.weight",), "lm_head.weight"))
    for i in range(cfg.n_layer):
        b, h = f"blocks.{i}.", f"transformer.h.{i}."
        qkv = tuple(f"{b}attn.{w}" for w in ("wq", "wk", "wv"))
        rules += [
            Rule((b + "norm1.weight",), h + "ln_1.weight"),
            Rule((b + "norm1.bias",), h + "ln_1.bias", (C,), zeros=True),
            Rule((b + "norm2.weight",), h + "ln_2.weight"),
            Rule((b + "norm2.bias",), h + "ln_2.bias", (C,), zeros=True),
            # GPT-2's Conv1D stores (in, out): transposed nn.Linear weights; q, k, v fused
            Rule(tuple(w + ".weight" for w in qkv), h + "attn.c_attn.weight", (C, C, C), transpose=True),
            Rule(tuple(w + ".bias" for w in qkv), h + "attn.c_attn.bias", (C, C, C), zeros=True),
        ]
        for ours, theirs, n in (
            ("attn.wo", "attn.c_proj", C),
            ("ff.fc", "mlp.c_fc", H),
            ("ff.proj", "mlp.c_proj", C),
        ):
            rules += [
                Rule((f"{b}{ours}.weight",), f"{h}{theirs}.weight", transpose=True),
                Rule((f"{b}{ours}.bias",), f"{h}{theirs}.bias", (n,), zeros=True),
            ]
    return rules


_LLAMA_LINEARS = {
    "attn.wq": "self_attn.q_proj",
    "attn.wk": "self_attn.k_proj",
    "attn.wv": "self_attn.v_proj",
    "attn.wo": "self_attn.o_proj",
}
_LLAMA_MLP = {"ff.w1": "mlp.gate_proj", "ff.w3": "mlp.up_proj", "ff.w2": "mlp.down_proj"}


def _llama_rules(cfg: ModelConfig) -> list[Rule]:
    """LLaMA, and Mixtral (its experts: gate_up_proj[e] = [w1[e]^T; w3[e]^T], down_proj[e] = w2[e]^T)."""
    rules = [
        Rule(("tok_emb.weight",), "model.embed_tokens.weight"),
        Rule(("norm_f.weight",), "model.norm.weight"),
    ]
    if not cfg.tie_embeddings:
        rules.append(Rule(("lm_head.weight",), "lm_head.weight"))
    linears = dict(_LLAMA_LINEARS) if cfg.n_expert else {**_LLAMA_LINEARS, **_LLAMA_MLP}
    H = cfg.hidden_dim
    for i in range(cfg.n_layer):
        b, h = f"blocks.{i}.", f"model.layers.{i}."
        rules += [
            Rule((b + "norm1.weight",), h + "input_layernorm.weight"),
            Rule((b + "norm2.weight",), h + "post_attention_layernorm.weight"),
        ]
        for ours, theirs in linears.items():
            suffixes = ("weight", "bias") if cfg.bias else ("weight",)
            rules += [Rule((f"{b}{ours}.{x}",), f"{h}{theirs}.{x}") for x in suffixes]
        if cfg.n_expert:
            rules += [
                Rule((b + "ff.gate.weight",), h + "mlp.gate.weight"),
                Rule((b + "ff.w1", b + "ff.w3"), h + "mlp.experts.gate_up_proj", (H, H), True, True),
                Rule((b + "ff.w2",), h + "mlp.experts.down_proj", transpose=True),
            ]
    return rules


def hf_rules(cfg: ModelConfig) -> list[Rule]:
    """The weight mapping of this model's transformers architecture (both directions)."""
    return _gpt2_rules(cfg) if hf_architecture(cfg) == "gpt2" else _llama_rules(cfg)


def qk_norm_weights(cfg: ModelConfig) -> list[str]:
    """Qwen3's per-layer query and key RMSNorm weights: tinylm's qk_norm has none, so they are ones."""
    if not cfg.qk_norm:
        return []
    return [
        f"model.layers.{i}.self_attn.{n}.weight" for i in range(cfg.n_layer) for n in ("q_norm", "k_norm")
    ]


def to_hf_state(cfg: ModelConfig, sd: State) -> State:
    """Our state dict in the transformers layout."""
    ones = {name: torch.ones(cfg.head_dim) for name in qk_norm_weights(cfg)}
    return {**{r.theirs: r.to_hf(sd) for r in hf_rules(cfg)}, **ones}


def from_hf_state(cfg: ModelConfig, sd: State) -> State:
    """A transformers state dict in our layout: the same rules, inverted."""
    out: State = {}
    for rule in hf_rules(cfg):
        if not (rule.zeros and not cfg.bias):  # a bias-free model exported zeros: nothing to read back
            out.update(rule.from_hf(sd[rule.theirs]))
    if any(not torch.all(sd[name] == 1) for name in qk_norm_weights(cfg)):
        raise TinyLMError(
            "This Qwen3 model has trained query/key norm weights; tinylm's qk_norm has none, so it cannot be "
            "imported exactly."
        )
    return out


# ----- configs -------------------------------------------------------------------------------
def _gpt2_config(cfg: ModelConfig) -> Any:
    return _transformers().GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.block_size,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_inner=cfg.hidden_dim,
        activation_function="gelu_new",
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        layer_norm_epsilon=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=None,
        eos_token_id=None,
    )


def _llama_config(cfg: ModelConfig) -> Any:
    tf = _transformers()
    common = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.n_embd,
        intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.block_size,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        hidden_act="silu",
        attention_dropout=cfg.dropout,
        bos_token_id=None,
        eos_token_id=None,
    )
    if cfg.qk_norm:
        return tf.Qwen3Config(**common, head_dim=cfg.head_dim, attention_bias=False, use_sliding_window=False)
    if cfg.n_expert:
        return tf.MixtralConfig(
            **common,
            num_local_experts=cfg.n_expert,
            num_experts_per_tok=cfg.n_expert_active,
            router_aux_loss_coef=cfg.moe_aux_weight,
            sliding_window=None,
        )
    return tf.LlamaConfig(**common, attention_bias=cfg.bias, mlp_bias=cfg.bias)


def hf_tokenizer(tokenizer: Tokenizer) -> Any:
    """A transformers fast tokenizer equivalent to ours (characters become a word-level vocabulary)."""
    tf = _transformers()
    if isinstance(tokenizer, HFTokenizer):
        return tf.PreTrainedTokenizerFast(
            tokenizer_object=tokenizer.tok,
            eos_token=EOT,
            bos_token=EOT,
            unk_token=EOT,
            clean_up_tokenization_spaces=False,
        )
    if isinstance(tokenizer, CharTokenizer):
        from tokenizers import Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as _Tok

        tok = _Tok(
            models.WordLevel({c: i for i, c in enumerate(tokenizer.chars)}, unk_token=tokenizer.chars[0])
        )
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tok.decoder = decoders.Fuse()
        return tf.PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False)
    raise TinyLMError(f"Cannot export a {type(tokenizer).__name__} tokenizer.")


def to_hf_model(cfg: ModelConfig, sd: State) -> Any:
    """The transformers GPT2LMHeadModel / LlamaForCausalLM / MixtralForCausalLM holding a tinylm state dict."""
    tf = _transformers()
    arch = hf_architecture(cfg)
    config = (_gpt2_config if arch == "gpt2" else _llama_config)(cfg)
    state = to_hf_state(cfg, sd)
    cls = {
        "gpt2": tf.GPT2LMHeadModel,
        "llama": tf.LlamaForCausalLM,
        "mixtral": tf.MixtralForCausalLM,
        "qwen3": tf.Qwen3ForCausalLM,
    }[arch]
    hf_model = cls(config)
    missing, unexpected = hf_model.load_state_dict(
        {k: v.contiguous() for k, v in state.items()}, strict=False
    )
    missing = [
        k for k in missing if not (k == "lm_head.weight" and cfg.tie_embeddings) and "attn.bias" not in k
    ]
    if missing or unexpected:
        raise TinyLMError(
            f"Export mapping is incomplete (missing {missing[:5]}, unexpected {unexpected[:5]}); please report this."
        )
    return hf_model


def export_hf(run_dir: str | Path, out: str | Path, checkpoint: str = "last") -> Path:
    """Write a directory that transformers' AutoModelForCausalLM / AutoTokenizer load offline."""
    if Path(out).exists():
        raise TinyLMError(f"{out} already exists; choose another --out (export never overwrites).")
    run = load_run(run_dir, checkpoint)
    model = run.model
    if run.record.lora is not None:
        from tinylm.lora import merge_lora

        model = merge_lora(model)
    hf_model = to_hf_model(run.model_cfg, model.state_dict())
    out = Path(out)
    hf_model.save_pretrained(out)
    hf_tokenizer(run.tokenizer).save_pretrained(out)
    return out


# ----- transformers -> tinylm --------------------------------------------------------------
def _from_gpt2(config: Any, sd: State) -> tuple[ModelConfig, State]:
    if config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        raise TinyLMError(
            f"GPT-2 models with activation {config.activation_function!r} are not supported (gelu_new is)."
        )
    cfg = ModelConfig(
        vocab_size=config.vocab_size,
        block_size=config.n_positions,
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_embd=config.n_embd,
        ffn_hidden=config.n_inner or 4 * config.n_embd,
        norm_eps=config.layer_norm_epsilon,
        bias=True,
        tie_embeddings=bool(getattr(config, "tie_word_embeddings", True)),
        dropout=0.0,
    )
    return cfg, from_hf_state(cfg, sd)


def _from_llama_like(config: Any, sd: State) -> tuple[ModelConfig, State]:
    # transformers 5 keeps RoPE settings in rope_parameters; 4.x in rope_theta and rope_scaling
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise TinyLMError(
            f"RoPE scaling ({rope.get('rope_type')}) is not supported; only plain RoPE models import."
        )
    if getattr(config, "hidden_act", "silu") != "silu":
        raise TinyLMError(f"Activation {config.hidden_act!r} is not supported (silu is).")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim * config.num_attention_heads != config.hidden_size:
        raise TinyLMError("Models whose head_dim * heads differs from hidden_size are not supported.")
    moe = config.model_type == "mixtral"
    bias = bool(getattr(config, "attention_bias", False))
    if config.model_type == "qwen3" and getattr(config, "use_sliding_window", False):
        raise TinyLMError("Qwen3 models with sliding-window attention are not supported.")
    if bias != bool(getattr(config, "mlp_bias", False)):
        raise TinyLMError(
            "Models with biases in attention but not the MLP (or the reverse) are not supported."
        )
    cfg = ModelConfig(
        vocab_size=config.vocab_size,
        block_size=config.max_position_embeddings,
        n_layer=config.num_hidden_layers,
        n_head=config.num_attention_heads,
        n_kv_head=config.num_key_value_heads,
        n_embd=config.hidden_size,
        ffn_hidden=config.intermediate_size,
        position="rope",
        norm="rmsnorm",
        mlp="swiglu",
        bias=bias,
        tie_embeddings=bool(config.tie_word_embeddings),
        norm_eps=config.rms_norm_eps,
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        n_expert=config.num_local_experts if moe else 0,
        n_expert_active=config.num_experts_per_tok if moe else 2,
        qk_norm=config.model_type == "qwen3",
    )
    return cfg, from_hf_state(cfg, sd)


def import_hf(src: str | Path, out: str | Path, tokenizer: str | Path | None = None) -> Path:
    """Turn a local transformers GPT-2 / LLaMA / Mixtral / Qwen3 directory into a tinylm run directory.

    The tokenizer comes from `src`, or from the directory `tokenizer` when given.
    """
    tf = _transformers()
    src = Path(src)
    if not (src / "config.json").is_file():
        raise TinyLMError(f"{src} is not a Hugging Face model directory (no config.json).")
    if (Path(out) / "config.json").is_file():
        raise TinyLMError(f"{out} already holds a run; choose another --out.")
    try:
        config = tf.AutoConfig.from_pretrained(src)
    except (OSError, ValueError) as exc:
        raise TinyLMError(f"{src}/config.json cannot be read as a model config ({exc}).") from None
    converters = {
        "gpt2": _from_gpt2,
        "llama": _from_llama_like,
        "mixtral": _from_llama_like,
        "qwen3": _from_llama_like,
    }
    if config.model_type not in converters:
        raise TinyLMError(
            f"Model type {config.model_type!r} cannot be imported; supported: {', '.join(converters)}."
        )
    hf_model = tf.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model_cfg, state = converters[config.model_type](config, hf_model.state_dict())
    tok = _load_hf_tokenizer(Path(tokenizer) if tokenizer else src, tf)
    if tok.vocab_size > model_cfg.vocab_size:
        raise TinyLMError(
            f"The tokenizer has {tok.vocab_size} tokens but the model only {model_cfg.vocab_size}; "
            "it belongs to another model."
        )
    out = Path(out)
    RunRecord(model_cfg, TrainConfig(), imported_from=str(src.resolve())).write(out, tok)
    save_checkpoint(
        out, "last", {k: v.float() for k, v in state.items()}, None, {"step": 0, "imported": True}
    )
    return out


_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "tokenizer_config.json")


def _load_hf_tokenizer(src: Path, tf: Any) -> HFTokenizer:
    """The tokenizer in `src`; a clear error when there is none (never an empty vocabulary)."""
    from tokenizers import Tokenizer as _Tok

    if not any((src / name).is_file() for name in _TOKENIZER_FILES):
        raise TinyLMError(
            f"{src} has no tokenizer files ({', '.join(_TOKENIZER_FILES)}); copy the model's tokenizer "
            "into it or pass --tokenizer DIR."
        )
    if (src / "tokenizer.json").is_file():
        tok = _Tok.from_file(str(src / "tokenizer.json"))
    else:
        try:
            tok = tf.AutoTokenizer.from_pretrained(src).backend_tokenizer
        except Exception as exc:
            raise TinyLMError(f"{src} has no usable tokenizer files ({type(exc).__name__}).") from None
    if tok.get_vocab_size() == 0:
        raise TinyLMError(f"The tokenizer in {src} has an empty vocabulary; pass --tokenizer DIR.")
    return HFTokenizer(tok, "gpt2" if tok.get_vocab_size() == 50257 else "bpe")
