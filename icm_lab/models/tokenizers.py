"""Tokenizers built offline.

The SD-family tokenizer is the exact CLIP BPE tokenizer of SD1.5, rebuilt from the BPE merge list
that open_clip ships (`bpe_simple_vocab_16e6.txt.gz`), so nothing is downloaded. Sana's tiny twin
gets a byte-level tokenizer: 256 byte symbols cover any text, with no training data needed.
"""

from __future__ import annotations

import gzip
import json
import tempfile
from functools import lru_cache
from pathlib import Path

from open_clip.tokenizer import bytes_to_unicode, default_bpe
from transformers import CLIPTokenizer, PreTrainedTokenizerFast

from icm_lab.io.files import write_text

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
CLIP_MAX_LENGTH = 77
_N_MERGES = 49152 - 256 - 2  # the merge count CLIP was trained with


def clip_bpe_files(directory: Path) -> tuple[Path, Path]:
    """Write CLIP's `vocab.json` and `merges.txt` into `directory`, derived from open_clip's BPE."""
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1 : _N_MERGES + 1]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += [CLIP_BOS, CLIP_EOS]
    vocab_file, merges_file = directory / "vocab.json", directory / "merges.txt"
    # Atomic: concurrent jobs may build the same cached files at once.
    write_text(vocab_file, json.dumps({tok: i for i, tok in enumerate(vocab)}))
    write_text(merges_file, "#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab_file, merges_file


@lru_cache(maxsize=1)
def _clip_tokenizer_dir() -> Path:
    directory = Path(tempfile.mkdtemp(prefix="icm_clip_bpe_"))
    vocab_file, merges_file = clip_bpe_files(directory)
    tokenizer = CLIPTokenizer(
        vocab=str(vocab_file),
        merges=str(merges_file),
        bos_token=CLIP_BOS,
        eos_token=CLIP_EOS,
        unk_token=CLIP_EOS,
        pad_token=CLIP_EOS,  # SD1.5's tokenizer pads with <|endoftext|>
        model_max_length=CLIP_MAX_LENGTH,
    )
    tokenizer.save_pretrained(directory)
    return directory


def clip_tokenizer(pad_token: str = CLIP_EOS, model_max_length: int = 77) -> CLIPTokenizer:
    """The exact SD1.5 CLIP tokenizer (SDXL's second tokenizer pads with "!" instead)."""
    return CLIPTokenizer.from_pretrained(_clip_tokenizer_dir(), pad_token=pad_token,
                                         model_max_length=model_max_length)


def byte_tokenizer(max_length: int = 128) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with no merges: any text, 260 ids, built without data."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    alphabet = list(bytes_to_unicode().values())
    vocab = {tok: i for i, tok in enumerate(specials + alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        model_max_length=max_length,
        padding_side="right",
    )
