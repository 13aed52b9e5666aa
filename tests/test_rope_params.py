"""kvcompact.rope: which RoPE a cached key can be re-rotated under, and with what parameters.

Every supported case is checked against transformers' own rotary embedding on a tiny random
model: a key rotated at position p, then moved by ``ops.rope_shift_`` by delta, must equal the
model's rotation of the same key at ``p + delta``. Refused cases must name the RoPE type and why.
"""

from __future__ import annotations

import sys

import pytest
import torch

import kvcompact.policies as P
from kvcompact import ops
from kvcompact.rope import RotaryParams, rope_layout, rope_params, rope_types

transformers = pytest.importorskip("transformers")

COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)

SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
}


def tiny(cls_name: str, cfg_name: str, **extra):
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_name)(**COMMON, **extra)
    return getattr(transformers, cls_name)(cfg).eval()


def llama(rope_scaling=None):
    return tiny("LlamaForCausalLM", "LlamaConfig", rope_scaling=rope_scaling)


def model_rope(model, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``x [1, H, T, D]`` rotated by the model's own rotary embedding and apply_rotary_pos_emb."""
    rotary = model.model.rotary_emb
    cos, sin = rotary(x, positions.unsqueeze(0))
    apply = sys.modules[type(model.model).__module__].apply_rotary_pos_emb
    return apply(x, x, cos, sin)[0]


def check_shift_matches_model(model, params: RotaryParams, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    t = 24
    k = torch.randn(1, 2, t, head_dim, generator=g)
    # Positions past original_max_position_embeddings (64) so llama3 / yarn's scaled bands matter.
    pos = torch.arange(t) * 7 + 3
    delta = torch.randint(-3, 150, (t,), generator=g)
    with torch.no_grad():
        cached = model_rope(model, k, pos)
        want = model_rope(model, k, pos + delta)
    got = cached.clone()
    ops.rope_shift_(got, delta, params.inv_freq, params.style)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # The check has teeth: not moving the keys is far off.
    assert (cached - want).abs().max() > 1e-2


@pytest.mark.parametrize("kind", list(SCALINGS))
def test_static_rope_types_are_accepted_and_shift_like_the_model(kind):
    model = llama(SCALINGS[kind])
    params = rope_params(model)
    assert isinstance(params, RotaryParams)
    assert params.style == "neox" and params.rope_type == kind
    inv = params.inv_freq
    assert inv.dtype == torch.float32 and not inv.requires_grad and inv.shape == (8,)
    assert torch.equal(inv, model.model.rotary_emb.inv_freq.float())
    check_shift_matches_model(model, params)


def test_yarn_attention_factor_scales_cos_and_sin_yet_a_shift_composes():
    """yarn multiplies cos and sin by its attention factor: the rotated key is scaled once, and a
    pure rotation by delta keeps that scale, so shifting equals rotating at p + delta."""
    model = llama(SCALINGS["yarn"])
    factor = model.model.rotary_emb.attention_scaling
    assert factor > 1.05  # otherwise the test below would not exercise the claim
    x = torch.zeros(1, 1, 1, 16)
    cos, _ = model.model.rotary_emb(x, torch.zeros(1, 1, dtype=torch.long))
    torch.testing.assert_close(cos, torch.full_like(cos, factor))  # cos(0) = 1, scaled
    check_shift_matches_model(model, rope_params(model), seed=3)


@pytest.mark.parametrize(
    "scaling,kind,why",
    [
        ({"rope_type": "dynamic", "factor": 2.0}, "dynamic", "sequence length"),
        ({"type": "dynamic", "factor": 2.0}, "dynamic", "sequence length"),
        (
            {
                "rope_type": "longrope",
                "factor": 2.0,
                "short_factor": [1.0] * 8,
                "long_factor": [2.0] * 8,
                "original_max_position_embeddings": 64,
            },
            "longrope",
            "short and long",
        ),
    ],
)
def test_length_dependent_rope_types_are_refused(scaling, kind, why):
    model = llama(scaling)
    assert rope_types(model) == [kind]
    with pytest.raises(ValueError, match=rf"rope_type '{kind}'.*{why}"):
        rope_params(model)


def test_mrope_is_refused_by_rope_params_and_attach():
    cfg = transformers.Qwen2VLConfig(text_config=dict(COMMON, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}))
    assert rope_types(cfg) == ["mrope"]
    # The same section spec on a plain decoder's config: rope_params and attach both refuse it.
    model = llama()
    attr = "rope_parameters" if isinstance(getattr(model.config, "rope_parameters", None), dict) else "rope_scaling"
    setattr(model.config, attr, {**(getattr(model.config, attr) or {}), "mrope_section": [2, 3, 3]})
    with pytest.raises(ValueError, match="'mrope'.*mrope_section"):
        rope_params(model)
    with pytest.raises(ValueError, match="mrope_section"):
        with P.attach(model, transformers.DynamicCache(), "snapkv"):
            pass


def test_unknown_rope_type_is_refused():
    model = llama()
    attr = "rope_parameters" if isinstance(getattr(model.config, "rope_parameters", None), dict) else "rope_scaling"
    setattr(model.config, attr, {**(getattr(model.config, attr) or {}), "rope_type": "spiral"})
    with pytest.raises(ValueError, match="'spiral'.*p \\* inv_freq"):
        rope_params(model)


def test_several_distinct_inv_freq_are_refused():
    model = tiny(
        "Gemma3ForCausalLM",
        "Gemma3TextConfig",
        head_dim=16,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=8,
    )
    with pytest.raises(ValueError, match="2 rotary embeddings with different inv_freq"):
        rope_params(model)


@pytest.mark.parametrize(
    "cls,cfg,layout",
    [
        ("LlamaForCausalLM", "LlamaConfig", "neox"),
        ("Qwen2ForCausalLM", "Qwen2Config", "neox"),
        ("CohereForCausalLM", "CohereConfig", "gptj"),
        ("HeliumForCausalLM", "HeliumConfig", "gptj"),  # interleaved, and in no model_type table
    ],
)
def test_layout_is_read_from_the_model_and_shift_matches_it(cls, cfg, layout):
    model = tiny(cls, cfg, **({"head_dim": 16} if cfg == "HeliumConfig" else {}))
    assert rope_layout(model) == layout
    params = rope_params(model)
    assert params.style == layout
    check_shift_matches_model(model, params, seed=1)


def test_gptj_without_rotate_half_is_interleaved():
    cfg = transformers.GPTJConfig(vocab_size=128, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=64)
    assert rope_layout(transformers.GPTJForCausalLM(cfg)) == "gptj"


def test_style_override_and_bad_style():
    model = llama()
    assert rope_params(model, style="gptj").style == "gptj"
    with pytest.raises(ValueError, match="style"):
        rope_params(model, style="halves")


def test_attach_refuses_interleaved_layout_for_query_aware_policies():
    model = tiny("CohereForCausalLM", "CohereConfig")
    with pytest.raises(ValueError, match="interleaved"):
        with P.attach(model, transformers.DynamicCache(), "snapkv"):
            pass
    with P.attach(model, transformers.DynamicCache(), "knorm") as observed:  # cache-only: nothing to recompute
        assert observed == {}
