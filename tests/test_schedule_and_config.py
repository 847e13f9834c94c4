"""The KL schedule's shape at its boundaries, and TRACEConfig's validation."""

from __future__ import annotations

import math

import pytest

from trace_trl import TRACEConfig
from trace_trl.schedule import kl_weight, kl_weight_sq_sum


def _w(step, decay, coef=2.0, warmup=10, decay_steps=20):
    return kl_weight(step, coef=coef, warmup_steps=warmup, decay_steps=decay_steps, decay=decay)


@pytest.mark.parametrize("decay", ["linear", "cosine", "exponential"])
def test_decays_hold_during_warmup_then_fall_to_exactly_zero(decay):
    assert [_w(s, decay) for s in (0, 5, 9)] == [2.0, 2.0, 2.0]
    assert _w(10, decay) == pytest.approx(2.0)  # decay starts from coef
    values = [_w(s, decay) for s in range(10, 31)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False)), "must be non-increasing"
    assert 0.0 < _w(29, decay) < 2.0
    assert _w(30, decay) == 0.0 and _w(1000, decay) == 0.0


def test_decay_shapes_at_midpoint():
    assert _w(20, "linear") == pytest.approx(1.0)
    assert _w(20, "cosine") == pytest.approx(1.0)
    k = 5.0
    assert _w(20, "exponential") == pytest.approx(2.0 * (math.exp(-k / 2) - math.exp(-k)) / (1 - math.exp(-k)))
    assert _w(15, "cosine") == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 0.25)))


def test_none_decay_and_edge_cases():
    assert _w(10_000, "none") == 2.0
    assert _w(10, "linear", decay_steps=0) == 0.0 and _w(9, "linear", decay_steps=0) == 2.0
    assert _w(0, "linear", coef=0.0) == 0.0
    assert _w(0, "linear", warmup=0) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="decay"):
        _w(0, "step")
    with pytest.raises(ValueError, match="warmup_steps"):
        kl_weight(0, coef=1.0, warmup_steps=-1, decay_steps=1, decay="linear")


def _config(**kwargs):
    return TRACEConfig(output_dir="unused", use_cpu=True, bf16=False, report_to="none", **kwargs)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("kl_decay", "step"),
        ("key_span_action", "jsd"),
        ("error_span_action", "kl"),
        ("routed_token_grpo", "both"),
        ("teacher_kind", "frozen"),
        ("annotation_failure", "ignore"),
        ("kl_normalization", "token"),
    ],
)
def test_config_rejects_unknown_choices_naming_field_and_allowed_values(field, value):
    with pytest.raises(ValueError, match=rf"`{field}` must be one of .*got '{value}'"):
        _config(**{field: value})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("kl_coef", -0.1),
        ("kl_warmup_steps", -1),
        ("kl_decay_steps", -2),
        ("teacher_ema_rate", 0.0),
        ("teacher_ema_rate", 1.5),
        ("kl_topk", 0),
        ("kl_temperature", 0.0),
        ("max_teacher_prompt_length", 0),
        ("kl_chunk_size", 0),
        ("privileged_context_column", ""),
        ("kl_term_clip", 0.0),
        ("kl_term_clip", -0.05),
        ("max_routed_fraction", 0.0),
        ("max_routed_fraction", 1.5),
        ("teacher_sync_steps", 0),
    ],
)
def test_config_rejects_out_of_range_values(field, value):
    with pytest.raises(ValueError, match=f"`{field}`"):
        _config(**{field: value})


def test_config_checks_the_teacher_template():
    with pytest.raises(ValueError, match="not a valid Jinja2"):
        _config(teacher_context_template="{{ problem ")
    with pytest.raises(ValueError, match="unknown variables"):
        _config(teacher_context_template="{{ problem }} {{ answer }}")
    with pytest.raises(ValueError, match="must contain"):
        _config(teacher_context_template="{{ privileged_context }}")
    assert _config(teacher_context_template="{{ problem }}\n{{ privileged_context }}").kl_coef == 0.5


def test_every_trace_field_has_help_for_the_cli():
    import dataclasses

    from trl import GRPOConfig

    grpo_fields = {f.name for f in dataclasses.fields(GRPOConfig)}
    trace_fields = [f for f in dataclasses.fields(TRACEConfig) if f.name not in grpo_fields]
    assert {f.name for f in trace_fields} >= {
        "kl_coef",
        "kl_warmup_steps",
        "kl_decay_steps",
        "kl_decay",
        "key_span_action",
        "error_span_action",
        "routed_token_grpo",
        "teacher_kind",
        "teacher_ema_rate",
        "privileged_context_column",
        "teacher_context_template",
        "max_teacher_prompt_length",
        "kl_topk",
        "correct_reward_threshold",
        "annotation_failure",
        "kl_normalization",
        "kl_term_clip",
        "max_routed_fraction",
        "teacher_sync_steps",
    }
    for f in trace_fields:
        assert f.metadata.get("help"), f"{f.name} has no help text"


def test_defaults_are_the_papers_trace_fkl():
    """DESIGN.md section 2: the defaults are the paper's TRACE-FKL settings."""
    config = _config()
    assert (config.kl_coef, config.kl_warmup_steps, config.kl_decay_steps, config.kl_decay) == (0.5, 10, 30, "linear")
    assert (config.key_span_action, config.error_span_action) == ("fkl", "grpo")
    assert config.routed_token_grpo == "complementary"
    assert config.kl_normalization == "sequence"
    assert config.kl_term_clip == 0.05
    assert config.max_routed_fraction == 0.25
    assert (config.teacher_kind, config.teacher_sync_steps) == ("synced", 10)
    # The paper's schedule: 0.5 through step 10, 0.25 at step 25, 0 from step 40.
    weights = {s: kl_weight(s, coef=0.5, warmup_steps=10, decay_steps=30, decay="linear") for s in (9, 10, 25, 39, 40)}
    assert weights[9] == weights[10] == 0.5 and weights[25] == pytest.approx(0.25)
    assert 0 < weights[39] < 0.5 and weights[40] == 0.0


def test_squared_weight_sum_follows_the_schedule():
    paper = dict(coef=0.5, warmup_steps=10, decay_steps=30, decay="linear")
    assert kl_weight_sq_sum(0, **paper) == pytest.approx(0.25)
    assert kl_weight_sq_sum(9, **paper) == pytest.approx(2.5)
    # Warm-up 10 x 0.25, then 0.25 * sum_{m=1}^{30} (m/30)^2 = 0.25 * (30 * 31 * 61 / 6) / 900 over the decay.
    total = 2.5 + 0.25 * (30 * 31 * 61 / 6) / 900
    assert kl_weight_sq_sum(39, **paper) == pytest.approx(total)
    assert kl_weight_sq_sum(40, **paper) == kl_weight_sq_sum(10_000, **paper) == pytest.approx(total)
    assert kl_weight_sq_sum(99, coef=0.5, warmup_steps=0, decay_steps=0, decay="none") == pytest.approx(25.0)
    assert kl_weight_sq_sum(5, coef=0.0, warmup_steps=10, decay_steps=0, decay="none") == 0.0
    assert kl_weight_sq_sum(-1, **paper) == 0.0
