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
from tokenizers import AddedToken
from torch import Tensor

from components.errors import UserError
from components.model.token_embedder import nearest_tokens


PLACEHOLDER = "S*"


class PromptEncoder:
    """`vocabulary`: the real words a concept may be near (BaseConfig.vocabulary); None: every token but the
    special ones (bos/eos/pad)."""

    def __init__(self, tokenizer, text_encoder, vocabulary: list[str] | None = None):
        self.tokenizer = copy.deepcopy(tokenizer)
        self.tokenizer.add_tokens([AddedToken(PLACEHOLDER, normalized=False, single_word=False)])
        self.placeholder_id = self.tokenizer.convert_tokens_to_ids(PLACEHOLDER)
        self.text_encoder = text_encoder
        self.word_ids = self._word_ids(tokenizer, vocabulary)

    @staticmethod
    def _word_ids(tokenizer, vocabulary: list[str] | None) -> Tensor:
        size = text_rows = tokenizer.vocab_size
        if vocabulary is None:
            keep = torch.ones(size, dtype=torch.bool)
            keep[sorted(set(tokenizer.all_special_ids))] = False
            return keep.nonzero()[:, 0]
        ids = []
        for word in dict.fromkeys(vocabulary):
            pieces = tokenizer(word, add_special_tokens=False).input_ids
            if len(pieces) != 1 or pieces[0] >= text_rows:
                raise UserError(f"base.vocabulary: {word!r} is not one token of the base's tokenizer "
                                f"({len(pieces)} tokens); list single words the text encoder was trained on")
            ids.append(pieces[0])
        if not ids:
            raise UserError("base.vocabulary is empty: "
                            "list the words the text encoder was trained on, or null for all")
        return torch.tensor(ids, dtype=torch.long)

    @property
    def token_table(self) -> Tensor:
        """The real tokens' input embeddings (vocab, D)."""
        return self.text_encoder.get_input_embeddings().weight

    @property
    def word_table(self) -> Tensor:
        """The vocabulary's rows of token_table (len(word_ids), D), in word_ids order."""
        return self.token_table[self.word_ids.to(self.token_table.device)]

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
        """Ids of the vocabulary's word nearest to each v* by cosine similarity (N,), or (N, k) for k > 1."""
        ids = self.word_ids.to(v_star.device)[nearest_tokens(v_star, self.word_table, k)[1]]
        return ids[:, 0] if k == 1 else ids

    def hard_ids(self, ids: Tensor, token_ids: Tensor) -> Tensor:
        """The hard prompt: each row's placeholders replaced by that row's real token id."""
        return torch.where(ids == self.placeholder_id, token_ids.to(ids.device)[:, None], ids)

    def _transformer(self, embeds: Tensor) -> Tensor:
        """CLIPTextTransformer.forward from the input embeddings on (it only accepts ids)."""
        # transformers' modelling code: only when prompts are encoded (start-up time)
        from transformers.masking_utils import create_causal_mask

        text = getattr(self.text_encoder, "text_model", self.text_encoder)  # transformers 4 nests it
        hidden = text.embeddings(inputs_embeds=embeds)
        mask = create_causal_mask(config=text.config, inputs_embeds=hidden, attention_mask=None, cache=None)
        hidden = text.encoder(inputs_embeds=hidden, attention_mask=mask, is_causal=True).last_hidden_state
        return text.final_layer_norm(hidden)
