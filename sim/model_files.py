"""The files a model repository holds for the simulated model (``tokenizer.json``, ``tokenizer_config.json`` with
its chat template), so a router can tokenize exactly as the simulator does, like it would for a real model.

``CHAT_TEMPLATE`` is ``epp_sim.prompts.chat_segments`` written as a Jinja2 chat template (message content already
flattened to text, as vLLM hands it to string-content templates)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from epp_sim.tokenizer import SPECIAL_TOKENS, tokenizer_path

CHAT_TEMPLATE = (
    "{%- if tools %}<|tools|>{{ tools | tojson(separators=(',', ':'), sort_keys=True) }}<|end|>{% endif -%}"
    "{%- for m in messages -%}"
    "{%- set role = 'system' if m.role == 'developer' else ('tool' if m.role == 'function' else m.role) -%}"
    "<|{{ role }}|>{{ m.content if m.content is string else '' }}"
    "{%- if m.tool_calls %}{{ m.tool_calls | tojson(separators=(',', ':'), sort_keys=True) }}{% endif -%}"
    "<|end|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}<|assistant|>{% endif -%}"
)


def write_model_dir(directory: str | Path, tokenizer: str = "deepseek") -> Path:
    """A model directory for the simulator started with ``--tokenizer <tokenizer>``: a link to its
    ``tokenizer.json`` and a ``tokenizer_config.json`` naming the chat markers as special tokens."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    src = os.path.abspath(tokenizer_path(tokenizer))
    link = out / "tokenizer.json"
    if not link.exists():
        link.symlink_to(src)
    config = {"chat_template": CHAT_TEMPLATE, "additional_special_tokens": list(SPECIAL_TOKENS),
              "bos_token": None, "eos_token": "<|eos|>", "tokenizer_class": "PreTrainedTokenizerFast"}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return out
