"""Training a byte-level BPE tokenizer: what `python -m train.tokenizer` and the demo's
tokenizer (train/data/demo.py) are made with.

    tok = train_tokenizer(texts, vocab_size, out)   # saved to the folder `out`, loaded from it

The tokenizer is GPT-2 style: bytes are the base alphabet (every text encodes, nothing is ever
unknown), pre-tokenized on spaces/punctuation, merges learned by `tokenizers`' BpeTrainer on the
texts given. Special tokens: EOS "<|endoftext|>" (id 0, ends every document) and BOS
"<|startoftext|>" (id 1). The total size, special tokens included, is vocab_size (fewer only
when the text has fewer distinct merges). The folder is saved with tokenizer_class
PreTrainedTokenizerFast, so `AutoTokenizer.from_pretrained(DIR)` loads it offline on
transformers 4.x and 5.x alike.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from octo.tokenizer_files import auto_tokenizer, save_tokenizer
from train.errors import DataError

EOS, BOS = "<|endoftext|>", "<|startoftext|>"


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, out: str | Path, *, show_progress: bool = False
):
    """Train on texts, save to out, and return the loaded transformers tokenizer."""
    from transformers import PreTrainedTokenizerFast  # lazy: seconds to import; builds only

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 2:
        raise DataError(
            f"--vocab-size {vocab_size} is below the {len(alphabet) + 2} a byte-level BPE needs "
            "(256 bytes + EOS + BOS); choose a larger one"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS, BOS],
        initial_alphabet=alphabet,
        show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    out = Path(out)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=BOS)
    try:
        save_tokenizer(fast, out, model_max_length=None)  # a class transformers 4.x loads too
    except OSError as e:  # disk full, no permission, a path under a regular file
        raise DataError(
            f"cannot write the tokenizer to {out} ({e}); name a writable folder"
        ) from None
    return auto_tokenizer(out, local=True)
