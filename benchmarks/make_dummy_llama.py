#!/usr/bin/env python
"""A Llama-architecture model directory for vLLM's ``--load-format dummy``: config and tokenizer
only, built here, nothing downloaded (benchmarks/gpu_suite.sh, docs/serve.md).

``--shape llama3-8b`` has Llama-3-8B's shapes (32 layers, hidden 4096, MLP 14336, 32 query and 8
key/value heads, vocabulary 128,256, 8,192 positions, rope theta 500,000); ``--shape tiny`` is the
tiny CPU model's (for the suite's smoke mode). The tokenizer is the tiny model's (a byte-level BPE
trained by ``scripts/make_tiny_model.py``, same chat template) with its vocabulary filled up to the
model's by tokens no text encodes to (``<r123>``): every id the random weights can sample decodes,
and the LM head has the real width. No weight files: vLLM makes random ones on the device.

    python benchmarks/make_dummy_llama.py --shape llama3-8b --out /tmp/llama3-8b-dummy
    vllm serve /tmp/llama3-8b-dummy --load-format dummy
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from make_tiny_model import (  # noqa: E402
    TOOL_TOKENS,
    _legacy_config_keys,
    _patch_json,
    build_corpus,
    save_tokenizer,
    train_tokenizer,
)

SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b": {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                  "max_position_embeddings": 8192, "rope_theta": 500000.0},
    # head_dim 64: what vLLM's CPU attention accepts (as models/tiny-llama)
    "tiny": {"vocab_size": 8192, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
             "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 64, "max_position_embeddings": 4096,
             "rope_theta": 10000.0},
}
STAMP = "dummy_model.json"


def padded_tokenizer(vocab_size: int, seed: int) -> Any:  # Any: tokenizers.Tokenizer
    """The tiny model's BPE with vocabulary entries added until, with the tool tokens that
    save_tokenizer adds, it has ``vocab_size`` ids."""
    from tokenizers import Tokenizer

    data = json.loads(train_tokenizer(build_corpus(seed), 4096).to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    next_id, i = max(vocab.values()) + 1, 0
    while next_id < vocab_size - len(TOOL_TOKENS):
        token = f"<r{i}>"
        i += 1
        if token not in vocab:
            vocab[token] = next_id
            next_id += 1
    return Tokenizer.from_str(json.dumps(data))


def build(out: Path, shape: str, seed: int) -> None:
    from transformers import LlamaConfig

    dims = SHAPES[shape]
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = save_tokenizer(padded_tokenizer(dims["vocab_size"], seed), out, dims["max_position_embeddings"])
    if len(tokenizer) != dims["vocab_size"]:
        raise SystemExit(f"tokenizer has {len(tokenizer)} ids, the {shape} model {dims['vocab_size']}")
    eos_ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|end|>", "</s>")]
    config = LlamaConfig(**dims, rms_norm_eps=1e-5, bos_token_id=tokenizer.bos_token_id, eos_token_id=eos_ids,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, torch_dtype="bfloat16")
    config.save_pretrained(str(out))
    _patch_json(out / "config.json", _legacy_config_keys)
    params = dims["vocab_size"] * dims["hidden_size"] * 2 + dims["num_hidden_layers"] * (
        dims["hidden_size"] * dims["head_dim"] * (2 * dims["num_attention_heads"] + 2 * dims["num_key_value_heads"])
        + 3 * dims["hidden_size"] * dims["intermediate_size"])
    (out / STAMP).write_text(json.dumps({"shape": shape, "seed": seed, "params": params}) + "\n")
    print(f"wrote {out}: {shape} config ({params / 1e9:.2f} B parameters, made by vLLM on load) and tokenizer "
          f"({len(tokenizer)} ids)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    p.add_argument("--out", type=Path, required=True, help="model directory to write")
    p.add_argument("--seed", type=int, default=0, help="seed of the tokenizer's training text")
    args = p.parse_args(argv)
    try:
        if json.loads((args.out / STAMP).read_text()).get("shape") == args.shape:
            print(f"{args.out} already holds the {args.shape} config")
            return 0
    except (OSError, ValueError):
        pass
    build(args.out, args.shape, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
