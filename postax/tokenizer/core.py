"""`Tokenizer`: a Hugging Face fast tokenizer with its special tokens and chat templates.

Parity with transformers 5 (pinned by tests/test_tokenizer.py against `AutoTokenizer`):

* `encode`/`decode` are the `tokenizers` backend's. Whether `encode` adds bos/eos is decided by
  the post-processor in `tokenizer.json` alone, as transformers 5 does; `add_bos_token` and
  `add_eos_token` in the config only cause a warning when they disagree with it.
* The chat template is chosen by `template_name`, else "tool_use" when tools are passed, else
  "default". Templates see the named special tokens as variables, `tools` and
  `documents=None`. Chat ids are the rendered text encoded with `add_special_tokens=False`
  (templates write bos themselves).

Deliberate difference: `decode` never applies `clean_up_tokenization_spaces` (transformers 5
skips it for BPE too).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tokenizers

from postax.tokenizer.chat_inputs import prepare_messages, prepare_tools, to_plain
from postax.tokenizer.hf_dir import (
    CONFIG_FILE,
    DEFAULT_TEMPLATE,
    NAMED_TEMPLATE_FILES,
    PAD_TOKEN_SOURCES,
    TEMPLATE_FILE,
    TOOL_USE_TEMPLATE,
)
from postax.tokenizer.jinja_env import ChatTemplate, ChatTemplateError, render_template
from postax.tokenizer.masks import ChatEncoding, assistant_spans, expand_marker, spans_to_mask


class Tokenizer:
    """A Hugging Face fast tokenizer with its special tokens and chat templates.

    Build it with `load_tokenizer`. Token ids are plain Python ints.

    Attributes:
        bos_token, eos_token, unk_token: The named tokens from the config, or None.
        bos_token_id, eos_token_id, unk_token_id: Their ids, or None.
        eos_token_ids: Every id that ends generation: `eos_token_id` first, then the
            `eos_token_id` entries of `generation_config.json` when the directory has one.
        pad_token, pad_token_id: Always set; see `pad_token_source`.
        pad_token_source: Where the pad token came from, one of `PAD_TOKEN_SOURCES`:
            "tokenizer_config.json", "pad_token argument", "eos (no pad token in
            tokenizer_config.json)", ...
        add_bos_token, add_eos_token: Whether `encode(..., add_special_tokens=True)` adds them.
        special_tokens: The named special tokens passed to chat templates as variables.
        chat_templates: Template name -> source ("default" for a single template).
        source: The directory the tokenizer was loaded from.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        special_tokens: Mapping[str, str],
        pad_token: str,
        pad_token_source: str,
        extra_eos_token_ids: Sequence[int],
        chat_templates: Mapping[str, ChatTemplate],
        source: str,
    ) -> None:
        if pad_token_source not in PAD_TOKEN_SOURCES:
            raise ValueError(
                f"pad_token_source={pad_token_source!r} is invalid: one of {PAD_TOKEN_SOURCES}"
            )
        self._backend = backend
        self._templates = dict(chat_templates)
        self.source = source
        self.special_tokens = dict(special_tokens)
        self.bos_token = special_tokens.get("bos_token")
        self.eos_token = special_tokens.get("eos_token")
        self.unk_token = special_tokens.get("unk_token")
        self.bos_token_id = self._optional_id(self.bos_token)
        self.eos_token_id = self._optional_id(self.eos_token)
        self.unk_token_id = self._optional_id(self.unk_token)
        self.pad_token = pad_token
        self.pad_token_id = self.token_to_id(pad_token)
        self.pad_token_source = pad_token_source
        own_eos = () if self.eos_token_id is None else (self.eos_token_id,)
        self.eos_token_ids = tuple(dict.fromkeys((*own_eos, *extra_eos_token_ids)))
        self.add_bos_token, self.add_eos_token = self._post_processor_adds()
        self.chat_templates = {name: t.source for name, t in self._templates.items()}

    def __repr__(self) -> str:
        return (
            f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size}, "
            f"bos={self.bos_token!r}, eos={self.eos_token!r}, pad={self.pad_token!r}, "
            f"chat_templates={sorted(self._templates)})"
        )

    # -- vocabulary -----------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of tokens, added tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int:
        """The id of `token`; KeyError if it is not in the vocabulary."""
        token_id = self._backend.token_to_id(token)
        if token_id is None:
            raise KeyError(f"token {token!r} is not in the vocabulary of {self.source}")
        return token_id

    def id_to_token(self, token_id: int) -> str:
        """The token string of `token_id`; IndexError if there is no such id."""
        token = self._backend.id_to_token(int(token_id))
        if token is None:
            raise IndexError(f"token id {token_id} is not in the vocabulary of {self.source}")
        return token

    def _optional_id(self, token: str | None) -> int | None:
        """The id of `token`, or None when there is no token."""
        return None if token is None else self.token_to_id(token)

    def _post_processor_adds(self) -> tuple[bool, bool]:
        """Whether encoding with special tokens prepends bos and appends eos."""
        ids = self._backend.encode("", add_special_tokens=True).ids
        adds_bos = self.bos_token_id is not None and ids[:1] == [self.bos_token_id]
        adds_eos = self.eos_token_id is not None and ids[-1:] == [self.eos_token_id]
        return adds_bos, adds_eos

    # -- text -----------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` lets the post-processor add bos/eos."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def batch_encode(
        self, texts: Sequence[str], add_special_tokens: bool = True
    ) -> list[list[int]]:
        """`encode` for many texts at once (in parallel in the backend); no padding."""
        encodings = self._backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [encoding.ids for encoding in encodings]

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = False) -> str:
        """Text of `ids`; `skip_special_tokens` drops tokens marked special in tokenizer.json."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # -- chat -----------------------------------------------------------------------------------

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
        template_name: str | None = None,
        **template_kwargs: Any,
    ) -> str:
        """Render `messages` with the chat template, as transformers'
        `apply_chat_template(..., tokenize=False)`; `template_kwargs` become template variables."""
        chat_template = self._select_template(template_name, tools)
        context = self._context(prepare_messages(messages), tools, template_kwargs)
        context["add_generation_prompt"] = add_generation_prompt
        return render_template(chat_template, context, "the conversation")[0]

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
        template_name: str | None = None,
        marker_expansion: tuple[str, str] | None = None,
        **template_kwargs: Any,
    ) -> list[int]:
        """Token ids of `messages` rendered with the chat template: one rendering, one encoding.

        The ids equal `apply_chat_template(...).ids` (and transformers'
        `apply_chat_template(messages, tokenize=True)`), without the assistant mask: no prefix
        renderings, so templates that rewrite earlier turns (Qwen3 drops the reasoning of past
        assistant turns) encode too. For prompts, reward-model inputs and anything that needs
        ids only. `marker_expansion` as in `apply_chat_template`.
        """
        text = self.render_chat(
            messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            template_name=template_name,
            **template_kwargs,
        )
        if marker_expansion is not None:
            text, _ = expand_marker(text, [], *marker_expansion)
        return self._backend.encode(text, add_special_tokens=False).ids

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
        template_name: str | None = None,
        marker_expansion: tuple[str, str] | None = None,
        **template_kwargs: Any,
    ) -> ChatEncoding:
        """Render and encode `messages`, with a mask of the assistant's tokens.

        The ids equal transformers' `apply_chat_template(messages, tokenize=True)`. The mask
        comes from `{% generation %}` tags when the template has them, else from rendering
        growing prefixes of the conversation (see `postax.tokenizer.masks`); either way it
        covers each assistant message's content and the end-of-turn marker after it.

        `marker_expansion=(marker, replacement)`: every `marker` in the rendered text becomes
        `replacement` before encoding, the mask following the moved text (Gemma 3's
        `<start_of_image>` -> its image token sequence, as `Gemma3Processor` expands it;
        `postax.data.images.ImageTokens`). `text` is the expanded text.
        """
        chat_template = self._select_template(template_name, tools)
        context = self._context(prepare_messages(messages), tools, template_kwargs)
        context["add_generation_prompt"] = add_generation_prompt
        text, spans = assistant_spans(chat_template, context)
        if marker_expansion is not None:
            text, spans = expand_marker(text, spans, *marker_expansion)
        encoding = self._backend.encode(text, add_special_tokens=False)
        return ChatEncoding(text, encoding.ids, spans_to_mask(encoding.offsets, spans))

    def _select_template(
        self, template_name: str | None, tools: Sequence[Mapping[str, Any]] | None
    ) -> ChatTemplate:
        """The template to use, chosen as transformers' `get_chat_template` does."""
        if not self._templates:
            raise ChatTemplateError(
                f"{self.source} has no chat template: looked for {TEMPLATE_FILE}, "
                f"{NAMED_TEMPLATE_FILES} and a 'chat_template' entry in {CONFIG_FILE}"
            )
        names = sorted(self._templates)
        if template_name is not None:
            if template_name not in self._templates:
                raise ChatTemplateError(
                    f"{self.source} has no chat template named {template_name!r}; it has {names}"
                )
            return self._templates[template_name]
        if tools is not None and TOOL_USE_TEMPLATE in self._templates:
            return self._templates[TOOL_USE_TEMPLATE]
        if DEFAULT_TEMPLATE in self._templates:
            return self._templates[DEFAULT_TEMPLATE]
        raise ChatTemplateError(
            f"{self.source} has several chat templates and none named {DEFAULT_TEMPLATE!r}; "
            f"pass template_name= one of {names}"
        )

    def _context(
        self,
        messages: list[dict[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None,
        template_kwargs: Mapping[str, Any],
    ) -> dict[str, Any]:
        """Template variables except `add_generation_prompt`, as transformers passes them:
        `documents=None` (unless given), the named special tokens, the caller's kwargs (which
        override tokens), `messages` and `tools`."""
        return {
            "documents": None,
            **self.special_tokens,
            **to_plain(dict(template_kwargs)),
            "messages": messages,
            "tools": prepare_tools(tools),
        }
