"""The built-in tiny model: a DeepSeek-V3-architecture checkpoint written once, no download.

Every architectural feature is on (q LoRA, YaRN, interleaved rope, a dense layer, grouped
sigmoid routing with a correction bias, shared experts), so serving it exercises the same code as
a real checkpoint. Weights are random (seeded), so its text is gibberish; the tokenizer is a real
byte-level BPE, so any UTF-8 text round-trips.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
    trainers,
)

from orchestrator import tool_parser as tp

TINY_MODEL_NAME = "pdserve-tiny-deepseek-v3"
_VERSION = 5  # bump when anything below changes what is written
_SEED = 20261122
_VOCAB_SIZE = 1024

BOS, EOS, USER, ASSISTANT = (
    "<｜begin▁of▁sentence｜>",
    "<｜end▁of▁sentence｜>",
    "<｜User｜>",
    "<｜Assistant｜>",
)
THINK_BEGIN, THINK_END = "<think>", "</think>"  # R1's thinking block, single tokens too
# DeepSeek-V3's layout: all system messages joined up front right after BOS (the request's
# tools after them), then `<｜User｜>q<｜Assistant｜>a<EOS>` turns; an assistant's tool calls in
# V3's fenced-JSON format, tool results in `<｜tool▁outputs▁begin｜>` brackets; with
# `thinking` (`chat_template_kwargs`) the answer starts in an open `<think>` block, as V3.1's.
CHAT_TEMPLATE = (
    "{% set ns = namespace(system_prompt='', is_first_sp=true, is_tool=false) %}"
    "{% for m in messages if m['role'] == 'system' %}"
    "{% if ns.is_first_sp %}{% set ns.system_prompt = m['content'] %}"
    "{% set ns.is_first_sp = false %}"
    "{% else %}{% set ns.system_prompt = ns.system_prompt + '\\n\\n' + m['content'] %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if tools %}"
    "{% if ns.system_prompt %}{% set ns.system_prompt = ns.system_prompt + '\\n\\n' %}{% endif %}"
    "{% set ns.system_prompt = ns.system_prompt + '## Tools\\nTo call functions, answer '"
    " + '" + tp.FORMATS["deepseek_v3"].render([("NAME", "ARGUMENTS")]).replace("\n", "\\n") + "' %}"
    "{% for t in tools %}"
    "{% set ns.system_prompt = ns.system_prompt + '\\n\\n### ' + t['function']['name'] + "
    "'\\n' + (t['function']['description'] or '') + '\\nParameters: ' "
    "+ (t['function']['parameters'] or {}) | tojson %}"
    "{% endfor %}"
    "{% endif %}"
    "{{ bos_token }}{{ ns.system_prompt }}"
    "{% for m in messages %}"
    "{% if m['role'] in ('user', 'assistant') and ns.is_tool %}"
    + tp.OUTPUTS_END
    + "{% set ns.is_tool = false %}{% endif %}"
    "{% if m['role'] == 'user' %}" + USER + "{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}" + ASSISTANT + "{{ m['content'] or '' }}"
    "{% if m['tool_calls'] %}" + tp.CALLS_BEGIN + "{% for c in m['tool_calls'] %}"
    "{% if not loop.first %}{{ '\\n' }}{% endif %}"
    + tp.CALL_BEGIN
    + "{{ c['type'] }}"
    + tp.SEP
    + "{{ c['function']['name'] }}{{ '\\n```json\\n' }}"
    "{{ c['function']['arguments'] }}{{ '\\n```' }}"
    + tp.CALL_END
    + "{% endfor %}"
    + tp.CALLS_END
    + "{% endif %}{{ eos_token }}"
    "{% elif m['role'] == 'tool' %}"
    "{% if ns.is_tool %}{{ '\\n' }}{% else %}"
    + tp.OUTPUTS_BEGIN
    + "{% set ns.is_tool = true %}{% endif %}"
    + tp.OUTPUT_BEGIN
    + "{{ m['content'] }}"
    + tp.OUTPUT_END
    + "{% endif %}"
    "{% endfor %}"
    "{% if ns.is_tool %}" + tp.OUTPUTS_END + "{% endif %}"
    "{% if add_generation_prompt %}"
    + ASSISTANT
    + "{% if thinking %}"
    + THINK_BEGIN
    + "{% endif %}{% endif %}"
)

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A serving system turns requests into tokens, and
tokens into text, as fast as the hardware allows. Attention reads the past; experts transform the
present. A mixture-of-experts model routes every token to a few experts among many, so that a
large model costs little per token. Latent attention compresses keys and values into one small
vector per token, and the cache keeps only that vector and a rotary key. Prefill reads the whole
prompt at once; decode writes one token at a time. Batching many requests together keeps the
machine busy, while a scheduler decides who runs next and how much memory each one may hold.

Hello, world! How are you today? I am fine, thank you, and you? What is the weather like where
you live? It is sunny and warm this morning, with a light breeze from the west, but the radio says
that clouds will gather in the afternoon and that it may rain tonight. Please bring an umbrella,
a sweater and something to read on the train. We will meet at the station near the old bridge.

Once upon a time there was a small model that dreamed of serving many users at once. Every night
it counted its parameters, checked its weights, and wondered whether anyone would ever ask it a
question. One day a curious student typed a short message: "Can you write a poem about the sea?"
The model thought for a moment, then answered slowly, word by word, until the poem was finished.
The student smiled, saved the answer, and asked another question, and then another, and another.

Numbers and symbols appear everywhere: 0 1 2 3 4 5 6 7 8 9, 10, 42, 100, 256, 1000, 2048, 3.14,
2.718, -1, +7, 50%, $20, 3/4, (x + y) * z = 12, a <= b, c >= d, e != f, [1, 2, 3], {"key": "value"}.
Dates such as 2024-05-17 and times like 09:30 or 18:45 are common in logs and messages.

Code: def main(): print("hello") if x > 0 else None; for i in range(10): total += i
import torch; x = torch.zeros(4, 8); y = x @ w.T + b; return y.softmax(dim=-1)
class Request: def __init__(self, prompt: str, max_tokens: int = 16) -> None: self.prompt = prompt
while queue: item = queue.pop(0); results.append(process(item)) # keep going until empty

Science asks simple questions about the world and answers them with careful measurement. Why
is the sky blue? Sunlight scatters off the molecules of the air, and shorter wavelengths scatter
more strongly than longer ones. Why do leaves change colour in autumn? As the days grow shorter,
trees stop making green chlorophyll, and the yellow and orange pigments that were hidden beneath
become visible. Water boils at a lower temperature on a high mountain because the air pressure
there is lower. Light travels about three hundred thousand kilometres every second.

A good recipe for bread needs only flour, water, salt and yeast. Mix them in a large bowl, knead
the dough for ten minutes, cover it, and let it rise in a warm place for about two hours. Shape
the loaf, let it rest again, then bake it in a hot oven until the crust is golden and the bottom
sounds hollow when you tap it. Let it cool before slicing, if you can wait that long.

The library opens at nine and closes at six, except on Sundays, when it is closed all day.
Children can borrow up to five books at a time; adults may borrow ten. Newspapers, maps and old
journals must stay inside the reading room. Ask the librarian if you cannot find what you need.
"""


def default_cache_dir() -> Path:
    """`$PDSERVE_CACHE`, else `~/.cache/pdserve`."""
    return Path(os.environ.get("PDSERVE_CACHE") or Path.home() / ".cache" / "pdserve")


def ensure_tiny_checkpoint(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Path of the tiny checkpoint, writing it first if it is not there yet.

    Safe against concurrent callers: each builds in a temporary sibling dir and renames it into
    place; the first rename wins and the others discard their copy.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = root / f"tiny-deepseek-v3-v{_VERSION}"
    if (path / "config.json").is_file():
        return path
    root.mkdir(parents=True, exist_ok=True)
    print(f"pdserve: writing the built-in tiny model to {path}", file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=root))
    try:
        _write(tmp)
        try:
            os.rename(tmp, path)
        except OSError:
            if not (path / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def tiny_config(vocab_size: int, bos_id: int, eos_id: int) -> dict[str, Any]:
    """The tiny model's `config.json`, in the original DeepSeek key style (`rope_scaling`)."""
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": vocab_size,
        "hidden_size": 128,
        "intermediate_size": 256,
        "moe_intermediate_size": 64,
        "num_hidden_layers": 4,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": 64,
        "kv_lora_rank": 64,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 16,
        "v_head_dim": 32,
        "n_routed_experts": 16,
        "num_experts_per_tok": 4,
        "n_group": 4,
        "topk_group": 2,
        "n_shared_experts": 1,
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": {
            "type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 1024,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        "rope_interleave": True,
        "attention_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "initializer_range": 0.05,
        "torch_dtype": "float32",
        "num_nextn_predict_layers": 1,
    }


def _write(path: Path) -> None:
    tokenizer = _train_tokenizer()
    vocab_size = tokenizer.get_vocab_size()
    bos_id, eos_id = tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)
    assert bos_id is not None and eos_id is not None  # trained in as special tokens
    config = tiny_config(vocab_size, bos_id, eos_id)
    tokenizer.save(str(path / "tokenizer.json"))
    _dump(path / "config.json", config)
    _dump(
        path / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": EOS,
            "add_bos_token": True,
            "add_eos_token": False,
            # transformers' cleanup rewrites " ," to ","; byte-level BPE must decode verbatim.
            "clean_up_tokenization_spaces": False,
            "model_max_length": config["max_position_embeddings"],
            "chat_template": CHAT_TEMPLATE,
        },
    )
    _dump(path / "special_tokens_map.json", {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS})
    _dump(
        path / "generation_config.json",
        {"bos_token_id": bos_id, "eos_token_id": eos_id, "do_sample": False},
    )
    save_file(_weights(config), str(path / "model.safetensors"), metadata={"format": "pt"})


def _dump(path: Path, obj: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)


def _train_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        special_tokens=[BOS, EOS, USER, ASSISTANT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS], trainer=trainer)
    # The tool-call markers and thinking tags are single tokens, as in DeepSeek's vocabulary
    # (not special: they are part of the text a parser reads).
    added = [*tp.MARKERS, THINK_BEGIN, THINK_END]
    tok.add_tokens([AddedToken(m, special=False, normalized=False) for m in added])
    bos_id = tok.token_to_id(BOS)
    # BOS before each sequence, as DeepSeek's own tokenizer.json does.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)]
    )
    return tok


def _weights(cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(_SEED)
    std = cfg["initializer_range"]

    def mat(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=g) * std

    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    qk_dim = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    experts, moe_inter = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
    w: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": mat(cfg["vocab_size"], hidden),
        "model.norm.weight": torch.ones(hidden),
        "lm_head.weight": mat(cfg["vocab_size"], hidden),
    }

    def mlp(prefix: str, inter: int) -> None:
        w[f"{prefix}.gate_proj.weight"] = mat(inter, hidden)
        w[f"{prefix}.up_proj.weight"] = mat(inter, hidden)
        w[f"{prefix}.down_proj.weight"] = mat(hidden, inter)

    def layer(i: int) -> None:
        p = f"model.layers.{i}"
        w[f"{p}.input_layernorm.weight"] = torch.ones(hidden)
        w[f"{p}.post_attention_layernorm.weight"] = torch.ones(hidden)
        a = f"{p}.self_attn"
        w[f"{a}.q_a_proj.weight"] = mat(cfg["q_lora_rank"], hidden)
        w[f"{a}.q_a_layernorm.weight"] = torch.ones(cfg["q_lora_rank"])
        w[f"{a}.q_b_proj.weight"] = mat(heads * qk_dim, cfg["q_lora_rank"])
        w[f"{a}.kv_a_proj_with_mqa.weight"] = mat(
            cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"], hidden
        )
        w[f"{a}.kv_a_layernorm.weight"] = torch.ones(cfg["kv_lora_rank"])
        w[f"{a}.kv_b_proj.weight"] = mat(
            heads * (cfg["qk_nope_head_dim"] + cfg["v_head_dim"]), cfg["kv_lora_rank"]
        )
        w[f"{a}.o_proj.weight"] = mat(hidden, heads * cfg["v_head_dim"])
        if i < cfg["first_k_dense_replace"]:
            mlp(f"{p}.mlp", cfg["intermediate_size"])
            return
        w[f"{p}.mlp.gate.weight"] = mat(experts, hidden)
        w[f"{p}.mlp.gate.e_score_correction_bias"] = torch.randn(experts, generator=g) * 0.01
        for e in range(experts):
            mlp(f"{p}.mlp.experts.{e}", moe_inter)
        mlp(f"{p}.mlp.shared_experts", moe_inter * cfg["n_shared_experts"])

    for i in range(cfg["num_hidden_layers"]):
        layer(i)
    # The multi-token-prediction module (drawn last: the main weights do not depend on it),
    # with copies of the embedding and head as DeepSeek-V3's checkpoint has them.
    mtp = cfg["num_hidden_layers"]
    layer(mtp)
    p = f"model.layers.{mtp}"
    w[f"{p}.enorm.weight"] = torch.ones(hidden)
    w[f"{p}.hnorm.weight"] = torch.ones(hidden)
    w[f"{p}.eh_proj.weight"] = mat(hidden, 2 * hidden)
    w[f"{p}.shared_head.norm.weight"] = torch.ones(hidden)
    w[f"{p}.embed_tokens.weight"] = w["model.embed_tokens.weight"].clone()
    w[f"{p}.shared_head.head.weight"] = w["lm_head.weight"].clone()
    return {k: v.contiguous() for k, v in w.items()}
