"""A CLIP tokenizer learned from a small vocabulary: each vocabulary word becomes one token.

Used by the tiny test pipeline and by the default generator's training: both need a real
``CLIPTokenizer`` that saves inside a diffusers pipeline folder and loads back unchanged.
"""

from __future__ import annotations

from collections import Counter
from itertools import pairwise
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<|startoftext|>", "<|endoftext|>", "<|unk|>"
# CLIP's context length; the pipeline pads every prompt to the tokenizer's model_max_length.
MAX_PROMPT_TOKENS = 77


def build_clip_tokenizer(vocabulary: list[str], max_length: int = MAX_PROMPT_TOKENS) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` whose BPE vocabulary and merges are learned from ``vocabulary``.

    Words are split with CLIP's own normalizer and pre-tokenizer, as the tokenizer will split prompts.
    The result is built from ``vocab`` and ``merges`` because that is what ``from_pretrained`` does
    too (transformers 5 rebuilds CLIP's backend from them), so it behaves the same after reloading.
    """
    from transformers import CLIPTokenizer

    clip = CLIPTokenizer().backend_tokenizer
    pieces = {
        piece
        for word in vocabulary
        for piece, _ in clip.pre_tokenizer.pre_tokenize_str(clip.normalizer.normalize_str(word))
    }
    if not pieces:
        raise ValueError(f"vocabulary has no words: {vocabulary!r}")
    vocab, merges = _learn_bpe(sorted(pieces))
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=UNK_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,  # CLIP pads with its end token
        model_max_length=max_length,
    )


def _learn_bpe(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """BPE with CLIP's ``</w>`` suffix: merge the most frequent pair until every word is one token.

    Written out rather than ``tokenizers.trainers.BpeTrainer``, which numbers tokens in hash order and
    so gives a different tokenizer, and different images, on every run. Ties go to the smallest pair.

    Returns:
        The vocabulary (special tokens, then characters, then merged tokens) and the merges in order.
    """
    words_as_tokens = [[*word[:-1], word[-1] + "</w>"] for word in words]
    tokens = [BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, *sorted({t for word in words_as_tokens for t in word})]
    merges: list[tuple[str, str]] = []
    while pairs := Counter(pair for word in words_as_tokens for pair in pairwise(word)):
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        tokens.append(best[0] + best[1])
        words_as_tokens = [_merge_pair(word, best) for word in words_as_tokens]
    return {token: i for i, token in enumerate(dict.fromkeys(tokens))}, merges


def _merge_pair(word: list[str], pair: tuple[str, str]) -> list[str]:
    merged, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            merged.append(word[i] + word[i + 1])
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return merged
