"""`Tokenizer`: a checkpoint's `tokenizer.json` and `tokenizer_config.json`, without transformers.

Encodes and decodes with the `tokenizers` library and renders the checkpoint's chat template
with a sandboxed jinja2 environment (the same globals and filters Hugging Face templates expect).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

from orchestrator.tool_parser import MARKERS
from workers.model.config import read_json


class ChatTemplateError(ValueError):
    """The chat template refused the messages (e.g. `raise_exception` in the template)."""


def _token_content(value: Any) -> str | None:
    """Special tokens appear as plain strings or as `{"content": ..., "__type": "AddedToken"}`."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


# Names a chat template's own code refers to (jinja2's globals, ours, a for loop's `loop`): a
# request's `chat_template_kwargs` may not rebind them.
TEMPLATE_RESERVED = frozenset(
    {*ImmutableSandboxedEnvironment().globals, "raise_exception", "strftime_now", "loop"}
)


def _compile_template(source: str) -> tuple[jinja2.Template, bool]:
    """The template, and whether it reads `tools` (shows the request's tools itself)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
        x, indent=indent, ensure_ascii=ensure_ascii
    )
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    reads = jinja2.meta.find_undeclared_variables(env.parse(source))
    return env.from_string(source), "tools" in reads


def _json_object(path: Path) -> dict[str, Any]:
    """A JSON file holding an object; ValueError naming the file otherwise."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


class Tokenizer:
    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        add_bos_token: bool = False,
        chat_template: str | None = None,
    ):
        self._tok = tokenizer
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_token_id = tokenizer.token_to_id(bos_token) if bos_token else None
        eos_id = tokenizer.token_to_id(eos_token) if eos_token else None
        self.eos_token_ids: tuple[int, ...] = () if eos_id is None else (eos_id,)
        self.add_bos_token = add_bos_token and self.bos_token_id is not None
        self.chat_template = chat_template
        self._template: jinja2.Template | None = None
        self.renders_tools = False
        if chat_template:
            self._template, self.renders_tools = _compile_template(chat_template)
        # Tool-call markers stay in the output text even where the tokenizer counts them as
        # special (the tool-call parser reads them): decoding then skips the other special
        # tokens by id.
        added = tokenizer.get_added_tokens_decoder()
        special = {i for i, t in added.items() if t.special}
        markers = {i for i, t in added.items() if t.content in MARKERS}
        # The tokens decoded text leaves out (BOS, EOS, ...; not the markers).
        self.hidden_ids = frozenset(special - markers)
        self._skipped_ids = self.hidden_ids if special & markers else None

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        """Load `tokenizer.json` (required) and `tokenizer_config.json` (optional; the chat
        template may also come from `chat_template.jinja` or `chat_template.json`)."""
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: the model dir needs a fast tokenizer file")
        cfg: dict[str, Any] = {}
        if (model_dir / "tokenizer_config.json").is_file():
            cfg = _json_object(model_dir / "tokenizer_config.json")
        template = cfg.get("chat_template")
        where = model_dir / "tokenizer_config.json"
        if isinstance(template, list):  # named templates: use the default one
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        if template is None and (model_dir / "chat_template.jinja").is_file():
            where = model_dir / "chat_template.jinja"
            template = where.read_text()
        if template is None and (model_dir / "chat_template.json").is_file():
            where = model_dir / "chat_template.json"
            template = _json_object(where).get("chat_template")
        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises its own untyped errors
            raise ValueError(f"{path}: not a tokenizer file ({e})") from None
        try:
            return cls(
                tok,
                bos_token=_token_content(cfg.get("bos_token")),
                eos_token=_token_content(cfg.get("eos_token")),
                add_bos_token=bool(cfg.get("add_bos_token", False)),
                chat_template=template if isinstance(template, str) else None,
            )
        except jinja2.TemplateError as e:
            line = f", line {e.lineno}" if isinstance(e, jinja2.TemplateSyntaxError) else ""
            raise ValueError(f"{where}: the chat template does not compile{line}: {e}") from None

    @property
    def vocab_size(self) -> int:
        """Tokens the tokenizer knows, added tokens included (the model's may be larger)."""
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with special tokens, a BOS is put first when the tokenizer
        config asks for one and `tokenizer.json`'s post-processor did not add it."""
        ids: list[int] = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos_token and (not ids or ids[0] != self.bos_token_id):
            assert self.bos_token_id is not None
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        if skip_special_tokens and self._skipped_ids is not None:
            kept = [i for i in ids if i not in self._skipped_ids]
            return str(self._tok.decode(kept, skip_special_tokens=False))
        return str(self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def decode_stream(
        self, context: Sequence[int], skip_special_tokens: bool = True
    ) -> TokenStream | None:
        """An incremental decoder of the tokens that follow `context` (`tokenizers`'
        `DecodeStream`: one call per step instead of two window decodes); None where the
        installed `tokenizers` has none, or where `context` ends inside a character (which
        `DecodeStream` would then show again)."""
        if self.decode(context, skip_special_tokens).endswith("\ufffd"):
            return None
        try:
            return TokenStream(self._tok, context, skip_special_tokens, self._skipped_ids)
        except (AttributeError, TypeError):  # tokenizers < 0.22: no DecodeStream(ids=...)
            return None

    def marker_ids(self, markers: Sequence[str]) -> dict[str, int]:
        """Those of `markers` that are single tokens of the vocabulary, with their ids."""
        found = {m: self._tok.token_to_id(m) for m in markers}
        return {m: i for m, i in found.items() if i is not None}

    def token_text(self, token_id: int) -> str:
        """One token's text as logprobs show it: special tokens kept; a token holding part
        of a UTF-8 character shows U+FFFD for the missing bytes."""
        return str(self._tok.decode([token_id], skip_special_tokens=False))

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        """The prompt text for `messages` (and the template variables `extra`, such as `tools`,
        whatever their names); encode it with
        `add_special_tokens=False` (the template writes BOS itself). Raises ChatTemplateError when the model has no template
        or the template rejects the messages."""
        if self._template is None:
            raise ChatTemplateError("this model has no chat template; use /v1/completions")
        try:
            # (One mapping: a variable named like a keyword of `render` is still a variable.)
            return self._template.render(
                {
                    **(extra or {}),
                    "messages": list(messages),
                    "add_generation_prompt": add_generation_prompt,
                    "bos_token": self.bos_token or "",
                    "eos_token": self.eos_token or "",
                }
            )
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the chat template failed: {e}") from e
        except Exception as e:  # the template's code on values it did not expect (a request's)
            raise ChatTemplateError(f"the chat template failed: {type(e).__name__}: {e}") from e


class TokenStream:
    """`tokenizers.decoders.DecodeStream` over one output, with `Tokenizer.decode`'s rule for
    special tokens (by id, when the tool-call markers are special tokens to keep)."""

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        context: Sequence[int],
        skip_special_tokens: bool,
        skipped_ids: frozenset[int] | None,
    ):
        self._tok = tokenizer
        self._skipped = skipped_ids if skip_special_tokens else None
        skip = skip_special_tokens and skipped_ids is None
        self._stream = tokenizers.decoders.DecodeStream(
            ids=self._kept(context), skip_special_tokens=skip
        )

    def _kept(self, ids: Sequence[int]) -> list[int]:
        if self._skipped is None:
            return list(ids)
        return [i for i in ids if i not in self._skipped]

    def step(self, ids: Sequence[int]) -> str:
        """The text `ids` complete ('' while a character's bytes are still incomplete)."""
        kept = self._kept(ids)
        return (self._stream.step(self._tok, kept) or "") if kept else ""
