"""Hugging Face interoperability: export runs as GPT2LMHeadModel / LlamaForCausalLM / MixtralForCausalLM
directories, and import local transformers GPT-2 / LLaMA / Mixtral checkpoints as tinylm runs."""

from __future__ import annotations

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
    return transformers


def hf_architecture(cfg: ModelConfig) -> str:
    """ "gpt2", "llama" or "mixtral": the transformers architecture that represents this model exactly."""
    gpt = (cfg.position, cfg.norm, cfg.mlp) == ("learned", "layernorm", "gelu")
    llama = (cfg.position, cfg.norm, cfg.mlp) == ("rope", "rmsnorm", "swiglu")
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


# ----- tinylm -> transformers --------------------------------------------------------------
def _gpt2(cfg: ModelConfig, sd: State) -> tuple[Any, State]:
    tf = _transformers()
    config = tf.GPT2Config(
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
    zeros = lambda n: torch.zeros(n)
    bias = lambda key, n: sd.get(key, zeros(n))  # bias-free models export zero biases (same function)
    out = {
        "transformer.wte.weight": sd["tok_emb.weight"],
        "transformer.wpe.weight": sd["pos_emb.weight"],
        "transformer.ln_f.weight": sd["norm_f.weight"],
        "transformer.ln_f.bias": bias("norm_f.bias", cfg.n_embd),
        "lm_head.weight": sd.get("lm_head.weight", sd["tok_emb.weight"]),
    }
    C = cfg.n_embd
    for i in range(cfg.n_layer):
        b, h = f"blocks.{i}.", f"transformer.h.{i}."
        out[h + "ln_1.weight"], out[h + "ln_1.bias"] = sd[b + "norm1.weight"], bias(b + "norm1.bias", C)
        out[h + "ln_2.weight"], out[h + "ln_2.bias"] = sd[b + "norm2.weight"], bias(b + "norm2.bias", C)
        # GPT-2's Conv1D stores weights as (in, out): transposed nn.Linear weights
        out[h + "attn.c_attn.weight"] = torch.cat([sd[b + f"attn.{w}.weight"] for w in ("wq", "wk", "wv")]).T
        out[h + "attn.c_attn.bias"] = torch.cat([bias(b + f"attn.{w}.bias", C) for w in ("wq", "wk", "wv")])
        out[h + "attn.c_proj.weight"], out[h + "attn.c_proj.bias"] = (
            sd[b + "attn.wo.weight"].T,
            bias(b + "attn.wo.bias", C),
        )
        out[h + "mlp.c_fc.weight"], out[h + "mlp.c_fc.bias"] = (
            sd[b + "ff.fc.weight"].T,
            bias(b + "ff.fc.bias", cfg.hidden_dim),
        )
        out[h + "mlp.c_proj.weight"], out[h + "mlp.c_proj.bias"] = (
            sd[b + "ff.proj.weight"].T,
            bias(b + "ff.proj.bias", C),
        )
    return config, out


_LLAMA_LINEARS = {
    "attn.wq": "self_attn.q_proj",
    "attn.wk": "self_attn.k_proj",
    "attn.wv": "self_attn.v_proj",
    "attn.wo": "self_attn.o_proj",
}
_LLAMA_MLP = {"ff.w1": "mlp.gate_proj", "ff.w3": "mlp.up_proj", "ff.w2": "mlp.down_proj"}


def _llama_like(cfg: ModelConfig, sd: State) -> tuple[Any, State]:
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
    if cfg.n_expert:
        config = tf.MixtralConfig(
            **common,
            num_local_experts=cfg.n_expert,
            num_experts_per_tok=cfg.n_expert_active,
            router_aux_loss_coef=cfg.moe_aux_weight,
            sliding_window=None,
        )
    else:
        config = tf.LlamaConfig(**common, attention_bias=cfg.bias, mlp_bias=cfg.bias)
    out = {
        "model.embed_tokens.weight": sd["tok_emb.weight"],
        "model.norm.weight": sd["norm_f.weight"],
        "lm_head.weight": sd.get("lm_head.weight", sd["tok_emb.weight"]),
    }
    for i in range(cfg.n_layer):
        b, h = f"blocks.{i}.", f"model.layers.{i}."
        out[h + "input_layernorm.weight"] = sd[b + "norm1.weight"]
        out[h + "post_attention_layernorm.weight"] = sd[b + "norm2.weight"]
        linears = dict(_LLAMA_LINEARS) if cfg.n_expert else {**_LLAMA_LINEARS, **_LLAMA_MLP}
        for ours, theirs in linears.items():
            for suffix in ("weight", "bias"):
                if f"{b}{ours}.{suffix}" in sd:
                    out[f"{h}{theirs}.{suffix}"] = sd[f"{b}{ours}.{suffix}"]
        if cfg.n_expert:  # Mixtral: gate_up_proj[e] = [w1[e]^T; w3[e]^T], down_proj[e] = w2[e]^T
            out[h + "mlp.gate.weight"] = sd[b + "ff.gate.weight"]
            out[h + "mlp.experts.gate_up_proj"] = torch.cat(
                [sd[b + "ff.w1"], sd[b + "ff.w3"]], dim=2
            ).transpose(1, 2)
            out[h + "mlp.experts.down_proj"] = sd[b + "ff.w2"].transpose(1, 2)
    return config, out


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
    config, state = (_gpt2 if arch == "gpt2" else _llama_like)(cfg, sd)
    cls = {"gpt2": tf.GPT2LMHeadModel, "llama": tf.LlamaForCausalLM, "mixtral": tf.MixtralForCausalLM}[arch]
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
    C = cfg.n_embd
    out = {
        "tok_emb.weight": sd["transformer.wte.weight"],
        "pos_emb.weight": sd["transformer.wpe.weight"],
        "norm_f.weight": sd["transformer.ln_f.weight"],
        "norm_f.bias": sd["transformer.ln_f.bias"],
    }
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layer):
        b, h = f"blocks.{i}.", f"transformer.h.{i}."
        for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
            out[f"{b}{ours}.weight"], out[f"{b}{ours}.bias"] = (
                sd[f"{h}{theirs}.weight"],
                sd[f"{h}{theirs}.bias"],
            )
        qkv_w, qkv_b = sd[h + "attn.c_attn.weight"].T, sd[h + "attn.c_attn.bias"]
        for j, w in enumerate(("wq", "wk", "wv")):
            out[f"{b}attn.{w}.weight"], out[f"{b}attn.{w}.bias"] = (
                qkv_w[j * C : (j + 1) * C],
                qkv_b[j * C : (j + 1) * C],
            )
        for ours, theirs in (("attn.wo", "attn.c_proj"), ("ff.fc", "mlp.c_fc"), ("ff.proj", "mlp.c_proj")):
            out[f"{b}{ours}.weight"], out[f"{b}{ours}.bias"] = (
                sd[f"{h}{theirs}.weight"].T,
                sd[f"{h}{theirs}.bias"],
            )
    return cfg, out


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
    )
    out = {"tok_emb.weight": sd["model.embed_tokens.weight"], "norm_f.weight": sd["model.norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    H = cfg.hidden_dim
    for i in range(cfg.n_layer):
        b, h = f"blocks.{i}.", f"model.layers.{i}."
        out[b + "norm1.weight"], out[b + "norm2.weight"] = (
            sd[h + "input_layernorm.weight"],
            sd[h + "post_attention_layernorm.weight"],
        )
        for ours, theirs in ({**_LLAMA_LINEARS} if moe else {**_LLAMA_LINEARS, **_LLAMA_MLP}).items():
            for suffix in ("weight", "bias"):
                if f"{h}{theirs}.{suffix}" in sd:
                    out[f"{b}{ours}.{suffix}"] = sd[f"{h}{theirs}.{suffix}"]
        if moe:
            gate_up = sd[h + "mlp.experts.gate_up_proj"].transpose(1, 2)  # (E, C, 2H)
            out[b + "ff.gate.weight"] = sd[h + "mlp.gate.weight"]
            out[b + "ff.w1"], out[b + "ff.w3"] = gate_up[..., :H].contiguous(), gate_up[..., H:].contiguous()
            out[b + "ff.w2"] = sd[h + "mlp.experts.down_proj"].transpose(1, 2).contiguous()
    return cfg, out


def import_hf(src: str | Path, out: str | Path) -> Path:
    """Turn a local transformers GPT-2 / LLaMA / Mixtral directory into a tinylm run directory."""
    tf = _transformers()
    src = Path(src)
    if not (src / "config.json").is_file():
        raise TinyLMError(f"{src} is not a Hugging Face model directory (no config.json).")
    config = tf.AutoConfig.from_pretrained(src)
    converters = {"gpt2": _from_gpt2, "llama": _from_llama_like, "mixtral": _from_llama_like}
    if config.model_type not in converters:
        raise TinyLMError(
            f"Model type {config.model_type!r} cannot be imported; supported: {', '.join(converters)}."
        )
    hf_model = tf.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model_cfg, state = converters[config.model_type](config, hf_model.state_dict())
    tokenizer = _load_hf_tokenizer(src, tf)
    out = Path(out)
    RunRecord(model_cfg, TrainConfig(), imported_from=str(src.resolve())).write(out, tokenizer)
    save_checkpoint(
        out, "last", {k: v.float() for k, v in state.items()}, None, {"step": 0, "imported": True}
    )
    return out


def _load_hf_tokenizer(src: Path, tf: Any) -> HFTokenizer:
    from tokenizers import Tokenizer as _Tok

    if (src / "tokenizer.json").is_file():
        tok = _Tok.from_file(str(src / "tokenizer.json"))
    else:
        try:
            tok = tf.AutoTokenizer.from_pretrained(src).backend_tokenizer
        except Exception as exc:
            raise TinyLMError(f"{src} has no usable tokenizer files ({type(exc).__name__}).") from None
    return HFTokenizer(tok, "gpt2" if tok.get_vocab_size() == 50257 else "bpe")
