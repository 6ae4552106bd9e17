"""The built-in tiny model: written once, a real checkpoint that transformers loads too."""

from __future__ import annotations

import pytest
import torch

from workers.engine.config import EngineConfig
from workers.engine.engine import Engine
from workers.engine.messages import GenerateRequest, SamplingParams
from workers.model.tiny import ensure_tiny_checkpoint

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.timeout(180)


def test_written_once_and_loadable_by_transformers(tmp_path):
    path = ensure_tiny_checkpoint(tmp_path)
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_checkpoint(tmp_path) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp dirs left behind

    model, info = transformers.DeepseekV3ForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]

    tok = transformers.AutoTokenizer.from_pretrained(path)
    text = "héllo wörld, 你好 🚀"
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id and tok.decode(ids, skip_special_tokens=True) == text
    from tokenizers import Tokenizer

    assert Tokenizer.from_file(str(path / "tokenizer.json")).encode(text).ids == ids
    chat = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert chat == "<｜begin▁of▁sentence｜>Be brief.\n<｜User｜>Hi<｜Assistant｜>"

    # The engine and transformers agree on the built-in model too.
    engine = Engine(path, EngineConfig(kv_capacity_tokens=512), progress=False)
    greedy = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True)
    engine.add(GenerateRequest("a", ids, greedy))
    ours: list[int] = []
    while engine.has_work:
        for d in engine.step():
            ours += d.token_ids
    with torch.no_grad():
        ref = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=16,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=tok.eos_token_id,
        )[0, len(ids) :].tolist()
    assert ours == ref
