"""L2P (BASELINES.md section 10): top-N selection by cosine, gradient only on the selected prompts and keys,
the pull term against a hand computation, a frozen backbone, end to end with resume, encoder refusal."""

import pytest
import torch
from safetensors.torch import load_file

from rkif import runner
from rkif.backbones import BackboneConfig
from rkif.config import RunConfig
from rkif.data import Example
from rkif.methods.l2p import PromptPool, pull_term
from rkif.training import train_stage
from tests.conftest import cut_and_resume
from tests.test_backbones import EXAMPLES, tiny_llama, tiny_t5
from tests.test_input_hook import build

POOL = {"pool_size": 6, "prompt_length": 2, "top_n": 2}


def _query(backbone, examples) -> torch.Tensor:
    """By hand: the mean embedding of each example's prompt tokens [B, d]."""
    embed = backbone.model.get_base_model().get_input_embeddings()
    rows = []
    for ex in examples:
        if backbone.family == "causal":
            ids = torch.tensor(backbone.prompt_ids(ex))
        else:
            ids = backbone.tokenize([ex.prompt], backbone.config.max_length)["input_ids"][0]
        rows.append(embed(ids).mean(0))
    return torch.stack(rows).detach()


def _cos(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """[B, d], [P, d] -> [B, P], written out."""
    return (q @ k.T) / (q.norm(dim=-1)[:, None] * k.norm(dim=-1)[None, :])


def test_pool_selects_the_top_n_keys_by_cosine_and_prepends_their_prompts():
    torch.manual_seed(0)                                        # the draws do not depend on the tests run before
    prompts, keys = torch.randn(5, 3, 4), torch.randn(5, 4)
    pool = PromptPool(prompts, keys)
    query = torch.randn(7, 4)
    prefix, idx, sim = pool(query, top_n=2)
    cos = _cos(query, keys)
    expected = cos.argsort(dim=1, descending=True)[:, :2]
    assert torch.equal(idx, expected)
    assert torch.allclose(sim, cos.gather(1, expected), atol=1e-6)     # a cosine near 0: relative error is large
    assert prefix.shape == (7, 2 * 3, 4)
    assert torch.equal(prefix[3], torch.cat([prompts[expected[3, 0]], prompts[expected[3, 1]]]))
    big = PromptPool(prompts, keys * 10)                        # cosine: the keys' norms do not matter
    assert torch.equal(big(query, 2)[1], idx)


@pytest.mark.parametrize("family", [tiny_llama, tiny_t5])
def test_the_backbone_selects_by_the_prompt_query_and_trains_only_the_pool(family):
    backbone, method = build("l2p", family, **POOL)
    assert sorted(backbone.trainable_parameters()) == ["prompt_pool.keys", "prompt_pool.prompts"]
    batch = backbone.collate(EXAMPLES[:3])
    out = backbone(**batch)
    cos = _cos(_query(backbone, EXAMPLES[:3]), method.pool.keys.detach())
    assert torch.equal(method.selected, cos.argsort(dim=1, descending=True)[:, :2])
    terms = method.extra_loss(backbone, batch)
    (out["loss"] + terms["l2p_pull"]).backward()
    chosen = set(method.selected.flatten().tolist())
    assert chosen != set(range(6))                                  # some prompts were not selected
    for name in ("prompts", "keys"):
        grad = getattr(method.pool, name).grad
        rows_with_grad = {i for i in range(6) if grad[i].abs().sum() > 0}
        assert rows_with_grad == chosen, name
    assert all(p.grad is None for n, p in backbone.named_parameters() if not n.startswith("prompt_pool."))


def test_pull_term_matches_a_hand_computation_and_falls_as_a_key_moves_to_its_queries():
    backbone, method = build("l2p", tiny_llama, **POOL, pull_weight=0.5)
    batch = backbone.collate(EXAMPLES[:4])
    backbone(**batch)
    term = method.extra_loss(backbone, batch)["l2p_pull"]
    query = _query(backbone, EXAMPLES[:4])
    keys = method.pool.keys.detach()
    cos = _cos(query, keys)
    chosen = method.selected
    by_hand = sum(cos[b, chosen[b, n]].item() for b in range(4) for n in range(2)) / 4
    assert term.item() == pytest.approx(-0.5 * by_hand, rel=1e-5)
    assert pull_term(cos.gather(1, chosen)).item() == pytest.approx(by_hand, rel=1e-5)
    assert method.extra_loss(backbone, batch) == {}                 # consumed once per forward

    k = chosen[0, 0].item()
    users = (chosen == k).any(1)                                     # the queries that selected key k
    with torch.no_grad():
        target = torch.nn.functional.normalize(query[users], dim=-1).mean(0) * keys[k].norm()
        method.pool.keys[k].lerp_(target, 0.5)
    closer = _cos(query[users], method.pool.keys.detach()[k:k + 1])
    assert closer.mean() > cos[users, k].mean()                      # key k is closer to its queries
    backbone(**batch)
    assert method.extra_loss(backbone, batch)["l2p_pull"].item() < term.item()


def test_a_stage_changes_only_the_pool_and_no_task_id_is_read(tmp_path):
    backbone, method = build("l2p", tiny_llama, **POOL)
    frozen = {n: p.detach().clone() for n, p in backbone.named_parameters() if not n.startswith("prompt_pool.")}
    pool = {n: p.detach().clone() for n, p in backbone.named_parameters() if n.startswith("prompt_pool.")}
    run = RunConfig(batch_size=4, epochs=1, lr=0.03, lr_scheduler="constant")
    train_stage(backbone, EXAMPLES, method, run, 0, str(tmp_path))
    assert all(torch.equal(frozen[n], p) for n, p in backbone.named_parameters() if n in frozen)
    assert any(not torch.equal(pool[n], p) for n, p in backbone.named_parameters() if n in pool)
    renamed = [Example("another-task", ex.input, ex.output, ex.instruction) for ex in EXAMPLES]
    assert backbone.predict(EXAMPLES) == backbone.predict(renamed)
    first = method.selected.clone()
    backbone.predict(renamed)
    assert torch.equal(method.selected, first)


def _config(model_dir, data, out, **kw) -> RunConfig:
    return RunConfig(method="l2p", method_options=dict(POOL),
                     backbone=BackboneConfig(model=str(model_dir), family="causal", max_length=48),
                     data=str(data), tasks=["alpha", "beta"], train_size=None, test_size=None, epochs=1.0,
                     batch_size=4, lr=0.03, lr_scheduler="constant", output=str(out), **kw)


def test_two_tasks_end_to_end_and_resume_gives_the_same_run(tiny_llama_dir, tiny_data, tmp_path, monkeypatch):
    full = runner.run_experiment(_config(tiny_llama_dir, tiny_data, tmp_path / "full"))
    assert full["complete"] and all(a is not None for row in full["accuracy"] for a in row)
    selections = full["diagnostics"]["selections"]
    assert [s["stage"] for s in selections] == [0, 1]
    assert all(sum(s["selected"]) == 16 * 2 for s in selections)        # top-2 for each of 16 examples, one epoch
    saved = load_file(tmp_path / "full" / "checkpoints" / "stage_1" / "adapter.safetensors")
    assert sorted(saved) == ["prompt_pool.keys", "prompt_pool.prompts"]

    _, resumed = cut_and_resume(monkeypatch, lambda **kw: _config(tiny_llama_dir, tiny_data, tmp_path / "cut", **kw), 1)
    assert resumed["accuracy"] == full["accuracy"]
    assert resumed["diagnostics"] == full["diagnostics"]
    again = load_file(tmp_path / "cut" / "checkpoints" / "stage_1" / "adapter.safetensors")
    assert all(torch.equal(again[n], saved[n]) for n in saved)


def test_refuses_the_encoder_family_before_loading_a_model():
    run = RunConfig(method="l2p", backbone=BackboneConfig(model="minilm", family="encoder"), tasks=["a"])
    with pytest.raises(ValueError, match="l2p cannot run on the encoder family"):
        runner.build_learner(run, [])


@pytest.mark.parametrize("method, options, message", [
    ("l2p", {}, "method l2p cannot run on the encoder family"),
    ("moelora", {}, "method moelora cannot run on the encoder family"),
    ("l2p", {"top_n": "11"}, "l2p option top_n=11: expected at most pool_size"),
    ("moelora", {"expert_r": "0"}, "moelora option expert_r=0"),
])
def test_settings_are_checked_before_a_model_loads(method, options, message):
    from rkif.config import RunConfig

    with pytest.raises(ValueError, match=message):
        RunConfig(method=method, method_options=options).check()        # the default backbone: MiniLM, an encoder
