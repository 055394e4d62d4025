"""A tiny Whisper speech recogniser with seeded random weights, saved as a released one is.

:func:`write_tiny_whisper_asr` saves a ``WhisperForConditionalGeneration`` (one encoder and one
decoder layer of width 32) and its ``WhisperProcessor`` (the 80-bin feature extractor and a
byte-level BPE tokenizer trained here on a few English words, with Whisper's special tokens)
with ``save_pretrained``, so that ``conilium corpus transcribe --asr DIR`` loads it through the
same ``from_pretrained`` path as ``openai/whisper-large-v3``. Its random weights produce
meaningless text: it shows that the path works, not what a real model hears.
"""

from __future__ import annotations

from pathlib import Path

#: Whisper's special tokens this tokenizer holds (end of text first: it is also the padding).
SPECIAL_TOKENS = ("<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|translate|>",
                  "<|notimestamps|>")
_WORDS = ("so what I was saying is that we could not believe it really happened "
          "I am so happy about this it makes me angry and sad at the same time "
          "well that is surprising I guess we will see what they do next week")


def write_tiny_whisper_asr(out, *, seed: int = 0, speak: bool = True) -> Path:
    """Save the tiny random-weight Whisper recogniser into ``out``; returns ``out``.

    With ``speak`` the special tokens other than end of text are suppressed in generation, so
    that the random model writes words; without, it is left as random as it is (it may then
    produce no text at all)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor,
                              WhisperForConditionalGeneration, WhisperProcessor, WhisperTokenizerFast)

    out = Path(out)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_WORDS], trainer)
    eot = SPECIAL_TOKENS[0]
    tokenizer = WhisperTokenizerFast(tokenizer_object=tok, unk_token=eot, bos_token=eot, eos_token=eot, pad_token=eot)
    ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    processor = WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tokenizer)
    config = WhisperConfig(vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                           decoder_ffn_dim=64, num_mel_bins=80, max_source_positions=1500, max_target_positions=64,
                           decoder_start_token_id=ids[1], eos_token_id=ids[0], pad_token_id=ids[0],
                           bos_token_id=ids[0], begin_suppress_tokens=None, suppress_tokens=None)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = WhisperForConditionalGeneration(config)
    finally:
        torch.random.set_rng_state(state)
    gen = GenerationConfig.from_model_config(config)
    gen.no_timestamps_token_id = ids[5]
    gen.suppress_tokens = list(ids[1:]) if speak else None
    model.generation_config = gen
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
