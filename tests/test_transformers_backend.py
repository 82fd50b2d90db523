"""``experts_implementation="hexamoe"`` against transformers' own ``"eager"`` on tiny real models.

Models are built from configs, saved with ``save_pretrained`` and loaded back from disk (never a hub
download). Logits and all parameter gradients must agree to ``hf_tiny.REL_TOL`` (fp32, relative).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import hf_tiny  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))
from gen_supported_models import END, START, parse_table  # noqa: E402


def _causal(model_type: str) -> type:
    return hf_tiny.candidate_classes(model_type)[0]


def test_discovery_finds_the_core_models():
    found = hf_tiny.discover()
    assert set(hf_tiny.ALWAYS) <= set(found)
    assert len(found) >= 10
    for m in hf_tiny.ALWAYS:
        assert _causal(m).__name__.endswith("ForCausalLM")


@pytest.mark.parametrize("model_type", hf_tiny.ALWAYS)
def test_core_model_matches_eager(model_type, tmp_path):
    res = hf_tiny.check_model(model_type, workdir=str(tmp_path))
    assert res.status == "pass", res
    assert res.cls_name.endswith("ForCausalLM")
    # the core models must meet the fp32 bound directly, with skewed routing included
    assert res.fp64_diff is None, res
    for v in (res.logit_diff, res.grad_diff, res.skewed_logit_diff, res.skewed_grad_diff):
        assert v is not None and v <= hf_tiny.REL_TOL, res


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_skewed_routing_leaves_experts_empty(model_type, tmp_path):
    """The skew used above really sends every token to the same k experts and leaves the others empty."""
    cls = _causal(model_type)
    hf_tiny.build_tiny(cls, str(tmp_path))
    _, _, natural = hf_tiny.compare(cls, str(tmp_path))
    logit, grad, counts = hf_tiny.compare(cls, str(tmp_path), skewed=True)
    n_pairs = 2 * 8 * hf_tiny.TOP_K
    assert natural and all(sum(c) == n_pairs for c in natural)
    assert counts and all(sorted(c) == [0, 0, 16, 16] for c in counts), counts
    assert logit <= hf_tiny.REL_TOL and grad <= hf_tiny.REL_TOL


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe", "olmoe"])
def test_all_tokens_to_one_expert(model_type, tmp_path):
    """Top-1 routing with a zeroed router: one expert gets every token, three get none."""
    cls = _causal(model_type)
    hf_tiny.build_tiny(cls, str(tmp_path), num_experts_per_tok=1)
    logit, grad, counts = hf_tiny.compare(cls, str(tmp_path), skewed=True)
    assert counts and all(sorted(c) == [0, 0, 0, 16] for c in counts), counts
    assert logit <= hf_tiny.REL_TOL and grad <= hf_tiny.REL_TOL, (logit, grad)


def test_comparison_detects_a_wrong_expert(tmp_path):
    """The check is not vacuous: a 1e-3 change in one used expert's weights is flagged."""
    cls = _causal("mixtral")
    hf_tiny.build_tiny(cls, str(tmp_path))
    ref, ours = hf_tiny.load(cls, str(tmp_path), "eager"), hf_tiny.load(cls, str(tmp_path), "hexamoe")
    ids = hf_tiny.input_ids(ours)
    assert max(hf_tiny.compare_models(ref, ours, ids)) <= hf_tiny.REL_TOL
    with torch.no_grad():
        ours.model.layers[1].mlp.experts.down_proj[0].mul_(1 + 1e-3)
    assert max(hf_tiny.compare_models(ref, ours, ids)) > hf_tiny.REL_TOL


def test_hexamoe_backend_is_what_ran(tmp_path):
    """Guard against a silent fallback: the hexamoe graph holds our autograd functions, eager's does not."""
    cls = _causal("olmoe")
    hf_tiny.build_tiny(cls, str(tmp_path))
    ids = None
    for impl, expect in (("hexamoe", True), ("eager", False)):
        model = hf_tiny.load(cls, str(tmp_path), impl)
        ids = hf_tiny.input_ids(model) if ids is None else ids
        _, ops, _, _ = hf_tiny.forward_backward(model, ids, None)
        assert any("hexamoe_expert_mlp" in n for n in ops) is expect, sorted(ops)


# ---------------------------------------------------------------- supported-models tables
def _read(path: str) -> str | None:
    return open(path, encoding="utf-8").read() if os.path.exists(path) else None


def _passing(table: dict[str, str]) -> set[str]:
    return {m for m, s in table.items() if s == "pass"}


DOC = os.path.join(REPO, "docs", "supported_models.md")
README = os.path.join(REPO, "README.md")


def test_readme_table_matches_generated_doc():
    doc, readme = _read(DOC), _read(README)
    assert doc is not None and START in doc, "run scripts/gen_supported_models.py"
    if readme is None or START not in readme or END not in readme:
        pytest.skip(f"README.md has no {START} ... {END} block yet: copy it from docs/supported_models.md")
    assert _passing(parse_table(readme)) == _passing(parse_table(doc)), (
        "README.md's supported-models block is out of date: copy it from docs/supported_models.md")


def test_generated_doc_covers_every_discovered_model():
    doc = _read(DOC)
    assert doc is not None, "run scripts/gen_supported_models.py"
    table = parse_table(doc)
    assert set(table) == set(hf_tiny.discover()), "regenerate docs/supported_models.md for this transformers"
    assert "fail" not in table.values()
    assert set(hf_tiny.ALWAYS) <= _passing(table)


@pytest.mark.slow
@pytest.mark.skipif(bool(os.environ.get("HEXAMOE_SKIP_SWEEP")), reason="HEXAMOE_SKIP_SWEEP is set (the sweep takes ~15 s on an idle 2-core machine, minutes under load)")
def test_full_sweep_matches_tables(tmp_path):
    """Re-run the sweep: nothing fails, and the doc (and README, once it has the block) list exactly the passing models."""
    results = [hf_tiny.check_model(m, workdir=str(tmp_path)) for m in hf_tiny.discover()]
    failed = [r for r in results if r.status == "fail"]
    assert not failed, failed
    passing = {r.model_type for r in results if r.status == "pass"}
    assert _passing(parse_table(_read(DOC) or "")) == passing, "regenerate docs/supported_models.md"
    readme = _read(README)
    if readme is None or START not in readme:
        pytest.skip(f"README.md has no {START} block yet; doc table verified")
    assert _passing(parse_table(readme)) == passing
