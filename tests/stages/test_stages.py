"""Stage I and II end to end on 2 CPU ranks (gloo, ZeRO-3, real DeepSpeed engines)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from megadistill.engine.launch import run_distributed
from megadistill.integrity import verify_manifest
from megadistill.testing import load_in_fresh_process
from tests.stages.stage_workers import make_models, run_stages


def _losses(run_dir, key="loss"):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    make_models(root)
    run_distributed(run_stages, 2, str(root), timeout_s=900)
    return root


def _weights(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_align_loss_falls_and_only_new_parameters_change(runs):
    losses = _losses(runs / "align")
    assert len(losses) == 6 and losses[-1] < 0.8 * losses[0], losses
    before, after = _weights(runs / "student"), _weights(runs / "align" / "final")
    assert before.keys() == after.keys()
    new = ("q_feature", "k_feature", "igate", "fgate", "ogate")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(any(n in k for n in new) for k in changed), sorted(changed)[:5]
    assert any("fgate" in k for k in changed) and any("q_feature" in k for k in changed)


def test_final_export_is_verified_and_keeps_the_init_fingerprint(runs):
    final = runs / "align" / "final"
    verify_manifest(final)
    init = json.loads((runs / "student" / "megadistill_init.json").read_text())
    assert json.loads((final / "megadistill_init.json").read_text()) == init
    meta = json.loads(
        next((runs / "distill" / "checkpoints").glob("step_*/megadistill.json")).read_text()
    )
    assert meta["fingerprint"] == init["fingerprint"] and meta["world_size"] == 2
    # The export loads like a Hub custom-code model in a process that imported nothing.
    from transformers import AutoModelForCausalLM

    ids = torch.randint(3, 200, (1, 12))
    got = load_in_fresh_process(final, ids)
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(final).eval()(ids).logits
    torch.testing.assert_close(got["logits"], want, rtol=0, atol=0)


def test_distill_loss_falls(runs):
    losses = _losses(runs / "distill")
    assert len(losses) == 6 and losses[-1] < losses[0], losses
    assert all(
        k in json.loads((runs / "distill" / "metrics.jsonl").read_text().splitlines()[0])
        for k in ("ce", "kl")
    )


def test_online_and_offline_teacher_give_the_same_loss(runs):
    online, offline = _losses(runs / "first-online"), _losses(runs / "first-offline")
    assert len(online) == len(offline) == 1
    assert online[0] == pytest.approx(offline[0], rel=1e-5)
    ce_on, ce_off = _losses(runs / "first-online", "kl"), _losses(runs / "first-offline", "kl")
    assert ce_on[0] == pytest.approx(ce_off[0], rel=1e-4)
