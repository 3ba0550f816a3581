"""--reward-opts k=v,k=v in the three scripts: extra options reach the reward factories, with typed values (before,
only rtdmd.py had the flag, and kept every value a string and dropped items without "="; the other scripts' users had
to set environment variables for, e.g., VideoAlign's frame count or an HPS checkpoint); a malformed value, a key
the script sets from its own flags, or a key no factory of --reward takes (a misspelling), is one line and exit 2."""
import functools

import pytest

import otca
import rats
import rtdmd
import toy.rewards
from common.config import parse_config
from common.rewards import RewardError, parse_reward_opts, reward_option_names

pytestmark = pytest.mark.usefixtures("restore_torch_globals")   # the scripts set torch's thread count

RUNS = {   # script: (its toy reward's factory in toy.rewards, an option it takes, one cheap training step)
    "rats": (rats, "quadratic_reward", "scale=0.25", ["--steps", "1", "--batch-size", "8", "--teacher-nfe", "4",
                                                      "--eval-size", "8"]),
    "otca": (otca, "otca_reward", "temperature=0.25", ["--steps", "1", "--nfe", "3", "--group-size", "2",
                                                       "--prompts-per-step", "1", "--eval-samples", "0"]),
    "rtdmd": (rtdmd, "quadratic_reward", "scale=0.25", ["--stage", "1", "--steps", "1", "--batch", "8",
                                                        "--reward", "toy_quadratic", "--eval-samples", "100"]),
}


def _parse(mod, argv):
    return parse_config(mod.Config, argv, presets=mod.PRESETS, checks=[mod.checks])


def test_parse_reward_opts():
    assert parse_reward_opts("") == {}
    assert parse_reward_opts("videoalign_frames=8, videoalign_source_fps=16.5,hps_ckpt=/w/a=b.pt,norm=false") == {
        "videoalign_frames": 8, "videoalign_source_fps": 16.5, "hps_ckpt": "/w/a=b.pt", "norm": False}
    with pytest.raises(RewardError, match=r"^--reward-opts 'frames=8,oops': bad reward option 'oops'"):
        parse_reward_opts("frames=8,oops")
    with pytest.raises(RewardError, match="device is set from the script's own flags"):
        parse_reward_opts("device=cuda:1", reserved=("tiny", "device"))


@pytest.mark.parametrize("name", RUNS)
def test_reward_options_reach_the_factory(name, tmp_path, monkeypatch):
    mod, factory, opt, argv = RUNS[name]
    real, seen = getattr(toy.rewards, factory), []

    @functools.wraps(real)          # the same signature: build_reward passes it what the real factory accepts
    def spy(**kw):
        seen.append(kw)
        return real(**kw)
    monkeypatch.setattr(toy.rewards, factory, spy)
    mod.main(_parse(mod, [*argv, "--reward-opts", opt, "--device", "cpu", "--out", str(tmp_path)]))
    key, value = opt.split("=")
    assert seen and all(kw[key] == float(value) for kw in seen)           # typed: a float, not the string
    assert all(kw["tiny"] is False and str(kw["device"]) == "cpu" for kw in seen)   # the script's own still there


def test_a_misspelt_option_is_refused_unless_a_factory_takes_any():
    assert reward_option_names("toy_quadratic") == {"c", "A", "scale"}
    assert "frames" in reward_option_names("frames:hps") and "hps_ckpt" in reward_option_names("frames:hps")
    assert reward_option_names("hps,dit_color") is None      # the DiT rewards read any option (color_target=red)
    with pytest.raises(RewardError, match=r"no reward of --reward hps,clip takes 'hps_ckp' \(its options: .*hps_ckpt"):
        parse_reward_opts("hps_ckp=/w/HPS.pt", ("tiny", "device"), "hps,clip")
    assert parse_reward_opts("hps_ckpt=/w/HPS.pt,clip_path=/w/clip", (), "hps,clip") == {
        "hps_ckpt": "/w/HPS.pt", "clip_path": "/w/clip"}
    assert parse_reward_opts("color_target=red", (), "dit_color") == {"color_target": "red"}


@pytest.mark.parametrize("name", RUNS)
@pytest.mark.parametrize("opts, needle", [
    ("frames=8,oops", "error: --reward-opts 'frames=8,oops': bad reward option 'oops': expected key=value"),
    ("=3", "error: --reward-opts '=3': bad reward option '=3'"),
    ("tiny=true", "error: --reward-opts 'tiny=true': tiny is set from the script's own flags, not here"),
    ("sacle=2", "error: --reward-opts 'sacle=2': no reward of --reward "),
])
def test_a_malformed_reward_option_is_one_line_exit_2(name, opts, needle, capsys):
    with pytest.raises(SystemExit) as e:
        _parse(RUNS[name][0], ["--reward-opts", opts])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(needle) and err.count("\n") == 1, err
