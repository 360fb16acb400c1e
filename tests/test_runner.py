"""The loop over tasks end to end on tiny tasks with MiniLM: matrix, checkpoints, resume, CLI, report."""

import json

import pytest
from safetensors.torch import load_file

from rkif import runner
from rkif.backbones import BackboneConfig
from rkif.cli import main
from rkif.config import RunConfig
from tests.conftest import cut_and_resume


def config(data, out, method="rkif", **kw) -> RunConfig:
    settings = dict(method=method, backbone=BackboneConfig(max_length=32), data=str(data),
                    method_options={"inner_steps": "1", "outer_steps": "1"} if method == "rkif" else {},
                    tasks=["alpha", "beta", "gamma"], train_size=None, test_size=None, memory_fraction=0.25,
                    epochs=1, batch_size=8, lr=5e-3, seed=7, output=str(out))
    return RunConfig(**{**settings, **kw})


def test_run_fills_the_matrix_and_writes_results(tiny_data, tmp_path):
    res = runner.run_experiment(config(tiny_data, tmp_path / "run", method="replay"))
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["accuracy"] == res["accuracy"] and len(res["accuracy"]) == 3
    assert all(len(row) == 3 for row in res["accuracy"]) and len(res["initial_accuracy"]) == 3
    assert res["complete"] and res["op"] is not None and res["bwt"] is not None and res["fwt"] is not None
    for key in ("method", "model", "order", "tasks", "config", "seconds", "versions"):
        assert key in saved
    assert saved["config"]["seed"] == 7 and "torch" in saved["versions"]
    for j in range(3):
        ckpt = tmp_path / "run" / "checkpoints" / f"stage_{j}"
        assert load_file(ckpt / "adapter.safetensors")                       # safetensors weights
        assert json.loads((ckpt / "method.json").read_text())["memory"]["by_task"]


def test_mtl_trains_one_stage(tiny_data, tmp_path):
    res = runner.run_experiment(config(tiny_data, tmp_path / "mtl", method="mtl"))
    assert res["stages"] == [["alpha", "beta", "gamma"]] and all(len(r) == 1 for r in res["accuracy"])
    assert res["bwt"] is None and res["op"] is not None


def test_resume_after_a_crash_gives_the_same_matrix(tiny_data, tmp_path, monkeypatch):
    full = runner.run_experiment(config(tiny_data, tmp_path / "full"))

    partial, resumed = cut_and_resume(monkeypatch, lambda **kw: config(tiny_data, tmp_path / "cut", **kw), 1)
    assert partial["finished_stages"] == 1 and not partial["complete"]
    assert resumed["accuracy"] == full["accuracy"]
    assert resumed["initial_accuracy"] == full["initial_accuracy"]
    assert resumed["diagnostics"]["rounds"] == full["diagnostics"]["rounds"]


def test_existing_results_are_never_overwritten(tiny_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text('{"keep": true}')
    with pytest.raises(FileExistsError, match="--resume"):
        runner.run_experiment(config(tiny_data, out, method="seqlora"))
    assert json.loads((out / "results.json").read_text()) == {"keep": True}


def test_resume_refuses_changed_settings(tiny_data, tmp_path):
    runner.run_experiment(config(tiny_data, tmp_path / "run", method="seqlora", epochs=0.5))
    with pytest.raises(ValueError, match="epochs"):
        runner.run_experiment(config(tiny_data, tmp_path / "run", method="seqlora", resume=True))


def test_cli_run_and_report(tiny_data, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["run", "--method", "seqlora", "--data", str(tiny_data), "--tasks", "alpha,beta",
                 "--train-size", "8", "--test-size", "all", "--max-length", "32", "--output", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| alpha |" in printed and "OP" in printed
    assert (out / "matrix_cli.png").stat().st_size > 0
    assert (out / "final_accuracy.png").exists() and (out / "table.md").exists()
    assert main(["report", str(out), "--out", str(tmp_path / "rep")]) == 0
    assert "| seqlora |" in (tmp_path / "rep" / "table.md").read_text()


def test_cli_errors_name_the_fault(tiny_data, tmp_path, caplog):
    assert main(["run", "--data", str(tiny_data), "--tasks", "alpha,nope", "--output", str(tmp_path / "x")]) == 2
    assert "nope" in caplog.text
    assert main(["run", "--method", "magic", "--data", str(tiny_data), "--tasks", "alpha",
                 "--output", str(tmp_path / "y")]) == 2
    assert "magic" in caplog.text


def test_resume_without_its_checkpoint_fails_clearly(tiny_data, tmp_path, monkeypatch):
    """A results.json whose checkpoint is gone (e.g. committed without it) must not resume silently."""
    cut, _ = cut_and_resume(monkeypatch, lambda **kw: config(tiny_data, tmp_path / "cut", method="replay", **kw), 1)
    (tmp_path / "cut" / "results.json").write_text(json.dumps(cut))          # back to the cut state
    (tmp_path / "cut" / "checkpoints" / "stage_0" / "adapter.safetensors").unlink()
    before = (tmp_path / "cut" / "results.json").read_text()
    with pytest.raises(FileNotFoundError, match="adapter.safetensors"):
        runner.run_experiment(config(tiny_data, tmp_path / "cut", method="replay", resume=True))
    assert (tmp_path / "cut" / "results.json").read_text() == before


def test_results_record_the_resolved_method_config_and_a_changed_default_forbids_resuming(tiny_data, tmp_path,
                                                                                            monkeypatch):
    import rkif.methods.ewc as ewc

    run = config(tiny_data, tmp_path / "run", method="ewc", tasks=["alpha", "beta"])
    monkeypatch.setattr(runner, "train_stage", lambda *a, **k: {})          # the bookkeeping is what is tested
    monkeypatch.setattr(ewc.EWC, "after_task", lambda self, *a: None)
    first = runner.run_experiment(run)
    assert first["method_config"]["ewc_lambda"] == ewc.EWCConfig().ewc_lambda
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    saved.update(complete=False, finished_stages=1, accuracy=[row[:1] for row in saved["accuracy"]])
    saved["method_config"]["ewc_lambda"] = 12345.0           # as if started under another default
    (tmp_path / "run" / "results.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"ewc_lambda 12345.0 -> "):
        runner.run_experiment(RunConfig(**{**run.__dict__, "resume": True}))


def test_seen_and_next_scope_evaluates_only_what_the_metrics_read(tiny_data, tmp_path):
    full = runner.run_experiment(config(tiny_data, tmp_path / "all", method="seqlora"))
    lean = runner.run_experiment(config(tiny_data, tmp_path / "lean", method="seqlora", eval_scope="seen+next"))
    # after stage 0 the last task (gamma) is neither seen nor next; every other cell is evaluated
    assert lean["accuracy"][2][0] is None
    cells = [(i, j) for i in range(3) for j in range(3) if (i, j) != (2, 0)]
    assert all(lean["accuracy"][i][j] == full["accuracy"][i][j] for i, j in cells)
    for key in ("op", "bwt", "fwt", "forgetting"):
        assert lean[key] == full[key]
    from rkif.report import matrix_table, plot_matrix
    plot_matrix(lean, tmp_path / "lean.png")                 # a blank cell draws, not crashes
    assert "| gamma | " in matrix_table(lean) and " - |" in matrix_table(lean)


def test_unknown_eval_scope_fails_before_training(tiny_data, tmp_path):
    with pytest.raises(ValueError, match="--eval-scope 'seen': choose from all, seen"):
        runner.run_experiment(config(tiny_data, tmp_path / "run", method="seqlora", eval_scope="seen"))
    assert not (tmp_path / "run" / "results.json").exists()


def test_a_run_saved_before_a_setting_existed_resumes_at_its_default(tiny_data, tmp_path, monkeypatch):
    """results.json written before a setting was added: the missing key means the default."""
    def make(**kw):
        return config(tiny_data, tmp_path / "old", method="seqlora", **kw)

    def strip_new_setting():
        path = tmp_path / "old" / "results.json"
        saved = json.loads(path.read_text())
        del saved["config"]["eval_scope"]
        del saved["config"]["backbone"]["logit_scale"]                 # nested settings too
        path.write_text(json.dumps(saved))

    real = runner.train_stage
    calls = []

    def one_stage(*a, **kw):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(runner, "train_stage", one_stage)             # stage 0 finishes, stage 1 crashes
    with pytest.raises(KeyboardInterrupt):
        runner.run_experiment(make())
    monkeypatch.setattr(runner, "train_stage", real)
    strip_new_setting()
    with pytest.raises(ValueError, match="eval_scope"):
        runner.run_experiment(make(resume=True, eval_scope="seen+next"))   # "all" then, "seen+next" now
    resumed = runner.run_experiment(make(resume=True))
    assert resumed["complete"] and resumed["finished_stages"] == 3


def test_runs_whose_behaviour_changed_since_they_were_saved_refuse_to_resume():
    from rkif.runner import _changed_behaviour

    current = RunConfig().to_dict()
    assert _changed_behaviour(current) is None
    old_causal = {**current, "backbone": {k: v for k, v in current["backbone"].items() if k != "prompt_format"}}
    old_causal["backbone"]["family"] = "causal"
    assert "generative evaluation changed" in _changed_behaviour(old_causal)
    old_encoder = {**old_causal, "backbone": {**old_causal["backbone"], "family": "encoder"}}
    assert _changed_behaviour(old_encoder) is None                      # MiniLM runs resume as before
    old_bf16 = {k: v for k, v in current.items() if k != "group_by_length"} | {"precision": "bf16"}
    assert "bf16" in _changed_behaviour(old_bf16)


def test_a_second_cli_run_into_a_busy_output_is_refused(tiny_data, tmp_path, caplog):
    import os
    import socket

    out = tmp_path / "busy"
    out.mkdir()
    (out / ".lock").write_text(f"{socket.gethostname()} {os.getppid()}")          # a live process holds it
    assert main(["run", "--data", str(tiny_data), "--tasks", "alpha", "--output", str(out)]) == 2
    assert "being written by another rkif process" in caplog.text
    assert not (out / "results.json").exists()


def test_the_backbone_is_placed_where_the_trainer_will_train_it_before_any_evaluation(tiny_data, tmp_path,
                                                                                     monkeypatch):
    """On a GPU the untrained evaluation must not run on the CPU (the Trainer moves the model only when it trains)."""
    import torch

    from rkif.data import load_benchmark

    monkeypatch.setattr(runner, "training_device", lambda: torch.device("meta"))
    run = config(tiny_data, tmp_path / "run", method="seqlora")
    tasks = load_benchmark(tiny_data, ["alpha"], None, None, "test", 7)
    backbone, _ = runner.build_learner(run, tasks)
    assert backbone.device.type == "meta"


def test_rkif_methods_lists_every_method_with_its_summary_and_options_and_every_preset(capsys):
    from rkif.cli import main
    from rkif.methods import METHODS, PRESETS

    assert main(["methods"]) == 0
    shown = capsys.readouterr().out
    starts = {line.split()[0] for line in shown.splitlines() if line and not line.startswith(" ")}
    assert starts == set(METHODS) | set(PRESETS)
    assert "lfpt5          LFPT5: one soft prompt" in shown and "prompt_length=300" in shown
    assert "rkif-ki        rkif with fusion=sum" in shown
    needs = [line.split()[0] for line, after in zip(shown.splitlines(), shown.splitlines()[1:])
             if "needs a causal or seq2seq backbone (--model smollm2" in after]
    assert needs == ["l2p", "lfpt5", "moelora", "sapt"]          # the generative-only methods, no other
    assert all(len(line) <= 100 for line in shown.splitlines() if line.startswith(" "))   # options wrapped
