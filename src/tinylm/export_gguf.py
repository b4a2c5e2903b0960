"""GGUF export: tinylm runs as llama.cpp `llama` (dense and MoE) or `gpt2` models, tokenizer included.

Layout facts (see docs/gguf.md):
- tinylm's RoPE rotates halves (the Hugging Face layout); llama.cpp's `llama` rotates adjacent pairs,
  so the q and k rows of every head are permuted (q.k is unchanged, the rotation now matches).
- Byte-level BPE becomes a `gpt2`-type vocabulary with its merges; the character tokenizer becomes
  SentencePiece-style pieces (space as U+2581, no merges, no space prefix).
- Tied embeddings: no `output.weight`; llama.cpp then reuses `token_embd.weight`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tinylm.config import ModelConfig
from tinylm.errors import TinyLMError
from tinylm.tokenizer import CharTokenizer, HFTokenizer, Tokenizer

State = dict[str, torch.Tensor]
QUANTS = ("f32", "f16", "q8_0")
SPACE_PIECE = "\u2581"  # SentencePiece's visible space


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise TinyLMError("GGUF export needs the gguf package: pip install 'tinylm[gguf]'.") from None
    return gguf


def gguf_architecture(cfg: ModelConfig) -> str:
    """ "llama", "qwen3" or "gpt2": the llama.cpp architecture that computes exactly this model, else a TinyLMError."""
    flavour = (cfg.position, cfg.norm, cfg.mlp)
    if cfg.qwen3:
        return "qwen3"  # LLaMA with RMS-normalised queries and keys
    if cfg.extras():
        raise TinyLMError(
            f"llama.cpp's llama, qwen3 (LLaMA with qk_norm, dense) and gpt2 architectures do not compute "
            f"{', '.join(cfg.extras())}, so this model cannot be written to GGUF; train without those options."
        )
    if flavour == ("rope", "rmsnorm", "swiglu"):
        return "llama"
    if flavour == ("learned", "layernorm", "gelu") and not cfg.n_expert and cfg.kv_heads == cfg.n_head:
        return "gpt2"
    raise TinyLMError(
        f"llama.cpp has no architecture for this model (position={cfg.position}, norm={cfg.norm}, "
        f"mlp={cfg.mlp}, n_expert={cfg.n_expert}, n_kv_head={cfg.n_kv_head}); GGUF export supports "
        "LLaMA-style (rope/rmsnorm/swiglu, dense or MoE) and GPT-style (learned/layernorm/gelu, dense) models."
    )


def permute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder the rows (n_head * head_dim, ...) of a q/k weight or bias from rotate-half to adjacent pairs."""
    head_dim = w.size(0) // n_head
    return w.reshape(n_head, 2, head_dim // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


# ----- tensors ------------------------------------------------------------------------------
def _llama_tensors(cfg: ModelConfig, sd: State) -> dict[str, torch.Tensor]:
    """llama's tensors; qwen3's (qk_norm) rotate half the head as tinylm does, so q and k stay as they are."""
    qwen3 = cfg.qk_norm
    out = {"token_embd.weight": sd["tok_emb.weight"], "output_norm.weight": sd["norm_f.weight"]}
    if not cfg.tie_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layer):
        b, g = f"blocks.{i}.", f"blk.{i}."
        out[g + "attn_norm.weight"] = sd[b + "norm1.weight"]
        out[g + "ffn_norm.weight"] = sd[b + "norm2.weight"]
        for ours, theirs, heads in (
            ("wq", "attn_q", cfg.n_head),
            ("wk", "attn_k", cfg.kv_heads),
            ("wv", "attn_v", 0),
            ("wo", "attn_output", 0),
        ):
            for suffix in ("weight", "bias"):
                t = sd.get(f"{b}attn.{ours}.{suffix}")
                if t is not None:
                    out[f"{g}{theirs}.{suffix}"] = permute_rope(t, heads) if heads and not qwen3 else t
        if qwen3:  # tinylm's QK-norm has no weights: llama.cpp's are ones
            out[g + "attn_q_norm.weight"] = out[g + "attn_k_norm.weight"] = torch.ones(cfg.head_dim)
        if cfg.n_expert:  # (E, C, H) used as x @ w[e] -> llama.cpp's (E, H, C) rows, like nn.Linear weights
            out[g + "ffn_gate_inp.weight"] = sd[b + "ff.gate.weight"]  # (E, C)
            out[g + "ffn_gate_exps.weight"] = sd[b + "ff.w1"].transpose(1, 2)
            out[g + "ffn_up_exps.weight"] = sd[b + "ff.w3"].transpose(1, 2)
            out[g + "ffn_down_exps.weight"] = sd[b + "ff.w2"].transpose(1, 2)
            continue
        for ours, theirs in (("w1", "ffn_gate"), ("w3", "ffn_up"), ("w2", "ffn_down")):
            for suffix in ("weight", "bias"):
                if f"{b}ff.{ours}.{suffix}" in sd:
                    out[f"{g}{theirs}.{suffix}"] = sd[f"{b}ff.{ours}.{suffix}"]
    return out


def _gpt2_tensors(cfg: ModelConfig, sd: State) -> dict[str, torch.Tensor]:
    C, H = cfg.n_embd, cfg.hidden_dim
    # llama.cpp's gpt2 requires every bias: bias-free models export zeros (the same function)
    bias = lambda key, n: sd.get(key, torch.zeros(n))  # noqa: E731
    out = {
        "token_embd.weight": sd["tok_emb.weight"],
        "position_embd.weight": sd["pos_emb.weight"],
        "output_norm.weight": sd["norm_f.weight"],
        "output_norm.bias": bias("norm_f.bias", C),
    }
    if not cfg.tie_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layer):
        b, g = f"blocks.{i}.", f"blk.{i}."
        out[g + "attn_norm.weight"], out[g + "attn_norm.bias"] = (
            sd[b + "norm1.weight"],
            bias(b + "norm1.bias", C),
        )
        out[g + "ffn_norm.weight"], out[g + "ffn_norm.bias"] = (
            sd[b + "norm2.weight"],
            bias(b + "norm2.bias", C),
        )
        out[g + "attn_qkv.weight"] = torch.cat([sd[f"{b}attn.{w}.weight"] for w in ("wq", "wk", "wv")])
        out[g + "attn_qkv.bias"] = torch.cat([bias(f"{b}attn.{w}.bias", C) for w in ("wq", "wk", "wv")])
        out[g + "attn_output.weight"], out[g + "attn_output.bias"] = (
            sd[b + "attn.wo.weight"],
            bias(b + "attn.wo.bias", C),
        )
        out[g + "ffn_up.weight"], out[g + "ffn_up.bias"] = sd[b + "ff.fc.weight"], bias(b + "ff.fc.bias", H)
        out[g + "ffn_down.weight"], out[g + "ffn_down.bias"] = (
            sd[b + "ff.proj.weight"],
            bias(b + "ff.proj.bias", C),
        )
    return out


def gguf_tensors(cfg: ModelConfig, sd: State) -> dict[str, np.ndarray]:
    """llama.cpp tensor name -> float32 array in PyTorch (out, in) order (GGUF stores the reversed shape)."""
    tensors = (_gpt2_tensors if gguf_architecture(cfg) == "gpt2" else _llama_tensors)(cfg, sd)
    return {name: t.detach().float().cpu().contiguous().numpy() for name, t in tensors.items()}


# Kept in float32 at every --quant, as llama.cpp's own converter does: small, and precision-critical.
_KEEP_F32 = ("ffn_gate_inp.weight", "position_embd.weight")


def _encode(gguf: Any, name: str, array: np.ndarray, quant: str) -> tuple[np.ndarray, Any]:
    """(data, GGML type) for one tensor; 1-D tensors and rows a quantization cannot split stay wider."""
    Q = gguf.GGMLQuantizationType
    if quant == "f32" or array.ndim == 1 or name.endswith(_KEEP_F32):
        return array, Q.F32
    if quant == "q8_0":
        try:
            return gguf.quants.quantize(array, Q.Q8_0), Q.Q8_0
        except gguf.quants.QuantError:  # rows not a multiple of 32: f16 instead, like llama.cpp's converter
            pass
    return array.astype(np.float16), Q.F16


# ----- tokenizer ----------------------------------------------------------------------------
@dataclass
class Vocab:
    """The tokenizer as GGUF metadata: llama.cpp's tokenizer model, pieces, types, merges, scores."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece-style)
    tokens: list[str]
    types: list[int]
    merges: list[str]
    scores: list[float] | None
    eos_id: int | None


def gguf_vocab(tokenizer: Tokenizer, vocab_size: int) -> Vocab:
    """llama.cpp's view of our tokenizer, padded with unused pieces up to the model's vocab_size."""
    gguf = _gguf()
    T = gguf.TokenType
    if isinstance(tokenizer, CharTokenizer):
        if SPACE_PIECE in tokenizer.chars and " " in tokenizer.chars:
            raise TinyLMError(
                f"This character vocabulary holds both ' ' and {SPACE_PIECE!r}, which llama.cpp cannot tell apart."
            )
        tokens = [c.replace(" ", SPACE_PIECE) for c in tokenizer.chars]
        vocab = Vocab("llama", tokens, [T.NORMAL] * len(tokens), [], [0.0] * len(tokens), tokenizer.eot_id)
    elif isinstance(tokenizer, HFTokenizer):
        vocab = _bpe_vocab(tokenizer, T)
    else:
        raise TinyLMError(
            f"A {type(tokenizer).__name__} tokenizer cannot be written to GGUF; char, bpe and transformers' "
            "gpt2 tokenizers can."
        )
    if len(vocab.tokens) > vocab_size:
        raise TinyLMError(
            f"The tokenizer has {len(vocab.tokens)} tokens but the model only {vocab_size}; this run is inconsistent."
        )
    for i in range(len(vocab.tokens), vocab_size):  # rows the tokenizer never produces
        vocab.tokens.append(f"[PAD{i}]")
        vocab.types.append(T.UNUSED)
        if vocab.scores is not None:
            vocab.scores.append(0.0)
    return vocab


def _bpe_vocab(tokenizer: HFTokenizer, T: Any) -> Vocab:
    spec = json.loads(tokenizer.tok.to_str())
    model, pre = spec.get("model", {}), spec.get("pre_tokenizer") or {}
    byte_level = pre.get("type") == "ByteLevel" or any(
        p.get("type") == "ByteLevel" for p in pre.get("pretokenizers", [])
    )
    if model.get("type") != "BPE" or not byte_level:
        raise TinyLMError("Only byte-level BPE tokenizers (tinylm's bpe and gpt2) can be written to GGUF.")
    by_id = {i: piece for piece, i in tokenizer.tok.get_vocab(with_added_tokens=True).items()}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(max(by_id) + 1)]
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    types = [
        T.CONTROL if i in special else (T.NORMAL if i in by_id else T.UNUSED) for i in range(len(tokens))
    ]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return Vocab("gpt2", tokens, types, merges, None, tokenizer.eot_id)


def _write_vocab(w: Any, vocab: Vocab) -> None:
    w.add_tokenizer_model(vocab.model)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    if vocab.model == "gpt2":
        w.add_tokenizer_pre("gpt-2")  # GPT-2's pre-tokenizer regex, the one tinylm's byte-level BPE uses
        w.add_token_merges(vocab.merges)
    else:
        w.add_token_scores(vocab.scores)
        w.add_add_space_prefix(False)
    if vocab.eos_id is not None:
        w.add_bos_token_id(vocab.eos_id)
        w.add_eos_token_id(vocab.eos_id)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)


# ----- writing ------------------------------------------------------------------------------
def _write_hparams(w: Any, cfg: ModelConfig, arch: str) -> None:
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.hidden_dim)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.kv_heads)
    if arch == "gpt2":
        w.add_layer_norm_eps(cfg.norm_eps)
        return
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.head_dim)
    if cfg.n_expert:
        w.add_expert_count(cfg.n_expert)
        w.add_expert_used_count(cfg.n_expert_active)


def write_gguf(
    cfg: ModelConfig,
    sd: State,
    tokenizer: Tokenizer,
    out: str | Path,
    quant: str = "f32",
    name: str = "tinylm",
) -> Path:
    """Write a GGUF file llama.cpp loads; never overwrites `out` and never leaves a half-written file."""
    gguf = _gguf()
    if quant not in QUANTS:
        raise TinyLMError(f"Unknown --quant {quant!r}; choose one of: {', '.join(QUANTS)}.")
    out = Path(out)
    if out.exists():
        raise TinyLMError(f"{out} already exists; choose another --out (exports never overwrite).")
    if not out.parent.is_dir():
        what = "is a file, not a directory" if out.parent.exists() else "does not exist; create it first"
        raise TinyLMError(f"The directory {out.parent} {what}.")
    arch = gguf_architecture(cfg)
    tensors = gguf_tensors(cfg, sd)
    vocab = gguf_vocab(tokenizer, cfg.vocab_size)
    file_type = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}[quant]
    tmp = out.with_name(f".{out.name}.tmp")
    w = gguf.GGUFWriter(tmp, arch)
    try:
        w.add_name(name)
        w.add_file_type(gguf.LlamaFileType[file_type])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _write_hparams(w, cfg, arch)
        _write_vocab(w, vocab)
        for tensor_name, array in tensors.items():
            data, qtype = _encode(gguf, tensor_name, array, quant)
            w.add_tensor(tensor_name, data, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if out.exists():  # appeared while writing: keep the user's file
            raise TinyLMError(f"{out} already exists; choose another --out (exports never overwrite).")
        os.replace(tmp, out)
    finally:
        w.close()
        tmp.unlink(missing_ok=True)
    return out


def export_gguf(run_dir: str | Path, out: str | Path, quant: str = "f32", checkpoint: str = "last") -> Path:
    """Write a run (LoRA adapters merged) as one GGUF file for llama.cpp."""
    from tinylm.checkpoint import load_run

    run = load_run(run_dir, checkpoint)
    model = run.model
    if run.record.lora is not None:
        from tinylm.lora import merge_lora

        model = merge_lora(model)
    return write_gguf(run.model_cfg, model.state_dict(), run.tokenizer, out, quant, Path(run_dir).name)
