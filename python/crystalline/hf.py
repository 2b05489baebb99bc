"""The Hugging Face format: export a checkpoint as a `GPT2LMHeadModel`
directory, and import such a directory as a Crystalline run to fine-tune.

Crystalline's tensors already use GPT-2's names and layouts (Conv1D weights
are [in, out]); in a `transformers` directory they sit under
`transformer.`, and the output head is tied to `wte` so `lm_head.weight` is
not stored. Only plain GPT-2 is supported: tanh-approximated GELU, LayerNorm
epsilon 1e-5, inner width 4C, tied embeddings and the usual attention scaling.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from crystalline import checkpoint
from crystalline.atomic import disk_full_at, new_directory
from crystalline.config import F32_BYTES, ModelConfig, TrainConfig, check_types
from crystalline.data.tokenizer import EOT, Tokenizer
from crystalline.errors import UserError
from crystalline.guard import ensure_memory, fresh_directory, inside, read_json, writing
from crystalline.inference import load, write_run

PREFIX = "transformer."
LAYER_NORM_EPSILON = 1e-5
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
# Buffers older transformers versions store with the weights; they are masks, not parameters.
BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")
# The types of the config.json settings that import reads.
CONFIG_TYPES = {"model_type": str, "vocab_size": int, "n_embd": int, "n_layer": int, "n_head": int,
                "n_positions": int, "n_inner": int | None, "activation_function": str, "layer_norm_epsilon": float,
                "tie_word_embeddings": bool, "scale_attn_weights": bool, "scale_attn_by_inverse_layer_idx": bool,
                "reorder_and_upcast_attn": bool}
# Copies of the weights an import holds at once: as read, as float32, and
# the two zero optimizer moments written with them.
IMPORT_COPIES = 4


def export(path: Path | str, out_dir: Path | str) -> Path:
    """Write the checkpoint (or a run's latest) at `path` as a Hugging Face
    GPT-2 directory `out_dir` (created atomically; must not exist yet)."""
    out_dir = fresh_directory(Path(out_dir), "--out")
    loaded = load(path)
    cfg, eot = loaded.config, loaded.tokenizer.eot_id
    config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": LAYER_NORM_EPSILON,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "torch_dtype": "float32",
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOT,
        "eos_token": EOT,
        "unk_token": EOT,
        "model_max_length": cfg.block_size,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
    }
    tensors = {PREFIX + name: np.ascontiguousarray(a) for name, a in loaded.parameters().items()}
    with writing(out_dir, "--out"), disk_full_at(out_dir), new_directory(out_dir) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        shutil.copyfile(loaded.path / checkpoint.TOKENIZER, tmp / "tokenizer.json")
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "tokenizer_config.json", tokenizer_config)
        _write_json(tmp / "special_tokens_map.json", {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT})
    return out_dir


def import_hf(src: Path | str, out_run: Path | str, data: list[str] | None = None) -> Path:
    """Read a Hugging Face GPT-2 directory (config.json, weights, tokenizer)
    and write it as a new Crystalline run directory `out_run` with one
    checkpoint and fresh optimizer state; `crystalline train --resume
    OUT_RUN` then fine-tunes it on `data` (default: the built-in corpus).
    Returns the checkpoint."""
    src = Path(src)
    if not src.is_dir():
        raise UserError(f"{src} is not a directory; give a Hugging Face model directory (config.json + weights)")
    cfg = _model_config(src)
    ensure_memory(IMPORT_COPIES * F32_BYTES * cfg.num_parameters(), f"importing the model in {src}",
                  "it cannot be imported on this machine")
    params = _weights(src, cfg)
    with tempfile.TemporaryDirectory() as tmp:
        tok_path = Path(tmp) / checkpoint.TOKENIZER
        tokenizer = _tokenizer(src)
        if tokenizer.vocab_size > cfg.vocab_size:
            raise UserError(f"the tokenizer in {src} has {tokenizer.vocab_size} tokens, more than the model's "
                            f"vocab_size {cfg.vocab_size}")
        tokenizer.save(tok_path)
        return write_run(Path(out_run), params, cfg, tok_path, TrainConfig(data=list(data or [])))


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _model_config(src: Path) -> ModelConfig:
    """The GPT-2 shape from config.json, refusing what Crystalline cannot run."""
    path = src / "config.json"
    if not path.exists():
        raise UserError(f"{src} has no config.json; is it a Hugging Face model directory?")
    hf = read_json(path, str(path))
    if not isinstance(hf, dict):
        raise UserError(f"{path} is not a model config (a JSON object)")
    check_types(hf, CONFIG_TYPES, str(path))
    model_type = hf.get("model_type")
    if model_type != "gpt2":
        raise UserError(f"{path}: model_type is {model_type!r}; only GPT-2 models (model_type \"gpt2\") "
                        "can be imported")
    refusals = []
    n_embd = hf.get("n_embd", 768)
    if hf.get("activation_function", "gelu_new") not in TANH_GELUS:
        refusals.append(f"activation_function {hf['activation_function']!r} (Crystalline uses the tanh GELU)")
    if not abs(hf.get("layer_norm_epsilon", LAYER_NORM_EPSILON) - LAYER_NORM_EPSILON) <= 1e-12:  # NaN too
        refusals.append(f"layer_norm_epsilon {hf['layer_norm_epsilon']} (Crystalline uses 1e-5)")
    if hf.get("n_inner") not in (None, 4 * n_embd):
        refusals.append(f"n_inner {hf['n_inner']} (Crystalline's MLP is 4 * n_embd wide)")
    if not hf.get("tie_word_embeddings", True):
        refusals.append("untied output head (tie_word_embeddings false)")
    if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx") or \
            hf.get("reorder_and_upcast_attn"):
        refusals.append("non-standard attention scaling")
    if refusals:
        raise UserError(f"{path} describes a GPT-2 variant Crystalline cannot run: {'; '.join(refusals)}")
    cfg = ModelConfig(vocab_size=hf.get("vocab_size", 50257), n_embd=n_embd, n_layer=hf.get("n_layer", 12),
                      n_head=hf.get("n_head", 12), block_size=hf.get("n_positions", 1024))
    try:
        cfg.validate()
    except ValueError as err:
        raise UserError(f"{path}: {err}") from None
    return cfg


def _read_tensors(src: Path) -> dict[str, np.ndarray]:
    """All tensors of model.safetensors (or its shards), else pytorch_model.bin through torch."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        files = _shards(src, index)
    elif (src / "model.safetensors").is_file():
        files = [src / "model.safetensors"]
    elif (src / "pytorch_model.bin").is_file():
        return _read_torch(src / "pytorch_model.bin")
    else:
        raise UserError(f"{src} has no model.safetensors (or pytorch_model.bin)")
    tensors: dict[str, np.ndarray] = {}
    for path in files:
        try:
            tensors.update(load_file(str(path)))
        except (SafetensorError, OSError, ValueError, TypeError) as err:
            raise UserError(f"cannot read {path} ({err}); float32 or float16 weights are supported") from None
    return tensors


def _shards(src: Path, index: Path) -> list[Path]:
    """The files an index's weight_map names, each refused unless it lies inside `src`."""
    weight_map = read_json(index, str(index))
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise UserError(f"{index} has no weight_map (an object of tensor names to file names)")
    return [inside(src, name, str(index)) for name in sorted(set(weight_map.values()))]


def _read_torch(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise UserError(f"{path} is a PyTorch file; reading it needs torch (pip install torch), "
                        "or convert it to model.safetensors") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        return {k: v.float().numpy() for k, v in state.items()}
    except Exception as err:  # noqa: BLE001 - whatever unpickling an untrusted file raises is bad input
        raise UserError(f"cannot read {path} as PyTorch weights ({err})") from None


def _weights(src: Path, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Crystalline's tensors from the directory's, by name and shape."""
    raw = {k.removeprefix(PREFIX): v for k, v in _read_tensors(src).items() if not k.endswith(BUFFER_SUFFIXES)}
    head = raw.pop("lm_head.weight", None)
    if head is not None and "wte.weight" in raw and not np.array_equal(head, raw["wte.weight"]):
        raise UserError(f"{src}: lm_head.weight differs from wte.weight; untied output heads are not supported")
    params = {}
    for name, shape in cfg.parameter_shapes():
        tensor = raw.pop(name, None)
        if tensor is None:
            raise UserError(f"{src}: tensor {PREFIX}{name} is missing")
        if tuple(tensor.shape) != shape:
            raise UserError(f"{src}: tensor {PREFIX}{name} has shape {list(tensor.shape)}, expected {list(shape)}")
        params[name] = np.ascontiguousarray(tensor, dtype=np.float32)
    if raw:
        raise UserError(f"{src}: unexpected tensors for a GPT-2 model: {', '.join(sorted(raw)[:5])}")
    return params


def _tokenizer(src: Path) -> Tokenizer:
    """tokenizer.json, or GPT-2's vocab.json + merges.txt as a byte-level BPE."""
    if (src / "tokenizer.json").is_file():
        return Tokenizer.load(src / "tokenizer.json")
    vocab, merges = src / "vocab.json", src / "merges.txt"
    if not (vocab.is_file() and merges.is_file()):
        raise UserError(f"{src} has no tokenizer (tokenizer.json, or vocab.json and merges.txt)")
    inner = HFTokenizer(models.BPE.from_file(str(vocab), str(merges)))
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    inner.add_special_tokens([EOT])
    return Tokenizer(inner)
