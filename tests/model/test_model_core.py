"""The model core (issue 3): real modules, random-initialised at the smoke preset's toy shapes, and
SD 1.5 structure on the meta device. No trained weights needed."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from components.config import load_config
from components.errors import UserError
from components.model.dual_path import ConceptBatch
from components.model.encoder import FrozenBase, TuningEncoder
from components.model.regularisers import (
    contrastive_loss,
    embedding_regulariser,
    offsets_l2,
)


PROMPTS = ["a photo of S* on a beach", "a sketch of S*", "two S* on grass"]


@pytest.fixture(scope="module")
def cfg():
    return load_config("smoke")


@pytest.fixture(scope="module")
def base(cfg, tmp_path_factory):
    import open_clip
    from diffusers import DDPMScheduler

    from components.model.backbone import ClipImageTower
    from components.toy.bootstrap import (
        clip_model_config,
        make_text_encoder,
        make_unet,
        scheduler_config,
    )
    from components.toy.tokenizer import save_toy_tokenizer

    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("base")
    b = cfg.bootstrap
    tokenizer = save_toy_tokenizer(tmp / "tokenizer")
    text_encoder = make_text_encoder(len(tokenizer), b, tokenizer.bos_token_id, tokenizer.eos_token_id,
                                     tokenizer.model_max_length)
    clip_config = tmp / "datencoder-test-backbone.json"
    clip_config.write_text(json.dumps(clip_model_config(width=32, layers=1)))
    open_clip.add_model_config(clip_config)
    clip = ClipImageTower(open_clip.create_model("datencoder-test-backbone").visual)
    return FrozenBase(make_unet(b), text_encoder, tokenizer, DDPMScheduler(**scheduler_config(b)), clip)


@pytest.fixture()
def encoder(cfg, base):
    torch.manual_seed(1)
    return TuningEncoder.for_base(cfg.encoder, base)


def batch(n: int = 3, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, 64, 64, generator=g) * 2 - 1, torch.randn(n, 4, 16, 16, generator=g),
            torch.randn(n, 4, 16, 16, generator=g), torch.randint(0, 1000, (n,), generator=g))


def random_factors(encoder, n: int, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    r = encoder.config.rank
    return {t.name: (torch.randn(n, t.d_in, r, generator=g) / t.d_in ** 0.5,
                     torch.randn(n, r, t.d_out, generator=g) * 0.3)
            for t in encoder.shape.targets}


def vanilla(unet):
    """The same UNet with diffusers' stock processor (the default on torch 2)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    plain = copy.deepcopy(unet)
    plain.set_attn_processor(AttnProcessor2_0())
    return plain


def unet_out(base, noisy, t, context, concept=None):
    kwargs = None if concept is None else {"concept": concept}
    return base.unet(noisy, t, encoder_hidden_states=context, cross_attention_kwargs=kwargs).sample


def test_zero_initialised_b_leaves_unet_bit_identical(encoder, base):
    pixels, latents, noise, t = batch()
    with torch.no_grad():
        noisy, _ = base.noised(latents, noise, t)
        v_star, factors = encoder.predict(pixels, noisy, t)
        context = base.prompts.encode(base.prompts.tokenize(PROMPTS), v_star)
        reference = vanilla(base.unet)(noisy, t, encoder_hidden_states=context).sample
        ours = unet_out(base, noisy, t, context, ConceptBatch(factors, scale=encoder.config.lora_scale))
        # the dual path with identical contexts is exact too
        blended = unet_out(base, noisy, t, context, ConceptBatch(factors, 1.0, 0.5, hard_context=context))
        nudged = {k: (a, b + 1e-2) for k, (a, b) in factors.items()}
        moved = unet_out(base, noisy, t, context, ConceptBatch(nudged, scale=encoder.config.lora_scale))
    assert all(b.abs().max() == 0 and a.abs().max() > 0 for a, b in factors.values())
    assert torch.equal(ours, reference)
    assert torch.equal(blended, reference)
    assert not torch.allclose(moved, reference)


def test_gradients_reach_trunk_and_heads_not_frozen_parts(encoder, base):
    pixels, latents, noise, t = batch()
    losses = encoder(pixels, latents, PROMPTS, noise=noise, timesteps=t)
    assert set(losses) == {"diffusion", "contrastive", "l2_embedding", "l2_offsets", "total"}
    assert all(torch.isfinite(v) for v in losses.values()) and losses["contrastive"] > 0
    losses["total"].backward()
    grads = {name: p.grad for name, p in encoder.named_parameters()}
    # at init B = 0, so (as in LoRA) only B's producing layer and the embedding path get gradient
    for name in ("trunk.merge.weight", "trunk.blocks.0.body.2.weight", "token_embedder.mlp.0.weight",
                 "hypernetwork.to_b.weight"):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    assert grads["hypernetwork.in_bases.16"].abs().sum() == 0
    for module in (base.unet, base.text_encoder, base.clip):
        assert all(not p.requires_grad and p.grad is None for p in module.parameters())
    # once B is non-zero every encoder parameter is trained
    encoder.zero_grad()
    with torch.no_grad():
        encoder.hypernetwork.to_b.weight.normal_(std=0.1)
    encoder(pixels, latents, PROMPTS, noise=noise, timesteps=t)["total"].backward()
    dead = [name for name, p in encoder.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert dead == []


def test_base_weights_unchanged_after_training_step(encoder, base):
    frozen = {name: {k: v.clone() for k, v in m.state_dict().items()}
              for name, m in (("unet", base.unet), ("text", base.text_encoder), ("clip", base.clip))}
    trunk_before = encoder.trunk.merge.weight.clone()
    opt = torch.optim.AdamW(encoder.parameters(), lr=1e-2)
    pixels, latents, _, _ = batch()
    for _ in range(2):
        opt.zero_grad()
        encoder(pixels, latents, PROMPTS)["total"].backward()
        opt.step()
    assert not torch.equal(encoder.trunk.merge.weight, trunk_before)
    for name, m in (("unet", base.unet), ("text", base.text_encoder), ("clip", base.clip)):
        assert all(torch.equal(v, frozen[name][k]) for k, v in m.state_dict().items()), name


def test_alpha_blend_limits(encoder, base):
    pixels, latents, noise, t = batch(n=1)
    factors = random_factors(encoder, 1)
    s = encoder.config.lora_scale
    ids = base.prompts.tokenize(PROMPTS[:1])
    v_star = torch.randn(1, encoder.shape.token_dim) * 0.5
    with torch.no_grad():
        noisy, _ = base.noised(latents, noise, t)
        soft = base.prompts.encode(ids, v_star)
        hard = base.prompts.encode(base.prompts.hard_ids(ids, base.prompts.nearest_tokens(v_star)))
        assert not torch.allclose(soft, hard)
        plain = vanilla(base.unet)
        hard_vanilla = plain(noisy, t, encoder_hidden_states=hard).sample
        merged = copy.deepcopy(plain)  # plain LoRA: W + s A B written into a copy's weights
        modules = dict(merged.named_modules())
        for name, (a, b) in factors.items():
            modules[name].weight += s * (a[0] @ b[0]).T
        lora_soft = merged(noisy, t, encoder_hidden_states=soft).sample

        def at(alpha):
            return unet_out(base, noisy, t, soft, ConceptBatch(factors, s, alpha, hard_context=hard))
        one, zero, half = at(1.0), at(0.0), at(0.5)
        via_condition = base.denoise(noisy, t, ids, v_star, factors, s, 0.0)
    assert torch.allclose(one, lora_soft, atol=1e-5)
    assert torch.equal(zero, hard_vanilla)
    assert torch.equal(via_condition, hard_vanilla)
    assert not torch.allclose(half, one, atol=1e-4) and not torch.allclose(half, zero, atol=1e-4)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_per_sample_lora_batch_equals_each_sample_alone(encoder, base, alpha):
    n = 3
    _, latents, noise, t = batch(n)
    factors = random_factors(encoder, n)
    ids = base.prompts.tokenize(PROMPTS)
    v_star = torch.randn(n, encoder.shape.token_dim) * 0.5
    uncond = base.empty_context(n)
    with torch.no_grad():
        noisy, _ = base.noised(latents, noise, t)
        soft = base.prompts.encode(ids, v_star)
        hard = base.prompts.encode(base.prompts.hard_ids(ids, base.prompts.nearest_tokens(v_star)))
        concept = ConceptBatch(factors, 1.0, alpha, hard_context=hard)
        together = unet_out(base, noisy, t, soft, concept)
        # classifier-free guidance layout: cat([uncond, cond]), row j uses concept j % n
        cfg_out = unet_out(base, noisy.repeat(2, 1, 1, 1), t.repeat(2), torch.cat([uncond, soft]),
                           concept.with_guidance(uncond))
        for i in range(n):
            one = {k: (a[i:i + 1], b[i:i + 1]) for k, (a, b) in factors.items()}
            alone_concept = ConceptBatch(one, 1.0, alpha, hard_context=hard[i:i + 1])
            alone = unet_out(base, noisy[i:i + 1], t[i:i + 1], soft[i:i + 1], alone_concept)
            assert torch.allclose(together[i], alone[0], atol=1e-5)
            assert torch.allclose(cfg_out[n + i], alone[0], atol=1e-5)
            assert not torch.allclose(cfg_out[i], alone[0], atol=1e-4)
        # and the concepts really differ: swapping factors between samples changes the output
        rolled = {k: (a.roll(1, 0), b.roll(1, 0)) for k, (a, b) in factors.items()}
        assert not torch.allclose(unet_out(base, noisy, t, soft, ConceptBatch(rolled, 1.0, alpha, hard)), together,
                                  atol=1e-4)
    with pytest.raises(ValueError, match="multiple"):
        unet_out(base, noisy[:2], t[:2], soft[:2], ConceptBatch(factors))


def test_lora_delta_one_concept_shortcut_matches_the_batched_form():
    from components.model.lora import lora_delta

    g = torch.Generator().manual_seed(0)
    x, a, b = torch.randn(4, 5, 8, generator=g), torch.randn(1, 8, 3, generator=g), torch.randn(1, 3, 6, generator=g)
    # the same concept on each row takes the batched (einsum) path; one concept for k = 4 rows (tuning's views,
    # CFG's two halves: Concept.repeat keeps N = 1) the shortcut
    batched = lora_delta(x, a.expand(4, -1, -1), b.expand(4, -1, -1), 0.5)
    assert torch.allclose(lora_delta(x, a, b, 0.5), batched, atol=1e-6)
    assert torch.allclose(batched[3], 0.5 * x[3] @ a[0] @ b[0], atol=1e-6)


def test_contrastive_loss_pulls_to_neighbours_and_pushes_apart():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(50, 16, generator=g)
    others = torch.randn(3, 16, generator=g)
    v = torch.randn(16, generator=g)
    def loss(rows):
        return contrastive_loss(torch.stack(rows), table, k=4, tau=0.1).item()
    neighbours = table[(torch.nn.functional.normalize(table, dim=-1) @ v).topk(4).indices].mean(0)
    path = [loss([torch.lerp(v, neighbours, w), *others]) for w in (0.0, 0.5, 1.0)]
    assert path[0] > path[1] > path[2] and path[2] < 0.7 * path[0]
    apart = loss([others[0], others[1]])
    together = loss([others[0], others[0] + 1e-3 * others[1]])
    assert together > apart + 0.5


def test_regulariser_variants():
    table = torch.randn(20, 8)
    v = table[:2].clone()
    none = embedding_regulariser("none", v, table, 4, 0.1)
    l2 = embedding_regulariser("l2", v, table, 4, 0.1)
    nn_cos = embedding_regulariser("nn-cosine", v, table, 4, 0.1)
    assert none["contrastive"] == 0 and none["l2_embedding"] == 0
    assert l2["contrastive"] == 0 and torch.isclose(l2["l2_embedding"], v.pow(2).sum(-1).mean())
    assert abs(nn_cos["contrastive"].item()) < 1e-6  # v* sits on a token
    a, b = torch.randn(2, 6, 4), torch.randn(2, 4, 5)
    exact = torch.stack([(0.5 * a[i] @ b[i]).pow(2).sum() for i in range(2)]).mean()
    assert torch.isclose(offsets_l2({"m": (a, b)}, 0.5), exact)


def test_sd15_target_discovery_and_hypernetwork_size():
    from components.training.targets import targets_report

    report = targets_report(load_config("sd15"))
    assert report["count"] == 96
    assert report["mean_params"] == pytest.approx(715946.67, abs=0.01)
    assert report["total_params"] == 68_730_880
    # the factorised head: a fixed size, hundreds of times below a head with outputs for every factor entry
    assert report["hypernetwork_params"] == 1_174_016
    assert report["direct_head_params"] > 200 * report["hypernetwork_params"]


def test_cli_targets_json(capsys):
    from components.cli import main

    assert main(["targets", "--base", "sd15", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["count"], out["mean_params"], out["rank"]) == (96, 715946.67, 4)


def test_placeholder_handling(base):
    prompts = base.prompts
    with pytest.raises(UserError, match=r"no placeholder S\*"):
        prompts.tokenize(["a red star on a beach"])
    ids = prompts.tokenize(["a photo of S* on a beach"])
    assert int((ids == prompts.placeholder_id).sum()) == 1
    plain = prompts.tokenize(["a photo of a star on a beach"], require_placeholder=False)
    assert torch.equal(prompts.encode(plain), base.text_encoder(plain)[0])  # same path as the text encoder
    v = torch.randn(1, base.text_encoder.config.hidden_size)
    hard_ids = prompts.hard_ids(ids, prompts.nearest_tokens(v))
    assert (hard_ids != ids).sum() == 1 and int(hard_ids[ids == prompts.placeholder_id]) in prompts.word_ids
    assert not torch.allclose(prompts.encode(ids, v), prompts.encode(ids, v + 1))


def test_nearest_words_come_from_the_trained_vocabulary_only(base):
    """The regulariser's positives and the dual path's hard word are real words of the base (BaseConfig.vocabulary):
    on the toy base most rows are byte and BPE pieces at their random initialisation."""
    from components.model.placeholder import PromptEncoder
    from components.model.regularisers import contrastive_loss

    tokenizer, text_encoder = base.prompts.tokenizer, base.text_encoder
    words = PromptEncoder(tokenizer, text_encoder, ["red", "star", "beach"])
    table = text_encoder.get_input_embeddings().weight
    ids = [tokenizer.convert_tokens_to_ids(f"{w}</w>") for w in ("red", "star", "beach")]
    assert words.word_ids.tolist() == ids
    v = torch.randn(64, table.shape[1])
    assert set(words.nearest_tokens(v).tolist()) <= set(ids)
    assert words.nearest_tokens(table[ids]).tolist() == ids  # each word is its own nearest
    everything = PromptEncoder(tokenizer, text_encoder, None)
    assert len(everything.word_ids) == table.shape[0] - len(set(tokenizer.all_special_ids))
    # the contrastive positives move v* toward the vocabulary's rows, not toward rows outside it (the negatives are
    # the batch's other embeddings: a batch of two)
    v = table[[tokenizer.convert_tokens_to_ids("q</w>"), tokenizer.convert_tokens_to_ids("z</w>")]].clone()
    v.requires_grad_()
    contrastive_loss(v, words.word_table, k=2, tau=0.07).backward()
    step = -v.grad[0]
    assert max(torch.cosine_similarity(step, table[i] - v[0].detach(), dim=0) for i in ids) > 0
    with pytest.raises(UserError, match="not one token"):
        PromptEncoder(tokenizer, text_encoder, ["red", "quixotic"])


def test_save_and_load_roundtrip(encoder, base, tmp_path):
    pixels, latents, noise, t = batch()
    with torch.no_grad():
        encoder.hypernetwork.to_b.weight.normal_()  # make B non-zero so the check covers it
        noisy, _ = base.noised(latents, noise, t)
        before = encoder.predict(pixels, noisy, t)
        encoder.save_pretrained(tmp_path / "enc")
        loaded = TuningEncoder.from_pretrained(tmp_path / "enc", base)
        after = loaded.predict(pixels, noisy, t)
    assert (tmp_path / "enc" / "model.safetensors").is_file()
    assert torch.equal(before.v_star, after.v_star)
    assert all(torch.equal(before.factors[k][1], after.factors[k][1]) for k in before.factors)
    assert loaded.config == encoder.config and loaded.shape == encoder.shape


def test_token_embedder_starts_in_distribution(encoder, base):
    pixels, latents, noise, t = batch()
    with torch.no_grad():
        noisy, _ = base.noised(latents, noise, t)
        v_star = encoder.predict(pixels, noisy, t).v_star
    table = base.prompts.token_table
    origin = table[base.prompts.tokenizer("object", add_special_tokens=False).input_ids].mean(0)
    spread = (v_star - origin).norm(dim=-1)
    mean_norm = table.norm(dim=-1).mean()
    assert (spread > 0.02 * mean_norm).all() and (spread < 0.5 * mean_norm).all()
    assert (base.prompts.nearest_tokens(v_star) == base.prompts.nearest_tokens(origin[None])).all()


@pytest.mark.parametrize("overrides", [{"use_hypernetwork": False}, {"dual_path": False, "regulariser": "nn-cosine"},
                                       {"regulariser": "none"}, {"alpha_blend_train": 1.0}])
def test_ablation_configs_train(cfg, base, overrides):
    encoder = TuningEncoder.for_base(cfg.encoder.model_copy(update=overrides), base)
    pixels, latents, noise, t = batch()
    losses = encoder(pixels, latents, PROMPTS, noise=noise, timesteps=t)
    losses["total"].backward()
    assert torch.isfinite(losses["total"]) and encoder.trunk.merge.weight.grad.abs().sum() > 0
    if not encoder.config.use_hypernetwork:
        assert encoder.hypernetwork is None and losses["l2_offsets"] == 0
    if encoder.config.regulariser == "none":
        assert losses["contrastive"] == 0 and losses["l2_embedding"] == 0


@pytest.mark.skipif(not Path("models/toy-base/model_index.json").is_file(), reason="toy base not bootstrapped yet")
def test_trained_toy_base_loads_and_trains():
    cfg = load_config("toy")
    base = FrozenBase.load(cfg.base, cfg.runtime)
    assert base.noise_scheduler.config.prediction_type == "v_prediction"
    encoder = TuningEncoder.for_base(cfg.encoder, base)
    pixels, latents, noise, t = batch(2)
    losses = encoder(pixels, latents, PROMPTS[:2], noise=noise, timesteps=t)
    losses["total"].backward()
    assert torch.isfinite(losses["total"]) and encoder.trunk.merge.weight.grad.abs().sum() > 0
