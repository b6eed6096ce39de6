"""The S* placeholder: prompts -> text-encoder contexts with v* (soft) or a real token (hard) in its place.

"S*" is added to a private copy of the tokenizer as one token that is matched before lower-casing.
Its id lies beyond the text encoder's vocabulary and is never looked up: we build the input
embeddings ourselves, put v* at the placeholder positions and run the rest of the (frozen) text
transformer on them, so the shared text encoder is never resized or written to. The hard prompt is
the same ids with the placeholder replaced by a real token id and goes through the same path.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from components.errors import UserError
from components.model.token_embedder import nearest_tokens
from components.toy import palette
from components.toy import world as tw

PLACEHOLDER = "S*"


def plain_background_prompts() -> list[str]:
    """The toy world's caption of an object on each palette colour with S* as the object, in palette order:
    "S* on a red background", ... (what `caption_plain_backgrounds` prompts with)."""
    return [f"{PLACEHOLDER} {tw.background_phrase('plain', colour)}" for colour in tw.COLOURS]


def plain_background_index(pixels: Tensor) -> list[int | None]:
    """For each image (N, 3, H, W) in [-1, 1]: its row of plain_background_prompts() when its border is one
    plain palette colour, else None."""
    images = ((pixels.detach().float().cpu() + 1.0) * 127.5).permute(0, 2, 3, 1).numpy()
    colours = list(tw.COLOURS)
    return [None if (c := palette.plain_background(image)) is None else colours.index(c) for image in images]


class PromptEncoder:
    def __init__(self, tokenizer, text_encoder):
        from tokenizers import AddedToken

        self.tokenizer = copy.deepcopy(tokenizer)
        self.tokenizer.add_tokens([AddedToken(PLACEHOLDER, normalized=False, single_word=False)])
        self.placeholder_id = self.tokenizer.convert_tokens_to_ids(PLACEHOLDER)
        self.text_encoder = text_encoder
        # special tokens (bos/eos/pad) are not words a concept could be near
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)

    @property
    def token_table(self) -> Tensor:
        """The real tokens' input embeddings (vocab, D)."""
        return self.text_encoder.get_input_embeddings().weight

    def tokenize(self, prompts: list[str], require_placeholder: bool = True) -> Tensor:
        if require_placeholder:
            missing = [p for p in prompts if PLACEHOLDER not in p]
            if missing:
                raise UserError(f"prompt {missing[0]!r} has no placeholder {PLACEHOLDER}: write the concept as "
                                f"{PLACEHOLDER}, e.g. 'a photo of {PLACEHOLDER} on a beach'")
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        if require_placeholder:
            cut = [p for p, row in zip(prompts, ids) if not (row == self.placeholder_id).any()]
            if cut:
                raise UserError(f"prompt {cut[0]!r} is too long: {PLACEHOLDER} falls beyond the text encoder's "
                                f"{self.tokenizer.model_max_length} tokens; shorten it or move {PLACEHOLDER} earlier")
        return ids

    def encode(self, ids: Tensor, v_star: Tensor | None = None) -> Tensor:
        """Text-encoder context (N, L, D) for ids (N, L); row i's placeholders become v_star[i]."""
        ids = ids.to(self.token_table.device)
        at_placeholder = ids == self.placeholder_id
        embeds = self.text_encoder.get_input_embeddings()(ids.masked_fill(at_placeholder, 0))
        if v_star is not None:
            embeds = torch.where(at_placeholder[..., None], v_star[:, None].to(embeds.dtype), embeds)
        elif at_placeholder.any():
            raise ValueError("ids contain the placeholder but no v_star was given")
        return self._transformer(embeds)

    def nearest_tokens(self, v_star: Tensor, k: int = 1) -> Tensor:
        """Ids of the real token nearest to each v* by cosine similarity (N,), or (N, k) for k > 1."""
        ids = nearest_tokens(v_star, self.token_table, k, self.special_ids)[1]
        return ids[:, 0] if k == 1 else ids

    def hard_ids(self, ids: Tensor, token_ids: Tensor) -> Tensor:
        """The hard prompt: each row's placeholders replaced by that row's real token id."""
        return torch.where(ids == self.placeholder_id, token_ids.to(ids.device)[:, None], ids)

    def _transformer(self, embeds: Tensor) -> Tensor:
        """CLIPTextTransformer.forward from the input embeddings on (it only accepts ids)."""
        from transformers.masking_utils import create_causal_mask

        text = getattr(self.text_encoder, "text_model", self.text_encoder)  # transformers 4 nests it
        hidden = text.embeddings(inputs_embeds=embeds)
        mask = create_causal_mask(config=text.config, inputs_embeds=hidden, attention_mask=None, cache=None)
        hidden = text.encoder(inputs_embeds=hidden, attention_mask=mask, is_causal=True).last_hidden_state
        return text.final_layer_norm(hidden)
