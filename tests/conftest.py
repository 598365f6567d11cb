"""Shared fixtures: tiny random FLUX.1-layout models, built offline, saved the way diffusers saves them."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(min(2, torch.get_num_threads()))

VOCAB_SIZE = 160
WORDS = (
    "a red green blue yellow circle square triangle star above below left right of the on in small large "
    "background sign that says black white cat dog photo blurry ugly"
).split()


def _word_tokenizer(kind: str):
    """A small fast tokenizer built here from WORDS (no downloads): CLIP-style BPE (bos/eos) or T5-style Unigram (eos).

    Built from explicit vocabularies, not trained: the `tokenizers` trainers break ties in hash-map order, which differs
    between processes, so trained ids (and every image a test makes from them) changed from run to run.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    letters = sorted(set("".join(WORDS)))
    if kind == "clip":
        from transformers import CLIPTokenizerFast

        # Whole-word BPE: the merges build each word left to right; other words fall back to letters.
        vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<bos>", "<eos>"])}
        for c in letters:
            vocab.setdefault(c, len(vocab))
            vocab.setdefault(c + "</w>", len(vocab))
        merges = []
        for word in sorted(set(WORDS)):
            pieces = list(word[:-1]) + [word[-1] + "</w>"]
            while len(pieces) > 1:
                merged = pieces[0] + pieces[1]
                if (pieces[0], pieces[1]) not in merges:
                    merges.append((pieces[0], pieces[1]))
                vocab.setdefault(merged, len(vocab))
                pieces = [merged] + pieces[2:]
        assert len(vocab) <= VOCAB_SIZE, len(vocab)
        tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", end_of_word_suffix="</w>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A <eos>", special_tokens=[("<bos>", 2), ("<eos>", 3)]
        )
        return CLIPTokenizerFast(
            tokenizer_object=tok,
            bos_token="<bos>",
            eos_token="<eos>",
            unk_token="<unk>",
            pad_token="<pad>",
            model_max_length=77,
        )
    from transformers import T5TokenizerFast

    # T5 tokenizers are Unigram models (transformers rebuilds them from vocab scores when loading); this one is
    # letter-level: the word boundary piece and one piece per letter, all equally likely.
    pieces = ["<pad>", "</s>", "<unk>", "\u2581"] + letters
    tok = Tokenizer(models.Unigram([(p, -1.0) for p in pieces], unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(
        tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0, model_max_length=512
    )


def tiny_diffusers_transformer(guidance_embeds: bool, in_channels: int = 64, layers: int = 1, std: float = 0.2):
    """A tiny random diffusers FluxTransformer2DModel (TEST_FLUX sizes), weights scaled so every block matters."""
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=in_channels,
        out_channels=64,
        num_layers=layers,
        num_single_layers=layers,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=48,
        pooled_projection_dim=32,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )
    with torch.no_grad():
        for p in transformer.parameters():
            p.normal_(0, std)
    return transformer


def tiny_diffusers_pipeline(guidance_embeds: bool = True, in_channels: int = 64, seed: int = 0):
    """A diffusers FluxPipeline whose every component is tiny and random (weights scaled up so outputs vary)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    n_vocab = VOCAB_SIZE
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=n_vocab,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=2,
            eos_token_id=3,
            pad_token_id=0,
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=n_vocab,
            d_model=48,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    transformer = tiny_diffusers_transformer(guidance_embeds, in_channels)
    # 4 levels: an 8x autoencoder, as every Flux pipeline assumes.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
        sample_size=64,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=guidance_embeds,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    if not guidance_embeds:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip,
        tokenizer=_word_tokenizer("clip"),
        text_encoder_2=t5,
        tokenizer_2=_word_tokenizer("t5"),
        transformer=transformer,
    )


@pytest.fixture(scope="session")
def tiny_dev_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-flux-dev")
    tiny_diffusers_pipeline(guidance_embeds=True).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_schnell_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-flux-schnell")
    tiny_diffusers_pipeline(guidance_embeds=False).save_pretrained(folder)
    return folder
