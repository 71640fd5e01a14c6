import pytest

from simgan_dist.cli import main
from simgan_dist.config import config_from_dict, load_config
from simgan_dist.errors import ConfigError


def test_presets_match_the_paper():
    eye = load_config("eye")
    assert (eye.model.image_height, eye.model.image_width) == (35, 55)
    assert eye.model.refiner_blocks == 4 and eye.model.refiner_kernel == 3
    assert (eye.train.k_g, eye.train.k_d, eye.train.batch_size) == (50, 1, 512)
    assert (eye.train.pretrain_refiner_steps, eye.train.pretrain_disc_steps) == (1000, 200)
    hand = load_config("hand")
    assert (hand.model.image_height, hand.model.refiner_kernel, hand.model.refiner_blocks) == (224, 7, 10)
    assert (hand.train.k_g, hand.train.pretrain_refiner_steps) == (2, 500)


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: tiny\ntrain:\n  lr: 0.01\n  k_g: 3\nloss:\n  lambda_reg: 1\n")
    cfg = load_config("eye", path, ["train.lr=1e-4", "data.synthetic=s3://b/syn", "train.use_gpu=true"])
    assert cfg.model.refiner_blocks == 1  # the file's preset wins over the default
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.train.k_g == 3
    assert cfg.loss.lambda_reg == 1.0 and isinstance(cfg.loss.lambda_reg, float)
    assert cfg.data.synthetic == "s3://b/syn"
    assert cfg.train.use_gpu is True
    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "unknown config key 'train.lrr'"),
    ("trian.lr=1", "unknown config key 'trian'"),
    ("train.k_g=fast", "train.k_g: expected int"),
    ("train.use_gpu=3", "train.use_gpu: expected bool"),
    ("loss.psi=gaussian", "loss.psi"),
    ("train.batch_size=31", "train.batch_size: must be even"),
    ("train", "expected section.key=value"),
    # issue 24 item 11: a torch traceback at the first step, or accepted
    ("train.lr=-1", "train.lr: must be a positive number, got -1.0"),
    ("train.lr=.nan", "train.lr: must be a positive number, got nan"),
    ("train.lr_disc=-1", "train.lr_disc: must be >= 0"),
    ("train.iterations=-3", "train.iterations: must be >= 0, got -3"),
    ("train.pretrain_disc_steps=-1", "train.pretrain_disc_steps: must be >= 0"),
    ("loss.lambda_reg=-0.1", "loss.lambda_reg: must be >= 0"),
    # issue 24 item 9: a run name that leaves train.storage_path
    ("train.name=../x", "train.name: '../x' must be a plain folder name (no '/', '..' or absolute path): "
                        "runs are confined to train.storage_path"),
    ("train.name=/tmp/elsewhere", "train.name: '/tmp/elsewhere' must be a plain folder name"),
    ("train.name=..", "train.name: '..' must be a plain folder name"),
    ("tune.name=a/b", "tune.name: 'a/b' must be a plain folder name"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config("tiny", overrides=[override])


def test_bad_file_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  batchsize: 4\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'train.batchsize'"):
        load_config("tiny", path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("tiny", tmp_path / "missing.yaml")


def test_cli_config_show(capsys):
    assert main(["config", "show", "--preset", "eye", "--set", "train.k_g=7"]) == 0
    out = capsys.readouterr().out
    assert "k_g: 7" in out and "image_width: 55" in out
    assert main(["config", "show", "--set", "model.nope=1"]) == 2
    assert "unknown config key 'model.nope'" in capsys.readouterr().err


def test_a_retired_key_names_its_replacement_and_old_checkpoints_still_load():
    with pytest.raises(ConfigError, match="refine.min_actors"):
        load_config("tiny", overrides=["refine.num_actors=2"])
    old = load_config("tiny").to_dict()
    old["refine"]["num_actors"] = 2  # what an older release wrote into every checkpoint
    assert config_from_dict(old, drop_retired=True).refine.max_actors == load_config("tiny").refine.max_actors
    with pytest.raises(ConfigError, match="replaced by"):
        config_from_dict(old)
