#!/usr/bin/env python
"""Build a tiny random-weight Llama that vLLM can serve, with no model hub.

The model is useless as a language model (random weights) but real in every
way the serving stack cares about: a Llama architecture, a trained byte-level
BPE tokenizer, a chat template with system/user/assistant/tool roles and tool
definitions, safetensors weights in bfloat16. It is a few MB and fully
deterministic for a given ``--seed``.

Sizes respect what vLLM's CPU attention kernels accept: head_dim 64
(hidden 128, 2 heads); head_dim 16 is rejected.

Example::

    .venv-vllm/bin/python scripts/make_tiny_model.py --out models/tiny-llama
    .venv-vllm/bin/python -m vllm.entrypoints.openai.api_server --model models/tiny-llama
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

# Bumped whenever the produced files change, so callers can tell a stale build.
FORMAT_VERSION = 2

SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|end|>"]
# Plain added tokens (kept in decoded text) so Hermes-style tool parsers find them.
TOOL_TOKENS = ["<tool_call>", "</tool_call>"]

# Roles render as <|role|>content<|end|>; assistant tool calls as Hermes-style
# <tool_call>{json}</tool_call>; tool definitions go into the system turn.
CHAT_TEMPLATE = """{{- bos_token -}}
{%- macro text(content) -%}
{%- if content is none -%}{%- elif content is string -%}{{ content }}
{%- else -%}{%- for part in content -%}{%- if part.type == 'text' -%}{{ part.text }}{%- endif -%}{%- endfor -%}{%- endif -%}
{%- endmacro -%}
{%- if tools -%}
<|system|>You may call these tools. Reply with <tool_call>{"name": ..., "arguments": {...}}</tool_call>.
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}<|end|>
{% endif -%}
{%- for message in messages -%}
<|{{ message.role }}|>{{ text(message.content) }}
{%- if message.tool_calls is defined and message.tool_calls -%}
{%- for call in message.tool_calls -%}
{%- set fn = call.function if call.function is defined else call -%}
<tool_call>{"name": {{ fn.name | tojson }}, "arguments": {{ fn.arguments | tojson if fn.arguments is not string else fn.arguments }}}</tool_call>
{%- endfor -%}
{%- endif -%}
<|end|>
{% endfor -%}
{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"""

_WORDS = """the a an and or but if then else when while for of to in on at by with from as is are was were be
been being have has had do does did will would can could should may might must shall not no yes this that these
those it its they them their we us our you your he she his her i me my agent task model data answer question
tool call result error retry replica server request response token tokens prompt message system user assistant
cluster node gpu cpu memory disk file path shard row column table output input value number string list dict
key name type schema json function argument return true false null none first second third next last step turn
dialogue reason because therefore however example test check verify compute sum product count total average
choose option choice correct wrong score filter keep drop quality document web page science math history
language code python program write read open close start stop run wait sleep time second minute hour day
""".split()


def build_corpus(seed: int, n_lines: int = 4000) -> list[str]:
    """Deterministic training text: words, numbers, JSON and chat-like lines."""
    rng = random.Random(seed)
    lines = []
    for i in range(n_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 18))]
        kind = i % 4
        if kind == 0:
            lines.append(" ".join(words).capitalize() + ".")
        elif kind == 1:
            lines.append(json.dumps({rng.choice(_WORDS): rng.randint(0, 10_000), "text": " ".join(words[:5])}))
        elif kind == 2:
            lines.append(f"{' '.join(words)}? Answer: {rng.choice('ABCDEFGHIJ')} ({rng.random():.3f})")
        else:
            lines.append(f"def {words[0]}_{words[1]}(x, y={i}):\n    return x + y  # {' '.join(words[2:6])}")
    return lines


def train_tokenizer(corpus: list[str], vocab_size: int) -> Any:  # Any: tokenizers.Tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def save_tokenizer(tok: Any, out: Path, max_len: int) -> Any:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|end|>",
        pad_token="<pad>",
        unk_token=None,
        model_max_length=max_len,
        clean_up_tokenization_spaces=False,
    )
    fast.add_tokens(TOOL_TOKENS)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))
    # One place for the template, readable by old and new transformers alike.
    (out / "chat_template.jinja").unlink(missing_ok=True)
    _patch_json(out / "tokenizer_config.json", _portable_tokenizer_config)
    return fast


def save_model(tokenizer: Any, out: Path, args: argparse.Namespace) -> int:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    eos_ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|end|>", "</s>")]
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_heads,
        head_dim=args.hidden_size // args.num_heads,
        max_position_embeddings=args.max_len,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_ids,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(str(out), safe_serialization=True)
    _patch_json(out / "config.json", _legacy_config_keys)
    return sum(p.numel() for p in model.parameters())


def _patch_json(path: Path, patch: Any) -> None:
    data = json.loads(path.read_text())
    patch(data)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _legacy_config_keys(config: dict[str, Any]) -> None:
    # transformers 5 writes "dtype" and "rope_parameters"; the 4.x releases that
    # older GPU vLLM images ship read "torch_dtype" and "rope_theta".
    config["torch_dtype"] = config.get("dtype", "bfloat16")
    config.setdefault("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta", 10000.0))


def _portable_tokenizer_config(config: dict[str, Any]) -> None:
    # "TokenizersBackend" is transformers 5 only; every version knows this name.
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["chat_template"] = CHAT_TEMPLATE


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("models/tiny-llama"), help="output directory")
    p.add_argument("--seed", type=int, default=0, help="seed for corpus and weights")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size")
    p.add_argument("--hidden-size", type=int, default=128, help="model width")
    p.add_argument("--num-heads", type=int, default=2, help="attention heads (head_dim = hidden/heads, keep 64)")
    p.add_argument("--num-layers", type=int, default=2, help="decoder layers")
    p.add_argument("--intermediate-size", type=int, default=256, help="MLP width")
    p.add_argument("--max-len", type=int, default=4096, help="max positions (context length)")
    p.add_argument("--force", action="store_true", help="rebuild even if --out holds this format version")
    args = p.parse_args(argv)
    if args.hidden_size % args.num_heads:
        p.error(f"--hidden-size {args.hidden_size} is not divisible by --num-heads {args.num_heads}")
    return args


def is_built(out: Path) -> bool:
    stamp = out / "tiny_model.json"
    try:
        return bool(json.loads(stamp.read_text()).get("format_version") == FORMAT_VERSION)
    except (OSError, ValueError):
        return False


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if is_built(args.out) and not args.force:
        print(f"{args.out} already holds a tiny model (format {FORMAT_VERSION}); --force rebuilds it")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(build_corpus(args.seed), args.vocab_size)
    tokenizer = save_tokenizer(tok, args.out, args.max_len)
    n_params = save_model(tokenizer, args.out, args)
    stamp = {"format_version": FORMAT_VERSION, "seed": args.seed, "params": n_params, "vocab": len(tokenizer)}
    (args.out / "tiny_model.json").write_text(json.dumps(stamp, indent=1) + "\n")
    size_mb = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file()) / 1e6
    print(f"wrote {args.out}: {n_params:,} parameters, vocab {len(tokenizer)}, {size_mb:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
