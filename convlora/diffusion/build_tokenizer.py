"""Build a real-vocabulary CLIP tokenizer folder from OpenAI's BPE file.

The CLIP BPE merges ship inside the ``open-clip-torch`` wheel as
``open_clip/bpe_simple_vocab_16e6.txt.gz`` (identical in ``clip-anytorch``). This script turns
that file into the ``vocab.json`` + ``merges.txt`` pair that ``transformers.CLIPTokenizer``
reads, exactly as OpenAI's ``SimpleTokenizer`` builds its tables:

* merges = lines ``1 .. 48894`` of the file (line 0 is a version header);
* vocab  = the 256 byte-to-unicode characters, the same 256 with ``</w>`` appended, one token
  per merge (the two halves joined), then ``<|startoftext|>`` and ``<|endoftext|>``.

With all 48,894 merges this gives OpenAI's 49,408-token vocabulary (ids identical to the
tokenizer of every SD 1.x checkpoint). Keeping only the first ``N`` merges gives a valid
``512 + N + 2``-token tokenizer: ``--num_merges 486`` gives the 1,000-token tokenizer that the
project's tiny text encoders use (``convlora/diffusion/assets/clip_tokenizer``).

Usage::

    pip download --no-deps open-clip-torch -d /tmp/oc
    unzip -j /tmp/oc/open_clip_torch-*.whl open_clip/bpe_simple_vocab_16e6.txt.gz -d /tmp/oc
    python -m convlora.diffusion.build_tokenizer --bpe /tmp/oc/bpe_simple_vocab_16e6.txt.gz \\
        --out convlora/diffusion/assets/clip_tokenizer --num_merges 486 --check

``--check`` first builds the full vocabulary in a temporary folder and asserts that
``"a photo of a cat"`` encodes to OpenAI's ids ``[49406, 320, 1125, 539, 320, 2368, 49407]``.

Load the result with ``CLIPTokenizer.from_pretrained(folder, model_max_length=77)``; do not use
the ``CLIPTokenizer(vocab_file=..., merges_file=...)`` constructor, which in transformers 5
silently builds a 2-token tokenizer.
"""

from __future__ import annotations

import argparse
import gzip
import json
import tempfile
from pathlib import Path

__all__ = [
    "FULL_NUM_MERGES",
    "BOS_TOKEN",
    "EOS_TOKEN",
    "KNOWN_FULL_IDS",
    "bytes_to_unicode",
    "read_bpe_merges",
    "build_vocab",
    "write_tokenizer_folder",
    "check_full_tokenizer",
    "main",
]

#: Number of merges OpenAI's CLIP uses (``49152 - 256 - 2``).
FULL_NUM_MERGES = 48894
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
#: OpenAI CLIP ids for "a photo of a cat" (with BOS/EOS), used by ``--check``.
KNOWN_FULL_IDS = ("a photo of a cat", [49406, 320, 1125, 539, 320, 2368, 49407])


def bytes_to_unicode() -> dict[int, str]:
    """OpenAI's / GPT-2's reversible byte -> printable unicode character table (256 entries)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def read_bpe_merges(bpe_path: str | Path, num_merges: int = FULL_NUM_MERGES) -> list[tuple[str, str]]:
    """Read the first ``num_merges`` merges (lines ``1..num_merges``) of the gzipped BPE file."""
    if not 0 <= num_merges <= FULL_NUM_MERGES:
        raise ValueError(f"num_merges must be in [0, {FULL_NUM_MERGES}], got {num_merges}")
    with gzip.open(bpe_path, "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    lines = lines[1 : num_merges + 1]
    merges: list[tuple[str, str]] = []
    for i, line in enumerate(lines, start=1):
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{bpe_path}: line {i} is not a merge pair: {line!r}")
        merges.append((parts[0], parts[1]))
    if len(merges) != num_merges:
        raise ValueError(f"{bpe_path}: only {len(merges)} merges, wanted {num_merges}")
    return merges


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """OpenAI's vocabulary order: bytes, bytes + ``</w>``, one token per merge, BOS, EOS."""
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(m) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("duplicate tokens in the vocabulary")
    return vocab


def write_tokenizer_folder(
    bpe_path: str | Path, out_dir: str | Path, num_merges: int = FULL_NUM_MERGES
) -> Path:
    """Write ``vocab.json``, ``merges.txt``, ``tokenizer_config.json`` and
    ``special_tokens_map.json`` into ``out_dir``; returns ``out_dir`` as a Path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merges = read_bpe_merges(bpe_path, num_merges)
    vocab = build_vocab(merges)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (out / "merges.txt").write_text(merges_text, encoding="utf-8")
    special = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": True,
        "errors": "replace",
        **special,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out


def _load(folder: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=77)


def check_full_tokenizer(bpe_path: str | Path) -> None:
    """Build the full 49,408-token vocabulary in a temp folder and assert OpenAI's ids."""
    text, expected = KNOWN_FULL_IDS
    with tempfile.TemporaryDirectory() as tmp:
        tok = _load(write_tokenizer_folder(bpe_path, tmp, FULL_NUM_MERGES))
        ids = tok(text).input_ids
        if len(tok) != 49408:
            raise AssertionError(f"full tokenizer has {len(tok)} tokens, expected 49408")
        if ids != expected:
            raise AssertionError(f"{text!r} -> {ids}, expected OpenAI's {expected}")
    print(f"check ok: full vocabulary (49408 tokens), {text!r} -> {expected}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bpe", required=True, help="path to bpe_simple_vocab_16e6.txt.gz")
    p.add_argument("--out", required=True, help="output tokenizer folder")
    p.add_argument("--num_merges", type=int, default=FULL_NUM_MERGES,
                   help=f"merges to keep (vocab size = 514 + num_merges); default {FULL_NUM_MERGES}")
    p.add_argument("--check", action="store_true",
                   help="first verify OpenAI's ids with the full vocabulary")
    args = p.parse_args(argv)
    if args.check:
        check_full_tokenizer(args.bpe)
    out = write_tokenizer_folder(args.bpe, args.out, args.num_merges)
    tok = _load(out)
    expected_size = 512 + args.num_merges + 2
    if len(tok) != expected_size:
        raise AssertionError(f"tokenizer in {out} has {len(tok)} tokens, expected {expected_size}")
    print(f"wrote {out}: {len(tok)} tokens, bos={tok.bos_token_id} eos={tok.eos_token_id} "
          f"pad={tok.pad_token_id}; 'a photo of a cat' -> {tok('a photo of a cat').input_ids}")


if __name__ == "__main__":
    main()
