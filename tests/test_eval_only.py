"""--eval-only --ckpt RUN takes the run's backend, and through it that backend's preset, from the checkpoint
(common.config.parse_config), in rats.py, otca.py and rtdmd.py: --teacher may be left out (it used to default to
toy2d: a DiT run was evaluated with the toy's reward and failed deep inside it), a different --teacher is one line and
exit status 2, and the flags given explicitly still win. The small DiT stands for every backend but the default."""
import json

import pytest
import torch

import otca
import rats
import rtdmd
from common.config import parse_config

SCRIPTS = {"rats": rats, "otca": otca, "rtdmd": rtdmd}
pytestmark = pytest.mark.usefixtures("restore_torch_globals")   # the scripts set torch's thread count


def _parse(mod, argv):
    return parse_config(mod.Config, argv, presets=mod.PRESETS, checks=[mod.checks])


@pytest.fixture(scope="module")
def dit_run(tmp_path_factory):
    """A one-step rats.py run on the small DiT: (run directory, its summary)."""
    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("dit") / "run"
    summary = rats.main(_parse(rats, ["--teacher", "dit", "--steps", "1", "--batch-size", "1", "--nfe", "1",
                                      "--teacher-nfe", "1", "--eval-size", "18", "--eval-batch", "18",
                                      "--device", "cpu", "--out", str(out)]))
    torch.set_num_threads(threads)
    return out, summary


@pytest.mark.parametrize("name", SCRIPTS)
def test_the_backend_and_its_preset_come_from_the_checkpoint(dit_run, name):
    mod, run = SCRIPTS[name], dit_run[0]
    for ckpt in (run, run / "checkpoints" / "step_00000001.pt"):      # a run directory or a checkpoint file
        cfg = _parse(mod, ["--eval-only", "--ckpt", str(ckpt)])
        assert cfg.teacher == "dit"
        assert {k: getattr(cfg, k) for k in mod.PRESETS["dit"]} == mod.PRESETS["dit"]
    # explicit flags still win over the preset (reward, eval flags), and --teacher dit is accepted
    cfg = _parse(mod, ["--eval-only", "--ckpt", str(run), "--teacher", "dit", "--reward", "dit_size", "--seed", "5"])
    assert (cfg.teacher, cfg.reward, cfg.seed) == ("dit", "dit_size", 5)
    # without --eval-only --ckpt is not read: the default backend's preset, as before
    assert _parse(mod, ["--ckpt", str(run)]).teacher == "toy2d"


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_teacher_other_than_the_checkpoints_is_refused(dit_run, name, capsys):
    with pytest.raises(SystemExit) as e:
        _parse(SCRIPTS[name], ["--eval-only", "--ckpt", str(dit_run[0]), "--teacher", "toy2d"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: --teacher toy2d")
    assert "--teacher dit" in err


def test_rats_eval_only_without_teacher_reproduces_the_run(dit_run):
    run, trained = dit_run
    out = rats.main(_parse(rats, ["--eval-only", "--ckpt", str(run), "--eval-size", "18", "--eval-batch", "18",
                                  "--device", "cpu"]))
    assert out["reward_student"] == pytest.approx(trained["reward_student"], abs=1e-6)
    assert {"reward_dit_color_student", "reward_dit_shape_student"} <= set(out)    # the DiT preset's reward


def test_rtdmd_eval_only_takes_the_model_and_grid_from_the_checkpoint(tmp_path):
    """rtdmd.py --eval-only also takes the run's model (its --seed builds the base), --timesteps and --eta."""
    rtdmd.main(_parse(rtdmd, ["--teacher", "dit", "--stage", "1", "--steps", "1", "--batch", "2", "--fake-ratio", "1",
                              "--seed", "3", "--timesteps", "1000,600,300", "--eta", "0.5", "--device", "cpu",
                              "--out", str(tmp_path)]))
    cfg = _parse(rtdmd, ["--eval-only", "--ckpt", str(tmp_path), "--eval-nfe", "3", "--eval-per-prompt", "1",
                         "--device", "cpu"])
    rows = rtdmd.main(cfg)["rows"]
    assert (cfg.teacher, cfg.seed, cfg.timesteps, cfg.eta) == ("dit", 3, [1000, 600, 300], 0.5)
    assert [r["model"] for r in rows] == ["teacher (N=50, Euler)", "base generator (K=3)", "RTDMD (K=3)"]
    assert all("dit_color" in r for r in rows)                                     # the DiT preset's reward
    assert [r["model"] for r in json.load(open(tmp_path / "eval.json"))] == [r["model"] for r in rows]
